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

/// A Job's worker refuses a spec path whose real location leaves the
/// volume through a symbolic link; local mode's flag follows it.
#[test]
fn a_link_out_of_the_volume_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = dir.path().join("volume");
    std::fs::create_dir_all(&volume).expect("volume");
    std::os::unix::fs::symlink(dir.path(), volume.join("does-not-exist")).expect("link out");
    let spec = write_spec(&volume, "  quantization: {method: rtn}\n");
    let run = |extra: &[&str]| {
        let out = worker()
            .arg("baseline")
            .arg("--spec")
            .arg(&spec)
            .arg("--root")
            .arg(&volume)
            .args(extra)
            .output()
            .expect("run worker");
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let refused = run(&[]);
    assert!(
        refused.contains("spec.baseModel.path") && refused.contains("leads out of"),
        "{refused}"
    );
    // Followed: the outside directory is no checkpoint, and that is the error.
    let followed = run(&["--allow-links-out-of-root"]);
    assert!(
        followed.contains("spec.baseModel.path: cannot load") && !followed.contains("leads out of"),
        "{followed}"
    );
}

/// `systemTests.path` naming a file that holds a token: the stage fails
/// naming the field and the file, and the token is in neither the
/// termination message (which becomes status) nor the log.
#[test]
fn a_file_that_is_not_a_suite_is_not_echoed_into_the_termination_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = dir.path();
    let model = std::env::var_os("QUANTOPS_SHARED_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
        .join("tiny-llama");
    std::os::unix::fs::symlink(&model, volume.join("tiny-llama")).expect("link the model");
    let secret = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkFCQyJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl";
    std::fs::write(volume.join("token"), secret).expect("write the token");
    let spec = volume.join("spec.yaml");
    std::fs::write(
        &spec,
        "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: t}\nspec:\n  baseModel: {name: example/tiny-llama, path: tiny-llama}\n  version: v1\n  quantization: {method: rtn}\n  validation: {systemTests: {path: token}}\n",
    )
    .expect("write spec");
    let term = volume.join("termination-log");
    let out = worker()
        .arg("baseline")
        .arg("--spec")
        .arg(&spec)
        .arg("--root")
        .arg(volume)
        .arg("--output-root")
        .arg(volume.join("out"))
        .arg("--allow-links-out-of-root")
        .arg("--termination-log")
        .arg(&term)
        .output()
        .expect("run worker");
    assert_eq!(out.status.code(), Some(1));
    let summary = std::fs::read_to_string(&term).expect("termination message written");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains("spec.validation.systemTests") && summary.contains("token"),
        "{summary}"
    );
    for text in [summary.as_str(), &stderr] {
        assert!(
            !text.contains("eyJ") && !text.contains("c2lnbmF0dXJl"),
            "{text}"
        );
    }
}
