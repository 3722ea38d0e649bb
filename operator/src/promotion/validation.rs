//! The promotion's spec, checked before anything is read or sent: names that
//! must stay inside the promotion's namespace, and the repository policy of
//! [`crate::gitops::remote`]. The CRD refuses the same at admission; this
//! covers objects stored before those rules, and the operator's own setting
//! (`--allow-insecure-http-gitops`), which the CRD cannot know.

use super::{COMMITTED, GATES_PASSED};
use crate::gitops::remote::{self, RemotePolicy};
use quantops_api::ModelPromotionSpec;

/// A field of the spec the operator will not act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The condition that reports it: `GatesPassed` for the model reference,
    /// `Committed` for the repository.
    pub condition: &'static str,
    /// Starts with the field's path (`spec.gitops.url: ...`).
    pub message: String,
}

/// Checks every field the controller uses as a name or an address.
pub fn check_spec(spec: &ModelPromotionSpec, policy: RemotePolicy) -> Result<(), SpecError> {
    let refuse = |condition, message: String| Err(SpecError { condition, message });
    if !is_dns1123_subdomain(&spec.model_ref.name) {
        return refuse(
            GATES_PASSED,
            format!(
                "spec.modelRef.name: must be the name of a QuantizedModel in the promotion's namespace \
                 (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters); got {:?}",
                shorten(&spec.model_ref.name)
            ),
        );
    }
    let gitops = &spec.gitops;
    if let Some(secret) = &gitops.credentials_secret
        && !is_dns1123_subdomain(secret)
    {
        return refuse(
            COMMITTED,
            format!(
                "spec.gitops.credentialsSecret: must be the name of a Secret in the promotion's own namespace \
                 (a DNS-1123 subdomain, no namespace/ prefix); got {:?}",
                shorten(secret)
            ),
        );
    }
    if let Err(error) = remote::check_url(&gitops.url, policy, gitops.credentials_secret.is_some())
    {
        return refuse(COMMITTED, format!("spec.gitops.url: {error}"));
    }
    if let Err(error) = remote::check_branch(&gitops.branch) {
        return refuse(COMMITTED, format!("spec.gitops.branch: {error}"));
    }
    Ok(())
}

/// A Kubernetes object name (RFC 1123 subdomain), as Secrets and
/// QuantizedModels are named.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A user's value, cut for a message.
fn shorten(value: &str) -> String {
    value.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, url: &str, branch: &str, secret: Option<&str>) -> ModelPromotionSpec {
        serde_json::from_value(serde_json::json!({
            "modelRef": {"name": model},
            "environment": "test",
            "gitops": {"url": url, "branch": branch, "credentialsSecret": secret},
        }))
        .expect("a spec")
    }

    const STRICT: RemotePolicy = RemotePolicy {
        allow_insecure_http: false,
    };

    fn refused(s: &ModelPromotionSpec, policy: RemotePolicy) -> SpecError {
        check_spec(s, policy).expect_err("refused")
    }

    #[test]
    fn a_sound_spec_passes() {
        let s = spec(
            "tiny-v1.2",
            "https://git.example/m.git",
            "main",
            Some("gitops"),
        );
        assert_eq!(check_spec(&s, STRICT), Ok(()));
        let s = spec("tiny", "ssh://git@git.example/m.git", "release/1", None);
        assert_eq!(check_spec(&s, STRICT), Ok(()));
    }

    #[test]
    fn model_names_stay_in_the_namespace() {
        for bad in ["", "other/tiny", "../tiny", "Tiny", "tiny_", "-tiny"] {
            let s = spec(bad, "https://git.example/m.git", "main", None);
            let e = refused(&s, STRICT);
            assert_eq!(e.condition, GATES_PASSED);
            assert!(
                e.message.starts_with("spec.modelRef.name: "),
                "{}",
                e.message
            );
        }
        assert!(
            check_spec(
                &spec(&"a".repeat(254), "https://git.example/m.git", "main", None),
                STRICT
            )
            .is_err()
        );
    }

    #[test]
    fn secrets_come_from_the_promotions_namespace() {
        for bad in ["kube-system/gitops", "gitops/", "Gitops", "", "a..b"] {
            let s = spec("tiny", "https://git.example/m.git", "main", Some(bad));
            let e = refused(&s, STRICT);
            assert_eq!(e.condition, COMMITTED);
            assert!(
                e.message.starts_with("spec.gitops.credentialsSecret: "),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn the_issue_cases_name_their_field() {
        let http = RemotePolicy {
            allow_insecure_http: true,
        };
        for (url, branch, secret, policy, field) in [
            // http with credentials: refused even with the opt-in.
            (
                "http://127.0.0.1:18999/m.git",
                "main",
                Some("gitops"),
                http,
                "spec.gitops.url",
            ),
            (
                "http://127.0.0.1:18999/m.git",
                "main",
                None,
                STRICT,
                "spec.gitops.url",
            ),
            ("/srv/gitops.git", "main", None, http, "spec.gitops.url"),
            (
                "file:///srv/gitops.git",
                "main",
                None,
                http,
                "spec.gitops.url",
            ),
            (
                "ftp://git.example/m.git",
                "main",
                None,
                http,
                "spec.gitops.url",
            ),
            (
                "https://bot:pw@git.example/m.git",
                "main",
                None,
                http,
                "spec.gitops.url",
            ),
            (
                "https://git.example/m.git",
                "main:refs/heads/evil",
                None,
                http,
                "spec.gitops.branch",
            ),
        ] {
            let e = refused(&spec("tiny", url, branch, secret), policy);
            assert_eq!(e.condition, COMMITTED, "{url}");
            assert!(
                e.message.starts_with(&format!("{field}: ")),
                "{}",
                e.message
            );
            assert!(!e.message.contains("pw@"), "{}", e.message);
        }
        // Anonymous http with the opt-in is the test servers' case.
        let s = spec("tiny", "http://127.0.0.1:18999/m.git", "main", None);
        assert_eq!(check_spec(&s, http), Ok(()));
    }
}
