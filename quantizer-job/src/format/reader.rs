//! Reads a compressed-tensors checkpoint directory (ours or llm-compressor's)
//! back into dense f32 tensors: every quantized Linear `{name}` becomes
//! `{name}.weight` `[out, in]`, dequantized as `(q − zp) · scale` (integer) or
//! `fp8(q) · scale` (FP8) in f32 with the same operations the quantizers use, so
//! our own checkpoints read back bit-identical to `QuantizedLinear::dequantized`.
//! Used by the validate stage and the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::FormatError;
use super::pack::{unpack_cols, unpack_row_bytes};
use super::tensors::{DenseTensor, bytes_to_floats, bytes_to_ints};
use crate::quant::e4m3_to_f32;

/// A checkpoint read back: all tensors dense, plus which Linears were quantized.
#[derive(Clone, Debug, Default)]
pub struct LoadedCheckpoint {
    /// Full tensor names → f32 data (`{module}.weight` for quantized Linears).
    pub tensors: BTreeMap<String, DenseTensor>,
    /// Module names of the Linears that were stored quantized.
    pub quantized_modules: BTreeSet<String>,
    /// `quantization_config`, when config.json has one.
    pub quantization_config: Option<Value>,
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// The weight arguments of the (single) config group.
struct WeightArgs {
    num_bits: u8,
    group_size: Option<usize>,
}

fn weight_args(cfg: &Value, path: &Path) -> Result<WeightArgs, FormatError> {
    let bad = |field: &str, expected: &str| FormatError::Config {
        path: path.to_path_buf(),
        field: format!("quantization_config.{field}"),
        expected: expected.to_string(),
    };
    let groups = cfg
        .get("config_groups")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("config_groups", "an object of config groups"))?;
    let mut found: Option<(u64, Option<u64>)> = None;
    for (gname, g) in groups {
        let w = g.get("weights").ok_or_else(|| {
            bad(
                &format!("config_groups.{gname}.weights"),
                "weight arguments",
            )
        })?;
        let bits = w.get("num_bits").and_then(Value::as_u64).ok_or_else(|| {
            bad(
                &format!("config_groups.{gname}.weights.num_bits"),
                "an integer",
            )
        })?;
        let gs = w.get("group_size").and_then(Value::as_u64);
        if found.is_some_and(|f| f != (bits, gs)) {
            return Err(FormatError::Unsupported(format!(
                "{}: config groups with different weight arguments",
                path.display()
            )));
        }
        found = Some((bits, gs));
    }
    let (bits, gs) = found.ok_or_else(|| bad("config_groups", "at least one group"))?;
    Ok(WeightArgs {
        num_bits: u8::try_from(bits)
            .ok()
            .filter(|b| (1..=8).contains(b))
            .ok_or_else(|| bad("weights.num_bits", "1..=8"))?,
        group_size: gs.map(|g| g as usize).filter(|g| *g > 0),
    })
}

fn load_file(path: &Path, into: &mut BTreeMap<String, Raw>) -> Result<(), FormatError> {
    let bytes = fs::read(path).map_err(FormatError::io(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| FormatError::SafeTensors {
        path: path.to_path_buf(),
        source: e,
    })?;
    for (name, view) in st.tensors() {
        into.insert(
            name,
            Raw {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            },
        );
    }
    Ok(())
}

fn take<'a>(
    raw: &'a BTreeMap<String, Raw>,
    name: &str,
    needed_by: &str,
) -> Result<&'a Raw, FormatError> {
    raw.get(name).ok_or_else(|| FormatError::MissingTensor {
        name: name.to_string(),
        needed_by: needed_by.to_string(),
    })
}

/// Reads the checkpoint in `dir` (single `model.safetensors` or sharded with
/// `model.safetensors.index.json`).
pub fn read_checkpoint(dir: &Path) -> Result<LoadedCheckpoint, FormatError> {
    let cfg_path = dir.join("config.json");
    let quantization_config = if cfg_path.is_file() {
        let text = fs::read_to_string(&cfg_path).map_err(FormatError::io(&cfg_path))?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| FormatError::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        cfg.get("quantization_config").cloned()
    } else {
        None
    };

    let mut raw = BTreeMap::new();
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = fs::read_to_string(&index).map_err(FormatError::io(&index))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| FormatError::Json {
            path: index.clone(),
            source: e,
        })?;
        let files: BTreeSet<String> = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| FormatError::Config {
                path: index.clone(),
                field: "weight_map".to_string(),
                expected: "an object of tensor name → file".to_string(),
            })?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        for f in files {
            load_file(&dir.join(f), &mut raw)?;
        }
    } else {
        load_file(&dir.join("model.safetensors"), &mut raw)?;
    }

    let args = quantization_config
        .as_ref()
        .map(|q| weight_args(q, &cfg_path))
        .transpose()?;
    let mut out = LoadedCheckpoint {
        quantization_config,
        ..Default::default()
    };
    let mut consumed = BTreeSet::new();
    let modules: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".weight_scale").map(str::to_string))
        .collect();
    for m in &modules {
        let Some(args) = &args else {
            return Err(FormatError::Config {
                path: cfg_path.clone(),
                field: "quantization_config".to_string(),
                expected: format!("present, since {m}.weight_scale is stored"),
            });
        };
        let w = dequantize_module(&raw, m, args, &mut consumed)?;
        out.tensors.insert(format!("{m}.weight"), w);
        out.quantized_modules.insert(m.clone());
    }
    for (name, r) in &raw {
        if consumed.contains(name) {
            continue;
        }
        out.tensors.insert(
            name.clone(),
            DenseTensor {
                shape: r.shape.clone(),
                data: bytes_to_floats(name, r.dtype, &r.bytes)?,
            },
        );
    }
    Ok(out)
}

fn dequantize_module(
    raw: &BTreeMap<String, Raw>,
    m: &str,
    args: &WeightArgs,
    consumed: &mut BTreeSet<String>,
) -> Result<DenseTensor, FormatError> {
    let scale_name = format!("{m}.weight_scale");
    let s = take(raw, &scale_name, m)?;
    let scales = bytes_to_floats(&scale_name, s.dtype, &s.bytes)?;
    consumed.insert(scale_name.clone());
    let packed_name = format!("{m}.weight_packed");
    let weight_name = format!("{m}.weight");
    let bits = args.num_bits;

    // FP8: `weight` F8_E4M3 + per-channel scale.
    if let Some(w) = raw.get(&weight_name).filter(|w| w.dtype == Dtype::F8_E4M3) {
        let [out, inp] = shape2(&weight_name, &w.shape)?;
        check_shape(&scale_name, &s.shape, &[out, 1])?;
        consumed.insert(weight_name);
        let data = (0..out * inp)
            .map(|k| e4m3_to_f32(w.bytes[k]) * scales[k / inp])
            .collect();
        return Ok(DenseTensor {
            shape: vec![out, inp],
            data,
        });
    }

    // Integer codes: packed int32 or naive int8.
    let packed = raw.contains_key(&packed_name);
    let (out, inp, codes) = if let Some(p) = raw.get(&packed_name) {
        let shape_name = format!("{m}.weight_shape");
        let sh = take(raw, &shape_name, m)?;
        let dims = bytes_to_ints(&shape_name, sh.dtype, &sh.bytes)?;
        let [out, inp] = match dims.as_slice() {
            [o, i] if *o >= 0 && *i >= 0 => [*o as usize, *i as usize],
            _ => {
                return Err(FormatError::Shape {
                    name: shape_name,
                    expected: "two non-negative dims".to_string(),
                    got: dims.iter().map(|d| *d as usize).collect(),
                });
            }
        };
        if p.dtype != Dtype::I32 {
            return Err(FormatError::Dtype {
                name: packed_name,
                expected: "I32".to_string(),
                got: format!("{:?}", p.dtype),
            });
        }
        check_shape(
            &packed_name,
            &p.shape,
            &[out, inp.div_ceil(32 / usize::from(bits))],
        )?;
        consumed.insert(packed_name);
        consumed.insert(shape_name);
        (out, inp, unpack_row_bytes(&p.bytes, out, inp, bits))
    } else {
        let w = take(raw, &weight_name, m)?;
        if w.dtype != Dtype::I8 {
            return Err(FormatError::Dtype {
                name: weight_name,
                expected: "I8 (naive-quantized) or F8_E4M3 (float-quantized)".to_string(),
                got: format!("{:?}", w.dtype),
            });
        }
        let [out, inp] = shape2(&weight_name, &w.shape)?;
        consumed.insert(weight_name);
        (out, inp, w.bytes.iter().map(|b| *b as i8).collect())
    };

    let groups = s.shape.get(1).copied().unwrap_or(1).max(1);
    check_shape(&scale_name, &s.shape, &[out, groups])?;
    let group_size = args.group_size.unwrap_or(inp).max(1);
    let zp_name = format!("{m}.weight_zero_point");
    let zeros: Vec<i8> = match raw.get(&zp_name) {
        Some(z) if packed => {
            if z.dtype != Dtype::I32 {
                return Err(FormatError::Dtype {
                    name: zp_name,
                    expected: "I32 (packed along the output dimension)".to_string(),
                    got: format!("{:?}", z.dtype),
                });
            }
            let words: Vec<i32> = z
                .bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            check_shape(
                &zp_name,
                &z.shape,
                &[out.div_ceil(32 / usize::from(bits)), groups],
            )?;
            unpack_cols(&words, out, groups, bits)
        }
        Some(z) => {
            check_shape(&zp_name, &z.shape, &[out, groups])?;
            bytes_to_ints(&zp_name, z.dtype, &z.bytes)?
                .into_iter()
                .map(|v| v as i8)
                .collect()
        }
        None => vec![0; out * groups],
    };
    consumed.insert(zp_name);
    let gidx_name = format!("{m}.weight_g_idx");
    let g_idx: Option<Vec<usize>> = match raw.get(&gidx_name) {
        Some(g) => {
            let v = bytes_to_ints(&gidx_name, g.dtype, &g.bytes)?;
            if v.len() != inp || v.iter().any(|x| *x < 0 || *x as usize >= groups) {
                return Err(FormatError::Shape {
                    name: gidx_name,
                    expected: format!("[{inp}] with values < {groups}"),
                    got: g.shape.clone(),
                });
            }
            consumed.insert(gidx_name);
            Some(v.into_iter().map(|x| x as usize).collect())
        }
        None => None,
    };
    let mut data = vec![0.0f32; out * inp];
    for r in 0..out {
        for c in 0..inp {
            let g = match &g_idx {
                Some(idx) => idx[c],
                None => (c / group_size).min(groups - 1),
            };
            let k = r * groups + g;
            data[r * inp + c] =
                (i32::from(codes[r * inp + c]) - i32::from(zeros[k])) as f32 * scales[k];
        }
    }
    Ok(DenseTensor {
        shape: vec![out, inp],
        data,
    })
}

fn shape2(name: &str, shape: &[usize]) -> Result<[usize; 2], FormatError> {
    match shape {
        [o, i] => Ok([*o, *i]),
        _ => Err(FormatError::Shape {
            name: name.to_string(),
            expected: "[out, in]".to_string(),
            got: shape.to_vec(),
        }),
    }
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<(), FormatError> {
    if got != want {
        return Err(FormatError::Shape {
            name: name.to_string(),
            expected: format!("{want:?}"),
            got: got.to_vec(),
        });
    }
    Ok(())
}
