//! RBAC and the service-account token machinery are real: a ServiceAccount
//! bound to a namespaced Role gets a token through the TokenRequest API and
//! is denied everything the Role does not grant. The chart's identity, as
//! `helm template` renders it, can do what the operator does in the
//! namespaces it serves and nothing elsewhere (`kubectl auth can-i`), and
//! the operator serves exactly those namespaces.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use quantops_api::QuantizedModel;
use quantops_e2e::gitops::{EnvironmentNamespaces, install_argo_crds};
use quantops_e2e::operator::{Operator, OperatorOptions, install_chart, release, sim_worker_image};
use quantops_e2e::{TestEnv, apply, client_from, init_tracing, wait_for};

fn object<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> K {
    serde_json::from_value(v).expect("a valid object")
}

/// The request was refused with 403 Forbidden.
fn is_forbidden<T: std::fmt::Debug>(r: &Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

#[tokio::test]
async fn service_account_is_limited_to_its_role() {
    init_tracing();
    let env = TestEnv::new("rbac")
        .await
        .expect("test cluster and namespace");
    let ns = env.namespace.clone();
    apply(
        &env.api::<ServiceAccount>(),
        "reader",
        &object(serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}})),
    )
    .await
    .expect("apply the ServiceAccount");
    apply(
        &env.api::<Role>(),
        "configmap-reader",
        &object(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
        })),
    )
    .await
    .expect("apply the Role");
    apply(
        &env.api::<RoleBinding>(),
        "reader",
        &object(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]
        })),
    )
    .await
    .expect("apply the RoleBinding");

    let req: TokenRequest = object(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600}
    }));
    let token = env
        .api::<ServiceAccount>()
        .create_token_request("reader", &PostParams::default(), &req)
        .await
        .expect("TokenRequest for the ServiceAccount")
        .status
        .expect("the TokenRequest has a status")
        .token;
    assert!(!token.is_empty(), "the API server issued a token");
    let sa = client_from(&env.info.kubeconfig, Some(&token))
        .await
        .expect("a client authenticated by the token");

    // RBAC takes effect asynchronously in the authorizer's cache: wait for
    // the grant before checking the denials.
    let own: Api<ConfigMap> = Api::namespaced(sa.clone(), &ns);
    let mut allowed = own.list(&ListParams::default()).await;
    for _ in 0..50 {
        if allowed.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        allowed = own.list(&ListParams::default()).await;
    }
    let listed = allowed.expect("the Role grants listing configmaps in its namespace (waited 10s)");
    assert!(
        listed
            .items
            .iter()
            .any(|cm| cm.metadata.name.as_deref() == Some("kube-root-ca.crt")),
        "the root-CA publisher put kube-root-ca.crt in the namespace"
    );

    let secret: Secret = object(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nope"}, "stringData": {"k": "v"}
    }));
    let created = Api::<Secret>::namespaced(sa.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await;
    assert!(
        is_forbidden(&created),
        "creating a secret must be forbidden, got {created:?}"
    );

    let elsewhere = Api::<ConfigMap>::namespaced(sa.clone(), "default")
        .list(&ListParams::default())
        .await;
    assert!(
        is_forbidden(&elsewhere),
        "listing configmaps in another namespace must be forbidden, got {elsewhere:?}"
    );

    let deleted = own.delete("kube-root-ca.crt", &Default::default()).await;
    assert!(
        is_forbidden(&deleted),
        "deleting a configmap is not granted, got {deleted:?}"
    );
    env.cleanup().await.expect("delete the test namespace");
}

/// `kubectl auth can-i ARGS` as the chart's ServiceAccount of `env`,
/// impersonated by the admin with the groups its token would carry.
async fn can_i(env: &TestEnv, args: &[&str]) -> bool {
    let ns = &env.namespace;
    let output = env
        .command(env.kubectl_path())
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:{ns}:{}", release(env)))
        .arg("--as-group=system:serviceaccounts")
        .arg(format!("--as-group=system:serviceaccounts:{ns}"))
        .arg("--as-group=system:authenticated")
        .output()
        .await
        .expect("run kubectl auth can-i");
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match (output.status.code(), answer.as_str()) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        _ => panic!(
            "kubectl auth can-i {args:?}: {} {answer}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Waits until `probe` is allowed (RBAC reaches the authorizer's cache
/// asynchronously), then checks every `(args, allowed)`; the mismatches.
async fn audit(env: &TestEnv, probe: &[&str], checks: &[(Vec<String>, bool)]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !can_i(env, probe).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chart's RBAC never allowed {probe:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut wrong = Vec::new();
    for (args, allowed) in checks {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if can_i(env, &args).await != *allowed {
            let want = if *allowed { "allowed" } else { "denied" };
            wrong.push(format!("{} must be {want}", args.join(" ")));
        }
    }
    wrong
}

/// `(verb resource -n namespace, allowed)` for each verb.
fn each(
    verbs: &[&str],
    resource: &str,
    namespace: &str,
    allowed: bool,
) -> Vec<(Vec<String>, bool)> {
    verbs
        .iter()
        .map(|verb| {
            let mut args: Vec<String> = vec![(*verb).into()];
            args.extend(resource.split(' ').map(String::from));
            args.extend(["-n".into(), namespace.into()]);
            (args, allowed)
        })
        .collect()
}

/// What the operator does in a namespace it serves, and nothing more there.
fn served(ns: &str) -> Vec<(Vec<String>, bool)> {
    let qm = "quantizedmodels.quantops.dev";
    let mp = "modelpromotions.quantops.dev";
    [
        each(&["get", "list", "watch"], qm, ns, true),
        each(&["list", "watch"], mp, ns, true),
        each(&["patch"], &format!("{qm} --subresource=status"), ns, true),
        each(&["patch"], &format!("{mp} --subresource=status"), ns, true),
        each(
            &["get", "list", "watch", "create", "patch", "delete"],
            "jobs.batch",
            ns,
            true,
        ),
        each(&["create", "patch", "delete"], "cronjobs.batch", ns, true),
        each(
            &["create", "patch", "get", "delete"],
            "configmaps",
            ns,
            true,
        ),
        each(&["list", "watch"], "pods", ns, true),
        each(&["get"], "pods --subresource=log", ns, true),
        each(&["create", "patch"], "events.events.k8s.io", ns, true),
        each(&["get"], "secrets", ns, true),
        // Unused, so not granted.
        each(&["list", "watch", "create", "delete"], "secrets", ns, false),
        each(&["create", "update", "patch", "delete"], qm, ns, false),
        each(&["create", "update", "patch", "delete"], mp, ns, false),
        each(
            &["update"],
            &format!("{qm} --subresource=status"),
            ns,
            false,
        ),
        each(&["list", "watch", "update"], "configmaps", ns, false),
        each(&["get", "list"], "cronjobs.batch", ns, false),
        each(&["get", "create", "delete"], "pods", ns, false),
        each(&["create"], "pods --subresource=exec", ns, false),
        each(
            &["create"],
            "rolebindings.rbac.authorization.k8s.io",
            ns,
            false,
        ),
    ]
    .concat()
}

/// Nothing of the operator's work in a namespace it does not serve.
fn not_served(ns: &str) -> Vec<(Vec<String>, bool)> {
    [
        each(&["get", "list"], "secrets", ns, false),
        each(&["create", "patch"], "jobs.batch", ns, false),
        each(&["create"], "cronjobs.batch", ns, false),
        each(&["create", "patch"], "configmaps", ns, false),
        each(&["list"], "pods", ns, false),
        each(&["list", "get"], "quantizedmodels.quantops.dev", ns, false),
        each(&["get"], "applications.argoproj.io", ns, false),
    ]
    .concat()
}

/// Nothing cluster-scoped, and nothing across all namespaces.
fn cluster_scoped() -> Vec<(Vec<String>, bool)> {
    let all = |verb: &str, resource: &str| {
        (
            vec![
                verb.to_string(),
                resource.to_string(),
                "--all-namespaces".into(),
            ],
            false,
        )
    };
    let cluster =
        |verb: &str, resource: &str| (vec![verb.to_string(), resource.to_string()], false);
    vec![
        all("list", "secrets"),
        all("list", "quantizedmodels.quantops.dev"),
        all("list", "jobs.batch"),
        cluster("list", "namespaces"),
        cluster("list", "nodes"),
        cluster("list", "customresourcedefinitions.apiextensions.k8s.io"),
        cluster("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ]
}

#[tokio::test]
async fn the_chart_identity_is_confined_to_the_namespaces_it_serves() {
    init_tracing();
    let env = TestEnv::new("rbac-chart")
        .await
        .expect("test cluster and namespace");
    install_argo_crds(&env).await.expect("Argo CRDs");
    let more = EnvironmentNamespaces::create(&env, &["second", "argocd", "prod", "other"])
        .await
        .expect("more namespaces");
    let (ns, second, argocd, prod, other) = (
        env.namespace.clone(),
        more.name("second"),
        more.name("argocd"),
        more.name("prod"),
        more.name("other"),
    );
    install_chart(
        &env,
        &[
            &format!("watchNamespaces={{{ns},{second}}}"),
            &format!("promotion.argocdNamespace={argocd}"),
            &format!("promotion.environmentNamespace={}", more.pattern()),
        ],
    )
    .await
    .expect("install the chart");

    let mut checks = [served(&ns), served(&second)].concat();
    // The Lease, in the release namespace.
    checks.extend(each(
        &["get", "create", "update"],
        "leases.coordination.k8s.io",
        &ns,
        true,
    ));
    checks.extend(each(
        &["list", "delete"],
        "leases.coordination.k8s.io",
        &ns,
        false,
    ));
    checks.extend(each(
        &["update"],
        "leases.coordination.k8s.io",
        "kube-system",
        false,
    ));
    // Argo CD's Applications, by name; its namespace's Secrets (repository
    // credentials) stay out of reach.
    checks.extend(each(&["get"], "applications.argoproj.io", &argocd, true));
    checks.extend(each(
        &["list", "watch", "patch"],
        "applications.argoproj.io",
        &argocd,
        false,
    ));
    checks.extend(each(&["get"], "secrets", &argocd, false));
    checks.extend(each(&["create"], "jobs.batch", &argocd, false));
    // Prod's Rollout, by name.
    checks.extend(each(&["get"], "rollouts.argoproj.io", &prod, true));
    checks.extend(each(
        &["list", "patch"],
        "rollouts.argoproj.io",
        &prod,
        false,
    ));
    checks.extend(each(&["get"], "secrets", &prod, false));
    for elsewhere in [other.as_str(), "kube-system", "default"] {
        checks.extend(not_served(elsewhere));
    }
    checks.extend(cluster_scoped());
    let wrong = audit(&env, &["get", "secrets", "-n", &second], &checks).await;
    assert!(
        wrong.is_empty(),
        "the chart's RBAC is off:\n{}",
        wrong.join("\n")
    );

    more.cleanup().await.expect("delete the namespaces");
    env.cleanup().await.expect("delete the test namespace");
}

#[tokio::test]
async fn the_cluster_wide_chart_reads_secrets_only_where_told() {
    init_tracing();
    let env = TestEnv::new("rbac-cluster")
        .await
        .expect("test cluster and namespace");
    let more = EnvironmentNamespaces::create(&env, &["other"])
        .await
        .expect("another namespace");
    let (ns, other) = (env.namespace.clone(), more.name("other"));
    install_chart(
        &env,
        &[
            "watchNamespaces={}",
            &format!("clusterWide.secretNamespaces={{{ns}}}"),
        ],
    )
    .await
    .expect("install the chart");

    let mut checks = [served(&ns), served(&other)]
        .concat()
        .into_iter()
        // Secrets are the exception, checked below.
        .filter(|(args, _)| args.get(1).map(String::as_str) != Some("secrets"))
        .collect::<Vec<_>>();
    checks.push((
        vec![
            "list".into(),
            "quantizedmodels.quantops.dev".into(),
            "--all-namespaces".into(),
        ],
        true,
    ));
    checks.extend(each(&["get"], "secrets", &ns, true));
    checks.extend(each(&["list"], "secrets", &ns, false));
    for elsewhere in [other.as_str(), "kube-system", "default"] {
        checks.extend(each(&["get", "list"], "secrets", elsewhere, false));
    }
    checks.push((
        vec!["get".into(), "secrets".into(), "--all-namespaces".into()],
        false,
    ));
    let wrong = audit(&env, &["create", "jobs.batch", "-n", &other], &checks).await;

    // Cluster-scoped objects outlive the namespace: removed before judging.
    let name = release(&env);
    let gone = DeleteParams::default();
    let _ = Api::<ClusterRoleBinding>::all(env.client.clone())
        .delete(&name, &gone)
        .await;
    let _ = Api::<ClusterRole>::all(env.client.clone())
        .delete(&name, &gone)
        .await;
    assert!(
        wrong.is_empty(),
        "the chart's RBAC is off:\n{}",
        wrong.join("\n")
    );
    more.cleanup().await.expect("delete the namespace");
    env.cleanup().await.expect("delete the test namespace");
}

/// A QuantizedModel with a status, i.e. reconciled.
fn reconciled(qm: Option<&QuantizedModel>) -> bool {
    qm.and_then(|q| q.status.as_ref()).is_some()
}

fn small_model(name: &str) -> QuantizedModel {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "quantops.dev/v1alpha1", "kind": "QuantizedModel",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"name": "tiny-llama", "path": "tiny-llama"},
            "version": "v1",
            "quantization": {"method": "rtn", "bits": 4, "groupSize": 128},
            "validation": {"evalText": {"path": "text/eval.txt"}},
            "output": {"path": "out"},
            "resources": {"gpus": 0}
        }
    }))
    .expect("a QuantizedModel")
}

#[tokio::test]
async fn the_operator_serves_exactly_its_namespaces() {
    init_tracing();
    let env = TestEnv::new("rbac-serve")
        .await
        .expect("test cluster and namespace");
    let more = EnvironmentNamespaces::create(&env, &["second", "other"])
        .await
        .expect("more namespaces");
    let (ns, second, other) = (
        env.namespace.clone(),
        more.name("second"),
        more.name("other"),
    );
    install_chart(&env, &[&format!("watchNamespaces={{{ns},{second}}}")])
        .await
        .expect("install the chart");
    let mut options = OperatorOptions::new("quantops-0", &sim_worker_image(1));
    options.leader_election = false;
    // With the harness's QUANTOPS_WATCH_NAMESPACE (this test's namespace):
    // the one-namespace form and the list add up.
    options.extra_env = vec![("QUANTOPS_WATCH_NAMESPACES".into(), second.clone())];
    let operator = Operator::start(&env, options)
        .await
        .expect("start the operator");

    for namespace in [&ns, &second, &other] {
        let api: Api<QuantizedModel> = Api::namespaced(env.client.clone(), namespace);
        apply(&api, "served", &small_model("served"))
            .await
            .expect("apply a model");
    }
    for namespace in [&ns, &second] {
        let api: Api<QuantizedModel> = Api::namespaced(env.client.clone(), namespace);
        wait_for(&api, "served", reconciled, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{namespace}: {e}\noperator log:\n{}", operator.log_text()));
    }
    // The served ones are done; the other, created at the same time, would
    // have been by now. The operator could not even have read it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let unserved = Api::<QuantizedModel>::namespaced(env.client.clone(), &other)
        .get("served")
        .await
        .expect("read the model in the other namespace");
    assert!(
        unserved.status.is_none(),
        "a model outside the watched namespaces was reconciled: {:?}",
        unserved.status
    );
    let log = operator.log_text();
    assert!(
        !log.contains("403") && !log.contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    drop(operator);
    more.cleanup().await.expect("delete the namespaces");
    env.cleanup().await.expect("delete the test namespace");
}
