//! The pipeline's stages. Each runs in its own Job in a cluster, so each
//! reads what the previous one left in the artifact directory and writes its
//! own result there; `all` runs them in order in one process.

mod baseline;
mod card;
mod evaluation;
mod quantize;
pub mod serving_speed;
mod validate;

use crate::layout::{Layout, files};
use anyhow::Context;
use quantops_api::{QuantizedModelSpec, Report, StageSummary};
use serde::{Serialize, de::DeserializeOwned};
use std::path::Path;

pub use evaluation::{BaselineRecord, Evaluation};

/// One step of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Baseline,
    Quantize,
    Validate,
    Card,
    All,
}

impl Stage {
    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Baseline => "baseline",
            Stage::Quantize => "quantize",
            Stage::Validate => "validate",
            Stage::Card => "card",
            Stage::All => "all",
        }
    }
}

/// What every stage works from.
pub struct StageInput<'a> {
    pub spec: &'a QuantizedModelSpec,
    pub layout: &'a Layout,
    /// The GPU to compute on; `None` runs the CPU twin.
    pub gpu: Option<&'a crate::gpu::Gpu>,
}

/// Runs a stage and returns its summary for the termination message.
pub fn run(stage: Stage, input: &StageInput) -> anyhow::Result<StageSummary> {
    let started = std::time::Instant::now();
    let mut summary = match stage {
        Stage::Baseline => baseline::run(input)?,
        Stage::Quantize => quantize::run(input)?,
        Stage::Validate => validate::run(input)?,
        Stage::Card => card::run(input)?,
        Stage::All => {
            // What the quantize stage would refuse (a method its family
            // cannot run) is refused before the baseline's work.
            preflight(input)?;
            baseline::run(input)?;
            quantize::run(input)?;
            validate::run(input)?
        }
    };
    summary.stage = stage.name().to_string();
    summary.seconds = Some(started.elapsed().as_secs_f64());
    Ok(summary)
}

/// Refuses up front what the quantize stage would refuse for this model
/// and recipe, so `all` does not evaluate a baseline it cannot use.
/// A model it cannot read is left to the baseline, which says why.
fn preflight(input: &StageInput) -> anyhow::Result<()> {
    let config = input
        .layout
        .input("spec.baseModel.path", &input.spec.base_model.path)
        .ok()
        .and_then(|dir| crate::config::LlamaConfig::from_file(&dir.join("config.json")).ok());
    let Some(config) = config else {
        return Ok(());
    };
    crate::llama_layers::check_method(&config, input.spec.quantization.method)?;
    if input.gpu.is_some() {
        crate::gpu::moe::refuse_moe(&config)?;
    }
    Ok(())
}

/// The calibration sequences the quantize stage would use (empty for
/// methods without calibration), for handing the same set to another tool.
pub fn calibration_set(
    spec: &QuantizedModelSpec,
    layout: &Layout,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let dir = layout.input("spec.baseModel.path", &spec.base_model.path)?;
    let checkpoint = crate::checkpoint::Checkpoint::open(&dir)
        .with_context(|| format!("spec.baseModel.path: cannot load {}", dir.display()))?;
    let tokenizer = crate::tokenizer::Tokenizer::from_dir(checkpoint.dir())?;
    Ok(
        quantize::calibration_for(spec, layout, &checkpoint, &tokenizer)?
            .map(|(samples, _)| samples)
            .unwrap_or_default(),
    )
}

/// The summary of a run whose report exists.
fn summary_from_report(input: &StageInput, report: &Report) -> StageSummary {
    let artifact: Option<crate::report_sections::ArtifactFacts> =
        crate::report_sections::get(report, crate::report_sections::ARTIFACT);
    StageSummary {
        variant: report.variant.clone(),
        overall_pass: Some(report.overall_pass),
        baseline_perplexity: report.baseline.perplexity,
        quantized_perplexity: report.quantized.perplexity,
        gates: report.gates.clone(),
        artifact_path: Some(input.layout.artifact_dir.display().to_string()),
        artifact_digest: artifact.map(|a| a.digest),
        report_path: Some(
            input
                .layout
                .artifact_file(files::REPORT)
                .display()
                .to_string(),
        ),
        ..StageSummary::default()
    }
}

/// Writes a stage's JSON result, creating the artifact directory if needed.
fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads an earlier stage's JSON result, saying which stage must run first.
fn read_json<T: DeserializeOwned>(path: &Path, written_by: &str) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (written by the {written_by} stage: run it first)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid: {}",
            path.display(),
            crate::content_free::json(&e)
        )
    })
}
