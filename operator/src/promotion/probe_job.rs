//! Rendering of a promotion's quality probe: the `CronJob` that runs
//! `quantizer-job probe` against the environment's endpoint on
//! `spec.quality.schedule`, and the resolution of its inputs (defaults,
//! validation naming the field at fault).
//!
//! The CronJob lives in the promotion's namespace, beside the pipeline Jobs,
//! because the model volume (the prompt suite) is there; its pod is the
//! pipeline's worker pod ([`crate::job::worker_pod_template`]) with the model
//! volume read-only and no GPU. It is owned by the promotion, so deleting the
//! promotion deletes it and, through the CronJob, its Jobs.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use quantops_api::{ModelPromotion, QualitySpec, QuantizedModel};

use super::PromotionSettings;
use crate::config::JobSettings;
use crate::gitops::render::{ENVIRONMENT_LABEL, service_url};
use crate::job::{self, MODEL_DIR, WorkerPod};

/// Label naming the promotion a probe CronJob, Job and pod belong to (its
/// label-safe form: see [`PROMOTION_ANNOTATION`] for the exact name).
pub const PROMOTION_LABEL: &str = "quantops.dev/promotion";
/// Annotation carrying the promotion's exact name, which a label value may
/// not hold (names are longer than 63 characters at times).
pub const PROMOTION_ANNOTATION: &str = "quantops.dev/promotion";
/// The component label value of everything the probe runs.
pub const COMPONENT: &str = "quality-probe";
/// The label selector of every probe Job, for the promotion controller's watch.
pub const PROBE_JOB_SELECTOR: &str =
    "app.kubernetes.io/managed-by=quantops,app.kubernetes.io/component=quality-probe";
/// The termination-message file the probe writes its result to.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// A CronJob's name is at most 52 characters: its Jobs add an 11-character
/// suffix and must stay within 63.
const MAX_CRONJOB_NAME: usize = 52;
/// A probe that hangs must not hold back the next runs (the CronJob forbids
/// concurrent runs).
const PROBE_DEADLINE_SECONDS: i64 = 600;

/// Why the probe cannot be scheduled; each names the field to fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidQuality {
    #[error("spec.quality.schedule: {schedule:?} is not a cron schedule: {reason}")]
    Schedule { schedule: String, reason: String },
    #[error(
        "spec.quality.suite: no prompt suite: set spec.quality.suite, or spec.validation.systemTests.path on QuantizedModel {model}"
    )]
    NoSuite { model: String },
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
}

/// Everything one probe run needs, defaults resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeInputs {
    pub schedule: String,
    /// The OpenAI-compatible base URL asked.
    pub endpoint: String,
    /// The served model name (`--served-model-name` of the serving pods).
    pub model: String,
    pub variant: String,
    pub environment: String,
    /// The prompt suite, relative to the model volume's root.
    pub suite: String,
    pub threshold: f64,
    pub window: u32,
}

/// Resolves `spec.quality` against its defaults: the suite from the model's
/// system tests, the endpoint from the Service the promotion committed
/// (named by [`service_url`], the renderer's own naming).
pub fn probe_inputs(
    mp: &ModelPromotion,
    qm: &QuantizedModel,
    model: &str,
    variant: &str,
    settings: &PromotionSettings,
) -> Result<ProbeInputs, InvalidQuality> {
    let quality: QualitySpec = mp.spec.quality.clone().unwrap_or_default();
    validate_schedule(&quality.schedule).map_err(|reason| InvalidQuality::Schedule {
        schedule: quality.schedule.clone(),
        reason,
    })?;
    if !(0.0..=1.0).contains(&quality.threshold) {
        return Err(InvalidQuality::Field {
            field: "spec.quality.threshold",
            reason: format!("{} is not in [0, 1]", quality.threshold),
        });
    }
    if quality.window == 0 {
        return Err(InvalidQuality::Field {
            field: "spec.quality.window",
            reason: "must be at least 1".to_string(),
        });
    }
    let suite = quality
        .suite
        .clone()
        .or_else(|| {
            let tests = qm.spec.validation.system_tests.as_ref()?;
            Some(tests.path.clone())
        })
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| InvalidQuality::NoSuite {
            model: qm.name_any(),
        })?;
    if suite.starts_with('/') || suite.split('/').any(|segment| segment == "..") {
        return Err(InvalidQuality::Field {
            field: "spec.quality.suite",
            reason: format!("{suite:?} must be a path inside the model volume"),
        });
    }
    let environment = mp.spec.environment;
    let endpoint = match &quality.endpoint {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => url.clone(),
        Some(url) => {
            return Err(InvalidQuality::Field {
                field: "spec.quality.endpoint",
                reason: format!("{url:?} is not an http:// or https:// URL"),
            });
        }
        None => service_url(model, &settings.namespace_for(environment)),
    };
    Ok(ProbeInputs {
        schedule: quality.schedule,
        endpoint,
        model: model.to_string(),
        variant: variant.to_string(),
        environment: environment.as_str().to_string(),
        suite,
        threshold: quality.threshold,
        window: quality.window,
    })
}

/// The CronJob of a promotion: `{promotion}-quality`, cut to fit.
pub fn cronjob_name(promotion: &str) -> String {
    job::bounded_name(promotion, "-quality", MAX_CRONJOB_NAME)
}

/// The labels of the CronJob, its Jobs and their pods.
pub fn labels(promotion: &str, environment: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "quantops".to_string(),
        ),
        (
            "app.kubernetes.io/name".to_string(),
            "quantizer-job".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            COMPONENT.to_string(),
        ),
        (PROMOTION_LABEL.to_string(), job::model_label(promotion)),
        (ENVIRONMENT_LABEL.to_string(), environment.to_string()),
    ])
}

/// The promotion a probe Job belongs to, from its annotation (what the
/// controller's Job watch maps events with).
pub fn promotion_of(job: &Job) -> Option<ObjectRef<ModelPromotion>> {
    let name = job.annotations().get(PROMOTION_ANNOTATION)?;
    let namespace = job.namespace()?;
    Some(ObjectRef::new(name).within(&namespace))
}

/// The probe's command line (the contract of `quantizer-job probe`).
pub fn probe_command(inputs: &ProbeInputs) -> Vec<String> {
    [
        "quantizer-job",
        "probe",
        "--endpoint",
        &inputs.endpoint,
        "--model",
        &inputs.model,
        "--suite",
        &inputs.suite,
        "--root",
        MODEL_DIR,
        "--variant",
        &inputs.variant,
        "--environment",
        &inputs.environment,
        "--threshold",
        &inputs.threshold.to_string(),
        "--window",
        &inputs.window.to_string(),
        "--termination-log",
        TERMINATION_LOG,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Why a CronJob could not be rendered (the promotion is not stored yet).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("ModelPromotion {0} has no uid or namespace yet, so it cannot own a CronJob")]
    NotStored(String),
}

/// The probe CronJob of `mp`.
pub fn render_cronjob(
    mp: &ModelPromotion,
    inputs: &ProbeInputs,
    settings: &JobSettings,
) -> Result<CronJob, RenderError> {
    let promotion = mp.name_any();
    let not_stored = || RenderError::NotStored(promotion.clone());
    let namespace = mp.namespace().ok_or_else(not_stored)?;
    let owner = mp.controller_owner_ref(&()).ok_or_else(not_stored)?;
    let labels = labels(&promotion, &inputs.environment);
    let annotations = BTreeMap::from([(PROMOTION_ANNOTATION.to_string(), promotion.clone())]);
    // A probe is an HTTP client: a little CPU and memory, no GPU.
    let requests = BTreeMap::from([
        ("cpu".to_string(), Quantity("100m".to_string())),
        ("memory".to_string(), Quantity("128Mi".to_string())),
    ]);
    let pod = WorkerPod {
        labels: labels.clone(),
        command: probe_command(inputs),
        resources: ResourceRequirements {
            requests: Some(requests),
            ..ResourceRequirements::default()
        },
        tolerations: None,
        extra_volumes: Vec::new(),
        model_volume_read_only: true,
    };
    Ok(CronJob {
        metadata: ObjectMeta {
            name: Some(cronjob_name(&promotion)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(CronJobSpec {
            schedule: inputs.schedule.clone(),
            // One probe at a time; a missed run is skipped, not made up
            // in a burst after an outage.
            concurrency_policy: Some("Forbid".to_string()),
            starting_deadline_seconds: Some(120),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(1),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(JobSpec {
                    // The next scheduled run is the retry.
                    backoff_limit: Some(0),
                    active_deadline_seconds: Some(PROBE_DEADLINE_SECONDS),
                    template: job::worker_pod_template(pod, settings),
                    ..JobSpec::default()
                }),
            },
            ..CronJobSpec::default()
        }),
        status: None,
    })
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const DESCRIPTORS: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// Checks a schedule the way a CronJob reads it (five fields: minute,
/// hour, day of month, month, day of week; `*`, `?`, lists, ranges, steps,
/// month and day names; or a descriptor such as `@hourly`), so that a typo
/// becomes a condition naming the field instead of an API error on apply.
pub fn validate_schedule(schedule: &str) -> Result<(), String> {
    let schedule = schedule.trim();
    if schedule.starts_with("TZ=") || schedule.starts_with("CRON_TZ=") {
        return Err("time zones in the schedule are not supported by CronJobs".to_string());
    }
    if schedule.starts_with('@') {
        return if DESCRIPTORS.contains(&schedule) {
            Ok(())
        } else {
            Err(format!("unknown descriptor {schedule}"))
        };
    }
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("expected 5 fields, found {}", fields.len()));
    }
    let specs: [(&str, u32, u32, &[&str], u32); 5] = [
        ("minute", 0, 59, &[], 0),
        ("hour", 0, 23, &[], 0),
        ("day of month", 1, 31, &[], 0),
        ("month", 1, 12, &MONTHS, 1),
        ("day of week", 0, 6, &DAYS, 0),
    ];
    for (field, (name, min, max, names, first)) in fields.iter().zip(specs) {
        for item in field.split(',') {
            check_item(
                item,
                min,
                max,
                names,
                first,
                name == "day of month" || name == "day of week",
            )
            .map_err(|reason| format!("{name} {item:?}: {reason}"))?;
        }
    }
    Ok(())
}

fn check_item(
    item: &str,
    min: u32,
    max: u32,
    names: &[&str],
    first: u32,
    question_mark: bool,
) -> Result<(), String> {
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        match step.parse::<u32>() {
            Ok(n) if n >= 1 => {}
            _ => return Err(format!("step {step:?} is not a positive number")),
        }
    }
    if range == "*" || (question_mark && range == "?") {
        return Ok(());
    }
    let value = |v: &str| -> Result<u32, String> {
        let n = match v.parse::<u32>() {
            Ok(n) => n,
            Err(_) => names
                .iter()
                .position(|name| name.eq_ignore_ascii_case(v))
                .and_then(|i| u32::try_from(i).ok())
                .map(|i| i + first)
                .ok_or_else(|| format!("{v:?} is not a number"))?,
        };
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is outside {min}-{max}"))
        }
    };
    match range.split_once('-') {
        Some((low, high)) => {
            let (low, high) = (value(low)?, value(high)?);
            if low > high {
                return Err(format!("range {low}-{high} runs backwards"));
            }
        }
        None => {
            value(range)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promotion(quality: &str) -> ModelPromotion {
        let yaml = format!(
            "apiVersion: quantops.dev/v1alpha1\nkind: ModelPromotion\nmetadata: {{name: tiny-prod, namespace: experiment, uid: uid-1}}\nspec:\n  modelRef: {{name: tiny}}\n  environment: prod\n  gitops: {{url: 'https://git.example/r.git'}}\n{quality}"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn model(system_tests: bool) -> QuantizedModel {
        let tests = if system_tests {
            "\n  validation: {systemTests: {path: data/system-tests.yaml}}"
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {{name: tiny, namespace: experiment}}\nspec:\n  baseModel: {{name: example/tiny-llama, path: tiny-llama}}\n  version: v1\n  quantization: {{method: rtn, bits: 4}}{tests}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn inputs(mp: &ModelPromotion, qm: &QuantizedModel) -> Result<ProbeInputs, InvalidQuality> {
        probe_inputs(
            mp,
            qm,
            "tiny-llama",
            "tiny-v1",
            &PromotionSettings::default(),
        )
    }

    #[test]
    fn defaults_come_from_the_model_and_the_rendered_service() {
        let i = inputs(&promotion(""), &model(true)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(i.schedule, "*/5 * * * *");
        assert_eq!(i.endpoint, "http://tiny-llama.prod.svc:8000");
        assert_eq!(i.suite, "data/system-tests.yaml");
        assert_eq!((i.threshold, i.window), (0.8, 5));
        assert_eq!(i.environment, "prod");
    }

    #[test]
    fn overrides_win_and_bad_inputs_name_their_field() {
        let mp = promotion(
            "  quality: {schedule: '0 * * * *', suite: probes/p.yaml, endpoint: 'http://gw:8080', threshold: 0.9, window: 3}\n",
        );
        let i = inputs(&mp, &model(false)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (i.schedule.as_str(), i.suite.as_str(), i.endpoint.as_str()),
            ("0 * * * *", "probes/p.yaml", "http://gw:8080")
        );
        let no_suite = inputs(&promotion(""), &model(false)).expect_err("no suite");
        assert!(
            no_suite.to_string().starts_with("spec.quality.suite"),
            "{no_suite}"
        );
        let cron = inputs(
            &promotion("  quality: {schedule: '61 * * * *'}\n"),
            &model(true),
        )
        .expect_err("bad cron");
        assert!(
            cron.to_string().starts_with("spec.quality.schedule"),
            "{cron}"
        );
        assert!(cron.to_string().contains("minute"), "{cron}");
        let escape = inputs(
            &promotion("  quality: {suite: ../etc/passwd}\n"),
            &model(true),
        )
        .expect_err("escape");
        assert!(
            escape.to_string().starts_with("spec.quality.suite"),
            "{escape}"
        );
        let url = inputs(
            &promotion("  quality: {endpoint: 'gw:8080'}\n"),
            &model(true),
        )
        .expect_err("url");
        assert!(
            url.to_string().starts_with("spec.quality.endpoint"),
            "{url}"
        );
    }

    #[test]
    fn the_cronjob_runs_the_probe_owned_by_the_promotion() {
        let mp = promotion("");
        let i = inputs(&mp, &model(true)).unwrap_or_else(|e| panic!("{e}"));
        let settings = JobSettings::default();
        let cj = render_cronjob(&mp, &i, &settings).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cj.name_any(), "tiny-prod-quality");
        assert_eq!(cj.namespace().as_deref(), Some("experiment"));
        let owner = &cj.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ModelPromotion", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        let spec = cj.spec.unwrap_or_else(|| panic!("spec"));
        assert_eq!(spec.schedule, "*/5 * * * *");
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        let template = &spec.job_template;
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone());
        assert_eq!(
            annotations
                .and_then(|a| a.get(PROMOTION_ANNOTATION).cloned())
                .as_deref(),
            Some("tiny-prod")
        );
        let job_spec = template.spec.as_ref().unwrap_or_else(|| panic!("job spec"));
        assert_eq!(job_spec.backoff_limit, Some(0));
        let pod = job_spec
            .template
            .spec
            .as_ref()
            .unwrap_or_else(|| panic!("pod"));
        let c = &pod.containers[0];
        assert_eq!(c.name, crate::k8s::WORKER_CONTAINER);
        assert_eq!(c.image.as_deref(), Some(settings.image.as_str()));
        let command = c.command.clone().unwrap_or_default();
        assert_eq!(
            command,
            [
                "quantizer-job",
                "probe",
                "--endpoint",
                "http://tiny-llama.prod.svc:8000",
                "--model",
                "tiny-llama",
                "--suite",
                "data/system-tests.yaml",
                "--root",
                "/models",
                "--variant",
                "tiny-v1",
                "--environment",
                "prod",
                "--threshold",
                "0.8",
                "--window",
                "5",
                "--termination-log",
                "/dev/termination-log",
            ]
        );
        // The model volume as the stage Jobs mount it, read-only; no GPU.
        let mount = c
            .volume_mounts
            .as_ref()
            .and_then(|m| m.iter().find(|m| m.name == "models"));
        assert_eq!(
            mount.map(|m| (m.mount_path.as_str(), m.read_only)),
            Some(("/models", Some(true)))
        );
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone());
        assert!(limits.is_none_or(|l| !l.contains_key(job::GPU_RESOURCE)));
        // Jobs and pods carry the labels the controller's watch selects.
        let pod_labels = job_spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone());
        for selector in PROBE_JOB_SELECTOR.split(',') {
            let (k, v) = selector.split_once('=').unwrap_or_default();
            assert_eq!(
                pod_labels
                    .as_ref()
                    .and_then(|l| l.get(k))
                    .map(String::as_str),
                Some(v)
            );
        }
    }

    #[test]
    fn long_promotion_names_still_fit() {
        let long = "p".repeat(80);
        let name = cronjob_name(&long);
        assert!(
            name.len() <= MAX_CRONJOB_NAME && name.ends_with("-quality"),
            "{name}"
        );
        assert_ne!(name, cronjob_name(&"p".repeat(81)));
    }

    #[test]
    fn schedules() {
        for ok in [
            "*/5 * * * *",
            "0 0 1 1 *",
            "15,45 9-17 * * MON-FRI",
            "0 3 ? * sun",
            "0 0 1 jan,jul *",
            "@hourly",
            "5/10 * * * *",
        ] {
            assert_eq!(validate_schedule(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 7",
            "*/0 * * * *",
            "5-1 * * * *",
            "@often",
            "TZ=UTC 0 * * * *",
            "? * * * *",
            "every five minutes",
        ] {
            assert!(validate_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }
}
