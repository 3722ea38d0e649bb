//! Owner references cascade: deleting a Job's owner makes the garbage
//! collector delete the Job, then its Pod, and the test node stops the pod's
//! running process and finalizes the deletion.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::wait::conditions::is_pod_running;
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};

/// The object no longer exists.
fn is_gone<K>(obj: Option<&K>) -> bool {
    obj.is_none()
}

#[tokio::test]
async fn deleting_the_owner_collects_the_job_and_its_pods() {
    init_tracing();
    let env = TestEnv::new("gc")
        .await
        .expect("test cluster and namespace");
    let cms: Api<ConfigMap> = env.api();
    let owner: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "owner" }, "data": {}
    }))
    .expect("a valid ConfigMap");
    let owner = apply(&cms, "owner", &owner).await.expect("apply the owner");
    let uid = owner.metadata.uid.clone().expect("the owner has a uid");

    let jobs: Api<Job> = env.api();
    let job: Job = serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": "owned",
            "ownerReferences": [{ "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                  "uid": uid, "blockOwnerDeletion": true }]
        },
        "spec": { "backoffLimit": 0, "template": { "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{ "name": "main", "image": "busybox:1.36",
                             "command": ["sh", "-c", "sleep 300"] }]
        }}}
    }))
    .expect("a valid Job");
    apply(&jobs, "owned", &job)
        .await
        .expect("apply the owned Job");

    let pods: Api<Pod> = env.api();
    let selector = ListParams::default().labels("batch.kubernetes.io/job-name=owned");
    let pod_name = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let list = pods.list(&selector).await.expect("list the Job's pods");
            if let Some(name) = list.items.first().and_then(|p| p.metadata.name.clone()) {
                break name;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after 60s waiting for the Job controller to create a pod"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    wait_for(&pods, &pod_name, is_pod_running(), Duration::from_secs(60))
        .await
        .expect("the Job's pod to be Running");

    cms.delete("owner", &DeleteParams::foreground())
        .await
        .expect("delete the owner");
    wait_for(&pods, &pod_name, is_gone, Duration::from_secs(60))
        .await
        .expect("the pod to be garbage-collected and removed by the node");
    wait_for(&jobs, "owned", is_gone, Duration::from_secs(60))
        .await
        .expect("the Job to be garbage-collected");
    wait_for(&cms, "owner", is_gone, Duration::from_secs(60))
        .await
        .expect("the owner to finish its foreground deletion");
    env.cleanup().await.expect("delete the test namespace");
}
