//! The rolling quality window and its regression alert, pure so that the
//! operator can reuse the same semantics:
//!
//! - the window holds the scores of the last `capacity` probe runs (oldest
//!   dropped first); its score is their arithmetic mean, and there is no
//!   score while it is empty;
//! - a regression alert fires on the run that takes the window score from
//!   "at or above the threshold, or no data yet" to "below the threshold";
//!   it fires once per crossing: staying below raises no further alerts,
//!   and a new alert needs the window to recover to ≥ threshold first.
//!   (A first run below the threshold therefore alerts: no data counts as
//!   healthy, so a variant that starts bad is reported at once.)

use std::collections::VecDeque;

/// The last scores and the threshold they are judged against.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityWindow {
    capacity: usize,
    threshold: f64,
    scores: VecDeque<f64>,
}

/// What one more run changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The window's mean score after the run.
    pub window_score: f64,
    /// The run's own score.
    pub last_score: f64,
    /// This run took the window below the threshold.
    pub alert: bool,
}

impl QualityWindow {
    /// A window of the last `capacity` runs (at least 1).
    pub fn new(capacity: usize, threshold: f64) -> QualityWindow {
        QualityWindow {
            capacity: capacity.max(1),
            threshold,
            scores: VecDeque::new(),
        }
    }

    /// The mean of the scores held, `None` when empty.
    pub fn score(&self) -> Option<f64> {
        (!self.scores.is_empty())
            .then(|| self.scores.iter().sum::<f64>() / self.scores.len() as f64)
    }

    /// The threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Runs held.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether no run is held.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// Adds a run's score and says whether the window just regressed.
    pub fn push(&mut self, score: f64) -> Observation {
        let healthy_before = self.score().is_none_or(|s| s >= self.threshold);
        self.scores.push_back(score);
        while self.scores.len() > self.capacity {
            self.scores.pop_front();
        }
        let window_score = self.score().unwrap_or(score);
        Observation {
            window_score,
            last_score: score,
            alert: healthy_before && window_score < self.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_last_runs_and_averages_them() {
        let mut w = QualityWindow::new(3, 0.8);
        assert_eq!(w.score(), None);
        for s in [1.0, 1.0, 0.7, 0.4] {
            w.push(s);
        }
        assert_eq!(w.len(), 3);
        let mean = w.score().expect("data");
        assert!((mean - 0.7).abs() < 1e-12, "{mean}");
    }

    #[test]
    fn an_alert_fires_once_per_crossing_below_the_threshold() {
        let mut w = QualityWindow::new(2, 0.8);
        let alerts: Vec<bool> = [1.0, 0.9, 0.6, 0.5, 0.6, 1.0, 1.0, 0.5]
            .into_iter()
            .map(|s| w.push(s).alert)
            .collect();
        // windows: 1.0, .95, .75 (cross), .55, .55, .8 (recovered), 1.0, .75 (cross)
        assert_eq!(
            alerts,
            [false, false, true, false, false, false, false, true]
        );
    }

    #[test]
    fn a_first_run_below_the_threshold_alerts() {
        let mut w = QualityWindow::new(5, 0.8);
        let o = w.push(0.5);
        assert!(o.alert);
        assert_eq!((o.window_score, o.last_score), (0.5, 0.5));
        assert!(!w.push(0.5).alert);
    }

    #[test]
    fn exactly_the_threshold_is_healthy() {
        let mut w = QualityWindow::new(1, 0.8);
        assert!(!w.push(0.8).alert);
        assert!(w.push(0.79).alert);
        assert!(!w.push(0.8).alert);
    }
}
