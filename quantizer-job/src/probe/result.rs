//! The probe's result. [`ProbeSummary`] is the contract with the operator
//! (`quantops_api::probe::ProbeResult`; it goes to the termination message,
//! under 4 KiB); [`ProbeResult`] adds the per-test detail for stdout.

use serde::{Deserialize, Serialize};

/// The compact result (the contract with the operator): the api crate's
/// type, so the worker and the operator cannot disagree about its keys.
pub use quantops_api::probe::{
    PROBE_KIND, ProbeLatency as LatencySummary, ProbeResult as ProbeSummary,
};

/// The most characters a name keeps in the termination message, so the
/// message stays far under the kubelet's 4 KiB whatever the flags say.
pub const MAX_NAME_CHARS: usize = 256;

fn capped(s: &str) -> String {
    s.chars().take(MAX_NAME_CHARS).collect()
}

/// Compact JSON for the termination message (names capped at
/// [`MAX_NAME_CHARS`], so it is always under 4 KiB).
pub fn termination_message(summary: &ProbeSummary) -> String {
    let capped = ProbeSummary {
        model: capped(&summary.model),
        variant: summary.variant.as_deref().map(capped),
        environment: summary.environment.as_deref().map(capped),
        ..summary.clone()
    };
    serde_json::to_string(&capped).unwrap_or_default()
}

/// One test's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestOutcome {
    /// The test's name.
    pub name: String,
    /// The expectation held.
    pub passed: bool,
    /// The answer (normalised), when there was one.
    pub answer: Option<String>,
    /// Why there was no answer.
    pub error: Option<String>,
    /// Request latency, seconds.
    pub latency_seconds: f64,
}

/// The full result printed on stdout: the summary's keys plus `tests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The contract part.
    #[serde(flatten)]
    pub summary: ProbeSummary,
    /// Per-test detail.
    pub tests: Vec<TestOutcome>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_termination_message_parses_as_the_contract_and_stays_small() {
        let long = "m".repeat(10_000);
        let s = ProbeSummary {
            kind: "probe".into(),
            model: long.clone(),
            variant: Some(long.clone()),
            environment: Some(long),
            score: 0.5,
            passed: 1,
            total: 2,
            failures: 0,
            latency_seconds: LatencySummary {
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                max: 0.0,
            },
            finished_at: "2025-01-01T00:00:00Z".into(),
        };
        let message = termination_message(&s);
        assert!(ProbeSummary::parse(&message).is_ok(), "{message}");
        assert!(message.len() < 4096, "{}", message.len());
        // The keys themselves are checked where the probe writes them (tests/probe.rs).
    }
}
