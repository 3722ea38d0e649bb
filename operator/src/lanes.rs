//! Two lanes of reconciliation permits: new work before progress.
//!
//! A model whose current spec was never acted on (no status yet, or a spec
//! edited since) waits for its first Job, which is what its user watches;
//! a model with a stage under way only has its next step to take. With one
//! queue, a thousand models created together waited behind the later stages
//! of the first ones (the Job of each finished stage wakes its model at
//! once), and the last first Job came minutes after its model. So new models
//! have a lane of their own, and the progress lane gives way to it: while a
//! new model waits for a permit, models under way run only on a small
//! reserve of their lane's permits (a quarter), so that the API server's
//! capacity goes to first Jobs; when no new model waits, the progress lane
//! has all its permits again. The reserve keeps a long burst of creations
//! from stopping the stages under way.

use std::sync::Arc;

use quantops_api::QuantizedModel;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// The permits of both lanes, shared by every scope's controller.
#[derive(Clone)]
pub struct Lanes {
    fresh: Arc<Semaphore>,
    /// Progress permits that stay usable while new models wait.
    reserve: Arc<Semaphore>,
    /// The rest of the progress lane: taken only while no new model waits.
    yielding: Arc<Semaphore>,
    /// How many new models are waiting for a fresh permit.
    fresh_waiting: Arc<watch::Sender<usize>>,
}

impl Lanes {
    /// Lanes of `per_lane` permits each; a quarter of the progress lane (at
    /// least one permit) is its reserve.
    pub fn new(per_lane: u16) -> Lanes {
        let permits = usize::from(per_lane.max(1));
        let reserve = (permits / 4).max(1);
        Lanes {
            fresh: Arc::new(Semaphore::new(permits)),
            reserve: Arc::new(Semaphore::new(reserve)),
            yielding: Arc::new(Semaphore::new(permits - reserve)),
            fresh_waiting: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Waits for a permit of the model's lane. The semaphores are never
    /// closed, so this only waits.
    pub async fn enter(&self, qm: &QuantizedModel) -> Option<OwnedSemaphorePermit> {
        if is_fresh(qm) {
            let _waiting = Waiting::new(&self.fresh_waiting);
            self.fresh.clone().acquire_owned().await.ok()
        } else {
            self.enter_progress().await
        }
    }

    /// A reserve permit, or a yielding one taken while no new model waits
    /// (whichever comes first).
    async fn enter_progress(&self) -> Option<OwnedSemaphorePermit> {
        let mut waiting = self.fresh_waiting.subscribe();
        let yielding = async {
            loop {
                if waiting.wait_for(|n| *n == 0).await.is_err() {
                    return None;
                }
                tokio::select! {
                    permit = self.yielding.clone().acquire_owned() => return permit.ok(),
                    // A new model queued while this one waited: back to the reserve.
                    _ = waiting.wait_for(|n| *n > 0) => {}
                }
            }
        };
        tokio::select! {
            permit = self.reserve.clone().acquire_owned() => permit.ok(),
            permit = yielding => permit,
        }
    }
}

/// Counts a new model as waiting until it has its permit (or its
/// reconciliation is dropped).
struct Waiting<'a>(&'a watch::Sender<usize>);

impl<'a> Waiting<'a> {
    fn new(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
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

    #[tokio::test]
    async fn models_under_way_keep_only_their_reserve_while_a_new_model_waits() {
        let short = std::time::Duration::from_millis(50);
        let lanes = Lanes::new(4); // a reserve of 1, 3 yielding
        let mut fresh = Vec::new();
        for _ in 0..4 {
            fresh.push(lanes.enter(&model(1, None)).await);
        }
        let queued = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.enter(&model(1, None)).await.is_some() })
        };
        tokio::time::sleep(short).await;
        assert_eq!(
            *lanes.fresh_waiting.borrow(),
            1,
            "the fifth new model waits"
        );

        let reserve = lanes.enter(&model(1, Some(1))).await;
        assert!(
            reserve.is_some(),
            "the reserve is there while new models wait"
        );
        let blocked = tokio::time::timeout(short, lanes.enter(&model(1, Some(1)))).await;
        assert!(
            blocked.is_err(),
            "beyond its reserve, progress gives way to a waiting new model"
        );

        fresh.pop();
        assert!(
            matches!(queued.await, Ok(true)),
            "the new model got its permit"
        );
        let after = tokio::time::timeout(short, lanes.enter(&model(1, Some(1)))).await;
        assert!(
            matches!(after, Ok(Some(_))),
            "with no new model waiting the yielding permits are usable again"
        );
    }
}
