//! The checks run on a model, once on the FP16 baseline and once on the
//! quantized artifact, with the same code and inputs, so the two are
//! comparable figure for figure.

use crate::eval::{consistency, perplexity, read_text, system_tests, tasks};
use crate::gates::QualityFigures;
use crate::gpu::Gpu;
use crate::gpu::llama::{GpuLlama, WeightSource};
use crate::layout::Layout;
use crate::model::LlamaModel;
use crate::report_sections::ModelFacts;
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use quantops_api::QuantizedModelSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::cell::OnceCell;
use std::path::Path;

/// Everything measured on one model.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Evaluation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<perplexity::PerplexityResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<tasks::TaskSetResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_tests: Option<system_tests::SystemTestsResult>,
    /// Greedy continuations of the consistency prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<consistency::Generations>,
    /// Set on the quantized model only: its agreement with the baseline's generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<consistency::ConsistencyResult>,
}

impl Evaluation {
    /// The figures the gates compare.
    pub fn figures(&self) -> QualityFigures {
        QualityFigures {
            perplexity: self.perplexity.as_ref().map(|p| p.perplexity),
            task_accuracy: self
                .tasks
                .iter()
                .map(|t| (t.name.clone(), t.accuracy))
                .collect(),
            greedy_match_rate: self.consistency.as_ref().map(|c| c.match_rate),
            system_test_pass_rate: self.system_tests.as_ref().map(|s| s.pass_rate),
        }
    }
}

/// What the baseline stage leaves for the validate stage.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BaselineRecord {
    /// Digest of the spec fields the baseline depends on; a validate stage
    /// refuses a baseline computed for other inputs.
    pub inputs_digest: String,
    pub model: ModelFacts,
    pub evaluation: Evaluation,
    pub seconds: f64,
}

/// Digest of what the baseline's figures depend on: the base model and the
/// evaluation inputs (not the gates, not the recipe).
pub fn baseline_inputs_digest(spec: &QuantizedModelSpec) -> String {
    let v = &spec.validation;
    let inputs = serde_json::json!({
        "baseModel": spec.base_model,
        "evalText": v.eval_text,
        "tasks": v.tasks,
        "systemTests": v.system_tests,
        "consistency": v.consistency,
    });
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(inputs.to_string().as_bytes()))
    )
}

/// Where the checks that run the model compute: the CPU model, or the same
/// weights on the GPU. The one place that chooses; the checks' definitions
/// (windows, stopping rules) are the same on both.
pub(super) enum Evaluator<'a> {
    Cpu(&'a LlamaModel),
    Gpu(GpuEvaluator<'a>),
}

/// The GPU side of [`Evaluator`].
pub(super) struct GpuEvaluator<'a> {
    gpu: &'a Gpu,
    weights: &'a dyn WeightSource,
    /// Uploaded at the first check that runs on the GPU, once per
    /// evaluation; never when the spec asks only for CPU checks.
    model: OnceCell<Box<GpuLlama<'a>>>,
    /// Task scoring still runs on the CPU model: its eval functions take a
    /// `LlamaModel`.
    cpu: &'a LlamaModel,
}

impl<'a> GpuEvaluator<'a> {
    fn model(&self) -> anyhow::Result<&GpuLlama<'a>> {
        if let Some(model) = self.model.get() {
            return Ok(model);
        }
        let uploaded = GpuLlama::from_source(self.gpu, self.weights)
            .with_context(|| format!("uploading the model to {}", self.gpu.name()))?;
        Ok(self.model.get_or_init(|| Box::new(uploaded)))
    }
}

impl<'a> Evaluator<'a> {
    /// The GPU evaluator when `gpu` is given, reading the weights from
    /// `weights` (the source `model` was built from), else the CPU one.
    pub(super) fn new(
        gpu: Option<&'a Gpu>,
        model: &'a LlamaModel,
        weights: &'a dyn WeightSource,
    ) -> Self {
        match gpu {
            None => Evaluator::Cpu(model),
            Some(gpu) => Evaluator::Gpu(GpuEvaluator {
                gpu,
                weights,
                model: OnceCell::new(),
                cpu: model,
            }),
        }
    }

    /// The CPU model, for the checks that have no GPU path yet (tasks).
    fn cpu_model(&self) -> &'a LlamaModel {
        match self {
            Evaluator::Cpu(model) => model,
            Evaluator::Gpu(g) => g.cpu,
        }
    }

    /// Perplexity of the text file at `path` (see [`perplexity`]).
    fn perplexity_of_file(
        &self,
        tokenizer: &Tokenizer,
        path: &Path,
        window_tokens: usize,
        max_windows: usize,
    ) -> anyhow::Result<perplexity::PerplexityResult> {
        match self {
            Evaluator::Cpu(model) => Ok(perplexity::perplexity_of_file(
                model,
                tokenizer,
                path,
                window_tokens,
                max_windows,
            )?),
            Evaluator::Gpu(g) => {
                let tokens = tokenizer.encode(&read_text(path)?)?;
                Ok(g.model()?
                    .perplexity_of_tokens(&tokens, window_tokens, max_windows)?)
            }
        }
    }

    /// Runs a system-test suite (see [`system_tests::run_suite`]).
    fn system_tests(
        &self,
        tokenizer: &Tokenizer,
        suite: &system_tests::SystemTestSuite,
        baseline: Option<&system_tests::SystemTestsResult>,
    ) -> anyhow::Result<system_tests::SystemTestsResult> {
        match self {
            Evaluator::Cpu(model) => {
                Ok(system_tests::run_suite(model, tokenizer, suite, baseline)?)
            }
            Evaluator::Gpu(g) => {
                let model = g.model()?;
                system_tests::run_suite_with(
                    &mut |ids, max_new_tokens, eos| {
                        Ok(model.generate_greedy(ids, max_new_tokens, eos)?)
                    },
                    tokenizer,
                    suite,
                    baseline,
                )
            }
        }
    }

    /// Greedy generations of the consistency prompts (see
    /// [`consistency::generate`]: prompts encoded without added specials).
    fn generate(
        &self,
        tokenizer: &Tokenizer,
        prompts: &[String],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> anyhow::Result<consistency::Generations> {
        match self {
            Evaluator::Cpu(model) => Ok(consistency::generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens,
                eos,
            )?),
            Evaluator::Gpu(g) => {
                let model = g.model()?;
                consistency::generate_with(
                    &mut |ids, max_new_tokens, eos| {
                        Ok(model.generate_greedy(ids, max_new_tokens, eos)?)
                    },
                    tokenizer,
                    prompts,
                    max_new_tokens,
                    eos,
                )
            }
        }
    }
}

/// Runs every check the spec asks for. `baseline` is given when evaluating
/// the quantized model: edge-case system tests and generations compare to it.
pub(super) fn evaluate(
    evaluator: &Evaluator,
    tokenizer: &Tokenizer,
    spec: &QuantizedModelSpec,
    layout: &Layout,
    baseline: Option<&Evaluation>,
) -> anyhow::Result<Evaluation> {
    let model = evaluator.cpu_model();
    let v = &spec.validation;
    let perplexity = match &v.eval_text {
        Some(e) => {
            let path = layout.input("spec.validation.evalText.path", &e.path)?;
            let result = evaluator
                .perplexity_of_file(
                    tokenizer,
                    &path,
                    e.window_tokens as usize,
                    e.max_windows as usize,
                )
                .with_context(|| format!("spec.validation.evalText: {}", path.display()))?;
            tracing::info!(
                perplexity = result.perplexity,
                windows = result.windows,
                "perplexity"
            );
            Some(result)
        }
        None => None,
    };
    let mut task_results = Vec::with_capacity(v.tasks.len());
    for set in &v.tasks {
        let path = layout.input(
            &format!("spec.validation.tasks[{}].path", set.name),
            &set.path,
        )?;
        let result = tasks::evaluate_task_file(model, tokenizer, &set.name, &path, None)
            .with_context(|| format!("spec.validation.tasks[{}]: {}", set.name, path.display()))?;
        tracing::info!(task = %set.name, accuracy = result.accuracy, "task accuracy");
        task_results.push(result);
    }
    let system_tests = match &v.system_tests {
        Some(s) => {
            let path = layout.input("spec.validation.systemTests.path", &s.path)?;
            let suite = system_tests::load_suite(&path)
                .with_context(|| format!("spec.validation.systemTests: {}", path.display()))?;
            let result = evaluator.system_tests(
                tokenizer,
                &suite,
                baseline.and_then(|b| b.system_tests.as_ref()),
            )?;
            tracing::info!(pass_rate = result.pass_rate, "system tests");
            Some(result)
        }
        None => None,
    };
    let (generations, consistency) = match &v.consistency {
        Some(c) => {
            let path = layout.input("spec.validation.consistency.path", &c.path)?;
            let prompts = consistency::load_prompts(&path, c.max_prompts as usize)
                .with_context(|| format!("spec.validation.consistency: {}", path.display()))?;
            let eos = model.config().eos_token_id;
            let ours = evaluator.generate(tokenizer, &prompts, c.max_new_tokens as usize, eos)?;
            let compared = match baseline.and_then(|b| b.generations.as_ref()) {
                Some(base) => Some(consistency::compare(base, &ours)?),
                None => None,
            };
            (Some(ours), compared)
        }
        None => (None, None),
    };
    Ok(Evaluation {
        perplexity,
        tasks: task_results,
        system_tests,
        generations,
        consistency,
    })
}
