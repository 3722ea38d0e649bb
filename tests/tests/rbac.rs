//! RBAC and the service-account token machinery are real: a ServiceAccount
//! bound to a namespaced Role gets a token through the TokenRequest API and
//! is denied everything the Role does not grant.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use quantops_e2e::{TestEnv, apply, client_from, init_tracing};

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
