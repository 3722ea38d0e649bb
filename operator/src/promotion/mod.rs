//! The ModelPromotion reconciler: a validated variant moves experiment →
//! test → prod through the GitOps repository, and only through it.
//!
//! - [`admission`]: may this promotion go ahead (gates, environment order);
//! - [`argo`]: what Argo CD's Application and Argo Rollouts' Rollout say;
//! - [`card`]: the model card committed beside the serving manifests;
//! - [`controller`]: the reconciler driving the [`crate::gitops`] writer;
//! - [`probe_job`]: the quality probe's CronJob; [`quality`]: its rolling
//!   window and verdict; `probing`: the reconciliation step between them;
//! - [`gauges`]: the promotion gauges on `/metrics`, from the stored status;
//! - [`validation`]: the spec's names and repository, checked before any
//!   network access; [`retry`]: the bounded backoff of failed git writes.

pub mod admission;
pub mod argo;
pub mod card;
pub mod controller;
pub mod gauges;
pub mod probe_job;
mod probing;
pub mod quality;
pub mod retry;
pub mod validation;

use crate::gitops::remote::RemotePolicy;
use crate::gitops::{GitWriterConfig, ServingSettings};
use quantops_api::Environment;
use retry::GitRetry;

/// Condition types of a ModelPromotion, in the order they turn true.
pub const GATES_PASSED: &str = "GatesPassed";
pub const COMMITTED: &str = "Committed";
pub const SYNCED: &str = "Synced";
pub const CANARY_HEALTHY: &str = "CanaryHealthy";
pub const PROMOTED: &str = "Promoted";
/// The quality probe is scheduled and its latest run reported (True), or
/// why not (`InvalidSpec`, `ProbeFailing`, `Stopped`).
pub const QUALITY_PROBING: &str = "QualityProbing";
/// The rolling quality score is below the threshold (True, `BelowThreshold`).
pub const QUALITY_DEGRADED: &str = "QualityDegraded";

/// `status.phase` of a ModelPromotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Refused for now (gates, order, credentials, a folder in use, a git
    /// write waiting for its next attempt); looked at again.
    Blocked,
    /// Committed; waiting for Argo CD to sync it.
    Syncing,
    /// Synced in prod; the Rollout's canary is stepping.
    Canary,
    /// Serving, synced and healthy.
    Promoted,
    /// The canary failed and the promotion's commit was reverted.
    RolledBack,
    /// Gave up until the spec changes: an invalid spec, manifests that
    /// cannot be rendered, or every git write attempt failed.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Blocked => "Blocked",
            Phase::Syncing => "Syncing",
            Phase::Canary => "Canary",
            Phase::Promoted => "Promoted",
            Phase::RolledBack => "RolledBack",
            Phase::Failed => "Failed",
        }
    }
}

/// Where promotions go: names of the Argo CD objects followed and the
/// environments' namespaces, the serving defaults and the git writer's.
#[derive(Clone, Debug)]
pub struct PromotionSettings {
    /// Namespace of the Argo CD Applications.
    pub argocd_namespace: String,
    /// Name of an environment's Application for a model; `{env}` and
    /// `{model}` are replaced (manifests/argocd's ApplicationSet makes
    /// `{env}-{model}`).
    pub application_name: String,
    /// Namespace of an environment; `{env}` is replaced.
    pub environment_namespace: String,
    pub serving: ServingSettings,
    pub git: GitWriterConfig,
    /// How failed git writes (commit or revert) are retried before the
    /// promotion is Failed.
    pub git_retry: GitRetry,
    /// Which repository URLs are accepted beyond https and ssh.
    pub remote: RemotePolicy,
}

impl Default for PromotionSettings {
    fn default() -> Self {
        PromotionSettings {
            argocd_namespace: "argocd".to_string(),
            application_name: "{env}-{model}".to_string(),
            environment_namespace: "{env}".to_string(),
            serving: ServingSettings::default(),
            git: GitWriterConfig::default(),
            git_retry: GitRetry::default(),
            remote: RemotePolicy::default(),
        }
    }
}

impl PromotionSettings {
    pub fn application_for(&self, environment: Environment, model: &str) -> String {
        self.application_name
            .replace("{env}", environment.as_str())
            .replace("{model}", model)
    }

    pub fn namespace_for(&self, environment: Environment) -> String {
        self.environment_namespace
            .replace("{env}", environment.as_str())
    }
}
