//! Jobs run to completion on the test node: the Job controller makes a Pod,
//! the scheduler binds it, the node agent runs its command and reports the
//! exit code and termination message like a kubelet.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ContainerStateTerminated, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::wait::conditions::is_job_completed;
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};

fn job(name: &str, script: &str) -> Job {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name },
        "spec": {
            "backoffLimit": 0,
            "template": { "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "busybox:1.36",
                    "command": ["sh", "-c", script],
                    "env": [{ "name": "POD_NAME",
                              "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                    "volumeMounts": [{ "name": "cfg", "mountPath": "/etc/quantops-e2e" }]
                }],
                "volumes": [{ "name": "cfg", "configMap": { "name": "greeting" } }]
            }}
        }
    }))
    .expect("a valid Job")
}

/// The Job has the condition `Failed=True` (kube-runtime only ships the
/// Complete twin).
fn is_job_failed(job: Option<&Job>) -> bool {
    job.and_then(|j| j.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
}

/// The one pod of a finished Job and its container's terminated state.
async fn terminated(pods: &Api<Pod>, job: &str) -> (Pod, ContainerStateTerminated) {
    let list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .expect("list the Job's pods");
    assert_eq!(list.items.len(), 1, "backoffLimit 0 means exactly one pod");
    let pod = list.items.into_iter().next().expect("one pod");
    let state = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone())
        .expect("the container reports a terminated state");
    (pod, state)
}

async fn setup(env: &TestEnv) {
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "greeting" },
        "data": { "text": "hello from a configmap" }
    }))
    .expect("a valid ConfigMap");
    apply(&env.api::<ConfigMap>(), "greeting", &cm)
        .await
        .expect("apply the ConfigMap");
}

#[tokio::test]
async fn job_succeeds_with_termination_message() {
    init_tracing();
    let env = TestEnv::new("job-ok")
        .await
        .expect("test cluster and namespace");
    setup(&env).await;
    let jobs: Api<Job> = env.api();
    let script = r#"echo "{\"ok\":true,\"pod\":\"$POD_NAME\",\"text\":\"$(cat /etc/quantops-e2e/text)\"}" > /dev/termination-log; echo done"#;
    apply(&jobs, "ok", &job("ok", script))
        .await
        .expect("apply the Job");
    wait_for(&jobs, "ok", is_job_completed(), Duration::from_secs(90))
        .await
        .expect("Job ok to complete");

    let (pod, t) = terminated(&env.api(), "ok").await;
    let pod_name = pod.metadata.name.clone().expect("pod name");
    assert_eq!(t.exit_code, 0);
    assert_eq!(t.reason.as_deref(), Some("Completed"));
    let msg: serde_json::Value = serde_json::from_str(t.message.as_deref().unwrap_or_default())
        .expect("the message is the JSON the command wrote");
    assert_eq!(msg["ok"], true);
    assert_eq!(
        msg["pod"],
        pod_name.as_str(),
        "fieldRef env reached the process"
    );
    assert_eq!(
        msg["text"], "hello from a configmap",
        "the ConfigMap volume is mounted"
    );
    assert!(t.started_at.is_some() && t.finished_at.is_some());
    let status = pod.status.expect("pod status");
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        pod.spec.and_then(|s| s.node_name).as_deref(),
        Some(quantops_e2e::TEST_NODE)
    );
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn job_fails_with_exit_code_and_message() {
    init_tracing();
    let env = TestEnv::new("job-fail")
        .await
        .expect("test cluster and namespace");
    setup(&env).await;
    let jobs: Api<Job> = env.api();
    let script = "echo 'calibration data missing' > /dev/termination-log; echo oops >&2; exit 3";
    apply(&jobs, "broken", &job("broken", script))
        .await
        .expect("apply the Job");
    wait_for(&jobs, "broken", is_job_failed, Duration::from_secs(90))
        .await
        .expect("Job broken to fail");

    let (pod, t) = terminated(&env.api(), "broken").await;
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert_eq!(t.message.as_deref(), Some("calibration data missing\n"));
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Failed"));
    env.cleanup().await.expect("delete the test namespace");
}
