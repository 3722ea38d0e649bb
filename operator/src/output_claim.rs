//! An artifact directory claimed through the API server, so that two
//! models can never write one directory at once.
//!
//! [`crate::outputs::taken_by`] decides from the operator's cache, which can
//! lag: two models created in the same second, each reconciled before the
//! other's start reached the cache, would both start. So before a stage's
//! Job is created the model also holds a claim: a ConfigMap named after the
//! directory (`quantops-output-{hash}`) whose data names the model. Creating
//! it is atomic at the API server, so exactly one model holds a directory;
//! the claim is owned by its model, so the garbage collector frees it when
//! the model is deleted. A claim whose model no longer writes that
//! directory (its `spec.output` changed, or it is gone) is stale and is
//! deleted, guarded by its uid so that only the stale object goes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use quantops_api::QuantizedModel;
use sha2::{Digest, Sha256};

use crate::k8s::{KubeContext, KubeError};

/// The label on every claim, for `kubectl get cm -l quantops.dev/output-claim`.
pub const CLAIM_LABEL: &str = "quantops.dev/output-claim";

/// Who holds a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This model: its stage may write.
    Held,
    /// Another model (by name and uid) holds it.
    TakenBy { model: String, uid: String },
    /// It was freed between the create and the read: the next attempt
    /// creates it.
    Retry,
}

/// The claim's name: a hash of the directory, since a path is no object name.
pub fn claim_name(dir: &str) -> String {
    let digest = hex::encode(Sha256::digest(dir.as_bytes()));
    format!("quantops-output-{}", &digest[..20])
}

/// The claim `model` would create for `dir`.
fn render(model: &QuantizedModel, dir: &str) -> Option<ConfigMap> {
    let owner = model.owner_ref(&())?;
    let data = BTreeMap::from([
        ("model".to_string(), model.name_any()),
        ("uid".to_string(), owner.uid.clone()),
        ("directory".to_string(), dir.to_string()),
    ]);
    Some(ConfigMap {
        metadata: ObjectMeta {
            name: Some(claim_name(dir)),
            namespace: model.namespace(),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "quantops".to_string(),
                ),
                (CLAIM_LABEL.to_string(), "true".to_string()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// Whom an existing claim names.
fn holder(claim: &ConfigMap) -> Claim {
    let field = |key: &str| {
        claim
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .cloned()
            .unwrap_or_default()
    };
    Claim::TakenBy {
        model: field("model"),
        uid: field("uid"),
    }
}

/// Claims `dir` for `model`: creates the claim, or reads who holds it. A
/// model without a uid (never stored) cannot hold anything: it retries.
pub async fn claim(
    api: &Api<ConfigMap>,
    model: &QuantizedModel,
    dir: &str,
) -> Result<Claim, KubeError> {
    let Some(rendered) = render(model, dir) else {
        return Ok(Claim::Retry);
    };
    let name = claim_name(dir);
    let action = || format!("claiming artifact directory {dir} (ConfigMap {name})");
    match api.create(&PostParams::default(), &rendered).await {
        Ok(_) => return Ok(Claim::Held),
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error).during(action),
    }
    let Some(existing) = api.get_opt(&name).await.during(action)? else {
        return Ok(Claim::Retry);
    };
    let holder = holder(&existing);
    let mine = matches!(&holder, Claim::TakenBy { uid, .. } if Some(uid) == model.uid().as_ref());
    Ok(if mine { Claim::Held } else { holder })
}

/// Deletes the claim of `dir` if it still names `holder_uid` (another
/// model may have claimed the directory since it was read).
pub async fn release_stale(
    api: &Api<ConfigMap>,
    dir: &str,
    holder_uid: &str,
) -> Result<(), KubeError> {
    let name = claim_name(dir);
    let Some(existing) = api
        .get_opt(&name)
        .await
        .during(|| format!("reading claim {name}"))?
    else {
        return Ok(());
    };
    if !matches!(holder(&existing), Claim::TakenBy { uid, .. } if uid == holder_uid) {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.uid(),
            resource_version: existing.resource_version(),
        }),
        ..DeleteParams::background()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or changed since it was read: nothing stale to remove.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error).during(|| format!("deleting stale claim {name}")),
    }
}

/// Whether `holder` no longer writes `dir`: it is gone (not in `models`
/// nor found by uid), or its spec now names another directory.
pub fn is_stale<'a>(
    holder_uid: &str,
    dir: &str,
    models: impl IntoIterator<Item = &'a QuantizedModel>,
) -> bool {
    let found = models
        .into_iter()
        .find(|qm| qm.meta().uid.as_deref() == Some(holder_uid));
    match found {
        None => true,
        Some(qm) => {
            qm.metadata.deletion_timestamp.is_some()
                || crate::outputs::artifact_dir(&qm.spec) != dir
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, uid: &str, output: &str) -> QuantizedModel {
        let yaml = format!(
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {{name: {name}, namespace: ns, uid: {uid}}}\nspec:\n  baseModel: {{name: example/tiny-llama, path: m}}\n  version: v1\n  quantization: {{method: rtn}}\n  output: {{path: {output}}}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_claim_is_named_by_its_directory_and_owned_by_its_model() {
        let qm = model("a", "uid-a", "out");
        let dir = crate::outputs::artifact_dir(&qm.spec);
        let claim = render(&qm, &dir).unwrap_or_else(|| panic!("a stored model renders"));
        let name = claim.name_any();
        assert!(name.starts_with("quantops-output-") && name.len() <= 63);
        assert_eq!(name, claim_name(&dir), "one directory, one name");
        assert_ne!(name, claim_name("other/dir"));
        let owners = claim.metadata.owner_references.unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, "uid-a");
        assert_eq!(owners[0].controller, None, "the model does not control it");
        assert_eq!(
            holder(&render(&qm, &dir).unwrap_or_default()),
            Claim::TakenBy {
                model: "a".into(),
                uid: "uid-a".into()
            }
        );
    }

    #[test]
    fn a_claim_is_stale_when_its_model_is_gone_or_writes_elsewhere() {
        let a = model("a", "uid-a", "out");
        let dir = crate::outputs::artifact_dir(&a.spec);
        assert!(!is_stale("uid-a", &dir, [&a]));
        assert!(is_stale("uid-a", &dir, [&model("a", "uid-a", "moved")]));
        assert!(is_stale("uid-a", &dir, [&model("b", "uid-b", "out")]));
        assert!(is_stale("uid-a", &dir, []));
    }
}
