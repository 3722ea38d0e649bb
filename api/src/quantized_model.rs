//! The `QuantizedModel` custom resource: one quantized variant of a base model.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::rules;

/// One quantized variant of a base model: what to quantize, how, with which
/// calibration data, and which quality gates the result must pass.
///
/// The cross-field rules of `spec_file::validate` are repeated here as CEL
/// rules, so that the API server refuses what local mode refuses; each
/// message names its field. The value rules (paths, names, bounds) are
/// [`crate::rules`]'s, shared by both.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(self.quantization.method in ['gptq', 'awq']) || has(self.calibration)").message("spec.calibration: calibration data is required for gptq and awq"))]
#[kube(
    group = "quantops.dev",
    version = "v1alpha1",
    kind = "QuantizedModel",
    namespaced,
    status = "QuantizedModelStatus",
    shortname = "qm",
    category = "quantops",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".spec.quantization.method"}"#,
    printcolumn = r#"{"name":"Bits","type":"integer","jsonPath":".spec.quantization.bits"}"#,
    printcolumn = r#"{"name":"PPL-Delta","type":"string","jsonPath":".status.perplexityDelta"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct QuantizedModelSpec {
    /// The full-precision checkpoint and its lineage.
    pub base_model: BaseModel,
    /// The variant's version, part of the variant name and artifact path:
    /// letters, digits, `.`, `_`, `-`, starting with a letter or digit.
    #[schemars(length(min = 1, max = rules::MAX_SEGMENT_LEN))]
    #[x_kube(validation = Rule::new(rules::SEGMENT_RULE).message(rules::must_be("spec.version", rules::SEGMENT_EXPECTED).as_str()))]
    pub version: String,
    /// The quantization recipe.
    pub quantization: QuantizationSpec,
    /// Calibration text; required by GPTQ and AWQ, which learn from activations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSpec>,
    /// What the quantized model is checked against, and the gates it must pass.
    #[serde(default)]
    pub validation: ValidationSpec,
    /// Where the artifact is written.
    #[serde(default)]
    pub output: OutputSpec,
    /// What each pipeline Job asks of the cluster.
    #[serde(default)]
    pub resources: ResourcesSpec,
}

/// The source checkpoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    /// Lineage name (e.g. `meta-llama/Llama-3.2-1B`), written into the model
    /// card; its last segment names the artifact directory.
    #[schemars(length(min = 1, max = rules::MAX_MODEL_NAME_LEN))]
    #[x_kube(validation = Rule::new(rules::MODEL_NAME_RULE).message(rules::must_be("spec.baseModel.name", rules::MODEL_NAME_EXPECTED).as_str()))]
    pub name: String,
    /// Directory of the Hugging Face-layout checkpoint, relative to the model volume.
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.baseModel.path").as_str()))]
    pub path: String,
    /// Expected sha256 digests of checkpoint files, by file name; checked before loading.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    // The digest rule sits on the values' own schema, where `maxLength`
    // bounds its cost; a rule on the map iterating `self[k]` is estimated
    // over unbounded strings and the API server refuses the CRD.
    #[schemars(extend(
        "maxProperties" = rules::MAX_DIGESTS,
        "additionalProperties" = {
            "type": "string",
            "maxLength": rules::DIGEST_LEN,
            "x-kubernetes-validations": [{
                "rule": rules::DIGEST_RULE,
                "message": rules::must_be("spec.baseModel.sha256", rules::DIGEST_EXPECTED),
            }],
        },
    ))]
    #[x_kube(validation = Rule::new(rules::DIGEST_KEY_RULE).message(rules::must_be("spec.baseModel.sha256", rules::DIGEST_KEY_EXPECTED).as_str()))]
    pub sha256: BTreeMap<String, String>,
}

/// The quantization algorithm.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round-to-nearest: no calibration, the floor every other method must beat.
    Rtn,
    /// GPTQ: second-order error compensation from calibration activations.
    Gptq,
    /// AWQ: activation-aware per-channel scaling before rounding.
    Awq,
    /// INT8 weight-only, per channel.
    Int8,
    /// FP8 E4M3 weights with per-channel scales.
    Fp8,
}

impl Method {
    /// The lowercase name used in specs, paths and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::Int8 => "int8",
            Method::Fp8 => "fp8",
        }
    }

    /// Whether the method learns from calibration activations.
    pub fn needs_calibration(self) -> bool {
        matches!(self, Method::Gptq | Method::Awq)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The recipe: method, bit width, grouping and which layers stay in full precision.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(self.method in ['int8', 'fp8']) || self.bits == 8").message("spec.quantization.bits: must be 8 for int8 and fp8"))]
#[x_kube(validation = Rule::new("self.method != 'fp8' || self.groupSize == -1").message("spec.quantization.groupSize: must be -1 for fp8 (per-channel scales)"))]
#[serde(rename_all = "camelCase")]
pub struct QuantizationSpec {
    pub method: Method,
    /// Weight bits: 4 or 8 in production, 2 and 3 for experiments; 8 for int8 and fp8.
    #[serde(default = "default_bits")]
    #[schemars(extend("enum" = [2, 3, 4, 8]))]
    pub bits: u8,
    /// Columns sharing one scale; -1 means one scale per output channel.
    #[serde(default = "default_group_size")]
    #[schemars(extend("enum" = [-1, 32, 64, 128]))]
    pub group_size: i32,
    /// Symmetric (no zero point) or asymmetric (scale and zero point) integer grid.
    #[serde(default = "default_true")]
    pub symmetric: bool,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal.
    #[serde(default)]
    pub act_order: bool,
    /// GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean.
    #[serde(default = "default_damp")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub damp_percent: f64,
    /// Linear layers left in full precision, matched by name suffix (e.g. `lm_head`).
    #[serde(default = "default_ignore")]
    #[schemars(length(max = rules::MAX_IGNORE), inner(length(min = 1, max = rules::MAX_IGNORE_LEN)))]
    pub ignore: Vec<String>,
}

/// Calibration samples drawn from a text file.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CalibrationSpec {
    /// Text file (or JSON token file), relative to the model volume.
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.calibration.path").as_str()))]
    pub path: String,
    #[serde(default = "default_samples")]
    #[schemars(range(min = rules::CALIBRATION_SAMPLES.min, max = rules::CALIBRATION_SAMPLES.max))]
    pub samples: u32,
    #[serde(default = "default_sequence_length")]
    #[schemars(range(min = rules::CALIBRATION_SEQUENCE_LENGTH.min, max = rules::CALIBRATION_SEQUENCE_LENGTH.max))]
    pub sequence_length: u32,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

/// Everything the quantized model is compared against its baseline on.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationSpec {
    /// Held-out text for token-level perplexity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_text: Option<EvalTextSpec>,
    /// Multiple-choice task sets scored by log-likelihood.
    #[serde(default)]
    #[schemars(length(max = rules::MAX_TASK_SETS))]
    pub tasks: Vec<TaskSetSpec>,
    /// Stage-2 system tests: system prompts, structured output, edge cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_tests: Option<SystemTestsSpec>,
    /// Greedy-decoding consistency against the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencySpec>,
    /// Serving speed of the baseline and the variant, each load-tested
    /// through the worker's own OpenAI server: a figure for the report and
    /// the card, not a gate (the worker's server runs dequantized weights, so
    /// it measures what the validate machine serves, not vLLM's kernels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadtest: Option<LoadtestSpec>,
    #[serde(default)]
    pub gates: GatesSpec,
}

/// The validation load test: a fixed-concurrency run of streamed requests
/// with synthetic prompts of a given length and a fixed output length.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadtestSpec {
    /// Requests per model.
    #[serde(default = "default_loadtest_requests")]
    #[schemars(range(min = rules::LOADTEST_REQUESTS.min, max = rules::LOADTEST_REQUESTS.max))]
    pub requests: u32,
    /// Requests in flight at once.
    #[serde(default = "default_loadtest_concurrency")]
    #[schemars(range(min = rules::LOADTEST_CONCURRENCY.min, max = rules::LOADTEST_CONCURRENCY.max))]
    pub concurrency: u32,
    /// Tokens of each synthetic prompt.
    #[serde(default = "default_loadtest_prompt_tokens")]
    #[schemars(range(min = rules::LOADTEST_PROMPT_TOKENS.min, max = rules::LOADTEST_PROMPT_TOKENS.max))]
    pub prompt_tokens: u32,
    /// Output tokens of each request (end-of-sequence ignored).
    #[serde(default = "default_loadtest_max_tokens")]
    #[schemars(range(min = rules::LOADTEST_MAX_TOKENS.min, max = rules::LOADTEST_MAX_TOKENS.max))]
    pub max_tokens: u32,
}

fn default_loadtest_requests() -> u32 {
    16
}
fn default_loadtest_concurrency() -> u32 {
    4
}
fn default_loadtest_prompt_tokens() -> u32 {
    64
}
fn default_loadtest_max_tokens() -> u32 {
    32
}

/// Perplexity text and its windows.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalTextSpec {
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.validation.evalText.path").as_str()))]
    pub path: String,
    #[serde(default = "default_window_tokens")]
    #[schemars(range(min = rules::EVAL_WINDOW_TOKENS.min, max = rules::EVAL_WINDOW_TOKENS.max))]
    pub window_tokens: u32,
    #[serde(default = "default_max_windows")]
    #[schemars(range(min = rules::EVAL_MAX_WINDOWS.min, max = rules::EVAL_MAX_WINDOWS.max))]
    pub max_windows: u32,
}

/// A multiple-choice task file (JSON lines of `{"prompt", "choices", "answer"}`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSetSpec {
    /// The task set's name in the report, the card and the metrics.
    #[schemars(length(min = 1, max = rules::MAX_SEGMENT_LEN))]
    #[x_kube(validation = Rule::new(rules::SEGMENT_RULE).message(rules::must_be("spec.validation.tasks[].name", rules::SEGMENT_EXPECTED).as_str()))]
    pub name: String,
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.validation.tasks[].path").as_str()))]
    pub path: String,
}

/// The system-test file.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SystemTestsSpec {
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.validation.systemTests.path").as_str()))]
    pub path: String,
}

/// Prompts for the greedy-decoding comparison with the baseline.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencySpec {
    /// JSON lines with a `prompt` field (chat-formatted or plain).
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.validation.consistency.path").as_str()))]
    pub path: String,
    #[serde(default = "default_consistency_prompts")]
    #[schemars(range(min = rules::CONSISTENCY_MAX_PROMPTS.min, max = rules::CONSISTENCY_MAX_PROMPTS.max))]
    pub max_prompts: u32,
    #[serde(default = "default_max_new_tokens")]
    #[schemars(range(min = rules::CONSISTENCY_MAX_NEW_TOKENS.min, max = rules::CONSISTENCY_MAX_NEW_TOKENS.max))]
    pub max_new_tokens: u32,
}

/// Thresholds each check must meet for the variant to leave experiment.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.maxPerplexityIncreasePercent >= 0.0 && self.maxPerplexityIncreasePercent <= 10.0").message("spec.validation.gates.maxPerplexityIncreasePercent: must be between 0 and 10 (the hard ceiling)"))]
#[serde(rename_all = "camelCase")]
pub struct GatesSpec {
    #[serde(default = "default_max_ppl_increase")]
    pub max_perplexity_increase_percent: f64,
    #[serde(default = "default_max_task_drop")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub max_task_drop_percent: f64,
    #[serde(default = "default_min_greedy_match")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_greedy_match_rate: f64,
    /// Share of system tests that passed on the baseline and must pass on the variant.
    #[serde(default = "default_min_system_test_pass_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_system_test_pass_rate: f64,
}

impl Default for GatesSpec {
    fn default() -> Self {
        GatesSpec {
            max_perplexity_increase_percent: default_max_ppl_increase(),
            max_task_drop_percent: default_max_task_drop(),
            min_greedy_match_rate: default_min_greedy_match(),
            min_system_test_pass_rate: default_min_system_test_pass_rate(),
        }
    }
}

/// The artifact root.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Directory of the artifacts, relative to the model volume.
    #[serde(default = "default_output_path")]
    #[schemars(length(min = 1, max = rules::MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(rules::PATH_RULE).message(rules::path_message("spec.output.path").as_str()))]
    pub path: String,
}

impl Default for OutputSpec {
    fn default() -> Self {
        OutputSpec {
            path: default_output_path(),
        }
    }
}

/// What a pipeline Job requests.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// `nvidia.com/gpu` of each Job; 0 runs the CPU twin.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = rules::GPUS.min, max = rules::GPUS.max))]
    pub gpus: u32,
    /// Memory request and limit, a Kubernetes quantity (e.g. `16Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = rules::MAX_QUANTITY_LEN))]
    #[x_kube(validation = Rule::new(rules::QUANTITY_RULE).message(rules::must_be("spec.resources.memory", rules::QUANTITY_EXPECTED).as_str()))]
    pub memory: Option<String>,
    /// CPU request, a Kubernetes quantity (e.g. `4` or `500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = rules::MAX_QUANTITY_LEN))]
    #[x_kube(validation = Rule::new(rules::QUANTITY_RULE).message(rules::must_be("spec.resources.cpu", rules::QUANTITY_EXPECTED).as_str()))]
    pub cpu: Option<String>,
}

impl Default for ResourcesSpec {
    fn default() -> Self {
        ResourcesSpec {
            gpus: default_gpus(),
            memory: None,
            cpu: None,
        }
    }
}

/// What the operator has observed and done; written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuantizedModelStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The running stage's last progress line (e.g. `quantize: layer 14/32`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_perplexity: Option<f64>,
    /// Relative perplexity change, formatted for humans (e.g. `+0.64%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_delta: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<crate::report::GateResult>,
    /// Failed attempts per stage, for the retry backoff.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stage_attempts: BTreeMap<String, u32>,
    /// What the operator last recorded of each stage (`baseline`,
    /// `quantize`, `validate`), for the stage hash it ran: a stage recorded
    /// `Succeeded` for the current hash is not run again, even when its Job
    /// is deleted, and a finished Job is acted on only when its outcome is
    /// not yet recorded here, so counters and events see each outcome once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stages: BTreeMap<String, StageRecord>,
}

/// One stage's run as the operator recorded it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageRecord {
    /// The hash of the spec fields the stage depends on, as in its Job's
    /// name and `quantops.dev/spec-hash` label; a record for another hash
    /// belongs to an older spec.
    pub hash: String,
    /// The Job that runs or ran the stage.
    pub job: String,
    /// That Job's uid, once the operator has seen the Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uid: Option<String>,
    pub state: StageState,
}

/// Where a recorded stage stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StageState {
    /// Its Job was started and has not finished yet.
    Running,
    /// It ran and its result is in status.
    Succeeded,
    /// The validate stage ran and a gate failed: a result, final for this spec.
    GatesFailed,
    /// It broke (counted in `stageAttempts`); retried after the backoff or given up.
    Broken,
}

fn default_bits() -> u8 {
    4
}
fn default_group_size() -> i32 {
    128
}
fn default_true() -> bool {
    true
}
fn default_damp() -> f64 {
    0.01
}
fn default_ignore() -> Vec<String> {
    vec!["lm_head".to_string()]
}
fn default_samples() -> u32 {
    128
}
fn default_sequence_length() -> u32 {
    2048
}
fn default_seed() -> u64 {
    42
}
fn default_window_tokens() -> u32 {
    512
}
fn default_max_windows() -> u32 {
    64
}
fn default_consistency_prompts() -> u32 {
    32
}
fn default_max_new_tokens() -> u32 {
    32
}
fn default_max_ppl_increase() -> f64 {
    3.0
}
fn default_max_task_drop() -> f64 {
    5.0
}
fn default_min_greedy_match() -> f64 {
    0.5
}
fn default_min_system_test_pass_rate() -> f64 {
    0.9
}
fn default_output_path() -> String {
    "quantized".to_string()
}
fn default_gpus() -> u32 {
    1
}
