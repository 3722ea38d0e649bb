//! Qwen3's per-head q/k norms through everything the worker does to a model
//! besides the forward (which `families.rs` checks against transformers):
//! refusing a checkpoint without them, and every method through the real
//! quantize stage, the compressed-tensors writer and the artifact reader,
//! on the CPU and (where a GPU is usable) on the GPU.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::family::{
    Run, config_json, gpu_or_skip, logits, max_diff, quantize as quantize_fixture,
    quantized_in_memory, reference as fixture_reference, stored, tensor_names,
    volume as fixture_volume,
};
use quantizer_job::family::HeadNorm;
use quantizer_job::gpu::Gpu;
use quantizer_job::serve::LoadedModel;
use quantizer_job::{Checkpoint, CheckpointError, LlamaModel, ModelError};
use safetensors::SafeTensors;

const NAME: &str = "qwen3";

fn fixture() -> PathBuf {
    common::family::fixture(NAME)
}

fn reference() -> (Vec<u32>, Vec<f32>) {
    fixture_reference(NAME)
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

fn volume() -> tempfile::TempDir {
    fixture_volume(NAME)
}

fn quantize(
    volume: &Path,
    method: &str,
    bits: u8,
    group: i32,
    gpu: Option<&Gpu>,
    out: &str,
) -> (PathBuf, quantops_api::QuantizationSpec) {
    quantize_fixture(volume, NAME, Run::new(method, bits, group), gpu, out)
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
        let config = config_json(&artifact);
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
            let names = tensor_names(&artifact);
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
    let model = quantized_in_memory(NAME, &recipe);
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
    let Some(gpu) = gpu_or_skip() else {
        return;
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
