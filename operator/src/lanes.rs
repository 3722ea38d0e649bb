//! Two lanes of reconciliation permits: new work before progress.
//!
//! A model whose current spec was never acted on (no status yet, or a spec
//! edited since) waits for its first Job, which is what its user watches;
//! a model with a stage under way only has its next step to take. With one
//! queue, a thousand models created together waited behind the later stages
//! of the first ones (the Job of each finished stage wakes its model at
//! once), and the last first Job came minutes after its model. So each lane
//! has its own `max_concurrent_reconciles` permits: new models never queue
//! behind running ones, and neither lane can starve the other.

use std::sync::Arc;

use quantops_api::QuantizedModel;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The permits of both lanes, shared by every scope's controller.
#[derive(Clone)]
pub struct Lanes {
    fresh: Arc<Semaphore>,
    progress: Arc<Semaphore>,
}

impl Lanes {
    /// Lanes of `per_lane` permits each.
    pub fn new(per_lane: u16) -> Lanes {
        let permits = usize::from(per_lane.max(1));
        Lanes {
            fresh: Arc::new(Semaphore::new(permits)),
            progress: Arc::new(Semaphore::new(permits)),
        }
    }

    /// Waits for a permit of the model's lane. The semaphores are never
    /// closed, so this only waits.
    pub async fn enter(&self, qm: &QuantizedModel) -> Option<OwnedSemaphorePermit> {
        let lane = if is_fresh(qm) {
            &self.fresh
        } else {
            &self.progress
        };
        lane.clone().acquire_owned().await.ok()
    }
}

/// Whether the model's current spec was never acted on: no status, or a
/// status observed for an older generation.
pub fn is_fresh(qm: &QuantizedModel) -> bool {
    match &qm.status {
        None => true,
        Some(status) => {
            status.observed_generation.is_none()
                || status.observed_generation != qm.metadata.generation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::QuantizedModelStatus;

    fn model(generation: i64, observed: Option<i64>) -> QuantizedModel {
        let mut qm: QuantizedModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "quantops.dev/v1alpha1", "kind": "QuantizedModel",
            "metadata": {"name": "m", "generation": generation},
            "spec": {
                "baseModel": {"name": "a/b", "path": "m"},
                "version": "v1",
                "quantization": {"method": "rtn"},
                "validation": {"evalText": {"path": "eval.txt"}},
                "output": {"path": "out"}
            }
        }))
        .expect("a QuantizedModel");
        qm.status = observed.map(|g| QuantizedModelStatus {
            observed_generation: Some(g),
            ..QuantizedModelStatus::default()
        });
        qm
    }

    #[test]
    fn new_and_edited_models_take_the_fresh_lane() {
        assert!(is_fresh(&model(1, None)));
        assert!(is_fresh(&model(2, Some(1))));
        assert!(!is_fresh(&model(2, Some(2))));
    }

    #[tokio::test]
    async fn a_full_progress_lane_does_not_hold_up_a_new_model() {
        let lanes = Lanes::new(1);
        let busy = lanes.enter(&model(1, Some(1))).await;
        assert!(busy.is_some());
        let fresh = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            lanes.enter(&model(1, None)),
        )
        .await;
        assert!(
            matches!(fresh, Ok(Some(_))),
            "the fresh lane has its own permit"
        );
        let second = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            lanes.enter(&model(1, Some(1))),
        )
        .await;
        assert!(
            second.is_err(),
            "the progress lane is full until its permit returns"
        );
    }
}
