//! Shared helpers of the integration tests: the bundled tiny-llama checkpoint,
//! the text beside it, the model loaded once per test binary, and real-ish
//! layer inputs built from its embeddings.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use quantizer_job::quant::Matrix;
use quantizer_job::{Checkpoint, LlamaModel, Tokenizer};
use safetensors::{Dtype, SafeTensors};

/// `shared/data` next to the checkout (override with `QUANTOPS_SHARED_DATA`).
pub fn data_dir() -> PathBuf {
    std::env::var_os("QUANTOPS_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

pub fn model_dir() -> PathBuf {
    data_dir().join("tiny-llama")
}

pub fn reference_dir() -> PathBuf {
    data_dir().join("reference/tiny-llama-gptq-w4a16-asym-g128-llmcompressor")
}

/// A base-model tensor by full name, as f32 with its shape.
pub fn load_tensor(name: &str) -> (Vec<usize>, Vec<f32>) {
    let dir = model_dir();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("read index"),
    )
    .expect("parse index");
    let file = index["weight_map"][name].as_str().expect("tensor in index");
    let bytes = std::fs::read(dir.join(file)).expect("read shard");
    let st = SafeTensors::deserialize(&bytes).expect("parse shard");
    let t = st.tensor(name).expect("tensor in shard");
    assert_eq!(t.dtype(), Dtype::F16, "{name} dtype");
    let data = t
        .data()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    (t.shape().to_vec(), data)
}

/// A Linear weight `[out, in]` of the base model.
pub fn load_linear(module: &str) -> Matrix {
    let (shape, data) = load_tensor(&format!("{module}.weight"));
    Matrix::new(shape[0], shape[1], data).expect("2-d weight")
}

/// All base-model tensors by name.
pub fn load_all() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let dir = model_dir();
    let mut out = BTreeMap::new();
    for i in 1..=3 {
        let bytes =
            std::fs::read(dir.join(format!("model-0000{i}-of-00003.safetensors"))).expect("shard");
        let st = SafeTensors::deserialize(&bytes).expect("parse shard");
        for (name, t) in st.tensors() {
            let data = t
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            out.insert(name, (t.shape().to_vec(), data));
        }
    }
    out
}

/// Inputs of a layer-0 Linear fed by `norm` (e.g. `model.layers.0.input_layernorm`):
/// RMSNorm of the embedding rows of `n` tokens of the bytes of real text, mapped
/// into the vocabulary. Real rows with the model's real channel scales, which is
/// what GPTQ and AWQ exploit.
pub fn norm_inputs(norm: &str, n: usize) -> Matrix {
    let (eshape, emb) = load_tensor("model.embed_tokens.weight");
    let (_, gamma) = load_tensor(&format!("{norm}.weight"));
    let text = std::fs::read(data_dir().join("text/calibration.txt")).expect("calibration text");
    let (vocab, hidden) = (eshape[0], eshape[1]);
    let mut data = Vec::with_capacity(n * hidden);
    for k in 0..n {
        // Three consecutive bytes → one token id: deterministic, text-distributed.
        let b = &text[(k * 3) % (text.len() - 3)..];
        let id = (usize::from(b[0]) * 65_599 + usize::from(b[1]) * 257 + usize::from(b[2])) % vocab;
        let row = &emb[id * hidden..(id + 1) * hidden];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        data.extend(row.iter().zip(&gamma).map(|(v, g)| v * inv * g));
    }
    Matrix::new(n, hidden, data).expect("inputs")
}

/// Relative Frobenius error `‖a − b‖ / ‖a‖`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (num / den).sqrt()
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quantops-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub fn text(name: &str) -> PathBuf {
    data_dir().join("text").join(name)
}

/// A validation file of the example model volume (`manifests/examples/volume/`),
/// the same files the README's example spec uses.
pub fn test_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples/volume")
        .join(name)
}

pub fn model() -> &'static LlamaModel {
    static MODEL: OnceLock<LlamaModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let ckpt = Checkpoint::open(&model_dir()).expect("open the shared tiny-llama");
        LlamaModel::from_checkpoint(&ckpt).expect("load the shared tiny-llama")
    })
}

pub fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_dir(&model_dir()).expect("load tokenizer.json"))
}

/// Copies the shared model into a fresh temp dir the test may break.
pub fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create temp dir");
    for entry in std::fs::read_dir(model_dir()).expect("list model dir") {
        let entry = entry.expect("dir entry");
        let dest = dir.path().join(entry.file_name());
        std::fs::copy(entry.path(), &dest).expect("copy model file");
        let mut perms = std::fs::metadata(&dest).expect("stat").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&dest, perms).expect("make writable");
    }
    dir
}

pub mod family;
pub mod serving;
