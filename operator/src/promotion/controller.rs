//! The ModelPromotion reconciler. Level-triggered like the QuantizedModel's:
//! each pass reads the model, the promotion's status and the Argo objects
//! and takes the one next step — refuse, commit, wait for the sync, follow
//! the canary, or revert — recording it in status before anything else.
//!
//! Nothing is lost across restarts: a commit is found again by its trailers
//! (the writer's idempotency), a revert likewise, and the SHA is written to
//! status as soon as it lands.
//!
//! Nothing is retried unboundedly either. The spec is checked before any
//! network access ([`validation`]); a failed git write is tried again only
//! when its backoff, recorded in status, is due ([`retry`]), so that the
//! reconciliation which the operator's own status write triggers does not
//! retry at once; after the last attempt the promotion stays `Failed` until
//! its spec changes. Events are published on transitions (a new refusal, the
//! first failure of a write, giving up), never once per pass.

use super::admission::{self, Refusal};
use super::argo::{self, AppState, CanaryState};
use super::retry::{self, After, Before};
use super::{
    CANARY_HEALTHY, COMMITTED, GATES_PASSED, PROMOTED, Phase, PromotionSettings, SYNCED, card,
    gauges, probe_job, probing, validation,
};
use crate::conditions::{self, ConditionUpdate, FALSE, TRUE, UNKNOWN};
use crate::config::JobSettings;
use crate::gitops::{
    GitCredentials, GitOpsError, GitTarget, GitWriter, PromotionCommit, PromotionId, RevertRequest,
    ServingInputs, render_serving_folder,
};
use crate::k8s::{self, KubeContext, KubeError};
use crate::metrics::Metrics;
use crate::scope::WatchScope;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use quantops_api::{Environment, ModelPromotion, ModelPromotionStatus, QuantizedModel};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The controller's name in metrics and events.
pub const CONTROLLER: &str = "modelpromotion";

/// Why a reconciliation failed; requeued with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("ModelPromotion {0} has no namespace or uid")]
    Incomplete(String),
    #[error("the git worker thread stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Incomplete(_) => "incomplete",
            Error::Join(_) => "join",
        }
    }
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub settings: PromotionSettings,
    /// How the worker's pods are rendered (the quality probe runs the worker).
    pub jobs: JobSettings,
    pub writer: Arc<GitWriter>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Every promotion the operator watches (the controllers' caches, one
    /// per served namespace): who holds which serving folder.
    pub promotions: Vec<Store<ModelPromotion>>,
}

/// How often a promotion waiting on Argo is looked at again.
const POLL: Duration = Duration::from_secs(10);
/// How often a refused promotion is looked at again (the model may pass later).
const BLOCKED_POLL: Duration = Duration::from_secs(30);

/// One reconciliation's view: the promotion and its new status.
pub(super) struct Pass<'a> {
    pub(super) mp: &'a ModelPromotion,
    pub(super) ctx: &'a Context,
    pub(super) status: ModelPromotionStatus,
    generation: Option<i64>,
    now: Timestamp,
    pub(super) namespace: String,
}

impl Pass<'_> {
    pub(super) fn set(
        &mut self,
        type_: &str,
        status: &str,
        reason: &str,
        message: impl Into<String>,
    ) {
        conditions::set_condition(
            &mut self.status.conditions,
            ConditionUpdate {
                type_,
                status,
                reason,
                message: message.into(),
            },
            self.generation,
            self.now,
        );
    }

    fn phase(&mut self, phase: Phase) {
        self.status.phase = Some(phase.as_str().to_string());
    }

    fn condition_is(&self, type_: &str, status: &str) -> bool {
        conditions::find(&self.status.conditions, type_)
            .is_some_and(|c| c.status == status && c.observed_generation == self.generation)
    }

    /// Sets `type_` False with `reason` and `message`, publishing a Warning
    /// event `event_reason` only when that changes the condition: a
    /// refusal that stands is reported once, however often it is seen.
    async fn refuse(&mut self, type_: &str, reason: &str, message: String, event_reason: &str) {
        let same = conditions::find(&self.status.conditions, type_).is_some_and(|c| {
            c.status == FALSE
                && c.reason == reason
                && c.message == message
                && c.observed_generation == self.generation
        });
        if !same {
            self.event(EventType::Warning, event_reason, message.clone())
                .await;
        }
        self.set(type_, FALSE, reason, message);
    }

    pub(super) async fn event(&self, type_: EventType, reason: &str, note: String) {
        k8s::publish_event(
            &self.ctx.recorder,
            &self.mp.object_ref(&()),
            type_,
            "Promote",
            reason,
            note,
        )
        .await;
    }

    pub(super) async fn write(&self) -> Result<(), Error> {
        let api = Api::<ModelPromotion>::namespaced(self.ctx.client.clone(), &self.namespace);
        Ok(k8s::apply_status(&api, &self.mp.name_any(), &self.status).await?)
    }
}

/// The model's short name: the folder, the served model name, the workload.
pub fn serving_model_name(qm: &QuantizedModel) -> String {
    let base = &qm.spec.base_model.name;
    crate::gitops::render::resource_name(base.rsplit('/').next().unwrap_or(base))
}

/// One reconciliation of a ModelPromotion.
pub async fn reconcile(mp: Arc<ModelPromotion>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconcile(CONTROLLER, reconcile_inner(&mp, &ctx))
        .await
}

async fn reconcile_inner(mp: &ModelPromotion, ctx: &Context) -> Result<Action, Error> {
    if mp.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = mp
        .namespace()
        .ok_or_else(|| Error::Incomplete(mp.name_any()))?;
    let old = mp.status.clone().unwrap_or_default();
    let mut pass = Pass {
        mp,
        ctx,
        status: old.clone(),
        generation: mp.metadata.generation,
        now: Timestamp::now(),
        namespace,
    };
    if old.observed_generation != pass.generation {
        // A new spec starts its git writes afresh.
        pass.status.git_attempts = 0;
        pass.status.next_git_attempt_time = None;
    }
    pass.status.observed_generation = pass.generation;
    let action = step(&mut pass).await?;
    if pass.status != old {
        pass.write().await?;
    }
    Ok(action)
}

/// The next step of a promotion.
async fn step(pass: &mut Pass<'_>) -> Result<Action, Error> {
    // Names and the repository first: nothing is read or sent for a spec
    // the operator will not act on, and only a new spec can change that.
    if let Err(error) = validation::check_spec(&pass.mp.spec, pass.ctx.settings.remote) {
        pass.refuse(error.condition, "InvalidSpec", error.message, "InvalidSpec")
            .await;
        pass.phase(Phase::Failed);
        return Ok(Action::await_change());
    }
    // A rollback is final for this generation: a new spec starts over.
    if pass.status.phase.as_deref() == Some(Phase::RolledBack.as_str())
        && pass.condition_is(PROMOTED, FALSE)
    {
        probing::stop(pass, "the promotion was rolled back").await?;
        return Ok(Action::await_change());
    }
    let committed = pass.status.commit.is_some() && pass.condition_is(COMMITTED, TRUE);
    let qm = match admit(pass, committed).await? {
        Ok(qm) => qm,
        Err(action) => return Ok(action),
    };
    let model = serving_model_name(&qm);
    let target = match git_target(pass).await? {
        Ok(target) => target,
        Err(action) => return Ok(action),
    };
    if !committed && let Err(action) = commit(pass, &qm, &model, &target).await? {
        return Ok(action);
    }
    let Some(commit_sha) = pass.status.commit.clone() else {
        return Ok(Action::requeue(POLL));
    };
    let environment = pass.mp.spec.environment;

    // Argo CD: synced and healthy at a revision containing our commit.
    let app_name = pass.ctx.settings.application_for(environment, &model);
    let apps: Api<DynamicObject> = Api::namespaced_with(
        pass.ctx.client.clone(),
        &pass.ctx.settings.argocd_namespace,
        &argo::application_resource(),
    );
    let app = apps
        .get_opt(&app_name)
        .await
        .during(|| format!("reading Argo CD Application {app_name}"))?;
    let Some(app) = app else {
        pass.set(
            SYNCED,
            FALSE,
            "ApplicationNotFound",
            format!(
                "no Argo CD Application {app_name} in namespace {} yet",
                pass.ctx.settings.argocd_namespace
            ),
        );
        pass.phase(Phase::Syncing);
        return Ok(Action::requeue(POLL));
    };
    match argo::application_state(&app) {
        AppState::SyncedHealthy { revision } => {
            let writer = pass.ctx.writer.clone();
            let (t, r, c) = (target.clone(), revision.clone(), commit_sha.clone());
            let contains = tokio::task::spawn_blocking(move || writer.contains(&t, &r, &c)).await?;
            match contains {
                Ok(true) => {
                    if !pass.condition_is(SYNCED, TRUE) {
                        pass.event(
                            EventType::Normal,
                            "Synced",
                            format!("Application {app_name} synced and healthy at {revision}"),
                        )
                        .await;
                    }
                    pass.set(SYNCED, TRUE, "SyncedHealthy", format!(
                        "Application {app_name} is synced and healthy at {revision}, which contains {commit_sha}"));
                }
                Ok(false) => {
                    pass.set(SYNCED, FALSE, "OutOfSync", format!(
                        "Application {app_name} is at {revision}, which does not contain {commit_sha} yet"));
                    pass.phase(Phase::Syncing);
                    return Ok(Action::requeue(POLL));
                }
                Err(error) => {
                    pass.set(SYNCED, UNKNOWN, error.reason(), error.to_string());
                    return Ok(Action::requeue(POLL));
                }
            }
        }
        AppState::Waiting(message) => {
            pass.set(SYNCED, FALSE, "Progressing", message);
            pass.phase(Phase::Syncing);
            return Ok(Action::requeue(POLL));
        }
        AppState::Degraded(message) => {
            pass.set(SYNCED, FALSE, "Degraded", message);
            pass.phase(Phase::Syncing);
            return Ok(Action::requeue(POLL));
        }
    }

    // Synced: the served variant is probed from now on (in prod, while the
    // canary's analysis reads the score).
    probing::reconcile(pass, &qm, &model).await?;

    if environment != Environment::Prod {
        return Ok(promoted(pass, "synced and healthy").await);
    }

    // Prod: follow the Rollout's canary.
    let rollouts: Api<DynamicObject> = Api::namespaced_with(
        pass.ctx.client.clone(),
        &pass.ctx.settings.namespace_for(environment),
        &argo::rollout_resource(),
    );
    let rollout = rollouts
        .get_opt(&model)
        .await
        .during(|| format!("reading Rollout {model}"))?;
    let Some(rollout) = rollout else {
        pass.set(
            CANARY_HEALTHY,
            UNKNOWN,
            "RolloutNotFound",
            format!(
                "no Rollout {model} in namespace {} yet",
                pass.ctx.settings.namespace_for(environment)
            ),
        );
        pass.phase(Phase::Canary);
        return Ok(Action::requeue(POLL));
    };
    let variant = pass.status.variant.clone().unwrap_or_default();
    match argo::rollout_state(&rollout, &crate::gitops::render::label_value(&variant)) {
        CanaryState::Healthy => {
            pass.set(
                CANARY_HEALTHY,
                TRUE,
                "Healthy",
                format!("Rollout {model} completed its canary and is healthy"),
            );
            Ok(promoted(pass, "canary completed").await)
        }
        CanaryState::Progressing(message) => {
            pass.set(CANARY_HEALTHY, UNKNOWN, "Progressing", message);
            pass.phase(Phase::Canary);
            Ok(Action::requeue(POLL))
        }
        CanaryState::Failed { reason, message } => {
            pass.set(CANARY_HEALTHY, FALSE, reason, message.clone());
            roll_back(pass, &target, &commit_sha, reason, &message).await
        }
    }
}

/// Gates and order; `Err(action)` when refused (recorded in status).
async fn admit(
    pass: &mut Pass<'_>,
    committed: bool,
) -> Result<Result<QuantizedModel, Action>, Error> {
    let models: Api<QuantizedModel> = Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
    let name = pass.mp.spec.model_ref.name.clone();
    let qm = models
        .get_opt(&name)
        .await
        .during(|| format!("reading QuantizedModel {name}"))?;
    let environment = pass.mp.spec.environment;
    let verdict = match &qm {
        None => Err(Refusal {
            reason: "ModelNotFound",
            message: format!(
                "QuantizedModel {name} does not exist in namespace {}",
                pass.namespace
            ),
        }),
        Some(qm) => admission::check_model(qm, environment),
    };
    let verdict = match (verdict, &qm) {
        (Ok(()), Some(qm)) if !committed => {
            let variant = qm
                .status
                .as_ref()
                .and_then(|s| s.variant.clone())
                .unwrap_or_default();
            let promotions: Api<ModelPromotion> =
                Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
            let all = promotions
                .list(&ListParams::default())
                .await
                .during(|| "listing ModelPromotions".to_string())?;
            admission::check_order(environment, &variant, &all.items)
        }
        (verdict, _) => verdict,
    };
    match (verdict, qm) {
        (Ok(()), Some(qm)) => {
            let gates = qm.status.as_ref().map_or(0, |s| s.gates.len());
            pass.set(
                GATES_PASSED,
                TRUE,
                "GatesPassed",
                format!("QuantizedModel {name} is validated; all {gates} gates passed"),
            );
            Ok(Ok(qm))
        }
        (Err(refusal), Some(qm)) if committed => {
            // Already committed: a later change of the model does not undo
            // the commit; the promotion follows what it committed.
            tracing::info!(promotion = %pass.mp.name_any(), reason = refusal.reason,
                "the model changed after the commit; following the committed variant");
            Ok(Ok(qm))
        }
        (Err(refusal), _) => {
            let same = conditions::find(&pass.status.conditions, GATES_PASSED)
                .is_some_and(|c| c.status == FALSE && c.message == refusal.message);
            if !same {
                pass.ctx
                    .metrics
                    .promotions
                    .with_label_values(&[environment.as_str(), "refused"])
                    .inc();
            }
            pass.refuse(
                GATES_PASSED,
                refusal.reason,
                refusal.message,
                "PromotionRefused",
            )
            .await;
            if !committed {
                pass.phase(Phase::Blocked);
            }
            Ok(Err(Action::requeue(BLOCKED_POLL)))
        }
        (Ok(()), None) => Ok(Err(Action::requeue(BLOCKED_POLL))),
    }
}

/// The repository, branch and credentials; `Err(action)` when the Secret is
/// missing or unusable (recorded in status).
async fn git_target(pass: &mut Pass<'_>) -> Result<Result<GitTarget, Action>, Error> {
    let gitops = &pass.mp.spec.gitops;
    let credentials = match &gitops.credentials_secret {
        None => GitCredentials::Anonymous,
        Some(secret_name) => {
            // Only the promotion's own namespace: the name was checked to
            // be a plain object name (no `namespace/`).
            let secrets: Api<Secret> = Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
            let secret = secrets
                .get_opt(secret_name)
                .await
                .during(|| format!("reading Secret {secret_name}"))?;
            let Some(secret) = secret else {
                let message = format!(
                    "spec.gitops.credentialsSecret: Secret {}/{secret_name} not found",
                    pass.namespace
                );
                pass.refuse(COMMITTED, "SecretNotFound", message, "CredentialsInvalid")
                    .await;
                pass.phase(Phase::Blocked);
                return Ok(Err(Action::requeue(BLOCKED_POLL)));
            };
            let data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            let shown = format!("{}/{secret_name}", pass.namespace);
            match GitCredentials::from_secret_data(&shown, &data) {
                Ok(credentials) => credentials,
                Err(error) => {
                    let message = format!("spec.gitops.credentialsSecret: {error}");
                    pass.refuse(
                        COMMITTED,
                        "CredentialsInvalid",
                        message,
                        "CredentialsInvalid",
                    )
                    .await;
                    pass.phase(Phase::Blocked);
                    return Ok(Err(Action::requeue(BLOCKED_POLL)));
                }
            }
        }
    };
    Ok(Ok(GitTarget {
        url: gitops.url.clone(),
        branch: gitops.branch.clone(),
        credentials,
    }))
}

/// Renders and commits; `Err(action)` when it could not (recorded).
async fn commit(
    pass: &mut Pass<'_>,
    qm: &QuantizedModel,
    model: &str,
    target: &GitTarget,
) -> Result<Result<(), Action>, Error> {
    let environment = pass.mp.spec.environment;
    let folder_dir = crate::gitops::render::folder_path(environment, model);
    let watched: Vec<_> = pass.ctx.promotions.iter().flat_map(Store::state).collect();
    let owner = admission::folder_owner(pass.mp, &folder_dir, watched.iter().map(|p| p.as_ref()))
        .map(|owner| admission::folder_in_use(&folder_dir, owner));
    if let Some(refusal) = owner {
        pass.refuse(COMMITTED, refusal.reason, refusal.message, "FolderInUse")
            .await;
        pass.phase(Phase::Blocked);
        return Ok(Err(Action::requeue(BLOCKED_POLL)));
    }
    if let Err(action) = git_write_due(pass) {
        return Ok(Err(action));
    }
    let qm_status = qm.status.clone().unwrap_or_default();
    let variant = qm_status.variant.clone().unwrap_or_default();
    let promotion_name = format!("{}/{}", pass.namespace, pass.mp.name_any());
    let inputs = ServingInputs {
        model: model.to_string(),
        namespace: pass.ctx.settings.namespace_for(environment),
        environment,
        variant: variant.clone(),
        artifact_path: qm_status.artifact_path.clone().unwrap_or_default(),
        quantization: qm.spec.quantization.clone(),
        serving: pass.mp.spec.serving.clone(),
        canary: pass.mp.spec.canary.clone(),
        card: card::promotion_card(qm, environment, &promotion_name),
        quality_threshold: pass.mp.spec.quality.clone().unwrap_or_default().threshold,
    };
    let folder = match render_serving_folder(&inputs, &pass.ctx.settings.serving) {
        Ok(folder) => folder,
        Err(error) => {
            let message = format!("cannot render the serving manifests: {error}");
            pass.refuse(COMMITTED, "RenderFailed", message, "RenderFailed")
                .await;
            pass.phase(Phase::Failed);
            return Ok(Err(Action::await_change()));
        }
    };
    let uid = pass
        .mp
        .uid()
        .ok_or_else(|| Error::Incomplete(pass.mp.name_any()))?;
    let request = PromotionCommit {
        promotion: PromotionId {
            namespace: pass.namespace.clone(),
            name: pass.mp.name_any(),
            uid,
            generation: pass.generation.unwrap_or(0),
        },
        variant: variant.clone(),
        environment,
        folder,
        gates: qm_status.gates.clone(),
    };
    let writer = pass.ctx.writer.clone();
    let t = target.clone();
    let outcome =
        tokio::task::spawn_blocking(move || writer.commit_promotion(&t, &request)).await?;
    match outcome {
        Ok(outcome) => {
            pass.status.commit = Some(outcome.sha.clone());
            pass.status.variant = Some(variant.clone());
            pass.status.folder = Some(folder_dir);
            pass.status.revert_commit = None;
            pass.status.git_attempts = 0;
            pass.status.next_git_attempt_time = None;
            let how = match outcome.status {
                crate::gitops::CommitStatus::Created => "committed",
                crate::gitops::CommitStatus::AlreadyPresent => "found already committed",
                crate::gitops::CommitStatus::Unchanged => "already in the repository (no change)",
            };
            let message = format!("{variant} {how} as {} on {}", outcome.sha, target.branch);
            pass.set(COMMITTED, TRUE, "Committed", message.clone());
            pass.set(SYNCED, UNKNOWN, "Committed", "waiting for Argo CD");
            pass.phase(Phase::Syncing);
            // The SHA is recorded before anything else can fail.
            pass.write().await?;
            pass.event(EventType::Normal, "Committed", message).await;
            pass.ctx
                .metrics
                .promotions
                .with_label_values(&[environment.as_str(), "committed"])
                .inc();
            Ok(Ok(()))
        }
        Err(error) => Ok(Err(git_failed(pass, COMMITTED, &error).await)),
    }
}

/// Whether a git write may be tried now; `Err(action)` when its backoff is
/// not over, or when every attempt of this generation is spent (the status
/// already says so: nothing is written, nothing published).
fn git_write_due(pass: &Pass<'_>) -> Result<(), Action> {
    let next = pass.status.next_git_attempt_time.as_ref().map(|t| t.0);
    match pass
        .ctx
        .settings
        .git_retry
        .before(pass.status.git_attempts, next, pass.now)
    {
        Before::Attempt => Ok(()),
        Before::Wait(wait) => Err(Action::requeue(wait)),
        Before::GaveUp => Err(Action::await_change()),
    }
}

/// Counts a failed git write and decides: retry after the backoff, or give
/// up (phase `Failed`, until the spec changes). The Warning event goes out
/// on the first failure, when the reason changes, and when giving up.
async fn git_failed(pass: &mut Pass<'_>, condition: &str, error: &GitOpsError) -> Action {
    pass.status.git_attempts = pass.status.git_attempts.saturating_add(1);
    let attempts = pass.status.git_attempts;
    let policy = pass.ctx.settings.git_retry;
    let max = policy.max_attempts.max(1);
    let reason_changed = conditions::find(&pass.status.conditions, condition)
        .is_none_or(|c| c.reason != error.reason() || c.status != FALSE);
    let (message, action, final_attempt) = match policy.after(attempts) {
        After::RetryIn(delay) => {
            pass.status.next_git_attempt_time = Some(Time(retry::due_at(pass.now, delay)));
            pass.phase(Phase::Blocked);
            (
                format!(
                    "{error} (attempt {attempts} of {max}; next in {}s)",
                    delay.as_secs()
                ),
                Action::requeue(delay),
                false,
            )
        }
        After::GiveUp => {
            pass.status.next_git_attempt_time = None;
            pass.phase(Phase::Failed);
            (
                format!(
                    "{error} (gave up after {attempts} attempts; change the spec to try again)"
                ),
                Action::await_change(),
                true,
            )
        }
    };
    if attempts == 1 || reason_changed || final_attempt {
        pass.event(EventType::Warning, "GitWriteFailed", message.clone())
            .await;
    }
    pass.set(condition, FALSE, error.reason(), message);
    action
}

async fn promoted(pass: &mut Pass<'_>, how: &str) -> Action {
    let environment = pass.mp.spec.environment;
    if !pass.condition_is(PROMOTED, TRUE) {
        let variant = pass.status.variant.clone().unwrap_or_default();
        pass.event(
            EventType::Normal,
            "Promoted",
            format!("{variant} serves in {}: {how}", environment.as_str()),
        )
        .await;
        pass.ctx
            .metrics
            .promotions
            .with_label_values(&[environment.as_str(), "promoted"])
            .inc();
    }
    pass.set(
        PROMOTED,
        TRUE,
        "Promoted",
        format!("serving in {}: {how}", environment.as_str()),
    );
    pass.phase(Phase::Promoted);
    // Keep an eye on it: a later degradation shows in the conditions.
    Action::requeue(Duration::from_secs(300))
}

/// Reverts the promotion's commit (once) and ends in `RolledBack`.
async fn roll_back(
    pass: &mut Pass<'_>,
    target: &GitTarget,
    commit_sha: &str,
    reason: &'static str,
    message: &str,
) -> Result<Action, Error> {
    if let Err(action) = git_write_due(pass) {
        return Ok(action);
    }
    let uid = pass
        .mp
        .uid()
        .ok_or_else(|| Error::Incomplete(pass.mp.name_any()))?;
    let request = RevertRequest {
        promotion: PromotionId {
            namespace: pass.namespace.clone(),
            name: pass.mp.name_any(),
            uid,
            generation: pass.generation.unwrap_or(0),
        },
        commit: commit_sha.to_string(),
        reason: format!("{reason}: {message}"),
    };
    let writer = pass.ctx.writer.clone();
    let t = target.clone();
    let outcome = tokio::task::spawn_blocking(move || writer.revert(&t, &request)).await?;
    match outcome {
        Ok(outcome) => {
            pass.status.revert_commit = Some(outcome.sha.clone());
            pass.status.git_attempts = 0;
            pass.status.next_git_attempt_time = None;
            let note = format!(
                "reverted {commit_sha} as {}: {reason}: {message}",
                outcome.sha
            );
            pass.set(PROMOTED, FALSE, "RolledBack", note.clone());
            pass.phase(Phase::RolledBack);
            pass.write().await?;
            pass.event(EventType::Warning, "RolledBack", note).await;
            pass.ctx
                .metrics
                .promotions
                .with_label_values(&[pass.mp.spec.environment.as_str(), "rolled_back"])
                .inc();
            Ok(Action::await_change())
        }
        Err(error) => Ok(git_failed(pass, PROMOTED, &error).await),
    }
}

fn error_policy(mp: Arc<ModelPromotion>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[CONTROLLER, error.kind()])
        .inc();
    tracing::warn!(promotion = %mp.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs one ModelPromotion controller per namespace of `watch` (one for
/// the cluster when unscoped) until `shutdown` resolves. They share one
/// context: the git writer (one cache per repository) and the recorder.
pub async fn run(
    client: Client,
    watch: WatchScope,
    settings: PromotionSettings,
    jobs: JobSettings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let reporter = Reporter {
        controller: "quantops".to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    // One controller per served namespace; their caches together say who
    // holds which serving folder (a folder of the repository is shared by
    // every namespace that promotes into it).
    let mut controllers = Vec::new();
    for namespace in watch.targets() {
        let ns = namespace.as_deref();
        // Probe Jobs belong to their CronJob, not to the promotion, so they
        // are mapped back through the annotation their CronJob gives them.
        let controller = Controller::new(
            crate::scope::api::<ModelPromotion>(&client, ns),
            watcher::Config::default(),
        )
        .watches(
            crate::scope::api::<Job>(&client, ns),
            watcher::Config::default().labels(probe_job::PROBE_JOB_SELECTOR),
            |job: Job| probe_job::promotion_of(&job),
        );
        controllers.push(controller);
    }
    let stores: Vec<Store<ModelPromotion>> = controllers.iter().map(|c| c.store()).collect();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        writer: Arc::new(GitWriter::new(settings.git.clone())),
        client: client.clone(),
        settings,
        jobs,
        metrics: metrics.clone(),
        promotions: stores.clone(),
    });
    let runs: Vec<_> = controllers
        .into_iter()
        .map(|controller| {
            controller
                .graceful_shutdown_on(shutdown.clone())
                .run(reconcile, error_policy, ctx.clone())
                .for_each(|result| async move {
                    if let Err(error) = result {
                        tracing::debug!(%error, "promotion reconcile error");
                    }
                })
        })
        .collect();
    let gauges = tokio::spawn(gauges::export(stores, metrics));
    futures::future::join_all(runs).await;
    gauges.abort();
}
