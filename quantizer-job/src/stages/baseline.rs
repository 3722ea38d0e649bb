//! The baseline stage: the FP16 model's figures, measured once and kept in
//! the artifact directory for the validate stage to compare against.

use super::evaluation::{BaselineRecord, Evaluator, baseline_inputs_digest, evaluate};
use super::{StageInput, write_json};
use crate::checkpoint::Checkpoint;
use crate::layout::files;
use crate::model::LlamaModel;
use crate::report_sections::ModelFacts;
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use quantops_api::StageSummary;
use std::time::Instant;

pub fn run(input: &StageInput) -> anyhow::Result<StageSummary> {
    let started = Instant::now();
    let (checkpoint, model_facts) = open_base_checkpoint(input)?;
    let model = LlamaModel::from_checkpoint(&checkpoint)?;
    let tokenizer = Tokenizer::from_dir(checkpoint.dir())?;
    let evaluator = Evaluator::new(input.gpu, &model, &checkpoint);
    let evaluation = evaluate(&evaluator, &tokenizer, input.spec, input.layout, None)?;
    let record = BaselineRecord {
        inputs_digest: baseline_inputs_digest(input.spec),
        model: model_facts,
        evaluation,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_json(&input.layout.artifact_file(files::BASELINE), &record)?;
    Ok(StageSummary {
        variant: input.layout.variant.clone(),
        baseline_perplexity: record.evaluation.perplexity.as_ref().map(|p| p.perplexity),
        artifact_path: Some(input.layout.artifact_dir.display().to_string()),
        ..StageSummary::default()
    })
}

/// Opens the spec's base checkpoint, checks its digests, and describes it.
pub(super) fn open_base_checkpoint(input: &StageInput) -> anyhow::Result<(Checkpoint, ModelFacts)> {
    let dir = input
        .layout
        .input("spec.baseModel.path", &input.spec.base_model.path)?;
    let checkpoint = Checkpoint::open(&dir)
        .with_context(|| format!("spec.baseModel.path: cannot load {}", dir.display()))?;
    checkpoint
        .verify_digests(&input.spec.base_model.sha256)
        .context("spec.baseModel.sha256")?;
    let info = checkpoint.info();
    let facts = ModelFacts {
        name: input.spec.base_model.name.clone(),
        architecture: info.architecture.clone(),
        parameters: info.parameters,
        layers: info.num_layers,
        size_bytes: info.bytes_on_disk,
        dtype: info.dtypes.join(","),
    };
    tracing::info!(
        model = %facts.name,
        architecture = %facts.architecture,
        parameters = facts.parameters,
        layers = facts.layers,
        bytes = facts.size_bytes,
        "base checkpoint"
    );
    Ok((checkpoint, facts))
}
