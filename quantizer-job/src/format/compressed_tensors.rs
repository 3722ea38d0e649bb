//! The compressed-tensors checkpoint writer: `model*.safetensors` in the layout
//! vLLM and transformers load, and the `quantization_config` block of `config.json`.
//!
//! Per quantized Linear `{name}` (module name, e.g. `model.layers.0.mlp.gate_proj`):
//!
//! | scheme | format | tensors |
//! | --- | --- | --- |
//! | int 4/8 bit | `pack-quantized` | `weight_packed` I32 `[out, in/pf]`, `weight_scale` `[out, groups]`, `weight_shape` I64 `[2]`, `weight_zero_point` I32 `[out/pf, groups]` (asymmetric only), `weight_g_idx` I32 `[in]` (`actorder: group` only) |
//! | int 2/3 bit | `naive-quantized` | `weight` I8 `[out, in]`, `weight_scale`, `weight_zero_point` I8 `[out, groups]` (asymmetric only) |
//! | FP8 E4M3 | `float-quantized` | `weight` F8_E4M3 `[out, in]`, `weight_scale` `[out, 1]` |
//!
//! Weight-only INT8 is written `pack-quantized` with `num_bits: 8` (four codes per
//! int32): that is the format llm-compressor infers for its W8A16 preset (weight-only
//! int with 4 or 8 bits → `pack-quantized`), and vLLM serves it with the same WNA16
//! kernels as W4A16 (`int-quantized` is the W8A8 format, whose loader expects
//! quantized activations too). Scales are stored in the model's dtype
//! (`scale_dtype: null`), which is why the quantizers round scales to it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};
use tracing::info;

use super::FormatError;
use super::pack::{pack_cols, pack_factor, pack_rows, packs};
use super::tensors::{DenseInput, bytes_to_floats, float_dtype, floats_to_bytes, i32_bytes};
use crate::quant::{ActOrder, Codes, FloatDtype, QuantizedLinear, WeightScheme};

/// The compressed-tensors version whose layout we write (that of the reference).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.19.0";
/// Tokenizer and generation files copied next to the weights when present.
pub const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
];

/// How the checkpoint is written.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointOptions {
    /// Dtype of the unquantized tensors and of the scales (the model's dtype).
    pub dtype: FloatDtype,
    /// Shards are cut before exceeding this many tensor bytes; one file below it.
    pub max_shard_bytes: usize,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        Self {
            dtype: FloatDtype::F16,
            max_shard_bytes: 5 << 30,
        }
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct WrittenCheckpoint {
    /// The safetensors files, in shard order.
    pub files: Vec<PathBuf>,
    /// Sum of the tensors' byte sizes.
    pub total_bytes: usize,
}

/// One tensor as it goes into the file: bytes the caller already holds are
/// borrowed, not copied.
struct Stored<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

/// The compressed-tensors `format` of a scheme.
pub fn format_name(scheme: &WeightScheme) -> &'static str {
    match scheme {
        WeightScheme::Int(s) if matches!(s.bits, 4 | 8) => "pack-quantized",
        WeightScheme::Int(_) => "naive-quantized",
        WeightScheme::Fp8 { .. } => "float-quantized",
    }
}

fn linear_tensors<'q>(
    name: &str,
    q: &'q QuantizedLinear,
    dtype: FloatDtype,
) -> Result<Vec<(String, Stored<'q>)>, FormatError> {
    let [out, inp] = q.shape;
    let groups = q.scales.cols;
    if q.scales.rows != out {
        return Err(FormatError::Shape {
            name: format!("{name}.weight_scale"),
            expected: format!("[{out}, groups]"),
            got: vec![q.scales.rows, q.scales.cols],
        });
    }
    let mut t = vec![(
        format!("{name}.weight_scale"),
        Stored {
            dtype: float_dtype(dtype),
            shape: vec![out, groups],
            bytes: Cow::Owned(floats_to_bytes(&q.scales.data, dtype)),
        },
    )];
    match (&q.scheme, &q.codes) {
        (WeightScheme::Fp8 { .. }, Codes::Fp8(codes)) => t.push((
            format!("{name}.weight"),
            Stored {
                dtype: Dtype::F8_E4M3,
                shape: vec![out, inp],
                bytes: Cow::Borrowed(codes),
            },
        )),
        (WeightScheme::Int(s), codes @ (Codes::Int(_) | Codes::Packed(_))) => {
            let packed = packs(s.bits);
            if packed {
                let words: Cow<'q, [u8]> = match codes {
                    Codes::Int(codes) => Cow::Owned(i32_bytes(&pack_rows(codes, out, inp, s.bits))),
                    Codes::Packed(p) if p.bits == s.bits => Cow::Borrowed(&p.words),
                    _ => return Err(codes_mismatch(name, s)),
                };
                let row_words = inp.div_ceil(pack_factor(s.bits));
                if words.len() != 4 * out * row_words {
                    return Err(FormatError::Shape {
                        name: format!("{name}.weight_packed"),
                        expected: format!("[{out}, {row_words}] int32 words"),
                        got: vec![words.len() / 4],
                    });
                }
                t.push((
                    format!("{name}.weight_packed"),
                    Stored {
                        dtype: Dtype::I32,
                        shape: vec![out, row_words],
                        bytes: words,
                    },
                ));
                t.push((
                    format!("{name}.weight_shape"),
                    Stored {
                        dtype: Dtype::I64,
                        shape: vec![2],
                        bytes: Cow::Owned(
                            [out as i64, inp as i64]
                                .iter()
                                .flat_map(|v| v.to_le_bytes())
                                .collect(),
                        ),
                    },
                ));
            } else {
                let Codes::Int(codes) = codes else {
                    return Err(codes_mismatch(name, s));
                };
                t.push((
                    format!("{name}.weight"),
                    Stored {
                        dtype: Dtype::I8,
                        shape: vec![out, inp],
                        bytes: Cow::Owned(codes.iter().map(|v| *v as u8).collect()),
                    },
                ));
            }
            if let Some(zp) = &q.zero_points {
                let stored = if packed {
                    let words = pack_cols(zp, out, groups, s.bits);
                    Stored {
                        dtype: Dtype::I32,
                        shape: vec![words.len() / groups.max(1), groups],
                        bytes: Cow::Owned(i32_bytes(&words)),
                    }
                } else {
                    Stored {
                        dtype: Dtype::I8,
                        shape: vec![out, groups],
                        bytes: Cow::Owned(zp.iter().map(|v| *v as u8).collect()),
                    }
                };
                t.push((format!("{name}.weight_zero_point"), stored));
            }
            if let Some(g_idx) = &q.g_idx {
                t.push((
                    format!("{name}.weight_g_idx"),
                    Stored {
                        dtype: Dtype::I32,
                        shape: vec![inp],
                        bytes: Cow::Owned(i32_bytes(g_idx)),
                    },
                ));
            }
        }
        (scheme, _) => return Err(codes_mismatch(name, scheme)),
    }
    Ok(t)
}

fn codes_mismatch(name: &str, scheme: &impl std::fmt::Debug) -> FormatError {
    FormatError::Unsupported(format!("{name}: codes do not match scheme {scheme:?}"))
}

/// A dense tensor in the checkpoint's dtype: stored bytes of that dtype as
/// they are, anything else rounded to it.
fn dense_stored<'a>(
    name: &str,
    t: &'a DenseInput<'_>,
    dtype: FloatDtype,
) -> Result<Stored<'a>, FormatError> {
    let (shape, bytes) = match t {
        DenseInput::Values(t) => {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(FormatError::Shape {
                    name: name.to_string(),
                    expected: format!("{} values", t.data.len()),
                    got: t.shape.clone(),
                });
            }
            (&t.shape, Cow::Owned(floats_to_bytes(&t.data, dtype)))
        }
        DenseInput::Stored {
            dtype: stored,
            shape,
            bytes,
        } if *stored == float_dtype(dtype) => (shape, Cow::Borrowed(*bytes)),
        DenseInput::Stored {
            dtype: stored,
            shape,
            bytes,
        } => {
            let values = bytes_to_floats(name, *stored, bytes)?;
            (shape, Cow::Owned(floats_to_bytes(&values, dtype)))
        }
    };
    Ok(Stored {
        dtype: float_dtype(dtype),
        shape: shape.clone(),
        bytes,
    })
}

/// Writes one safetensors file of the named tensors.
fn write_shard(
    path: &Path,
    names: &[&String],
    all: &BTreeMap<String, Stored>,
) -> Result<PathBuf, FormatError> {
    let safetensors_error = |source| FormatError::SafeTensors {
        path: path.to_path_buf(),
        source,
    };
    let views = names
        .iter()
        .map(|name| {
            let s = &all[*name];
            TensorView::new(s.dtype, s.shape.clone(), &s.bytes)
                .map(|view| ((*name).clone(), view))
                .map_err(safetensors_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(safetensors_error)?;
    Ok(path.to_path_buf())
}

/// Writes `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards and
/// `model.safetensors.index.json` above `max_shard_bytes`) into `dir`.
///
/// `dense` maps full tensor names (`model.norm.weight`) to unquantized tensors,
/// stored in `options.dtype`; `quantized` maps Linear *module* names
/// (`model.layers.0.self_attn.q_proj`, without `.weight`) to their quantization.
pub fn write_checkpoint(
    dir: &Path,
    dense: &BTreeMap<String, DenseInput<'_>>,
    quantized: &BTreeMap<String, QuantizedLinear>,
    options: CheckpointOptions,
) -> Result<WrittenCheckpoint, FormatError> {
    fs::create_dir_all(dir).map_err(FormatError::io(dir))?;
    let mut all: BTreeMap<String, Stored> = BTreeMap::new();
    for (name, t) in dense {
        all.insert(name.clone(), dense_stored(name, t, options.dtype)?);
    }
    for (name, q) in quantized {
        for (tname, stored) in linear_tensors(name, q, options.dtype)? {
            if all.insert(tname.clone(), stored).is_some() {
                return Err(FormatError::Unsupported(format!(
                    "tensor {tname} given both dense and quantized"
                )));
            }
        }
    }

    // Greedy sharding in name order.
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0usize;
    for (name, s) in &all {
        let len = s.bytes.len();
        if size > 0 && size + len > options.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(name);
        }
        size += len;
    }
    let total_bytes: usize = all.values().map(|s| s.bytes.len()).sum();
    let n = shards.len();
    let file_names: Vec<String> = (0..n)
        .map(|i| {
            if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            }
        })
        .collect();
    let weight_map: BTreeMap<&String, &String> = shards
        .iter()
        .zip(&file_names)
        .flat_map(|(names, file)| names.iter().map(move |name| (*name, file)))
        .collect();
    // Shards are written side by side: a large model's artifact is tens of
    // gigabytes, and one writer thread was most of the stage's time.
    let files = shards
        .par_iter()
        .zip(&file_names)
        .map(|(names, file)| write_shard(&dir.join(file), names, &all))
        .collect::<Result<Vec<_>, _>>()?;
    if n > 1 {
        let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| FormatError::Json {
            path: path.clone(),
            source: e,
        })?;
        fs::write(&path, text).map_err(FormatError::io(&path))?;
    }
    info!(dir = %dir.display(), shards = n, total_bytes, "wrote compressed-tensors checkpoint");
    Ok(WrittenCheckpoint { files, total_bytes })
}

/// The `quantization_config` block for `config.json`, with the reference's keys.
///
/// All quantized Linears must share one scheme (one config group targeting
/// `Linear`); every Linear not named by a suffix in `ignore` must be quantized,
/// since loaders apply the group to all Linears not ignored.
pub fn quantization_config(
    quantized: &BTreeMap<String, QuantizedLinear>,
    ignore: &[String],
) -> Result<Value, FormatError> {
    let mut iter = quantized.iter();
    let Some((first_name, first)) = iter.next() else {
        return Err(FormatError::Unsupported(
            "no quantized Linear to describe".to_string(),
        ));
    };
    let key = |q: &QuantizedLinear| (q.scheme, q.act_order);
    if let Some((name, q)) = iter.find(|(_, q)| key(q) != key(first)) {
        return Err(FormatError::Unsupported(format!(
            "mixed schemes in one checkpoint: {first_name} is {:?}/{:?}, {name} is {:?}/{:?}",
            first.scheme, first.act_order, q.scheme, q.act_order
        )));
    }
    let format = format_name(&first.scheme);
    let weights = match first.scheme {
        WeightScheme::Int(s) => json!({
            // compressed-tensors accepts `actorder` only with the group strategy;
            // per channel the processing order leaves no trace in the checkpoint.
            "actorder": s.group_size.and(first.act_order.config_value()),
            "block_structure": null,
            "dynamic": false,
            "group_size": s.group_size,
            "num_bits": s.bits,
            "observer": "minmax",
            "observer_kwargs": {},
            "scale_dtype": null,
            "strategy": if s.group_size.is_some() { "group" } else { "channel" },
            "symmetric": s.symmetric,
            "type": "int",
            "zp_dtype": if s.symmetric { Value::Null } else { json!("torch.int8") },
        }),
        WeightScheme::Fp8 { .. } => json!({
            "actorder": null,
            "block_structure": null,
            "dynamic": false,
            "group_size": null,
            "num_bits": 8,
            "observer": "minmax",
            "observer_kwargs": {},
            "scale_dtype": null,
            "strategy": "channel",
            "symmetric": true,
            "type": "float",
            "zp_dtype": null,
        }),
    };
    debug_assert!(matches!(first.act_order, ActOrder::None) || format != "float-quantized");
    Ok(json!({
        "config_groups": {
            "group_0": {
                "format": format,
                "input_activations": null,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": format,
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }))
}

/// Writes `dst/config.json` = `src/config.json` with `quantization_config`
/// set, and copies the tokenizer and generation files of [`SIDE_FILES`] present in `src`.
pub fn write_model_config(src: &Path, dst: &Path, quantization: &Value) -> Result<(), FormatError> {
    fs::create_dir_all(dst).map_err(FormatError::io(dst))?;
    let src_cfg = src.join("config.json");
    let text = fs::read_to_string(&src_cfg).map_err(FormatError::io(&src_cfg))?;
    let mut cfg: Value = serde_json::from_str(&text).map_err(|e| FormatError::Json {
        path: src_cfg.clone(),
        source: e,
    })?;
    let Some(obj) = cfg.as_object_mut() else {
        return Err(FormatError::Config {
            path: src_cfg,
            field: "(root)".to_string(),
            expected: "a JSON object".to_string(),
        });
    };
    obj.insert("quantization_config".to_string(), quantization.clone());
    let dst_cfg = dst.join("config.json");
    let out = serde_json::to_string_pretty(&cfg).map_err(|e| FormatError::Json {
        path: dst_cfg.clone(),
        source: e,
    })?;
    fs::write(&dst_cfg, out).map_err(FormatError::io(&dst_cfg))?;
    for f in SIDE_FILES {
        let from = src.join(f);
        if from.is_file() {
            fs::copy(&from, dst.join(f)).map_err(FormatError::io(&from))?;
        }
    }
    Ok(())
}
