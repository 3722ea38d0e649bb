//! The quantops CRD installs on a real API server and its custom resources
//! round-trip through it (schema, defaults, status subresource).

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::conditions::is_crd_established;
use quantops_api::QuantizedModel;
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};
use serde_json::json;

/// Applies the QuantizedModel CRD and waits until it is Established.
async fn install_crd(env: &TestEnv) {
    let crd = QuantizedModel::crd();
    let crd_name = crd.metadata.name.clone().expect("generated CRD has a name");
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    apply(&crds, &crd_name, &crd)
        .await
        .expect("apply the QuantizedModel CRD (its CEL rules compile and fit the cost budget)");
    wait_for(
        &crds,
        &crd_name,
        is_crd_established(),
        Duration::from_secs(30),
    )
    .await
    .expect("CRD quantizedmodels.quantops.dev to become Established");
}

#[tokio::test]
async fn quantized_model_crd_applies_and_resources_round_trip() {
    init_tracing();
    let env = TestEnv::new("crd")
        .await
        .expect("test cluster and namespace");
    install_crd(&env).await;

    let qm: QuantizedModel = serde_json::from_value(json!({
        "apiVersion": "quantops.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": { "name": "tiny-llama-v1-2-int4-g128" },
        "spec": {
            "baseModel": { "name": "example/tiny-llama", "path": "tiny-llama/v1.0-fp16" },
            "version": "v1.2",
            "quantization": { "method": "gptq", "bits": 4, "groupSize": 128, "symmetric": false,
                              "actOrder": false, "dampPercent": 0.01, "ignore": ["lm_head"] },
            "calibration": { "path": "data/calibration.txt", "samples": 128,
                             "sequenceLength": 2048, "seed": 42 },
            "output": { "path": "quantized" }
        }
    }))
    .expect("the design's example QuantizedModel deserializes");
    let qms: Api<QuantizedModel> = env.api();
    // A freshly Established CRD can take a moment to be served for writes.
    let mut applied = None;
    for _ in 0..50 {
        match apply(&qms, "tiny-llama-v1-2-int4-g128", &qm).await {
            Ok(obj) => {
                applied = Some(obj);
                break;
            }
            Err(e) => {
                tracing::info!("retrying the first QuantizedModel apply: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let applied = applied.expect("apply a QuantizedModel within 10s of the CRD being Established");
    assert!(applied.metadata.uid.is_some(), "the server assigned a uid");

    let read = qms
        .get("tiny-llama-v1-2-int4-g128")
        .await
        .expect("read the QuantizedModel back");
    assert_eq!(
        read.spec, qm.spec,
        "spec survives the round trip through the API server"
    );
    assert_eq!(read.spec.quantization.bits, 4);
    assert_eq!(read.spec.quantization.group_size, 128);
    assert_eq!(read.spec.base_model.name, "example/tiny-llama");
    assert_eq!(
        read.metadata.namespace.as_deref(),
        Some(env.namespace.as_str())
    );

    // The short name from the CRD works through kubectl.
    let out = env
        .kubectl(["get", "qm", "-o", "name"])
        .output()
        .await
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl get qm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "quantizedmodel.quantops.dev/tiny-llama-v1-2-int4-g128"
    );
    env.cleanup().await.expect("delete the test namespace");
}

/// A valid QuantizedModel as the API server receives it, for the cases
/// below to break one field at a time.
fn valid_model(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "quantops.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": { "name": name },
        "spec": {
            "baseModel": { "name": "example/tiny-llama", "path": "tiny-llama",
                           "sha256": { "model.safetensors": "0".repeat(64) } },
            "version": "v1",
            "quantization": { "method": "gptq", "bits": 4, "groupSize": 128 },
            "calibration": { "path": "text/calibration.txt", "samples": 128, "sequenceLength": 512 },
            "validation": {
                "evalText": { "path": "text/eval.txt", "windowTokens": 512, "maxWindows": 64 },
                "tasks": [{ "name": "chat-choice", "path": "tasks/chat-choice.jsonl" }],
                "systemTests": { "path": "system-tests.yaml" },
                "consistency": { "path": "text/chat-tasks.jsonl", "maxPrompts": 32, "maxNewTokens": 24 }
            },
            "output": { "path": "quantized" },
            "resources": { "gpus": 1, "memory": "16Gi", "cpu": "500m" }
        }
    })
}

/// Sets the value at a JSON pointer (`/spec/calibration/path`).
fn with(mut obj: serde_json::Value, pointer: &str, value: serde_json::Value) -> serde_json::Value {
    *obj.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} is in the valid model")) = value;
    obj
}

async fn server_side_apply(
    api: &Api<QuantizedModel>,
    name: &str,
    obj: &serde_json::Value,
) -> Result<QuantizedModel, kube::Error> {
    api.patch(
        name,
        &PatchParams::apply(quantops_e2e::FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// The adversarial QuantizedModels: paths out of the volume, names
/// that climb, sizes that doom a Job, malformed digests and resources. The
/// API server refuses each at admission with a message naming the field.
#[tokio::test]
async fn the_api_server_refuses_adversarial_specs_naming_the_field() {
    init_tracing();
    let env = TestEnv::new("crd-adversarial")
        .await
        .expect("test cluster and namespace");
    install_crd(&env).await;
    let qms: Api<QuantizedModel> = env.api();
    // The valid model is accepted (retried while a fresh CRD starts serving).
    let mut accepted = false;
    for _ in 0..50 {
        match server_side_apply(&qms, "valid", &valid_model("valid")).await {
            Ok(_) => {
                accepted = true;
                break;
            }
            Err(e) => {
                tracing::info!("retrying the first QuantizedModel apply: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(accepted, "the valid model is accepted within 10s");

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("/spec/baseModel/path", json!("/etc"), "spec.baseModel.path"),
        ("/spec/baseModel/path", json!(""), "spec.baseModel.path"),
        (
            "/spec/baseModel/name",
            json!("evil/.."),
            "spec.baseModel.name",
        ),
        (
            "/spec/baseModel/name",
            json!("a/b/c"),
            "spec.baseModel.name",
        ),
        ("/spec/version", json!("../v1"), "spec.version"),
        (
            "/spec/baseModel/sha256",
            json!({ "model.safetensors": "not-a-digest" }),
            "spec.baseModel.sha256",
        ),
        (
            "/spec/baseModel/sha256",
            json!({ "../config.json": "0".repeat(64) }),
            "spec.baseModel.sha256",
        ),
        (
            "/spec/calibration/path",
            json!("../../../etc/passwd"),
            "spec.calibration.path",
        ),
        (
            "/spec/calibration/samples",
            json!(4_000_000_000u64),
            "spec.calibration.samples",
        ),
        (
            "/spec/calibration/sequenceLength",
            json!(1_000_000_000u64),
            "spec.calibration.sequenceLength",
        ),
        (
            "/spec/validation/evalText/path",
            json!("/proc/self/environ"),
            "spec.validation.evalText.path",
        ),
        (
            "/spec/validation/evalText/windowTokens",
            json!(1_000_000_000u64),
            "spec.validation.evalText.windowTokens",
        ),
        (
            "/spec/validation/evalText/maxWindows",
            json!(0),
            "spec.validation.evalText.maxWindows",
        ),
        (
            "/spec/validation/tasks/0/path",
            json!("tasks/../../x"),
            "spec.validation.tasks[0].path",
        ),
        (
            "/spec/validation/tasks/0/name",
            json!("a/b"),
            "spec.validation.tasks[0].name",
        ),
        (
            "/spec/validation/systemTests/path",
            json!("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            "spec.validation.systemTests.path",
        ),
        (
            "/spec/validation/consistency/path",
            json!("./prompts.jsonl"),
            "spec.validation.consistency.path",
        ),
        (
            "/spec/validation/consistency/maxPrompts",
            json!(0),
            "spec.validation.consistency.maxPrompts",
        ),
        (
            "/spec/validation/consistency/maxNewTokens",
            json!(100_000),
            "spec.validation.consistency.maxNewTokens",
        ),
        ("/spec/output/path", json!("../tmp/x"), "spec.output.path"),
        (
            "/spec/resources/memory",
            json!("lots"),
            "spec.resources.memory",
        ),
        ("/spec/resources/cpu", json!("-3"), "spec.resources.cpu"),
        (
            "/spec/resources/gpus",
            json!(100_000),
            "spec.resources.gpus",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (pointer, value, field)) in cases.iter().enumerate() {
        let name = format!("bad-{i}");
        let obj = with(valid_model(&name), pointer, value.clone());
        match server_side_apply(&qms, &name, &obj).await {
            Ok(_) => failures.push(format!("{pointer} = {value}: accepted")),
            Err(kube::Error::Api(status))
                if status.code == 422 && status.message.contains(field) => {}
            Err(e) => failures.push(format!(
                "{pointer} = {value}: {e} (expected 422 naming {field})"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    env.cleanup().await.expect("delete the test namespace");
}
