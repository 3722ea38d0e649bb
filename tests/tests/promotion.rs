//! ModelPromotion end to end: the operator (the chart's identity) commits to
//! a real git server on loopback (git http-backend behind nginx, basic
//! auth), the test plays Argo CD (applies the committed folder with
//! `kubectl apply -k` at that revision and writes the Application's status)
//! and Argo Rollouts (writes the Rollout's status).

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use quantops_api::{ModelPromotion, QuantizedModel};
use quantops_e2e::gitops::{
    EnvironmentNamespaces, GitServer, argo_sync, files_at, install_argo_crds, log,
    set_rollout_status,
};
use quantops_e2e::operator::{Operator, OperatorOptions, install_chart, sim_worker_image};
use quantops_e2e::{TestEnv, apply, init_tracing, wait_for};

/// One test's world: namespace, chart, Argo CRDs, environment namespaces,
/// a fresh repository with its credentials Secret, and the operator.
struct World {
    env: TestEnv,
    envs: EnvironmentNamespaces,
    server: GitServer,
    url: String,
    operator: Operator,
}

async fn world(prefix: &str, worker_image: &str, password: Option<&str>) -> World {
    init_tracing();
    let mut env = TestEnv::new(prefix).await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    install_argo_crds(&env).await.expect("Argo CRDs");
    env.host_path_pvc("quantops-models")
        .await
        .expect("model volume");
    let envs = EnvironmentNamespaces::create(&env, &["experiment", "test", "prod"])
        .await
        .expect("environment namespaces");
    let server = GitServer::start().await.expect("git server");
    let url = server.create_repo(prefix).await.expect("repository");
    server
        .credentials_secret(&env, "gitops-credentials", password)
        .await
        .expect("credentials Secret");
    let mut options = OperatorOptions::new("quantops-0", worker_image);
    options.extra_env = vec![
        ("QUANTOPS_ARGOCD_NAMESPACE".into(), env.namespace.clone()),
        ("QUANTOPS_ENVIRONMENT_NAMESPACE".into(), envs.pattern()),
    ];
    let operator = Operator::start(&env, options)
        .await
        .expect("start the operator");
    World {
        env,
        envs,
        server,
        url,
        operator,
    }
}

impl World {
    fn authenticated(&self) -> String {
        self.server.authenticated_url(&self.url)
    }

    async fn model(&self, name: &str, base: &str) {
        let qm: QuantizedModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "QuantizedModel",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"name": base, "path": "tiny-llama"},
                "version": "v1",
                "quantization": {"method": "rtn", "bits": 4, "groupSize": 128},
                "validation": {"evalText": {"path": "text/eval.txt"}},
                "output": {"path": "out"},
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
        let mp: ModelPromotion = serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": name},
            "spec": {
                "modelRef": {"name": model},
                "environment": environment,
                "gitops": {"url": self.url, "branch": "main", "credentialsSecret": "gitops-credentials"},
                "serving": {"runtime": "vllm", "replicas": 1, "maxModelLen": 2048, "gpuMemoryUtilization": 0.9},
                "canary": {"steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "10m"}]}
            }
        }))
        .expect("a ModelPromotion");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_reported_and_retried_with_backoff() {
    let w = world("promo-auth", &sim_worker_image(0), Some("wrong-password")).await;
    w.model("tiny", "example/tiny-llama").await;
    w.promote("tiny-experiment", "tiny", "experiment").await;
    let mp = w
        .wait("tiny-experiment", "to retry the refused push", |mp| {
            status(mp).git_attempts >= 2
        })
        .await;
    let (s, reason, message) = condition(&mp, "Committed").expect("Committed");
    assert_eq!((s.as_str(), reason.as_str()), ("False", "AuthRefused"));
    assert!(
        message.contains(&w.url.replace("http://", "")) || message.contains("127.0.0.1"),
        "{message}"
    );
    assert!(
        !message.contains("wrong-password"),
        "no secret in the message: {message}"
    );
    assert_eq!(status(&mp).phase.as_deref(), Some("Blocked"));

    // With the right password the next retry lands.
    w.server
        .credentials_secret(&w.env, "gitops-credentials", None)
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
