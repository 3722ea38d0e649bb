//! The QuantizedModel reconciler: drives baseline → quantize → validate as
//! Jobs of the worker, one at a time, and records every result in status.
//!
//! Level-triggered: each reconciliation recomputes the stage hashes from the
//! spec, looks for the Jobs those hashes name and acts on what it finds, so a
//! restarted operator adopts the Jobs it created before, and a changed spec
//! re-runs exactly the stages whose hash changed.

use crate::config::OperatorConfig;
use crate::job::{self, RenderError};
use crate::k8s::{self, KubeContext, KubeError};
pub use crate::k8s::{FIELD_MANAGER, JobState, job_state, termination_message};
use crate::metrics::Metrics;
use crate::pipeline::{self, Next, Observation, Phase, Stage};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::LogParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use quantops_api::{QuantizedModel, QuantizedModelStatus, StageSummary};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The controller's name in metrics and events.
pub const CONTROLLER: &str = "quantizedmodel";

/// Why a reconciliation failed; the controller requeues it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("QuantizedModel {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// A bounded label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Render(_) => "render",
            Error::NoNamespace(_) => "namespace",
        }
    }
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The operator's Jobs and their pods as last watched: scanning them here
    /// instead of listing them from the API server keeps a reconciliation's
    /// cost independent of how many models share the namespace.
    caches: Caches,
    /// Consecutive failed reconciliations per object, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// Reflector caches of the objects the operator creates (labelled
/// `app.kubernetes.io/managed-by=quantops`).
#[derive(Clone)]
pub struct Caches {
    pub jobs: Store<Job>,
    pub pods: Store<Pod>,
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        metrics: Metrics,
        caches: Caches,
        instance: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: "quantops".to_string(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            caches,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an event on the model; a failure to publish is logged, not
    /// fatal, since events are advisory.
    async fn event(&self, qm: &QuantizedModel, type_: EventType, reason: &str, note: String) {
        k8s::publish_event(
            &self.recorder,
            &qm.object_ref(&()),
            type_,
            "Reconcile",
            reason,
            note,
        )
        .await;
    }
}

/// The APIs one reconciliation uses, all in the model's namespace.
struct Apis {
    namespace: String,
    models: Api<QuantizedModel>,
    jobs: Api<Job>,
    config_maps: Api<ConfigMap>,
    pods: Api<Pod>,
}

/// The cached pods of a Job, by the label the Job controller puts on them.
fn cached_pods(caches: &Caches, namespace: &str, job_name: &str) -> Vec<Pod> {
    caches
        .pods
        .state()
        .into_iter()
        .filter(|pod| pod.namespace().as_deref() == Some(namespace))
        .filter(|pod| {
            pod.labels()
                .get("batch.kubernetes.io/job-name")
                .map(String::as_str)
                == Some(job_name)
        })
        .map(|pod| (*pod).clone())
        .collect()
}

/// Parses a termination message: a `StageSummary`, or (with
/// `FallbackToLogsOnError`) the log tail of a worker that died before
/// writing one, returned as the error.
pub fn parse_summary(message: &str) -> Result<StageSummary, String> {
    serde_json::from_str::<StageSummary>(message.trim()).map_err(|_| {
        let tail: String = message
            .chars()
            .rev()
            .take(800)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("no stage summary; last output: {}", tail.trim())
    })
}

/// The stage's summary from its pod: from the cache when it has the
/// terminated container already, else from the API server (the pod watch
/// may lag behind the Job's).
async fn read_summary(ctx: &Context, apis: &Apis, job_name: &str) -> Result<Option<String>, Error> {
    let cached = cached_pods(&ctx.caches, &apis.namespace, job_name);
    Ok(k8s::read_termination_message(&apis.pods, &cached, job_name).await?)
}

/// How often a running stage is looked at, to keep `status.progress` fresh.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

/// The last `progress:` line of the worker's log (plain or JSON lines), as
/// `quantize layer 14/32`, cut to a length fit for `kubectl get`.
pub fn last_progress(logs: &str) -> Option<String> {
    logs.lines().rev().find_map(|line| {
        let message = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["fields"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| line.to_string());
        let (_, progress) = message.split_once("progress: ")?;
        Some(progress.trim().chars().take(120).collect())
    })
}

/// The running worker's latest progress line; unavailable logs are not an
/// error (the pod may not have started yet).
async fn running_progress(ctx: &Context, apis: &Apis, job_name: &str) -> Option<String> {
    let pods = cached_pods(&ctx.caches, &apis.namespace, job_name);
    let pod = pods
        .iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))?;
    let params = LogParams {
        container: Some("quantizer".to_string()),
        tail_lines: Some(50),
        ..LogParams::default()
    };
    match apis.pods.logs(&pod.name_any(), &params).await {
        Ok(logs) => last_progress(&logs),
        Err(error) => {
            tracing::debug!(%error, job = job_name, "cannot read the worker's log");
            None
        }
    }
}

/// Deletes this model's Jobs that are still running for a spec that no
/// longer applies (their stage hash changed), so an edited spec does not
/// leave a GPU busy with a stale run. Only Jobs this model controls are
/// touched; finished ones stay for their logs and are collected with the model.
async fn delete_stale_jobs(qm: &QuantizedModel, ctx: &Context, apis: &Apis) -> Result<(), Error> {
    let model = qm.name_any();
    let expected: Vec<String> = Stage::PIPELINE
        .iter()
        .map(|stage| job::job_name(&model, *stage, &pipeline::stage_hash(&qm.spec, *stage)))
        .collect();
    let label = job::model_label(&model);
    let jobs: Vec<Arc<Job>> = ctx
        .caches
        .jobs
        .state()
        .into_iter()
        .filter(|j| j.namespace().as_deref() == Some(apis.namespace.as_str()))
        .filter(|j| j.labels().get(job::MODEL_LABEL) == Some(&label))
        .collect();
    let uid = qm.uid();
    for stale in jobs.iter().filter(|j| {
        let owned = j
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref());
        owned
            && j.metadata.deletion_timestamp.is_none()
            && !expected.contains(&j.name_any())
            && job_state(j) == JobState::Running
    }) {
        let name = stale.name_any();
        if k8s::delete_if_present(&apis.jobs, &name).await? {
            ctx.event(
                qm,
                EventType::Normal,
                "StaleJobDeleted",
                format!("deleted Job {name}: the spec it ran for has changed"),
            )
            .await;
        }
    }
    Ok(())
}

/// Writes the model's status (server-side apply on the status subresource).
async fn write_status(
    apis: &Apis,
    qm: &QuantizedModel,
    status: &QuantizedModelStatus,
) -> Result<(), Error> {
    Ok(k8s::apply_status(&apis.models, &qm.name_any(), status).await?)
}

/// One reconciliation of a QuantizedModel.
pub async fn reconcile(qm: Arc<QuantizedModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = ctx
        .metrics
        .reconcile(CONTROLLER, reconcile_inner(&qm, &ctx))
        .await;
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&object_key(&qm));
    }
    result
}

fn object_key(qm: &QuantizedModel) -> String {
    format!("{}/{}", qm.namespace().unwrap_or_default(), qm.name_any())
}

async fn reconcile_inner(qm: &QuantizedModel, ctx: &Context) -> Result<Action, Error> {
    if qm.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the Jobs and ConfigMaps.
        return Ok(Action::await_change());
    }
    let name = qm.name_any();
    let namespace = qm
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let client = ctx.client.clone();
    let apis = Apis {
        namespace: namespace.clone(),
        models: Api::namespaced(client.clone(), &namespace),
        jobs: Api::namespaced(client.clone(), &namespace),
        config_maps: Api::namespaced(client.clone(), &namespace),
        pods: Api::namespaced(client, &namespace),
    };
    let obs = Observation {
        generation: qm.metadata.generation,
        now: Timestamp::now(),
    };
    let old = qm.status.clone().unwrap_or_default();
    let mut status = old.clone();
    pipeline::observe_generation(&mut status, &obs);
    let action = match quantops_api::spec_file::validate(qm) {
        Ok(()) => drive(qm, ctx, &apis, &mut status, &old, &obs).await?,
        Err((field, expected)) => {
            let message = pipeline::record_invalid(&mut status, field, expected, &obs);
            let ready = |s: &QuantizedModelStatus| {
                crate::conditions::find(&s.conditions, pipeline::READY).map(|c| c.message.clone())
            };
            if ready(&old) != ready(&status) {
                ctx.event(qm, EventType::Warning, "InvalidSpec", message)
                    .await;
            }
            Action::await_change()
        }
    };
    if status != old {
        write_status(&apis, qm, &status).await?;
    }
    if old.phase != status.phase {
        tracing::info!(model = %name, namespace = %namespace, from = ?old.phase, to = ?status.phase, "phase changed");
    }
    Ok(action)
}

/// Walks the stages in order and acts on the first that is not done.
async fn drive(
    qm: &QuantizedModel,
    ctx: &Context,
    apis: &Apis,
    status: &mut QuantizedModelStatus,
    old: &QuantizedModelStatus,
    obs: &Observation,
) -> Result<Action, Error> {
    let policy = ctx.config.retry;
    let model = qm.name_any();
    delete_stale_jobs(qm, ctx, apis).await?;
    for stage in Stage::PIPELINE {
        let hash = pipeline::stage_hash(&qm.spec, stage);
        let job_name = job::job_name(&model, stage, &hash);
        let existing = apis
            .jobs
            .get_opt(&job_name)
            .await
            .during(|| format!("reading Job {job_name}"))?;
        let Some(existing) = existing else {
            if pipeline::gave_up(status, stage, &policy) {
                status.phase = Some(Phase::Failed.as_str().to_string());
                return Ok(Action::await_change());
            }
            if let Some(wait) = pipeline::retry_wait(status, stage, &policy, obs.now) {
                return Ok(Action::requeue(wait));
            }
            k8s::apply(&apis.config_maps, &job::render_config_map(qm, stage)?).await?;
            k8s::apply(&apis.jobs, &job::render_job(qm, stage, &ctx.config.jobs)?).await?;
            pipeline::mark_running(status, stage, &format!("Job {job_name} started"), obs);
            ctx.event(
                qm,
                EventType::Normal,
                "StageStarted",
                format!("{stage}: started Job {job_name}"),
            )
            .await;
            return Ok(Action::requeue(ctx.config.resync));
        };
        if existing.metadata.deletion_timestamp.is_some() {
            // A retried stage's old Job is still going away.
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        match job_state(&existing) {
            JobState::Running => {
                pipeline::mark_running(status, stage, &format!("Job {job_name} running"), obs);
                if let Some(progress) = running_progress(ctx, apis, &job_name).await {
                    status.progress = Some(if progress.starts_with(stage.name()) {
                        progress
                    } else {
                        format!("{stage}: {progress}")
                    });
                }
                return Ok(Action::requeue(PROGRESS_INTERVAL.min(ctx.config.resync)));
            }
            JobState::Succeeded => {
                let message = read_summary(ctx, apis, &job_name).await?;
                let summary = match message.as_deref().map(parse_summary) {
                    Some(Ok(summary)) if summary.error.is_none() => summary,
                    Some(Ok(summary)) => {
                        let error = summary.error.unwrap_or_default();
                        return broken(qm, ctx, apis, status, stage, &job_name, &error, obs).await;
                    }
                    Some(Err(error)) => {
                        return broken(qm, ctx, apis, status, stage, &job_name, &error, obs).await;
                    }
                    None => {
                        let error = "the Job succeeded but its pod's termination message is gone";
                        return broken(qm, ctx, apis, status, stage, &job_name, error, obs).await;
                    }
                };
                let next = pipeline::record_success(status, stage, &summary, obs);
                let changed = condition_changed(old, status, stage);
                if changed {
                    record_result_metrics(&ctx.metrics, stage, &summary);
                }
                match next {
                    Next::Run(_) => {
                        if changed {
                            ctx.event(
                                qm,
                                EventType::Normal,
                                "StageSucceeded",
                                format!("{stage} finished (Job {job_name})"),
                            )
                            .await;
                        }
                        continue;
                    }
                    Next::Ready => {
                        if changed {
                            ctx.event(
                                qm,
                                EventType::Normal,
                                "Ready",
                                "validated: every gate passed".to_string(),
                            )
                            .await;
                        }
                        return Ok(Action::await_change());
                    }
                    Next::GatesFailed(message) => {
                        if changed {
                            ctx.event(qm, EventType::Warning, "GatesFailed", message)
                                .await;
                        }
                        return Ok(Action::await_change());
                    }
                    Next::RetryAfter(_) | Next::GaveUp(_) => return Ok(Action::await_change()),
                }
            }
            JobState::Failed(reason) => {
                if pipeline::gave_up(status, stage, &policy) {
                    // Already counted and given up on; the failed Job stays
                    // for its logs until the spec changes.
                    status.phase = Some(Phase::Failed.as_str().to_string());
                    return Ok(Action::await_change());
                }
                let message = read_summary(ctx, apis, &job_name).await?;
                let error = match message.as_deref().map(parse_summary) {
                    Some(Ok(StageSummary {
                        error: Some(error), ..
                    })) => error,
                    Some(Err(logs)) => logs,
                    _ => reason.unwrap_or_else(|| "the Job failed".to_string()),
                };
                return broken(qm, ctx, apis, status, stage, &job_name, &error, obs).await;
            }
        }
    }
    Ok(Action::await_change())
}

/// A stage broke: count it, record it, and delete its Job so the retry
/// (after the backoff) can create it again under the same name.
#[allow(clippy::too_many_arguments)]
async fn broken(
    qm: &QuantizedModel,
    ctx: &Context,
    apis: &Apis,
    status: &mut QuantizedModelStatus,
    stage: Stage,
    job_name: &str,
    error: &str,
    obs: &Observation,
) -> Result<Action, Error> {
    let next = pipeline::record_broken(status, stage, error, &ctx.config.retry, obs);
    ctx.metrics
        .stage_results
        .with_label_values(&[stage.name(), "broken"])
        .inc();
    // The attempt is recorded before the Job goes, so that a crash in
    // between cannot lose the count.
    write_status(apis, qm, status).await?;
    match next {
        Next::RetryAfter(delay) => {
            ctx.event(
                qm,
                EventType::Warning,
                "StageFailed",
                format!(
                    "{stage} (Job {job_name}) failed, retrying in {}s: {error}",
                    delay.as_secs()
                ),
            )
            .await;
            k8s::delete_if_present(&apis.jobs, job_name).await?;
            Ok(Action::requeue(delay))
        }
        Next::GaveUp(message) => {
            ctx.event(qm, EventType::Warning, "StageFailed", message)
                .await;
            Ok(Action::await_change())
        }
        _ => Ok(Action::await_change()),
    }
}

/// Whether reconciling changed the stage's condition, ignoring its time and
/// generation: a stage that re-runs passes through `Running` first, so a
/// result seen again under a new generation is not counted twice.
fn condition_changed(old: &QuantizedModelStatus, new: &QuantizedModelStatus, stage: Stage) -> bool {
    let key = |s: &QuantizedModelStatus| {
        crate::conditions::find(&s.conditions, stage.condition_type())
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    key(old) != key(new)
}

fn record_result_metrics(metrics: &Metrics, stage: Stage, summary: &StageSummary) {
    metrics
        .stage_results
        .with_label_values(&[stage.name(), "succeeded"])
        .inc();
    if let Some(seconds) = summary.seconds {
        metrics
            .stage_duration
            .with_label_values(&[stage.name()])
            .observe(seconds);
    }
    for gate in &summary.gates {
        let result = if gate.passed { "passed" } else { "failed" };
        metrics
            .gate_results
            .with_label_values(&[gate.name.as_str(), result])
            .inc();
    }
}

/// Requeues a failed reconciliation, backing off exponentially per object
/// (5s, 10s, ... up to 5 minutes); never stops the controller.
pub fn error_policy(qm: Arc<QuantizedModel>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[CONTROLLER, error.kind()])
        .inc();
    let failures = match ctx.failures.lock() {
        Ok(mut map) => {
            let count = map.entry(object_key(&qm)).or_insert(0);
            *count = count.saturating_add(1);
            *count
        }
        Err(_) => 1,
    };
    let delay = Duration::from_secs(5u64.saturating_mul(1u64 << failures.min(6).saturating_sub(1)))
        .min(Duration::from_secs(300));
    tracing::warn!(model = %object_key(&qm), error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// Runs both controllers (QuantizedModel and ModelPromotion) over the
/// namespaces of `config.watch` until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    futures::join!(
        run_models(
            client.clone(),
            config.clone(),
            metrics.clone(),
            shutdown.clone()
        ),
        crate::promotion::controller::run(
            client,
            config.watch.clone(),
            config.promotion.clone(),
            config.jobs.clone(),
            metrics,
            shutdown,
        ),
    );
}

/// Runs one QuantizedModel controller per watched namespace (one for the
/// cluster when unscoped) until `shutdown` resolves. Each has its own work
/// queue and caches, so it needs rights only in its namespace; one
/// semaphore shared by all of them keeps `max_concurrent_reconciles` a
/// bound on the operator as a whole, and any namespace may use all of it.
async fn run_models(
    client: Client,
    config: OperatorConfig,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let concurrency = config.max_concurrent_reconciles;
    let permits = Arc::new(tokio::sync::Semaphore::new(usize::from(concurrency)));
    let mut stores = Vec::new();
    let mut runs = Vec::new();
    for namespace in config.watch.targets() {
        let ns = namespace.as_deref();
        let controller = Controller::new(
            crate::scope::api::<QuantizedModel>(&client, ns),
            watcher::Config::default(),
        )
        .owns(
            crate::scope::api::<Job>(&client, ns),
            watcher::Config::default().labels(MANAGED_BY_QUANTOPS),
        )
        .with_config(controller::Config::default().concurrency(concurrency));
        stores.push(controller.store());
        runs.push(run_models_in(
            controller,
            namespace,
            client.clone(),
            config.clone(),
            metrics.clone(),
            permits.clone(),
            shutdown.clone(),
        ));
    }
    let phases = tokio::spawn(count_phases(stores, metrics));
    futures::future::join_all(runs).await;
    phases.abort();
}

/// Runs `controller` (the QuantizedModels of `namespace`, or of every
/// namespace) with caches of the Jobs and pods there.
async fn run_models_in(
    controller: Controller<QuantizedModel>,
    namespace: Option<String>,
    client: Client,
    config: OperatorConfig,
    metrics: Metrics,
    permits: Arc<tokio::sync::Semaphore>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = namespace.as_deref();
    let ours = watcher::Config::default().labels(MANAGED_BY_QUANTOPS);
    let (job_cache, job_writer) = reflector::store::<Job>();
    let (pod_cache, pod_writer) = reflector::store::<Pod>();
    let job_watch = tokio::spawn(drain(reflector(
        job_writer,
        watcher(crate::scope::api::<Job>(&client, ns), ours.clone()),
    )));
    let pod_watch = tokio::spawn(drain(reflector(
        pod_writer,
        watcher(crate::scope::api::<Pod>(&client, ns), ours),
    )));
    for (what, cache) in [
        ("Jobs", job_cache.wait_until_ready().await),
        ("pods", pod_cache.wait_until_ready().await),
    ] {
        if let Err(error) = cache {
            tracing::error!(%error, what, namespace = ns.unwrap_or("*"), "the cache never filled; stopping");
            job_watch.abort();
            pod_watch.abort();
            return;
        }
    }
    let caches = Caches {
        jobs: job_cache,
        pods: pod_cache,
    };
    let instance = std::env::var("POD_NAME").ok();
    let ctx = Arc::new(Context::new(client, config, metrics, caches, instance));
    let limited = move |qm: Arc<QuantizedModel>, ctx: Arc<Context>| {
        let permits = permits.clone();
        async move {
            // Never closed, so this waits for a permit rather than failing.
            let _permit = permits.acquire_owned().await;
            reconcile(qm, ctx).await
        }
    };
    controller
        .graceful_shutdown_on(shutdown)
        .run(limited, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(model = %object.name, "reconciled"),
                Err(error) => tracing::debug!(%error, "reconcile error"),
            }
        })
        .await;
    job_watch.abort();
    pod_watch.abort();
}

/// The label selector of everything the operator creates.
const MANAGED_BY_QUANTOPS: &str = "app.kubernetes.io/managed-by=quantops";

/// Keeps a reflector's watch running (its errors are retried with backoff).
async fn drain<K, S>(stream: S)
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    stream
        .default_backoff()
        .for_each(|event| async move {
            if let Err(error) = event {
                tracing::debug!(%error, "watch error; retrying");
            }
        })
        .await;
}

/// Keeps the objects-per-phase gauge current from the controllers' caches.
async fn count_phases(stores: Vec<Store<QuantizedModel>>, metrics: Metrics) {
    loop {
        let mut counts: HashMap<&'static str, i64> =
            Phase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
        for qm in stores.iter().flat_map(Store::state) {
            let phase = qm
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .and_then(|p| Phase::ALL.iter().find(|x| x.as_str() == p))
                .map_or(Phase::Pending.as_str(), |p| p.as_str());
            *counts.entry(phase).or_insert(0) += 1;
        }
        for (phase, count) in counts {
            metrics
                .objects_by_phase
                .with_label_values(&[phase])
                .set(count);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which pod's message is read is `k8s::termination_message`'s test.
    #[test]
    fn a_stage_summary_parses() {
        let message = r#"{"stage":"quantize","variant":"v","artifact_digest":"sha256:ab"}"#;
        let summary = parse_summary(message).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(summary.artifact_digest.as_deref(), Some("sha256:ab"));
    }

    #[test]
    fn log_fallback_becomes_the_error() {
        let error = parse_summary("thread 'main' panicked at src/main.rs: out of memory").err();
        assert!(error.is_some_and(|e| e.contains("out of memory")));
    }

    #[test]
    fn progress_from_json_and_plain_logs() {
        let json = concat!(
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"progress: quantize layer 13/32","stage":"quantize"}}"#,
            "\n",
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"progress: quantize layer 14/32","stage":"quantize"}}"#,
            "\n",
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"saving"}}"#,
        );
        assert_eq!(last_progress(json).as_deref(), Some("quantize layer 14/32"));
        let plain = "2026 INFO progress: baseline window 3/64 stage=baseline\nother";
        assert_eq!(
            last_progress(plain).as_deref(),
            Some("baseline window 3/64 stage=baseline")
        );
        assert_eq!(last_progress("nothing here"), None);
    }
}
