//! Opening the real checkpoint, and the errors of broken copies of it.

mod common;

use std::collections::BTreeMap;

use quantizer_job::rope::RopeError;
use quantizer_job::{Architecture, Checkpoint, CheckpointError, ConfigError};

fn edit_config(dir: &std::path::Path, from: &str, to: &str) {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read config");
    assert!(text.contains(from), "config.json contains {from}");
    std::fs::write(&path, text.replace(from, to)).expect("write config");
}

#[test]
fn opens_the_real_model_and_reports_its_figures() {
    let ckpt = Checkpoint::open(&common::model_dir()).expect("open checkpoint");
    let cfg = ckpt.config();
    assert_eq!(cfg.architecture, Architecture::Llama);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads
        ),
        (384, 1024, 6)
    );
    assert_eq!(
        (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size),
        (2, 64, 8192)
    );
    assert_eq!(cfg.rope_theta, 10_000.0);
    assert!(!cfg.tie_word_embeddings);
    let info = ckpt.info();
    assert_eq!(info.parameters, 15_733_632);
    assert_eq!(info.num_layers, 6);
    assert_eq!(info.files.len(), 3);
    assert_eq!(info.dtypes, vec!["F16".to_string()]);
    assert!(info.bytes_on_disk > 2 * info.parameters, "FP16 on disk");
    let json = serde_json::to_value(&info).expect("info serialises");
    assert_eq!(json["architecture"], "LlamaForCausalLM");
}

#[test]
fn top_level_rope_theta_and_default_head_dim_are_read() {
    let text = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "rope_theta": 500000.0, "tie_word_embeddings": true}"#;
    let cfg =
        quantizer_job::LlamaConfig::from_json(text, "config.json".as_ref()).expect("valid config");
    assert_eq!(cfg.rope_theta, 500_000.0);
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.num_key_value_heads, 4);
    assert!(
        cfg.block.qkv_bias && !cfg.block.o_bias && !cfg.block.qk_norm,
        "Qwen2 has q/k/v biases only"
    );
    let names: Vec<String> = cfg.expected_tensors().into_iter().map(|t| t.0).collect();
    assert!(names.contains(&"model.layers.1.self_attn.k_proj.bias".to_string()));
    assert!(
        !names.contains(&"lm_head.weight".to_string()),
        "tied embeddings"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = common::model_copy();
    edit_config(dir.path(), "LlamaForCausalLM", "GPT2LMHeadModel");
    let err = Checkpoint::open(dir.path()).expect_err("GPT-2 is refused");
    assert!(
        matches!(&err, CheckpointError::Config(ConfigError::UnsupportedArchitecture { found, .. }) if found == "GPT2LMHeadModel"),
        "{err}"
    );
    // The message names the field and what is supported, never the file's text.
    let text = err.to_string();
    assert!(
        text.contains("architectures[0]") && text.contains("LlamaForCausalLM"),
        "{text}"
    );
    assert!(!text.contains("GPT2LMHeadModel"), "{text}");
}

#[test]
fn unsupported_rope_type_is_refused() {
    // `dynamic` rescales its frequencies with the sequence length, which a
    // table built once cannot express (default, linear, llama3 and yarn are
    // supported: tests/families.rs).
    let dir = common::model_copy();
    edit_config(
        dir.path(),
        r#""rope_type": "default""#,
        r#""rope_type": "dynamic", "factor": 2.0"#,
    );
    let err = Checkpoint::open(dir.path()).expect_err("dynamic is refused");
    assert!(
        matches!(&err, CheckpointError::Config(ConfigError::Rope { source: RopeError::UnsupportedType(found), .. }) if found == "dynamic"),
        "{err}"
    );
    // Named by field, without the file's text.
    let text = err.to_string();
    assert!(
        text.contains("rope_type") && !text.contains("dynamic"),
        "{text}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = common::model_copy();
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).expect("delete");
    let err = Checkpoint::open(dir.path()).expect_err("missing shard");
    assert!(
        matches!(&err, CheckpointError::MissingFile { file, .. } if file == "model-00002-of-00003.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_shard_is_named() {
    let dir = common::model_copy();
    let path = dir.path().join("model-00003-of-00003.safetensors");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open shard");
    file.set_len(1_000_000).expect("truncate");
    let err = Checkpoint::open(dir.path()).expect_err("truncated shard");
    assert!(
        matches!(&err, CheckpointError::Corrupt { path: p, .. } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("model-00003-of-00003.safetensors"));
}

#[test]
fn shape_disagreeing_with_config_names_tensor_and_shapes() {
    let dir = common::model_copy();
    edit_config(
        dir.path(),
        r#""intermediate_size": 1024"#,
        r#""intermediate_size": 1000"#,
    );
    let err = Checkpoint::open(dir.path()).expect_err("shape mismatch");
    match &err {
        CheckpointError::ShapeMismatch {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, &vec![1000, 384]);
            assert_eq!(found, &vec![1024, 384]);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = common::model_copy();
    // Rewrite everything as one model.safetensors without layer 3's o_proj.
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for i in 1..=3 {
        let path = dir
            .path()
            .join(format!("model-0000{i}-of-00003.safetensors"));
        let bytes = std::fs::read(&path).expect("read shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse shard");
        for (name, view) in st.tensors() {
            if name != "model.layers.3.self_attn.o_proj.weight" {
                data.push((
                    name,
                    view.dtype(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ));
            }
        }
        std::fs::remove_file(&path).expect("remove shard");
    }
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).expect("remove index");
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors"))
        .expect("write single file");
    let err = Checkpoint::open(dir.path()).expect_err("missing tensor");
    assert!(
        matches!(&err, CheckpointError::MissingTensor { name, .. } if name == "model.layers.3.self_attn.o_proj.weight"),
        "{err}"
    );
}

#[test]
fn digests_are_verified() {
    let ckpt = Checkpoint::open(&common::model_dir()).expect("open checkpoint");
    let bytes = std::fs::read(common::model_dir().join("config.json")).expect("read config");
    let good = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let mut digests = BTreeMap::from([("config.json".to_string(), good)]);
    ckpt.verify_digests(&digests)
        .expect("the right digest passes");
    digests.insert("config.json".into(), "00".repeat(32));
    let err = ckpt
        .verify_digests(&digests)
        .expect_err("a wrong digest fails");
    assert!(
        matches!(err, CheckpointError::DigestMismatch { ref file, .. } if file == "config.json")
    );
}

/// Positional reads return the same bytes as the mapping, in any chunking,
/// and a range past the tensor's end is refused rather than read.
#[test]
fn positional_reads_match_the_mapping() {
    let ckpt = Checkpoint::open(&common::model_dir()).expect("open checkpoint");
    let raw = ckpt
        .raw("model.layers.3.mlp.down_proj.weight")
        .expect("tensor");
    let mut whole = vec![0u8; raw.bytes.len()];
    raw.read_at(&mut whole, 0).expect("read whole");
    assert_eq!(whole, raw.bytes);
    let mut chunked = vec![0u8; raw.bytes.len()];
    for (i, chunk) in chunked.chunks_mut(4093).enumerate() {
        raw.read_at(chunk, i * 4093).expect("read chunk");
    }
    assert_eq!(chunked, raw.bytes);
    let mut past = vec![0u8; 16];
    let err = raw
        .read_at(&mut past, raw.bytes.len() - 8)
        .expect_err("past the end");
    assert!(err.to_string().contains("outside the tensor"), "{err}");
}
