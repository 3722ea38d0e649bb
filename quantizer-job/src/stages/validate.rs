//! The validate stage: the artifact, read back exactly as a loader reads it,
//! evaluated like the baseline and judged by the gates. Writes `report.json`
//! and the model card.

use super::baseline::open_base_checkpoint;
use super::evaluation::{BaselineRecord, Evaluator, baseline_inputs_digest, evaluate};
use super::quantize::QuantizeRecord;
use super::serving_speed;
use super::{StageInput, read_json, summary_from_report, write_json};
use crate::artifact::weights_digest;
use crate::config::LlamaConfig;
use crate::format::read_checkpoint;
use crate::gates;
use crate::gpu::llama::TensorMap;
use crate::layout::files;
use crate::report_sections::{self, ArtifactFacts};
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use candle_core::{Device, Tensor};
use quantops_api::{ModelMetrics, Report, StageSummary};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

pub fn run(input: &StageInput) -> anyhow::Result<StageSummary> {
    let started = Instant::now();
    let layout = input.layout;
    let baseline: BaselineRecord = read_json(&layout.artifact_file(files::BASELINE), "baseline")?;
    if baseline.inputs_digest != baseline_inputs_digest(input.spec) {
        anyhow::bail!(
            "{} was measured for another base model or evaluation set than this spec names: run the baseline stage again",
            layout.artifact_file(files::BASELINE).display()
        );
    }
    let quantize: QuantizeRecord = read_json(&layout.artifact_file(files::QUANTIZE), "quantize")?;
    let dir = &layout.artifact_dir;
    let weights = load_artifact(dir)?;
    let model = weights.to_model()?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let evaluator = Evaluator::new(input.gpu, &model, &weights);
    let evaluation = evaluate(
        &evaluator,
        &tokenizer,
        input.spec,
        layout,
        Some(&baseline.evaluation),
    )?;

    let baseline_figures = baseline.evaluation.figures();
    let quantized_figures = evaluation.figures();
    let gates = gates::evaluate(
        &input.spec.validation.gates,
        &baseline_figures,
        &quantized_figures,
    )?;
    let overall_pass = gates::overall_pass(&gates);
    for gate in &gates {
        tracing::info!(
            gate = %gate.name,
            baseline = ?gate.baseline,
            value = gate.value,
            threshold = gate.threshold,
            passed = gate.passed,
            "gate"
        );
    }

    let (digest, size_bytes) = weights_digest(dir)?;
    let mut report = Report {
        variant: layout.variant.clone(),
        overall_pass,
        baseline: metrics(&baseline.evaluation)?,
        quantized: metrics(&evaluation)?,
        gates,
        timings_s: BTreeMap::from([
            ("baseline".to_string(), baseline.seconds),
            ("quantize".to_string(), quantize.seconds),
            ("validate".to_string(), started.elapsed().as_secs_f64()),
        ]),
        extra: BTreeMap::new(),
    };
    report_sections::set(&mut report, report_sections::MODEL, &baseline.model);
    report_sections::set(
        &mut report,
        report_sections::ARTIFACT,
        &ArtifactFacts {
            path: dir.display().to_string(),
            digest,
            size_bytes,
            format: quantize.format.clone(),
        },
    );
    if let Some(c) = &quantize.calibration {
        report_sections::set(&mut report, report_sections::CALIBRATION, c);
    }
    report_sections::set(
        &mut report,
        report_sections::RECIPE,
        &input.spec.quantization,
    );
    if let Some(loadtest) = &input.spec.validation.loadtest {
        let (checkpoint, _) = open_base_checkpoint(input)?;
        let speed = serving_speed::compare(checkpoint.dir(), dir, loadtest)
            .context("spec.validation.loadtest")?;
        report_sections::set(&mut report, report_sections::SERVING_SPEED, &speed);
        report
            .timings_s
            .insert("validate".to_string(), started.elapsed().as_secs_f64());
    }
    write_json(&layout.artifact_file(files::REPORT), &report)?;
    super::card::run(input)?;
    Ok(summary_from_report(input, &report))
}

/// Reads the artifact back through the compressed-tensors reader: what is
/// evaluated is what was written, not what was in memory. The tensors are
/// the weight source of both the CPU model and its GPU copy.
fn load_artifact(dir: &std::path::Path) -> anyhow::Result<TensorMap> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let loaded = read_checkpoint(dir)?;
    let mut tensors = HashMap::with_capacity(loaded.tensors.len());
    for (name, dense) in loaded.tensors {
        let t = Tensor::from_vec(dense.data, dense.shape.as_slice(), &Device::Cpu)
            .with_context(|| format!("artifact tensor {name}"))?;
        tensors.insert(name, t);
    }
    Ok(TensorMap::new(config, tensors))
}

/// The report's per-model figures: perplexity at the top (the contract's
/// key), everything else measured beside it.
fn metrics(e: &super::Evaluation) -> anyhow::Result<ModelMetrics> {
    let mut extra = BTreeMap::new();
    let mut put = |key: &str, value: serde_json::Value| {
        if !value.is_null() {
            extra.insert(key.to_string(), value);
        }
    };
    put("perplexity_detail", serde_json::to_value(&e.perplexity)?);
    if !e.tasks.is_empty() {
        put("tasks", serde_json::to_value(&e.tasks)?);
    }
    if let Some(s) = &e.system_tests {
        put("system_test_pass_rate", serde_json::json!(s.pass_rate));
        put("system_tests", serde_json::to_value(s)?);
    }
    if let Some(c) = &e.consistency {
        put("greedy_match_rate", serde_json::json!(c.match_rate));
        put("consistency", serde_json::to_value(c)?);
    }
    Ok(ModelMetrics {
        perplexity: e.perplexity.as_ref().map(|p| p.perplexity),
        extra,
    })
}
