//! AWQ in the layer-streamed device pipeline: the GPU twin of the CPU
//! driver's AWQ ([`crate::sequential::quantize_model`] with `method: awq`),
//! with one decoder layer's weights and the calibration set's hidden states
//! on the device, as GPTQ has them.
//!
//! Each layer goes as on the CPU:
//! 1. capture: the hidden states pass through the layer with its original
//!    weights; of each capture point's activations only the rows
//!    [`RowSampler`] keeps are gathered, on the device, into one buffer per
//!    point (about [`crate::quant::awq::AWQ_MAX_ROWS`] rows);
//! 2. the input groups of [`llama_input_groups`], in its order, each on the
//!    group's *current* weights (an earlier group may have folded into one):
//!    [`DeviceAwq::search_on_device`], `1/s` folded into the op before (an
//!    RMSNorm weight, or the rows of `v_proj` / `up_proj`) when scaling won,
//!    and the group's Linears replaced by their dequantized `Q(W·s)`. A
//!    group with no fold target (`o_proj` under grouped-query attention)
//!    is rounded to nearest, as the CPU driver does;
//! 3. the hidden states go through the quantized layer to the next.
//!
//! The forward passes take TF32 when the job's [`Precision`] says so; the
//! search always runs in f32, as [`super::super::CudaBackend`]'s does.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::time::Instant;

use anyhow::Context;
use cudarc::driver::CudaSlice;

use super::{Job, Precision, embed_batches, input_of, propagate, weight_only};
use crate::gpu::awq::{DeviceAwq, DeviceMatrix};
use crate::gpu::error::DriverContext;
use crate::gpu::llama::{CapturePoint, DeviceLayer, LlamaOps, forward_layer};
use crate::gpu::quant::DeviceQuantized;
use crate::gpu::{GpuError, Tf32Guard, tensors};
use crate::llama_layers::llama_input_groups;
use crate::model::{LinearId, LinearKind, NormId, NormKind};
use crate::progress::Progress;
use crate::quant::awq::RowSampler;
use crate::quant::{AwqConfig, IntScheme, QuantError, QuantizedLinear, ScaleSink, WeightScheme};
use crate::sequential::{InputGroup, is_ignored};

/// One capture point's kept activation rows, `[rows, width]` on the device.
struct Samples {
    data: CudaSlice<f32>,
    rows: usize,
    width: usize,
}

/// AWQ over every decoder layer: quantizes the Linears the recipe does not
/// ignore into `out` and returns the RMSNorm weights its scales were folded
/// into, by tensor name, for the writer.
pub(super) fn quantize_layers(
    job: &Job,
    calibration: &[Vec<u32>],
    out: &mut BTreeMap<String, QuantizedLinear>,
) -> anyhow::Result<BTreeMap<String, Vec<f32>>> {
    let Job {
        gpu,
        checkpoint,
        cfg,
        ..
    } = *job;
    let seq = calibration.first().map_or(0, Vec::len);
    let ops = LlamaOps::new(gpu, cfg)?;
    let awq = DeviceAwq::new(job.quantizer)?;
    let mut hidden = embed_batches(&ops, checkpoint, calibration)?;
    let mut folded_norms = BTreeMap::new();
    let progress = Progress::new("quantize", cfg.num_hidden_layers);
    for layer in 0..cfg.num_hidden_layers {
        let started = Instant::now();
        let mut weights = DeviceLayer::from_checkpoint(gpu, checkpoint, layer)?;
        let samples = {
            let _math = forward_math(job)?;
            capture_samples(&ops, &weights, &hidden, seq)?
        };
        gpu.synchronize()?;
        let captured = started.elapsed().as_secs_f64();
        let mut folded: BTreeMap<String, NormKind> = BTreeMap::new();
        for group in llama_input_groups(cfg, layer) {
            quantize_group(job, &awq, &mut weights, &samples, &group, out, &mut folded)
                .with_context(|| format!("decoder layer {layer}"))?;
        }
        drop(samples);
        for (name, kind) in folded {
            let values = gpu
                .stream()
                .clone_dtoh(weights.norm(kind)?)
                .during(format!("downloading the folded {name}"))?;
            folded_norms.insert(name, values);
        }
        gpu.synchronize()?;
        let quantized = started.elapsed().as_secs_f64();
        if layer + 1 < cfg.num_hidden_layers {
            let _math = forward_math(job)?;
            hidden = propagate(&ops, &weights, &hidden, seq)?;
        }
        gpu.synchronize()?;
        tracing::debug!(
            layer,
            load_and_capture_s = captured,
            awq_s = quantized - captured,
            propagate_s = started.elapsed().as_secs_f64() - quantized,
            "layer timings"
        );
        progress.step(layer + 1, "layer");
    }
    Ok(folded_norms)
}

/// TF32 for the forward passes when the job asks for it; dropped before the
/// search, whose choices compare close losses.
fn forward_math<'g>(job: &Job<'g>) -> Result<Option<Tf32Guard<'g>>, GpuError> {
    match job.precision {
        Precision::Tf32 => job.gpu.tf32().map(Some),
        Precision::F32 => Ok(None),
    }
}

/// Runs the layer over every batch and keeps, of each capture point's
/// activations, the rows [`RowSampler`] picks, as the CPU driver's
/// `capture_layer` does: gathered on the device straight into one buffer
/// per point, sized up front, so the rows left out are never stored.
fn capture_samples(
    ops: &LlamaOps,
    weights: &DeviceLayer,
    hidden: &[(CudaSlice<f32>, usize)],
    seq: usize,
) -> anyhow::Result<BTreeMap<CapturePoint, Samples>> {
    let gpu = ops.gpu();
    let batch_rows: Vec<usize> = hidden.iter().map(|(_, batch)| batch * seq).collect();
    let total = RowSampler::total(&batch_rows);
    let mut sampler = RowSampler::new(hidden.len());
    let mut samples: BTreeMap<CapturePoint, Samples> = BTreeMap::new();
    let mut filled = 0usize;
    for ((h, batch), &rows) in hidden.iter().zip(&batch_rows) {
        let ids = sampler
            .next_batch(rows)
            .into_iter()
            .map(u32::try_from)
            .collect::<Result<Vec<u32>, _>>()
            .with_context(|| format!("a calibration batch of {rows} rows is too long"))?;
        let kept = ids.len();
        let mut sink =
            |point: CapturePoint, x: &CudaSlice<f32>, got: usize| -> Result<(), GpuError> {
                let width = x.len() / got.max(1);
                let stored = match samples.entry(point) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(Samples {
                        data: gpu
                            .stream()
                            .alloc_zeros::<f32>(total * width)
                            .during("allocating AWQ's activation samples")?,
                        rows: total,
                        width,
                    }),
                };
                let range = filled * stored.width..(filled + kept) * stored.width;
                let len = stored.data.len();
                let shape_error = || {
                    GpuError::from(QuantError::Shape {
                        what: format!("AWQ samples of {point:?}"),
                        expected: format!(
                            "rows {range:?} of width {} within {len} values",
                            stored.width
                        ),
                        got: format!("{got} rows of width {width}"),
                    })
                };
                if width != stored.width {
                    return Err(shape_error());
                }
                let mut dst = stored
                    .data
                    .try_slice_mut(range.clone())
                    .ok_or_else(shape_error)?;
                tensors::gather_rows_into(gpu, x, width, &ids, &mut dst)
            };
        forward_layer(ops, weights, h, *batch, seq, Some(&mut sink))?;
        filled += kept;
    }
    Ok(samples)
}

/// The kind of a Linear of decoder layer `layer`, from its module name.
fn kind_in(layer: usize, module: &str) -> anyhow::Result<LinearKind> {
    match LinearId::parse(&format!("{module}.weight")) {
        Some(id) if id.layer == layer => Ok(id.kind),
        _ => anyhow::bail!("{module} is not a Linear of decoder layer {layer}"),
    }
}

/// One input group, as the CPU driver's `quantize_group`: AWQ when the
/// scheme is an integer grid, the group's input was captured and something
/// can absorb the scales; otherwise each Linear on its own (round to
/// nearest, or FP8). The results replace the Linears in `weights`; a folded
/// norm is noted in `folded` (tensor name → which norm).
fn quantize_group(
    job: &Job,
    awq: &DeviceAwq,
    weights: &mut DeviceLayer,
    samples: &BTreeMap<CapturePoint, Samples>,
    group: &InputGroup,
    out: &mut BTreeMap<String, QuantizedLinear>,
    folded: &mut BTreeMap<String, NormKind>,
) -> anyhow::Result<()> {
    let layer = weights.index();
    let linears = group
        .linears
        .iter()
        .filter(|m| !is_ignored(m, &job.recipe.ignore))
        .map(|m| Ok((m.as_str(), kind_in(layer, m)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if linears.is_empty() {
        return Ok(());
    }
    // The group's input is what its first Linear reads, ignored or not.
    let input = match group.linears.first() {
        Some(first) => samples.get(&input_of(kind_in(layer, first)?)),
        None => None,
    };
    let results: Vec<DeviceQuantized> = match (job.scheme, input, &group.fold) {
        (WeightScheme::Int(int), Some(x), Some(target)) => {
            awq_group(awq, weights, &linears, x, int, target, folded)?
        }
        (scheme, _, _) => linears
            .iter()
            .map(|&(module, kind)| {
                let (rows, cols) = weights.linear_shape(kind);
                weight_only(
                    job.quantizer,
                    module,
                    weights.linear(kind),
                    [rows, cols],
                    scheme,
                )
            })
            .collect::<Result<_, _>>()?,
    };
    for ((module, kind), q) in linears.into_iter().zip(results) {
        weights.set_linear(kind, q.dequantized)?;
        out.insert(module.to_string(), q.linear);
    }
    Ok(())
}

/// AWQ for one group, as the CPU driver's `awq_group`: search on the
/// group's current weights and stored inputs, then fold `1/s` into the op
/// before when a scaling won. Returns `Q(W·s)` per Linear, in order.
fn awq_group(
    awq: &DeviceAwq,
    weights: &mut DeviceLayer,
    linears: &[(&str, LinearKind)],
    x: &Samples,
    scheme: IntScheme,
    target: &ScaleSink,
    folded: &mut BTreeMap<String, NormKind>,
) -> anyhow::Result<Vec<DeviceQuantized>> {
    let found = {
        let layers: Vec<DeviceMatrix> = linears
            .iter()
            .map(|&(name, kind)| {
                let (rows, cols) = weights.linear_shape(kind);
                DeviceMatrix {
                    name,
                    data: weights.linear(kind),
                    rows,
                    cols,
                }
            })
            .collect();
        let inputs = DeviceMatrix {
            name: "AWQ's captured inputs",
            data: &x.data,
            rows: x.rows,
            cols: x.width,
        };
        awq.search_on_device(&layers, inputs, scheme, &AwqConfig::default())?
    };
    if found.alpha.is_some() {
        fold(awq, weights, target, &found.device_scales, folded)?;
    }
    tracing::debug!(group = ?linears, alpha = ?found.alpha, error = found.search_error, "awq");
    Ok(found.layers)
}

/// Divides the op before a group by the scales, on the device, as the CPU
/// driver's `fold_scales`: an RMSNorm weight element-wise, or a Linear's
/// output rows.
fn fold(
    awq: &DeviceAwq,
    weights: &mut DeviceLayer,
    target: &ScaleSink,
    scales: &CudaSlice<f32>,
    folded: &mut BTreeMap<String, NormKind>,
) -> anyhow::Result<()> {
    let layer = weights.index();
    match target {
        ScaleSink::Norm(name) => {
            let id = NormId::parse(name)
                .filter(|id| id.layer == layer)
                .with_context(|| format!("{name} is not an RMSNorm of decoder layer {layer}"))?;
            let new = awq.fold_into_norm(weights.norm(id.kind)?, scales)?;
            weights.set_norm(id.kind, new)?;
            let base = name.strip_suffix(".weight").unwrap_or(name);
            folded.insert(format!("{base}.weight"), id.kind);
        }
        ScaleSink::Linear(module) => {
            let kind = kind_in(layer, module)?;
            let (rows, cols) = weights.linear_shape(kind);
            let w = DeviceMatrix {
                name: module,
                data: weights.linear(kind),
                rows,
                cols,
            };
            let new = awq.fold_into_linear(w, scales)?;
            weights.set_linear(kind, new)?;
        }
    }
    Ok(())
}
