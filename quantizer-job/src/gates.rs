//! The quality gates: each compares one figure of the quantized model with
//! the same figure of its FP16 baseline, against a threshold from the spec.
//! Baseline, value and threshold are all in the metric's own unit (a
//! perplexity, an accuracy, a rate), so a verdict reads without arithmetic.

use quantops_api::{GateResult, GatesSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// The figures the gates compare, for one model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct QualityFigures {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// Accuracy per multiple-choice task set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub task_accuracy: BTreeMap<String, f64>,
    /// Share of prompts whose greedy continuation equals the baseline's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greedy_match_rate: Option<f64>,
    /// Share of counted system tests that passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_test_pass_rate: Option<f64>,
}

/// A figure the baseline has but the quantized model lacks: the validation
/// stage broke, which is not a gate verdict.
#[derive(Debug, Error, PartialEq)]
#[error("the quantized model has no {0} figure although the baseline has one")]
pub struct MissingFigure(pub String);

/// Judges every figure the baseline has.
pub fn evaluate(
    spec: &GatesSpec,
    baseline: &QualityFigures,
    quantized: &QualityFigures,
) -> Result<Vec<GateResult>, MissingFigure> {
    let mut gates = Vec::new();
    if let Some(base) = baseline.perplexity {
        let value = quantized
            .perplexity
            .ok_or_else(|| MissingFigure("perplexity".into()))?;
        let threshold = base * (1.0 + spec.max_perplexity_increase_percent / 100.0);
        gates.push(at_most("perplexity", "perplexity", base, value, threshold));
    }
    for (set, &base) in &baseline.task_accuracy {
        let value = *quantized
            .task_accuracy
            .get(set)
            .ok_or_else(|| MissingFigure(format!("accuracy for task set {set}")))?;
        let threshold = base * (1.0 - spec.max_task_drop_percent / 100.0);
        gates.push(at_least(
            &format!("task:{set}"),
            "accuracy",
            Some(base),
            value,
            threshold,
        ));
    }
    if let Some(value) = quantized.greedy_match_rate {
        gates.push(at_least(
            "greedy-consistency",
            "greedy_match_rate",
            Some(1.0),
            value,
            spec.min_greedy_match_rate,
        ));
    }
    if let Some(base) = baseline.system_test_pass_rate {
        let value = quantized
            .system_test_pass_rate
            .ok_or_else(|| MissingFigure("system test pass rate".into()))?;
        gates.push(at_least(
            "system-tests",
            "system_test_pass_rate",
            Some(base),
            value,
            spec.min_system_test_pass_rate,
        ));
    }
    Ok(gates)
}

/// Whether every gate passed; no gate at all is not a pass.
pub fn overall_pass(gates: &[GateResult]) -> bool {
    !gates.is_empty() && gates.iter().all(|g| g.passed)
}

/// Comparisons allow this relative slack, so that a value exactly at its
/// threshold passes despite the rounding of the threshold's arithmetic.
const TOLERANCE: f64 = 1e-12;

fn at_most(name: &str, metric: &str, base: f64, value: f64, threshold: f64) -> GateResult {
    GateResult {
        name: name.to_string(),
        metric: metric.to_string(),
        baseline: Some(base),
        value,
        threshold,
        passed: value.is_finite() && value <= threshold + TOLERANCE * threshold.abs(),
    }
}

fn at_least(name: &str, metric: &str, base: Option<f64>, value: f64, threshold: f64) -> GateResult {
    GateResult {
        name: name.to_string(),
        metric: metric.to_string(),
        baseline: base,
        value,
        threshold,
        passed: value.is_finite() && value >= threshold - TOLERANCE * threshold.abs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(ppl: f64, acc: f64, sys: f64) -> QualityFigures {
        QualityFigures {
            perplexity: Some(ppl),
            task_accuracy: BTreeMap::from([("even".to_string(), acc)]),
            greedy_match_rate: None,
            system_test_pass_rate: Some(sys),
        }
    }

    #[test]
    fn perplexity_gate_uses_relative_increase() {
        let spec = GatesSpec::default();
        let base = figures(29.0, 0.8, 1.0);
        let ok = evaluate(&spec, &base, &figures(29.0 * 1.029, 0.8, 1.0)).expect("all figures");
        assert!(ok[0].passed, "{ok:?}");
        assert!((ok[0].threshold - 29.87).abs() < 1e-9);
        let bad = evaluate(&spec, &base, &figures(29.0 * 1.031, 0.8, 1.0)).expect("all figures");
        assert!(!bad[0].passed);
        assert!(!overall_pass(&bad));
        assert!(overall_pass(&ok));
    }

    #[test]
    fn task_drop_is_relative_to_baseline() {
        let spec = GatesSpec {
            max_task_drop_percent: 5.0,
            ..GatesSpec::default()
        };
        let base = figures(29.0, 0.80, 1.0);
        let gates = evaluate(&spec, &base, &figures(29.0, 0.76, 1.0)).expect("all figures");
        let task = gates
            .iter()
            .find(|g| g.name == "task:even")
            .expect("task gate");
        assert!(task.passed, "0.76 is exactly 5% under 0.80: {task:?}");
        let gates = evaluate(&spec, &base, &figures(29.0, 0.75, 1.0)).expect("all figures");
        assert!(
            !gates
                .iter()
                .find(|g| g.name == "task:even")
                .expect("task gate")
                .passed
        );
    }

    #[test]
    fn nan_never_passes_and_missing_figure_is_an_error() {
        let spec = GatesSpec::default();
        let base = figures(29.0, 0.8, 1.0);
        let gates = evaluate(&spec, &base, &figures(f64::NAN, 0.8, 1.0)).expect("all figures");
        assert!(!gates[0].passed);
        let missing = QualityFigures {
            perplexity: None,
            ..figures(0.0, 0.8, 1.0)
        };
        assert_eq!(
            evaluate(&spec, &base, &missing),
            Err(MissingFigure("perplexity".into()))
        );
        assert!(!overall_pass(&[]));
    }
}
