//! Leader election when the API server stops answering: the control plane
//! (one Go process, `$QUANTOPS_TEST_DIR/cluster.pid`) is frozen with
//! SIGSTOP. The leader must step down — exit, logging why — before its
//! Lease expires, and the standby lead once the API server is back.
//!
//! Disruptive for everything using the cluster, so it is alone in this test
//! binary: cargo runs test binaries one after another.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use quantops_api::QuantizedModel;
use quantops_e2e::operator::{Operator, OperatorOptions, install_chart, sim_worker_image};
use quantops_e2e::{TestEnv, apply, init_tracing, test_dir, wait_for};

/// Short timings, so the test waits seconds rather than the defaults' 15.
const LEASE_DURATION_S: u64 = 8;
const RENEW_DEADLINE_S: u64 = 4;
const RETRY_PERIOD_S: u64 = 1;

fn options(identity: &str) -> OperatorOptions {
    let mut options = OperatorOptions::new(identity, &sim_worker_image(1));
    options.extra_env = [
        ("QUANTOPS_LEASE_DURATION", LEASE_DURATION_S),
        ("QUANTOPS_RENEW_DEADLINE", RENEW_DEADLINE_S),
        ("QUANTOPS_RETRY_PERIOD", RETRY_PERIOD_S),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    options
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

/// The control plane stopped with SIGSTOP; continued (SIGCONT) when
/// dropped, a failed assertion included, so the cluster always recovers.
struct Frozen {
    pid: String,
}

impl Frozen {
    fn freeze() -> Frozen {
        let file = test_dir().join("cluster.pid");
        let pid = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e} (is the test cluster up?)", file.display()))
            .trim()
            .to_string();
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "kill -STOP {pid}: {status:?}"
        );
        Frozen { pid }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // No assertion here: a panic while unwinding would abort the test.
        let continued = std::process::Command::new("kill")
            .args(["-CONT", &self.pid])
            .status();
        if !continued.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("kill -CONT {}: {continued:?}", self.pid);
        }
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_steps_down_before_its_lease_expires() {
    init_tracing();
    let env = TestEnv::new("leader-freeze").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    let mut leader = Operator::start(&env, options("quantops-a"))
        .await
        .expect("start replica a");
    wait_for_holder(&env, "quantops-a", Duration::from_secs(30)).await;
    let standby = Operator::start(&env, options("quantops-b"))
        .await
        .expect("start replica b");
    // Both replicas at work: the leader renewing, the standby asking.
    tokio::time::sleep(Duration::from_secs(2 * RETRY_PERIOD_S)).await;
    assert_eq!(
        leader.metric("quantops_leader").await.expect("scrape a"),
        Some(1.0)
    );

    let frozen = Frozen::freeze();
    let began = tokio::time::Instant::now();
    let exited = leader.wait_exit(Duration::from_secs(20)).await;
    let stepped_down_after = began.elapsed();
    // Frozen long enough that the Lease expired for the standby too.
    let thaw_at = began + Duration::from_secs(LEASE_DURATION_S + 2);
    tokio::time::sleep_until(thaw_at).await;
    drop(frozen);

    let log = leader.log_text();
    let status = exited.unwrap_or_else(|e| panic!("{e}\nleader log:\n{log}"));
    assert!(
        !status.success(),
        "a leader that lost its Lease exits with a failure: {status}"
    );
    // Its last renewal was before the freeze, so its Lease was valid at
    // least LEASE_DURATION_S after `began`: it stopped before that.
    assert!(
        stepped_down_after < Duration::from_secs(LEASE_DURATION_S),
        "stepped down {stepped_down_after:?} into the freeze, after its Lease may have expired"
    );
    let warned = log.lines().find(|line| {
        line.contains("renew deadline passed without a successful renewal")
            && line.contains(r#""lease":"quantops-operator""#)
            && line.contains("since_renewal_s")
    });
    assert!(
        warned.is_some(),
        "no step-down warning with the lease and the time since the last renewal:\n{log}"
    );
    assert!(log.contains("lost leadership: exiting"), "{log}");

    // The API server is back: the standby takes over and reconciles.
    wait_for_holder(&env, "quantops-b", Duration::from_secs(60)).await;
    let qms = env.api::<QuantizedModel>();
    let qm: QuantizedModel = serde_json::from_value(serde_json::json!({
        "apiVersion": "quantops.dev/v1alpha1", "kind": "QuantizedModel",
        "metadata": {"name": "after-the-freeze"},
        "spec": {
            "baseModel": {"name": "tiny-llama", "path": "tiny-llama"},
            "version": "v1",
            "quantization": {"method": "rtn", "bits": 4, "groupSize": 128},
            "validation": {"evalText": {"path": "text/eval.txt"}},
            "output": {"path": "out"},
            "resources": {"gpus": 0}
        }
    }))
    .expect("a QuantizedModel");
    apply(&qms, "after-the-freeze", &qm)
        .await
        .expect("apply a model");
    wait_for(
        &qms,
        "after-the-freeze",
        |qm: Option<&QuantizedModel>| qm.and_then(|q| q.status.as_ref()).is_some(),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nstandby log:\n{}", standby.log_text()));
    assert_eq!(
        standby.metric("quantops_leader").await.expect("scrape b"),
        Some(1.0)
    );
    drop(standby);
    env.cleanup().await.expect("delete the test namespace");
}
