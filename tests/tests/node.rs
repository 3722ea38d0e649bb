//! What the test node agent promises beyond plain Jobs: the GPU node shape
//! the chart's selectors need, claims mapped to host directories, and a clear
//! failure for images it cannot run.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use quantops_e2e::{TEST_NODE, TestEnv, apply, init_tracing, wait_for};

/// The pod reached Succeeded or Failed.
fn is_pod_finished(pod: Option<&Pod>) -> bool {
    matches!(
        pod.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn pod(name: &str, image: &str, script: &str, claim: Option<&str>) -> Pod {
    let mut spec = serde_json::json!({
        "restartPolicy": "Never",
        "nodeSelector": { "quantops.dev/gpu-node": "true" },
        "containers": [{
            "name": "main", "image": image, "command": ["sh", "-c", script],
            "resources": { "limits": { "nvidia.com/gpu": "1" } }
        }]
    });
    if let Some(claim) = claim {
        spec["containers"][0]["volumeMounts"] =
            serde_json::json!([{ "name": "models", "mountPath": "/models" }]);
        spec["volumes"] = serde_json::json!([{ "name": "models", "persistentVolumeClaim": { "claimName": claim } }]);
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec
    }))
    .expect("a valid Pod")
}

#[tokio::test]
async fn node_offers_gpus_and_maps_claims_to_host_directories() {
    init_tracing();
    let mut env = TestEnv::new("node")
        .await
        .expect("test cluster and namespace");
    let node = Api::<Node>::all(env.client.clone())
        .get(TEST_NODE)
        .await
        .expect("the test node is registered");
    let labels = node.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("quantops.dev/gpu-node").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        labels.get("nvidia.com/gpu.present").map(String::as_str),
        Some("true")
    );
    let gpus = node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get("nvidia.com/gpu").cloned())
        .expect("the node advertises nvidia.com/gpu");
    assert_eq!(gpus.0, "8");

    let dir = env
        .host_path_pvc("models")
        .await
        .expect("a bound hostPath claim");
    let pods: Api<Pod> = env.api();
    let script =
        "echo quantized > /models/artifact.txt && cat /models/artifact.txt > /dev/termination-log";
    apply(
        &pods,
        "writer",
        &pod("writer", "busybox:1.36", script, Some("models")),
    )
    .await
    .expect("apply the pod");
    let done = wait_for(&pods, "writer", is_pod_finished, Duration::from_secs(60))
        .await
        .expect("the GPU pod with a claim to finish")
        .expect("the pod exists");
    let status = done.status.expect("pod status");
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "status: {status:?}"
    );
    let written = std::fs::read_to_string(dir.join("artifact.txt"))
        .expect("the file is in the PV's host directory");
    assert_eq!(written, "quantized\n");
    env.cleanup()
        .await
        .expect("delete the test namespace and volume");
}

#[tokio::test]
async fn unmapped_image_fails_with_err_image_pull() {
    init_tracing();
    let env = TestEnv::new("image")
        .await
        .expect("test cluster and namespace");
    let pods: Api<Pod> = env.api();
    apply(
        &pods,
        "nope",
        &pod("nope", "registry.example/not-mapped:1", "true", None),
    )
    .await
    .expect("apply the pod");
    let done = wait_for(&pods, "nope", is_pod_finished, Duration::from_secs(60))
        .await
        .expect("the pod with an unmapped image to fail")
        .expect("the pod exists");
    let status = done.status.expect("pod status");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("ErrImagePull"));
    let waiting = status
        .container_statuses
        .and_then(|cs| cs.into_iter().next())
        .and_then(|c| c.state)
        .and_then(|s| s.waiting)
        .expect("the container is left waiting");
    assert_eq!(waiting.reason.as_deref(), Some("ErrImagePull"));
    assert!(
        waiting
            .message
            .unwrap_or_default()
            .contains("registry.example/not-mapped:1"),
        "the message names the image"
    );
    env.cleanup().await.expect("delete the test namespace");
}
