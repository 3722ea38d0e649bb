//! Rendering of a stage's Job and the ConfigMap carrying its spec. Pure
//! functions of the QuantizedModel, the stage and the settings, so the names
//! are deterministic: a restarted operator computes the same name, finds the
//! Job it created before and adopts it instead of starting a second.

use crate::config::JobSettings;
use crate::pipeline::{self, Stage};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EnvVar, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use quantops_api::QuantizedModel;
use quantops_api::quantized_model::ResourcesSpec;
use std::collections::BTreeMap;

/// Where the spec ConfigMap is mounted in the worker's pod.
pub const SPEC_DIR: &str = "/etc/quantops";
/// The spec file inside [`SPEC_DIR`].
pub const SPEC_FILE: &str = "spec.yaml";
/// Where the model volume is mounted in the worker's pod.
pub const MODEL_DIR: &str = "/models";
/// Label naming the QuantizedModel a Job belongs to.
pub const MODEL_LABEL: &str = "quantops.dev/model";
/// Label naming the stage a Job runs.
pub const STAGE_LABEL: &str = "quantops.dev/stage";
/// Label carrying the stage hash the Job was rendered for.
pub const HASH_LABEL: &str = "quantops.dev/spec-hash";
/// The GPU extended resource of the NVIDIA device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Why a Job could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("QuantizedModel {0} has no uid yet, so it cannot own a Job")]
    NoUid(String),
    #[error("QuantizedModel {0} has no namespace")]
    NoNamespace(String),
    #[error("cannot render the spec of QuantizedModel {name} as YAML: {source}")]
    Spec {
        name: String,
        source: serde_yaml::Error,
    },
    /// A spec value that no Job can carry: the user's to fix, reported in
    /// status (`Ready=False`, reason `InvalidSpec`) rather than retried.
    #[error("{field}: {problem}")]
    InvalidField {
        field: &'static str,
        problem: String,
    },
}

/// Whether `text` is a Kubernetes quantity (`<number><suffix>`: `64Gi`,
/// `500m`, `1.5`, `2e3`), and if so whether it is negative; the grammar of
/// apimachinery's `resource.ParseQuantity`, checked here so that a bad value
/// is named by its spec field instead of failing the Job's creation.
fn quantity_sign(text: &str) -> Option<bool> {
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return None;
    }
    let valid_suffix = match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())),
    };
    let zero = number.chars().all(|c| c == '0' || c == '.');
    valid_suffix.then_some(negative && !zero)
}

/// A resource request from the spec as a Quantity, or the error naming
/// `field`. The value is quoted (cut short): it is the user's own input.
fn request(field: &'static str, value: &str) -> Result<Quantity, RenderError> {
    let quoted: String = format!("{value:?}").chars().take(66).collect();
    match quantity_sign(value.trim()) {
        Some(false) => Ok(Quantity(value.trim().to_string())),
        Some(true) => Err(RenderError::InvalidField {
            field,
            problem: format!("{quoted} is negative; a resource request is at least 0"),
        }),
        None => Err(RenderError::InvalidField {
            field,
            problem: format!("{quoted} is not a Kubernetes quantity (such as 64Gi, 500m or 4)"),
        }),
    }
}

/// The worker container's requests and limits from `spec.resources`: GPUs
/// (an extended resource, so requests equal limits), memory (request and
/// limit) and CPU (request only). The one place those values are checked.
pub fn resource_requirements(
    resources: &ResourcesSpec,
) -> Result<ResourceRequirements, RenderError> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if resources.gpus > 0 {
        let gpus = Quantity(resources.gpus.to_string());
        requests.insert(GPU_RESOURCE.to_string(), gpus.clone());
        limits.insert(GPU_RESOURCE.to_string(), gpus);
    }
    if let Some(memory) = &resources.memory {
        let memory = request("spec.resources.memory", memory)?;
        requests.insert("memory".to_string(), memory.clone());
        limits.insert("memory".to_string(), memory);
    }
    if let Some(cpu) = &resources.cpu {
        requests.insert("cpu".to_string(), request("spec.resources.cpu", cpu)?);
    }
    Ok(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

/// Longest name of a Job (and of a label value).
const MAX_NAME: usize = 63;

/// `{qm}-{stage}-{hash}`, at most 63 characters. The hash covers the model's
/// full name and the stage hash, so two models whose names share a cut
/// prefix still get different Jobs.
pub fn job_name(model: &str, stage: Stage, stage_hash: &str) -> String {
    let hash = pipeline::short_hash(&format!("{model}/{stage}/{stage_hash}"), 8);
    let suffix = format!("-{stage}-{hash}");
    format!("{}{suffix}", truncated(model, MAX_NAME - suffix.len()))
}

/// A label-safe form of a model name: itself when short enough, otherwise cut
/// and made unique with a hash.
pub fn model_label(model: &str) -> String {
    if model.len() <= MAX_NAME {
        return model.to_string();
    }
    let hash = pipeline::short_hash(model, 8);
    format!("{}-{hash}", truncated(model, MAX_NAME - 9))
}

/// `{base}{suffix}` when it fits in `max` bytes; otherwise `base` cut, a
/// hash of the whole of it, then `suffix`, so that names cut to the same
/// prefix stay distinct.
pub fn bounded_name(base: &str, suffix: &str, max: usize) -> String {
    if base.len() + suffix.len() <= max {
        return format!("{base}{suffix}");
    }
    let hash = pipeline::short_hash(base, 8);
    let room = max.saturating_sub(suffix.len() + hash.len() + 1);
    format!("{}-{hash}{suffix}", truncated(base, room))
}

/// Cuts a DNS-1123 name to `max` bytes without leaving a trailing `-` or `.`.
fn truncated(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].trim_end_matches(['-', '.'])
}

/// The labels of every object rendered for a stage.
pub fn labels(model: &str, stage: Stage, stage_hash: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "quantops".to_string(),
        ),
        (
            "app.kubernetes.io/name".to_string(),
            "quantizer-job".to_string(),
        ),
        (MODEL_LABEL.to_string(), model_label(model)),
        (STAGE_LABEL.to_string(), stage.name().to_string()),
        (HASH_LABEL.to_string(), stage_hash.to_string()),
    ])
}

/// Metadata shared by the Job and its ConfigMap: name, namespace, labels and
/// the controller owner reference that ties them to the QuantizedModel (and
/// lets Kubernetes delete them with it).
fn owned_meta(
    qm: &QuantizedModel,
    stage: Stage,
    stage_hash: &str,
) -> Result<ObjectMeta, RenderError> {
    let name = qm.name_any();
    let namespace = qm
        .namespace()
        .ok_or_else(|| RenderError::NoNamespace(name.clone()))?;
    let owner = qm
        .controller_owner_ref(&())
        .ok_or_else(|| RenderError::NoUid(name.clone()))?;
    Ok(ObjectMeta {
        name: Some(job_name(&name, stage, stage_hash)),
        namespace: Some(namespace),
        labels: Some(labels(&name, stage, stage_hash)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// The QuantizedModel as the worker reads it: apiVersion, kind, name and
/// spec, without status or server-managed metadata.
pub fn spec_yaml(qm: &QuantizedModel) -> Result<String, serde_yaml::Error> {
    let mut clean = QuantizedModel::new(&qm.name_any(), qm.spec.clone());
    clean.metadata.namespace = qm.namespace();
    serde_yaml::to_string(&clean)
}

/// The ConfigMap holding the spec a stage's Job runs with; named like the Job.
pub fn render_config_map(qm: &QuantizedModel, stage: Stage) -> Result<ConfigMap, RenderError> {
    let hash = pipeline::stage_hash(&qm.spec, stage);
    let yaml = spec_yaml(qm).map_err(|source| RenderError::Spec {
        name: qm.name_any(),
        source,
    })?;
    Ok(ConfigMap {
        metadata: owned_meta(qm, stage, &hash)?,
        data: Some(BTreeMap::from([(SPEC_FILE.to_string(), yaml)])),
        ..ConfigMap::default()
    })
}

/// The Job running one stage of the worker for `qm`.
pub fn render_job(
    qm: &QuantizedModel,
    stage: Stage,
    settings: &JobSettings,
) -> Result<Job, RenderError> {
    let hash = pipeline::stage_hash(&qm.spec, stage);
    let metadata = owned_meta(qm, stage, &hash)?;
    let config_map = metadata.name.clone();
    let pod_labels = labels(&qm.name_any(), stage, &hash);

    let resources = &qm.spec.resources;
    let requirements = resource_requirements(resources)?;
    let tolerations = (resources.gpus > 0).then(|| {
        vec![Toleration {
            key: Some(GPU_RESOURCE.to_string()),
            operator: Some("Exists".to_string()),
            effect: Some("NoSchedule".to_string()),
            ..Toleration::default()
        }]
    });

    let command = vec![
        "quantizer-job".to_string(),
        stage.name().to_string(),
        "--spec".to_string(),
        format!("{SPEC_DIR}/{SPEC_FILE}"),
        "--root".to_string(),
        MODEL_DIR.to_string(),
    ];
    let spec_volume = Volume {
        name: "spec".to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map.unwrap_or_default(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    };
    let spec_mount = VolumeMount {
        name: "spec".to_string(),
        mount_path: SPEC_DIR.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let pod = WorkerPod {
        labels: pod_labels,
        command,
        resources: requirements,
        tolerations,
        extra_volumes: vec![(spec_volume, spec_mount)],
        model_volume_read_only: false,
    };

    Ok(Job {
        metadata,
        spec: Some(JobSpec {
            // The operator retries broken stages itself, with its own backoff.
            backoff_limit: Some(0),
            template: worker_pod_template(pod, settings),
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// What differs between the pods that run the worker (a pipeline stage, a
/// quality probe); [`worker_pod_template`] adds what they share.
#[derive(Clone, Debug, Default)]
pub struct WorkerPod {
    pub labels: BTreeMap<String, String>,
    /// The container's command, `quantizer-job <subcommand> ...`.
    pub command: Vec<String>,
    pub resources: ResourceRequirements,
    pub tolerations: Option<Vec<Toleration>>,
    /// Volumes besides the model volume, with their mounts in the container.
    pub extra_volumes: Vec<(Volume, VolumeMount)>,
    /// A probe only reads the suite; a stage writes its artifacts.
    pub model_volume_read_only: bool,
}

/// The pod every worker run gets: one container named
/// [`crate::k8s::WORKER_CONTAINER`] running the worker image, JSON logs, the
/// termination message (with the log tail as fallback, so a crash still
/// explains itself) that the operator reads back, the model volume at
/// [`MODEL_DIR`], the worker's node selector and service account, and no
/// restarts (the operator, or the CronJob's next run, retries).
pub fn worker_pod_template(pod: WorkerPod, settings: &JobSettings) -> PodTemplateSpec {
    let mut volume_mounts: Vec<VolumeMount> = Vec::new();
    let mut volumes: Vec<Volume> = Vec::new();
    for (volume, mount) in pod.extra_volumes {
        volumes.push(volume);
        volume_mounts.push(mount);
    }
    volume_mounts.push(VolumeMount {
        name: "models".to_string(),
        mount_path: MODEL_DIR.to_string(),
        read_only: pod.model_volume_read_only.then_some(true),
        ..VolumeMount::default()
    });
    volumes.push(Volume {
        name: "models".to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: settings.model_claim.clone(),
            read_only: Some(pod.model_volume_read_only),
        }),
        ..Volume::default()
    });
    let container = Container {
        name: crate::k8s::WORKER_CONTAINER.to_string(),
        image: Some(settings.image.clone()),
        command: Some(pod.command),
        env: Some(vec![EnvVar {
            name: "QUANTOPS_LOG_FORMAT".to_string(),
            value: Some("json".to_string()),
            ..EnvVar::default()
        }]),
        resources: Some(pod.resources),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod.labels),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_string()),
            containers: vec![container],
            node_selector: (!settings.node_selector.is_empty())
                .then(|| settings.node_selector.clone()),
            tolerations: pod.tolerations,
            service_account_name: settings.service_account.clone(),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}
