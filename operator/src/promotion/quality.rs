//! The rolling quality window of a promotion: probe results become samples,
//! the last `window` of them are kept in `status.quality`, and their mean is
//! held to the threshold. Pure functions, so the verdict is a function of
//! the stored status alone: a restarted operator reaches the same verdict
//! and the same condition, and never counts a regression twice.
//!
//! The verdict needs one sample, not a full window: the window smooths the
//! score once it fills, but a variant that fails its very first probes in
//! prod should not wait `window` runs to be flagged. `quantizer-job probe
//! --listen` counts a regression the same way (from "no data" too), so both
//! sources of `quantops_quality_regression_alerts_total` agree.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use quantops_api::{ProbeResult, QualitySample, QualityStatus};

use crate::conditions::{FALSE, TRUE, UNKNOWN};

/// Reasons of the `QualityDegraded` condition.
pub const BELOW_THRESHOLD: &str = "BelowThreshold";
pub const RECOVERED: &str = "Recovered";
pub const WITHIN_THRESHOLD: &str = "WithinThreshold";
pub const NO_SAMPLES: &str = "NoSamples";

/// A probe Job's result as a sample; `Err` when its `finished_at` is not an
/// RFC 3339 time (the result is then unusable, not guessed at).
pub fn sample(job: &str, result: &ProbeResult) -> Result<QualitySample, String> {
    let finished: Timestamp = result.finished_at.parse().map_err(|e| {
        format!(
            "finished_at {:?} is not an RFC 3339 time: {e}",
            result.finished_at
        )
    })?;
    Ok(QualitySample {
        job: job.to_string(),
        score: result.score,
        passed: result.passed,
        total: result.total,
        failures: result.failures,
        latency_p90_seconds: result.latency_seconds.p90,
        finished_at: Time(finished),
    })
}

/// The window after adding `new` samples to `old`: one sample per Job,
/// ordered by finish time, the last `window` kept, their mean as the score.
pub fn merge(
    old: Option<&QualityStatus>,
    new: Vec<QualitySample>,
    window: u32,
    threshold: f64,
) -> QualityStatus {
    let mut samples: Vec<QualitySample> = old.map(|q| q.samples.clone()).unwrap_or_default();
    for sample in new {
        if !samples.iter().any(|s| s.job == sample.job) {
            samples.push(sample);
        }
    }
    samples
        .sort_by(|a, b| (a.finished_at.0, a.job.as_str()).cmp(&(b.finished_at.0, b.job.as_str())));
    let keep = usize::try_from(window.max(1)).unwrap_or(usize::MAX);
    if samples.len() > keep {
        samples.drain(..samples.len() - keep);
    }
    let score = (!samples.is_empty())
        .then(|| samples.iter().map(|s| s.score).sum::<f64>() / samples.len() as f64);
    QualityStatus {
        model: old.and_then(|q| q.model.clone()),
        last_probe_time: samples.last().map(|s| s.finished_at.clone()),
        score,
        threshold: Some(threshold),
        samples,
    }
}

/// What `QualityDegraded` should say.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Assessment {
    /// Whether this verdict starts a regression: `True` now, and not `True`
    /// in the stored condition (absent, `Unknown` and `False` all count as
    /// "no regression yet").
    pub fn starts_regression(&self, stored: Option<&Condition>) -> bool {
        self.status == TRUE && stored.is_none_or(|c| c.status != TRUE)
    }

    /// Whether this verdict ends a regression the stored condition records.
    pub fn ends_regression(&self, stored: Option<&Condition>) -> bool {
        self.status == FALSE && stored.is_some_and(|c| c.status == TRUE)
    }
}

/// The `QualityDegraded` verdict on a window, given the stored condition
/// (a recovery keeps saying `Recovered` until the next regression).
pub fn assess(quality: &QualityStatus, window: u32, stored: Option<&Condition>) -> Assessment {
    let threshold = quality.threshold.unwrap_or_default();
    let Some(score) = quality.score else {
        return Assessment {
            status: UNKNOWN,
            reason: NO_SAMPLES,
            message: "no quality probe has finished yet".to_string(),
        };
    };
    let over = format!(
        "rolling quality score {score:.3} over the last {} of {window} probe runs",
        quality.samples.len()
    );
    if score < threshold {
        return Assessment {
            status: TRUE,
            reason: BELOW_THRESHOLD,
            message: format!("{over} is below the threshold {threshold:.3}"),
        };
    }
    let recovered = stored.is_some_and(|c| c.status == TRUE || c.reason == RECOVERED);
    Assessment {
        status: FALSE,
        reason: if recovered {
            RECOVERED
        } else {
            WITHIN_THRESHOLD
        },
        message: format!("{over} meets the threshold {threshold:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::ProbeLatency;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    fn s(job: &str, score: f64, finished: i64) -> QualitySample {
        QualitySample {
            job: job.to_string(),
            score,
            passed: 0,
            total: 10,
            failures: 0,
            latency_p90_seconds: 0.5,
            finished_at: at(finished),
        }
    }

    fn condition(status: &str, reason: &str) -> Condition {
        Condition {
            type_: "QualityDegraded".to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: at(0),
        }
    }

    #[test]
    fn a_probe_result_becomes_a_sample() {
        let result = ProbeResult {
            kind: "probe".to_string(),
            model: "tiny-llama".to_string(),
            variant: None,
            environment: None,
            score: 0.5,
            passed: 4,
            total: 8,
            failures: 1,
            latency_seconds: ProbeLatency {
                mean: 0.1,
                p50: 0.1,
                p90: 0.3,
                max: 0.4,
            },
            finished_at: "2025-01-01T00:05:00Z".to_string(),
        };
        let got = sample("probe-1", &result).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((got.passed, got.total, got.failures), (4, 8, 1));
        assert_eq!(got.latency_p90_seconds, 0.3);
        assert_eq!(got.finished_at.0.as_second(), 1_735_689_900);
        let bad = ProbeResult {
            finished_at: "yesterday".to_string(),
            ..result
        };
        assert!(sample("probe-2", &bad).is_err_and(|e| e.contains("yesterday")));
    }

    #[test]
    fn the_window_keeps_the_newest_runs_once_each() {
        let q = merge(None, vec![s("b", 0.6, 20), s("a", 1.0, 10)], 3, 0.8);
        assert_eq!(
            q.samples.iter().map(|s| &*s.job).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(q.score, Some(0.8));
        assert_eq!(q.last_probe_time, Some(at(20)));
        // The same Job seen again is not a second sample; older runs fall out.
        let q = merge(
            Some(&q),
            vec![s("b", 0.6, 20), s("c", 0.2, 30), s("d", 0.4, 40)],
            3,
            0.8,
        );
        assert_eq!(
            q.samples.iter().map(|s| &*s.job).collect::<Vec<_>>(),
            ["b", "c", "d"]
        );
        assert!((q.score.unwrap_or_default() - 0.4).abs() < 1e-12);
        // A smaller window trims at once.
        let q = merge(Some(&q), Vec::new(), 1, 0.8);
        assert_eq!(q.samples.len(), 1);
        assert_eq!(q.score, Some(0.4));
        assert_eq!(merge(None, Vec::new(), 5, 0.8).score, None);
    }

    #[test]
    fn one_sample_below_the_threshold_is_a_regression() {
        let q = merge(None, vec![s("a", 0.5, 10)], 5, 0.8);
        let verdict = assess(&q, 5, None);
        assert_eq!((verdict.status, verdict.reason), (TRUE, BELOW_THRESHOLD));
        assert!(verdict.message.contains("0.500") && verdict.message.contains("0.800"));
        assert!(
            verdict.message.contains("last 1 of 5"),
            "{}",
            verdict.message
        );
        assert!(verdict.starts_regression(None));
        assert!(verdict.starts_regression(Some(&condition(UNKNOWN, NO_SAMPLES))));
        assert!(verdict.starts_regression(Some(&condition(FALSE, WITHIN_THRESHOLD))));
        // Already recorded: reconciling again (or after a restart) is not a new one.
        assert!(!verdict.starts_regression(Some(&condition(TRUE, BELOW_THRESHOLD))));
    }

    #[test]
    fn recovery_is_named_until_the_next_regression() {
        let good = merge(None, vec![s("a", 0.9, 10)], 5, 0.8);
        let fresh = assess(&good, 5, None);
        assert_eq!((fresh.status, fresh.reason), (FALSE, WITHIN_THRESHOLD));
        let stored = condition(TRUE, BELOW_THRESHOLD);
        let back = assess(&good, 5, Some(&stored));
        assert_eq!((back.status, back.reason), (FALSE, RECOVERED));
        assert!(back.ends_regression(Some(&stored)));
        let later = assess(&good, 5, Some(&condition(FALSE, RECOVERED)));
        assert_eq!(later.reason, RECOVERED);
        assert!(!later.ends_regression(Some(&condition(FALSE, RECOVERED))));
        // The threshold itself is acceptable.
        let edge = merge(None, vec![s("a", 0.75, 10)], 5, 0.75);
        assert_eq!(assess(&edge, 5, None).status, FALSE);
        let none = assess(&merge(None, Vec::new(), 5, 0.8), 5, None);
        assert_eq!((none.status, none.reason), (UNKNOWN, NO_SAMPLES));
    }
}
