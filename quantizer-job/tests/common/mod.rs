//! Locating the shared real model and text, and loading them once per test
//! binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use quantizer_job::{Checkpoint, LlamaModel, Tokenizer};

/// `$QUANTOPS_SHARED_DATA`, else `<workspace root>/../shared/data`.
pub fn shared_data() -> PathBuf {
    if let Some(dir) = std::env::var_os("QUANTOPS_SHARED_DATA") {
        return PathBuf::from(dir);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate dir has a parent")
        .to_path_buf();
    workspace.join("../shared/data")
}

pub fn model_dir() -> PathBuf {
    shared_data().join("tiny-llama")
}

pub fn text(name: &str) -> PathBuf {
    shared_data().join("text").join(name)
}

pub fn test_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
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
