//! Renders an environment's serving folder, `envs/{env}/{model}/`, for one
//! promotion: the files Argo CD syncs into the environment's namespace.
//!
//! Pure functions only: the same [`ServingInputs`] and [`ServingSettings`]
//! give byte-identical files, so that re-rendering an unchanged promotion
//! yields an unchanged tree and the GitOps writer makes no commit.
//!
//! | environment | files |
//! | --- | --- |
//! | experiment, test | `deployment.yaml`, `service.yaml`, `kustomization.yaml`, `README.md` |
//! | prod | `rollout.yaml`, `analysistemplate.yaml`, `service.yaml`, `kustomization.yaml`, `README.md` |
//!
//! The Deployment and the Rollout share one pod template ([`pod_template`]),
//! so the pods canaried in prod are exactly the pods that were tested.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use quantops_api::model_promotion::{CanarySpec, CanaryStep, Environment, ServingSpec};
use quantops_api::{Method, QuantizationSpec};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::job::{GPU_RESOURCE, MODEL_DIR, MODEL_LABEL};

/// The port vLLM's OpenAI server listens on, and the Service's port.
pub const HTTP_PORT: i32 = 8000;
/// Label carrying the served variant; changes with every promotion, so it is
/// never part of a selector.
pub const VARIANT_LABEL: &str = "quantops.dev/variant";
/// Label carrying the environment.
pub const ENVIRONMENT_LABEL: &str = "quantops.dev/environment";
/// The standard application-name label.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The vLLM argument naming the checkpoint's quantization format.
pub const QUANTIZATION_COMPRESSED_TENSORS: &str = "compressed-tensors";

const DEPLOYMENT_FILE: &str = "deployment.yaml";
const ROLLOUT_FILE: &str = "rollout.yaml";
const ANALYSIS_FILE: &str = "analysistemplate.yaml";
const SERVICE_FILE: &str = "service.yaml";
const KUSTOMIZATION_FILE: &str = "kustomization.yaml";
const CARD_FILE: &str = "README.md";
/// Kubernetes names and label values are at most this long.
const MAX_NAME: usize = 63;

/// What one promotion serves: everything that differs between promotions.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingInputs {
    /// The model's short name (`tiny-llama`): the folder name, the served
    /// model name clients ask for, and the workload's name. It stays the same
    /// across variants so that a promotion replaces the previous variant.
    pub model: String,
    /// The environment's namespace, set by the kustomization.
    pub namespace: String,
    pub environment: Environment,
    /// The variant served (`tiny-llama-v1.2-int4-gptq-g128-asym`).
    pub variant: String,
    /// The artifact directory: relative to the model volume's root (as in
    /// `QuantizedModel.status.artifactPath` when relative), or absolute
    /// inside the serving pod.
    pub artifact_path: String,
    /// The recipe the artifact was made with; decides `--quantization`.
    pub quantization: QuantizationSpec,
    pub serving: ServingSpec,
    /// The prod canary; [`ServingSettings::default_canary`] when `None`.
    pub canary: Option<CanarySpec>,
    /// The model card, written verbatim as the folder's `README.md`.
    pub card: String,
    /// The lowest rolling quality-probe score the prod canary accepts
    /// (`spec.quality.threshold`).
    pub quality_threshold: f64,
}

/// Operator-wide serving settings: the same for every promotion.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingSettings {
    /// The vLLM OpenAI-server image.
    pub vllm_image: String,
    /// The PVC holding the artifacts in each environment's namespace.
    pub model_claim: String,
    /// Where that claim is mounted in the serving pod.
    pub model_mount: String,
    /// Where serving pods may run (GPU nodes); none when empty.
    pub node_selector: BTreeMap<String, String>,
    /// Prometheus as seen from Argo Rollouts' analysis runs.
    pub prometheus_address: String,
    /// The canary's pass marks.
    pub analysis: AnalysisThresholds,
    /// How long a pod may take from start to its first answered completion
    /// (model load, CUDA graph capture), in seconds.
    pub startup_budget_seconds: i32,
    /// Used in prod when the promotion names no canary steps.
    pub default_canary: CanarySpec,
}

impl Default for ServingSettings {
    fn default() -> Self {
        ServingSettings {
            vllm_image: "vllm/vllm-openai:v0.11.0".to_string(),
            model_claim: "quantops-models".to_string(),
            model_mount: MODEL_DIR.to_string(),
            node_selector: BTreeMap::from([(
                "quantops.dev/gpu-node".to_string(),
                "true".to_string(),
            )]),
            // The prometheus-operator's governing Service of the
            // kube-prometheus-stack in its usual `monitoring` namespace.
            prometheus_address: "http://prometheus-operated.monitoring.svc:9090".to_string(),
            analysis: AnalysisThresholds::default(),
            startup_budget_seconds: 1800,
            default_canary: CanarySpec {
                steps: vec![
                    CanaryStep {
                        weight: 10,
                        pause: Some("5m".to_string()),
                    },
                    CanaryStep {
                        weight: 50,
                        pause: Some("10m".to_string()),
                    },
                ],
            },
        }
    }
}

/// The limits the prod canary's analysis holds the new pods to.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisThresholds {
    /// Highest tolerated fraction of aborted requests (0..1).
    pub max_error_rate: f64,
    /// Highest tolerated p95 end-to-end request latency, seconds.
    pub max_p95_latency_seconds: f64,
    /// How long the quality metric waits before its first measurement: the
    /// probe CronJob starts when the promotion is synced, and its first run
    /// comes within one schedule period (5 minutes by default).
    pub quality_initial_delay: String,
    /// How often each metric is measured (Argo duration, e.g. `1m`).
    pub interval: String,
    /// Measurements that may fail before the analysis (and the canary) fails.
    pub failure_limit: u32,
    /// Prometheus range of the rate and quantile queries (e.g. `5m`).
    pub window: String,
}

impl Default for AnalysisThresholds {
    fn default() -> Self {
        AnalysisThresholds {
            max_error_rate: 0.01,
            max_p95_latency_seconds: 10.0,
            quality_initial_delay: "6m".to_string(),
            interval: "1m".to_string(),
            failure_limit: 1,
            window: "5m".to_string(),
        }
    }
}

/// One rendered file, its path relative to the serving folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: String,
    pub content: String,
}

/// The serving folder of one model in one environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFolder {
    /// `envs/{env}/{model}`, relative to the repository root, no slashes at the ends.
    pub dir: String,
    /// The folder's whole content, sorted by path.
    pub files: Vec<RenderedFile>,
}

/// Why a folder could not be rendered: each is a spec the operator must
/// refuse with a clear condition rather than commit.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("spec.serving.runtime: {0:?} is not supported (only \"vllm\")")]
    UnsupportedRuntime(String),
    #[error(
        "vLLM cannot serve {bits}-bit {method} weights (compressed-tensors weight-only kernels take 4 or 8 bits)"
    )]
    UnservableRecipe { method: Method, bits: u8 },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("cannot serialise {file}: {source}")]
    Serialise {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> RenderError {
    RenderError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// The `--quantization` value vLLM needs for an artifact of this recipe.
///
/// Every artifact the worker writes is a compressed-tensors checkpoint:
/// `config.json` carries `quantization_config.quant_method:
/// "compressed-tensors"`, with format `pack-quantized` for 4- and 8-bit
/// integer weights (RTN, GPTQ, AWQ, INT8: vLLM's WNA16 kernels, i.e. W4A16 and
/// W8A16) and `float-quantized` for FP8 weights (vLLM's W8A16-FP8 scheme).
/// vLLM registers that loader as `compressed-tensors`; GPTQ and AWQ here are
/// ways of choosing the integer weights, not the AutoGPTQ/AutoAWQ file
/// layouts, so `--quantization gptq`/`awq` would be wrong. vLLM would detect
/// the method from `config.json` on its own; naming it makes vLLM refuse to
/// start when the artifact is not what the recipe says, instead of silently
/// serving something else. 2- and 3-bit weights are written
/// `naive-quantized`, which vLLM has no kernel for, so they are refused here
/// rather than failing at pod start in prod.
pub fn quantization_arg(q: &QuantizationSpec) -> Result<&'static str, RenderError> {
    match (q.method, q.bits) {
        (Method::Fp8 | Method::Int8, 8) => Ok(QUANTIZATION_COMPRESSED_TENSORS),
        (Method::Rtn | Method::Gptq | Method::Awq, 4 | 8) => Ok(QUANTIZATION_COMPRESSED_TENSORS),
        (method, bits) => Err(RenderError::UnservableRecipe { method, bits }),
    }
}

/// A DNS-1035 label (Service names are the strictest) made from `s`:
/// lowercase, `[a-z0-9-]`, starting with a letter, at most 63 characters,
/// with a hash suffix when it had to be shortened so that names stay unique.
pub fn resource_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    let mut out = out.trim_end_matches('-').to_string();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "m-");
    }
    shorten(out, s, |c| c != '-')
}

/// A label value made from `s`: `[A-Za-z0-9._-]`, alphanumeric at both
/// ends, at most 63 characters (hash-suffixed when shortened).
pub fn label_value(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    shorten(trimmed, s, |c| c.is_ascii_alphanumeric())
}

fn shorten(name: String, original: &str, ends_ok: impl Fn(char) -> bool) -> String {
    if name.len() <= MAX_NAME {
        return name;
    }
    let digest = hex::encode(Sha256::digest(original.as_bytes()));
    let mut head: String = name.chars().take(MAX_NAME - 9).collect();
    while head.ends_with(|c: char| !ends_ok(c)) {
        head.pop();
    }
    format!("{head}-{}", &digest[..8])
}

/// Whether `d` is a duration Argo Rollouts accepts in a pause step or an
/// analysis interval: whole seconds, or a number followed by `s`, `m` or `h`.
pub fn is_argo_duration(d: &str) -> bool {
    let digits = d.trim_end_matches(['s', 'm', 'h']);
    let suffix = d.len() - digits.len();
    suffix <= 1 && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The Prometheus-range form of the same durations (`5m`; bare seconds get `s`).
fn prometheus_range(d: &str) -> String {
    if d.bytes().all(|b| b.is_ascii_digit()) {
        format!("{d}s")
    } else {
        d.to_string()
    }
}

/// The name of a model's workload (Deployment or Rollout) and Service in
/// every environment.
pub fn object_name(model: &str) -> String {
    resource_name(model)
}

/// The in-cluster base URL of a model's Service in an environment's
/// namespace: what the quality probe asks by default.
pub fn service_url(model: &str, namespace: &str) -> String {
    format!("http://{}.{namespace}.svc:{HTTP_PORT}", object_name(model))
}

/// The folder path of a model in an environment: `envs/{env}/{model}`.
pub fn folder_path(environment: Environment, model: &str) -> String {
    format!("envs/{}/{}", environment.as_str(), resource_name(model))
}

/// Renders the whole serving folder of `inputs.model` in `inputs.environment`.
pub fn render_serving_folder(
    inputs: &ServingInputs,
    settings: &ServingSettings,
) -> Result<RenderedFolder, RenderError> {
    validate(inputs, settings)?;
    let header = format!(
        "# Generated by quantops for variant {} in {}; the next promotion replaces this file.\n",
        inputs.variant,
        inputs.environment.as_str()
    );
    let mut files = Vec::new();
    let mut resources = Vec::new();
    if inputs.environment == Environment::Prod {
        let canary = inputs.canary.as_ref().unwrap_or(&settings.default_canary);
        files.push(yaml_file(
            ROLLOUT_FILE,
            &header,
            &rollout(inputs, settings, canary)?,
        )?);
        files.push(yaml_file(
            ANALYSIS_FILE,
            &header,
            &analysis_template(inputs, settings),
        )?);
        resources.extend([ROLLOUT_FILE, ANALYSIS_FILE]);
    } else {
        files.push(yaml_file(
            DEPLOYMENT_FILE,
            &header,
            &deployment(inputs, settings)?,
        )?);
        resources.push(DEPLOYMENT_FILE);
    }
    files.push(yaml_file(SERVICE_FILE, &header, &service(inputs))?);
    resources.push(SERVICE_FILE);
    resources.sort_unstable();
    files.push(yaml_file(
        KUSTOMIZATION_FILE,
        &header,
        &kustomization(inputs, &resources),
    )?);
    files.push(RenderedFile {
        path: CARD_FILE.to_string(),
        content: inputs.card.clone(),
    });
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(RenderedFolder {
        dir: folder_path(inputs.environment, &inputs.model),
        files,
    })
}

fn validate(inputs: &ServingInputs, settings: &ServingSettings) -> Result<(), RenderError> {
    if inputs.serving.runtime != "vllm" {
        return Err(RenderError::UnsupportedRuntime(
            inputs.serving.runtime.clone(),
        ));
    }
    quantization_arg(&inputs.quantization)?;
    if inputs.model.trim().is_empty() {
        return Err(invalid("model", "must not be empty"));
    }
    if inputs.namespace.trim().is_empty() {
        return Err(invalid("namespace", "must not be empty"));
    }
    if inputs.artifact_path.trim().is_empty() {
        return Err(invalid("artifactPath", "must not be empty"));
    }
    if inputs.artifact_path.split('/').any(|seg| seg == "..") {
        return Err(invalid(
            "artifactPath",
            format!(
                "{:?} must stay inside the model volume",
                inputs.artifact_path
            ),
        ));
    }
    if !(0.0..=1.0).contains(&inputs.quality_threshold) {
        return Err(invalid(
            "spec.quality.threshold",
            format!("{} is not in [0, 1]", inputs.quality_threshold),
        ));
    }
    let s = &inputs.serving;
    if s.tensor_parallel_size == 0 {
        return Err(invalid(
            "spec.serving.tensorParallelSize",
            "must be at least 1",
        ));
    }
    if s.max_model_len == 0 {
        return Err(invalid("spec.serving.maxModelLen", "must be at least 1"));
    }
    if !(s.gpu_memory_utilization > 0.0 && s.gpu_memory_utilization <= 1.0) {
        return Err(invalid(
            "spec.serving.gpuMemoryUtilization",
            format!("{} is not in (0, 1]", s.gpu_memory_utilization),
        ));
    }
    if i32::try_from(s.replicas).is_err() {
        return Err(invalid("spec.serving.replicas", "too large"));
    }
    for field in [
        &settings.analysis.interval,
        &settings.analysis.window,
        &settings.analysis.quality_initial_delay,
    ] {
        if !is_argo_duration(field) {
            return Err(invalid(
                "analysis settings",
                format!("{field:?} is not a duration"),
            ));
        }
    }
    if inputs.environment == Environment::Prod {
        let canary = inputs.canary.as_ref().unwrap_or(&settings.default_canary);
        for (i, step) in canary.steps.iter().enumerate() {
            if !(1..=100).contains(&step.weight) {
                return Err(invalid(
                    &format!("spec.canary.steps[{i}].weight"),
                    format!("{} is not a percentage in 1..=100", step.weight),
                ));
            }
            if let Some(pause) = &step.pause
                && !is_argo_duration(pause)
            {
                return Err(invalid(
                    &format!("spec.canary.steps[{i}].pause"),
                    format!("{pause:?} is not a duration such as 30s, 5m or 1h"),
                ));
            }
        }
    }
    Ok(())
}

fn yaml_file(
    path: &str,
    header: &str,
    value: &impl Serialize,
) -> Result<RenderedFile, RenderError> {
    let body = serde_yaml::to_string(value).map_err(|source| RenderError::Serialise {
        file: path.to_string(),
        source,
    })?;
    Ok(RenderedFile {
        path: path.to_string(),
        content: format!("{header}{body}"),
    })
}

/// Labels that identify the workload: stable across variants, so they may
/// sit in selectors (which are immutable on a Deployment).
fn selector_labels(inputs: &ServingInputs) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), label_value(&inputs.model)),
        (MODEL_LABEL.to_string(), label_value(&inputs.model)),
        (
            ENVIRONMENT_LABEL.to_string(),
            inputs.environment.as_str().to_string(),
        ),
    ])
}

/// Selector labels plus the variant and the usual recommended labels.
fn object_labels(inputs: &ServingInputs) -> BTreeMap<String, String> {
    let mut labels = selector_labels(inputs);
    labels.insert(VARIANT_LABEL.to_string(), label_value(&inputs.variant));
    labels.insert(
        "app.kubernetes.io/component".to_string(),
        "inference-server".to_string(),
    );
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        "quantops".to_string(),
    );
    labels
}

fn metadata(inputs: &ServingInputs) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(&inputs.model)),
        labels: Some(object_labels(inputs)),
        ..ObjectMeta::default()
    }
}

/// The model directory as the serving pod sees it.
fn model_dir(inputs: &ServingInputs, settings: &ServingSettings) -> String {
    if inputs.artifact_path.starts_with('/') {
        inputs.artifact_path.trim_end_matches('/').to_string()
    } else {
        format!(
            "{}/{}",
            settings.model_mount.trim_end_matches('/'),
            inputs.artifact_path.trim_matches('/')
        )
    }
}

/// vLLM's OpenAI-server command line. The module entry point is named
/// explicitly (not the image's `vllm serve` entrypoint) so that `--model`
/// is a first-class flag and the pod does not depend on the image's
/// ENTRYPOINT, which has changed between vLLM releases.
fn vllm_command(
    inputs: &ServingInputs,
    settings: &ServingSettings,
) -> Result<(Vec<String>, Vec<String>), RenderError> {
    let s = &inputs.serving;
    let command = vec![
        "python3".to_string(),
        "-m".to_string(),
        "vllm.entrypoints.openai.api_server".to_string(),
    ];
    let args = vec![
        "--model".to_string(),
        model_dir(inputs, settings),
        "--served-model-name".to_string(),
        inputs.model.clone(),
        "--quantization".to_string(),
        quantization_arg(&inputs.quantization)?.to_string(),
        "--max-model-len".to_string(),
        s.max_model_len.to_string(),
        "--gpu-memory-utilization".to_string(),
        s.gpu_memory_utilization.to_string(),
        "--tensor-parallel-size".to_string(),
        s.tensor_parallel_size.to_string(),
        "--host".to_string(),
        "0.0.0.0".to_string(),
        "--port".to_string(),
        HTTP_PORT.to_string(),
    ];
    Ok((command, args))
}

/// The start-up check: a `startupProbe` that POSTs one completion of one
/// token to the server's own `/v1/completions`.
///
/// A startupProbe (rather than a postStart hook) because Kubernetes holds the
/// readiness and liveness probes until it succeeds, so the pod joins the
/// Service only after the model has actually produced a token, and a slow
/// model load is waited for (up to the startup budget) instead of the
/// container being killed; a postStart hook runs beside the server's start
/// and kills the container when it fails. It runs python3 because the vLLM
/// image always has it (curl is not guaranteed) and exits non-zero on a
/// connection error, an HTTP error or a response without choices.
fn startup_probe(inputs: &ServingInputs, settings: &ServingSettings) -> Probe {
    let body = json!({
        "model": inputs.model,
        "prompt": "Hello",
        "max_tokens": 1,
        "temperature": 0,
    })
    .to_string();
    // A JSON string literal is a valid Python string literal.
    let body_literal = Value::String(body).to_string();
    let timeout = 30;
    let script = format!(
        "import json,sys,urllib.request as u;\
         r=u.urlopen(u.Request('http://127.0.0.1:{HTTP_PORT}/v1/completions',data={body_literal}.encode(),headers={{'Content-Type':'application/json'}}),timeout={timeout});\
         sys.exit(0 if json.load(r).get('choices') else 1)"
    );
    let period = 10;
    Probe {
        exec: Some(ExecAction {
            command: Some(vec!["python3".to_string(), "-c".to_string(), script]),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some((settings.startup_budget_seconds / period).max(1)),
        ..Probe::default()
    }
}

fn health_probe(failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".to_string()),
            port: IntOrString::String("http".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// The serving pod, shared by the Deployment and the Rollout.
pub fn pod_template(
    inputs: &ServingInputs,
    settings: &ServingSettings,
) -> Result<PodTemplateSpec, RenderError> {
    let (command, args) = vllm_command(inputs, settings)?;
    let gpus = Quantity(inputs.serving.tensor_parallel_size.to_string());
    let gpu_resources = BTreeMap::from([(GPU_RESOURCE.to_string(), gpus)]);
    let container = Container {
        name: "vllm".to_string(),
        image: Some(settings.vllm_image.clone()),
        command: Some(command),
        args: Some(args),
        env: Some(vec![
            // The weights come from the volume; never reach for the Hub.
            EnvVar {
                name: "HF_HUB_OFFLINE".to_string(),
                value: Some("1".to_string()),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_string()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(gpu_resources.clone()),
            limits: Some(gpu_resources),
            ..ResourceRequirements::default()
        }),
        startup_probe: Some(startup_probe(inputs, settings)),
        readiness_probe: Some(health_probe(3)),
        liveness_probe: Some(health_probe(6)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "models".to_string(),
                mount_path: settings.model_mount.clone(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "dshm".to_string(),
                mount_path: "/dev/shm".to_string(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(object_labels(inputs)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            node_selector: (!settings.node_selector.is_empty())
                .then(|| settings.node_selector.clone()),
            tolerations: Some(vec![Toleration {
                key: Some(GPU_RESOURCE.to_string()),
                operator: Some("Exists".to_string()),
                effect: Some("NoSchedule".to_string()),
                ..Toleration::default()
            }]),
            volumes: Some(vec![
                Volume {
                    name: "models".to_string(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: settings.model_claim.clone(),
                        read_only: Some(true),
                    }),
                    ..Volume::default()
                },
                // Tensor parallelism (NCCL) needs more shared memory than
                // the container runtime's 64 MiB default.
                Volume {
                    name: "dshm".to_string(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".to_string()),
                        ..EmptyDirVolumeSource::default()
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
    })
}

/// A rollout may take the startup budget plus ten minutes before it counts
/// as stuck (the default 600 s is shorter than a large model's load).
fn progress_deadline(settings: &ServingSettings) -> i32 {
    settings.startup_budget_seconds.saturating_add(600)
}

fn replicas(inputs: &ServingInputs) -> i32 {
    i32::try_from(inputs.serving.replicas).unwrap_or(i32::MAX)
}

/// The experiment and test environments' workload.
pub fn deployment(
    inputs: &ServingInputs,
    settings: &ServingSettings,
) -> Result<Deployment, RenderError> {
    Ok(Deployment {
        metadata: metadata(inputs),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas(inputs)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(inputs)),
                ..LabelSelector::default()
            },
            template: pod_template(inputs, settings)?,
            progress_deadline_seconds: Some(progress_deadline(settings)),
            revision_history_limit: Some(3),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// The Service in front of the pods, port 8000 named `http`. In prod it
/// selects stable and canary pods alike: the canary is replica-weighted
/// (no traffic router), so `setWeight` is the share of pods.
pub fn service(inputs: &ServingInputs) -> Service {
    Service {
        metadata: metadata(inputs),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(inputs)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port: HTTP_PORT,
                target_port: Some(IntOrString::String("http".to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn analysis_template_name(inputs: &ServingInputs) -> String {
    let base = resource_name(&inputs.model);
    let mut head: String = base.chars().take(MAX_NAME - "-canary".len()).collect();
    while head.ends_with('-') {
        head.pop();
    }
    format!("{head}-canary")
}

/// Maps `spec.canary.steps` to Argo Rollouts steps: each step sets the
/// weight, then pauses for its duration when it has one.
pub fn canary_steps(canary: &CanarySpec) -> Vec<Value> {
    let mut steps = Vec::with_capacity(canary.steps.len() * 2);
    for step in &canary.steps {
        steps.push(json!({ "setWeight": step.weight }));
        if let Some(pause) = &step.pause {
            steps.push(json!({ "pause": { "duration": pause } }));
        }
    }
    steps
}

/// The prod workload: an Argo Rollouts `Rollout` with an inline pod
/// template.
///
/// Inline rather than `workloadRef`: with a workloadRef the folder would
/// also hold a Deployment that Argo CD syncs and Argo Rollouts scales to
/// zero, so two objects describe one workload and Argo CD and Rollouts fight
/// over its replicas unless every Application ignores that difference. An
/// inline template keeps one object per workload, and it is the same pod
/// template the test environment ran as a Deployment.
///
/// The analysis runs in the background from the first weight step on, so a
/// failing metric aborts the canary at any step.
pub fn rollout(
    inputs: &ServingInputs,
    settings: &ServingSettings,
    canary: &CanarySpec,
) -> Result<Value, RenderError> {
    let template = serde_json::to_value(pod_template(inputs, settings)?).map_err(|e| {
        RenderError::Invalid {
            field: "pod template".to_string(),
            reason: e.to_string(),
        }
    })?;
    let meta = metadata(inputs);
    Ok(json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": { "name": meta.name, "labels": meta.labels },
        "spec": {
            "replicas": replicas(inputs),
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": progress_deadline(settings),
            "selector": { "matchLabels": selector_labels(inputs) },
            "template": template,
            "strategy": {
                "canary": {
                    "analysis": {
                        "templates": [ { "templateName": analysis_template_name(inputs) } ],
                        "startingStep": 1,
                        "args": [
                            { "name": "namespace", "value": inputs.namespace },
                            { "name": "model-name", "value": inputs.model },
                            { "name": "variant", "value": inputs.variant },
                            {
                                "name": "canary-hash",
                                "valueFrom": { "podTemplateHashValue": "Latest" }
                            }
                        ]
                    },
                    "steps": canary_steps(canary)
                }
            }
        }
    }))
}

/// The canary's `AnalysisTemplate`: three Prometheus metrics over the
/// canary's own pods.
///
/// - `error-rate`: the fraction of finished requests that vLLM counts as
///   aborted, from `vllm:request_success_total` by `finished_reason`;
/// - `latency-p95`: the 95th percentile of
///   `vllm:e2e_request_latency_seconds`;
/// - `quality-score`: the rolling quality-probe score (0..1),
///   `quantops_quality_score` for this model and variant in prod, as the
///   operator exports it from the promotion's status (and `quantizer-job
///   probe --listen` exports it under the same name and labels), held to
///   `spec.quality.threshold`. It waits `quality_initial_delay` first: the
///   probe starts when Argo CD has synced the promotion, i.e. with the
///   canary. The Service spreads requests over stable and canary pods (no
///   traffic router), so the score covers both, weighted by replicas.
///
/// The vLLM series are narrowed to the canary with the
/// `rollouts_pod_template_hash` label, which the scrape configuration must
/// copy from the pods' `rollouts-pod-template-hash` label. A metric with no
/// data (no traffic yet, or a missing label) meets neither condition, so the
/// measurement is inconclusive and the Rollout pauses for a human instead
/// of promoting blindly.
pub fn analysis_template(inputs: &ServingInputs, settings: &ServingSettings) -> Value {
    let t = &settings.analysis;
    let window = prometheus_range(&t.window);
    let pods = "namespace=\"{{args.namespace}}\",model_name=\"{{args.model-name}}\",rollouts_pod_template_hash=\"{{args.canary-hash}}\"";
    let error_rate = format!(
        "sum(rate(vllm:request_success_total{{{pods},finished_reason=\"abort\"}}[{window}])) / sum(rate(vllm:request_success_total{{{pods}}}[{window}]))"
    );
    let latency = format!(
        "histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{{{pods}}}[{window}])))"
    );
    let quality = "min(quantops_quality_score{model=\"{{args.model-name}}\",environment=\"prod\",variant=\"{{args.variant}}\"})".to_string();
    let metric = |name: &str, query: String, ok: String, bad: String| {
        json!({
            "name": name,
            "interval": t.interval,
            "failureLimit": t.failure_limit,
            "successCondition": ok,
            "failureCondition": bad,
            "provider": {
                "prometheus": { "address": settings.prometheus_address, "query": query }
            }
        })
    };
    let max_err = t.max_error_rate;
    let max_lat = t.max_p95_latency_seconds;
    let min_q = inputs.quality_threshold;
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": {
            "name": analysis_template_name(inputs),
            "labels": object_labels(inputs),
        },
        "spec": {
            "args": [
                { "name": "namespace" },
                { "name": "model-name" },
                { "name": "variant" },
                { "name": "canary-hash" }
            ],
            "metrics": [
                metric(
                    "error-rate",
                    error_rate,
                    format!("len(result) > 0 && result[0] <= {max_err}"),
                    format!("len(result) > 0 && result[0] > {max_err}"),
                ),
                metric(
                    "latency-p95",
                    latency,
                    format!("len(result) > 0 && result[0] <= {max_lat}"),
                    format!("len(result) > 0 && result[0] > {max_lat}"),
                ),
                with_initial_delay(
                    metric(
                        "quality-score",
                        quality,
                        format!("len(result) > 0 && result[0] >= {min_q}"),
                        format!("len(result) > 0 && result[0] < {min_q}"),
                    ),
                    &t.quality_initial_delay,
                ),
            ]
        }
    })
}

fn with_initial_delay(mut metric: Value, delay: &str) -> Value {
    metric["initialDelay"] = Value::String(delay.to_string());
    metric
}

/// The folder's kustomization: the namespace, the resources, and the
/// labels. It uses kustomize's `labels` field rather than the deprecated
/// `commonLabels` so that the variant label stays out of selectors: a
/// Deployment's selector is immutable, and a label that changes with every
/// promotion must never reach it.
pub fn kustomization(inputs: &ServingInputs, resources: &[&str]) -> Value {
    json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": inputs.namespace,
        "resources": resources,
        "labels": [
            { "pairs": selector_labels(inputs), "includeSelectors": true },
            {
                "pairs": { VARIANT_LABEL: label_value(&inputs.variant) },
                "includeSelectors": false,
                "includeTemplates": true
            }
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::model_promotion::CanaryStep;

    fn quant(method: Method, bits: u8) -> QuantizationSpec {
        let yaml = format!("method: {method}\nbits: {bits}\n");
        serde_yaml::from_str(&yaml).expect("quantization spec")
    }

    fn inputs(env: Environment) -> ServingInputs {
        ServingInputs {
            model: "tiny-llama".to_string(),
            namespace: env.as_str().to_string(),
            environment: env,
            variant: "tiny-llama-v1.2-int4-gptq-g128-asym".to_string(),
            artifact_path: "quantized/tiny-llama/v1.2-int4-gptq-g128-asym".to_string(),
            quantization: quant(Method::Gptq, 4),
            serving: ServingSpec {
                max_model_len: 2048,
                gpu_memory_utilization: 0.92,
                tensor_parallel_size: 2,
                ..ServingSpec::default()
            },
            canary: Some(CanarySpec {
                steps: vec![
                    CanaryStep {
                        weight: 10,
                        pause: Some("5m".to_string()),
                    },
                    CanaryStep {
                        weight: 50,
                        pause: None,
                    },
                    CanaryStep {
                        weight: 80,
                        pause: Some("600".to_string()),
                    },
                ],
            }),
            card: "---\nbase_model: example/tiny-llama\n---\n# card\n".to_string(),
            quality_threshold: 0.85,
        }
    }

    fn file<'a>(folder: &'a RenderedFolder, path: &str) -> &'a str {
        &folder
            .files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{path} missing"))
            .content
    }

    fn paths(folder: &RenderedFolder) -> Vec<&str> {
        folder.files.iter().map(|f| f.path.as_str()).collect()
    }

    fn arg_after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let i = args.iter().position(|a| a == flag).expect(flag);
        &args[i + 1]
    }

    #[test]
    fn test_folder_has_deployment_service_kustomization_card() {
        let settings = ServingSettings::default();
        let folder = render_serving_folder(&inputs(Environment::Test), &settings).expect("render");
        assert_eq!(folder.dir, "envs/test/tiny-llama");
        assert_eq!(
            paths(&folder),
            [
                "README.md",
                "deployment.yaml",
                "kustomization.yaml",
                "service.yaml"
            ]
        );
        assert_eq!(
            file(&folder, "README.md"),
            "---\nbase_model: example/tiny-llama\n---\n# card\n"
        );

        let d: Deployment = serde_yaml::from_str(file(&folder, "deployment.yaml")).expect("parse");
        assert_eq!(d.metadata.name.as_deref(), Some("tiny-llama"));
        let spec = d.spec.expect("spec");
        let pod = spec.template.spec.expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("vllm/vllm-openai:v0.11.0"));
        let args = c.args.clone().expect("args");
        assert_eq!(
            arg_after(&args, "--model"),
            "/models/quantized/tiny-llama/v1.2-int4-gptq-g128-asym"
        );
        assert_eq!(arg_after(&args, "--served-model-name"), "tiny-llama");
        assert_eq!(arg_after(&args, "--quantization"), "compressed-tensors");
        assert_eq!(arg_after(&args, "--max-model-len"), "2048");
        assert_eq!(arg_after(&args, "--gpu-memory-utilization"), "0.92");
        assert_eq!(arg_after(&args, "--tensor-parallel-size"), "2");
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone());
        assert_eq!(
            limits.and_then(|l| l.get("nvidia.com/gpu").cloned()),
            Some(Quantity("2".to_string()))
        );
        let ready = c.readiness_probe.as_ref().and_then(|p| p.http_get.clone());
        let ready = ready.expect("readiness http");
        assert_eq!(ready.path.as_deref(), Some("/health"));
        assert_eq!(ready.port, IntOrString::String("http".to_string()));
        assert_eq!(c.ports.as_ref().expect("ports")[0].container_port, 8000);
        let startup = c.startup_probe.as_ref().and_then(|p| p.exec.clone());
        let script = startup.and_then(|e| e.command).expect("startup exec")[2].clone();
        assert!(script.contains("/v1/completions"), "{script}");
        assert!(script.contains(r#"\"max_tokens\":1"#), "{script}");
        assert!(script.contains(r#"\"model\":\"tiny-llama\""#), "{script}");
        // Selectors never carry the variant.
        let selector = spec.selector.match_labels.expect("selector");
        assert!(!selector.contains_key(VARIANT_LABEL));
        assert_eq!(
            selector.get(ENVIRONMENT_LABEL).map(String::as_str),
            Some("test")
        );

        let s: Service = serde_yaml::from_str(file(&folder, "service.yaml")).expect("parse");
        let port = &s.spec.expect("spec").ports.expect("ports")[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8000));

        let k: Value = serde_yaml::from_str(file(&folder, "kustomization.yaml")).expect("parse");
        assert_eq!(k["namespace"], "test");
        assert_eq!(k["resources"], json!(["deployment.yaml", "service.yaml"]));
        assert_eq!(k["labels"][0]["pairs"][MODEL_LABEL], "tiny-llama");
        assert_eq!(k["labels"][0]["pairs"][NAME_LABEL], "tiny-llama");
        assert_eq!(k["labels"][0]["pairs"][ENVIRONMENT_LABEL], "test");
        assert_eq!(
            k["labels"][1]["pairs"][VARIANT_LABEL],
            "tiny-llama-v1.2-int4-gptq-g128-asym"
        );
        assert_eq!(k["labels"][1]["includeSelectors"], false);
    }

    #[test]
    fn prod_has_rollout_and_analysis_and_no_deployment() {
        let settings = ServingSettings::default();
        let folder = render_serving_folder(&inputs(Environment::Prod), &settings).expect("render");
        assert_eq!(folder.dir, "envs/prod/tiny-llama");
        assert_eq!(
            paths(&folder),
            [
                "README.md",
                "analysistemplate.yaml",
                "kustomization.yaml",
                "rollout.yaml",
                "service.yaml"
            ]
        );
        let r: Value = serde_yaml::from_str(file(&folder, "rollout.yaml")).expect("parse");
        assert_eq!(r["apiVersion"], "argoproj.io/v1alpha1");
        assert_eq!(r["kind"], "Rollout");
        let c = &r["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        assert!(
            c["args"]
                .as_array()
                .expect("args")
                .contains(&json!("compressed-tensors"))
        );
        let canary = &r["spec"]["strategy"]["canary"];
        assert_eq!(
            canary["analysis"]["templates"][0]["templateName"],
            "tiny-llama-canary"
        );
        assert_eq!(
            canary["analysis"]["args"][3]["valueFrom"]["podTemplateHashValue"],
            "Latest"
        );

        let a: Value = serde_yaml::from_str(file(&folder, "analysistemplate.yaml")).expect("parse");
        assert_eq!(a["kind"], "AnalysisTemplate");
        assert_eq!(a["metadata"]["name"], "tiny-llama-canary");
        let metrics = a["spec"]["metrics"].as_array().expect("metrics");
        let names: Vec<&str> = metrics.iter().filter_map(|m| m["name"].as_str()).collect();
        assert_eq!(names, ["error-rate", "latency-p95", "quality-score"]);
        for m in metrics {
            let p = &m["provider"]["prometheus"];
            assert_eq!(
                p["address"],
                "http://prometheus-operated.monitoring.svc:9090"
            );
            assert!(p["query"].as_str().expect("query").contains("{{args."));
        }
        let q = |i: usize| {
            metrics[i]["provider"]["prometheus"]["query"]
                .as_str()
                .expect("q")
        };
        assert!(q(0).contains("vllm:request_success_total"));
        assert!(q(1).contains("vllm:e2e_request_latency_seconds_bucket"));
        assert_eq!(
            q(2),
            "min(quantops_quality_score{model=\"{{args.model-name}}\",environment=\"prod\",variant=\"{{args.variant}}\"})"
        );
        // The promotion's spec.quality.threshold, not a setting.
        assert_eq!(
            metrics[2]["successCondition"],
            "len(result) > 0 && result[0] >= 0.85"
        );
        assert_eq!(
            metrics[2]["failureCondition"],
            "len(result) > 0 && result[0] < 0.85"
        );
        assert_eq!(metrics[2]["initialDelay"], "6m");
        assert!(metrics[0].get("initialDelay").is_none());
        // The variant arg is the variant as the probe and the operator label it.
        assert_eq!(
            canary["analysis"]["args"][2]["value"],
            "tiny-llama-v1.2-int4-gptq-g128-asym"
        );

        let k: Value = serde_yaml::from_str(file(&folder, "kustomization.yaml")).expect("parse");
        assert_eq!(
            k["resources"],
            json!(["analysistemplate.yaml", "rollout.yaml", "service.yaml"])
        );
        assert_eq!(k["namespace"], "prod");
    }

    #[test]
    fn canary_steps_map_to_weights_and_pauses() {
        let settings = ServingSettings::default();
        let folder = render_serving_folder(&inputs(Environment::Prod), &settings).expect("render");
        let r: Value = serde_yaml::from_str(file(&folder, "rollout.yaml")).expect("parse");
        assert_eq!(
            r["spec"]["strategy"]["canary"]["steps"],
            json!([
                { "setWeight": 10 },
                { "pause": { "duration": "5m" } },
                { "setWeight": 50 },
                { "setWeight": 80 },
                { "pause": { "duration": "600" } },
            ])
        );
        // No steps in the spec: the settings' default canary.
        let mut no_canary = inputs(Environment::Prod);
        no_canary.canary = None;
        let folder = render_serving_folder(&no_canary, &settings).expect("render");
        let r: Value = serde_yaml::from_str(file(&folder, "rollout.yaml")).expect("parse");
        assert_eq!(
            r["spec"]["strategy"]["canary"]["steps"],
            json!([
                { "setWeight": 10 },
                { "pause": { "duration": "5m" } },
                { "setWeight": 50 },
                { "pause": { "duration": "10m" } },
            ])
        );
    }

    #[test]
    fn bad_canary_steps_are_refused() {
        let settings = ServingSettings::default();
        let mut i = inputs(Environment::Prod);
        i.canary = Some(CanarySpec {
            steps: vec![CanaryStep {
                weight: 10,
                pause: Some("five minutes".to_string()),
            }],
        });
        let err = render_serving_folder(&i, &settings).expect_err("bad pause");
        assert!(
            err.to_string().contains("spec.canary.steps[0].pause"),
            "{err}"
        );
        i.canary = Some(CanarySpec {
            steps: vec![CanaryStep {
                weight: 0,
                pause: None,
            }],
        });
        let err = render_serving_folder(&i, &settings).expect_err("bad weight");
        assert!(err.to_string().contains("weight"), "{err}");
    }

    #[test]
    fn quantization_arg_per_method() {
        for (method, bits) in [
            (Method::Rtn, 4),
            (Method::Gptq, 4),
            (Method::Awq, 4),
            (Method::Gptq, 8),
            (Method::Int8, 8),
            (Method::Fp8, 8),
        ] {
            assert_eq!(
                quantization_arg(&quant(method, bits)).expect("servable"),
                "compressed-tensors",
                "{method} {bits}"
            );
        }
        for (method, bits) in [(Method::Rtn, 2), (Method::Gptq, 3)] {
            let err = quantization_arg(&quant(method, bits)).expect_err("unservable");
            assert!(matches!(err, RenderError::UnservableRecipe { .. }));
        }
        let mut i = inputs(Environment::Test);
        i.quantization = quant(Method::Rtn, 3);
        assert!(render_serving_folder(&i, &ServingSettings::default()).is_err());
        i.quantization = quant(Method::Fp8, 8);
        let folder = render_serving_folder(&i, &ServingSettings::default()).expect("render");
        let d: Deployment = serde_yaml::from_str(file(&folder, "deployment.yaml")).expect("parse");
        let args = d
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod")
            .containers[0]
            .args
            .clone()
            .expect("args");
        assert_eq!(arg_after(&args, "--quantization"), "compressed-tensors");
    }

    #[test]
    fn rendering_is_deterministic() {
        let settings = ServingSettings::default();
        for env in [
            Environment::Experiment,
            Environment::Test,
            Environment::Prod,
        ] {
            let a = render_serving_folder(&inputs(env), &settings).expect("render");
            let b = render_serving_folder(&inputs(env), &settings.clone()).expect("render");
            assert_eq!(a, b);
        }
        let mut other = inputs(Environment::Test);
        other.variant = "tiny-llama-v1.3-int4-gptq-g128-asym".to_string();
        let a = render_serving_folder(&inputs(Environment::Test), &settings).expect("render");
        let b = render_serving_folder(&other, &settings).expect("render");
        assert_ne!(a, b);
    }

    #[test]
    fn other_runtimes_and_bad_values_are_refused() {
        let settings = ServingSettings::default();
        let mut i = inputs(Environment::Test);
        i.serving.runtime = "tgi".to_string();
        assert!(matches!(
            render_serving_folder(&i, &settings),
            Err(RenderError::UnsupportedRuntime(_))
        ));
        let mut i = inputs(Environment::Test);
        i.serving.gpu_memory_utilization = 1.5;
        assert!(render_serving_folder(&i, &settings).is_err());
        let mut i = inputs(Environment::Test);
        i.artifact_path = "../etc".to_string();
        assert!(render_serving_folder(&i, &settings).is_err());
    }

    #[test]
    fn absolute_artifact_paths_are_used_as_they_are() {
        let mut i = inputs(Environment::Test);
        i.artifact_path = "/mnt/models/x/".to_string();
        let d = deployment(&i, &ServingSettings::default()).expect("deployment");
        let args = d
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod")
            .containers[0]
            .args
            .clone()
            .expect("args");
        assert_eq!(arg_after(&args, "--model"), "/mnt/models/x");
    }

    #[test]
    fn the_service_url_names_the_rendered_service() {
        let i = inputs(Environment::Test);
        let s = service(&i);
        let url = service_url(&i.model, &i.namespace);
        assert_eq!(url, "http://tiny-llama.test.svc:8000");
        let name = s.metadata.name.expect("name");
        let port = s.spec.and_then(|s| s.ports).expect("ports")[0].port;
        assert_eq!(url, format!("http://{name}.{}.svc:{port}", i.namespace));
        assert_eq!(
            service_url("Llama_3.2", "prod"),
            "http://llama-3-2.prod.svc:8000"
        );
    }

    #[test]
    fn a_quality_threshold_outside_zero_to_one_is_refused() {
        let mut i = inputs(Environment::Prod);
        i.quality_threshold = 1.5;
        let err = render_serving_folder(&i, &ServingSettings::default()).expect_err("refused");
        assert!(err.to_string().contains("spec.quality.threshold"), "{err}");
    }

    #[test]
    fn names_and_labels_are_valid() {
        assert_eq!(resource_name("llama-3.2-3b"), "llama-3-2-3b");
        assert_eq!(resource_name("3b_Model"), "m-3b-model");
        let long = "x".repeat(80);
        let n = resource_name(&long);
        assert_eq!(n.len(), 63);
        assert_ne!(n, resource_name(&"x".repeat(81)));
        assert_eq!(label_value("tiny-llama-v1.2"), "tiny-llama-v1.2");
        assert_eq!(label_value("/a b/"), "a-b");
        assert!(label_value(&"v.".repeat(50)).len() <= 63);
        assert!(is_argo_duration("5m") && is_argo_duration("30") && is_argo_duration("1h"));
        assert!(!is_argo_duration("5mm") && !is_argo_duration("m") && !is_argo_duration("1d"));
    }
}
