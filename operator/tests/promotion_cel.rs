//! The ModelPromotion CRD's CEL rules, evaluated client-side with the CEL
//! library kube-rs ships, against the operator's own spec check: what the
//! API server refuses, the operator refuses too (for objects stored before
//! the rules), and each refusal names its field. Plain `http://` is the one
//! deliberate difference: the CRD admits it (anonymous only), the operator
//! decides by its `--allow-insecure-http-gitops` setting.

use kube::core::cel::validate_cel;
use quantops_api::ModelPromotion;
use quantops_operator::gitops::remote::RemotePolicy;
use quantops_operator::promotion::validation::check_spec;

fn promotion(model: &str, url: &str, branch: &str, secret: Option<&str>) -> ModelPromotion {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
        "metadata": {"name": "p", "namespace": "experiment"},
        "spec": {"modelRef": {"name": model}, "environment": "test",
                 "gitops": {"url": url, "branch": branch, "credentialsSecret": secret}},
    }))
    .expect("a ModelPromotion")
}

const OPT_IN: RemotePolicy = RemotePolicy {
    allow_insecure_http: true,
};
const STRICT: RemotePolicy = RemotePolicy {
    allow_insecure_http: false,
};

#[test]
fn sound_promotions_pass_both() {
    for (url, secret) in [
        ("https://git.example/models-gitops.git", Some("gitops")),
        ("https://git.example:8443/org/models.git", None),
        ("ssh://git@git.example/models-gitops.git", Some("gitops")),
        (
            "ssh://git@127.0.0.1:2222/srv/repos/m.git",
            Some("gitops.ssh"),
        ),
        ("git@github.com:org/models-gitops.git", Some("gitops")),
        ("https://[fd00::1]:443/x.git", None),
    ] {
        let mp = promotion("tiny-v1.2", url, "release/1.2", secret);
        assert_eq!(
            validate_cel(&mp).map_err(|e| e.to_string()),
            Ok(()),
            "{url}"
        );
        assert_eq!(check_spec(&mp.spec, STRICT), Ok(()), "{url}");
    }
}

#[test]
fn plain_http_is_the_operators_decision() {
    let mp = promotion("tiny", "http://127.0.0.1:18999/m.git", "main", None);
    assert_eq!(validate_cel(&mp).map_err(|e| e.to_string()), Ok(()));
    assert_eq!(check_spec(&mp.spec, OPT_IN), Ok(()));
    let err = check_spec(&mp.spec, STRICT).expect_err("refused without the opt-in");
    assert!(
        err.message.starts_with("spec.gitops.url: plain http://"),
        "{}",
        err.message
    );
}

#[test]
fn refusals_agree_and_name_the_field() {
    let ok = "https://git.example/models-gitops.git";
    for (model, url, branch, secret, field) in [
        (
            "tiny",
            "http://127.0.0.1:18999/m.git",
            "main",
            Some("gitops"),
            "spec.gitops.url",
        ),
        (
            "tiny",
            "http://bot:pw@127.0.0.1:18999/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "https://bot:pw@git.example/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "https://token@git.example/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "ssh://git:pw@git.example/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        ("tiny", "/srv/gitops.git", "main", None, "spec.gitops.url"),
        ("tiny", "./gitops", "main", None, "spec.gitops.url"),
        (
            "tiny",
            "file:///srv/gitops.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "ftp://git.example/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "git://git.example/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "HTTPS://git.example/m.git",
            "main",
            None,
            "spec.gitops.url",
        ),
        ("tiny", "https:///m.git", "main", None, "spec.gitops.url"),
        (
            "tiny",
            "https://git.example/m.git?private_token=x",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            "https://git.example/m.git#main",
            "main",
            None,
            "spec.gitops.url",
        ),
        (
            "tiny",
            ok,
            "main:refs/heads/evil",
            None,
            "spec.gitops.branch",
        ),
        ("tiny", ok, "refs/heads/main", None, "spec.gitops.branch"),
        ("tiny", ok, "-main", None, "spec.gitops.branch"),
        ("tiny", ok, "+main", None, "spec.gitops.branch"),
        ("tiny", ok, "a..b", None, "spec.gitops.branch"),
        ("tiny", ok, "main.lock", None, "spec.gitops.branch"),
        ("tiny", ok, "HEAD", None, "spec.gitops.branch"),
        (
            "tiny",
            ok,
            "main",
            Some("kube-system/gitops"),
            "spec.gitops.credentialsSecret",
        ),
        (
            "tiny",
            ok,
            "main",
            Some("Gitops"),
            "spec.gitops.credentialsSecret",
        ),
        ("", ok, "main", None, "spec.modelRef.name"),
        ("other/tiny", ok, "main", None, "spec.modelRef.name"),
        ("Tiny", ok, "main", None, "spec.modelRef.name"),
    ] {
        let mp = promotion(model, url, branch, secret);
        let cel = validate_cel(&mp).err().map(|e| e.to_string());
        assert!(
            cel.as_deref().is_some_and(|e| e.contains(field)),
            "CEL: {cel:?} for {url} {branch} {secret:?} {model:?}"
        );
        let local = check_spec(&mp.spec, OPT_IN).err().map(|e| e.message);
        assert!(
            local.as_deref().is_some_and(|e| e.starts_with(field)),
            "operator: {local:?} for {url} {branch} {secret:?} {model:?}"
        );
        for message in [cel, local].into_iter().flatten() {
            assert!(!message.contains("pw@"), "a password echoed: {message}");
        }
    }
}
