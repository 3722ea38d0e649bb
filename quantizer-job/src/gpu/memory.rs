//! What a quantization job will need, worked out before it starts, so that a
//! GPU that is too small fails in the first second with the numbers instead
//! of an out-of-memory error an hour in.
//!
//! The GPU pipeline holds at once: the calibration set's hidden states (in
//! and out of the current layer), one decoder layer's weights, the forward
//! pass's scratch for one batch, and then either the layer's four Hessians
//! and the working set of the largest Linear's GPTQ, or AWQ's kept
//! activation rows of the four capture points and the working set of its
//! largest group's search. Weights stream layer by layer, so the model's
//! depth does not count on the GPU; on the host the results do (codes, packed
//! for 4 and 8 bits, and scales wait there for the writer), and the
//! embedding table for the calibrated methods.

use quantops_api::Method;

use super::GpuError;
use super::awq::MAX_CLIP_GROUP;
use crate::config::LlamaConfig;
use crate::format::pack;
use crate::quant::awq::RowSampler;
use crate::quant::{AwqConfig, WeightScheme};

const F32: u64 = 4;
const F64: u64 = 8;
const GIB: f64 = (1u64 << 30) as f64;

/// Peak memory of one job, in bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    pub gpu_bytes: u64,
    pub host_bytes: u64,
    /// The largest terms, for the error message.
    pub detail: String,
}

impl MemoryEstimate {
    /// GPU estimate in GiB.
    pub fn gpu_gib(&self) -> f64 {
        self.gpu_bytes as f64 / GIB
    }

    /// Host estimate in GiB.
    pub fn host_gib(&self) -> f64 {
        self.host_bytes as f64 / GIB
    }
}

/// `[out, in]` of every Linear of one decoder layer.
fn layer_linears(cfg: &LlamaConfig) -> [[u64; 2]; 7] {
    let h = cfg.hidden_size as u64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
    let i = cfg.intermediate_size as u64;
    [[q, h], [kv, h], [kv, h], [h, q], [i, h], [i, h], [h, i]]
}

/// AWQ's kept rows of one capture point when `samples` sequences of
/// `sequence_length` tokens pass in batches of `batch`: exactly what the
/// pipeline allocates (about [`crate::quant::awq::AWQ_MAX_ROWS`]).
fn awq_rows(samples: usize, sequence_length: usize, batch: usize) -> u64 {
    let batch = batch.max(1);
    let batch_rows: Vec<usize> = (0..samples.div_ceil(batch))
        .map(|b| (samples - b * batch).min(batch) * sequence_length)
        .collect();
    RowSampler::total(&batch_rows) as u64
}

/// What AWQ keeps on the device besides the layer: its activation rows of
/// the four capture points (`rows` each) and the largest group's search,
/// returned as (samples, search) bytes.
fn awq_bytes(linears: &[[u64; 2]; 7], rows: u64) -> (u64, u64) {
    // Capture points' widths: q/k/v's input, o's, gate/up's, down's.
    let ins = [linears[0][1], linears[3][1], linears[4][1], linears[6][1]];
    let samples = ins.iter().map(|n| rows * n * F32).sum();
    // The search's rows (subsampled).
    let n = rows.min(AwqConfig::default().max_samples as u64);
    // The input groups: o; q, k, v; down; gate, up.
    let groups: [&[[u64; 2]]; 4] = [
        &linears[3..4],
        &linears[0..3],
        &linears[6..7],
        &linears[4..6],
    ];
    let search = groups
        .iter()
        .map(|group| {
            let inp = group.first().map_or(0, |[_, i]| *i);
            let widest = group.iter().map(|[o, _]| *o).max().unwrap_or(0);
            let largest = group.iter().map(|[o, i]| o * i).max().unwrap_or(0);
            let all: u64 = group.iter().map(|[o, i]| o * i).sum();
            // Subsampled and scaled inputs; the weight error and the output
            // of one candidate; the clipping search's Gram matrices (`in ·
            // group size` values, and only for groups the kernel takes: the
            // recipe's group size is not known here, so the widest); each
            // Linear's dequantized result until it replaces the weight; the
            // scaled, clipped weight and the codes of the one being rounded
            // (a folded copy of the Linear before is smaller than these).
            2 * n * inp * F32
                + widest * inp * F32
                + widest * n * F32
                + inp * inp.min(MAX_CLIP_GROUP as u64) * F32
                + all * F32
                + largest * (2 * F32 + 1)
        })
        .max()
        .unwrap_or(0);
    (samples, search)
}

/// Host bytes of a quantized `[out, in]` Linear as it waits for the writer:
/// codes (a 4-bit code packed in half a byte) and f32 scales and zero points.
fn stored_bytes(scheme: &WeightScheme, [out, inp]: [u64; 2]) -> u64 {
    let (code_bits, group) = match scheme {
        WeightScheme::Int(s) if pack::packs(s.bits) => (u64::from(s.bits), s.group_size),
        WeightScheme::Int(s) => (8, s.group_size),
        WeightScheme::Fp8 { .. } => (8, None),
    };
    let groups = group.map_or(1, |g| inp.div_ceil(g.max(1) as u64));
    out * inp * code_bits / 8 + out * groups * (F32 + 1)
}

/// Estimates a job that quantizes `cfg` by `method` into `scheme`, with
/// calibration when the method takes it: `samples × sequence_length` tokens
/// in batches of `batch` sequences.
pub fn estimate(
    cfg: &LlamaConfig,
    method: Method,
    scheme: &WeightScheme,
    samples: usize,
    sequence_length: usize,
    batch: usize,
) -> MemoryEstimate {
    let calibrated = method.needs_calibration();
    let linears = layer_linears(cfg);
    let layer_weights: u64 = linears.iter().map(|[o, i]| o * i * F32).sum();
    let largest = linears.iter().map(|[o, i]| o * i).max().unwrap_or(0);
    let h = cfg.hidden_size as u64;
    let tokens = (samples * sequence_length) as u64;
    // The last two terms: GPTQ's Hessians and largest working set, or AWQ's
    // samples and largest search.
    let (hidden, scratch, kept, working) = if calibrated {
        let hidden = 2 * tokens * h * F32;
        let batch_tokens = (batch.min(samples) * sequence_length) as u64;
        let widths = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) as u64
            * cfg.head_dim as u64
            + 3 * cfg.intermediate_size as u64
            + 4 * h;
        let scores = (cfg.num_attention_heads as u64) * (sequence_length as u64).pow(2) * F32;
        let scratch = batch_tokens * widths * F32 + scores;
        let (kept, working) = if method == Method::Awq {
            awq_bytes(&linears, awq_rows(samples, sequence_length, batch))
        } else {
            let ins = [linears[0][1], linears[3][1], linears[4][1], linears[6][1]];
            let hessians: u64 = ins.iter().map(|n| n * n * F32).sum();
            let gptq = linears
                .iter()
                .map(|[o, n]| n * n * (2 * F64 + F32) + o * n * (4 * F32 + 1))
                .max()
                .unwrap_or(0);
            (hessians, gptq)
        };
        (hidden, scratch, kept, working)
    } else {
        (0, 0, 0, largest * (3 * F32 + 1))
    };
    let gpu_bytes = hidden + layer_weights + scratch + kept + working;
    let results: u64 = linears
        .iter()
        .map(|shape| stored_bytes(scheme, *shape))
        .sum::<u64>()
        * cfg.num_hidden_layers as u64;
    let embedding = if calibrated {
        cfg.vocab_size as u64 * h * F32
    } else {
        0
    };
    let host_bytes = results + embedding + tokens * 4;
    let gib = |b: u64| b as f64 / GIB;
    let (kept_name, working_name) = if method == Method::Awq {
        ("AWQ's activation samples", "largest AWQ group's search")
    } else {
        ("Hessians", "largest Linear's working set")
    };
    let detail = format!(
        "hidden states {:.2} GiB, one layer's weights {:.2} GiB, forward scratch {:.2} GiB, {kept_name} {:.2} GiB, {working_name} {:.2} GiB",
        gib(hidden),
        gib(layer_weights),
        gib(scratch),
        gib(kept),
        gib(working)
    );
    MemoryEstimate {
        gpu_bytes,
        host_bytes,
        detail,
    }
}

/// Whether the estimate fits `free` bytes of a `total`-byte GPU, leaving 5 %
/// for the CUDA libraries' own workspaces; the error carries the breakdown.
pub fn fits(estimate: &MemoryEstimate, free: usize, total: usize) -> Result<(), GpuError> {
    if estimate.gpu_bytes as f64 > free as f64 * 0.95 {
        return Err(GpuError::TooSmall {
            needed_gib: estimate.gpu_gib(),
            free_gib: free as f64 / GIB,
            total_gib: total as f64 / GIB,
            detail: estimate.detail.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{FloatDtype, IntScheme};

    const INT4: WeightScheme = WeightScheme::Int(IntScheme {
        bits: 4,
        symmetric: true,
        group_size: Some(128),
        scale_dtype: FloatDtype::Bf16,
    });

    /// A job on Llama-3-8B's shapes with `layers` layers and 128 × 2048
    /// calibration tokens in batches of 8.
    fn llama3_8b_shaped(layers: usize, method: Method) -> MemoryEstimate {
        estimate(
            &config(layers, 4096, 14336, 32, 8),
            method,
            &INT4,
            128,
            2048,
            8,
        )
    }

    #[test]
    fn a_small_gpu_is_refused_with_the_estimate() {
        let e = llama3_8b_shaped(32, Method::Gptq);
        let gib = 1usize << 30;
        assert!(fits(&e, 80 * gib, 80 * gib).is_ok());
        let err = fits(&e, 16 * gib, 16 * gib).unwrap_err().to_string();
        assert!(err.contains("16.0 GiB free of 16.0 GiB"), "{err}");
        assert!(
            err.contains("hidden states") && err.contains("fewer calibration samples"),
            "{err}"
        );
    }

    fn config(layers: usize, hidden: usize, inter: usize, heads: usize, kv: usize) -> LlamaConfig {
        let text = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": 128256,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192,
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, text.to_string()).expect("write");
        LlamaConfig::from_file(&path).expect("config")
    }

    #[test]
    fn depth_does_not_count_on_the_gpu_but_on_the_host() {
        let shallow = llama3_8b_shaped(2, Method::Gptq);
        let deep = llama3_8b_shaped(32, Method::Gptq);
        assert_eq!(shallow.gpu_bytes, deep.gpu_bytes);
        // On the host, each layer's results: 30 more layers, 30 more of them.
        let layer: u64 = layer_linears(&config(2, 4096, 14336, 32, 8))
            .iter()
            .map(|shape| stored_bytes(&INT4, *shape))
            .sum();
        assert_eq!(deep.host_bytes - shallow.host_bytes, 30 * layer);
        // Llama-3-8B shapes with 128×2048 calibration tokens: the hidden
        // states (2 × 4 GiB) and down_proj's GPTQ (14336² f64 twice) dominate;
        // the whole must fit an 80 GB GPU but not a 16 GB one.
        let gib = deep.gpu_gib();
        assert!(gib > 16.0 && gib < 75.0, "{gib} GiB: {}", deep.detail);
    }

    #[test]
    fn awq_counts_its_samples_and_search_instead_of_hessians() {
        // Kept rows per capture point: all tokens of a small set, then
        // AWQ_MAX_ROWS (20 × 256 in batches of 8 ends with a short batch).
        assert_eq!(awq_rows(16, 128, 8), 2048);
        assert_eq!(awq_rows(128, 2048, 8), 4096);
        assert_eq!(awq_rows(20, 256, 8), 3072);
        assert_eq!(awq_rows(0, 0, 8), 0);

        let cfg = config(32, 4096, 14336, 32, 8);
        let (samples, search) = awq_bytes(&layer_linears(&cfg), 4096);
        // 4096 rows of q/k/v's, o's, gate/up's and down's inputs.
        assert_eq!(samples, 4096 * (4096 + 4096 + 4096 + 14336) * 4);
        // Llama-3-8B's widest groups (gate+up, down) need about a GiB.
        let gib = search as f64 / GIB;
        assert!(gib > 0.5 && gib < 2.0, "{gib} GiB");

        let awq = estimate(&cfg, Method::Awq, &INT4, 128, 2048, 8);
        let gptq = estimate(&cfg, Method::Gptq, &INT4, 128, 2048, 8);
        assert!(
            awq.detail.contains("AWQ's activation samples 0.41 GiB")
                && awq.detail.contains("largest AWQ group's search")
                && !awq.detail.contains("Hessians"),
            "{}",
            awq.detail
        );
        // Both hold the same hidden states, layer and forward scratch; AWQ's
        // own terms are smaller than GPTQ's f64 working set.
        assert!(awq.gpu_bytes < gptq.gpu_bytes);
        assert!(awq.gpu_bytes > samples + search);
        let shallow = llama3_8b_shaped(2, Method::Awq);
        assert_eq!(shallow.gpu_bytes, awq.gpu_bytes);
    }

    #[test]
    fn weight_only_needs_one_linear() {
        let e = estimate(&config(32, 4096, 14336, 32, 8), Method::Rtn, &INT4, 0, 0, 8);
        assert!(e.gpu_gib() < 3.0, "{}", e.detail);
        assert!(e.detail.contains("largest Linear"));
    }

    #[test]
    fn the_host_holds_the_codes_as_the_writer_stores_them() {
        // One [4096, 4096] Linear: packed 4-bit codes at half a byte, with
        // 32 groups of 128 per row; 3-bit and FP8 codes at a byte each.
        let shape = [4096, 4096];
        let n = 4096 * 4096;
        assert_eq!(stored_bytes(&INT4, shape), n / 2 + 4096 * 32 * 5);
        let int3 = WeightScheme::Int(IntScheme {
            bits: 3,
            symmetric: true,
            group_size: None,
            scale_dtype: FloatDtype::Bf16,
        });
        assert_eq!(stored_bytes(&int3, shape), n + 4096 * 5);
        let fp8 = WeightScheme::Fp8 {
            scale_dtype: FloatDtype::Bf16,
        };
        assert_eq!(stored_bytes(&fp8, shape), n + 4096 * 5);
        // Llama-3-8B's 7 B Linear weights in int4: about 3.5 GB of results,
        // and no embedding table without calibration.
        let e = estimate(&config(32, 4096, 14336, 32, 8), Method::Rtn, &INT4, 0, 0, 8);
        let gib = e.host_gib();
        assert!(gib > 3.0 && gib < 4.0, "{gib} GiB");
    }
}
