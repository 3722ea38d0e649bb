//! AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before
//! rounding, then a per-group clipping search, for a set of Linears that share
//! one input.
//!
//! # Contract with the pipeline (how to wire the result)
//!
//! [`llama_awq_mappings`] lists these groups and [`fold_into_norm`] /
//! [`fold_into_linear`] apply the scales. Call [`awq_search`] with the Linears that read the *same* input `x` (`[n, in]`
//! activations captured at that input):
//!
//! | Linears | shared input comes from | fold `1/s` into |
//! | --- | --- | --- |
//! | `q_proj`, `k_proj`, `v_proj` | `input_layernorm` | `input_layernorm.weight[c] /= s[c]` |
//! | `gate_proj`, `up_proj` | `post_attention_layernorm` | `post_attention_layernorm.weight[c] /= s[c]` |
//! | `down_proj` | `up_proj` (through SiLU(gate) ⊙ up, linear in up) | `up_proj` row `c` `/= s[c]` |
//! | `o_proj` | `v_proj` (attention is linear in v), only when `v_proj.out == o_proj.in` (no GQA) | `v_proj` row `c` `/= s[c]` |
//!
//! The returned [`AwqResult::layers`] hold `Q(W · diag(s))`: their `codes`,
//! `scales` and `dequantized` are of the *scaled* weight, which is what the
//! checkpoint stores. The model stays exact only if the previous op's output
//! channel `c` is divided by `s[c]` (the table's last column), so
//! `(x / s) · Q(W·s)ᵀ ≈ x · Wᵀ`. When the previous op is a Linear that is itself
//! quantized later (`up_proj`, `v_proj`), fold *before* quantizing it. If no
//! previous op can absorb the scales (e.g. `o_proj` under GQA), quantize that
//! Linear with RTN or GPTQ instead.

use rayon::prelude::*;
use tracing::debug;

use super::grid;
use super::{IntScheme, Matrix, QuantError, QuantizedLinear, output_error, rtn};

/// Where a Linear set's shared input comes from, i.e. what absorbs `1/s`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleSink {
    /// An RMSNorm weight (`…input_layernorm.weight`): divide element `c` by `s[c]`.
    Norm(String),
    /// A Linear's weight (`…up_proj.weight`): divide output row `c` by `s[c]`.
    Linear(String),
}

/// One AWQ group: the Linears sharing an input and the op that absorbs the scales.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwqMapping {
    /// Module names of the Linears, searched together.
    pub linears: Vec<String>,
    pub sink: ScaleSink,
}

/// The AWQ groups of one Llama decoder layer (`prefix` = `model.layers.{i}`), in
/// the order they must be run (each group's inputs are captured after the
/// previous groups were folded and quantized). `o_proj` is included only when
/// `v_proj`'s output width equals `o_proj`'s input width (no grouped-query attention).
pub fn llama_awq_mappings(prefix: &str, v_out: usize, o_in: usize) -> Vec<AwqMapping> {
    let m = |s: &str| format!("{prefix}.{s}");
    let mut out = vec![AwqMapping {
        linears: vec![
            m("self_attn.q_proj"),
            m("self_attn.k_proj"),
            m("self_attn.v_proj"),
        ],
        sink: ScaleSink::Norm(m("input_layernorm")),
    }];
    if v_out == o_in {
        out.push(AwqMapping {
            linears: vec![m("self_attn.o_proj")],
            sink: ScaleSink::Linear(m("self_attn.v_proj")),
        });
    }
    out.push(AwqMapping {
        linears: vec![m("mlp.gate_proj"), m("mlp.up_proj")],
        sink: ScaleSink::Norm(m("post_attention_layernorm")),
    });
    out.push(AwqMapping {
        linears: vec![m("mlp.down_proj")],
        sink: ScaleSink::Linear(m("mlp.up_proj")),
    });
    out
}

/// Fails unless a norm of `len` weights can absorb `scales` scales (one per
/// weight). The CPU fold and the GPU pipeline's fold both check here.
pub(crate) fn check_norm_fold(len: usize, scales: usize) -> Result<(), QuantError> {
    if len != scales {
        return Err(QuantError::Shape {
            what: "AWQ norm fold".to_string(),
            expected: format!("{scales} norm weights"),
            got: format!("{len}"),
        });
    }
    Ok(())
}

/// Fails unless a Linear of `rows` output rows can absorb `scales` scales
/// (one per row).
pub(crate) fn check_linear_fold(rows: usize, scales: usize) -> Result<(), QuantError> {
    if rows != scales {
        return Err(QuantError::Shape {
            what: "AWQ linear fold".to_string(),
            expected: format!("{scales} output rows"),
            got: format!("{rows}"),
        });
    }
    Ok(())
}

/// Folds `1/s` into a norm weight: `gamma[c] /= s[c]`.
pub fn fold_into_norm(gamma: &mut [f32], s: &[f32]) -> Result<(), QuantError> {
    check_norm_fold(gamma.len(), s.len())?;
    for (g, f) in gamma.iter_mut().zip(s) {
        *g /= f;
    }
    Ok(())
}

/// Folds `1/s` into the previous Linear's output rows: `W[c, :] /= s[c]`.
pub fn fold_into_linear(w: &mut Matrix, s: &[f32]) -> Result<(), QuantError> {
    check_linear_fold(w.rows, s.len())?;
    for (row, f) in w.data.chunks_mut(w.cols).zip(s) {
        for v in row.iter_mut() {
            *v /= f;
        }
    }
    Ok(())
}

/// Search settings; the defaults are AutoAWQ's / llm-compressor's.
#[derive(Clone, Debug)]
pub struct AwqConfig {
    /// Grid points for the scale exponent α in `[0, 1)` (α = i / grid).
    pub grid: usize,
    /// Grid for the clipping search: ratios `1 - i / clip_grid`.
    pub clip_grid: usize,
    /// Largest shrink of a group's max tried in the clipping search.
    pub max_shrink: f32,
    /// At most this many activation rows are used (evenly spaced).
    pub max_samples: usize,
    /// Linears whose name ends with one of these skip the clipping search
    /// (AutoAWQ skips `q_proj`/`k_proj`: attention logits are sensitive to clipping).
    pub skip_clip: Vec<String>,
}

impl Default for AwqConfig {
    fn default() -> Self {
        Self {
            grid: 20,
            clip_grid: 20,
            max_shrink: 0.5,
            max_samples: 512,
            skip_clip: vec!["q_proj".to_string(), "k_proj".to_string()],
        }
    }
}

/// The scales to fold into the previous op and the quantized (scaled) Linears.
#[derive(Clone, Debug)]
pub struct AwqResult {
    /// Per-input-channel scales `s` (`[in]`); all ones when scaling did not help.
    pub scales: Vec<f32>,
    /// The chosen α; `None` when the identity scaling won.
    pub alpha: Option<f32>,
    /// `Q(W·s)` per input Linear, in the order given.
    pub layers: Vec<QuantizedLinear>,
    /// Output error `Σ‖X Wᵀ − (X/s) Q(W·s)ᵀ‖²` before clipping, summed over the Linears.
    pub search_error: f64,
}

/// AWQ searches on at most this many activation rows per input group, taken
/// evenly over the calibration set while its batches pass through a layer
/// (the search subsamples further, to [`AwqConfig::max_samples`]). Both
/// drivers keep them, the CPU's on the host and the GPU pipeline's on the
/// device, so this also bounds the device memory AWQ's samples take.
pub const AWQ_MAX_ROWS: usize = 4096;

/// Which activation rows of each calibration batch AWQ keeps, batch after
/// batch in order: row `r` of a batch is kept when its position in the
/// stream, `seen + r`, is a multiple of the stride `⌈batches · rows /
/// AWQ_MAX_ROWS⌉`, so no batch gives more than `⌈AWQ_MAX_ROWS / batches⌉`
/// rows. The stride is worked out from the batch at hand (its rows times
/// the number of batches), as the CPU driver always has: with equal batches
/// that is the whole calibration set's row count; a shorter last batch gets
/// a smaller stride. Both drivers batch alike, so they keep the same rows.
#[derive(Clone, Debug)]
pub struct RowSampler {
    batches: usize,
    seen: usize,
}

impl RowSampler {
    /// A sampler for a calibration set of `batches` batches.
    pub fn new(batches: usize) -> Self {
        Self { batches, seen: 0 }
    }

    /// The kept rows (indices within the batch, ascending) of the next
    /// batch, which has `rows` rows.
    pub fn next_batch(&mut self, rows: usize) -> Vec<usize> {
        let stride = (self.batches * rows).div_ceil(AWQ_MAX_ROWS).max(1);
        let seen = self.seen;
        self.seen += rows;
        (0..rows)
            .filter(|r| (seen + r).is_multiple_of(stride))
            .collect()
    }

    /// How many rows batches of `batch_rows` rows leave in total: what a
    /// capture point stores, and what the memory estimate counts.
    pub fn total(batch_rows: &[usize]) -> usize {
        let mut sampler = Self::new(batch_rows.len());
        batch_rows
            .iter()
            .map(|&rows| sampler.next_batch(rows).len())
            .sum()
    }
}

/// The rows [`subsample`] keeps of `rows` rows, or `None` when it keeps
/// them all; the GPU search gathers the same rows on the device.
pub(crate) fn subsample_rows(rows: usize, max: usize) -> Option<Vec<usize>> {
    if rows <= max || max == 0 {
        return None;
    }
    Some((0..max).map(|k| k * rows / max).collect())
}

/// At most `max` rows of `x`, evenly spaced (all of them when `max` is 0).
pub(crate) fn subsample(x: &Matrix, max: usize) -> Matrix {
    let Some(rows) = subsample_rows(x.rows, max) else {
        return x.clone();
    };
    let mut data = Vec::with_capacity(rows.len() * x.cols);
    for &r in &rows {
        data.extend_from_slice(x.row(r));
    }
    Matrix {
        rows: rows.len(),
        cols: x.cols,
        data,
    }
}

fn scale_columns(w: &Matrix, s: &[f32]) -> Matrix {
    let mut out = w.clone();
    for row in out.data.chunks_mut(w.cols) {
        for (v, f) in row.iter_mut().zip(s) {
            *v *= f;
        }
    }
    out
}

fn unscale_columns(w: &Matrix, s: &[f32]) -> Matrix {
    let mut out = w.clone();
    for row in out.data.chunks_mut(w.cols) {
        for (v, f) in row.iter_mut().zip(s) {
            *v /= f;
        }
    }
    out
}

/// Checks that the Linears (name, `[out, in]`) share the width of the
/// inputs `x` (`[rows, in]`) and fit the scheme's groups; returns the group
/// size. Both the CPU and the GPU search start here.
pub(crate) fn check_inputs(
    layers: &[(&str, [usize; 2])],
    x: [usize; 2],
    scheme: &IntScheme,
) -> Result<usize, QuantError> {
    let Some((first, _)) = layers.first() else {
        return Err(QuantError::Shape {
            what: "AWQ layer set".to_string(),
            expected: "at least one Linear".to_string(),
            got: "none".to_string(),
        });
    };
    let [rows, inp] = x;
    if rows == 0 {
        return Err(QuantError::NoSamples {
            layer: first.to_string(),
        });
    }
    let mut group_size = inp;
    for (name, [out, cols]) in layers {
        if *cols != inp {
            return Err(QuantError::Shape {
                what: format!("{name} weight for AWQ"),
                expected: format!("[out, {inp}] (the shared input width)"),
                got: format!("[{out}, {cols}]"),
            });
        }
        group_size = grid::validate(scheme, name, inp)?;
    }
    Ok(group_size)
}

/// The candidate scales for exponent `alpha`: `x̄^α / w̄^(1−α)`, normalised
/// so that the largest and smallest multiply to one.
fn candidate_scales(x_mean: &[f32], w_mean: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = x_mean
        .iter()
        .zip(w_mean)
        .map(|(xm, wm)| (xm.max(1e-12).powf(alpha) / wm.max(1e-12).powf(1.0 - alpha)).max(1e-4))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, 0.0f32), |(l, h), v| (l.min(*v), h.max(*v)));
    let norm = (lo * hi).sqrt();
    for v in s.iter_mut() {
        *v /= norm;
    }
    s
}

/// The scale search's winner: scales, exponent (`None` for the identity)
/// and output error.
pub(crate) struct ScaleChoice {
    pub scales: Vec<f32>,
    pub alpha: Option<f32>,
    pub loss: f64,
}

/// Grid search over α: the identity scaling first, then each candidate,
/// keeping the first strictly lowest `loss`. The CPU and the GPU differ only
/// in how they compute `loss`, so both walk the same candidates.
pub(crate) fn search_scales<E>(
    x_mean: &[f32],
    w_mean: &[f32],
    config: &AwqConfig,
    mut loss: impl FnMut(&[f32]) -> Result<f64, E>,
) -> Result<ScaleChoice, E> {
    let identity = vec![1.0f32; x_mean.len()];
    let mut best = ScaleChoice {
        loss: loss(&identity)?,
        scales: identity,
        alpha: None,
    };
    for i in 0..config.grid {
        let alpha = i as f32 / config.grid as f32;
        let s = candidate_scales(x_mean, w_mean, alpha);
        let l = loss(&s)?;
        if l < best.loss {
            best = ScaleChoice {
                scales: s,
                alpha: Some(alpha),
                loss: l,
            };
        }
    }
    Ok(best)
}

/// How many shrink ratios the clipping search tries.
pub(crate) fn clip_steps(config: &AwqConfig) -> usize {
    ((config.max_shrink * config.clip_grid as f32) as usize).max(1)
}

/// Whether the clipping search leaves this Linear alone.
pub(crate) fn skips_clip(config: &AwqConfig, name: &str) -> bool {
    config.skip_clip.iter().any(|s| name.ends_with(s.as_str()))
}

/// Searches AWQ scales and clipping for Linears sharing the input `x`.
pub fn awq_search(
    layers: &[(&str, &Matrix)],
    x: &Matrix,
    scheme: IntScheme,
    config: &AwqConfig,
) -> Result<AwqResult, QuantError> {
    let shapes: Vec<(&str, [usize; 2])> = layers
        .iter()
        .map(|(name, w)| (*name, [w.rows, w.cols]))
        .collect();
    let group_size = check_inputs(&shapes, [x.rows, x.cols], &scheme)?;
    let inp = x.cols;
    let x = subsample(x, config.max_samples);

    // Mean |x| per input channel.
    let mut x_mean = vec![0.0f64; inp];
    for row in x.data.chunks(inp) {
        for (m, v) in x_mean.iter_mut().zip(row) {
            *m += f64::from(v.abs());
        }
    }
    let x_mean: Vec<f32> = x_mean.iter().map(|m| (m / x.rows as f64) as f32).collect();
    // Mean of |w| normalised by its group's max, over all output rows.
    let mut w_mean = vec![0.0f64; inp];
    let mut total_rows = 0usize;
    for (_, w) in layers {
        for row in w.data.chunks(inp) {
            for (g, chunk) in row.chunks(group_size).enumerate() {
                let mx = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs())) + 1e-6;
                for (k, v) in chunk.iter().enumerate() {
                    w_mean[g * group_size + k] += f64::from(v.abs() / mx);
                }
            }
        }
        total_rows += w.rows;
    }
    let w_mean: Vec<f32> = w_mean
        .iter()
        .map(|m| (m / total_rows as f64) as f32)
        .collect();

    let choice = search_scales(&x_mean, &w_mean, config, |s| {
        let mut total = 0.0;
        for (name, w) in layers {
            let q = rtn(name, &scale_columns(w, s), scheme)?;
            total += output_error(&x, w, &unscale_columns(&q.dequantized, s))?;
        }
        Ok(total)
    })?;
    let first = layers.first().map_or("", |(n, _)| n);
    debug!(layer = first, alpha = ?choice.alpha, loss = choice.loss, "awq scale search");

    // Clipping search on the scaled weights with the scaled inputs.
    let xs = unscale_columns(&x, &choice.scales);
    let mut out = Vec::with_capacity(layers.len());
    for (name, w) in layers {
        let ws = scale_columns(w, &choice.scales);
        let clipped = if skips_clip(config, name) {
            ws
        } else {
            clip_search(&ws, &xs, group_size, scheme, config)
        };
        out.push(rtn(name, &clipped, scheme)?);
    }
    Ok(AwqResult {
        scales: choice.scales,
        alpha: choice.alpha,
        layers: out,
        search_error: choice.loss,
    })
}

/// Per (row, group): the symmetric clamp `[-m, m]`, `m = r · max|w|`, whose
/// rounded group minimises `Σ_t (x_t,g · (w_g − Q(clamp(w_g))))²`. Returns the clamped weight.
pub(crate) fn clip_search(
    w: &Matrix,
    x: &Matrix,
    group_size: usize,
    scheme: IntScheme,
    config: &AwqConfig,
) -> Matrix {
    let steps = clip_steps(config);
    let inp = w.cols;
    let mut out = w.clone();
    out.data.par_chunks_mut(inp).for_each(|row| {
        for g0 in (0..inp).step_by(group_size) {
            let group = &mut row[g0..g0 + group_size];
            let orig: Vec<f32> = group.to_vec();
            let max_val = orig.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut best = (f64::INFINITY, max_val);
            let mut diff = vec![0.0f32; group_size];
            for i in 0..steps {
                let m = max_val * (1.0 - i as f32 / config.clip_grid as f32);
                let clamped: Vec<f32> = orig.iter().map(|v| v.clamp(-m, m)).collect();
                let p = grid::params_of(&clamped, &scheme);
                for ((d, o), c) in diff.iter_mut().zip(&orig).zip(&clamped) {
                    *d = o - grid::dequantize(grid::quantize(*c, p, scheme.bits), p);
                }
                let err: f64 = x
                    .data
                    .chunks(inp)
                    .map(|xr| {
                        let e = super::dot(&xr[g0..g0 + group_size], &diff);
                        f64::from(e) * f64::from(e)
                    })
                    .sum();
                if err < best.0 {
                    best = (err, m);
                }
            }
            for v in group.iter_mut() {
                *v = v.clamp(-best.1, best.1);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU driver's selection before it moved here, written out: row `r`
    /// of a batch is kept when `seen + r` is a multiple of
    /// `⌈batches · rows / AWQ_MAX_ROWS⌉`.
    fn reference(batch_rows: &[usize]) -> Vec<Vec<usize>> {
        let mut seen = 0;
        batch_rows
            .iter()
            .map(|&rows| {
                let stride = (batch_rows.len() * rows).div_ceil(AWQ_MAX_ROWS).max(1);
                let kept = (0..rows).filter(|r| (seen + r) % stride == 0).collect();
                seen += rows;
                kept
            })
            .collect()
    }

    fn sampled(batch_rows: &[usize]) -> Vec<Vec<usize>> {
        let mut sampler = RowSampler::new(batch_rows.len());
        batch_rows.iter().map(|&r| sampler.next_batch(r)).collect()
    }

    #[test]
    fn row_sampler_keeps_every_stride_th_row_of_the_stream() {
        for batch_rows in [
            vec![1024; 2],          // 2048 rows: all kept
            vec![8 * 2048; 16],     // 128 × 2048 tokens in batches of 8: stride 64
            vec![2048, 2048, 1024], // 20 × 256: a shorter last batch
            vec![8 * 512; 8],
            vec![3 * 100, 3 * 100, 100],
            vec![],
        ] {
            let kept = sampled(&batch_rows);
            assert_eq!(kept, reference(&batch_rows), "{batch_rows:?}");
            let total: usize = kept.iter().map(Vec::len).sum();
            assert_eq!(RowSampler::total(&batch_rows), total, "{batch_rows:?}");
            let all: usize = batch_rows.iter().sum();
            assert_eq!(total == all, all <= AWQ_MAX_ROWS, "{batch_rows:?}");
            // No batch gives more than its even share, rounded up.
            let share = AWQ_MAX_ROWS.div_ceil(batch_rows.len().max(1));
            assert!(kept.iter().all(|k| k.len() <= share), "{batch_rows:?}");
        }
        // Equal batches: the kept rows are the stream's multiples of the stride.
        let kept = sampled(&[8 * 2048; 16]);
        let stream: Vec<usize> = kept
            .iter()
            .enumerate()
            .flat_map(|(b, rows)| rows.iter().map(move |r| b * 8 * 2048 + r))
            .collect();
        assert_eq!(stream.len(), AWQ_MAX_ROWS);
        assert!(stream.iter().enumerate().all(|(k, &r)| r == 64 * k));
    }

    #[test]
    fn subsample_takes_the_rows_subsample_rows_names() {
        assert_eq!(subsample_rows(512, 512), None);
        assert_eq!(subsample_rows(10, 0), None);
        assert_eq!(subsample_rows(10, 4), Some(vec![0, 2, 5, 7]));
        let x = Matrix {
            rows: 10,
            cols: 2,
            data: (0..20).map(|v| v as f32).collect(),
        };
        let s = subsample(&x, 4);
        assert_eq!((s.rows, s.cols), (4, 2));
        assert_eq!(s.data, vec![0.0, 1.0, 4.0, 5.0, 10.0, 11.0, 14.0, 15.0]);
        assert_eq!(subsample(&x, 20).data, x.data);
    }

    #[test]
    fn folds_check_their_lengths() {
        let mut gamma = vec![2.0f32, 3.0];
        assert!(fold_into_norm(&mut gamma, &[1.0]).is_err());
        fold_into_norm(&mut gamma, &[2.0, 0.5]).expect("fold");
        assert_eq!(gamma, vec![1.0, 6.0]);
        let mut w = Matrix {
            rows: 2,
            cols: 2,
            data: vec![1.0, 2.0, 3.0, 4.0],
        };
        assert!(fold_into_linear(&mut w, &[1.0, 2.0, 3.0]).is_err());
        fold_into_linear(&mut w, &[2.0, 4.0]).expect("fold");
        assert_eq!(w.data, vec![0.5, 1.0, 0.75, 1.0]);
    }
}
