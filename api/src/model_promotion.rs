//! The `ModelPromotion` custom resource: moves a validated variant to the next
//! environment through the GitOps repository.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
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
}

/// The `QuantizedModel` to promote, in the promotion's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ModelRef {
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
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitOpsSpec {
    pub url: String,
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Secret holding `ssh-privatekey` or `username`/`password` (token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Failed attempts at the current git write (commit or revert); reset
    /// when one lands.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub git_attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
