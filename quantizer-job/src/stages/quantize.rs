//! The quantize stage: calibration set, layer-by-layer quantization, and the
//! compressed-tensors artifact with its config, tokenizer files and recipe.

use super::baseline::open_base_checkpoint;
use super::{StageInput, write_json};
use crate::calibration;
use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::format::{
    CheckpointOptions, DenseInput, DenseTensor, fused, quantization_config, write_checkpoint,
    write_model_config,
};
use crate::gpu;
use crate::layout::Layout;
use crate::layout::files;
use crate::llama_layers::LlamaLayers;
use crate::model::{LlamaModel, NormId, NormKind};
use crate::quant::{CpuBackend, FloatDtype, QuantBackend, QuantizedLinear, WeightScheme};
use crate::report_sections::CalibrationFacts;
use crate::sequential::quantize_model;
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use candle_core::Tensor;
use quantops_api::{QuantizationSpec, QuantizedModelSpec, StageSummary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// Calibration sequences embedded per forward pass: bounds the activation
/// memory of one layer to `BATCH × sequence length × widest input`.
const CALIBRATION_BATCH: usize = 8;

/// What the quantize stage leaves for the report.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct QuantizeRecord {
    /// The whole stage: reading the checkpoint, quantizing, writing.
    pub seconds: f64,
    /// Calibration and quantization alone (what llm-compressor's `oneshot` times).
    #[serde(default)]
    pub pipeline_seconds: f64,
    pub quantized_linears: usize,
    pub format: String,
    /// Where it was computed: `cpu` or the GPU's name.
    #[serde(default)]
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationFacts>,
}

/// What quantization produced: the quantized Linears, and the dense tensors
/// it rewrote (AWQ folds its scales into the RMSNorm weights); every other
/// tensor is the base checkpoint's.
type Quantized = (
    BTreeMap<String, QuantizedLinear>,
    BTreeMap<String, DenseTensor>,
);

/// The CPU driver: the model's forward passes with candle on the host, each
/// Linear's algorithm on `backend` (the CPU twin; `gpu-check` runs the same
/// driver with the GPU's backend).
fn quantize_on_host<B: QuantBackend>(
    checkpoint: &Checkpoint,
    backend: &B,
    recipe: &QuantizationSpec,
    scheme: WeightScheme,
    samples: &[Vec<u32>],
) -> anyhow::Result<Quantized> {
    let mut model = LlamaModel::from_checkpoint(checkpoint)?;
    let mut batches = Vec::new();
    for chunk in samples.chunks(CALIBRATION_BATCH) {
        batches.push(model.embed(&model.token_tensor(chunk)?)?);
    }
    let quantized = {
        let mut layers = LlamaLayers { model: &mut model };
        quantize_model(&mut layers, backend, recipe, scheme, batches)?
    };
    let norms = norms_of(checkpoint, &model)?;
    Ok((quantized, norms))
}

pub fn run(input: &StageInput) -> anyhow::Result<StageSummary> {
    let started = Instant::now();
    let spec = input.spec;
    let recipe = &spec.quantization;
    let (checkpoint, facts) = open_base_checkpoint(input)?;
    // AWQ on a family whose norms follow the sublayers (OLMo 2) or scale by
    // 1 + weight (Gemma) is refused before any work: it could not be exact.
    crate::llama_layers::check_method(checkpoint.config(), recipe.method)?;
    // The quantizers see the split Linears of a fused family (Phi-3): its
    // ignore entries are applied to them, and a partial one refused now.
    let driver_recipe = QuantizationSpec {
        ignore: fused::driver_ignore(checkpoint.config(), &recipe.ignore)?,
        ..recipe.clone()
    };
    let dtype = storage_dtype(&facts.dtype);
    let tokenizer = Tokenizer::from_dir(checkpoint.dir())?;

    let calibration = calibration_for(spec, input.layout, &checkpoint, &tokenizer)?;
    let samples = calibration.as_ref().map_or(&[][..], |(s, _)| s.as_slice());

    let scheme = WeightScheme::from_spec(recipe, dtype);
    let pipeline_started = Instant::now();
    let (mut quantized, rewritten) = match input.gpu {
        Some(gpu) => {
            let output = gpu::pipeline::quantize_checkpoint(
                gpu,
                &checkpoint,
                &driver_recipe,
                scheme,
                samples,
            )?;
            (output.quantized, folded_norms(output.folded_norms))
        }
        None => quantize_on_host(&checkpoint, &CpuBackend, &driver_recipe, scheme, samples)?,
    };
    // Written under the checkpoint's own names (Phi-3's qkv_proj, gate_up_proj).
    fused::fuse_quantized(checkpoint.config(), &mut quantized)?;
    let gpu = input.gpu;

    let pipeline_seconds = pipeline_started.elapsed().as_secs_f64();
    tracing::info!(
        linears = quantized.len(),
        seconds = pipeline_seconds,
        "quantized; writing the artifact"
    );
    let dense = dense_tensors(&checkpoint, rewritten, &quantized)?;
    let dir = &input.layout.artifact_dir;
    let options = CheckpointOptions {
        dtype,
        ..CheckpointOptions::default()
    };
    let written = write_checkpoint(dir, &dense, &quantized, options)?;
    let config = quantization_config(
        &quantized,
        &artifact_ignore(checkpoint.config(), &recipe.ignore),
    )?;
    write_model_config(checkpoint.dir(), dir, &config)?;
    write_recipe(input)?;
    let record = QuantizeRecord {
        seconds: started.elapsed().as_secs_f64(),
        pipeline_seconds,
        quantized_linears: quantized.len(),
        format: crate::format::compressed_tensors::format_name(&scheme).to_string(),
        device: gpu.map_or_else(|| "cpu".to_string(), |g| g.name().to_string()),
        calibration: calibration.map(|(_, facts)| facts),
    };
    write_json(&input.layout.artifact_file(files::QUANTIZE), &record)?;
    tracing::info!(
        dir = %dir.display(),
        linears = record.quantized_linears,
        bytes = written.total_bytes,
        seconds = record.seconds,
        "artifact written"
    );
    Ok(StageSummary {
        variant: input.layout.variant.clone(),
        artifact_path: Some(dir.display().to_string()),
        ..StageSummary::default()
    })
}

/// The recipe's calibration sequences and their figures; `None` for methods
/// that need none.
pub(super) fn calibration_for(
    spec: &QuantizedModelSpec,
    layout: &Layout,
    checkpoint: &Checkpoint,
    tokenizer: &Tokenizer,
) -> anyhow::Result<Option<(Vec<Vec<u32>>, CalibrationFacts)>> {
    if !spec.quantization.method.needs_calibration() {
        return Ok(None);
    }
    let c = spec
        .calibration
        .as_ref()
        .context("spec.calibration: required by this method")?;
    let path = layout.input("spec.calibration.path", &c.path)?;
    let set = calibration::load(
        &path,
        tokenizer,
        checkpoint.config().vocab_size,
        c.samples as usize,
        c.sequence_length as usize,
        c.seed,
    )
    .with_context(|| format!("spec.calibration: {}", path.display()))?;
    let facts = CalibrationFacts {
        path: c.path.clone(),
        samples: set.stats.samples,
        sequence_length: set.stats.sequence_length,
        seed: set.stats.seed,
        unique_token_ratio: set.stats.unique_token_ratio,
    };
    Ok(Some((set.samples, facts)))
}

/// The artifact's `quantization_config.ignore`: the recipe's entries, plus
/// a mixture of experts' routers and shared-expert gates by full module
/// name, which the driver never quantizes and vLLM expects listed.
fn artifact_ignore(config: &LlamaConfig, ignore: &[String]) -> Vec<String> {
    let mut out = ignore.to_vec();
    if let Some(moe) = &config.block.moe {
        out.extend((0..config.num_hidden_layers).flat_map(|l| moe.full_precision_modules(l)));
    }
    out
}

/// Scales and unquantized tensors are stored in the base model's dtype.
fn storage_dtype(dtypes: &str) -> FloatDtype {
    match dtypes {
        "BF16" => FloatDtype::Bf16,
        "F32" => FloatDtype::F32,
        _ => FloatDtype::F16,
    }
}

/// Every tensor that stays unquantized: the rewritten ones as computed, the
/// rest as the base checkpoint stores them.
fn dense_tensors<'c>(
    checkpoint: &'c Checkpoint,
    mut rewritten: BTreeMap<String, DenseTensor>,
    quantized: &BTreeMap<String, QuantizedLinear>,
) -> anyhow::Result<BTreeMap<String, DenseInput<'c>>> {
    let mut dense = BTreeMap::new();
    for name in checkpoint.tensor_names() {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        if quantized.contains_key(module) {
            continue;
        }
        let tensor = match rewritten.remove(name) {
            Some(t) => DenseInput::Values(t),
            None => {
                let raw = checkpoint.raw(name)?;
                DenseInput::Stored {
                    dtype: raw.dtype,
                    shape: raw.shape,
                    bytes: raw.bytes,
                }
            }
        };
        dense.insert(name.to_string(), tensor);
    }
    if let Some(name) = rewritten.keys().next() {
        anyhow::bail!("quantization rewrote {name}, which the checkpoint does not have");
    }
    Ok(dense)
}

/// The decoder layers' RMSNorm weights as the model now holds them (AWQ
/// may have folded scales into them).
fn norms_of(
    checkpoint: &Checkpoint,
    model: &LlamaModel,
) -> anyhow::Result<BTreeMap<String, DenseTensor>> {
    let mut norms = BTreeMap::new();
    for name in checkpoint.tensor_names() {
        let norm = match NormId::parse(name) {
            Some(NormId {
                layer,
                kind: NormKind::Input,
            }) => model.input_layernorm(layer)?,
            Some(NormId {
                layer,
                kind: NormKind::PostAttention,
            }) => model.post_attention_layernorm(layer)?,
            None => continue,
        };
        norms.insert(name.to_string(), to_dense(norm)?);
    }
    Ok(norms)
}

/// The RMSNorm weights AWQ folded its scales into on the GPU, as dense tensors.
fn folded_norms(folded: BTreeMap<String, Vec<f32>>) -> BTreeMap<String, DenseTensor> {
    folded
        .into_iter()
        .map(|(name, data)| {
            let shape = vec![data.len()];
            (name, DenseTensor { shape, data })
        })
        .collect()
}

fn to_dense(t: &Tensor) -> anyhow::Result<DenseTensor> {
    Ok(DenseTensor {
        shape: t.dims().to_vec(),
        data: t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?,
    })
}

/// `recipe.yaml`: the spec's recipe as applied, so the artifact says how it was made.
fn write_recipe(input: &StageInput) -> anyhow::Result<()> {
    let spec = input.spec;
    let doc = serde_json::json!({
        "quantops": {
            "variant": input.layout.variant,
            "baseModel": spec.base_model,
            "version": spec.version,
            "quantization": spec.quantization,
            "calibration": spec.calibration,
        }
    });
    let path = input.layout.artifact_file(files::RECIPE);
    let text = format!(
        "# Written by quantops quantizer-job {}\n{}",
        env!("CARGO_PKG_VERSION"),
        serde_yaml::to_string(&doc)?
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}
