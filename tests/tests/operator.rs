//! The operator end to end: installed from the chart (its RBAC identity),
//! driving QuantizedModels through Jobs on the test control plane, with the
//! real worker on the bundled model or the simulated one where a test needs
//! many quick stages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams};
use quantops_api::QuantizedModel;
use quantops_e2e::operator::{
    Operator, OperatorOptions, REAL_WORKER_IMAGE, install_chart, sim_worker_image,
};
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};

/// The bundled model and text (`../shared/data`, or QUANTOPS_SHARED_DATA).
fn shared_data() -> PathBuf {
    std::env::var_os("QUANTOPS_SHARED_DATA").map_or_else(
        || quantops_e2e::repo_root().join("../shared/data"),
        PathBuf::from,
    )
}

/// Fills the model volume with the bundled model and text as a platform
/// team would have copied them onto the PVC: real files (hard links where
/// the file system allows, copies otherwise), since the worker in a Job
/// refuses a symbolic link that leads out of the volume.
fn stock_volume(dir: &Path) {
    let data = shared_data()
        .canonicalize()
        .expect("../shared/data exists (or set QUANTOPS_SHARED_DATA)");
    for name in ["tiny-llama", "text"] {
        copy_tree(&data.join(name), &dir.join(name));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a model volume directory");
    for entry in std::fs::read_dir(from).expect("read the bundled data") {
        let source = entry.expect("a bundled data entry").path();
        let target = to.join(source.file_name().expect("an entry has a name"));
        if source.is_dir() {
            copy_tree(&source, &target);
        } else if !target.exists() && std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).expect("copy the bundled data");
        }
    }
}

/// A QuantizedModel small enough to run on CPU in seconds: RTN W4A16 on the
/// bundled model, perplexity on four 256-token windows.
fn small_model(name: &str, max_perplexity_increase_percent: f64) -> QuantizedModel {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "quantops.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": { "name": name },
        "spec": {
            "baseModel": { "name": "example/tiny-llama", "path": "tiny-llama" },
            "version": "v1",
            "quantization": { "method": "rtn", "bits": 4, "groupSize": 128, "symmetric": false },
            "validation": {
                "evalText": { "path": "text/eval.txt", "windowTokens": 256, "maxWindows": 4 },
                "gates": { "maxPerplexityIncreasePercent": max_perplexity_increase_percent }
            },
            "output": { "path": "out" },
            "resources": { "gpus": 1, "memory": "4Gi" }
        }
    }))
    .expect("a valid QuantizedModel")
}

fn condition<'a>(qm: &'a QuantizedModel, type_: &str) -> Option<&'a Condition> {
    qm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn phase(qm: &QuantizedModel) -> Option<&str> {
    qm.status.as_ref()?.phase.as_deref()
}

fn is_phase(want: &'static str) -> impl Fn(Option<&QuantizedModel>) -> bool {
    move |qm| qm.and_then(phase) == Some(want)
}

async fn jobs_of(env: &TestEnv, model: &str) -> Vec<Job> {
    env.api::<Job>()
        .list(&ListParams::default().labels(&format!("quantops.dev/model={model}")))
        .await
        .expect("list Jobs")
        .items
}

async fn event_reasons(env: &TestEnv, model: &str) -> Vec<String> {
    env.api::<Event>()
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(model))
        .filter_map(|e| e.reason)
        .collect()
}

/// How many times `reason` was recorded for `model`: the Recorder folds
/// repeats of an event into one object with a series count.
async fn event_count(env: &TestEnv, model: &str, reason: &str) -> i32 {
    env.api::<Event>()
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(model))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.series.map_or(1, |s| s.count))
        .sum()
}

/// Waits until `reason` was recorded for `model` at least once, then a few
/// seconds more (so that a duplicate, if the operator made one, would be
/// there too), and returns the count.
async fn settled_event_count(env: &TestEnv, model: &str, reason: &str) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while event_count(env, model, reason).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event for {model} within 60s: {:?}",
            event_reasons(env, model).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    event_count(env, model, reason).await
}

async fn create(env: &TestEnv, qm: &QuantizedModel) {
    let name = qm.metadata.name.clone().expect("named");
    apply(&env.api::<QuantizedModel>(), &name, qm)
        .await
        .expect("apply the QuantizedModel");
}

async fn lease_holder(env: &TestEnv) -> Option<String> {
    env.api::<Lease>()
        .get_opt("quantops-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

async fn wait_for_holder(env: &TestEnv, identity: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while lease_holder(env).await.as_deref() != Some(identity) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{identity} did not hold the Lease within {timeout:?} (holder: {:?})",
            lease_holder(env).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn quantized_model_reaches_ready_with_the_real_worker() {
    init_tracing();
    let mut env = TestEnv::new("op-ready").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    let volume = env
        .host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    stock_volume(&volume);
    let operator = Operator::start(&env, OperatorOptions::new("quantops-0", REAL_WORKER_IMAGE))
        .await
        .expect("start the operator");

    create(&env, &small_model("tiny-rtn", 5.0)).await;
    let qms = env.api::<QuantizedModel>();
    let ready = wait_for(
        &qms,
        "tiny-rtn",
        is_phase("Ready"),
        Duration::from_secs(900),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
    .expect("the model exists");

    let status = ready.status.clone().expect("status");
    assert_eq!(status.observed_generation, ready.metadata.generation);
    for type_ in ["BaselineReady", "Quantized", "Validated", "Ready"] {
        let c = condition(&ready, type_).unwrap_or_else(|| panic!("condition {type_}"));
        assert_eq!(c.status, "True", "{type_}: {}", c.message);
        assert_eq!(c.observed_generation, ready.metadata.generation);
    }
    let baseline = status.baseline_perplexity.expect("baseline perplexity");
    let quantized = status.quantized_perplexity.expect("quantized perplexity");
    assert!(baseline > 1.0 && quantized > 1.0, "{baseline} {quantized}");
    assert!(status.perplexity_delta.is_some());
    assert!(!status.gates.is_empty() && status.gates.iter().all(|g| g.passed));
    assert!(
        status
            .artifact_digest
            .is_some_and(|d| d.starts_with("sha256:"))
    );

    // The artifact is on the volume, as the worker wrote it.
    let artifact = status.artifact_path.expect("artifact path");
    let relative = artifact.trim_start_matches("/models/");
    for file in [
        "config.json",
        "model.safetensors",
        "report.json",
        "README.md",
    ] {
        let path = volume.join(relative).join(file);
        assert!(path.is_file(), "{} is missing", path.display());
    }

    // One Job per stage, owned by the model; the events tell the story.
    let jobs = jobs_of(&env, "tiny-rtn").await;
    assert_eq!(jobs.len(), 3, "one Job per stage");
    for job in &jobs {
        let owner = &job.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(owner.kind, "QuantizedModel");
        assert_eq!(owner.controller, Some(true));
    }
    // The events tell the story, each transition once, however many times
    // the operator reconciled (and however late its cache was).
    assert_eq!(settled_event_count(&env, "tiny-rtn", "Ready").await, 1);
    for (reason, count) in [("StageStarted", 3), ("StageSucceeded", 2), ("Ready", 1)] {
        assert_eq!(
            event_count(&env, "tiny-rtn", reason).await,
            count,
            "{reason} events: {:?}",
            event_reasons(&env, "tiny-rtn").await
        );
    }

    // Metrics count transitions too, not reconciliations.
    let reconciles = operator
        .metric(r#"quantops_reconciles_total{controller="quantizedmodel"}"#)
        .await
        .expect("scrape /metrics");
    assert!(reconciles.is_some_and(|n| n >= 3.0), "{reconciles:?}");
    let passed = operator
        .metric(r#"quantops_gate_results_total{gate="perplexity",result="passed"}"#)
        .await
        .expect("scrape /metrics");
    assert_eq!(passed, Some(1.0));
    for stage in ["baseline", "quantize", "validate"] {
        let succeeded = operator
            .metric(&format!(
                r#"quantops_stage_results_total{{result="succeeded",stage="{stage}"}}"#
            ))
            .await
            .expect("scrape /metrics");
        assert_eq!(succeeded, Some(1.0), "{stage} succeeded");
    }
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn a_failed_gate_ends_in_validated_false() {
    init_tracing();
    let mut env = TestEnv::new("op-gate").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    let volume = env
        .host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    stock_volume(&volume);
    let operator = Operator::start(&env, OperatorOptions::new("quantops-0", REAL_WORKER_IMAGE))
        .await
        .expect("start the operator");

    // RTN at 4 bits costs about 1% perplexity: a 0.01% ceiling must fail.
    create(&env, &small_model("tiny-strict", 0.01)).await;
    let qms = env.api::<QuantizedModel>();
    let validated_false = |qm: Option<&QuantizedModel>| {
        qm.and_then(|qm| condition(qm, "Validated"))
            .is_some_and(|c| c.status == "False")
    };
    let failed = wait_for(
        &qms,
        "tiny-strict",
        validated_false,
        Duration::from_secs(900),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
    .expect("the model exists");
    let validated = condition(&failed, "Validated").expect("Validated");
    assert_eq!(validated.reason, "GatesFailed");
    assert!(
        validated.message.contains("perplexity"),
        "the message names the failed gate: {}",
        validated.message
    );
    let ready = condition(&failed, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(phase(&failed), Some("Failed"));
    let gates = &failed.status.as_ref().expect("status").gates;
    assert!(gates.iter().any(|g| g.name == "perplexity" && !g.passed));
    let reasons = event_reasons(&env, "tiny-strict").await;
    assert!(reasons.iter().any(|r| r == "GatesFailed"), "{reasons:?}");
    // The verdict is final for this spec: no Job is re-run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(jobs_of(&env, "tiny-strict").await.len(), 3);
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn the_api_server_refuses_an_invalid_spec_naming_the_field() {
    init_tracing();
    let env = TestEnv::new("op-invalid").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    let qms = env.api::<QuantizedModel>();

    let refused = |value: serde_json::Value| {
        let qms = qms.clone();
        async move {
            let qm: QuantizedModel = serde_json::from_value(value).expect("typed");
            match apply(&qms, "invalid", &qm).await {
                Ok(_) => panic!("the API server accepted an invalid QuantizedModel"),
                Err(e) => e.to_string(),
            }
        }
    };
    let mut base = serde_json::to_value(small_model("invalid", 3.0)).expect("json");

    base["spec"]["quantization"]["method"] = "gptq".into();
    let message = refused(base.clone()).await;
    assert!(
        message.contains("calibration"),
        "GPTQ without calibration: {message}"
    );

    base["spec"]["quantization"]["method"] = "rtn".into();
    base["spec"]["quantization"]["bits"] = 5.into();
    let message = refused(base.clone()).await;
    assert!(
        message.contains("spec.quantization.bits"),
        "bits 5: {message}"
    );

    base["spec"]["quantization"]["bits"] = 4.into();
    base["spec"]["validation"]["gates"]["maxPerplexityIncreasePercent"] = 50.into();
    let message = refused(base.clone()).await;
    assert!(
        message.contains("maxPerplexityIncreasePercent"),
        "a 50% perplexity ceiling: {message}"
    );
    assert!(
        qms.get_opt("invalid").await.expect("get").is_none(),
        "nothing was stored"
    );
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn killing_the_operator_in_each_stage_creates_no_duplicate_job() {
    init_tracing();
    let mut env = TestEnv::new("op-restart").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let mut operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-0", &sim_worker_image(4)),
    )
    .await
    .expect("start the operator");
    create(&env, &small_model("sim-restart", 3.0)).await;

    let mut seen = Vec::new();
    for stage in ["baseline", "quantize", "validate"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let job = loop {
            let jobs = jobs_of(&env, "sim-restart").await;
            if let Some(job) = jobs.into_iter().find(|j| {
                j.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("quantops.dev/stage"))
                    == Some(&stage.to_string())
            }) {
                break job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {stage} Job within 60s\noperator log:\n{}",
                operator.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let finished = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.status == "True"));
        assert!(
            !finished,
            "the {stage} Job was already done when the operator was killed"
        );
        seen.push((job.metadata.name.clone(), job.metadata.uid.clone()));
        operator = operator.restart().await.expect("restart the operator");
    }

    let qms = env.api::<QuantizedModel>();
    wait_for(
        &qms,
        "sim-restart",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let mut jobs: Vec<_> = jobs_of(&env, "sim-restart")
        .await
        .into_iter()
        .map(|j| (j.metadata.name, j.metadata.uid))
        .collect();
    jobs.sort();
    seen.sort();
    assert_eq!(
        jobs, seen,
        "the Jobs seen before each kill are the only ones"
    );

    // Deleting the model removes its Jobs and ConfigMaps (owner references),
    // and leaves the user's volume claim alone.
    qms.delete("sim-restart", &DeleteParams::foreground())
        .await
        .expect("delete the QuantizedModel");
    wait_for(
        &qms,
        "sim-restart",
        |qm: Option<&QuantizedModel>| qm.is_none(),
        Duration::from_secs(60),
    )
    .await
    .expect("the QuantizedModel goes away");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = jobs_of(&env, "sim-restart").await;
        let config_maps = env
            .api::<ConfigMap>()
            .list(&ListParams::default().labels("quantops.dev/model=sim-restart"))
            .await
            .expect("list ConfigMaps")
            .items;
        if jobs.is_empty() && config_maps.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} Jobs and {} ConfigMaps left 60s after the model was deleted",
            jobs.len(),
            config_maps.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let claims = env
        .api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>()
        .get_opt("quantops-models")
        .await
        .expect("get the claim");
    assert!(claims.is_some(), "the user's claim stays");
    drop(operator);
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn a_second_replica_stays_passive_until_the_leader_dies() {
    init_tracing();
    let mut env = TestEnv::new("op-leader").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let image = sim_worker_image(1);
    let mut leader = Operator::start(&env, OperatorOptions::new("quantops-a", &image))
        .await
        .expect("start replica a");
    wait_for_holder(&env, "quantops-a", Duration::from_secs(30)).await;
    let standby = Operator::start(&env, OperatorOptions::new("quantops-b", &image))
        .await
        .expect("start replica b");

    create(&env, &small_model("sim-leader-1", 3.0)).await;
    let qms = env.api::<QuantizedModel>();
    wait_for(
        &qms,
        "sim-leader-1",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nleader log:\n{}", leader.log_text()));

    assert_eq!(lease_holder(&env).await.as_deref(), Some("quantops-a"));
    assert_eq!(
        leader.metric("quantops_leader").await.expect("scrape a"),
        Some(1.0)
    );
    assert_eq!(
        standby.metric("quantops_leader").await.expect("scrape b"),
        Some(0.0)
    );
    let standby_reconciles = standby
        .metric(r#"quantops_reconciles_total{controller="quantizedmodel"}"#)
        .await
        .expect("scrape b");
    assert!(
        standby_reconciles.unwrap_or(0.0) == 0.0,
        "the standby reconciled: {standby_reconciles:?}"
    );
    assert!(
        !standby
            .log_text()
            .contains("leading: starting the controllers")
    );

    // The leader dies without releasing the Lease: the standby takes over
    // once the Lease expires (15 s) and carries on.
    leader.kill().await.expect("kill replica a");
    wait_for_holder(&env, "quantops-b", Duration::from_secs(45)).await;
    // Another artifact directory: the first model keeps its own.
    let second = edited_model("sim-leader-2", |v| {
        v["spec"]["output"]["path"] = "out-2".into()
    });
    create(&env, &second).await;
    wait_for(
        &qms,
        "sim-leader-2",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nstandby log:\n{}", standby.log_text()));
    assert_eq!(
        standby.metric("quantops_leader").await.expect("scrape b"),
        Some(1.0)
    );
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn a_broken_stage_is_retried_with_backoff_then_given_up() {
    init_tracing();
    let mut env = TestEnv::new("op-retry").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let mut options =
        OperatorOptions::new("quantops-0", "quantops/quantizer-job:sim-0-fail-quantize");
    options.max_stage_attempts = 2;
    options.stage_retry_delay = 2;
    let operator = Operator::start(&env, options)
        .await
        .expect("start the operator");
    create(&env, &small_model("sim-broken", 3.0)).await;
    let qms = env.api::<QuantizedModel>();
    let given_up = |qm: Option<&QuantizedModel>| {
        qm.and_then(|qm| qm.status.as_ref()).is_some_and(|s| {
            s.phase.as_deref() == Some("Failed") && s.stage_attempts.get("quantize") == Some(&2)
        })
    };
    let failed = wait_for(&qms, "sim-broken", given_up, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
        .expect("the model exists");
    let quantized = condition(&failed, "Quantized").expect("Quantized");
    assert_eq!(quantized.status, "False");
    assert!(
        quantized.message.contains("simulated failure of quantize"),
        "the worker's error is in the condition: {}",
        quantized.message
    );
    assert_eq!(
        condition(&failed, "BaselineReady").map(|c| c.status.as_str()),
        Some("True")
    );
    let failures = event_count(&env, "sim-broken", "StageFailed").await;
    assert_eq!(failures, 2, "one StageFailed per attempt");
    // Given up: no further attempt is started.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = qms.get("sim-broken").await.expect("get");
    assert_eq!(
        after.status.expect("status").stage_attempts.get("quantize"),
        Some(&2)
    );
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn a_changed_spec_reruns_only_the_stages_it_affects() {
    init_tracing();
    let mut env = TestEnv::new("op-change").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-0", &sim_worker_image(0)),
    )
    .await
    .expect("start the operator");
    let mut qm = small_model("sim-change", 3.0);
    create(&env, &qm).await;
    let qms = env.api::<QuantizedModel>();
    wait_for(
        &qms,
        "sim-change",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let before: Vec<_> = jobs_of(&env, "sim-change").await;
    let baseline_job = |jobs: &[Job]| {
        jobs.iter()
            .find(|j| {
                j.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("quantops.dev/stage"))
                    .map(String::as_str)
                    == Some("baseline")
            })
            .and_then(|j| j.metadata.uid.clone())
    };

    // 8 bits instead of 4: the baseline stays valid, quantize and validate re-run.
    qm.spec.quantization.bits = 8;
    create(&env, &qm).await;
    let regenerated = |qm: Option<&QuantizedModel>| {
        qm.is_some_and(|qm| {
            phase(qm) == Some("Ready")
                && qm.status.as_ref().and_then(|s| s.observed_generation) == qm.metadata.generation
                && qm.metadata.generation == Some(2)
        })
    };
    wait_for(&qms, "sim-change", regenerated, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let after = jobs_of(&env, "sim-change").await;
    assert_eq!(before.len(), 3);
    assert_eq!(
        after.len(),
        5,
        "two new Jobs (quantize, validate) beside the first three"
    );
    assert_eq!(
        baseline_job(&before),
        baseline_job(&after),
        "the baseline did not re-run"
    );
    env.cleanup().await.expect("delete the test namespace");
}

/// `small_model` with its JSON changed by `edit`.
fn edited_model(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> QuantizedModel {
    let mut value = serde_json::to_value(small_model(name, 3.0)).expect("json");
    edit(&mut value);
    serde_json::from_value(value).expect("a QuantizedModel")
}

fn condition_is(
    type_: &'static str,
    reason: &'static str,
) -> impl Fn(Option<&QuantizedModel>) -> bool {
    move |qm| {
        qm.and_then(|qm| condition(qm, type_))
            .is_some_and(|c| c.reason == reason)
    }
}

/// Waits until `model` has no Job, for at most a minute.
async fn wait_for_no_jobs(env: &TestEnv, model: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = jobs_of(env, model).await;
        if jobs.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} Jobs of {model} left after 60s",
            jobs.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn deleting_the_jobs_of_a_ready_model_reruns_nothing() {
    init_tracing();
    let mut env = TestEnv::new("op-done").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-0", &sim_worker_image(0)),
    )
    .await
    .expect("start the operator");
    let mut qm = small_model("sim-done", 3.0);
    create(&env, &qm).await;
    let qms = env.api::<QuantizedModel>();
    wait_for(
        &qms,
        "sim-done",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let ready = qms.get("sim-done").await.expect("get");
    let stages = ready.status.clone().expect("status").stages;
    for stage in ["baseline", "quantize", "validate"] {
        let record = stages
            .get(stage)
            .unwrap_or_else(|| panic!("{stage} record"));
        assert_eq!(
            serde_json::to_value(record.state).expect("json"),
            "Succeeded",
            "{stage}"
        );
        assert!(
            record.job_uid.is_some(),
            "{stage}: the Job's uid is recorded"
        );
    }

    // The finished Jobs go (say, a clean-up): the deletions are events of
    // the model's owned Jobs, so the operator looks, and must not re-run.
    env.api::<Job>()
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels("quantops.dev/model=sim-done"),
        )
        .await
        .expect("delete the Jobs");
    wait_for_no_jobs(&env, "sim-done").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        jobs_of(&env, "sim-done").await.is_empty(),
        "a Job was created again\noperator log:\n{}",
        operator.log_text()
    );
    let after = qms.get("sim-done").await.expect("get");
    assert_eq!(phase(&after), Some("Ready"));

    // A spec change no stage depends on (resources) re-runs nothing either,
    // and the results are re-stated for the new generation.
    qm.spec.resources.memory = Some("2Gi".into());
    create(&env, &qm).await;
    let restated = |qm: Option<&QuantizedModel>| {
        qm.is_some_and(|qm| {
            qm.metadata.generation == Some(2)
                && condition(qm, "Ready")
                    .is_some_and(|c| c.status == "True" && c.observed_generation == Some(2))
        })
    };
    let regenerated = wait_for(&qms, "sim-done", restated, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
        .expect("the model exists");
    for type_ in ["BaselineReady", "Quantized", "Validated"] {
        let c = condition(&regenerated, type_).unwrap_or_else(|| panic!("{type_}"));
        assert_eq!(
            (c.status.as_str(), c.observed_generation),
            ("True", Some(2))
        );
    }
    assert!(jobs_of(&env, "sim-done").await.is_empty(), "nothing re-ran");
    assert_eq!(event_count(&env, "sim-done", "StageStarted").await, 3);
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn an_unschedulable_pod_shows_in_status_then_fails_the_stage() {
    init_tracing();
    let mut env = TestEnv::new("op-unsched").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let mut options = OperatorOptions::new("quantops-0", &sim_worker_image(0));
    options.max_stage_attempts = 1;
    options
        .extra_env
        .push(("QUANTOPS_UNSCHEDULABLE_TIMEOUT".into(), "40".into()));
    let operator = Operator::start(&env, options)
        .await
        .expect("start the operator");
    // The test node has 8 GPUs: 16 (the most a spec may ask for) fit no node.
    let qm = edited_model("sim-unsched", |v| {
        v["spec"]["resources"]["gpus"] = 16.into()
    });
    create(&env, &qm).await;
    let qms = env.api::<QuantizedModel>();
    let pending = wait_for(
        &qms,
        "sim-unsched",
        condition_is("BaselineReady", "Unschedulable"),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
    .expect("the model exists");
    let baseline = condition(&pending, "BaselineReady").expect("BaselineReady");
    assert_eq!(baseline.status, "Unknown");
    assert!(
        baseline.message.contains("cannot be scheduled")
            && baseline.message.contains("Insufficient nvidia.com/gpu"),
        "the scheduler's words: {}",
        baseline.message
    );
    let ready = condition(&pending, "Ready").expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Unschedulable")
    );
    let progress = pending.status.as_ref().and_then(|s| s.progress.clone());
    assert!(
        progress
            .as_deref()
            .is_some_and(|p| p.starts_with("baseline: pending, unschedulable")),
        "{progress:?}"
    );
    assert_eq!(phase(&pending), Some("Baseline"));

    // Past the limit the stage is broken (one attempt allowed: given up),
    // and its Job deleted, so the pod cannot start later.
    let failed = wait_for(
        &qms,
        "sim-unsched",
        is_phase("Failed"),
        Duration::from_secs(90),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
    .expect("the model exists");
    let baseline = condition(&failed, "BaselineReady").expect("BaselineReady");
    assert_eq!(
        (baseline.status.as_str(), baseline.reason.as_str()),
        ("False", "StageFailed")
    );
    assert!(
        baseline.message.contains("could not be scheduled")
            && baseline.message.contains("Insufficient nvidia.com/gpu"),
        "{}",
        baseline.message
    );
    wait_for_no_jobs(&env, "sim-unsched").await;
    assert_eq!(event_count(&env, "sim-unsched", "Unschedulable").await, 1);
    assert_eq!(event_count(&env, "sim-unsched", "StageFailed").await, 1);
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn a_value_no_job_can_carry_is_reported_until_fixed() {
    init_tracing();
    let mut env = TestEnv::new("op-badres").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-0", &sim_worker_image(0)),
    )
    .await
    .expect("start the operator");
    let qms = env.api::<QuantizedModel>();
    let qm = edited_model("sim-badres", |v| {
        v["spec"]["resources"]["memory"] = "lots".into()
    });
    if let Err(error) = apply(&qms, "sim-badres", &qm).await {
        // The CRD may bound the value itself; then it names the field.
        let error = error.to_string();
        assert!(error.contains("spec.resources.memory"), "{error}");
        env.cleanup().await.expect("delete the test namespace");
        return;
    }
    let refused = wait_for(
        &qms,
        "sim-badres",
        condition_is("Ready", "InvalidSpec"),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
    .expect("the model exists");
    let ready = condition(&refused, "Ready").expect("Ready");
    assert_eq!(
        ready.message,
        r#"spec.resources.memory: "lots" is not a Kubernetes quantity (such as 64Gi, 500m or 4)"#
    );
    assert_eq!(ready.observed_generation, Some(1));
    assert_eq!(phase(&refused), Some("Failed"));
    // Not retried: one event, no Job, however long it waits.
    assert_eq!(
        settled_event_count(&env, "sim-badres", "InvalidSpec").await,
        1
    );
    assert!(jobs_of(&env, "sim-badres").await.is_empty());

    // Fixed: the new generation runs.
    let fixed = edited_model("sim-badres", |v| {
        v["spec"]["resources"]["memory"] = "4Gi".into()
    });
    create(&env, &fixed).await;
    wait_for(
        &qms,
        "sim-badres",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn a_second_model_writing_the_same_directory_waits_for_the_first() {
    init_tracing();
    let mut env = TestEnv::new("op-collide").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-0", &sim_worker_image(2)),
    )
    .await
    .expect("start the operator");
    let qms = env.api::<QuantizedModel>();
    create(&env, &small_model("sim-first", 3.0)).await;
    let started = |qm: Option<&QuantizedModel>| {
        qm.and_then(|qm| qm.status.as_ref())
            .is_some_and(|s| !s.stages.is_empty())
    };
    wait_for(&qms, "sim-first", started, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));

    // Same base model, version, recipe and output path: the same directory.
    create(&env, &small_model("sim-second", 3.0)).await;
    let waiting = wait_for(
        &qms,
        "sim-second",
        condition_is("Ready", "OutputConflict"),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
    .expect("the model exists");
    let ready = condition(&waiting, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(
        ready.message,
        format!(
            "spec.output: artifact directory out/tiny-llama/v1-int4-rtn-g128-asym is already used by QuantizedModel {}/sim-first",
            env.namespace
        )
    );
    assert_eq!(phase(&waiting), Some("Pending"));
    assert!(jobs_of(&env, "sim-second").await.is_empty(), "nothing ran");
    wait_for(
        &qms,
        "sim-first",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert!(
        jobs_of(&env, "sim-second").await.is_empty(),
        "still waiting"
    );
    assert_eq!(event_count(&env, "sim-second", "OutputConflict").await, 1);

    // The first one goes: the second takes the directory.
    qms.delete("sim-first", &DeleteParams::foreground())
        .await
        .expect("delete the first model");
    wait_for(
        &qms,
        "sim-second",
        is_phase("Ready"),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    env.cleanup().await.expect("delete the test namespace");
}

/// Models created at one instant, each reconciled before the others'
/// starts reach the operator's cache: the claim on the API server lets
/// exactly one of them write the directory.
#[tokio::test]
async fn models_created_at_once_for_one_directory_start_only_one() {
    init_tracing();
    let mut env = TestEnv::new("op-collide-once")
        .await
        .expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-0", &sim_worker_image(2)),
    )
    .await
    .expect("start the operator");
    let qms = env.api::<QuantizedModel>();
    let names: Vec<String> = (0..6).map(|i| format!("sim-at-once-{i}")).collect();
    let models: Vec<QuantizedModel> = names.iter().map(|n| small_model(n, 3.0)).collect();
    futures::future::join_all(models.iter().map(|qm| create(&env, qm))).await;

    let settled = |qm: Option<&QuantizedModel>| {
        qm.is_some_and(|qm| {
            let started = qm.status.as_ref().is_some_and(|s| !s.stages.is_empty());
            started || condition_is("Ready", "OutputConflict")(Some(qm))
        })
    };
    let mut started = Vec::new();
    for name in &names {
        let qm = wait_for(&qms, name, settled, Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
            .expect("the model exists");
        if qm.status.as_ref().is_some_and(|s| !s.stages.is_empty()) {
            started.push(name.clone());
        }
    }
    assert_eq!(started.len(), 1, "exactly one starts, got {started:?}");
    let winner = &started[0];
    for name in names.iter().filter(|n| *n != winner) {
        let qm = qms.get(name).await.expect("read the model");
        let ready = condition(&qm, "Ready").expect("Ready");
        assert_eq!(
            ready.message,
            format!(
                "spec.output: artifact directory out/tiny-llama/v1-int4-rtn-g128-asym is already used by QuantizedModel {}/{winner}",
                env.namespace
            )
        );
        assert!(jobs_of(&env, name).await.is_empty(), "{name} ran nothing");
    }
    let claims: kube::Api<ConfigMap> = env.api();
    let claim = claims
        .list(&ListParams::default().labels("quantops.dev/output-claim=true"))
        .await
        .expect("list the claims");
    assert_eq!(claim.items.len(), 1, "one directory, one claim");
    assert_eq!(
        claim.items[0].data.as_ref().and_then(|d| d.get("model")),
        Some(winner)
    );
    wait_for(&qms, winner, is_phase("Ready"), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    env.cleanup().await.expect("delete the test namespace");
}
