//! The promotion gauges on `/metrics`, recomputed from the controller's
//! cache of ModelPromotions rather than set during reconciliations: every
//! value then comes from the stored status, is the same on a restarted
//! operator, and disappears with its promotion.
//!
//! - `quantops_quality_score` / `quantops_quality_threshold` for every
//!   promotion with a quality window that still serves (not rolled back);
//! - `quantops_modelpromotions{phase}`;
//! - `quantops_modelpromotion_unpromoted_seconds` for every promotion not
//!   serving (neither `Promoted` nor `RolledBack`): since it was created, or
//!   since its `Promoted` condition last changed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use quantops_api::ModelPromotion;

use super::{PROMOTED, Phase};
use crate::conditions::{self, TRUE};
use crate::metrics::Metrics;

/// The phase a promotion without one is counted under.
const PENDING: &str = "Pending";
/// How often the gauges are recomputed.
const INTERVAL: Duration = Duration::from_secs(10);

/// One recomputation's values.
#[derive(Debug, Default, PartialEq)]
pub struct Observed {
    /// `[model, variant, environment]` → (score, threshold).
    pub quality: BTreeMap<[String; 3], (f64, f64)>,
    /// `[namespace, promotion, environment, phase]` → seconds.
    pub unpromoted: BTreeMap<[String; 4], f64>,
    pub phases: BTreeMap<String, i64>,
}

/// The gauges' values for these promotions at `now`.
pub fn observe(promotions: &[std::sync::Arc<ModelPromotion>], now: Timestamp) -> Observed {
    let mut observed = Observed::default();
    for phase in [
        Phase::Blocked,
        Phase::Syncing,
        Phase::Canary,
        Phase::Promoted,
        Phase::RolledBack,
        Phase::Failed,
    ] {
        observed.phases.insert(phase.as_str().to_string(), 0);
    }
    observed.phases.insert(PENDING.to_string(), 0);
    for mp in promotions {
        let status = mp.status.clone().unwrap_or_default();
        let phase = status.phase.clone().unwrap_or_else(|| PENDING.to_string());
        *observed.phases.entry(phase.clone()).or_insert(0) += 1;
        let environment = mp.spec.environment.as_str().to_string();
        let rolled_back = phase == Phase::RolledBack.as_str();
        if let Some(quality) = &status.quality
            && !rolled_back
            && let (Some(model), Some(score), Some(threshold)) =
                (&quality.model, quality.score, quality.threshold)
        {
            let variant = status.variant.clone().unwrap_or_default();
            observed.quality.insert(
                [model.clone(), variant, environment.clone()],
                (score, threshold),
            );
        }
        if phase == Phase::Promoted.as_str() || rolled_back {
            continue;
        }
        let since = conditions::find(&status.conditions, PROMOTED)
            .filter(|c| c.status != TRUE)
            .map(|c| c.last_transition_time.0)
            .or_else(|| mp.creation_timestamp().map(|t| t.0));
        if let Some(since) = since {
            let seconds = now.duration_since(since).as_secs_f64().max(0.0);
            observed.unpromoted.insert(
                [
                    mp.namespace().unwrap_or_default(),
                    mp.name_any(),
                    environment,
                    phase,
                ],
                seconds,
            );
        }
    }
    observed
}

/// Keeps the gauges current from the controllers' caches (one per watched
/// namespace) until aborted. Series of promotions that went away are
/// removed, not left at their last value.
pub async fn export(stores: Vec<Store<ModelPromotion>>, metrics: Metrics) {
    let mut previous = Observed::default();
    loop {
        let promotions: Vec<_> = stores.iter().flat_map(Store::state).collect();
        let observed = observe(&promotions, Timestamp::now());
        apply(&metrics, &previous, &observed);
        previous = observed;
        tokio::time::sleep(INTERVAL).await;
    }
}

fn apply(metrics: &Metrics, previous: &Observed, observed: &Observed) {
    for (labels, (score, threshold)) in &observed.quality {
        let labels = labels.each_ref().map(String::as_str);
        metrics.quality_score.with_label_values(&labels).set(*score);
        metrics
            .quality_threshold
            .with_label_values(&labels)
            .set(*threshold);
    }
    for labels in stale(&previous.quality, &observed.quality) {
        let labels = labels.each_ref().map(String::as_str);
        // Absent already is fine: the series is gone either way.
        let _ = metrics.quality_score.remove_label_values(&labels);
        let _ = metrics.quality_threshold.remove_label_values(&labels);
    }
    for (labels, seconds) in &observed.unpromoted {
        let labels = labels.each_ref().map(String::as_str);
        metrics
            .promotion_unpromoted_seconds
            .with_label_values(&labels)
            .set(*seconds);
    }
    for labels in stale(&previous.unpromoted, &observed.unpromoted) {
        let labels = labels.each_ref().map(String::as_str);
        let _ = metrics
            .promotion_unpromoted_seconds
            .remove_label_values(&labels);
    }
    for (phase, count) in &observed.phases {
        metrics
            .promotions_by_phase
            .with_label_values(&[phase.as_str()])
            .set(*count);
    }
}

fn stale<'a, K: Ord, V>(before: &'a BTreeMap<K, V>, now: &BTreeMap<K, V>) -> BTreeSet<&'a K> {
    before.keys().filter(|k| !now.contains_key(*k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn promotion(name: &str, status: serde_json::Value) -> Arc<ModelPromotion> {
        let mp = serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "ModelPromotion",
            "metadata": {"name": name, "namespace": "ml", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"modelRef": {"name": "tiny"}, "environment": "prod", "gitops": {"url": "u"}},
            "status": status,
        });
        Arc::new(serde_json::from_value(mp).unwrap_or_else(|e| panic!("{e}")))
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn gauges_come_from_the_status() -> Result<(), prometheus::Error> {
        let serving = promotion(
            "a",
            serde_json::json!({"phase": "Promoted", "variant": "tiny-v1",
                "quality": {"model": "tiny-llama", "score": 0.7, "threshold": 0.8}}),
        );
        let rolled_back = promotion(
            "b",
            serde_json::json!({"phase": "RolledBack", "variant": "tiny-v0",
                "quality": {"model": "tiny-llama", "score": 0.1, "threshold": 0.8}}),
        );
        let stuck = promotion(
            "c",
            serde_json::json!({"phase": "Syncing", "conditions": [{"type": "Promoted",
                "status": "False", "reason": "x", "message": "", "lastTransitionTime": "2025-01-01T01:00:00Z"}]}),
        );
        let new = promotion("d", serde_json::json!({}));
        let now = at("2025-01-01T02:00:00Z");
        let observed = observe(&[serving, rolled_back, stuck, new], now);
        let key = |m: &str, v: &str| [m.to_string(), v.to_string(), "prod".to_string()];
        assert_eq!(
            observed.quality.get(&key("tiny-llama", "tiny-v1")),
            Some(&(0.7, 0.8))
        );
        assert!(!observed.quality.contains_key(&key("tiny-llama", "tiny-v0")));
        let stuck_key = ["ml", "c", "prod", "Syncing"].map(str::to_string);
        assert_eq!(observed.unpromoted.get(&stuck_key), Some(&3600.0));
        let new_key = ["ml", "d", "prod", "Pending"].map(str::to_string);
        assert_eq!(observed.unpromoted.get(&new_key), Some(&7200.0));
        assert_eq!(
            observed.unpromoted.len(),
            2,
            "serving and rolled back are not stuck"
        );
        assert_eq!(observed.phases.get("Promoted"), Some(&1));
        assert_eq!(observed.phases.get("Failed"), Some(&0));

        // Exported, then removed once the promotion is gone.
        let metrics = Metrics::new()?;
        apply(&metrics, &Observed::default(), &observed);
        let text = metrics.render()?;
        assert!(text.contains(
            r#"quantops_quality_score{environment="prod",model="tiny-llama",variant="tiny-v1"} 0.7"#
        ), "{text}");
        assert!(text.contains(r#"quantops_modelpromotion_unpromoted_seconds{environment="prod",namespace="ml",phase="Syncing",promotion="c"} 3600"#), "{text}");
        let later = observe(&[], now);
        apply(&metrics, &observed, &later);
        let text = metrics.render()?;
        assert!(!text.contains("quantops_quality_score{"), "{text}");
        assert!(
            !text.contains("quantops_modelpromotion_unpromoted_seconds{"),
            "{text}"
        );
        Ok(())
    }
}
