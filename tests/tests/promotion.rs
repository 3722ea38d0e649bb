//! ModelPromotion end to end: the operator (the chart's identity) commits to
//! a real git server on loopback over SSH with a key Secret (the operator
//! never sends credentials over plain HTTP), the test reads the repository
//! back over HTTP with basic auth, plays Argo CD (applies the committed
//! folder with `kubectl apply -k` at that revision and writes the
//! Application's status) and Argo Rollouts (writes the Rollout's status).

use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use quantops_api::{ModelPromotion, QuantizedModel};
use quantops_e2e::gitops::{
    EnvironmentNamespaces, GitServer, ScratchDir, argo_sync, files_at, install_argo_crds, log,
    set_rollout_status,
};
use quantops_e2e::operator::{Operator, OperatorOptions, install_chart, sim_worker_image};
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};

/// One test's world: namespace, chart, Argo CRDs, environment namespaces,
/// a fresh repository with its SSH credentials Secret, and the operator.
struct World {
    env: TestEnv,
    envs: EnvironmentNamespaces,
    server: GitServer,
    /// The repository over HTTP (the harness reads it back with basic auth).
    url: String,
    /// The same repository over SSH: what the promotions name.
    ssh_url: String,
    operator: Operator,
}

/// Failed git writes are retried after 1 s, 2 s, 4 s, ... five times, so
/// the tests see the whole bounded sequence in seconds.
const RETRY_ENV: [(&str, &str); 2] = [
    ("QUANTOPS_GIT_RETRY_DELAY", "1"),
    ("QUANTOPS_MAX_GIT_ATTEMPTS", "5"),
];

async fn world(prefix: &str, worker_image: &str, key: Option<&str>) -> World {
    world_with(prefix, worker_image, key, &[]).await
}

/// A world whose operator gets `env` on top of the defaults (later entries
/// win).
async fn world_with(
    prefix: &str,
    worker_image: &str,
    key: Option<&str>,
    env_vars: &[(&str, &str)],
) -> World {
    init_tracing();
    let mut env = TestEnv::new(prefix).await.expect("test namespace");
    let envs = EnvironmentNamespaces::create(&env, &["experiment", "test", "prod"])
        .await
        .expect("environment namespaces");
    // The chart's Roles for the Argo reads go where this test's Argo CD
    // (its own namespace) and prod namespace are.
    install_chart(
        &env,
        &[
            &format!("promotion.argocdNamespace={}", env.namespace),
            &format!("promotion.environmentNamespace={}", envs.pattern()),
        ],
    )
    .await
    .expect("install the chart");
    install_argo_crds(&env).await.expect("Argo CRDs");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let server = GitServer::start().await.expect("git server");
    let url = server.create_repo(prefix).await.expect("repository");
    let ssh_url = server.ssh_url(&url).expect("the repository's SSH URL");
    server
        .ssh_credentials_secret(&env, "gitops-credentials", key)
        .await
        .expect("credentials Secret");
    let mut options = OperatorOptions::new("quantops-0", worker_image);
    options.extra_env = vec![
        ("QUANTOPS_ARGOCD_NAMESPACE".into(), env.namespace.clone()),
        ("QUANTOPS_ENVIRONMENT_NAMESPACE".into(), envs.pattern()),
    ];
    for (key, value) in RETRY_ENV.iter().chain(env_vars) {
        options.extra_env.push((key.to_string(), value.to_string()));
    }
    let operator = Operator::start(&env, options)
        .await
        .expect("start the operator");
    World {
        env,
        envs,
        server,
        url,
        ssh_url,
        operator,
    }
}

impl World {
    fn authenticated(&self) -> String {
        self.server.authenticated_url(&self.url)
    }

    /// A QuantizedModel writing its own artifact directory (two of one base
    /// model in one output folder would be an `OutputConflict`).
    async fn model(&self, name: &str, base: &str) {
        let qm: QuantizedModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "QuantizedModel",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"name": base, "path": "tiny-llama"},
                "version": "v1",
                "quantization": {"method": "rtn", "bits": 4, "groupSize": 128},
                "validation": {"evalText": {"path": "text/eval.txt"}},
                "output": {"path": format!("out/{name}")},
                "resources": {"gpus": 0}
            }
        }))
        .expect("a QuantizedModel");
        apply(&self.env.api::<QuantizedModel>(), name, &qm)
            .await
            .expect("apply the model");
        let validated = |qm: Option<&QuantizedModel>| {
            qm.and_then(|q| q.status.as_ref())
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Validated"))
                .is_some()
        };
        wait_for(
            &self.env.api::<QuantizedModel>(),
            name,
            validated,
            Duration::from_secs(120),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", self.operator.log_text()));
    }

    async fn promote(&self, name: &str, model: &str, environment: &str) {
        self.promote_with(name, model, environment, serde_json::Value::Null)
            .await;
    }

    /// A promotion with `quality` as its `spec.quality` (none when null).
    async fn promote_with(
        &self,
        name: &str,
        model: &str,
        environment: &str,
        quality: serde_json::Value,
    ) {
        let gitops = serde_json::json!({
            "url": self.ssh_url, "branch": "main", "credentialsSecret": "gitops-credentials"
        });
        self.promote_to(name, model, environment, gitops, quality)
            .await;
    }

    /// A promotion with `gitops` as its `spec.gitops`.
    async fn promote_to(
        &self,
        name: &str,
        model: &str,
        environment: &str,
        gitops: serde_json::Value,
        quality: serde_json::Value,
    ) {
        let mut mp = serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": name},
            "spec": {
                "modelRef": {"name": model},
                "environment": environment,
                "gitops": gitops,
                "serving": {"runtime": "vllm", "replicas": 1, "maxModelLen": 2048, "gpuMemoryUtilization": 0.9},
                "canary": {"steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "10m"}]}
            }
        });
        if !quality.is_null() {
            mp["spec"]["quality"] = quality;
        }
        let mp: ModelPromotion = serde_json::from_value(mp).expect("a ModelPromotion");
        apply(&self.env.api::<ModelPromotion>(), name, &mp)
            .await
            .expect("apply the promotion");
    }

    async fn wait(
        &self,
        name: &str,
        what: &str,
        cond: impl Fn(&ModelPromotion) -> bool + Send + 'static,
    ) -> ModelPromotion {
        wait_for(
            &self.env.api::<ModelPromotion>(),
            name,
            move |mp: Option<&ModelPromotion>| mp.is_some_and(&cond),
            Duration::from_secs(120),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{name} {what}: {e}\noperator log:\n{}",
                self.operator.log_text()
            )
        })
        .expect("the promotion exists")
    }

    async fn committed(&self, name: &str) -> String {
        let mp = self
            .wait(name, "to commit", |mp| status(mp).commit.is_some())
            .await;
        status(&mp).commit.expect("commit")
    }

    /// Argo CD syncs the model's folder of `environment` at `revision`.
    async fn sync(&self, environment: &str, model: &str, revision: &str) {
        argo_sync(
            &self.env,
            &self.env.namespace,
            &format!("{environment}-{model}"),
            &self.authenticated(),
            revision,
            &format!("envs/{environment}/{model}"),
            &self.envs.name(environment),
        )
        .await
        .expect("Argo CD sync");
    }

    async fn cleanup(self) {
        drop(self.operator);
        self.envs
            .cleanup()
            .await
            .expect("delete the environment namespaces");
        self.env.cleanup().await.expect("delete the test namespace");
    }
}

fn status(mp: &ModelPromotion) -> quantops_api::ModelPromotionStatus {
    mp.status.clone().unwrap_or_default()
}

fn phase_is(want: &'static str) -> impl Fn(&ModelPromotion) -> bool + Send + 'static {
    move |mp| status(mp).phase.as_deref() == Some(want)
}

fn condition(mp: &ModelPromotion, type_: &str) -> Option<(String, String, String)> {
    status(mp)
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Commits carrying a promotion's trailer.
async fn commits_of(url: &str, promotion: &str) -> usize {
    log(url, "main")
        .await
        .expect("git log")
        .iter()
        .filter(|c| {
            c.body.contains(&format!("Quantops-Promotion: {promotion}"))
                && !c.subject.starts_with("Revert")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gate_blocks_the_promotion_and_makes_no_commit() {
    let w = world("promo-gate", "quantops/quantizer-job:sim-0-failgate", None).await;
    let before = log(&w.authenticated(), "main")
        .await
        .expect("git log")
        .len();
    w.model("strict", "example/tiny-llama").await;
    w.promote("strict-test", "strict", "test").await;
    let mp = w
        .wait("strict-test", "to be refused", phase_is("Blocked"))
        .await;
    let (s, reason, message) = condition(&mp, "GatesPassed").expect("GatesPassed");
    assert_eq!(
        (s.as_str(), reason.as_str()),
        ("False", "NotValidated"),
        "{message}"
    );
    assert!(status(&mp).commit.is_none());

    // Prod is refused before test has the variant, whatever the gates say.
    w.promote("strict-prod", "strict", "prod").await;
    w.wait("strict-prod", "to be refused", phase_is("Blocked"))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        log(&w.authenticated(), "main")
            .await
            .expect("git log")
            .len(),
        before,
        "no commit"
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variant_moves_through_experiment_test_and_prod() {
    let w = world("promo-happy", &sim_worker_image(0), None).await;
    let auth = w.authenticated();
    w.model("tiny", "example/tiny-llama").await;
    let ns = w.env.namespace.clone();

    for environment in ["experiment", "test", "prod"] {
        let name = format!("tiny-{environment}");
        w.promote(&name, "tiny", environment).await;
        let sha = w.committed(&name).await;
        // The commit, file by file.
        let files = files_at(&auth, &sha, &format!("envs/{environment}/tiny-llama"))
            .await
            .expect("files at the commit");
        let mut names: Vec<&str> = files.keys().map(String::as_str).collect();
        names.sort();
        if environment == "prod" {
            assert_eq!(
                names,
                [
                    "README.md",
                    "analysistemplate.yaml",
                    "kustomization.yaml",
                    "rollout.yaml",
                    "service.yaml"
                ]
            );
            assert!(
                files["rollout.yaml"].contains("setWeight: 10"),
                "{}",
                files["rollout.yaml"]
            );
            assert!(files["analysistemplate.yaml"].contains("quantops_quality_score"));
        } else {
            assert_eq!(
                names,
                [
                    "README.md",
                    "deployment.yaml",
                    "kustomization.yaml",
                    "service.yaml"
                ]
            );
            let deployment = &files["deployment.yaml"];
            assert!(deployment.contains("--quantization"), "{deployment}");
            assert!(deployment.contains("compressed-tensors"), "{deployment}");
            assert!(deployment.contains("/health"), "{deployment}");
            assert!(deployment.contains("nvidia.com/gpu"), "{deployment}");
        }
        assert!(files["kustomization.yaml"].contains(&w.envs.name(environment)));
        assert!(
            files["README.md"].contains("tiny-sim"),
            "the card names the variant"
        );
        let commit = log(&auth, "main")
            .await
            .expect("git log")
            .into_iter()
            .find(|c| c.sha == sha)
            .expect("the commit is on main");
        assert!(
            commit.subject.contains("tiny-sim") && commit.subject.contains(environment),
            "{}",
            commit.subject
        );
        assert!(
            commit.body.contains("perplexity")
                && commit
                    .body
                    .contains(&format!("Quantops-Promotion: {ns}/{name}")),
            "{}",
            commit.body
        );

        w.sync(environment, "tiny-llama", &sha).await;
        if environment == "prod" {
            let mp = w
                .wait(&name, "to follow the canary", phase_is("Canary"))
                .await;
            assert_eq!(
                condition(&mp, "Synced").map(|c| c.0),
                Some("True".to_string())
            );
            set_rollout_status(
                &w.env,
                &w.envs.name("prod"),
                "tiny-llama",
                "Healthy",
                false,
                "",
            )
            .await
            .expect("Rollout status");
        }
        let mp = w.wait(&name, "to be promoted", phase_is("Promoted")).await;
        for type_ in ["GatesPassed", "Committed", "Synced", "Promoted"] {
            assert_eq!(
                condition(&mp, type_).map(|c| c.0),
                Some("True".to_string()),
                "{type_}"
            );
        }
        assert_eq!(status(&mp).variant.as_deref(), Some("tiny-sim"));
        assert_eq!(commits_of(&auth, &format!("{ns}/{name}")).await, 1);
    }
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_promoted_at_once_both_land() {
    let w = world("promo-race", &sim_worker_image(0), None).await;
    let auth = w.authenticated();
    w.model("alpha", "example/alpha").await;
    w.model("beta", "example/beta").await;
    w.promote("alpha-experiment", "alpha", "experiment").await;
    w.promote("beta-experiment", "beta", "experiment").await;
    let a = w.committed("alpha-experiment").await;
    let b = w.committed("beta-experiment").await;
    assert_ne!(a, b);
    let history: Vec<String> = log(&auth, "main")
        .await
        .expect("git log")
        .into_iter()
        .map(|c| c.sha)
        .collect();
    assert!(
        history.contains(&a) && history.contains(&b),
        "both commits are on main"
    );
    let head = &history[0];
    for model in ["alpha", "beta"] {
        let files = files_at(&auth, head, &format!("envs/experiment/{model}"))
            .await
            .expect("files");
        assert!(
            files.contains_key("deployment.yaml"),
            "{model} is in the head tree"
        );
    }
    w.cleanup().await;
}

/// A fresh ed25519 private key, one the test git server does not know.
fn unknown_ssh_key() -> String {
    let scratch = ScratchDir::new("key").expect("scratch dir");
    let path = scratch.path().join("id_ed25519");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "unknown", "-f"])
        .arg(&path)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&path).expect("the key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_reported_and_retried_with_backoff() {
    let key = unknown_ssh_key();
    // 2 s, 4 s, 8 s, ...: time enough to fix the Secret before the last.
    let slower = [
        ("QUANTOPS_GIT_RETRY_DELAY", "2"),
        ("QUANTOPS_MAX_GIT_ATTEMPTS", "6"),
    ];
    let w = world_with("promo-auth", &sim_worker_image(0), Some(&key), &slower).await;
    w.model("tiny", "example/tiny-llama").await;
    w.promote("tiny-experiment", "tiny", "experiment").await;
    let mp = w
        .wait("tiny-experiment", "to retry the refused push", |mp| {
            status(mp).git_attempts >= 2
        })
        .await;
    let (s, reason, message) = condition(&mp, "Committed").expect("Committed");
    assert_eq!((s.as_str(), reason.as_str()), ("False", "AuthRefused"));
    assert!(message.contains("127.0.0.1"), "{message}");
    assert!(
        message.contains("of 6; next in"),
        "the attempt and the backoff: {message}"
    );
    assert!(
        !message.contains("PRIVATE KEY") && !message.contains(key.trim()),
        "no secret in the message: {message}"
    );
    assert_eq!(status(&mp).phase.as_deref(), Some("Blocked"));
    assert!(status(&mp).next_git_attempt_time.is_some());

    // With the right key the next retry lands.
    w.server
        .ssh_credentials_secret(&w.env, "gitops-credentials", None)
        .await
        .expect("fix the Secret");
    let sha = w.committed("tiny-experiment").await;
    assert_eq!(
        commits_of(
            &w.authenticated(),
            &format!("{}/tiny-experiment", w.env.namespace)
        )
        .await,
        1
    );
    assert!(!sha.is_empty());
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_canary_is_reverted() {
    let w = world("promo-canary", &sim_worker_image(0), None).await;
    let auth = w.authenticated();
    w.model("tiny", "example/tiny-llama").await;
    w.promote("tiny-test", "tiny", "test").await;
    let test_sha = w.committed("tiny-test").await;
    w.sync("test", "tiny-llama", &test_sha).await;
    w.wait("tiny-test", "to be promoted", phase_is("Promoted"))
        .await;

    w.promote("tiny-prod", "tiny", "prod").await;
    let prod_sha = w.committed("tiny-prod").await;
    w.sync("prod", "tiny-llama", &prod_sha).await;
    w.wait("tiny-prod", "to follow the canary", phase_is("Canary"))
        .await;
    set_rollout_status(
        &w.env,
        &w.envs.name("prod"),
        "tiny-llama",
        "Degraded",
        true,
        "RolloutAborted: Metric \"error-rate\" assessed Failed due to failed (1) > failureLimit (0) in AnalysisRun tiny-llama-abc",
    )
    .await
    .expect("Rollout status");
    let mp = w
        .wait("tiny-prod", "to roll back", phase_is("RolledBack"))
        .await;
    let revert = status(&mp).revert_commit.expect("revert commit");
    let (s, reason, _) = condition(&mp, "CanaryHealthy").expect("CanaryHealthy");
    assert_eq!((s.as_str(), reason.as_str()), ("False", "AnalysisFailed"));
    let commit = log(&auth, "main")
        .await
        .expect("git log")
        .into_iter()
        .find(|c| c.sha == revert)
        .expect("revert on main");
    assert!(commit.subject.starts_with("Revert"), "{}", commit.subject);
    assert!(commit.body.contains(&prod_sha), "{}", commit.body);
    // The first promotion into prod is undone: the folder is gone; test stays.
    let prod = files_at(&auth, &revert, "envs/prod/tiny-llama")
        .await
        .expect("files");
    assert!(prod.is_empty(), "{prod:?}");
    let test = files_at(&auth, &revert, "envs/test/tiny-llama")
        .await
        .expect("files");
    assert!(!test.is_empty());
    // Re-reconciling makes no second revert.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reverts = log(&auth, "main")
        .await
        .expect("git log")
        .iter()
        .filter(|c| c.subject.starts_with("Revert"))
        .count();
    assert_eq!(reverts, 1);
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_commit_and_sync_makes_no_second_commit() {
    let w = world("promo-restart", &sim_worker_image(0), None).await;
    let auth = w.authenticated();
    w.model("tiny", "example/tiny-llama").await;
    w.promote("tiny-experiment", "tiny", "experiment").await;
    let sha = w.committed("tiny-experiment").await;

    // The operator dies, and the status it wrote is lost with it: the
    // restarted one must find the commit in the repository, not make another.
    let World {
        env,
        envs,
        server,
        url,
        ssh_url,
        operator,
    } = w;
    let operator = operator.restart().await.expect("restart the operator");
    let promotions = env.api::<ModelPromotion>();
    promotions
        .patch_status(
            "tiny-experiment",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"status": {"commit": null, "conditions": null, "phase": null}}),
            ),
        )
        .await
        .expect("wipe the status");
    let w = World {
        env,
        envs,
        server,
        url,
        ssh_url,
        operator,
    };
    let again = w.committed("tiny-experiment").await;
    assert_eq!(again, sha, "the same commit is found again");
    w.sync("experiment", "tiny-llama", &sha).await;
    w.wait("tiny-experiment", "to be promoted", phase_is("Promoted"))
        .await;
    assert_eq!(
        commits_of(&auth, &format!("{}/tiny-experiment", w.env.namespace)).await,
        1
    );
    w.cleanup().await;
}

/// A probe Job as the promotion's CronJob would create it (its job
/// template's labels and annotations), whose pod writes `message` to its
/// termination log and exits with `exit_code`: the test node runs it, the
/// Job controller finishes it. Stands in for `quantizer-job probe`, which
/// this branch does not build.
async fn probe_job(w: &World, cronjob: &CronJob, name: &str, message: &str, exit_code: i32) {
    let template = cronjob
        .spec
        .as_ref()
        .and_then(|s| s.job_template.metadata.clone())
        .expect("the CronJob's job template metadata");
    let job: Job = serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": name,
            "labels": template.labels,
            "annotations": template.annotations,
            "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "CronJob",
                "name": cronjob.name_any(), "uid": cronjob.uid().expect("uid"),
            }],
        },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": template.labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "quantizer",
                        "image": "busybox:1.36",
                        "command": ["sh", "-c", "printf '%s' \"$MESSAGE\" > /dev/termination-log; exit $CODE"],
                        "env": [
                            {"name": "MESSAGE", "value": message},
                            {"name": "CODE", "value": exit_code.to_string()}
                        ]
                    }]
                }
            }
        }
    }))
    .expect("a probe Job");
    apply(&w.env.api::<Job>(), name, &job)
        .await
        .expect("create the probe Job");
}

/// Polls the operator's `/metrics` until `sample` is `want` (at most 30 s);
/// its last value.
async fn metric_reaching(w: &World, sample: &str, want: f64) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = w.operator.metric(sample).await.expect("metrics");
        let reached = value.is_some_and(|v| (v - want).abs() < 1e-9);
        if reached || tokio::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn probe_result(score: f64, minute: u32, variant: &str) -> String {
    serde_json::json!({
        "kind": "probe", "model": "tiny-llama", "variant": variant, "environment": "experiment",
        "score": score, "passed": (score * 10.0).round() as u32, "total": 10, "failures": 0,
        "latency_seconds": {"mean": 0.2, "p50": 0.2, "p90": 0.3, "max": 0.5},
        "finished_at": format!("2025-01-01T00:{minute:02}:00Z"),
    })
    .to_string()
}

fn quality(mp: &ModelPromotion) -> quantops_api::QualityStatus {
    status(mp).quality.unwrap_or_default()
}

fn sample_jobs(mp: &ModelPromotion) -> Vec<String> {
    quality(mp).samples.into_iter().map(|s| s.job).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_probes_fill_the_window_and_flag_a_regression_once() {
    let w = world("promo-quality", &sim_worker_image(0), None).await;
    w.model("tiny", "example/tiny-llama").await;
    // A schedule that never comes during the test: the probe Jobs below are
    // the test's own, labelled as the CronJob labels its Jobs.
    let spec = serde_json::json!({
        "schedule": "0 0 1 1 *", "threshold": 0.8, "window": 3, "suite": "probes/suite.yaml"
    });
    w.promote_with("tiny-experiment", "tiny", "experiment", spec)
        .await;
    let sha = w.committed("tiny-experiment").await;
    w.sync("experiment", "tiny-llama", &sha).await;
    let mp = w
        .wait("tiny-experiment", "to be promoted", phase_is("Promoted"))
        .await;
    let variant = status(&mp).variant.expect("variant");

    // The CronJob: the probe command, the schedule, owned by the promotion.
    let cronjobs = w.env.api::<CronJob>();
    let cronjob = wait_for(
        &cronjobs,
        "tiny-experiment-quality",
        |c: Option<&CronJob>| c.is_some(),
        Duration::from_secs(60),
    )
    .await
    .expect("the probe CronJob")
    .expect("exists");
    let spec = cronjob.spec.clone().expect("spec");
    assert_eq!(spec.schedule, "0 0 1 1 *");
    let owner = &cronjob.owner_references()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            Some(owner.uid.clone()),
            owner.controller
        ),
        ("ModelPromotion", mp.uid(), Some(true))
    );
    let pod = spec
        .job_template
        .spec
        .and_then(|j| j.template.spec)
        .expect("pod spec");
    let command = pod.containers[0].command.clone().unwrap_or_default();
    let endpoint = format!("http://tiny-llama.{}.svc:8000", w.envs.name("experiment"));
    let after = |flag: &str| {
        command
            .iter()
            .position(|a| a == flag)
            .and_then(|i| command.get(i + 1))
            .cloned()
    };
    assert_eq!(command[..2], ["quantizer-job", "probe"]);
    assert_eq!(after("--endpoint"), Some(endpoint));
    assert_eq!(after("--model").as_deref(), Some("tiny-llama"));
    assert_eq!(after("--suite").as_deref(), Some("probes/suite.yaml"));
    assert_eq!(after("--variant"), Some(variant.clone()));
    assert_eq!(after("--environment").as_deref(), Some("experiment"));
    assert_eq!(after("--threshold").as_deref(), Some("0.8"));
    assert_eq!(after("--window").as_deref(), Some("3"));

    let regressions = format!(
        r#"quantops_quality_regression_alerts_total{{environment="experiment",model="tiny-llama",variant="{variant}"}}"#
    );
    let condition_is = |type_: &'static str, want: &'static str, reason: &'static str| {
        move |mp: &ModelPromotion| {
            condition(mp, type_).is_some_and(|(s, r, _)| s == want && r == reason)
        }
    };

    // 1. A good run: one sample, within the threshold.
    probe_job(&w, &cronjob, "probe-1", &probe_result(0.9, 1, &variant), 0).await;
    let mp = w
        .wait("tiny-experiment", "to record probe-1", |mp| {
            sample_jobs(mp) == ["probe-1"]
        })
        .await;
    let q = quality(&mp);
    assert_eq!((q.score, q.threshold), (Some(0.9), Some(0.8)));
    assert_eq!(q.model.as_deref(), Some("tiny-llama"));
    assert_eq!(q.samples[0].passed, 9);
    assert_eq!(q.samples[0].latency_p90_seconds, 0.3);
    assert_eq!(
        condition(&mp, "QualityDegraded").map(|c| (c.0, c.1)),
        Some(("False".to_string(), "WithinThreshold".to_string()))
    );
    assert_eq!(
        condition(&mp, "QualityProbing").map(|c| c.1),
        Some("Scheduled".to_string())
    );
    assert_eq!(
        w.operator.metric(&regressions).await.expect("metrics"),
        None
    );

    // 2. A bad run pulls the window (0.9, 0.5) below 0.8: degraded, counted once.
    probe_job(&w, &cronjob, "probe-2", &probe_result(0.5, 2, &variant), 0).await;
    let mp = w
        .wait(
            "tiny-experiment",
            "to be degraded",
            condition_is("QualityDegraded", "True", "BelowThreshold"),
        )
        .await;
    assert_eq!(sample_jobs(&mp), ["probe-1", "probe-2"]);
    let (_, _, message) = condition(&mp, "QualityDegraded").expect("condition");
    assert!(
        message.contains("0.700") && message.contains("0.800") && message.contains("2 of 3"),
        "{message}"
    );
    // The regression is written to status before it is counted.
    assert_eq!(metric_reaching(&w, &regressions, 1.0).await, Some(1.0));

    // 3. Still degraded after another run: no second regression.
    probe_job(&w, &cronjob, "probe-3", &probe_result(0.6, 3, &variant), 0).await;
    w.wait("tiny-experiment", "to record probe-3", |mp| {
        sample_jobs(mp) == ["probe-1", "probe-2", "probe-3"]
    })
    .await;
    assert_eq!(
        w.operator.metric(&regressions).await.expect("metrics"),
        Some(1.0)
    );

    // 4. Two good runs push the old ones out of the window (0.6, 1.0, 1.0): recovered.
    probe_job(&w, &cronjob, "probe-4", &probe_result(1.0, 4, &variant), 0).await;
    w.wait("tiny-experiment", "to record probe-4", |mp| {
        sample_jobs(mp).contains(&"probe-4".to_string())
    })
    .await;
    probe_job(&w, &cronjob, "probe-5", &probe_result(1.0, 5, &variant), 0).await;
    let mp = w
        .wait(
            "tiny-experiment",
            "to recover",
            condition_is("QualityDegraded", "False", "Recovered"),
        )
        .await;
    assert_eq!(sample_jobs(&mp), ["probe-3", "probe-4", "probe-5"]);
    let score = quality(&mp).score.expect("score");
    assert!((score - 2.6 / 3.0).abs() < 1e-9, "{score}");
    assert_eq!(
        w.operator.metric(&regressions).await.expect("metrics"),
        Some(1.0)
    );

    // 5. A probe that breaks is reported, not scored.
    probe_job(&w, &cronjob, "probe-6", "cannot reach the endpoint", 3).await;
    let mp = w
        .wait(
            "tiny-experiment",
            "to report the failing probe",
            condition_is("QualityProbing", "False", "ProbeFailing"),
        )
        .await;
    let (_, _, message) = condition(&mp, "QualityProbing").expect("condition");
    assert!(
        message.contains("probe-6") && message.contains("cannot reach the endpoint"),
        "{message}"
    );
    assert_eq!(sample_jobs(&mp), ["probe-3", "probe-4", "probe-5"]);
    assert_eq!(
        condition(&mp, "QualityDegraded").map(|c| c.1),
        Some("Recovered".to_string())
    );

    // One regression over the whole run.
    assert_eq!(
        w.operator.metric(&regressions).await.expect("metrics"),
        Some(1.0)
    );

    // The operator exports the window's score from status (recomputed
    // from its cache every 10 s).
    let score_sample = format!(
        r#"quantops_quality_score{{environment="experiment",model="tiny-llama",variant="{variant}"}}"#
    );
    let exported = metric_reaching(&w, &score_sample, 2.6 / 3.0).await;
    assert!(
        exported.is_some_and(|v| (v - 2.6 / 3.0).abs() < 1e-9),
        "{exported:?}"
    );

    // Deleting the promotion takes its CronJob along (owner reference).
    w.env
        .api::<ModelPromotion>()
        .delete("tiny-experiment", &DeleteParams::background())
        .await
        .expect("delete the promotion");
    wait_for(
        &cronjobs,
        "tiny-experiment-quality",
        |c: Option<&CronJob>| c.is_none(),
        Duration::from_secs(60),
    )
    .await
    .expect("the CronJob is garbage-collected");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_without_a_suite_or_with_a_bad_schedule_says_which_field() {
    let w = world("promo-quality-bad", &sim_worker_image(0), None).await;
    w.model("tiny", "example/tiny-llama").await;
    w.promote_with(
        "tiny-experiment",
        "tiny",
        "experiment",
        serde_json::json!({"schedule": "*/5 * * *", "suite": "probes/suite.yaml"}),
    )
    .await;
    let sha = w.committed("tiny-experiment").await;
    w.sync("experiment", "tiny-llama", &sha).await;
    let probing = |mp: &ModelPromotion| {
        condition(mp, "QualityProbing").is_some_and(|(s, r, _)| s == "False" && r == "InvalidSpec")
    };
    let mp = w
        .wait("tiny-experiment", "to refuse the schedule", probing)
        .await;
    let (_, _, message) = condition(&mp, "QualityProbing").expect("condition");
    assert!(message.starts_with("spec.quality.schedule"), "{message}");
    // The promotion itself is not held back by its probe's settings.
    w.wait("tiny-experiment", "to be promoted", phase_is("Promoted"))
        .await;
    assert!(
        w.env
            .api::<CronJob>()
            .get_opt("tiny-experiment-quality")
            .await
            .expect("get")
            .is_none()
    );

    // No suite in the promotion and none in the model: named, not guessed.
    w.promote_with(
        "tiny-test",
        "tiny",
        "test",
        serde_json::json!({"schedule": "0 0 1 1 *"}),
    )
    .await;
    let sha = w.committed("tiny-test").await;
    w.sync("test", "tiny-llama", &sha).await;
    let mp = w
        .wait("tiny-test", "to name the missing suite", |mp| {
            condition(mp, "QualityProbing")
                .is_some_and(|(_, r, m)| r == "InvalidSpec" && m.starts_with("spec.quality.suite"))
        })
        .await;
    let (_, _, message) = condition(&mp, "QualityProbing").expect("condition");
    assert!(
        message.contains("spec.validation.systemTests.path"),
        "{message}"
    );
    w.cleanup().await;
}

/// How many times `reason` was recorded for the promotion `name`: the
/// Recorder folds repeats of an event into one object with a series count.
async fn event_count(w: &World, name: &str, reason: &str) -> i32 {
    w.env
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.series.map_or(1, |s| s.count))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_malformed_promotions_naming_the_field() {
    init_tracing();
    let env = TestEnv::new("promo-admission")
        .await
        .expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    let api = env.api::<ModelPromotion>();
    let gitops = |url: &str, branch: &str, secret: Option<&str>| serde_json::json!({"url": url, "branch": branch, "credentialsSecret": secret});
    let ok = "https://git.example/models-gitops.git";
    for (n, (model, gitops, field)) in [
        (
            "tiny",
            gitops("http://bot:pw@127.0.0.1:18999/m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("http://127.0.0.1:18999/m.git", "main", Some("gitops")),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("https://bot:pw@git.example/m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("https://token@git.example/m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("ssh://git:pw@git.example/m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("/srv/gitops.git", "main", None),
            "spec.gitops.url",
        ),
        ("tiny", gitops("./gitops", "main", None), "spec.gitops.url"),
        (
            "tiny",
            gitops("file:///srv/gitops.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("ftp://git.example/m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("git://git.example/m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("https:///m.git", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops("https://git.example/m.git?token=x", "main", None),
            "spec.gitops.url",
        ),
        (
            "tiny",
            gitops(ok, "main:refs/heads/evil", None),
            "spec.gitops.branch",
        ),
        (
            "tiny",
            gitops(ok, "refs/heads/main", None),
            "spec.gitops.branch",
        ),
        ("tiny", gitops(ok, "-main", None), "spec.gitops.branch"),
        ("tiny", gitops(ok, "a..b", None), "spec.gitops.branch"),
        (
            "tiny",
            gitops(ok, "main", Some("kube-system/gitops")),
            "spec.gitops.credentialsSecret",
        ),
        ("", gitops(ok, "main", None), "spec.modelRef.name"),
        ("other/tiny", gitops(ok, "main", None), "spec.modelRef.name"),
    ]
    .into_iter()
    .enumerate()
    {
        let mp: ModelPromotion = serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": format!("bad-{n}")},
            "spec": {"modelRef": {"name": model}, "environment": "test", "gitops": gitops},
        }))
        .expect("a ModelPromotion");
        let err = api
            .create(&PostParams::default(), &mp)
            .await
            .expect_err(&format!("case {n} is refused: {:?}", mp.spec));
        let text = err.to_string();
        assert!(text.contains(field), "case {n}: {field} named in {text}");
        assert!(
            !text.contains("pw@"),
            "case {n}: no password echoed: {text}"
        );
    }
    // The accepted forms, and plain http (the operator decides about it).
    for (n, url) in [
        ok,
        "ssh://git@git.example:2222/srv/models.git",
        "git@github.com:org/models-gitops.git",
        "http://127.0.0.1:18999/m.git",
    ]
    .into_iter()
    .enumerate()
    {
        let mp: ModelPromotion = serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": format!("good-{n}")},
            "spec": {"modelRef": {"name": "tiny-v1.2"}, "environment": "test",
                     "gitops": {"url": url, "branch": "release/1.2",
                                "credentialsSecret": (!url.starts_with("http:")).then_some("gitops")}},
        }))
        .expect("a ModelPromotion");
        api.create(&PostParams::default(), &mp)
            .await
            .unwrap_or_else(|e| panic!("{url} is accepted: {e}"));
    }
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_needs_the_opt_in_and_never_carries_credentials() {
    let w = world("promo-http", &sim_worker_image(0), None).await;
    w.model("tiny", "example/tiny-llama").await;
    let http_url = w.url.clone();
    let http = move |secret: Option<&str>| serde_json::json!({"url": http_url, "branch": "main", "credentialsSecret": secret});
    // Without the opt-in: refused before any network access.
    w.promote_to(
        "anonymous",
        "tiny",
        "experiment",
        http(None),
        serde_json::Value::Null,
    )
    .await;
    let refused = |mp: &ModelPromotion| {
        condition(mp, "Committed").is_some_and(|(s, r, _)| s == "False" && r == "InvalidSpec")
    };
    let mp = w.wait("anonymous", "to refuse plain http", refused).await;
    let (_, _, message) = condition(&mp, "Committed").expect("Committed");
    assert!(
        message.starts_with("spec.gitops.url: plain http:// is refused")
            && message.contains("--allow-insecure-http-gitops"),
        "{message}"
    );
    assert_eq!(status(&mp).phase.as_deref(), Some("Failed"));
    assert_eq!(event_count(&w, "anonymous", "InvalidSpec").await, 1);

    // With it (as the chart's promotion.allowInsecureHttpGitops sets it),
    // anonymous http is tried; a Secret over http is refused by the API
    // server already (and by the operator, for objects older than the rule).
    let World {
        env,
        envs,
        server,
        url,
        ssh_url,
        mut operator,
    } = w;
    operator.kill().await.expect("stop the operator");
    let mut options = operator.options.clone();
    drop(operator);
    options
        .extra_env
        .push(("QUANTOPS_ALLOW_INSECURE_HTTP_GITOPS".into(), "true".into()));
    let operator = Operator::start(&env, options)
        .await
        .expect("start the operator with the opt-in");
    let w = World {
        env,
        envs,
        server,
        url,
        ssh_url,
        operator,
    };
    let with_secret: ModelPromotion = serde_json::from_value(serde_json::json!({
        "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
        "metadata": {"name": "with-secret"},
        "spec": {"modelRef": {"name": "tiny"}, "environment": "experiment",
                 "gitops": http(Some("gitops-credentials"))},
    }))
    .expect("a ModelPromotion");
    let err = w
        .env
        .api::<ModelPromotion>()
        .create(&PostParams::default(), &with_secret)
        .await
        .expect_err("a Secret over http is refused");
    assert!(
        err.to_string()
            .contains("spec.gitops.url: credentials are never sent over plain http://"),
        "{err}"
    );
    // The anonymous one now reaches the server, which wants a password it
    // is never given.
    let mp = w
        .wait("anonymous", "to be refused by the server", |mp| {
            condition(mp, "Committed").is_some_and(|(_, r, _)| r == "AuthRefused")
        })
        .await;
    assert!(status(&mp).commit.is_none());
    let repo = url_path(&w.url);
    let access_log =
        std::fs::read_to_string(w.server.dir.join("nginx-access.log")).expect("nginx access log");
    let requests: Vec<&str> = access_log.lines().filter(|l| l.contains(&repo)).collect();
    assert!(!requests.is_empty(), "the operator asked the server");
    // The harness's own clones authenticate as the server's user; the
    // operator's requests (libgit2's user agent) never do.
    for line in requests.iter().filter(|l| l.contains("libgit2")) {
        assert!(
            !line.contains(&format!(" - {} [", w.server.user)),
            "credentials went over http: {line}"
        );
    }
    assert!(
        requests.iter().any(|l| l.contains("libgit2")),
        "{requests:?}"
    );
    w.cleanup().await;
}

/// The path of a URL (`/name.git`).
fn url_path(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/')
        .map_or(String::new(), |i| rest[i..].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_push_ends_failed_after_bounded_attempts() {
    let w = world_with(
        "promo-bounded",
        &sim_worker_image(0),
        None,
        &[("QUANTOPS_MAX_GIT_ATTEMPTS", "3")],
    )
    .await;
    w.model("tiny", "example/tiny-llama").await;

    // A Secret that does not exist is named as such.
    let gitops = serde_json::json!({
        "url": w.ssh_url, "branch": "main", "credentialsSecret": "no-such-secret"
    });
    w.promote_to("unsigned", "tiny", "test", gitops, serde_json::Value::Null)
        .await;
    let mp = w
        .wait("unsigned", "to report the missing Secret", |mp| {
            condition(mp, "Committed").is_some_and(|(_, r, _)| r == "SecretNotFound")
        })
        .await;
    let (_, _, message) = condition(&mp, "Committed").expect("Committed");
    assert_eq!(
        message,
        format!(
            "spec.gitops.credentialsSecret: Secret {}/no-such-secret not found",
            w.env.namespace
        )
    );
    assert_eq!(status(&mp).phase.as_deref(), Some("Blocked"));

    // A server that refuses every push (a pre-receive hook).
    let hook = w
        .server
        .repo_path(&w.url)
        .expect("the repository")
        .join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho 'this repository is frozen' >&2\nexit 1\n",
    )
    .expect("write the hook");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
            .expect("make the hook executable");
    }
    w.promote("tiny-experiment", "tiny", "experiment").await;
    let mp = w
        .wait("tiny-experiment", "to give up", phase_is("Failed"))
        .await;
    let (s, reason, message) = condition(&mp, "Committed").expect("Committed");
    assert_eq!(
        (s.as_str(), reason.as_str()),
        ("False", "PushRejected"),
        "{message}"
    );
    assert!(message.contains("gave up after 3 attempts"), "{message}");
    assert_eq!(status(&mp).git_attempts, 3);
    assert!(status(&mp).next_git_attempt_time.is_none());

    // Then nothing: no more attempts, no status writes, no more events.
    let events = event_count(&w, "tiny-experiment", "GitWriteFailed").await;
    assert!((1..=3).contains(&events), "{events} GitWriteFailed events");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let later = w
        .env
        .api::<ModelPromotion>()
        .get("tiny-experiment")
        .await
        .expect("get");
    assert_eq!(
        later.resource_version(),
        mp.resource_version(),
        "no more writes"
    );
    assert_eq!(
        event_count(&w, "tiny-experiment", "GitWriteFailed").await,
        events
    );
    assert_eq!(
        commits_of(
            &w.authenticated(),
            &format!("{}/tiny-experiment", w.env.namespace)
        )
        .await,
        0
    );

    // A new spec starts over (and the thawed server takes the commit).
    std::fs::remove_file(&hook).expect("remove the hook");
    w.env
        .api::<ModelPromotion>()
        .patch(
            "tiny-experiment",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"serving": {"replicas": 2}}})),
        )
        .await
        .expect("change the spec");
    let mp = w
        .wait(
            "tiny-experiment",
            "to commit after the spec changed",
            |mp| status(mp).commit.is_some(),
        )
        .await;
    assert_eq!(status(&mp).git_attempts, 0);
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_folder_has_one_owner() {
    let w = world("promo-owner", &sim_worker_image(0), None).await;
    let auth = w.authenticated();
    // Two QuantizedModels of the same base model: one serving folder.
    w.model("first", "example/tiny-llama").await;
    w.model("second", "example/tiny-llama").await;
    w.promote("first-experiment", "first", "experiment").await;
    let sha = w.committed("first-experiment").await;
    w.sync("experiment", "tiny-llama", &sha).await;
    w.wait("first-experiment", "to be promoted", phase_is("Promoted"))
        .await;

    // A second promotion into that folder is refused, naming the owner.
    w.promote("second-experiment", "second", "experiment").await;
    let mp = w
        .wait("second-experiment", "to be refused", |mp| {
            condition(mp, "Committed").is_some_and(|(_, r, _)| r == "FolderInUse")
        })
        .await;
    let (_, _, message) = condition(&mp, "Committed").expect("Committed");
    let owner = format!("ModelPromotion {}/first-experiment", w.env.namespace);
    assert!(
        message.contains("envs/experiment/tiny-llama") && message.contains(&owner),
        "{message}"
    );
    assert_eq!(status(&mp).phase.as_deref(), Some("Blocked"));
    assert_eq!(event_count(&w, "second-experiment", "FolderInUse").await, 1);

    // The owner moves the folder to the other model: the intended
    // promotion flow, one commit replacing the variant.
    w.env
        .api::<ModelPromotion>()
        .patch(
            "first-experiment",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"modelRef": {"name": "second"}}})),
        )
        .await
        .expect("point the owner at the other model");
    let replaced = w
        .wait("first-experiment", "to commit the other model", move |mp| {
            status(mp).commit.as_deref().is_some_and(|c| c != sha)
                && condition(mp, "Committed").is_some_and(|(s, _, _)| s == "True")
        })
        .await;
    let card = files_at(
        &auth,
        &status(&replaced).commit.expect("commit"),
        "envs/experiment/tiny-llama",
    )
    .await
    .expect("files")
    .remove("README.md")
    .expect("the card");
    assert!(card.contains("from QuantizedModel `second`"), "{card}");

    // Once the owner is gone, the folder can be taken over.
    w.env
        .api::<ModelPromotion>()
        .delete("first-experiment", &DeleteParams::background())
        .await
        .expect("delete the owner");
    let taken = w.committed("second-experiment").await;
    assert!(!taken.is_empty());
    w.cleanup().await;
}
