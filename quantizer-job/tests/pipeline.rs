//! The worker's stages end to end on the bundled model: every method
//! quantizes, writes a compressed-tensors artifact, reads it back and is
//! judged against one shared FP16 baseline on the same eval windows.

mod common;

use quantizer_job::layout::{Layout, Links, files};
use quantizer_job::stages::{self, Stage, StageInput};
use quantops_api::spec_file::parse_quantized_model;
use quantops_api::{QuantizedModel, Report};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Windows of 512 tokens for every perplexity in this file: enough for the
/// method ordering to be stable, few enough for 2 CPU cores.
const EVAL_WINDOWS: u32 = 16;

/// The bundled example volume: the shared model and text (linked in) beside
/// the validation files, so every spec path is relative to one root.
fn volume() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/volume")
}

fn spec(method: &str, bits: u8, group: i32, symmetric: bool) -> QuantizedModel {
    let yaml = format!(
        r#"apiVersion: quantops.dev/v1alpha1
kind: QuantizedModel
metadata: {{ name: test }}
spec:
  baseModel: {{ name: example/tiny-llama, path: tiny-llama }}
  version: test
  quantization: {{ method: {method}, bits: {bits}, groupSize: {group}, symmetric: {symmetric} }}
  calibration: {{ path: text/calibration.txt, samples: 32, sequenceLength: 512, seed: 42 }}
  validation:
    evalText: {{ path: text/eval.txt, windowTokens: 512, maxWindows: {EVAL_WINDOWS} }}
    tasks: [ {{ name: chat-choice, path: tasks/chat-choice.jsonl }} ]
    systemTests: {{ path: system-tests.yaml }}
    consistency: {{ path: text/chat-tasks.jsonl, maxPrompts: 8, maxNewTokens: 16 }}
    loadtest: {{ requests: 4, concurrency: 2, promptTokens: 16, maxTokens: 8 }}
    gates: {{ maxPerplexityIncreasePercent: 3, maxTaskDropPercent: 5, minGreedyMatchRate: 0.25, minSystemTestPassRate: 0.5 }}
"#,
    );
    parse_quantized_model(&yaml, method).expect("test spec is valid")
}

/// The output root shared by all tests of this run (one baseline for all).
fn output_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("quantops-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create output root");
        root
    })
}

/// Runs baseline once, then copies its result into each variant's directory.
fn baseline_json() -> &'static PathBuf {
    static BASELINE: OnceLock<PathBuf> = OnceLock::new();
    BASELINE.get_or_init(|| {
        let qm = spec("rtn", 4, 128, false);
        let layout = Layout::new(
            &qm.spec,
            &volume(),
            Some(&output_root().join("base")),
            Links::AllowOutOfRoot,
        )
        .expect("the spec's paths stay in the data tree");
        stages::run(
            Stage::Baseline,
            &StageInput {
                spec: &qm.spec,
                layout: &layout,
                gpu: None,
            },
        )
        .expect("baseline stage runs");
        layout.artifact_file(files::BASELINE)
    })
}

/// Quantizes and validates one variant, returning its report.
fn run_variant(method: &str, bits: u8, group: i32, symmetric: bool) -> Report {
    let qm = spec(method, bits, group, symmetric);
    let layout = Layout::new(
        &qm.spec,
        &volume(),
        Some(output_root()),
        Links::AllowOutOfRoot,
    )
    .expect("the spec's paths stay in the data tree");
    std::fs::create_dir_all(&layout.artifact_dir).expect("artifact dir");
    std::fs::copy(baseline_json(), layout.artifact_file(files::BASELINE)).expect("copy baseline");
    let input = StageInput {
        spec: &qm.spec,
        layout: &layout,
        gpu: None,
    };
    stages::run(Stage::Quantize, &input).expect("quantize stage runs");
    let summary = stages::run(Stage::Validate, &input).expect("validate stage runs");
    assert_eq!(summary.variant, layout.variant);
    let text = std::fs::read_to_string(layout.artifact_file(files::REPORT)).expect("report.json");
    let report: Report = serde_json::from_str(&text).expect("report parses");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "README.md",
        "metrics.svg",
    ] {
        assert!(
            layout.artifact_file(file).is_file(),
            "{method}: {file} written"
        );
    }
    eprintln!(
        "{method} w{bits} g{group} sym={symmetric}: perplexity {:?} -> {:?}, pass {}",
        report.baseline.perplexity, report.quantized.perplexity, report.overall_pass
    );
    report
}

fn increase_percent(r: &Report) -> f64 {
    let (Some(b), Some(q)) = (r.baseline.perplexity, r.quantized.perplexity) else {
        panic!("{}: both perplexities are measured", r.variant);
    };
    (q / b - 1.0) * 100.0
}

#[test]
fn calibrated_methods_beat_rtn_at_4_bits_group_128() {
    let rtn = run_variant("rtn", 4, 128, false);
    let gptq = run_variant("gptq", 4, 128, false);
    let awq = run_variant("awq", 4, 128, false);
    let (r, g, a) = (
        increase_percent(&rtn),
        increase_percent(&gptq),
        increase_percent(&awq),
    );
    eprintln!("perplexity increase: rtn {r:.3}%, gptq {g:.3}%, awq {a:.3}%");
    assert!(g < r, "GPTQ ({g:.3}%) must beat RTN ({r:.3}%)");
    assert!(a < r, "AWQ ({a:.3}%) must beat RTN ({r:.3}%)");
    for report in [&rtn, &gptq, &awq] {
        let ppl = report
            .gates
            .iter()
            .find(|g| g.name == "perplexity")
            .expect("perplexity gate");
        assert!(
            ppl.passed,
            "{}: 4-bit g128 stays within 3%: {ppl:?}",
            report.variant
        );
        assert_eq!(
            report.baseline.perplexity, rtn.baseline.perplexity,
            "one baseline for all"
        );
    }
}

#[test]
fn int8_and_fp8_stay_within_one_percent() {
    for method in ["int8", "fp8"] {
        let report = run_variant(method, 8, -1, true);
        let increase = increase_percent(&report);
        assert!(
            increase.abs() < 1.0,
            "{method}: {increase:.3}% over the baseline"
        );
        assert!(report.overall_pass, "{method}: {:?}", report.gates);
    }
}

#[test]
fn two_bit_rtn_fails_the_perplexity_gate() {
    let report = run_variant("rtn", 2, 128, false);
    let gate = report
        .gates
        .iter()
        .find(|g| g.name == "perplexity")
        .expect("perplexity gate");
    assert!(!gate.passed, "2-bit RTN must fail: {gate:?}");
    assert!(gate.value > gate.threshold);
    assert!(!report.overall_pass);
    let card = std::fs::read_to_string(
        PathBuf::from(
            report.extra["artifact"]["path"]
                .as_str()
                .expect("artifact path"),
        )
        .join("README.md"),
    )
    .expect("card");
    assert!(card.contains("Do not promote"), "the card says so");

    // The validation load test served both models; every request succeeded
    // and produced exactly the asked-for tokens (end of sequence ignored).
    let speed = &report.extra["serving_speed"];
    for side in ["baseline", "quantized"] {
        let run = &speed[side];
        assert_eq!(run["completed"], 4, "{side}: {run}");
        assert_eq!(run["errors"], 0, "{side}: {run}");
        assert_eq!(run["output_tokens"], 32, "{side}: {run}");
        assert!(run["output_tokens_per_s"].as_f64().is_some_and(|v| v > 0.0));
    }
    assert!(speed["throughput_ratio"].as_f64().is_some_and(|v| v > 0.0));
    assert!(card.contains("Serving speed"), "the card reports it");
    assert!(card.contains("| output tokens/s |"));
}
