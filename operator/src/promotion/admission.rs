//! Whether a promotion may go ahead: the gates a variant must have passed,
//! and the order of the environments. Pure functions of the objects read,
//! so every refusal is unit-tested and explains itself in one sentence.

use quantops_api::{Environment, ModelPromotion, QuantizedModel};

/// The gate the worker names for the system tests (quantizer-job's gates.rs).
pub const SYSTEM_TESTS_GATE: &str = "system-tests";

/// Why a promotion is refused; the `reason` goes into `GatesPassed`.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// The model must be validated with every gate passed; for prod, its system
/// tests must have run and passed too.
pub fn check_model(qm: &QuantizedModel, environment: Environment) -> Result<(), Refusal> {
    let name = qm.metadata.name.as_deref().unwrap_or_default();
    let Some(status) = &qm.status else {
        return Err(refuse(
            "NotValidated",
            format!("QuantizedModel {name} has no status yet: it has not been validated"),
        ));
    };
    let validated = crate::conditions::find(&status.conditions, "Validated");
    match validated {
        Some(c) if c.status == crate::conditions::TRUE => {}
        Some(c) => {
            return Err(refuse(
                "NotValidated",
                format!(
                    "QuantizedModel {name} is not Validated ({}: {})",
                    c.reason, c.message
                ),
            ));
        }
        None => {
            return Err(refuse(
                "NotValidated",
                format!("QuantizedModel {name} has not been validated yet"),
            ));
        }
    }
    if qm.metadata.generation.is_some()
        && validated.and_then(|c| c.observed_generation) != qm.metadata.generation
    {
        return Err(refuse(
            "NotValidated",
            format!("QuantizedModel {name} changed since its validation; waiting for the new one"),
        ));
    }
    let failed: Vec<&str> = status
        .gates
        .iter()
        .filter(|g| !g.passed)
        .map(|g| g.name.as_str())
        .collect();
    if status.gates.is_empty() {
        return Err(refuse(
            "NoGates",
            format!("QuantizedModel {name} records no gate results"),
        ));
    }
    if !failed.is_empty() {
        return Err(refuse(
            "GateFailed",
            format!("QuantizedModel {name} failed gates: {}", failed.join(", ")),
        ));
    }
    if status.artifact_path.is_none() || status.variant.is_none() {
        return Err(refuse(
            "NoArtifact",
            format!("QuantizedModel {name} reports no artifact path or variant"),
        ));
    }
    if environment == Environment::Prod && !status.gates.iter().any(|g| g.name == SYSTEM_TESTS_GATE)
    {
        return Err(refuse(
            "SystemTestsMissing",
            format!(
                "prod needs passed system tests; QuantizedModel {name} ran none (set spec.validation.systemTests)"
            ),
        ));
    }
    Ok(())
}

/// The environment that must already serve the variant, if any.
pub fn previous(environment: Environment) -> Option<Environment> {
    match environment {
        Environment::Experiment | Environment::Test => None,
        Environment::Prod => Some(Environment::Test),
    }
}

/// Prod needs the same variant promoted (synced and healthy) in test by a
/// promotion in the same namespace.
pub fn check_order(
    environment: Environment,
    variant: &str,
    promotions: &[ModelPromotion],
) -> Result<(), Refusal> {
    let Some(before) = previous(environment) else {
        return Ok(());
    };
    let promoted = promotions.iter().any(|mp| {
        mp.spec.environment == before
            && mp.status.as_ref().is_some_and(|s| {
                s.variant.as_deref() == Some(variant)
                    && s.phase.as_deref() == Some(super::Phase::Promoted.as_str())
            })
    });
    if promoted {
        Ok(())
    } else {
        Err(refuse(
            "PreviousEnvironmentNotPromoted",
            format!(
                "{} needs variant {variant} promoted and healthy in {} first",
                environment.as_str(),
                before.as_str()
            ),
        ))
    }
}

/// Another promotion that holds `folder` of the same repository and
/// branch: it committed there and stands (not rolled back, not being
/// deleted). A folder has one such owner at a time, so that a promotion
/// that says `Promoted` is what the folder serves; replacing the variant
/// served is done by that owner (a new `spec.modelRef`), or after it is
/// deleted.
pub fn folder_owner<'a>(
    me: &ModelPromotion,
    folder: &str,
    promotions: impl IntoIterator<Item = &'a ModelPromotion>,
) -> Option<&'a ModelPromotion> {
    promotions.into_iter().find(|other| {
        let same_object = other.metadata.uid.is_some() && other.metadata.uid == me.metadata.uid;
        let Some(status) = &other.status else {
            return false;
        };
        !same_object
            && other.metadata.deletion_timestamp.is_none()
            && other.spec.environment == me.spec.environment
            && other.spec.gitops.url == me.spec.gitops.url
            && other.spec.gitops.branch == me.spec.gitops.branch
            && status.folder.as_deref() == Some(folder)
            && status.commit.is_some()
            && status.phase.as_deref() != Some(super::Phase::RolledBack.as_str())
    })
}

/// The refusal naming the folder's owner.
pub fn folder_in_use(folder: &str, owner: &ModelPromotion) -> Refusal {
    let status = owner.status.clone().unwrap_or_default();
    refuse(
        "FolderInUse",
        format!(
            "{folder} is served by ModelPromotion {}/{} (QuantizedModel {}, variant {}); \
             to replace it, set that promotion's spec.modelRef.name, or delete it first",
            owner.metadata.namespace.as_deref().unwrap_or_default(),
            owner.metadata.name.as_deref().unwrap_or_default(),
            owner.spec.model_ref.name,
            status.variant.as_deref().unwrap_or("unknown"),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::GateResult;

    fn model(validated: &str, gates: &[(&str, bool)]) -> QuantizedModel {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "QuantizedModel",
            "metadata": {"name": "m", "generation": 1},
            "spec": {"baseModel": {"name": "example/tiny", "path": "tiny"}, "version": "v1",
                     "quantization": {"method": "rtn"}, "output": {"path": "out"}},
            "status": {
                "variant": "tiny-v1-int4-rtn-g128",
                "artifactPath": "out/tiny/v1-int4-rtn-g128",
                "conditions": [{"type": "Validated", "status": validated, "reason": "GatesPassed",
                                "message": "m", "observedGeneration": 1,
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "gates": gates.iter().map(|(n, p)| GateResult {
                    name: n.to_string(), metric: "x".into(), baseline: None, value: 1.0,
                    threshold: 1.0, passed: *p }).collect::<Vec<_>>()
            }
        }))
        .expect("a model")
    }

    #[test]
    fn validated_models_with_passed_gates_go_ahead() {
        let qm = model("True", &[("perplexity", true), ("system-tests", true)]);
        assert_eq!(check_model(&qm, Environment::Test), Ok(()));
        assert_eq!(check_model(&qm, Environment::Prod), Ok(()));
    }

    #[test]
    fn refusals_name_the_reason() {
        let failed = model("True", &[("perplexity", false)]);
        let r = check_model(&failed, Environment::Test).expect_err("refused");
        assert_eq!(r.reason, "GateFailed");
        assert!(r.message.contains("perplexity"));

        let unvalidated = model("False", &[("perplexity", true)]);
        assert_eq!(
            check_model(&unvalidated, Environment::Test).map_err(|r| r.reason),
            Err("NotValidated")
        );

        let no_system_tests = model("True", &[("perplexity", true)]);
        assert_eq!(check_model(&no_system_tests, Environment::Test), Ok(()));
        assert_eq!(
            check_model(&no_system_tests, Environment::Prod).map_err(|r| r.reason),
            Err("SystemTestsMissing")
        );
    }

    fn promotion(env: &str, variant: &str, phase: &str) -> ModelPromotion {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": format!("p-{env}")},
            "spec": {"modelRef": {"name": "m"}, "environment": env,
                     "gitops": {"url": "https://git.example/r.git"}},
            "status": {"variant": variant, "phase": phase}
        }))
        .expect("a promotion")
    }

    #[test]
    fn prod_needs_the_variant_promoted_in_test() {
        let v = "tiny-v1-int4-rtn-g128";
        assert_eq!(check_order(Environment::Test, v, &[]), Ok(()));
        assert!(check_order(Environment::Prod, v, &[]).is_err());
        assert!(check_order(Environment::Prod, v, &[promotion("test", v, "Syncing")]).is_err());
        assert!(
            check_order(
                Environment::Prod,
                v,
                &[promotion("test", "other", "Promoted")]
            )
            .is_err()
        );
        assert!(
            check_order(
                Environment::Prod,
                v,
                &[promotion("experiment", v, "Promoted")]
            )
            .is_err()
        );
        assert_eq!(
            check_order(Environment::Prod, v, &[promotion("test", v, "Promoted")]),
            Ok(())
        );
    }

    fn owning(name: &str, uid: &str, env: &str, folder: &str, phase: &str) -> ModelPromotion {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": name, "namespace": "team", "uid": uid},
            "spec": {"modelRef": {"name": format!("qm-{name}")}, "environment": env,
                     "gitops": {"url": "https://git.example/r.git"}},
            "status": {"variant": "tiny-v1", "phase": phase, "commit": "abc", "folder": folder}
        }))
        .expect("a promotion")
    }

    #[test]
    fn a_folder_has_one_owner() {
        let folder = "envs/test/tiny-llama";
        let me = owning("b", "uid-b", "test", "", "Blocked");
        let a = owning("a", "uid-a", "test", folder, "Promoted");
        let owner = folder_owner(&me, folder, [&a]).expect("owned");
        assert_eq!(owner.metadata.name.as_deref(), Some("a"));
        let refusal = folder_in_use(folder, owner);
        assert_eq!(refusal.reason, "FolderInUse");
        assert!(
            refusal.message.contains("ModelPromotion team/a")
                && refusal.message.contains("QuantizedModel qm-a")
                && refusal.message.contains(folder),
            "{}",
            refusal.message
        );
        // Itself, other folders and environments, rolled-back or deleted
        // promotions and other repositories own nothing of ours.
        let me_again = owning("b", "uid-b", "test", folder, "Promoted");
        assert!(folder_owner(&me_again, folder, [&me_again]).is_none());
        let other_folder = owning("c", "uid-c", "test", "envs/test/other", "Promoted");
        let other_env = owning("d", "uid-d", "prod", "envs/prod/tiny-llama", "Promoted");
        let rolled_back = owning("e", "uid-e", "test", folder, "RolledBack");
        let mut deleted = owning("f", "uid-f", "test", folder, "Promoted");
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut elsewhere = owning("g", "uid-g", "test", folder, "Promoted");
        elsewhere.spec.gitops.url = "https://git.example/other.git".to_string();
        let mut uncommitted = owning("h", "uid-h", "test", folder, "Blocked");
        uncommitted.status.as_mut().expect("status").commit = None;
        assert!(
            folder_owner(
                &me,
                folder,
                [
                    &other_folder,
                    &other_env,
                    &rolled_back,
                    &deleted,
                    &elsewhere,
                    &uncommitted
                ]
            )
            .is_none()
        );
    }
}
