//! Progress of a running stage ("quantize: layer 14/32"), as structured
//! `tracing` events that also read well as plain lines in `kubectl logs`.

use std::time::Instant;

/// Counts the steps of one stage and reports each.
pub struct Progress {
    stage: &'static str,
    total: usize,
    started: Instant,
}

impl Progress {
    pub fn new(stage: &'static str, total: usize) -> Progress {
        Progress {
            stage,
            total,
            started: Instant::now(),
        }
    }

    /// Reports that step `done` (1-based) of `total` finished; `what` names it.
    pub fn step(&self, done: usize, what: &str) {
        let elapsed_s = self.started.elapsed().as_secs_f64();
        tracing::info!(
            stage = self.stage,
            step = done,
            total = self.total,
            elapsed_s,
            "progress: {} {what} {done}/{}",
            self.stage,
            self.total
        );
    }
}
