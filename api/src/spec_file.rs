//! Reading a `QuantizedModel` from a YAML file, with the same rules the CRD
//! schema enforces in a cluster, so that local mode and the worker reject
//! exactly what the API server would, naming the field.

use crate::quantized_model::{
    GatesSpec, Method, QuantizationSpec, QuantizedModel, QuantizedModelSpec, ResourcesSpec,
};
use crate::rules;
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

/// Every rule of the CRD schema and its CEL expressions, as (field, what
/// was expected). The value rules come from [`crate::rules`], which the CRD
/// carries too.
pub fn validate(qm: &QuantizedModel) -> Result<(), (&'static str, &'static str)> {
    let spec = &qm.spec;
    check_names(spec)?;
    check_paths(spec)?;
    check_quantization(&spec.quantization)?;
    if spec.quantization.method.needs_calibration() && spec.calibration.is_none() {
        return Err(("spec.calibration", "calibration data for gptq and awq"));
    }
    if let Some(c) = &spec.calibration {
        rules::CALIBRATION_SAMPLES.check(c.samples.into())?;
        rules::CALIBRATION_SEQUENCE_LENGTH.check(c.sequence_length.into())?;
    }
    let v = &spec.validation;
    if let Some(e) = &v.eval_text {
        rules::EVAL_WINDOW_TOKENS.check(e.window_tokens.into())?;
        rules::EVAL_MAX_WINDOWS.check(e.max_windows.into())?;
    }
    if let Some(c) = &v.consistency {
        rules::CONSISTENCY_MAX_PROMPTS.check(c.max_prompts.into())?;
        rules::CONSISTENCY_MAX_NEW_TOKENS.check(c.max_new_tokens.into())?;
    }
    if let Some(l) = &v.loadtest {
        rules::LOADTEST_REQUESTS.check(l.requests.into())?;
        rules::LOADTEST_CONCURRENCY.check(l.concurrency.into())?;
        rules::LOADTEST_PROMPT_TOKENS.check(l.prompt_tokens.into())?;
        rules::LOADTEST_MAX_TOKENS.check(l.max_tokens.into())?;
    }
    check_gates(&v.gates)?;
    check_resources(&spec.resources)
}

/// Names that become directories, variant names and labels.
fn check_names(spec: &QuantizedModelSpec) -> Result<(), (&'static str, &'static str)> {
    if !rules::model_name(&spec.base_model.name) {
        return Err(("spec.baseModel.name", rules::MODEL_NAME_EXPECTED));
    }
    if !rules::name_segment(&spec.version) {
        return Err(("spec.version", rules::SEGMENT_EXPECTED));
    }
    if spec.validation.tasks.len() > rules::MAX_TASK_SETS {
        return Err(("spec.validation.tasks", "at most 64 task sets"));
    }
    if spec
        .validation
        .tasks
        .iter()
        .any(|t| !rules::name_segment(&t.name))
    {
        return Err(("spec.validation.tasks[].name", rules::SEGMENT_EXPECTED));
    }
    Ok(())
}

/// Every path the worker opens or writes, and the digest list's file names.
fn check_paths(spec: &QuantizedModelSpec) -> Result<(), (&'static str, &'static str)> {
    let path = |field: &'static str, value: &str| {
        rules::relative_path(value).map_err(|_| (field, rules::PATH_EXPECTED))
    };
    path("spec.baseModel.path", &spec.base_model.path)?;
    if let Some(c) = &spec.calibration {
        path("spec.calibration.path", &c.path)?;
    }
    let v = &spec.validation;
    if let Some(e) = &v.eval_text {
        path("spec.validation.evalText.path", &e.path)?;
    }
    for t in &v.tasks {
        path("spec.validation.tasks[].path", &t.path)?;
    }
    if let Some(s) = &v.system_tests {
        path("spec.validation.systemTests.path", &s.path)?;
    }
    if let Some(c) = &v.consistency {
        path("spec.validation.consistency.path", &c.path)?;
    }
    path("spec.output.path", &spec.output.path)?;
    let digests = &spec.base_model.sha256;
    if digests.len() > rules::MAX_DIGESTS {
        return Err(("spec.baseModel.sha256", "at most 1024 files"));
    }
    for (file, digest) in digests {
        if rules::relative_path(file).is_err() {
            return Err(("spec.baseModel.sha256", rules::DIGEST_KEY_EXPECTED));
        }
        if !rules::sha256_digest(digest) {
            return Err(("spec.baseModel.sha256", rules::DIGEST_EXPECTED));
        }
    }
    Ok(())
}

fn check_quantization(q: &QuantizationSpec) -> Result<(), (&'static str, &'static str)> {
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
    if q.ignore.len() > rules::MAX_IGNORE
        || q.ignore
            .iter()
            .any(|i| i.is_empty() || i.len() > rules::MAX_IGNORE_LEN)
    {
        return Err((
            "spec.quantization.ignore",
            "at most 256 layer-name suffixes of 1 to 256 characters",
        ));
    }
    Ok(())
}

fn check_gates(gates: &GatesSpec) -> Result<(), (&'static str, &'static str)> {
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
    Ok(())
}

fn check_resources(r: &ResourcesSpec) -> Result<(), (&'static str, &'static str)> {
    rules::GPUS.check(r.gpus.into())?;
    if r.memory
        .as_deref()
        .is_some_and(|m| !rules::positive_quantity(m))
    {
        return Err(("spec.resources.memory", rules::QUANTITY_EXPECTED));
    }
    if r.cpu
        .as_deref()
        .is_some_and(|c| !rules::positive_quantity(c))
    {
        return Err(("spec.resources.cpu", rules::QUANTITY_EXPECTED));
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

    /// The adversarial values, each refused with its field named.
    #[test]
    fn adversarial_values_are_refused_naming_the_field() {
        let rtn = "  quantization: {method: rtn}\n";
        let head =
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: x}\nspec:\n";
        let digest = "0".repeat(64);
        let climbing_digest = format!(
            "  baseModel: {{name: a/b, path: m, sha256: {{'../x': '{digest}'}}}}\n  version: v1\n"
        );
        for (spec, field) in [
            (
                "  baseModel: {name: a/b, path: /etc}\n  version: v1\n",
                "spec.baseModel.path",
            ),
            (
                "  baseModel: {name: a/b, path: ''}\n  version: v1\n",
                "spec.baseModel.path",
            ),
            (
                "  baseModel: {name: a/b, path: m/../..}\n  version: v1\n",
                "spec.baseModel.path",
            ),
            (
                "  baseModel: {name: evil/.., path: m}\n  version: v1\n",
                "spec.baseModel.name",
            ),
            (
                "  baseModel: {name: '', path: m}\n  version: v1\n",
                "spec.baseModel.name",
            ),
            (
                "  baseModel: {name: a/b/c, path: m}\n  version: v1\n",
                "spec.baseModel.name",
            ),
            (
                "  baseModel: {name: a/b, path: m}\n  version: ..\n",
                "spec.version",
            ),
            (
                "  baseModel: {name: a/b, path: m}\n  version: v1/x\n",
                "spec.version",
            ),
            (climbing_digest.as_str(), "spec.baseModel.sha256"),
            (
                "  baseModel: {name: a/b, path: m, sha256: {model.safetensors: not-a-digest}}\n  version: v1\n",
                "spec.baseModel.sha256",
            ),
        ] {
            let err = parse_quantized_model(&format!("{head}{spec}{rtn}"), "t").expect_err(spec);
            assert!(
                err.to_string().contains(&format!(": {field}: ")),
                "{spec}: {err}"
            );
        }
        for (rest, field) in [
            (
                "  calibration: {path: ../../../etc/passwd}\n",
                "spec.calibration.path",
            ),
            (
                "  calibration: {path: c.txt, samples: 4000000000}\n",
                "spec.calibration.samples",
            ),
            (
                "  calibration: {path: c.txt, samples: 0}\n",
                "spec.calibration.samples",
            ),
            (
                "  calibration: {path: c.txt, sequenceLength: 1000000000}\n",
                "spec.calibration.sequenceLength",
            ),
            (
                "  validation: {evalText: {path: /proc/self/environ}}\n",
                "spec.validation.evalText.path",
            ),
            (
                "  validation: {evalText: {path: e.txt, windowTokens: 1000000000}}\n",
                "spec.validation.evalText.windowTokens",
            ),
            (
                "  validation: {evalText: {path: e.txt, maxWindows: 0}}\n",
                "spec.validation.evalText.maxWindows",
            ),
            (
                "  validation: {systemTests: {path: /var/run/secrets/kubernetes.io/serviceaccount/token}}\n",
                "spec.validation.systemTests.path",
            ),
            (
                "  validation: {tasks: [{name: t, path: ../t.jsonl}]}\n",
                "spec.validation.tasks[].path",
            ),
            (
                "  validation: {tasks: [{name: ../t, path: t.jsonl}]}\n",
                "spec.validation.tasks[].name",
            ),
            (
                "  validation: {consistency: {path: p.jsonl, maxPrompts: 0}}\n",
                "spec.validation.consistency.maxPrompts",
            ),
            (
                "  validation: {consistency: {path: ./p.jsonl}}\n",
                "spec.validation.consistency.path",
            ),
            (
                "  validation: {consistency: {path: p.jsonl, maxNewTokens: 0}}\n",
                "spec.validation.consistency.maxNewTokens",
            ),
            (
                "  validation: {loadtest: {concurrency: 0}}\n",
                "spec.validation.loadtest.concurrency",
            ),
            ("  output: {path: ../tmp/x}\n", "spec.output.path"),
            ("  resources: {memory: lots}\n", "spec.resources.memory"),
            ("  resources: {cpu: '-3'}\n", "spec.resources.cpu"),
            ("  resources: {gpus: 100000}\n", "spec.resources.gpus"),
        ] {
            let text = format!("{BASE}{rtn}{rest}");
            let err = parse_quantized_model(&text, "t").expect_err(rest);
            assert!(
                err.to_string().contains(&format!(": {field}: ")),
                "{rest}: {err}"
            );
        }
    }

    #[test]
    fn bounds_and_names_within_limits_pass() {
        let spec = format!(
            "{BASE}  quantization: {{method: gptq}}\n  calibration: {{path: text/c.txt, samples: 65536, sequenceLength: 131072}}\n  validation: {{evalText: {{path: e.txt, windowTokens: 131072, maxWindows: 100000}}, consistency: {{path: p.jsonl, maxPrompts: 1}}, tasks: [{{name: chat-choice, path: tasks/c.jsonl}}]}}\n  resources: {{gpus: 16, memory: 16Gi, cpu: 500m}}\n"
        );
        parse_quantized_model(&spec, "t").expect("the limits themselves are valid");
    }
}
