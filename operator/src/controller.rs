//! The QuantizedModel reconciler: drives baseline → quantize → validate as
//! Jobs of the worker, one at a time, and records every result in status.
//!
//! Level-triggered: each reconciliation recomputes the stage hashes from the
//! spec, reads each stage's record in `status.stages` (and, for a stage not
//! recorded as done, the Job its hash names) and acts on what it finds, so a
//! restarted operator adopts the Jobs it created before, a changed spec
//! re-runs exactly the stages whose hash changed, and a deleted finished Job
//! re-runs nothing. Each transition is written to status first, against the
//! resourceVersion the reconciliation read ([`StatusStore`]); what follows
//! from it (metrics, events, the next Job) happens only when that write went
//! through, so it happens once however many times the model is reconciled.

use crate::config::OperatorConfig;
use crate::job::{self, RenderError};
use crate::k8s::{self, KubeContext, KubeError, StatusWrite};
pub use crate::k8s::{FIELD_MANAGER, JobState, job_state, termination_message};
use crate::lanes::Lanes;
use crate::metrics::Metrics;
use crate::model_watch::ModelWatch;
use crate::output_claim::{self, Claim};
use crate::outputs;
use crate::pipeline::{self, JobSeen, Next, Observation, Phase, Stage, StageRun, Step};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::LogParams;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
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
    #[error("the cache of {0} never filled")]
    CacheNotReady(&'static str),
}

impl Error {
    /// A bounded label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Render(_) => "render",
            Error::NoNamespace(_) => "namespace",
            Error::CacheNotReady(_) => "cache",
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
    /// Every QuantizedModel the controller watches: who else writes an
    /// artifact directory.
    pub models: Store<QuantizedModel>,
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
        .filter(|pod| pod.labels().get(k8s::JOB_NAME_LABEL).map(String::as_str) == Some(job_name))
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

/// The model's status as last read or written, and the resourceVersion it
/// came with. Every write is made against that version, so that a
/// reconciliation that started from a stale cache (its own last write not
/// yet seen) cannot undo a newer status, and a write that goes through is
/// known to be the transition it records. What follows a transition —
/// counting it, an event, the next stage's Job — happens only after that.
struct StatusStore<'a> {
    api: &'a Api<QuantizedModel>,
    name: String,
    resource_version: Option<String>,
    stored: QuantizedModelStatus,
    /// A write found the object changed: this view is done with.
    stale: bool,
}

impl StatusStore<'_> {
    /// Stores `status` unless it is what is stored already. `Ok(false)` when
    /// the view was stale (the object changed since it was read): nothing
    /// was written, and nothing derived from the view may be acted on.
    async fn commit(&mut self, status: &QuantizedModelStatus) -> Result<bool, Error> {
        if self.stale {
            return Ok(false);
        }
        if *status == self.stored {
            return Ok(true);
        }
        let version = self.resource_version.as_deref();
        match k8s::apply_status_at(self.api, &self.name, version, status).await? {
            StatusWrite::Written(version) => {
                self.resource_version = version;
                self.stored = status.clone();
                Ok(true)
            }
            StatusWrite::Stale => {
                tracing::debug!(model = %self.name, "stale view of the model; looking again");
                self.stale = true;
                Ok(false)
            }
        }
    }

    /// The stored reason of a condition, to tell a transition from a repeat.
    fn reason(&self, type_: &str) -> Option<String> {
        crate::conditions::find(&self.stored.conditions, type_).map(|c| c.reason.clone())
    }
}

/// How soon a reconciliation that found its view stale looks again (the
/// watch event of the newer object usually comes first).
const STALE_RETRY: Duration = Duration::from_secs(1);

/// How often a model waiting for another one's artifact directory looks
/// again (the other's deletion is not an event of this model).
const CONFLICT_RECHECK: Duration = Duration::from_secs(10);

/// How soon a model tries its artifact directory's claim again after a
/// stale one was removed or a claim vanished while it was read.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

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

/// What the spec breaks that the CRD could not catch, as a message naming
/// the field: the cross-field rules and the resource values.
fn admission(qm: &QuantizedModel) -> Result<(), String> {
    quantops_api::spec_file::validate(qm)
        .map_err(|(field, expected)| format!("{field}: expected {expected}"))?;
    job::resource_requirements(&qm.spec.resources).map_err(|e| e.to_string())?;
    Ok(())
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
    let mut store = StatusStore {
        api: &apis.models,
        name: name.clone(),
        resource_version: qm.resource_version(),
        stored: qm.status.clone().unwrap_or_default(),
        stale: false,
    };
    let mut status = store.stored.clone();
    pipeline::observe_generation(&mut status, &obs);
    let action = match admission(qm) {
        Err(message) => refuse(qm, ctx, &mut store, &mut status, &message, &obs).await?,
        // Refused by the API server for this generation: not tried again.
        Ok(()) if pipeline::refused(&status, obs.generation) => Action::await_change(),
        Ok(()) => drive(qm, ctx, &apis, &mut store, &mut status, &obs).await?,
    };
    // What is left: progress, the observed generation.
    if !store.commit(&status).await? {
        return Ok(Action::requeue(STALE_RETRY));
    }
    let before = qm.status.as_ref().and_then(|s| s.phase.as_deref());
    if before != status.phase.as_deref() {
        tracing::info!(model = %name, namespace = %namespace, from = ?before, to = ?status.phase, "phase changed");
    }
    Ok(action)
}

/// Refuses a spec the pipeline cannot run (`Ready=False`, reason
/// `InvalidSpec`, the field in the message), with one event per refusal.
async fn refuse(
    qm: &QuantizedModel,
    ctx: &Context,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
    message: &str,
    obs: &Observation,
) -> Result<Action, Error> {
    let before = crate::conditions::find(&store.stored.conditions, pipeline::READY)
        .map(|c| (c.reason.clone(), c.message.clone()));
    pipeline::record_invalid(status, message, obs);
    let refusal = Some((pipeline::INVALID_SPEC.to_string(), message.to_string()));
    if store.commit(status).await? && before != refusal {
        ctx.event(qm, EventType::Warning, "InvalidSpec", message.to_string())
            .await;
    }
    Ok(Action::await_change())
}

/// A stage's Job as [`pipeline::step`] needs to see it.
fn job_seen(job: Option<&Job>) -> JobSeen {
    let Some(job) = job else {
        return JobSeen::Absent;
    };
    if job.metadata.deletion_timestamp.is_some() {
        return JobSeen::Deleting;
    }
    let uid = job.uid();
    match job_state(job) {
        JobState::Running => JobSeen::Running { uid },
        JobState::Succeeded => JobSeen::Finished {
            uid,
            succeeded: true,
        },
        JobState::Failed(_) => JobSeen::Finished {
            uid,
            succeeded: false,
        },
    }
}

/// A stage's Job: from the cache, else (when status records the stage as
/// started, so the Job should exist and the cache may lag behind) from the
/// API server. A stage never started has no Job to read: its Job's name
/// carries the spec hash, and status records a start before the create.
async fn stage_job(
    ctx: &Context,
    apis: &Apis,
    status: &QuantizedModelStatus,
    stage: Stage,
    hash: &str,
    job_name: &str,
) -> Result<Option<Arc<Job>>, Error> {
    let key = ObjectRef::new(job_name).within(&apis.namespace);
    if let Some(job) = ctx.caches.jobs.get(&key) {
        return Ok(Some(job));
    }
    if pipeline::record(status, stage, hash).is_none() {
        return Ok(None);
    }
    let read = apis
        .jobs
        .get_opt(job_name)
        .await
        .during(|| format!("reading Job {job_name}"))?;
    Ok(read.map(Arc::new))
}

/// Walks the stages in order: stages recorded as done for the current spec
/// are passed without looking at their Jobs; the first other one is acted on.
async fn drive(
    qm: &QuantizedModel,
    ctx: &Context,
    apis: &Apis,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
    obs: &Observation,
) -> Result<Action, Error> {
    let policy = ctx.config.retry;
    let model = qm.name_any();
    delete_stale_jobs(qm, ctx, apis).await?;
    for stage in Stage::PIPELINE {
        let hash = pipeline::stage_hash(&qm.spec, stage);
        let job_name = job::job_name(&model, stage, &hash);
        let (step, existing) = match pipeline::settled(status, stage, &hash) {
            Some(step) => (step, None),
            None => {
                let existing = stage_job(ctx, apis, status, stage, &hash, &job_name).await?;
                let seen = job_seen(existing.as_deref());
                let step = pipeline::step(status, stage, &hash, &seen, &policy, obs.now);
                (step, existing)
            }
        };
        let run = StageRun {
            hash,
            job: job_name,
            job_uid: existing.as_ref().and_then(|j| j.uid()),
        };
        let at = Place {
            qm,
            ctx,
            apis,
            stage,
            run: &run,
            obs,
        };
        match step {
            Step::Done => pipeline::confirm_done(status, stage, obs),
            Step::Final => {
                pipeline::confirm_final(status, stage, obs);
                return Ok(Action::await_change());
            }
            Step::Wait(delay) => return Ok(Action::requeue(delay)),
            Step::Start => return start(&at, store, status, true).await,
            Step::Recreate => return start(&at, store, status, false).await,
            Step::Watch => return watch(&at, store, status).await,
            Step::Cleanup => {
                k8s::delete_if_present(&apis.jobs, &run.job).await?;
                if pipeline::gave_up(status, stage, &policy) {
                    return Ok(Action::await_change());
                }
                let wait = pipeline::retry_wait(status, stage, &policy, obs.now);
                return Ok(Action::requeue(wait.unwrap_or(pipeline::DELETION_POLL)));
            }
            Step::Record { .. } => {
                let Some(job) = existing.as_ref() else {
                    return Ok(Action::requeue(STALE_RETRY));
                };
                if let Some(action) = finish(&at, store, status, job).await? {
                    return Ok(action);
                }
            }
        }
    }
    pipeline::confirm_ready(status, obs);
    Ok(Action::await_change())
}

/// Where a reconciliation stands: the model, the stage it acts on and that
/// stage's run.
struct Place<'a> {
    qm: &'a QuantizedModel,
    ctx: &'a Context,
    apis: &'a Apis,
    stage: Stage,
    run: &'a StageRun,
    obs: &'a Observation,
}

/// Records that another model writes this model's artifact directory, with
/// an event when that is news, and checks again later.
async fn conflict(
    qm: &QuantizedModel,
    ctx: &Context,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
    message: String,
    obs: &Observation,
) -> Result<Action, Error> {
    let before = store.reason(pipeline::READY);
    pipeline::record_conflict(status, &message, obs);
    if store.commit(status).await? && before.as_deref() != Some(pipeline::OUTPUT_CONFLICT) {
        ctx.event(qm, EventType::Warning, "OutputConflict", message)
            .await;
    }
    Ok(Action::requeue(CONFLICT_RECHECK))
}

/// Whether the model claimed its artifact directory already: a stage of the
/// current spec's output was recorded, which happens only after the claim
/// (the baseline's hash covers `spec.output`).
fn holds_claim(qm: &QuantizedModel, status: &QuantizedModelStatus) -> bool {
    let hash = pipeline::stage_hash(&qm.spec, Stage::Baseline);
    status
        .stages
        .get(Stage::Baseline.name())
        .is_some_and(|record| record.hash == hash)
}

/// Whether the claim's holder no longer writes `dir`. The cache may not
/// have a model that was created a moment ago, so a holder missing from it
/// is looked up before its claim is called stale.
async fn claim_is_stale(
    apis: &Apis,
    cached: &[Arc<QuantizedModel>],
    dir: &str,
    holder: &str,
    holder_uid: &str,
) -> Result<bool, Error> {
    if !output_claim::is_stale(holder_uid, dir, cached.iter().map(Arc::as_ref)) {
        return Ok(false);
    }
    let current = apis
        .models
        .get_opt(holder)
        .await
        .during(|| format!("reading QuantizedModel {holder}, which claims {dir}"))?;
    Ok(output_claim::is_stale(holder_uid, dir, current.as_ref()))
}

/// Starts a stage (or creates its Job again when it went missing): checks
/// that no other model writes the same artifact directory, renders the Job,
/// records the stage `Running`, and only once that is stored creates the
/// ConfigMap and the Job. A Job the API server refuses as invalid is an
/// `InvalidSpec` refusal, not a retry.
async fn start(
    at: &Place<'_>,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
    announce: bool,
) -> Result<Action, Error> {
    let Place {
        qm,
        ctx,
        apis,
        stage,
        run,
        obs,
    } = *at;
    let models = ctx.caches.models.state();
    if let Some(owner) = outputs::taken_by(qm, models.iter().map(Arc::as_ref)) {
        let message = outputs::conflict_message(
            qm,
            &owner.namespace().unwrap_or_default(),
            &owner.name_any(),
        );
        return conflict(qm, ctx, store, status, message, obs).await;
    }
    if !holds_claim(qm, status) {
        let dir = outputs::artifact_dir(&qm.spec);
        match output_claim::claim(&apis.config_maps, qm, &dir).await? {
            Claim::Held => {}
            Claim::Retry => return Ok(Action::requeue(CLAIM_RETRY)),
            Claim::TakenBy { model, uid } => {
                if claim_is_stale(apis, &models, &dir, &model, &uid).await? {
                    output_claim::release_stale(&apis.config_maps, &dir, &uid).await?;
                    return Ok(Action::requeue(CLAIM_RETRY));
                }
                let message = outputs::conflict_message(qm, &apis.namespace, &model);
                return conflict(qm, ctx, store, status, message, obs).await;
            }
        }
    }
    let rendered = job::render_config_map(qm, stage).and_then(|config_map| {
        job::render_job(qm, stage, &ctx.config.jobs).map(|job| (config_map, job))
    });
    let (config_map, rendered_job) = match rendered {
        Ok(objects) => objects,
        Err(error @ RenderError::InvalidField { .. }) => {
            return refuse(qm, ctx, store, status, &error.to_string(), obs).await;
        }
        Err(error) => return Err(error.into()),
    };
    let unknown_uid = StageRun {
        job_uid: None,
        ..run.clone()
    };
    pipeline::mark_running(
        status,
        stage,
        &unknown_uid,
        &format!("Job {} started", run.job),
        obs,
    );
    if !store.commit(status).await? {
        return Ok(Action::requeue(STALE_RETRY));
    }
    let created = match k8s::apply(&apis.config_maps, &config_map).await {
        Ok(_) => k8s::apply(&apis.jobs, &rendered_job).await.map(|_| ()),
        Err(error) => Err(error),
    };
    match created {
        Ok(()) => {}
        Err(error) if error.is_invalid() => {
            let message = format!(
                "the API server refused Job {}: {}",
                run.job,
                error.api_message()
            );
            return refuse(qm, ctx, store, status, &message, obs).await;
        }
        Err(error) => return Err(error.into()),
    }
    if announce {
        ctx.event(
            qm,
            EventType::Normal,
            "StageStarted",
            format!("{stage}: started Job {}", run.job),
        )
        .await;
    } else {
        tracing::info!(model = %qm.name_any(), job = %run.job, "created the Job of a running stage again: it was gone");
    }
    Ok(Action::requeue(PROGRESS_INTERVAL.min(ctx.config.resync)))
}

/// Looks at a running stage: whether its pod is scheduled (the scheduler's
/// words in status while it is not, and the stage broken once that lasted
/// longer than the configured limit), else the worker's progress.
async fn watch(
    at: &Place<'_>,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
) -> Result<Action, Error> {
    let Place {
        qm,
        ctx,
        apis,
        stage,
        run,
        obs,
    } = *at;
    pipeline::mark_running(status, stage, run, &format!("Job {} running", run.job), obs);
    let every = PROGRESS_INTERVAL.min(ctx.config.resync);
    let pods = cached_pods(&ctx.caches, &apis.namespace, &run.job);
    if let Some(pending) = k8s::unschedulable(&pods) {
        let waited = pending
            .since
            .and_then(|since| Duration::try_from(obs.now.duration_since(since)).ok())
            .unwrap_or(Duration::ZERO);
        if let Some(limit) = ctx.config.unschedulable_timeout
            && waited >= limit
        {
            let error = format!(
                "pod {} could not be scheduled for {}s: {}",
                pending.pod,
                waited.as_secs(),
                pending.message
            );
            return broken(at, store, status, &error, true).await;
        }
        let before = store.reason(stage.condition_type());
        pipeline::mark_unschedulable(status, stage, &pending.pod, &pending.message, obs);
        if store.commit(status).await? && before.as_deref() != Some(pipeline::UNSCHEDULABLE) {
            ctx.event(
                qm,
                EventType::Warning,
                "Unschedulable",
                format!(
                    "{stage}: pod {} cannot be scheduled: {}",
                    pending.pod, pending.message
                ),
            )
            .await;
        }
        let left = ctx
            .config
            .unschedulable_timeout
            .and_then(|limit| limit.checked_sub(waited));
        return Ok(Action::requeue(left.map_or(every, |left| left.min(every))));
    }
    if let Some(progress) = running_progress(ctx, apis, &run.job).await {
        status.progress = Some(if progress.starts_with(stage.name()) {
            progress
        } else {
            format!("{stage}: {progress}")
        });
    }
    Ok(Action::requeue(every))
}

/// Records the outcome of a finished Job whose outcome is not recorded yet.
/// Only when that write went through is it counted and announced: `None`
/// to go on to the next stage, else the action to return.
async fn finish(
    at: &Place<'_>,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
    finished: &Job,
) -> Result<Option<Action>, Error> {
    let Place {
        qm,
        ctx,
        apis,
        stage,
        run,
        obs,
    } = *at;
    let message = read_summary(ctx, apis, &run.job).await?;
    let summary = match job_state(finished) {
        JobState::Succeeded => match message.as_deref().map(parse_summary) {
            Some(Ok(StageSummary {
                error: Some(error), ..
            })) => return broken(at, store, status, &error, false).await.map(Some),
            Some(Ok(summary)) => summary,
            Some(Err(error)) => return broken(at, store, status, &error, false).await.map(Some),
            None => {
                let error = "the Job succeeded but its pod's termination message is gone";
                return broken(at, store, status, error, false).await.map(Some);
            }
        },
        JobState::Failed(reason) => {
            let error = match message.as_deref().map(parse_summary) {
                Some(Ok(StageSummary {
                    error: Some(error), ..
                })) => error,
                Some(Err(logs)) => logs,
                _ => reason.unwrap_or_else(|| "the Job failed".to_string()),
            };
            return broken(at, store, status, &error, false).await.map(Some);
        }
        JobState::Running => return Ok(Some(Action::requeue(STALE_RETRY))),
    };
    let next = pipeline::record_success(status, stage, run, &summary, obs);
    if !store.commit(status).await? {
        return Ok(Some(Action::requeue(STALE_RETRY)));
    }
    // This write made the transition: count it and say so, once.
    record_result_metrics(&ctx.metrics, stage, &summary);
    let (type_, reason, note) = match &next {
        Next::Ready => (
            EventType::Normal,
            "Ready",
            "validated: every gate passed".to_string(),
        ),
        Next::GatesFailed(message) => (EventType::Warning, "GatesFailed", message.clone()),
        _ => (
            EventType::Normal,
            "StageSucceeded",
            format!("{stage} finished (Job {})", run.job),
        ),
    };
    ctx.event(qm, type_, reason, note).await;
    Ok(match next {
        Next::Run(_) | Next::Ready => None,
        Next::GatesFailed(_) | Next::RetryAfter(_) | Next::GaveUp(_) => {
            Some(Action::await_change())
        }
    })
}

/// A stage broke: record it (the attempt counted in status), and only once
/// that is stored count it, announce it and delete its Job, so that the
/// retry after the backoff can create it again under the same name. A
/// given-up stage's failed Job stays for its logs, unless `always_delete`
/// (a pod that never got scheduled must not start later).
async fn broken(
    at: &Place<'_>,
    store: &mut StatusStore<'_>,
    status: &mut QuantizedModelStatus,
    error: &str,
    always_delete: bool,
) -> Result<Action, Error> {
    let Place {
        qm,
        ctx,
        apis,
        stage,
        run,
        obs,
    } = *at;
    let next = pipeline::record_broken(status, stage, run, error, &ctx.config.retry, obs);
    if !store.commit(status).await? {
        return Ok(Action::requeue(STALE_RETRY));
    }
    ctx.metrics
        .stage_results
        .with_label_values(&[stage.name(), "broken"])
        .inc();
    let (note, action, delete) = match next {
        Next::RetryAfter(delay) => (
            format!(
                "{stage} (Job {}) failed, retrying in {}s: {error}",
                run.job,
                delay.as_secs()
            ),
            Action::requeue(delay),
            true,
        ),
        Next::GaveUp(message) => (message, Action::await_change(), always_delete),
        _ => return Ok(Action::await_change()),
    };
    ctx.event(qm, EventType::Warning, "StageFailed", note).await;
    if delete {
        k8s::delete_if_present(&apis.jobs, &run.job).await?;
    }
    Ok(action)
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
/// queue and caches, so it needs rights only in its namespace; the permit
/// lanes shared by all of them ([`Lanes`]: new models, models under way,
/// `max_concurrent_reconciles` each) bound the operator as a whole, and any
/// namespace may use all of them.
async fn run_models(
    client: Client,
    config: OperatorConfig,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let lanes = Lanes::new(config.max_concurrent_reconciles);
    let mut stores = Vec::new();
    let mut runs = Vec::new();
    for namespace in config.watch.targets() {
        let ns = namespace.as_deref();
        let watch = ModelWatch::new(
            crate::scope::api(&client, ns),
            crate::scope::api(&client, ns),
            crate::scope::api(&client, ns),
        );
        stores.push(watch.models.clone());
        runs.push(run_models_in(
            watch,
            namespace,
            client.clone(),
            config.clone(),
            metrics.clone(),
            lanes.clone(),
            shutdown.clone(),
        ));
    }
    let phases = tokio::spawn(count_phases(stores, metrics));
    futures::future::join_all(runs).await;
    phases.abort();
}

/// Runs the controller of one scope (the QuantizedModels of `namespace`, or
/// of every namespace) over its watches ([`ModelWatch`]).
async fn run_models_in(
    watch: ModelWatch,
    namespace: Option<String>,
    client: Client,
    config: OperatorConfig,
    metrics: Metrics,
    lanes: Lanes,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ModelWatch {
        models,
        jobs,
        pods,
        model_triggers,
        job_triggers,
        pod_watch,
    } = watch;
    let pod_watch = tokio::spawn(pod_watch);
    if let Err(error) = pods.wait_until_ready().await {
        tracing::error!(%error, namespace = namespace.as_deref().unwrap_or("*"), "the pod cache never filled; stopping");
        pod_watch.abort();
        return;
    }
    // The lanes bound what runs; the controller itself takes every due
    // model at once, so that a new one reaches its lane without queueing
    // behind models waiting for theirs.
    let controller = Controller::for_stream(model_triggers, models.clone())
        .owns_stream(job_triggers)
        .with_config(controller::Config::default().concurrency(0));
    let caches = Caches { jobs, pods, models };
    let instance = std::env::var("POD_NAME").ok();
    let ctx = Arc::new(Context::new(client, config, metrics, caches, instance));
    let limited = move |qm: Arc<QuantizedModel>, ctx: Arc<Context>| {
        let lanes = lanes.clone();
        async move {
            let _permit = lanes.enter(&qm).await;
            // The Job cache fills as the controller polls its triggers; a
            // reconciliation decides from it, so it waits for the first list.
            if ctx.caches.jobs.wait_until_ready().await.is_err() {
                return Err(Error::CacheNotReady("Jobs"));
            }
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
    pod_watch.abort();
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
