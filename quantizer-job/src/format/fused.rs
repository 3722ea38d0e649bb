//! Phi-3's fused Linears in the artifact ([`crate::family::Fused`]): the
//! quantizers work on the split `q_proj`/`k_proj`/`v_proj` and
//! `gate_proj`/`up_proj` the forward runs, and [`fuse_quantized`] stacks
//! their results into `qkv_proj` and `gate_up_proj` before the writer
//! stores them, because that is the name transformers, vLLM and
//! llm-compressor load for Phi-3.
//!
//! Why stacking is exact: every scheme the worker writes has its scales (and
//! zero points) per output row — per channel for INT8 and FP8, per group
//! along the input for the grouped int schemes — so no scale spans two
//! parts, and a row of the fused Linear is quantized from the same weights
//! and the same input statistics as the part's row (GPTQ: one Hessian per
//! shared input, hence one act-order permutation and one `g_idx`, which is
//! checked; AWQ: one scale vector per shared input, folded into the norm
//! before them). Nothing is per tensor: a per-tensor scale over the fused
//! weight would differ from the parts' scales, and such a scheme would have
//! to be refused here.
//!
//! A recipe that ignores some parts of a fused Linear but not the others
//! cannot be written in the checkpoint's layout and is refused before any
//! work ([`driver_ignore`]).

use std::collections::BTreeMap;

use crate::config::LlamaConfig;
use crate::family::Fused;
use crate::model::LinearId;
use crate::quant::{Codes, Matrix, PackedCodes, QuantizedLinear};
use crate::sequential::is_ignored;

/// Why the parts of a fused Linear cannot be written as one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FuseError {
    /// Some parts are quantized (or ignored) and others not.
    #[error(
        "spec.quantization.ignore: {fused} is one Linear in the checkpoint ({parts}); ignore all of it (e.g. `{leaf}`) or none of it, not {partial}"
    )]
    Partial {
        /// The fused module.
        fused: String,
        /// Its parts, for the message.
        parts: String,
        /// Its leaf name, what an ignore entry matches.
        leaf: &'static str,
        /// The parts that are ignored.
        partial: String,
    },
    /// The parts were quantized in ways one Linear cannot hold.
    #[error("cannot write {fused} as one Linear: its parts differ in {what}")]
    Mismatch {
        /// The fused module.
        fused: String,
        /// What differs.
        what: &'static str,
    },
}

/// The recipe's `ignore` list as the quantizers (which see the split
/// Linears) must apply it: an entry that matches a fused Linear's name
/// ignores each of its parts; an entry that matches only some parts is
/// refused. Unchanged for families without fused Linears.
pub fn driver_ignore(cfg: &LlamaConfig, ignore: &[String]) -> Result<Vec<String>, FuseError> {
    let mut out = ignore.to_vec();
    if !cfg.block.fused_projections {
        return Ok(out);
    }
    for layer in 0..cfg.num_hidden_layers {
        for fused in Fused::ALL {
            let name = fused.module_name(layer);
            let parts: Vec<String> = fused
                .parts()
                .iter()
                .map(|&kind| LinearId { layer, kind }.module_name())
                .collect();
            let ignored: Vec<&String> = parts.iter().filter(|p| is_ignored(p, ignore)).collect();
            if is_ignored(&name, ignore) || ignored.len() == parts.len() {
                out.extend(parts.iter().filter(|p| !is_ignored(p, ignore)).cloned());
            } else if !ignored.is_empty() {
                return Err(FuseError::Partial {
                    fused: name,
                    parts: parts.join(", "),
                    leaf: fused.leaf().rsplit('.').next().unwrap_or_default(),
                    partial: ignored
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
    }
    Ok(out)
}

/// Replaces the quantized parts of every fused Linear by their stack under
/// the fused name. Parts all absent (the fused Linear is ignored) are left
/// alone; some present and some absent is an error. Unchanged for families
/// without fused Linears.
pub fn fuse_quantized(
    cfg: &LlamaConfig,
    quantized: &mut BTreeMap<String, QuantizedLinear>,
) -> Result<(), FuseError> {
    if !cfg.block.fused_projections {
        return Ok(());
    }
    for layer in 0..cfg.num_hidden_layers {
        for fused in Fused::ALL {
            let name = fused.module_name(layer);
            let names: Vec<String> = fused
                .parts()
                .iter()
                .map(|&kind| LinearId { layer, kind }.module_name())
                .collect();
            let present = names.iter().filter(|n| quantized.contains_key(*n)).count();
            if present == 0 {
                continue;
            }
            if present < names.len() {
                return Err(FuseError::Partial {
                    fused: name,
                    parts: names.join(", "),
                    leaf: fused.leaf().rsplit('.').next().unwrap_or_default(),
                    partial: names
                        .iter()
                        .filter(|n| !quantized.contains_key(*n))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            let parts: Vec<QuantizedLinear> =
                names.iter().filter_map(|n| quantized.remove(n)).collect();
            let stacked = stack(&name, &parts)?;
            quantized.insert(name, stacked);
        }
    }
    Ok(())
}

/// The row-wise stack of `parts`, which must agree in everything but their
/// rows.
pub fn stack(name: &str, parts: &[QuantizedLinear]) -> Result<QuantizedLinear, FuseError> {
    let mismatch = |what| FuseError::Mismatch {
        fused: name.to_string(),
        what,
    };
    let first = parts.first().ok_or_else(|| mismatch("count (none)"))?;
    let inp = first.shape[1];
    if parts.iter().any(|p| p.shape[1] != inp) {
        return Err(mismatch("input width"));
    }
    if parts
        .iter()
        .any(|p| p.scheme != first.scheme || p.act_order != first.act_order)
    {
        return Err(mismatch("scheme or act order"));
    }
    if parts.iter().any(|p| p.g_idx != first.g_idx) {
        return Err(mismatch("g_idx (act-order groups)"));
    }
    let out: usize = parts.iter().map(|p| p.shape[0]).sum();
    let codes = stack_codes(parts).ok_or_else(|| mismatch("code layout"))?;
    let scales = stack_rows(parts.iter().map(|p| &p.scales)).ok_or_else(|| mismatch("scales"))?;
    let zero_points = match parts
        .iter()
        .map(|p| p.zero_points.as_ref())
        .collect::<Option<Vec<_>>>()
    {
        Some(zps) => Some(zps.iter().flat_map(|z| z.iter().copied()).collect()),
        None if parts.iter().all(|p| p.zero_points.is_none()) => None,
        None => return Err(mismatch("zero points")),
    };
    // The GPU pipeline leaves the dequantized weights on the device (0 × 0).
    let dequantized = if parts.iter().all(|p| p.dequantized.rows == 0) {
        Matrix {
            rows: 0,
            cols: 0,
            data: Vec::new(),
        }
    } else {
        stack_rows(parts.iter().map(|p| &p.dequantized))
            .ok_or_else(|| mismatch("dequantized weights"))?
    };
    Ok(QuantizedLinear {
        shape: [out, inp],
        scheme: first.scheme,
        act_order: first.act_order,
        codes,
        scales,
        zero_points,
        g_idx: first.g_idx.clone(),
        dequantized,
    })
}

/// Row-major codes stacked: each part's rows (packed rows too, whose words
/// never span two rows) one after the other.
fn stack_codes(parts: &[QuantizedLinear]) -> Option<Codes> {
    match &parts.first()?.codes {
        Codes::Int(_) => parts
            .iter()
            .map(|p| match &p.codes {
                Codes::Int(c) => Some(c.as_slice()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|c| Codes::Int(c.concat())),
        Codes::Fp8(_) => parts
            .iter()
            .map(|p| match &p.codes {
                Codes::Fp8(c) => Some(c.as_slice()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|c| Codes::Fp8(c.concat())),
        Codes::Packed(first) => parts
            .iter()
            .map(|p| match &p.codes {
                Codes::Packed(c) if c.bits == first.bits => Some(c.words.as_slice()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|w| {
                Codes::Packed(PackedCodes {
                    bits: first.bits,
                    words: w.concat(),
                })
            }),
    }
}

/// Matrices of one width stacked by rows.
fn stack_rows<'m>(parts: impl Iterator<Item = &'m Matrix>) -> Option<Matrix> {
    let mut out: Option<Matrix> = None;
    for m in parts {
        match out.as_mut() {
            None => out = Some(m.clone()),
            Some(acc) if acc.cols == m.cols => {
                acc.rows += m.rows;
                acc.data.extend_from_slice(&m.data);
            }
            Some(_) => return None,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{
        ActOrder, FloatDtype, Hessian, IntScheme, QuantizedLinear, gptq, quantize_fp8, rtn,
    };

    /// A deterministic `[rows, cols]` weight with varied magnitudes.
    fn weight(rows: usize, cols: usize, seed: u32) -> Matrix {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        let data = (0..rows * cols)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let unit = (state % 2001) as f32 / 1000.0 - 1.0;
                unit * (1.0 + (i % 7) as f32 * 0.3)
            })
            .collect();
        Matrix { rows, cols, data }
    }

    fn split(w: &Matrix, rows: &[usize]) -> Vec<Matrix> {
        let mut start = 0;
        rows.iter()
            .map(|&r| {
                let data = w.data[start * w.cols..(start + r) * w.cols].to_vec();
                start += r;
                Matrix {
                    rows: r,
                    cols: w.cols,
                    data,
                }
            })
            .collect()
    }

    fn check(fused: &QuantizedLinear, parts: Vec<QuantizedLinear>) {
        let stacked = stack("model.layers.0.self_attn.qkv_proj", &parts).expect("stack");
        assert_eq!(&stacked, fused);
    }

    const INT4: IntScheme = IntScheme {
        bits: 4,
        symmetric: false,
        group_size: Some(8),
        scale_dtype: FloatDtype::F16,
    };

    #[test]
    fn stacking_the_parts_is_quantizing_the_fused_linear() {
        // q, k, v of 16, 8, 8 rows over 32 inputs.
        let rows = [16, 8, 8];
        let w = weight(32, 32, 7);
        let parts = split(&w, &rows);
        // Weight-only schemes: per group and per channel.
        let int8 = IntScheme {
            bits: 8,
            symmetric: true,
            group_size: None,
            ..INT4
        };
        for scheme in [INT4, int8] {
            let fused = rtn("fused", &w, scheme).expect("rtn");
            check(
                &fused,
                parts
                    .iter()
                    .map(|p| rtn("part", p, scheme).expect("rtn"))
                    .collect(),
            );
        }
        let fused = quantize_fp8("fused", &w, FloatDtype::F16).expect("fp8");
        check(
            &fused,
            parts
                .iter()
                .map(|p| quantize_fp8("part", p, FloatDtype::F16).expect("fp8"))
                .collect(),
        );
        // GPTQ with the one Hessian of the shared input, in every column order.
        let mut h = Hessian::new("input", 32);
        h.add_batch(&weight(64, 32, 11)).expect("hessian");
        for order in [ActOrder::None, ActOrder::Static, ActOrder::Group] {
            let fused = gptq("fused", &w, &h, INT4, order, 0.01).expect("gptq");
            check(
                &fused,
                parts
                    .iter()
                    .map(|p| gptq("part", p, &h, INT4, order, 0.01).expect("gptq"))
                    .collect(),
            );
        }
    }

    #[test]
    fn parts_that_disagree_are_not_stacked() {
        let w = weight(8, 16, 3);
        let a = rtn("a", &w, INT4).expect("rtn");
        let b = rtn(
            "b",
            &w,
            IntScheme {
                symmetric: true,
                ..INT4
            },
        )
        .expect("rtn");
        assert!(matches!(
            stack("m", &[a.clone(), b]),
            Err(FuseError::Mismatch { .. })
        ));
        let narrow = rtn("c", &weight(8, 8, 5), INT4).expect("rtn");
        assert!(matches!(
            stack("m", &[a, narrow]),
            Err(FuseError::Mismatch {
                what: "input width",
                ..
            })
        ));
    }

    fn phi3() -> LlamaConfig {
        let json = serde_json::json!({
            "architectures": ["Phi3ForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
        });
        LlamaConfig::from_json(&json.to_string(), "config.json".as_ref()).expect("phi3")
    }

    #[test]
    fn ignoring_part_of_a_fused_linear_is_refused_and_all_of_it_expands() {
        let cfg = phi3();
        let err = driver_ignore(&cfg, &["q_proj".to_string()]).expect_err("partial");
        assert!(matches!(&err, FuseError::Partial { fused, .. }
            if fused == "model.layers.0.self_attn.qkv_proj"));
        assert!(err.to_string().contains("qkv_proj"), "{err}");
        let ignore =
            driver_ignore(&cfg, &["model.layers.1.mlp.gate_up_proj".to_string()]).expect("whole");
        for module in ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] {
            assert!(is_ignored(module, &ignore), "{module}");
        }
        assert!(!is_ignored("model.layers.0.mlp.gate_proj", &ignore));
        // A family without fused Linears keeps its list as it is.
        let mut llama = cfg.clone();
        llama.block.fused_projections = false;
        assert_eq!(
            driver_ignore(&llama, &["q_proj".to_string()]).expect("llama"),
            vec!["q_proj".to_string()]
        );
    }

    #[test]
    fn a_fused_linear_missing_a_quantized_part_is_refused() {
        let cfg = phi3();
        let mut quantized = BTreeMap::new();
        let part = rtn("q", &weight(64, 64, 1), INT4).expect("rtn");
        quantized.insert("model.layers.0.self_attn.q_proj".to_string(), part);
        assert!(matches!(
            fuse_quantized(&cfg, &mut quantized),
            Err(FuseError::Partial { .. })
        ));
    }
}
