//! The worker's command line as a Job runs it: bad specs fail with a message
//! naming the field or the path, and the summary reaches the termination log.

use std::path::Path;
use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantizer-job"))
}

fn write_spec(dir: &Path, body: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("temp dir");
    let path = dir.join("spec.yaml");
    let yaml = format!(
        "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {{name: t}}\nspec:\n  baseModel: {{name: example/tiny-llama, path: does-not-exist}}\n  version: v1\n{body}"
    );
    std::fs::write(&path, yaml).expect("write spec");
    path
}

#[test]
fn unknown_method_is_named_and_exit_is_non_zero() {
    let dir = std::env::temp_dir().join(format!("qo-cli-method-{}", std::process::id()));
    let spec = write_spec(&dir, "  quantization: {method: nf4}\n");
    let term = dir.join("termination-log");
    let out = worker()
        .args(["quantize", "--spec"])
        .arg(&spec)
        .arg("--termination-log")
        .arg(&term)
        .output()
        .expect("run worker");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nf4") && stderr.contains("method"),
        "{stderr}"
    );
    let summary = std::fs::read_to_string(&term).expect("termination message written");
    assert!(
        summary.contains("\"error\"") && summary.contains("nf4"),
        "{summary}"
    );
}

#[test]
fn missing_model_path_is_named() {
    let dir = std::env::temp_dir().join(format!("qo-cli-path-{}", std::process::id()));
    let spec = write_spec(&dir, "  quantization: {method: rtn}\n");
    let out = worker()
        .args(["quantize", "--spec"])
        .arg(&spec)
        .output()
        .expect("run worker");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.baseModel.path") && stderr.contains("does-not-exist"),
        "{stderr}"
    );
}

/// The GPU benchmark's specs (`bench/gpu/specs`) run only on a GPU machine;
/// here they are checked to be valid `QuantizedModel`s, so a typo does not
/// wait for the device to be found.
#[test]
fn gpu_benchmark_specs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gpu/specs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("bench/gpu/specs") {
        let path = entry.expect("spec entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(e) = quantops_api::spec_file::load_quantized_model(&path) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 9, "{checked} specs found");
}
