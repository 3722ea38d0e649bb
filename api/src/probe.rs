//! What a quality probe hands back: the one-shot `quantizer-job probe`
//! writes a [`ProbeResult`] as JSON to its pod's termination message, and the
//! operator reads it into `ModelPromotion.status.quality`. Kept here so that
//! the worker and the operator cannot disagree about the keys.

use serde::{Deserialize, Serialize};

/// The `kind` every probe result carries, telling it apart from a stage
/// summary in a termination message.
pub const PROBE_KIND: &str = "probe";

/// One probe run against a serving endpoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct ProbeResult {
    /// Always [`PROBE_KIND`].
    pub kind: String,
    /// The served model name that was asked.
    pub model: String,
    pub variant: Option<String>,
    pub environment: Option<String>,
    /// Fraction of the suite's prompts passed (0..1).
    pub score: f64,
    pub passed: u32,
    pub total: u32,
    /// Prompts that got no answer (transport or server errors).
    pub failures: u32,
    pub latency_seconds: ProbeLatency,
    /// RFC 3339.
    pub finished_at: String,
}

/// Request latency over one probe run, seconds.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct ProbeLatency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

/// Why a termination message is not a usable probe result.
#[derive(Debug, thiserror::Error)]
pub enum ProbeResultError {
    #[error("not a probe result: {0}")]
    Json(#[from] serde_json::Error),
    #[error("kind is {0:?}, not \"probe\"")]
    Kind(String),
    #[error("score {0} is not in 0..=1")]
    Score(f64),
}

impl ProbeResult {
    /// Parses and checks a termination message.
    pub fn parse(message: &str) -> Result<ProbeResult, ProbeResultError> {
        let result: ProbeResult = serde_json::from_str(message.trim())?;
        if result.kind != PROBE_KIND {
            return Err(ProbeResultError::Kind(result.kind));
        }
        if !(0.0..=1.0).contains(&result.score) {
            return Err(ProbeResultError::Score(result.score));
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &str = r#"{"kind":"probe","model":"tiny-llama","variant":"v","environment":"prod","score":0.75,"passed":6,"total":8,"failures":0,"latency_seconds":{"mean":0.2,"p50":0.1,"p90":0.4,"max":0.9},"finished_at":"2025-01-01T00:05:00Z"}"#;

    #[test]
    fn parses_the_contract() -> Result<(), ProbeResultError> {
        let r = ProbeResult::parse(MESSAGE)?;
        assert_eq!((r.passed, r.total, r.score), (6, 8, 0.75));
        assert_eq!(r.latency_seconds.p90, 0.4);
        assert_eq!(r.environment.as_deref(), Some("prod"));
        Ok(())
    }

    #[test]
    fn refuses_other_messages() {
        assert!(matches!(
            ProbeResult::parse(r#"{"stage":"quantize","variant":"v"}"#),
            Err(ProbeResultError::Json(_))
        ));
        let stage = MESSAGE.replace(r#""kind":"probe""#, r#""kind":"stage""#);
        assert!(matches!(
            ProbeResult::parse(&stage),
            Err(ProbeResultError::Kind(_))
        ));
        let high = MESSAGE.replace("0.75", "1.5");
        assert!(matches!(
            ProbeResult::parse(&high),
            Err(ProbeResultError::Score(_))
        ));
    }
}
