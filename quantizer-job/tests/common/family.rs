//! Helpers for a family fixture of `tests/fixtures/families/` (see
//! `families.rs`) taken through the quantize stage, the compressed-tensors
//! writer and the artifact reader: shared by `qwen3.rs` and
//! `family_artifacts.rs`, so each family's round trip is the same test.

use std::path::{Path, PathBuf};

use quantizer_job::gpu::{DeviceChoice, Gpu};
use quantizer_job::layout::{Layout, Links};
use quantizer_job::llama_layers::LlamaLayers;
use quantizer_job::quant::{CpuBackend, FloatDtype, WeightScheme};
use quantizer_job::sequential::quantize_model;
use quantizer_job::stages::{self, Stage, StageInput};
use quantizer_job::{Checkpoint, LlamaModel};
use quantops_api::spec_file::parse_quantized_model;
use safetensors::SafeTensors;

/// The fixture `name` (`QUANTOPS_FAMILY_FIXTURES` overrides the directory on
/// a machine that runs a binary built elsewhere).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("QUANTOPS_FAMILY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families"))
        .join(name)
}

/// transformers' token ids and logits for fixture `name`.
pub fn reference(name: &str) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference");
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

/// The CPU model's logits for one sequence, flattened.
pub fn logits(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    let tokens = model.token_tensor(&[ids.to_vec()]).expect("tokens");
    model
        .forward(&tokens)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward")
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// A word-level tokenizer over the fixtures' 256 ids: the stages load one,
/// and the fixtures (like transformers' tiny test models) have none.
pub fn write_tokenizer(dir: &Path) {
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

/// A model volume holding fixture `name` (with a tokenizer) under `name/`
/// and a calibration token file of 8 sequences of 40 ids.
pub fn volume(name: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join(name);
    std::fs::create_dir_all(&model).expect("model dir");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), model.join(file)).expect("copy");
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

/// One quantize-stage run of the volume's fixture `name`.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub method: &'a str,
    pub bits: u8,
    pub group: i32,
    pub act_order: bool,
    /// Extra entries of the recipe's `ignore` list (besides `lm_head`).
    pub ignore: &'a [&'a str],
}

impl<'a> Run<'a> {
    pub fn new(method: &'a str, bits: u8, group: i32) -> Self {
        Self {
            method,
            bits,
            group,
            act_order: false,
            ignore: &[],
        }
    }
}

/// The spec of a quantize run on fixture `name`, writing under `out`.
fn spec_yaml(name: &str, run: Run<'_>, out: &str) -> String {
    let Run {
        method,
        bits,
        group,
        act_order,
        ignore,
    } = run;
    let ignore: Vec<String> = std::iter::once("lm_head")
        .chain(ignore.iter().copied())
        .map(|s| format!("{s:?}"))
        .collect();
    format!(
        r#"apiVersion: quantops.dev/v1alpha1
kind: QuantizedModel
metadata: {{ name: {name}-test }}
spec:
  baseModel: {{ name: test/{name}, path: {name} }}
  version: v1
  quantization: {{ method: {method}, bits: {bits}, groupSize: {group}, symmetric: false, actOrder: {act_order}, ignore: [{}] }}
  calibration: {{ path: calibration.json, samples: 8, sequenceLength: 40, seed: 1 }}
  output: {{ path: {out} }}
"#,
        ignore.join(", ")
    )
}

/// Runs the quantize stage on the volume's fixture `name`: the artifact's
/// directory and the recipe, or the stage's error.
pub fn try_quantize(
    volume: &Path,
    name: &str,
    run: Run<'_>,
    gpu: Option<&Gpu>,
    out: &str,
) -> anyhow::Result<(PathBuf, quantops_api::QuantizationSpec)> {
    try_stage(Stage::Quantize, volume, name, run, gpu, out)
}

/// [`try_quantize`] for any stage.
pub fn try_stage(
    stage: Stage,
    volume: &Path,
    name: &str,
    run: Run<'_>,
    gpu: Option<&Gpu>,
    out: &str,
) -> anyhow::Result<(PathBuf, quantops_api::QuantizationSpec)> {
    let qm = parse_quantized_model(&spec_yaml(name, run, out), run.method).expect("valid spec");
    let layout = Layout::new(&qm.spec, volume, None, Links::Confined).expect("layout");
    let input = StageInput {
        spec: &qm.spec,
        layout: &layout,
        gpu,
    };
    stages::run(stage, &input)?;
    Ok((layout.artifact_dir.clone(), qm.spec.quantization.clone()))
}

/// [`try_quantize`], which must succeed.
pub fn quantize(
    volume: &Path,
    name: &str,
    run: Run<'_>,
    gpu: Option<&Gpu>,
    out: &str,
) -> (PathBuf, quantops_api::QuantizationSpec) {
    try_quantize(volume, name, run, gpu, out).expect("quantize stage")
}

/// The fixture `name` quantized in memory by the sequential driver on the
/// CPU with `recipe`: what an artifact of that recipe must compute when read
/// back.
pub fn quantized_in_memory(name: &str, recipe: &quantops_api::QuantizationSpec) -> LlamaModel {
    let checkpoint = Checkpoint::open(&fixture(name)).expect("fixture");
    let mut model = LlamaModel::from_checkpoint(&checkpoint).expect("model");
    let scheme = WeightScheme::from_spec(recipe, FloatDtype::F16);
    quantize_model(
        &mut LlamaLayers { model: &mut model },
        &CpuBackend,
        recipe,
        scheme,
        Vec::new(),
    )
    .expect("in-memory quantization");
    model
}

/// The tensor `name` of a single-file artifact or checkpoint: dtype and bytes.
pub fn stored(dir: &Path, name: &str) -> (safetensors::Dtype, Vec<u8>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let t = st.tensor(name).expect("tensor");
    (t.dtype(), t.data().to_vec())
}

/// Every tensor name of a single-file artifact or checkpoint.
pub fn tensor_names(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    SafeTensors::deserialize(&bytes)
        .expect("parse")
        .names()
        .into_iter()
        .map(String::from)
        .collect()
}

/// `config.json` of an artifact or checkpoint.
pub fn config_json(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config");
    serde_json::from_str(&text).expect("config json")
}

/// The GPU where one is usable; `None` (after a note) elsewhere, unless
/// `QUANTOPS_REQUIRE_GPU` makes its absence a failure.
pub fn gpu_or_skip() -> Option<Gpu> {
    let required = std::env::var_os("QUANTOPS_REQUIRE_GPU").is_some();
    match Gpu::for_choice(DeviceChoice::Auto) {
        Ok(Some(gpu)) => Some(gpu),
        Ok(None) if !required => {
            eprintln!("skipped: no usable GPU (set QUANTOPS_REQUIRE_GPU to make this a failure)");
            None
        }
        Ok(None) => panic!("QUANTOPS_REQUIRE_GPU is set but no GPU is usable"),
        Err(e) => panic!("opening the GPU: {e}"),
    }
}
