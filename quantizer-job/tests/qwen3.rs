//! Qwen3's per-head q/k norms through everything the worker does to a model
//! besides the forward (which `families.rs` checks against transformers):
//! refusing a checkpoint without them, and every method through the real
//! quantize stage, the compressed-tensors writer and the artifact reader,
//! on the CPU and (where a GPU is usable) on the GPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use quantizer_job::family::HeadNorm;
use quantizer_job::gpu::{DeviceChoice, Gpu};
use quantizer_job::layout::{Layout, Links};
use quantizer_job::llama_layers::LlamaLayers;
use quantizer_job::quant::{CpuBackend, FloatDtype, WeightScheme};
use quantizer_job::sequential::quantize_model;
use quantizer_job::serve::LoadedModel;
use quantizer_job::stages::{self, Stage, StageInput};
use quantizer_job::{Checkpoint, CheckpointError, LlamaModel, ModelError};
use quantops_api::spec_file::parse_quantized_model;
use safetensors::SafeTensors;

/// The fixture (see `families.rs`; `QUANTOPS_FAMILY_FIXTURES` overrides the
/// directory on a machine that runs a binary built elsewhere).
fn fixture() -> PathBuf {
    std::env::var_os("QUANTOPS_FAMILY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families"))
        .join("qwen3")
}

/// transformers' token ids and logits for the fixture.
fn reference() -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("parse reference");
    let ids = st
        .tensor("input_ids")
        .expect("input_ids")
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect();
    let logits = st
        .tensor("logits")
        .expect("logits")
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    (ids, logits)
}

fn logits(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    let tokens = model.token_tensor(&[ids.to_vec()]).expect("tokens");
    model
        .forward(&tokens)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Copies the fixture into `dir`, writing its weights without `drop`.
fn copy_without(dir: &Path, drop: &str) {
    for file in ["config.json", "reference.safetensors"] {
        std::fs::copy(fixture().join(file), dir.join(file)).expect("copy");
    }
    let bytes = std::fs::read(fixture().join("model.safetensors")).expect("weights");
    let st = SafeTensors::deserialize(&bytes).expect("parse weights");
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "{drop} is in the fixture");
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).expect("write");
}

#[test]
fn missing_q_norm_is_refused_naming_the_tensor() {
    let q_norm = HeadNorm::Query.weight_name(1);
    let dir = tempfile::tempdir().expect("tempdir");
    copy_without(dir.path(), &q_norm);
    let err = Checkpoint::open(dir.path()).expect_err("no q_norm in layer 1");
    assert!(
        matches!(&err, CheckpointError::MissingTensor { name, .. } if *name == q_norm),
        "{err:?}"
    );
    assert!(err.to_string().contains(&q_norm), "{err}");

    // A weight source without it (what an artifact reader hands over) is
    // refused the same way, for the key norm too.
    let checkpoint = Checkpoint::open(&fixture()).expect("fixture");
    for norm in HeadNorm::ALL {
        let mut tensors: HashMap<String, Tensor> = checkpoint.load_all_f32().expect("tensors");
        let name = norm.weight_name(0);
        assert!(tensors.remove(&name).is_some(), "{name} is expected");
        let err = LlamaModel::from_tensors(checkpoint.config().clone(), tensors)
            .expect_err("refused without the norm");
        assert!(
            matches!(&err, ModelError::MissingTensor { name: n } if *n == name),
            "{err:?}"
        );
    }
}

/// A word-level tokenizer over the fixture's 256 ids: the stages load one,
/// and the fixture (like transformers' tiny test models) has none.
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..256).map(|i| (format!("t{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).expect("tokenizer");
}

/// A model volume holding the fixture (with a tokenizer) and a calibration
/// token file of 8 sequences of 40 ids.
fn volume() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("qwen3");
    std::fs::create_dir_all(&model).expect("model dir");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(file), model.join(file)).expect("copy");
    }
    write_tokenizer(&model);
    let mut state = 0x2545_f491_u32;
    let rows: Vec<Vec<u32>> = (0..8)
        .map(|_| {
            (0..40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state % 256
                })
                .collect()
        })
        .collect();
    let calibration = serde_json::json!({ "input_ids": rows });
    std::fs::write(
        root.path().join("calibration.json"),
        calibration.to_string(),
    )
    .expect("calibration");
    root
}

/// Runs the quantize stage on the volume's fixture and returns the artifact.
fn quantize(
    volume: &Path,
    method: &str,
    bits: u8,
    group: i32,
    gpu: Option<&Gpu>,
    out: &str,
) -> (PathBuf, quantops_api::QuantizationSpec) {
    let yaml = format!(
        r#"apiVersion: quantops.dev/v1alpha1
kind: QuantizedModel
metadata: {{ name: qwen3-test }}
spec:
  baseModel: {{ name: test/qwen3, path: qwen3 }}
  version: v1
  quantization: {{ method: {method}, bits: {bits}, groupSize: {group}, symmetric: false, ignore: [lm_head] }}
  calibration: {{ path: calibration.json, samples: 8, sequenceLength: 40, seed: 1 }}
  output: {{ path: {out} }}
"#
    );
    let qm = parse_quantized_model(&yaml, method).expect("valid spec");
    let layout = Layout::new(&qm.spec, volume, None, Links::Confined).expect("layout");
    let input = StageInput {
        spec: &qm.spec,
        layout: &layout,
        gpu,
    };
    stages::run(Stage::Quantize, &input).expect("quantize stage");
    (layout.artifact_dir.clone(), qm.spec.quantization.clone())
}

/// The tensor `name` of a single-file artifact or checkpoint: dtype and bytes.
fn stored(dir: &Path, name: &str) -> (safetensors::Dtype, Vec<u8>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let t = st.tensor(name).expect("tensor");
    (t.dtype(), t.data().to_vec())
}

/// (method, bits, group size, largest |logit − transformers'| allowed for the
/// artifact): 8 bits keep the logits (|logit| ≤ 19) within a few tenths, an
/// AWQ fold that the q/k norms undid would not; 4 bits are not bounded.
const METHODS: [(&str, u8, i32, f32); 5] = [
    ("rtn", 4, 32, f32::INFINITY),
    ("gptq", 4, 32, f32::INFINITY),
    ("awq", 8, 32, 0.5),
    ("int8", 8, -1, 0.5),
    ("fp8", 8, -1, 1.5),
];

/// Quantizes with every method, checks the artifact and returns its logits by
/// method.
fn quantize_all(gpu: Option<&Gpu>, out: &str) -> Vec<(String, Vec<f32>)> {
    let volume = volume();
    let (ids, reference) = reference();
    let mut results = Vec::new();
    for (method, bits, group, bound) in METHODS {
        let (artifact, _) = quantize(volume.path(), method, bits, group, gpu, out);
        // The q/k norms are no Linears: written unchanged, not quantized.
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(artifact.join("config.json")).expect("config"),
        )
        .expect("config json");
        assert_eq!(config["architectures"][0], "Qwen3ForCausalLM");
        for layer in 0..2 {
            for norm in HeadNorm::ALL {
                let name = norm.weight_name(layer);
                assert_eq!(
                    stored(&artifact, &name),
                    stored(&fixture(), &name),
                    "{method}: {name} unchanged"
                );
            }
            let module = format!("model.layers.{layer}.self_attn.q_proj");
            let bytes = std::fs::read(artifact.join("model.safetensors")).expect("weights");
            let names: Vec<String> = SafeTensors::deserialize(&bytes)
                .expect("parse")
                .names()
                .into_iter()
                .map(String::from)
                .collect();
            assert!(
                names.contains(&format!("{module}.weight_scale")),
                "{method}: {module} is quantized"
            );
            for norm in HeadNorm::ALL {
                let scale = norm.weight_name(layer).replace(".weight", ".weight_scale");
                assert!(!names.contains(&scale), "{method}: {scale} written");
            }
        }
        // Read back as the validate stage and the server do.
        let loaded = LoadedModel::load(&artifact).expect("artifact loads");
        assert!(loaded.quantized);
        let ours = logits(&loaded.model, &ids);
        let d = max_diff(&ours, &reference);
        eprintln!(
            "qwen3 {method} w{bits} g{group} ({}): artifact max |logit - transformers| {d:.3e}",
            gpu.map_or("cpu", |g| g.name())
        );
        assert!(d < bound, "{method}: {d}");
        // Generation with the KV cache runs on the read-back model.
        let greedy = loaded
            .model
            .generate_greedy(&ids[..10], 8, None)
            .expect("greedy");
        assert_eq!(greedy.len(), 8);
        results.push((method.to_string(), ours));
    }
    results
}

#[test]
fn every_method_round_trips_through_the_artifact_on_the_cpu() {
    let results = quantize_all(None, "quantized");
    // RTN exactly: the artifact read back computes what the in-memory driver
    // left in the model.
    let volume = volume();
    let (_, recipe) = quantize(volume.path(), "rtn", 4, 32, None, "again");
    let checkpoint = Checkpoint::open(&fixture()).expect("fixture");
    let mut model = LlamaModel::from_checkpoint(&checkpoint).expect("model");
    let scheme = WeightScheme::from_spec(&recipe, FloatDtype::F16);
    quantize_model(
        &mut LlamaLayers { model: &mut model },
        &CpuBackend,
        &recipe,
        scheme,
        Vec::new(),
    )
    .expect("in-memory RTN");
    let (ids, _) = reference();
    let in_memory = logits(&model, &ids);
    let d = max_diff(&results[0].1, &in_memory);
    eprintln!("qwen3 rtn: artifact vs in-memory max |diff| {d:.3e}");
    assert!(d < 1e-5, "{d}");
}

/// The GPU pipeline (calibration forward with the q/k norms, quantizers on
/// the device) against the CPU's, method by method, through the same stage.
#[test]
fn gpu_quantize_stage_matches_the_cpu() {
    let required = std::env::var_os("QUANTOPS_REQUIRE_GPU").is_some();
    let gpu = match Gpu::for_choice(DeviceChoice::Auto) {
        Ok(Some(gpu)) => gpu,
        Ok(None) if !required => {
            eprintln!("skipped: no usable GPU (set QUANTOPS_REQUIRE_GPU to make this a failure)");
            return;
        }
        Ok(None) => panic!("QUANTOPS_REQUIRE_GPU is set but no GPU is usable"),
        Err(e) => panic!("opening the GPU: {e}"),
    };
    let cpu = quantize_all(None, "cpu");
    let device = quantize_all(Some(&gpu), "gpu");
    let (_, reference) = reference();
    for ((method, c), (_, g)) in cpu.iter().zip(&device) {
        let between = max_diff(c, g);
        let (ce, ge) = (max_diff(c, &reference), max_diff(g, &reference));
        println!(
            "qwen3 {method}: GPU artifact vs CPU artifact max |diff| {between:.3e}; vs transformers: CPU {ce:.3e}, GPU {ge:.3e}"
        );
        // The GPU's TF32 calibration moves calibrated codes a little; a
        // pipeline that dropped the norms would be as far off as the 4-bit
        // rounding itself.
        assert!(ge < 1.5 * ce + 0.05, "{method}: GPU {ge} vs CPU {ce}");
    }
}
