//! Job and ConfigMap rendering: deterministic names, ownership, volumes,
//! GPU requests and the worker's command line.

use kube::ResourceExt;
use quantops_api::QuantizedModel;
use quantops_operator::JobSettings;
use quantops_operator::job::{self, render_config_map, render_job};
use quantops_operator::pipeline::{self, Stage};

fn model(name: &str, gpus: u32) -> QuantizedModel {
    let yaml = format!(
        "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {{name: {name}, namespace: experiment, uid: 1234-abcd, generation: 3}}\nspec:\n  baseModel: {{name: example/tiny-llama, path: tiny-llama}}\n  version: v1.2\n  quantization: {{method: gptq, bits: 4, groupSize: 128}}\n  calibration: {{path: text/calibration.txt}}\n  resources: {{gpus: {gpus}, memory: 16Gi}}\n"
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn names_are_deterministic_and_short() {
    let qm = model("tiny-llama-v1-2-int4-g128", 1);
    let hash = pipeline::stage_hash(&qm.spec, Stage::Quantize);
    let a = job::job_name(&qm.name_any(), Stage::Quantize, &hash);
    let b = job::job_name(&qm.name_any(), Stage::Quantize, &hash);
    assert_eq!(a, b);
    assert!(a.starts_with("tiny-llama-v1-2-int4-g128-quantize-"), "{a}");

    let long = "a".repeat(60) + "-x";
    let other = "a".repeat(60) + "-y";
    let one = job::job_name(&long, Stage::Validate, &hash);
    let two = job::job_name(&other, Stage::Validate, &hash);
    assert!(one.len() <= 63 && two.len() <= 63, "{one} {two}");
    assert_ne!(one, two, "cut names stay unique");
    assert!(job::model_label(&long).len() <= 63);
}

#[test]
fn job_runs_the_stage_owned_by_the_model() {
    let qm = model("tiny", 2);
    let settings = JobSettings::default();
    let job = render_job(&qm, Stage::Baseline, &settings).unwrap_or_else(|e| panic!("{e}"));
    let name = job.name_any();
    assert_eq!(job.namespace().as_deref(), Some("experiment"));

    let owners = job.owner_references();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "QuantizedModel");
    assert_eq!(owners[0].uid, "1234-abcd");
    assert_eq!(owners[0].controller, Some(true));

    let spec = job.spec.as_ref().unwrap_or_else(|| panic!("no spec"));
    assert_eq!(spec.backoff_limit, Some(0));
    let pod = spec
        .template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("no pod spec"));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("quantops.dev/gpu-node"))
            .map(String::as_str),
        Some("true")
    );
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some(settings.image.as_str()));
    assert_eq!(
        container.command.as_deref().unwrap_or_default(),
        [
            "quantizer-job",
            "baseline",
            "--spec",
            "/etc/quantops/spec.yaml",
            "--root",
            "/models"
        ]
    );
    assert_eq!(
        container.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let resources = container
        .resources
        .as_ref()
        .unwrap_or_else(|| panic!("no resources"));
    let limits = resources
        .limits
        .as_ref()
        .unwrap_or_else(|| panic!("no limits"));
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("2")
    );
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("16Gi"));

    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == "/etc/quantops" && m.read_only == Some(true))
    );
    assert!(mounts.iter().any(|m| m.mount_path == "/models"));
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v.config_map.as_ref().is_some_and(|c| c.name == name))
    );
    assert!(volumes.iter().any(|v| {
        v.persistent_volume_claim
            .as_ref()
            .is_some_and(|c| c.claim_name == settings.model_claim)
    }));
}

#[test]
fn cpu_only_models_request_no_gpu() {
    let qm = model("tiny", 0);
    let job =
        render_job(&qm, Stage::Validate, &JobSettings::default()).unwrap_or_else(|e| panic!("{e}"));
    let pod = job
        .spec
        .and_then(|s| s.template.spec)
        .unwrap_or_else(|| panic!("no pod"));
    let resources = pod.containers[0].resources.clone().unwrap_or_default();
    assert!(
        !resources
            .limits
            .unwrap_or_default()
            .contains_key("nvidia.com/gpu")
    );
    assert!(pod.tolerations.is_none());
}

#[test]
fn config_map_carries_a_spec_the_worker_accepts() {
    let qm = model("tiny", 1);
    let cm = render_config_map(&qm, Stage::Quantize).unwrap_or_else(|e| panic!("{e}"));
    let job =
        render_job(&qm, Stage::Quantize, &JobSettings::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cm.name_any(), job.name_any());
    assert_eq!(cm.owner_references().len(), 1);
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("spec.yaml"))
        .unwrap_or_else(|| panic!("no spec.yaml"));
    let parsed = quantops_api::spec_file::parse_quantized_model(text, "configmap")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.spec, qm.spec);
    assert!(!text.contains("uid"), "server metadata stays out: {text}");
}

#[test]
fn a_model_without_uid_cannot_own_jobs() {
    let mut qm = model("tiny", 1);
    qm.metadata.uid = None;
    assert!(render_job(&qm, Stage::Baseline, &JobSettings::default()).is_err());
}

/// A resource value the CRD let through (or that predates its bounds) is
/// an error naming the field and the value, never a Job the API server refuses.
#[test]
fn a_bad_resource_value_names_its_field() {
    let render = |memory: &str, cpu: Option<&str>| {
        let mut qm = model("tiny", 1);
        qm.spec.resources.memory = Some(memory.to_string());
        qm.spec.resources.cpu = cpu.map(str::to_string);
        render_job(&qm, Stage::Baseline, &JobSettings::default()).map_err(|e| e.to_string())
    };
    assert_eq!(
        render("lots", None).err().as_deref(),
        Some(
            r#"spec.resources.memory: "lots" is not a Kubernetes quantity (such as 64Gi, 500m or 4)"#
        )
    );
    assert_eq!(
        render("16Gi", Some("-3")).err().as_deref(),
        Some(r#"spec.resources.cpu: "-3" is negative; a resource request is at least 0"#)
    );
    for bad in ["", "Gi", "1.2.3", "12Gb", "1e", "1e1.5", "--1", "4 Gi"] {
        let error = render(bad, None).err();
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.starts_with("spec.resources.memory: ")),
            "{bad:?}: {error:?}"
        );
    }
    for good in [
        "64Gi", "1.5", ".5", "5.", "500m", "2e3", "1E-3", "+1k", "0", "-0",
    ] {
        assert!(render(good, Some("250m")).is_ok(), "{good:?}");
    }
    // The requests and limits carry the values as given.
    let job = render("16Gi", Some("2")).unwrap_or_else(|e| panic!("{e}"));
    let containers = job
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers)
        .unwrap_or_default();
    let resources = containers
        .first()
        .and_then(|c| c.resources.clone())
        .unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("16Gi"));
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("2"));
    let limits = resources.limits.unwrap_or_default();
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("16Gi"));
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1")
    );
}
