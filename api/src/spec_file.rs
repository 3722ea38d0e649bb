//! Reading a `QuantizedModel` from a YAML file, with the same rules the CRD
//! schema enforces in a cluster, so that local mode and the worker reject
//! exactly what the API server would, naming the field.

use crate::quantized_model::{Method, QuantizedModel};
use thiserror::Error;

/// Why a spec was refused; every variant names the offending field.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("cannot read spec {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("spec {origin} is not a valid QuantizedModel: {message}")]
    Parse { origin: String, message: String },
    #[error("spec {origin}: {field}: {expected}")]
    Invalid {
        origin: String,
        field: String,
        expected: String,
    },
}

/// No variant whose perplexity rose more than this over its baseline ever
/// passes, whatever its spec says: the seeds' hard ceiling.
pub const HARD_PERPLEXITY_CEILING_PERCENT: f64 = 10.0;

/// Reads and validates a `QuantizedModel` YAML file.
pub fn load_quantized_model(path: &std::path::Path) -> Result<QuantizedModel, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_quantized_model(&text, &path.display().to_string())
}

/// Parses and validates a `QuantizedModel` from YAML text; `origin` names it in errors.
pub fn parse_quantized_model(text: &str, origin: &str) -> Result<QuantizedModel, SpecError> {
    let parse_error = |e: serde_yaml::Error| SpecError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    };
    let head: TypeHead = serde_yaml::from_str(text).map_err(parse_error)?;
    if head.kind.as_deref().is_some_and(|k| k != "QuantizedModel") {
        return Err(invalid(origin, "kind", "QuantizedModel"));
    }
    let qm: QuantizedModel = serde_yaml::from_str(text).map_err(parse_error)?;
    validate(&qm).map_err(|(field, expected)| invalid(origin, field, expected))?;
    Ok(qm)
}

/// The part of an object that says what it is.
#[derive(serde::Deserialize)]
struct TypeHead {
    kind: Option<String>,
}

fn invalid(origin: &str, field: &str, expected: &str) -> SpecError {
    SpecError::Invalid {
        origin: origin.to_string(),
        field: field.to_string(),
        expected: expected.to_string(),
    }
}

/// The cross-field rules, as (field, what was expected). The CRD carries the
/// same rules as CEL expressions for the API server.
pub fn validate(qm: &QuantizedModel) -> Result<(), (&'static str, &'static str)> {
    let spec = &qm.spec;
    let q = &spec.quantization;
    if spec.base_model.name.trim().is_empty() {
        return Err(("spec.baseModel.name", "a non-empty model name"));
    }
    if spec.base_model.path.trim().is_empty() {
        return Err(("spec.baseModel.path", "a non-empty checkpoint path"));
    }
    if spec.version.trim().is_empty() || spec.version.contains('/') {
        return Err(("spec.version", "a non-empty version without '/'"));
    }
    match q.method {
        Method::Int8 | Method::Fp8 if q.bits != 8 => {
            return Err(("spec.quantization.bits", "8 for int8 and fp8"));
        }
        Method::Rtn | Method::Gptq | Method::Awq if !matches!(q.bits, 2 | 3 | 4 | 8) => {
            return Err(("spec.quantization.bits", "one of 2, 3, 4, 8"));
        }
        _ => {}
    }
    if !matches!(q.group_size, -1 | 32 | 64 | 128) {
        return Err((
            "spec.quantization.groupSize",
            "one of -1 (per channel), 32, 64, 128",
        ));
    }
    if q.method == Method::Fp8 && q.group_size != -1 {
        return Err((
            "spec.quantization.groupSize",
            "-1 for fp8 (per-channel scales)",
        ));
    }
    if !(0.0..=1.0).contains(&q.damp_percent) {
        return Err((
            "spec.quantization.dampPercent",
            "a fraction between 0 and 1",
        ));
    }
    if q.method.needs_calibration() && spec.calibration.is_none() {
        return Err(("spec.calibration", "calibration data for gptq and awq"));
    }
    if let Some(c) = &spec.calibration {
        if c.samples == 0 {
            return Err(("spec.calibration.samples", "at least 1"));
        }
        if c.sequence_length < 16 {
            return Err(("spec.calibration.sequenceLength", "at least 16 tokens"));
        }
    }
    let gates = &spec.validation.gates;
    if !(0.0..=HARD_PERPLEXITY_CEILING_PERCENT).contains(&gates.max_perplexity_increase_percent) {
        return Err((
            "spec.validation.gates.maxPerplexityIncreasePercent",
            "between 0 and 10 (the hard ceiling)",
        ));
    }
    if !(0.0..=100.0).contains(&gates.max_task_drop_percent) {
        return Err((
            "spec.validation.gates.maxTaskDropPercent",
            "between 0 and 100",
        ));
    }
    if !(0.0..=1.0).contains(&gates.min_greedy_match_rate) {
        return Err((
            "spec.validation.gates.minGreedyMatchRate",
            "a rate between 0 and 1",
        ));
    }
    if !(0.0..=1.0).contains(&gates.min_system_test_pass_rate) {
        return Err((
            "spec.validation.gates.minSystemTestPassRate",
            "a rate between 0 and 1",
        ));
    }
    if let Some(e) = &spec.validation.eval_text {
        if e.window_tokens < 2 {
            return Err(("spec.validation.evalText.windowTokens", "at least 2 tokens"));
        }
        if e.max_windows == 0 {
            return Err(("spec.validation.evalText.maxWindows", "at least 1"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: x}\nspec:\n  baseModel: {name: a/b, path: m}\n  version: v1\n";

    #[test]
    fn unknown_method_is_named() {
        let err = parse_quantized_model(&format!("{BASE}  quantization: {{method: nf4}}\n"), "t")
            .expect_err("nf4 is not a method");
        let text = err.to_string();
        assert!(text.contains("method") && text.contains("nf4"), "{text}");
    }

    #[test]
    fn gptq_without_calibration_is_refused() {
        let err = parse_quantized_model(&format!("{BASE}  quantization: {{method: gptq}}\n"), "t")
            .expect_err("gptq needs calibration");
        assert!(err.to_string().contains("spec.calibration"), "{err}");
    }

    #[test]
    fn fp8_with_group_is_refused() {
        let err = parse_quantized_model(
            &format!("{BASE}  quantization: {{method: fp8, bits: 8, groupSize: 128}}\n"),
            "t",
        )
        .expect_err("fp8 takes no group");
        assert!(
            err.to_string().contains("spec.quantization.groupSize"),
            "{err}"
        );
    }

    #[test]
    fn defaults_fill_in() {
        let qm = parse_quantized_model(&format!("{BASE}  quantization: {{method: rtn}}\n"), "t")
            .expect("valid");
        assert_eq!(qm.spec.quantization.bits, 4);
        assert_eq!(qm.spec.quantization.group_size, 128);
        assert_eq!(qm.spec.quantization.ignore, vec!["lm_head".to_string()]);
        assert_eq!(
            qm.spec.validation.gates.max_perplexity_increase_percent,
            3.0
        );
    }
}
