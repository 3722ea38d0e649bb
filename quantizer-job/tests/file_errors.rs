//! Every reader of a file a spec names fails with the file's path and a
//! description of what is wrong, never with the file's text: a spec that
//! points at a token or a password file must not carry it into status.

mod common;

use quantizer_job::Tokenizer;
use quantizer_job::calibration;
use quantizer_job::checkpoint::Checkpoint;
use quantizer_job::config::LlamaConfig;
use quantizer_job::eval::{consistency, tasks};

/// What a service-account token looks like.
const SECRET: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkFCQyJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl";

fn assert_content_free(what: &str, err: &str, path: &std::path::Path) {
    assert!(
        err.contains(&path.display().to_string()),
        "{what}: the error names the file: {err}"
    );
    for piece in ["eyJ", "c2lnbmF0dXJl", "password"] {
        assert!(!err.contains(piece), "{what}: {err}");
    }
}

/// Files holding a secret in the shapes a parser might echo: bare, as a
/// value of the wrong type, and as an unknown key.
fn secret_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    [
        ("bare.json", SECRET.to_string()),
        ("string.json", format!("\"{SECRET}\"")),
        (
            "value.json",
            format!("{{\"prompt\": 1, \"input_ids\": \"{SECRET}\", \"choices\": \"password\"}}"),
        ),
        ("key.json", format!("{{\"{SECRET}\": \"password\"}}")),
    ]
    .into_iter()
    .map(|(name, text)| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a secret file");
        path
    })
    .collect()
}

#[test]
fn task_and_prompt_files_are_not_quoted() {
    let dir = tempfile::tempdir().expect("temp dir");
    for path in secret_files(dir.path()) {
        let err = tasks::load_tasks(&path)
            .expect_err("not a task file")
            .to_string();
        assert_content_free("tasks", &err, &path);
        assert!(err.contains("line 1"), "{err}");
        let err = consistency::load_prompts(&path, 4)
            .expect_err("not a prompt file")
            .to_string();
        assert_content_free("consistency", &err, &path);
    }
}

#[test]
fn a_calibration_token_file_is_not_quoted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = Tokenizer::from_dir(&common::model_dir()).expect("tokenizer");
    for path in secret_files(dir.path()) {
        let err = calibration::load(&path, &tokenizer, 32_000, 1, 16, 0)
            .expect_err("not a token file")
            .to_string();
        assert_content_free("calibration", &err, &path);
    }
}

#[test]
fn a_checkpoint_s_json_files_are_not_quoted() {
    let dir = tempfile::tempdir().expect("temp dir");
    for path in secret_files(dir.path()) {
        let err = LlamaConfig::from_file(&path)
            .expect_err("not a config")
            .to_string();
        assert_content_free("config.json", &err, &path);
        assert!(err.contains("line 1 column"), "{err}");
    }
    // An architecture the forward pass lacks is named by field, not value.
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        format!("{{\"architectures\": [\"{SECRET}\"], \"hidden_size\": 8}}"),
    )
    .expect("write");
    let err = LlamaConfig::from_file(&path)
        .expect_err("unknown")
        .to_string();
    assert_content_free("architecture", &err, &path);

    // A checkpoint whose index and tokenizer are secrets.
    let checkpoint = common::model_copy();
    let index = checkpoint.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        format!("{{\"weight_map\": {{\"a\": [\"{SECRET}\"]}}}}"),
    )
    .expect("write");
    let err = Checkpoint::open(checkpoint.path())
        .expect_err("bad index")
        .to_string();
    assert_content_free("index", &err, &index);
    std::fs::write(
        &index,
        format!("{{\"weight_map\": {{\"a\": \"../{SECRET}\"}}}}"),
    )
    .expect("write");
    let err = Checkpoint::open(checkpoint.path())
        .expect_err("a shard outside")
        .to_string();
    assert_content_free("shard name", &err, &index);
    let tokenizer = checkpoint.path().join("tokenizer.json");
    std::fs::write(&tokenizer, format!("{{\"model\": \"{SECRET}\"}}")).expect("write");
    let err = Tokenizer::from_dir(checkpoint.path())
        .expect_err("bad tokenizer")
        .to_string();
    assert_content_free("tokenizer", &err, &tokenizer);
}
