//! Layer-by-layer quantization with everything on the device: the GPU twin
//! of [`crate::sequential`] for every method (RTN, INT8, FP8, GPTQ, and
//! AWQ in [`awq`]).
//!
//! Weights stream from the checkpoint one decoder layer at a time, the
//! calibration set's hidden states stay on the device, each Linear's inputs
//! go straight into its group's Hessian by cuBLAS, and the quantized
//! weights replace the originals on the device before the layer's output is
//! propagated — the same order as the CPU driver (capture with the layer's
//! original weights, quantize, propagate with the quantized ones), so both
//! produce the same artifact up to rounding. Only codes, scales and the
//! dequantized weights the writer stores come back to the host (and, for
//! AWQ, the RMSNorm weights its scales were folded into).

use std::collections::BTreeMap;

use anyhow::Context;
use cudarc::driver::CudaSlice;
use quantops_api::{Method, QuantizationSpec};

use super::llama::{CapturePoint, DeviceLayer, LlamaOps, forward_layer};
use super::memory::{self, MemoryEstimate};
use super::quant::{DeviceHessian, DeviceQuantized, DeviceQuantizer};
use super::{Gpu, GpuError};
use super::{staging, tensors};
use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::model::{LM_HEAD, LinearId, LinearKind};
use crate::progress::Progress;
use crate::quant::{ActOrder, QuantizedLinear, WeightScheme};
use crate::sequential::is_ignored;

mod awq;

/// Calibration sequences per forward pass on the device.
pub const GPU_CALIBRATION_BATCH: usize = 8;

/// The capture point whose activations are a Linear's input.
fn input_of(kind: LinearKind) -> CapturePoint {
    match kind {
        LinearKind::QProj | LinearKind::KProj | LinearKind::VProj => CapturePoint::Attention,
        LinearKind::OProj => CapturePoint::Output,
        LinearKind::GateProj | LinearKind::UpProj => CapturePoint::Mlp,
        LinearKind::DownProj => CapturePoint::Down,
    }
}

fn module_name(layer: usize, kind: LinearKind) -> String {
    LinearId { layer, kind }.module_name()
}

/// The cuBLAS math of the calibration's matrix products: the forward
/// passes, GPTQ's Hessians and updates. AWQ's search always runs in f32 (its
/// choices compare close losses, and so it agrees with the CPU twin).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// TF32 tensor cores with f32 accumulation (see [`Gpu::tf32`]): what jobs run.
    #[default]
    Tf32,
    /// Plain f32, so that the activations equal the CPU driver's up to
    /// summation order: what the tests comparing the two run.
    F32,
}

/// What the pipeline produced.
#[derive(Debug)]
pub struct PipelineOutput {
    /// Every quantized Linear by module name, as the writer stores it.
    pub quantized: BTreeMap<String, QuantizedLinear>,
    /// The RMSNorm weights AWQ folded its scales into, by tensor name
    /// (`model.layers.0.input_layernorm.weight`): they replace the
    /// checkpoint's in the artifact. Empty for the other methods.
    pub folded_norms: BTreeMap<String, Vec<f32>>,
}

/// Checks the job's estimate against the GPU's free memory.
pub fn check_fits(gpu: &Gpu, estimate: &MemoryEstimate) -> Result<(), GpuError> {
    let (free, total) = gpu.memory()?;
    tracing::info!(
        gpu_gib = estimate.gpu_gib(),
        host_gib = estimate.host_gib(),
        free_gib = free as f64 / (1u64 << 30) as f64,
        detail = %estimate.detail,
        "memory estimate"
    );
    memory::fits(estimate, free, total)
}

/// Quantizes every Linear of the checkpoint that the recipe does not ignore.
/// `calibration` holds the token ids of the calibration set (empty for the
/// methods that need none).
pub fn quantize_checkpoint(
    gpu: &Gpu,
    checkpoint: &Checkpoint,
    recipe: &QuantizationSpec,
    scheme: WeightScheme,
    calibration: &[Vec<u32>],
) -> anyhow::Result<PipelineOutput> {
    quantize_checkpoint_with(
        gpu,
        checkpoint,
        recipe,
        scheme,
        calibration,
        Precision::default(),
    )
}

/// [`quantize_checkpoint`] with the calibration's matrix products in the
/// given precision.
pub fn quantize_checkpoint_with(
    gpu: &Gpu,
    checkpoint: &Checkpoint,
    recipe: &QuantizationSpec,
    scheme: WeightScheme,
    calibration: &[Vec<u32>],
    precision: Precision,
) -> anyhow::Result<PipelineOutput> {
    let cfg = checkpoint.config().clone();
    super::moe::refuse_moe(&cfg)?;
    crate::llama_layers::check_method(&cfg, recipe.method)?;
    let calibrated = recipe.method.needs_calibration();
    let sequence_length = calibration.first().map_or(0, Vec::len);
    let estimate = memory::estimate(
        &cfg,
        recipe.method,
        &scheme,
        calibration.len(),
        sequence_length,
        GPU_CALIBRATION_BATCH,
    );
    check_fits(gpu, &estimate)?;
    // The writer needs codes and scales; the dequantized weights stay on the device.
    let quantizer = DeviceQuantizer::new(gpu)?.keeping_weights_on_device();
    let job = Job {
        gpu,
        quantizer: &quantizer,
        checkpoint,
        cfg: &cfg,
        recipe,
        scheme,
        precision,
    };
    let mut out = BTreeMap::new();
    let mut folded_norms = BTreeMap::new();
    if recipe.method == Method::Awq {
        folded_norms = awq::quantize_layers(&job, calibration, &mut out)?;
    } else if calibrated {
        // GPTQ's forward passes and Hessians take TF32 (see `Gpu::tf32`); a
        // weight-only job never creates the cuBLAS handle at all.
        let _tf32 = match precision {
            Precision::Tf32 => Some(gpu.tf32()?),
            Precision::F32 => None,
        };
        quantize_calibrated(&job, calibration, &mut out)?;
    } else {
        quantize_weight_only(&job, &mut out)?;
    }
    // Outside the decoder layers (lm_head unless ignored) no calibration
    // input is captured: round-to-nearest, as the CPU driver does.
    if !cfg.tie_word_embeddings && !is_ignored("lm_head", &recipe.ignore) {
        let w = upload(gpu, checkpoint, LM_HEAD)?;
        let q = weight_only(&quantizer, "lm_head", &w.0, w.1, scheme)?;
        out.insert("lm_head".to_string(), q.linear);
    }
    Ok(PipelineOutput {
        quantized: out,
        folded_norms,
    })
}

/// A checkpoint tensor `[out, in]` on the device.
fn upload(
    gpu: &Gpu,
    checkpoint: &Checkpoint,
    name: &str,
) -> anyhow::Result<(CudaSlice<f32>, [usize; 2])> {
    let (dev, shape) = tensors::upload_f32(gpu, checkpoint, name)?;
    match shape[..] {
        [rows, cols] => Ok((dev, [rows, cols])),
        _ => anyhow::bail!("{name} has shape {shape:?}, expected a matrix"),
    }
}

fn weight_only(
    quantizer: &DeviceQuantizer,
    module: &str,
    w: &CudaSlice<f32>,
    shape: [usize; 2],
    scheme: WeightScheme,
) -> Result<DeviceQuantized, GpuError> {
    match scheme {
        WeightScheme::Int(int) => quantizer.rtn(module, w, shape, int),
        WeightScheme::Fp8 { scale_dtype } => quantizer.fp8(module, w, shape, scale_dtype),
    }
}

/// What every step of one quantization job reads.
struct Job<'a> {
    gpu: &'a Gpu,
    quantizer: &'a DeviceQuantizer<'a>,
    checkpoint: &'a Checkpoint,
    cfg: &'a LlamaConfig,
    recipe: &'a QuantizationSpec,
    scheme: WeightScheme,
    precision: Precision,
}

/// RTN, INT8 and FP8: each Linear on its own, streamed from the checkpoint
/// through the staging buffers (the next Linear is read while this one is
/// quantized).
fn quantize_weight_only(
    job: &Job,
    out: &mut BTreeMap<String, QuantizedLinear>,
) -> anyhow::Result<()> {
    let Job {
        gpu,
        quantizer,
        checkpoint,
        cfg,
        recipe,
        scheme,
        ..
    } = *job;
    let modules: Vec<(usize, String)> = (0..cfg.num_hidden_layers)
        .flat_map(|layer| LinearKind::ALL.map(|kind| (layer, module_name(layer, kind))))
        .filter(|(_, module)| !is_ignored(module, &recipe.ignore))
        .collect();
    let names: Vec<String> = modules.iter().map(|(_, m)| format!("{m}.weight")).collect();
    let progress = Progress::new("quantize", cfg.num_hidden_layers);
    let mut next = modules.iter().peekable();
    staging::for_each_f32(gpu, checkpoint, &names, |name, w, shape| {
        let Some((layer, module)) = next.next() else {
            anyhow::bail!("{name} was uploaded but not asked for");
        };
        let shape = match shape[..] {
            [rows, cols] => [rows, cols],
            _ => anyhow::bail!("{name} has shape {shape:?}, expected a matrix"),
        };
        let q = weight_only(quantizer, module, &w, shape, scheme)?;
        out.insert(module.clone(), q.linear);
        if next.peek().is_none_or(|(l, _)| l != layer) {
            progress.step(layer + 1, "layer");
        }
        Ok(())
    })
}

/// GPTQ: capture, quantize and propagate one decoder layer at a time.
fn quantize_calibrated(
    job: &Job,
    calibration: &[Vec<u32>],
    out: &mut BTreeMap<String, QuantizedLinear>,
) -> anyhow::Result<()> {
    let Job {
        gpu,
        quantizer,
        checkpoint,
        cfg,
        recipe,
        scheme,
        ..
    } = *job;
    let WeightScheme::Int(int) = scheme else {
        anyhow::bail!("spec.quantization.method: GPTQ needs an integer scheme");
    };
    let order = if recipe.act_order {
        ActOrder::Static
    } else {
        ActOrder::None
    };
    let seq = calibration.first().map_or(0, Vec::len);
    let ops = LlamaOps::new(gpu, cfg)?;
    let mut hidden = embed_batches(&ops, checkpoint, calibration)?;
    let progress = Progress::new("quantize", cfg.num_hidden_layers);
    for layer in 0..cfg.num_hidden_layers {
        let started = std::time::Instant::now();
        let mut weights = DeviceLayer::from_checkpoint(gpu, checkpoint, layer)?;
        let mut hessians = capture_hessians(&ops, &weights, &hidden, seq, layer)?;
        gpu.synchronize()?;
        let captured = started.elapsed().as_secs_f64();
        for kind in LinearKind::ALL {
            let module = module_name(layer, kind);
            if is_ignored(&module, &recipe.ignore) {
                continue;
            }
            let point = input_of(kind);
            let h = hessians
                .get_mut(&point)
                .with_context(|| format!("no activations were captured for {module}"))?;
            let finalized = quantizer.finalize_hessian(h)?;
            let w = weights.linear(kind);
            let shape = [w.len() / h.dim(), h.dim()];
            let q = quantizer
                .gptq(
                    &module,
                    w,
                    shape,
                    finalized,
                    int,
                    order,
                    recipe.damp_percent,
                )
                .with_context(|| format!("decoder layer {layer}"))?;
            weights.set_linear(kind, q.dequantized)?;
            out.insert(module, q.linear);
        }
        drop(hessians);
        gpu.synchronize()?;
        let quantized = started.elapsed().as_secs_f64();
        if layer + 1 < cfg.num_hidden_layers {
            hidden = propagate(&ops, &weights, &hidden, seq)?;
        }
        gpu.synchronize()?;
        tracing::debug!(
            layer,
            load_and_capture_s = captured,
            gptq_s = quantized - captured,
            propagate_s = started.elapsed().as_secs_f64() - quantized,
            "layer timings"
        );
        progress.step(layer + 1, "layer");
    }
    Ok(())
}

/// Every batch's hidden states through the (quantized) layer, for the next.
fn propagate(
    ops: &LlamaOps,
    weights: &DeviceLayer,
    hidden: &[(CudaSlice<f32>, usize)],
    seq: usize,
) -> Result<Vec<(CudaSlice<f32>, usize)>, GpuError> {
    hidden
        .iter()
        .map(|(h, batch)| {
            forward_layer(ops, weights, h, *batch, seq, None).map(|next| (next, *batch))
        })
        .collect()
}

/// Runs the layer over every batch, adding each Linear group's input into
/// its Hessian.
fn capture_hessians(
    ops: &LlamaOps,
    weights: &DeviceLayer,
    hidden: &[(CudaSlice<f32>, usize)],
    seq: usize,
    layer: usize,
) -> anyhow::Result<BTreeMap<CapturePoint, DeviceHessian>> {
    let gpu = ops.gpu();
    let mut hessians: BTreeMap<CapturePoint, DeviceHessian> = BTreeMap::new();
    for (h, batch) in hidden {
        let mut sink =
            |point: CapturePoint, x: &CudaSlice<f32>, rows: usize| -> Result<(), GpuError> {
                let acc = match hessians.entry(point) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let dim = x.len() / rows.max(1);
                        let name = format!("model.layers.{layer}.{point:?}");
                        e.insert(DeviceHessian::new(gpu, name, dim)?)
                    }
                };
                acc.add_batch(gpu, x, rows)
            };
        forward_layer(ops, weights, h, *batch, seq, Some(&mut sink))?;
    }
    Ok(hessians)
}

/// The calibration sequences' embeddings, `[batch · seq, hidden]` per batch
/// of [`GPU_CALIBRATION_BATCH`] sequences, gathered on the device from the
/// embedding table (and scaled by Granite's `embedding_multiplier`, as the
/// forward's embeddings are).
fn embed_batches(
    ops: &LlamaOps,
    checkpoint: &Checkpoint,
    calibration: &[Vec<u32>],
) -> anyhow::Result<Vec<(CudaSlice<f32>, usize)>> {
    let (gpu, cfg) = (ops.gpu(), ops.config());
    let (table, shape) = upload(gpu, checkpoint, "model.embed_tokens.weight")?;
    let [vocab, width] = shape;
    anyhow::ensure!(
        width == cfg.hidden_size,
        "model.embed_tokens.weight has width {width}, config.json says hidden_size {}",
        cfg.hidden_size
    );
    if let Some(&id) = calibration
        .iter()
        .flatten()
        .find(|&&id| id as usize >= vocab)
    {
        anyhow::bail!("calibration token {id} is outside the vocabulary of {vocab}");
    }
    calibration
        .chunks(GPU_CALIBRATION_BATCH)
        .map(|chunk| {
            let ids: Vec<u32> = chunk.iter().flatten().copied().collect();
            let mut x = tensors::gather_rows(gpu, &table, width, &ids)?;
            ops.scale_embeddings(&mut x)?;
            Ok((x, chunk.len()))
        })
        .collect()
}
