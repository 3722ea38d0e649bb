//! The GitOps harness on its own, without the operator: the git server
//! takes authenticated pushes and refuses wrong passwords, the git helpers
//! read back what was pushed, `argo_sync` applies a committed kustomization
//! folder and writes the Application's status, prunes on a revert, and
//! `set_rollout_status` writes a Rollout's status. The ModelPromotion tests
//! build on all of these, so a failure here points at the harness, not at
//! the operator.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams};
use quantops_e2e::gitops::{
    EnvironmentNamespaces, GitServer, argo_api, argo_sync, branch_head, clone_at, commit_files,
    files_at, install_argo_crds, is_ancestor, log, set_application_health, set_rollout_status,
};
use quantops_e2e::{FIELD_MANAGER, HarnessError, TestEnv, init_tracing};
use serde_json::{Value, json};

const KUSTOMIZATION: &str = "\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: NAMESPACE
resources:
  - configmap.yaml
  - rollout.yaml
";

/// A Rollout in the folder, as in prod: `kubectl apply -k` must find the
/// stand-in CRD.
const ROLLOUT: &str = "\
apiVersion: argoproj.io/v1alpha1
kind: Rollout
metadata:
  name: tiny-llama
spec:
  replicas: 1
  selector:
    matchLabels: { app.kubernetes.io/name: tiny-llama }
  template:
    metadata:
      labels: { app.kubernetes.io/name: tiny-llama }
  strategy:
    canary:
      steps: [ { setWeight: 10 }, { pause: { duration: 5m } } ]
";

fn configmap(greeting: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tiny-llama-settings\ndata:\n  greeting: {greeting}\n"
    )
}

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_server_commits_and_history() {
    init_tracing();
    let server = GitServer::start().await.expect("git server");
    let url = server
        .create_repo("harness-git")
        .await
        .expect("create repo");
    let auth = server.authenticated_url(&url);

    let initial = branch_head(&auth, "main")
        .await
        .expect("ls-remote")
        .expect("main exists after create_repo");

    // Without credentials, and with a wrong password, the server refuses.
    let anonymous = branch_head(&url, "main").await;
    assert!(
        matches!(anonymous, Err(HarnessError::Command { .. })),
        "anonymous read must fail: {anonymous:?}"
    );
    let wrong = quantops_e2e::gitops::with_credentials(&url, &server.user, "not-the-password");
    let refused = commit_files(&wrong, "main", &[("x.txt", "x\n")], &[], "should not land").await;
    let message = format!("{refused:?}");
    assert!(refused.is_err(), "a push with a wrong password must fail");
    assert!(
        !message.contains("not-the-password"),
        "errors must not show the password: {message}"
    );

    let first = commit_files(
        &auth,
        "main",
        &[
            ("envs/test/tiny-llama/a.yaml", "a: 1\n"),
            ("envs/test/tiny-llama/sub/b.yaml", "b: 2\n"),
        ],
        &[],
        "Promote tiny-llama to test\n\nGates: perplexity +0.7% (pass)",
    )
    .await
    .expect("push");
    let second = commit_files(
        &auth,
        "main",
        &[],
        &["envs/test/tiny-llama/a.yaml"],
        "Remove a",
    )
    .await
    .expect("push");

    let history = log(&auth, "main").await.expect("log");
    let subjects: Vec<&str> = history.iter().map(|c| c.subject.as_str()).collect();
    assert_eq!(
        subjects,
        ["Remove a", "Promote tiny-llama to test", "Initial commit"]
    );
    assert_eq!(history[0].sha, second);
    assert_eq!(history[1].sha, first);
    assert_eq!(history[1].body, "Gates: perplexity +0.7% (pass)");
    assert_eq!(history[1].parents, std::slice::from_ref(&initial));
    assert!(history[2].parents.is_empty());

    let at_first = files_at(&auth, &first, "envs/test/tiny-llama")
        .await
        .expect("files");
    assert_eq!(
        at_first.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a.yaml", "sub/b.yaml"]
    );
    assert_eq!(at_first["a.yaml"], "a: 1\n");
    let at_main = files_at(&auth, "main", "envs/test/tiny-llama/")
        .await
        .expect("files");
    assert_eq!(at_main.keys().collect::<Vec<_>>(), ["sub/b.yaml"]);
    let whole = files_at(&auth, &initial, "").await.expect("files");
    assert_eq!(whole.keys().collect::<Vec<_>>(), ["README.md"]);
    let missing = files_at(&auth, &initial, "envs/prod").await.expect("files");
    assert!(missing.is_empty());

    assert!(is_ancestor(&auth, &first, "main").await.expect("ancestry"));
    assert!(!is_ancestor(&auth, &second, &first).await.expect("ancestry"));

    let dir = quantops_e2e::gitops::ScratchDir::new("harness-clone").expect("scratch");
    let checkout = dir.path().join("c");
    let sha = clone_at(&auth, &first, &checkout).await.expect("clone");
    assert_eq!(sha, first);
    assert!(checkout.join("envs/test/tiny-llama/a.yaml").is_file());

    server.remove_repo(&url).expect("remove repo");
    assert!(branch_head(&auth, "main").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argo_sync_applies_prunes_and_reports() {
    init_tracing();
    let env = TestEnv::new("gitops-argo").await.expect("test env");
    install_argo_crds(&env).await.expect("argo crds");
    let namespaces = EnvironmentNamespaces::create(&env, &["argocd", "test", "prod"])
        .await
        .expect("namespaces");
    let argocd = namespaces.name("argocd");
    let test_ns = namespaces.name("test");
    assert_eq!(namespaces.pattern().replace("{env}", "test"), test_ns);

    let server = GitServer::start().await.expect("git server");
    let url = server
        .create_repo("harness-argo")
        .await
        .expect("create repo");
    let auth = server.authenticated_url(&url);
    server
        .credentials_secret(&env, "gitops-credentials", None)
        .await
        .expect("secret");
    let secret: Secret = env
        .api::<Secret>()
        .get("gitops-credentials")
        .await
        .expect("secret");
    let data = secret.data.expect("secret data");
    assert_eq!(data["username"].0, server.user.as_bytes());
    assert_eq!(data["password"].0, server.password.as_bytes());

    let folder = "envs/test/tiny-llama";
    let kustomization = KUSTOMIZATION.replace("NAMESPACE", &test_ns);
    let commit = commit_files(
        &auth,
        "main",
        &[
            (&format!("{folder}/kustomization.yaml"), &kustomization),
            (&format!("{folder}/configmap.yaml"), &configmap("hello")),
            (&format!("{folder}/rollout.yaml"), ROLLOUT),
        ],
        &[],
        "Promote tiny-llama to test",
    )
    .await
    .expect("push");

    let app_name = "test-tiny-llama";
    let synced = argo_sync(&env, &argocd, app_name, &auth, "main", folder, &test_ns)
        .await
        .expect("argo_sync");
    assert_eq!(synced.revision, commit);
    let kinds: Vec<&str> = synced.applied.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Rollout"]);
    assert!(synced.applied.iter().all(|r| r.namespace == test_ns));
    argo_api(&env.client, &test_ns, "Rollout")
        .get("tiny-llama")
        .await
        .expect("the Rollout was applied");
    assert!(synced.pruned.is_empty());

    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &test_ns);
    let cm = configmaps
        .get("tiny-llama-settings")
        .await
        .expect("configmap");
    assert_eq!(
        cm.data
            .as_ref()
            .and_then(|d| d.get("greeting"))
            .map(String::as_str),
        Some("hello")
    );

    let apps = argo_api(&env.client, &argocd, "Application");
    let app = apps.get(app_name).await.expect("application");
    assert_eq!(text(&app.data, "/status/sync/status"), Some("Synced"));
    assert_eq!(
        text(&app.data, "/status/sync/revision"),
        Some(commit.as_str())
    );
    assert_eq!(text(&app.data, "/status/health/status"), Some("Healthy"));
    assert_eq!(
        text(&app.data, "/status/operationState/phase"),
        Some("Succeeded")
    );
    assert_eq!(text(&app.data, "/spec/source/repoURL"), Some(url.as_str()));
    assert_eq!(
        text(&app.data, "/spec/destination/namespace"),
        Some(test_ns.as_str())
    );

    // A degraded state, then a new commit synced over it.
    set_application_health(
        &env,
        &argocd,
        app_name,
        "Degraded",
        "Synced",
        &commit,
        "Deployment tiny-llama exceeded its progress deadline",
    )
    .await
    .expect("set health");
    let app = apps.get(app_name).await.expect("application");
    assert_eq!(text(&app.data, "/status/health/status"), Some("Degraded"));
    assert_eq!(
        text(&app.data, "/status/health/message"),
        Some("Deployment tiny-llama exceeded its progress deadline")
    );
    assert_eq!(
        text(&app.data, "/status/sync/revision"),
        Some(commit.as_str())
    );

    let update = commit_files(
        &auth,
        "main",
        &[(&format!("{folder}/configmap.yaml"), &configmap("again"))],
        &[],
        "Promote tiny-llama v2 to test",
    )
    .await
    .expect("push");
    let synced = argo_sync(&env, &argocd, app_name, &auth, &update, folder, &test_ns)
        .await
        .expect("argo_sync");
    assert_eq!(synced.revision, update);
    let cm = configmaps
        .get("tiny-llama-settings")
        .await
        .expect("configmap");
    assert_eq!(
        cm.data
            .as_ref()
            .and_then(|d| d.get("greeting"))
            .map(String::as_str),
        Some("again")
    );
    let app = apps.get(app_name).await.expect("application");
    assert_eq!(text(&app.data, "/status/health/status"), Some("Healthy"));
    assert_eq!(
        text(&app.data, "/status/sync/revision"),
        Some(update.as_str())
    );

    // The folder removed (as a revert of the first promotion does): the
    // sync prunes the ConfigMap.
    let removed = commit_files(&auth, "main", &[], &[folder], "Revert \"Promote\"")
        .await
        .expect("push");
    let synced = argo_sync(&env, &argocd, app_name, &auth, "main", folder, &test_ns)
        .await
        .expect("argo_sync");
    assert_eq!(synced.revision, removed);
    assert!(synced.applied.is_empty());
    assert_eq!(synced.pruned.len(), 2);
    let gone = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match configmaps.get_opt("tiny-llama-settings").await {
                Ok(None) => return,
                Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("reading the ConfigMap: {e}"),
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "the pruned ConfigMap is still there");

    // A kustomization whose namespace is not the destination is refused.
    let wrong = KUSTOMIZATION.replace("NAMESPACE", "somewhere-else");
    let other = "envs/test/other";
    commit_files(
        &auth,
        "main",
        &[
            (&format!("{other}/kustomization.yaml"), &wrong),
            (&format!("{other}/configmap.yaml"), &configmap("x")),
            (&format!("{other}/rollout.yaml"), ROLLOUT),
        ],
        &[],
        "A folder for another namespace",
    )
    .await
    .expect("push");
    let refused = argo_sync(&env, &argocd, "test-other", &auth, "main", other, &test_ns).await;
    assert!(
        matches!(refused, Err(HarnessError::Command { .. })),
        "{refused:?}"
    );

    server.remove_repo(&auth).expect("remove repo");
    namespaces.cleanup().await.expect("cleanup namespaces");
    env.cleanup().await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_status_round_trips() {
    init_tracing();
    let env = TestEnv::new("gitops-rollout").await.expect("test env");
    install_argo_crds(&env).await.expect("argo crds");
    let rollouts = argo_api(&env.client, &env.namespace, "Rollout");
    let rollout: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": { "name": "tiny-llama" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app.kubernetes.io/name": "tiny-llama" } },
            "template": { "metadata": { "labels": {
                "app.kubernetes.io/name": "tiny-llama",
                "quantops.dev/variant": "tiny-llama-v1-int4"
            } } },
            "strategy": { "canary": { "steps": [ { "setWeight": 10 }, { "pause": { "duration": "5m" } } ] } }
        }
    }))
    .expect("rollout object");
    rollouts
        .patch(
            "tiny-llama",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&rollout),
        )
        .await
        .expect("apply rollout");

    set_rollout_status(
        &env,
        &env.namespace,
        "tiny-llama",
        "Paused",
        false,
        "CanaryPauseStep",
    )
    .await
    .expect("paused");
    let ro = rollouts.get("tiny-llama").await.expect("rollout");
    assert_eq!(text(&ro.data, "/status/phase"), Some("Paused"));
    assert_eq!(ro.data.pointer("/status/abort"), Some(&json!(false)));
    assert_eq!(text(&ro.data, "/status/observedGeneration"), Some("1"));
    assert!(ro.data.pointer("/status/pauseConditions/0").is_some());

    set_rollout_status(
        &env,
        &env.namespace,
        "tiny-llama",
        "Degraded",
        true,
        "RolloutAborted: Metric \"error-rate\" assessed Failed due to failed (2) > failureLimit (1)",
    )
    .await
    .expect("aborted");
    let ro = rollouts.get("tiny-llama").await.expect("rollout");
    assert_eq!(text(&ro.data, "/status/phase"), Some("Degraded"));
    assert_eq!(ro.data.pointer("/status/abort"), Some(&json!(true)));
    assert!(
        text(&ro.data, "/status/message").is_some_and(|m| m.contains("failureLimit")),
        "{:?}",
        ro.data.pointer("/status/message")
    );
    let conditions = ro
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .expect("conditions");
    let progressing = conditions
        .iter()
        .find(|c| text(c, "/type") == Some("Progressing"))
        .expect("Progressing condition");
    assert_eq!(text(progressing, "/status"), Some("False"));
    assert_eq!(text(progressing, "/reason"), Some("RolloutAborted"));
    assert!(ro.data.pointer("/status/pauseConditions").is_none());

    set_rollout_status(&env, &env.namespace, "tiny-llama", "Healthy", false, "")
        .await
        .expect("healthy");
    let ro = rollouts.get("tiny-llama").await.expect("rollout");
    assert_eq!(text(&ro.data, "/status/phase"), Some("Healthy"));
    assert_eq!(ro.data.pointer("/status/abort"), Some(&json!(false)));
    assert!(ro.data.pointer("/status/abortedAt").is_none());
    // The spec is untouched by status writes.
    assert_eq!(
        text(
            &ro.data,
            "/spec/template/metadata/labels/quantops.dev~1variant"
        ),
        Some("tiny-llama-v1-int4")
    );

    env.cleanup().await.expect("cleanup");
}
