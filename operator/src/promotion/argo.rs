//! Reading Argo CD's `Application` and Argo Rollouts' `Rollout` status.
//! Both are read as dynamic objects (argoproj.io/v1alpha1), so the operator
//! needs neither project's Rust types, and only the few status fields used
//! here are part of the contract.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

/// argoproj.io/v1alpha1 Application.
pub fn application_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "argoproj.io",
        "v1alpha1",
        "Application",
    ))
}

/// argoproj.io/v1alpha1 Rollout.
pub fn rollout_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Rollout"))
}

/// What an Application says about the environment.
#[derive(Clone, Debug, PartialEq)]
pub enum AppState {
    /// Synced and Healthy at `revision` (which must contain our commit).
    SyncedHealthy { revision: String },
    /// Not there yet: out of sync, progressing, or synced to another revision.
    Waiting(String),
    /// Synced but Degraded or Missing: the environment is broken.
    Degraded(String),
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, key| v.get(key))?.as_str()
}

/// Reads `status.sync` and `status.health`.
pub fn application_state(app: &DynamicObject) -> AppState {
    let status = app.data.get("status").cloned().unwrap_or(Value::Null);
    let sync = text(&status, &["sync", "status"]).unwrap_or("Unknown");
    let revision = text(&status, &["sync", "revision"]).unwrap_or_default();
    let health = text(&status, &["health", "status"]).unwrap_or("Unknown");
    let message = text(&status, &["health", "message"])
        .or_else(|| text(&status, &["operationState", "message"]))
        .unwrap_or_default();
    match (sync, health) {
        ("Synced", "Healthy") if !revision.is_empty() => AppState::SyncedHealthy {
            revision: revision.to_string(),
        },
        ("Synced", "Degraded" | "Missing") => AppState::Degraded(format!(
            "Application is {health} at {revision}{}",
            suffix(message)
        )),
        _ => AppState::Waiting(format!(
            "Application sync {sync}, health {health}{}",
            suffix(message)
        )),
    }
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// What a Rollout says about the prod canary.
#[derive(Clone, Debug, PartialEq)]
pub enum CanaryState {
    /// Fully promoted and healthy, running `variant`.
    Healthy,
    /// Still stepping through the canary (or paused between steps).
    Progressing(String),
    /// Aborted, degraded, or its analysis failed: roll back.
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// Reads `status.phase`, `status.abort` and `status.message`, and checks that
/// the Rollout's pod template runs `variant` (label `quantops.dev/variant`):
/// a Rollout still on the previous variant is not this canary's health.
pub fn rollout_state(rollout: &DynamicObject, variant_label: &str) -> CanaryState {
    let data = &rollout.data;
    let running = text(
        data,
        &[
            "spec",
            "template",
            "metadata",
            "labels",
            "quantops.dev/variant",
        ],
    )
    .unwrap_or_default();
    if running != variant_label {
        return CanaryState::Progressing(format!(
            "the Rollout runs variant {running:?}, waiting for {variant_label}"
        ));
    }
    let status = data.get("status").cloned().unwrap_or(Value::Null);
    let phase = text(&status, &["phase"]).unwrap_or("Progressing");
    let message = text(&status, &["message"]).unwrap_or_default().to_string();
    let aborted = status
        .get("abort")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let analysis_failed = message.to_ascii_lowercase().contains("analysis")
        || status
            .get("conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    text(c, &["reason"])
                        .is_some_and(|r| r.contains("AnalysisRun") && r.contains("Fail"))
                })
            });
    if aborted || phase == "Degraded" {
        let reason = if analysis_failed {
            "AnalysisFailed"
        } else if aborted {
            "CanaryAborted"
        } else {
            "RolloutDegraded"
        };
        return CanaryState::Failed {
            reason,
            message: if message.is_empty() {
                format!("Rollout {phase}")
            } else {
                message
            },
        };
    }
    if phase == "Healthy" {
        CanaryState::Healthy
    } else {
        CanaryState::Progressing(format!("Rollout {phase}{}", suffix(&message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(data: Value) -> DynamicObject {
        let mut obj = DynamicObject::new("x", &rollout_resource());
        obj.data = data;
        obj
    }

    #[test]
    fn applications() {
        let app = |sync: &str, health: &str| {
            object(
                serde_json::json!({"status": {"sync": {"status": sync, "revision": "abc"},
                                                 "health": {"status": health}}}),
            )
        };
        assert_eq!(
            application_state(&app("Synced", "Healthy")),
            AppState::SyncedHealthy {
                revision: "abc".into()
            }
        );
        assert!(matches!(
            application_state(&app("OutOfSync", "Healthy")),
            AppState::Waiting(_)
        ));
        assert!(matches!(
            application_state(&app("Synced", "Progressing")),
            AppState::Waiting(_)
        ));
        assert!(matches!(
            application_state(&app("Synced", "Degraded")),
            AppState::Degraded(_)
        ));
        assert!(matches!(
            application_state(&object(Value::Null)),
            AppState::Waiting(_)
        ));
    }

    fn rollout(variant: &str, status: Value) -> DynamicObject {
        object(serde_json::json!({
            "spec": {"template": {"metadata": {"labels": {"quantops.dev/variant": variant}}}},
            "status": status
        }))
    }

    #[test]
    fn rollouts() {
        let v = "tiny-v1";
        assert_eq!(
            rollout_state(&rollout(v, serde_json::json!({"phase": "Healthy"})), v),
            CanaryState::Healthy
        );
        assert!(matches!(
            rollout_state(&rollout("old", serde_json::json!({"phase": "Healthy"})), v),
            CanaryState::Progressing(_)
        ));
        assert!(matches!(
            rollout_state(&rollout(v, serde_json::json!({"phase": "Paused"})), v),
            CanaryState::Progressing(_)
        ));
        assert!(matches!(
            rollout_state(
                &rollout(
                    v,
                    serde_json::json!({"phase": "Degraded", "abort": true, "message": "RolloutAborted: Rollout aborted update to revision 2"})
                ),
                v
            ),
            CanaryState::Failed {
                reason: "CanaryAborted",
                ..
            }
        ));
        assert!(matches!(
            rollout_state(
                &rollout(
                    v,
                    serde_json::json!({"phase": "Degraded", "abort": true, "message": "RolloutAborted: Metric \"error-rate\" assessed Failed due to failed (1) > failureLimit (0) in AnalysisRun"})
                ),
                v
            ),
            CanaryState::Failed {
                reason: "AnalysisFailed",
                ..
            }
        ));
        assert!(matches!(
            rollout_state(&rollout(v, serde_json::json!({"phase": "Degraded"})), v),
            CanaryState::Failed {
                reason: "RolloutDegraded",
                ..
            }
        ));
    }
}
