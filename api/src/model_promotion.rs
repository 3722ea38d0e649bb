//! The `ModelPromotion` custom resource: moves a validated variant to the next
//! environment through the GitOps repository.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A request to serve a validated `QuantizedModel` in one environment.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "quantops.dev",
    version = "v1alpha1",
    kind = "ModelPromotion",
    namespaced,
    status = "ModelPromotionStatus",
    shortname = "mp",
    category = "quantops",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.modelRef.name"}"#,
    printcolumn = r#"{"name":"Env","type":"string","jsonPath":".spec.environment"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Variant","type":"string","jsonPath":".status.variant","priority":1}"#,
    printcolumn = r#"{"name":"Commit","type":"string","jsonPath":".status.commit","priority":1}"#,
    printcolumn = r#"{"name":"Quality","type":"number","jsonPath":".status.quality.score","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelPromotionSpec {
    pub model_ref: ModelRef,
    pub environment: Environment,
    pub gitops: GitOpsSpec,
    #[serde(default)]
    pub serving: ServingSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
    /// The quality probe run against the served endpoint once the promotion
    /// is synced; every field has a default, so probing happens without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualitySpec>,
}

/// The `QuantizedModel` to promote, in the promotion's namespace: a plain
/// object name, so it can never reach into another namespace or path.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new(r"self.name.matches(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("spec.modelRef.name: must be the name of a QuantizedModel in the promotion's namespace (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters)"))]
pub struct ModelRef {
    #[schemars(length(max = 253))]
    pub name: String,
}

/// The environments a variant moves through, in order.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Experiment,
    Test,
    Prod,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Experiment => "experiment",
            Environment::Test => "test",
            Environment::Prod => "prod",
        }
    }
}

/// The GitOps repository that Argo CD syncs.
///
/// The rules below are the API server's half of the repository policy; the
/// operator checks the same and more (whether plain `http://` is allowed at
/// all, and never with credentials) before any network access, in
/// `operator/src/gitops/remote.rs`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new(r"self.url.matches(r'^(https|ssh|http)://') || self.url.matches(r'^[A-Za-z0-9._~-]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:[^:]+$')").message("spec.gitops.url: must be an https:// or ssh:// URL (or scp-like user@host:path); file://, git://, ftp:// and local paths are refused, http:// is accepted only where the operator allows it"))]
#[x_kube(validation = Rule::new(r"!self.url.matches(r'^[a-z]+://') || self.url.matches(r'^[a-z]+://([A-Za-z0-9._~-]+@)?([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/.*)?$')").message("spec.gitops.url: must name a host and carry no password (no user:password@); credentials go into spec.gitops.credentialsSecret"))]
#[x_kube(validation = Rule::new(r"!self.url.matches(r'^https?://[^/]*@')").message("spec.gitops.url: https:// and http:// URLs carry no user name or token; credentials go into spec.gitops.credentialsSecret"))]
#[x_kube(validation = Rule::new(r"!self.url.startsWith('http://') || !has(self.credentialsSecret)").message("spec.gitops.url: credentials are never sent over plain http://; use an https:// or ssh:// URL with spec.gitops.credentialsSecret"))]
#[x_kube(validation = Rule::new(r"!self.url.matches(r'[?#\s]')").message("spec.gitops.url: must not contain a query, a fragment or white space"))]
#[x_kube(validation = Rule::new(r"self.branch.matches(r'^[A-Za-z0-9_][A-Za-z0-9._/-]*$') && !self.branch.startsWith('refs/') && self.branch != 'HEAD' && !self.branch.contains('..') && !self.branch.contains('//') && !self.branch.contains('/.') && !self.branch.endsWith('/') && !self.branch.endsWith('.') && !self.branch.matches(r'\.lock(/|$)')").message("spec.gitops.branch: must be a git branch name: letters, digits, '_', '-', '.' and '/', not starting with '-', '.' or refs/, without '..', '//' or '/.', not ending in '/', '.' or .lock"))]
#[x_kube(validation = Rule::new(r"!has(self.credentialsSecret) || self.credentialsSecret.matches(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("spec.gitops.credentialsSecret: must be the name of a Secret in the promotion's own namespace (a DNS-1123 subdomain, no namespace/ prefix)"))]
#[serde(rename_all = "camelCase")]
pub struct GitOpsSpec {
    /// `https://host/path`, `ssh://[user@]host[:port]/path` or scp-like
    /// `user@host:path`; `http://` only where the operator is started with
    /// `--allow-insecure-http-gitops`, and then only without credentials.
    #[schemars(length(max = 2048))]
    pub url: String,
    /// The branch Argo CD follows (a branch name, not a ref or refspec).
    #[serde(default = "default_branch")]
    #[schemars(length(max = 255))]
    pub branch: String,
    /// Secret in the promotion's namespace holding `ssh-privatekey` or
    /// `username`/`password` (token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
}

/// How the variant is served by vLLM.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    #[serde(default = "default_runtime")]
    pub runtime: String,
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default = "default_max_model_len")]
    pub max_model_len: u32,
    #[serde(default = "default_gpu_memory_utilization")]
    pub gpu_memory_utilization: f64,
    #[serde(default = "default_tensor_parallel")]
    pub tensor_parallel_size: u32,
}

impl Default for ServingSpec {
    fn default() -> Self {
        ServingSpec {
            runtime: default_runtime(),
            replicas: default_replicas(),
            max_model_len: default_max_model_len(),
            gpu_memory_utilization: default_gpu_memory_utilization(),
            tensor_parallel_size: default_tensor_parallel(),
        }
    }
}

/// The prod canary's steps.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct CanarySpec {
    pub steps: Vec<CanaryStep>,
}

/// Shift `weight` percent of traffic, then wait `pause` (e.g. `5m`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct CanaryStep {
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<String>,
}

/// How the served variant's quality is probed after the promotion: a
/// CronJob runs `quantizer-job probe` with the validation prompts against the
/// environment's endpoint, and the operator keeps a rolling window of the
/// scores.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QualitySpec {
    /// Cron schedule of the probe (five fields, as a CronJob takes it).
    #[serde(default = "default_quality_schedule")]
    pub schedule: String,
    /// Lowest acceptable rolling score (fraction of prompts passed, 0..1);
    /// also the prod canary's quality bar.
    #[serde(default = "default_quality_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: f64,
    /// Probe runs in the rolling window the score is averaged over.
    #[serde(default = "default_quality_window")]
    #[schemars(range(min = 1))]
    pub window: u32,
    /// The prompt suite, relative to the model volume's root; default: the
    /// model's `spec.validation.systemTests.path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// The OpenAI-compatible base URL probed; default: the in-cluster URL of
    /// the Service the promotion committed for its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl Default for QualitySpec {
    fn default() -> Self {
        QualitySpec {
            schedule: default_quality_schedule(),
            threshold: default_quality_threshold(),
            window: default_quality_window(),
            suite: None,
            endpoint: None,
        }
    }
}

/// The rolling window of quality-probe results.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QualityStatus {
    /// The served model name the probe asks for (the `model` label of the
    /// quality metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The last `spec.quality.window` probe runs, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<QualitySample>,
    /// Mean score of the samples; absent before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// The threshold the score was compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// When the newest sample's probe finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
}

/// One probe run, as its pod reported it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QualitySample {
    /// The probe Job (its name is unique per run).
    pub job: String,
    /// Fraction of the suite's prompts passed (0..1).
    pub score: f64,
    pub passed: u32,
    pub total: u32,
    /// Prompts that got no answer (transport or server errors).
    pub failures: u32,
    /// 90th percentile of the probe's request latencies.
    pub latency_p90_seconds: f64,
    pub finished_at: Time,
}

/// What the operator has observed and done.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPromotionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The promotion commit's SHA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The revert commit's SHA, after a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_commit: Option<String>,
    /// The variant this promotion committed (the model's at commit time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The serving folder this promotion committed (`envs/{env}/{model}`):
    /// while the promotion stands, no other promotion may commit into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// Failed attempts at the current git write (commit or revert); reset
    /// when one lands or the spec changes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub git_attempts: u32,
    /// When the next attempt at a failed git write is due (exponential
    /// backoff); absent when none is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_git_attempt_time: Option<Time>,
    /// The quality probe's rolling window, once the promotion is synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualityStatus>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_quality_schedule() -> String {
    "*/5 * * * *".to_string()
}
fn default_quality_threshold() -> f64 {
    0.8
}
fn default_quality_window() -> u32 {
    5
}
fn default_branch() -> String {
    "main".to_string()
}
fn default_runtime() -> String {
    "vllm".to_string()
}
fn default_replicas() -> u32 {
    1
}
fn default_max_model_len() -> u32 {
    4096
}
fn default_gpu_memory_utilization() -> f64 {
    0.9
}
fn default_tensor_parallel() -> u32 {
    1
}
