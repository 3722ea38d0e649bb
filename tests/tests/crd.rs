//! The quantops CRD installs on a real API server and its custom resources
//! round-trip through it (schema, defaults, status subresource).

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::Api;
use kube::runtime::wait::conditions::is_crd_established;
use quantops_api::QuantizedModel;
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};

#[tokio::test]
async fn quantized_model_crd_applies_and_resources_round_trip() {
    init_tracing();
    let env = TestEnv::new("crd")
        .await
        .expect("test cluster and namespace");
    let crd = QuantizedModel::crd();
    let crd_name = crd.metadata.name.clone().expect("generated CRD has a name");
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    apply(&crds, &crd_name, &crd)
        .await
        .expect("apply the QuantizedModel CRD");
    wait_for(
        &crds,
        &crd_name,
        is_crd_established(),
        Duration::from_secs(30),
    )
    .await
    .expect("CRD quantizedmodels.quantops.dev to become Established");

    let qm: QuantizedModel = serde_json::from_value(serde_json::json!({
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
