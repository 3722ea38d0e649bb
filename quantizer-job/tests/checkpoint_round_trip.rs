//! Writing a compressed-tensors checkpoint and reading it back returns exactly
//! the dequantized weights the quantizers computed, for every storage format,
//! sharded or not, and the config matches llm-compressor's structure.

mod common;

use std::collections::BTreeMap;

use common::{load_all, model_dir, norm_inputs, reference_dir, scratch};
use quantizer_job::format::pack::pack_rows;
use quantizer_job::format::{
    CheckpointOptions, DenseInput, DenseTensor, quantization_config, read_checkpoint,
    write_checkpoint, write_model_config,
};
use quantizer_job::quant::{
    ActOrder, Codes, CpuBackend, FloatDtype, Hessian, IntScheme, Matrix, PackedCodes, QuantBackend,
    QuantizedLinear,
};

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[derive(Clone, Copy, Debug)]
enum Case {
    Rtn(IntScheme),
    GptqGroupOrder(IntScheme),
    Fp8,
}

fn int(bits: u8, symmetric: bool, group_size: Option<usize>) -> IntScheme {
    IntScheme {
        bits,
        symmetric,
        group_size,
        scale_dtype: FloatDtype::F16,
    }
}

/// The Linears of decoder `layers` quantized, everything else dense, as the
/// pipeline would hand it over.
fn build(
    case: Case,
    all: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    layers: &[usize],
) -> (
    BTreeMap<String, DenseTensor>,
    BTreeMap<String, QuantizedLinear>,
) {
    let mut dense = BTreeMap::new();
    let mut quantized = BTreeMap::new();
    for (name, (shape, data)) in all {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let is_target = layers
            .iter()
            .any(|l| module.starts_with(&format!("model.layers.{l}.")))
            && LINEARS.iter().any(|l| module.ends_with(l));
        if !is_target {
            dense.insert(
                name.clone(),
                DenseTensor {
                    shape: shape.clone(),
                    data: data.clone(),
                },
            );
            continue;
        }
        let w = Matrix::new(shape[0], shape[1], data.clone()).expect("weight");
        let q = match case {
            Case::Rtn(s) => CpuBackend.quantize_rtn(module, &w, s),
            Case::Fp8 => CpuBackend.quantize_fp8(module, &w, FloatDtype::F16),
            Case::GptqGroupOrder(s) => {
                // Inputs of the right width: normalised embeddings, cycled for down_proj.
                let x = norm_inputs("model.layers.0.input_layernorm", 256);
                let mut data = Vec::with_capacity(x.rows * w.cols);
                for row in x.data.chunks(x.cols) {
                    data.extend((0..w.cols).map(|c| row[c % x.cols] * (1.0 + (c / x.cols) as f32)));
                }
                let mut h = Hessian::new(module, w.cols);
                h.add_batch(&Matrix::new(x.rows, w.cols, data).expect("inputs"))
                    .expect("hessian");
                CpuBackend.quantize_gptq(module, &w, &h, s, ActOrder::Group, 0.01)
            }
        }
        .expect("quantize");
        quantized.insert(module.to_string(), q);
    }
    (dense, quantized)
}

/// The writer's view of dense tensors given as values.
fn as_inputs(dense: &BTreeMap<String, DenseTensor>) -> BTreeMap<String, DenseInput<'static>> {
    dense
        .iter()
        .map(|(name, t)| (name.clone(), t.clone().into()))
        .collect()
}

fn assert_round_trip(case: Case, max_shard_bytes: usize, expect_format: &str) {
    let all = load_all();
    let (dense, quantized) = build(case, &all, &[0, 1]);
    // One directory per case: tests run in parallel and several share a format.
    let case_name: String = format!("{case:?}")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let dir = scratch(&format!("rt-{case_name}-{max_shard_bytes}-{expect_format}"));
    let options = CheckpointOptions {
        dtype: FloatDtype::F16,
        max_shard_bytes,
    };
    let written = write_checkpoint(&dir, &as_inputs(&dense), &quantized, options).expect("write");
    let qcfg = quantization_config(&quantized, &["lm_head".to_string()]).expect("config");
    assert_eq!(qcfg["format"], expect_format);
    write_model_config(&model_dir(), &dir, &qcfg).expect("config.json");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(dir.join(f).is_file(), "{f} copied");
    }
    if matches!(case, Case::GptqGroupOrder(_)) {
        let bytes = std::fs::read(dir.join("model.safetensors")).expect("read written file");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse written file");
        let g_idx = st
            .tensor("model.layers.0.mlp.gate_proj.weight_g_idx")
            .expect("g_idx written for actorder group");
        assert_eq!(g_idx.shape(), &[384]);
        assert!(
            g_idx
                .data()
                .chunks_exact(4)
                .enumerate()
                .any(|(c, b)| { i32::from_le_bytes([b[0], b[1], b[2], b[3]]) != (c / 128) as i32 }),
            "act-order groups are not the natural ones"
        );
    }
    let back = read_checkpoint(&dir).expect("read back");
    assert_eq!(back.quantization_config.as_ref(), Some(&qcfg));
    assert_eq!(back.quantized_modules.len(), quantized.len());
    for (m, q) in &quantized {
        let from_codes = CpuBackend.dequantize(q).expect("dequantize codes");
        assert!(
            from_codes
                .data
                .iter()
                .zip(&q.dequantized.data)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case:?}: {m} codes dequantize to `dequantized`"
        );
        let t = &back.tensors[&format!("{m}.weight")];
        assert_eq!(t.shape, q.shape.to_vec(), "{m}");
        let same = t
            .data
            .iter()
            .zip(&q.dequantized.data)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{case:?}: {m} reads back bit-identical");
    }
    for (name, t) in &dense {
        assert_eq!(&back.tensors[name], t, "{name} dense round trip");
    }
    assert_eq!(back.tensors.len(), dense.len() + quantized.len());
    println!(
        "{case:?}: {} file(s), {} bytes",
        written.files.len(),
        written.total_bytes
    );
    if max_shard_bytes < written.total_bytes {
        assert!(written.files.len() > 1);
        assert!(dir.join("model.safetensors.index.json").is_file());
    } else {
        assert_eq!(written.files.len(), 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn int4_asymmetric_groups_sharded() {
    assert_round_trip(
        Case::Rtn(int(4, false, Some(128))),
        8 << 20,
        "pack-quantized",
    );
}

#[test]
fn int4_symmetric_channel() {
    assert_round_trip(Case::Rtn(int(4, true, None)), usize::MAX, "pack-quantized");
}

#[test]
fn int8_weight_only() {
    assert_round_trip(Case::Rtn(int(8, true, None)), usize::MAX, "pack-quantized");
}

#[test]
fn int3_and_int2_naive() {
    assert_round_trip(
        Case::Rtn(int(3, false, Some(64))),
        usize::MAX,
        "naive-quantized",
    );
    assert_round_trip(
        Case::Rtn(int(2, true, Some(32))),
        usize::MAX,
        "naive-quantized",
    );
}

#[test]
fn fp8_float_quantized() {
    assert_round_trip(Case::Fp8, usize::MAX, "float-quantized");
}

#[test]
fn gptq_group_act_order_writes_g_idx() {
    assert_round_trip(
        Case::GptqGroupOrder(int(4, false, Some(128))),
        usize::MAX,
        "pack-quantized",
    );
}

#[test]
fn config_matches_reference_structure() {
    let all = load_all();
    let (_, quantized) = build(Case::Rtn(int(4, false, Some(128))), &all, &[0, 1]);
    let mut ours = quantization_config(&quantized, &["lm_head".to_string()]).expect("config");
    // What the reference recipe used: GPTQ with `actorder: static`.
    ours["config_groups"]["group_0"]["weights"]["actorder"] = "static".into();
    let text = std::fs::read_to_string(reference_dir().join("config.json")).expect("config");
    let reference: serde_json::Value = serde_json::from_str(&text).expect("json");
    let theirs = &reference["quantization_config"];
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v.as_object().expect("object").keys().cloned().collect()
    };
    assert_eq!(keys(&ours), keys(theirs));
    let (ow, tw) = (
        &ours["config_groups"]["group_0"]["weights"],
        &theirs["config_groups"]["group_0"]["weights"],
    );
    assert_eq!(keys(ow), keys(tw));
    for k in [
        "actorder",
        "dynamic",
        "group_size",
        "num_bits",
        "strategy",
        "symmetric",
        "type",
        "zp_dtype",
        "scale_dtype",
    ] {
        assert_eq!(ow[k], tw[k], "weights.{k}");
    }
    for k in [
        "format",
        "ignore",
        "quant_method",
        "quantization_status",
        "version",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    assert_eq!(
        ours["config_groups"]["group_0"]["targets"],
        theirs["config_groups"]["group_0"]["targets"]
    );

    // Mixed schemes in one checkpoint are refused, naming both layers.
    let mut mixed = quantized.clone();
    let w = Matrix::new(2, 32, vec![0.5; 64]).expect("weight");
    mixed.insert(
        "model.layers.9.mlp.up_proj".to_string(),
        CpuBackend
            .quantize_fp8("model.layers.9.mlp.up_proj", &w, FloatDtype::F16)
            .expect("fp8"),
    );
    let err = quantization_config(&mixed, &[]).unwrap_err().to_string();
    assert!(err.contains("layers.9.mlp.up_proj"), "{err}");
}

/// The whole model at W4A16_ASYM g128 has exactly the reference checkpoint's
/// tensors: same names, dtypes and shapes, so the same loaders read it.
#[test]
fn full_model_layout_matches_reference() {
    let all = load_all();
    let (dense, quantized) = build(
        Case::Rtn(int(4, false, Some(128))),
        &all,
        &[0, 1, 2, 3, 4, 5],
    );
    let dir = scratch("layout");
    write_checkpoint(
        &dir,
        &as_inputs(&dense),
        &quantized,
        CheckpointOptions::default(),
    )
    .expect("write");
    let layout = |path: std::path::PathBuf| -> BTreeMap<String, (String, Vec<usize>)> {
        let bytes = std::fs::read(&path).expect("read checkpoint");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse checkpoint");
        st.tensors()
            .into_iter()
            .map(|(n, t)| (n, (format!("{:?}", t.dtype()), t.shape().to_vec())))
            .collect()
    };
    let ours = layout(dir.join("model.safetensors"));
    let theirs = layout(reference_dir().join("model.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    for (name, meta) in &theirs {
        assert_eq!(ours.get(name), Some(meta), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dense bytes already in the checkpoint's dtype are written as they are;
/// bytes of another dtype are converted to it, rounding to nearest even.
#[test]
fn stored_dense_bytes_are_copied_or_converted() {
    let halves: Vec<u8> = [1.5f32, -2.0, 0.1]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let singles: Vec<u8> = [0.1f32, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let dense = BTreeMap::from([
        (
            "as.stored".to_string(),
            DenseInput::Stored {
                dtype: safetensors::Dtype::BF16,
                shape: vec![3],
                bytes: &halves,
            },
        ),
        (
            "converted".to_string(),
            DenseInput::Stored {
                dtype: safetensors::Dtype::F32,
                shape: vec![2],
                bytes: &singles,
            },
        ),
    ]);
    let dir = scratch("stored-dense");
    let options = CheckpointOptions {
        dtype: FloatDtype::Bf16,
        ..CheckpointOptions::default()
    };
    write_checkpoint(&dir, &dense, &BTreeMap::new(), options).expect("write");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read checkpoint");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse checkpoint");
    let stored = st.tensor("as.stored").expect("as.stored");
    assert_eq!(stored.dtype(), safetensors::Dtype::BF16);
    assert_eq!(stored.data(), &halves[..]);
    let converted = st.tensor("converted").expect("converted");
    assert_eq!(converted.dtype(), safetensors::Dtype::BF16);
    let expected: Vec<u8> = [0.1f32, 3.0]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    assert_eq!(converted.data(), &expected[..]);
}

/// What the GPU hands over (codes packed on the device) is written byte for
/// byte as what the CPU hands over (codes one per byte, packed by the writer);
/// packed codes that do not match the scheme or the shape are refused.
#[test]
fn packed_codes_are_written_as_the_writer_packs_them() {
    let all = load_all();
    for scheme in [int(4, false, Some(32)), int(8, true, None)] {
        let (dense, unpacked) = build(Case::Rtn(scheme), &all, &[0]);
        let packed: BTreeMap<String, QuantizedLinear> = unpacked
            .iter()
            .map(|(name, q)| {
                let Codes::Int(codes) = &q.codes else {
                    panic!("the CPU keeps codes unpacked")
                };
                let words = pack_rows(codes, q.shape[0], q.shape[1], scheme.bits)
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect();
                let codes = Codes::Packed(PackedCodes {
                    bits: scheme.bits,
                    words,
                });
                (name.clone(), QuantizedLinear { codes, ..q.clone() })
            })
            .collect();
        let written = |quantized: &BTreeMap<String, QuantizedLinear>, label: &str| {
            let dir = scratch(&format!("packed-{}-{label}", scheme.bits));
            write_checkpoint(
                &dir,
                &as_inputs(&dense),
                quantized,
                CheckpointOptions::default(),
            )
            .expect("write");
            let bytes = std::fs::read(dir.join("model.safetensors")).expect("read checkpoint");
            let _ = std::fs::remove_dir_all(&dir);
            bytes
        };
        assert!(
            written(&unpacked, "cpu") == written(&packed, "gpu"),
            "{scheme:?}: packed and unpacked codes write the same file"
        );

        let (name, q) = packed.iter().next().expect("a quantized Linear");
        let Codes::Packed(p) = &q.codes else {
            unreachable!()
        };
        let other_bits = Codes::Packed(PackedCodes {
            bits: 12 - scheme.bits,
            words: p.words.clone(),
        });
        let short = Codes::Packed(PackedCodes {
            bits: scheme.bits,
            words: p.words[4..].to_vec(),
        });
        for (codes, expected) in [
            (other_bits, "do not match scheme"),
            (short, "weight_packed"),
        ] {
            let bad = BTreeMap::from([(name.clone(), QuantizedLinear { codes, ..q.clone() })]);
            let dir = scratch(&format!("packed-bad-{}", scheme.bits));
            let err = write_checkpoint(&dir, &BTreeMap::new(), &bad, CheckpointOptions::default())
                .expect_err("refused");
            let _ = std::fs::remove_dir_all(&dir);
            assert!(err.to_string().contains(name), "{err}");
            assert!(err.to_string().contains(expected), "{err}");
        }
        // Unpacked on demand, the words are the CPU's codes again.
        let cpu = &unpacked[name];
        assert_eq!(q.codes_differing(cpu), Some(0));
        assert_eq!(
            q.dequantize_codes().expect("dequantize packed"),
            cpu.dequantize_codes().expect("dequantize unpacked")
        );
    }
}
