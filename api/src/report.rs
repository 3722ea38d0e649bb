//! What the worker hands back: the full `report.json` written beside the
//! artifact, and the compact summary written to the pod's termination message.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The pod termination message is cut by the kubelet at 4096 bytes; the
/// summary is kept under this so that it always arrives whole.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4000;

/// The full result of a pipeline run. The keys named in DESIGN.md are a
/// contract; everything else may grow.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub variant: String,
    pub overall_pass: bool,
    pub baseline: ModelMetrics,
    pub quantized: ModelMetrics,
    pub gates: Vec<GateResult>,
    pub timings_s: BTreeMap<String, f64>,
    /// Everything else a stage wants to record (model info, recipe, artifact digest, ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Quality figures of one model (baseline or quantized).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct ModelMetrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One gate's verdict, with everything needed to understand it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct GateResult {
    pub name: String,
    pub metric: String,
    pub baseline: Option<f64>,
    pub value: f64,
    pub threshold: f64,
    pub passed: bool,
}

/// The compact summary a stage writes to its termination message.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct StageSummary {
    pub stage: String,
    pub variant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall_pass: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Set when the stage itself broke (non-zero exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StageSummary {
    /// Serialises the summary so that it fits the termination-message limit:
    /// first whole, then with only the failed gates, then without gates, and
    /// last with the error text shortened.
    pub fn to_termination_message(&self) -> String {
        let encode = |s: &StageSummary| serde_json::to_string(s).unwrap_or_else(|_| "{}".into());
        let mut summary = self.clone();
        let mut text = encode(&summary);
        if text.len() > TERMINATION_MESSAGE_LIMIT {
            summary.gates.retain(|g| !g.passed);
            text = encode(&summary);
        }
        if text.len() > TERMINATION_MESSAGE_LIMIT {
            summary.gates.clear();
            text = encode(&summary);
        }
        if text.len() > TERMINATION_MESSAGE_LIMIT
            && let Some(error) = summary.error.as_mut()
        {
            let excess = text.len() - TERMINATION_MESSAGE_LIMIT + 3;
            let mut keep = error.len().saturating_sub(excess);
            while !error.is_char_boundary(keep) {
                keep -= 1;
            }
            error.truncate(keep);
            error.push_str("...");
            text = encode(&summary);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_message_stays_under_limit() {
        let gate = GateResult {
            name: "perplexity".into(),
            metric: "perplexity_increase_percent".into(),
            baseline: Some(29.0),
            value: 1.5,
            threshold: 3.0,
            passed: false,
        };
        let summary = StageSummary {
            stage: "validate".into(),
            variant: "x".into(),
            gates: vec![gate; 200],
            error: Some("e".repeat(10_000)),
            ..Default::default()
        };
        let text = summary.to_termination_message();
        assert!(
            text.len() <= TERMINATION_MESSAGE_LIMIT,
            "{} bytes",
            text.len()
        );
        let back: StageSummary = serde_json::from_str(&text).expect("still valid JSON");
        assert_eq!(back.stage, "validate");
    }
}
