//! Local mode: the same pipeline as the operator, on this machine and with
//! no cluster. Each stage runs as a child process of the worker binary; its
//! stderr (logs and progress) is forwarded as it comes, and its result is
//! read from the termination-log file the worker is told to write, just as
//! the reconciler reads it from the pod. Sequencing and the mapping from
//! summaries to conditions are [`crate::pipeline`]'s, shared with the
//! reconciler. A run whose gates passed ends by serving the artifact and
//! sending the spec's system tests through it ([`crate::local_serving`]).

use crate::local_serving::HealthCheck;
use crate::pipeline::{self, Next, Observation, RetryPolicy, Stage, StageRun};
use k8s_openapi::jiff::Timestamp;
use quantops_api::{QuantizedModelStatus, StageSummary};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The worker binary's file name.
pub const WORKER_NAME: &str = "quantizer-job";

/// The worker flag local mode always passes: the data tree is the user's
/// own, and may link to data kept elsewhere (the bundled example volume
/// links to `../shared/data`). Spec paths are still confined lexically
/// (relative, no `..`), so a spec handed to the user cannot name a file
/// outside the tree; only links the user made lead out. Jobs run without
/// it: there, a link out of `/models` is refused.
pub const ALLOW_LINKS_OUT_OF_ROOT: &str = "--allow-links-out-of-root";

/// Why local mode could not run the pipeline (as opposed to the pipeline
/// running and failing, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Spec(#[from] quantops_api::spec_file::SpecError),
    #[error("cannot find the worker: {0}")]
    NoWorker(String),
    #[error("cannot start the worker {worker} for stage {stage}: {source}")]
    Spawn {
        worker: String,
        stage: Stage,
        source: std::io::Error,
    },
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// The directory relative spec paths resolve against: `--root`, else the
/// spec file's own directory (as the worker resolves them).
fn spec_root(options: &LocalOptions) -> PathBuf {
    options.root.clone().unwrap_or_else(|| {
        options
            .spec
            .parent()
            .map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf)
    })
}

/// After a Ready pipeline: serve the artifact and run the spec's system
/// tests through the endpoint. Unanswered requests make the run Broken; the
/// score itself was already judged by the system-tests gate.
fn serving_health_check(
    options: &LocalOptions,
    qm: &quantops_api::QuantizedModel,
    status: &QuantizedModelStatus,
    out: &mut impl Write,
) -> Result<Outcome, LocalError> {
    let (Some(suite), Some(artifact), Some(variant)) = (
        qm.spec.validation.system_tests.as_ref(),
        status.artifact_path.as_deref(),
        status.variant.as_deref(),
    ) else {
        writeln!(
            out,
            "serve: skipped (spec.validation.systemTests names no suite to send)"
        )?;
        return Ok(Outcome::Ready);
    };
    writeln!(out, "==> serve")?;
    out.flush()?;
    let root = spec_root(options);
    let check = HealthCheck {
        worker: &options.worker,
        artifact: std::path::Path::new(artifact),
        served_name: variant,
        suite: &suite.path,
        root: &root,
        scratch: &options.scratch,
    };
    Ok(match check.run() {
        Ok((endpoint, result)) => {
            writeln!(
                out,
                "<== serve: {endpoint} answered {}/{} system tests as expected (score {:.3}), {} requests failed, p50 latency {:.0} ms",
                result.passed,
                result.total,
                result.score,
                result.failures,
                result.latency_seconds.p50 * 1e3
            )?;
            if result.failures > 0 {
                Outcome::Broken(format!(
                    "serving health check: {} of {} requests to the served artifact failed",
                    result.failures, result.total
                ))
            } else {
                Outcome::Ready
            }
        }
        Err(error) => Outcome::Broken(format!("serving health check: {error}")),
    })
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub spec: PathBuf,
    pub root: Option<PathBuf>,
    pub output_root: Option<PathBuf>,
    pub worker: PathBuf,
    /// Directory for the termination-log files.
    pub scratch: PathBuf,
}

/// How the pipeline ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Ready,
    GatesFailed(String),
    Broken(String),
}

/// The worker given with `--worker`, or the one beside the running binary.
pub fn find_worker(explicit: Option<PathBuf>) -> Result<PathBuf, LocalError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(LocalError::NoWorker(format!(
                "{} is not a file",
                path.display()
            )))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| LocalError::NoWorker(format!("cannot locate this binary: {e}")))?;
    let beside = exe
        .parent()
        .map(|dir| dir.join(WORKER_NAME))
        .ok_or_else(|| LocalError::NoWorker("this binary has no directory".to_string()))?;
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(LocalError::NoWorker(format!(
            "{} does not exist; build it (cargo build --release -p quantizer-job) or pass --worker",
            beside.display()
        )))
    }
}

/// The result of one child process: its summary, or why it broke.
fn run_stage(
    options: &LocalOptions,
    stage: Stage,
) -> Result<Result<StageSummary, String>, LocalError> {
    let log = options.scratch.join(format!(
        "quantops-{}-{}.termination-log",
        std::process::id(),
        stage
    ));
    // A stale file from an earlier run must not pass for this run's result.
    let _ = std::fs::remove_file(&log);
    let mut command = Command::new(&options.worker);
    command
        .arg(stage.name())
        .arg("--spec")
        .arg(&options.spec)
        .arg("--termination-log")
        .arg(&log)
        .arg(ALLOW_LINKS_OUT_OF_ROOT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(root) = &options.root {
        command.arg("--root").arg(root);
    }
    if let Some(output_root) = &options.output_root {
        command.arg("--output-root").arg(output_root);
    }
    let status = command.status().map_err(|source| LocalError::Spawn {
        worker: options.worker.display().to_string(),
        stage,
        source,
    })?;
    let summary = std::fs::read_to_string(&log)
        .ok()
        .and_then(|text| serde_json::from_str::<StageSummary>(&text).ok());
    let _ = std::fs::remove_file(&log);
    Ok(match (status.success(), summary) {
        (true, Some(summary)) if summary.error.is_none() => Ok(summary),
        (
            _,
            Some(StageSummary {
                error: Some(error), ..
            }),
        ) => Err(error),
        (true, _) => Err(format!("{stage} exited 0 but wrote no readable summary")),
        (false, None) => Err(format!("{stage} exited with {status} without a summary")),
        (false, Some(_)) => Err(format!("{stage} exited with {status}")),
    })
}

/// Runs baseline → quantize → validate, printing each step to `out`, and
/// returns the final status (as the operator would write it) and outcome.
pub fn run_pipeline(
    options: &LocalOptions,
    out: &mut impl Write,
) -> Result<(QuantizedModelStatus, Outcome), LocalError> {
    let qm = quantops_api::spec_file::load_quantized_model(&options.spec)?;
    let mut status = QuantizedModelStatus::default();
    let now = || Observation {
        generation: Some(1),
        now: Timestamp::now(),
    };
    pipeline::observe_generation(&mut status, &now());
    // Locally a broken stage is reported at once: retrying is the user's call.
    let policy = RetryPolicy {
        max_attempts: 1,
        base_delay: Duration::ZERO,
    };
    let mut stage = Stage::Baseline;
    writeln!(
        out,
        "quantops: {} ({})",
        qm.metadata.name.as_deref().unwrap_or("unnamed"),
        quantops_api::variant::variant_name(&qm.spec)
    )?;
    let outcome = loop {
        writeln!(out, "==> {stage}")?;
        out.flush()?;
        let run = StageRun {
            hash: pipeline::stage_hash(&qm.spec, stage),
            job: format!("local {stage}"),
            job_uid: None,
        };
        pipeline::mark_running(&mut status, stage, &run, "running locally", &now());
        let next = match run_stage(options, stage)? {
            Ok(summary) => {
                if let Some(seconds) = summary.seconds {
                    writeln!(out, "<== {stage} done in {seconds:.1}s")?;
                }
                pipeline::record_success(&mut status, stage, &run, &summary, &now())
            }
            Err(error) => {
                pipeline::record_broken(&mut status, stage, &run, &error, &policy, &now())
            }
        };
        match next {
            Next::Run(following) => stage = following,
            Next::Ready => break Outcome::Ready,
            Next::GatesFailed(message) => break Outcome::GatesFailed(message),
            Next::GaveUp(message) => break Outcome::Broken(message),
            Next::RetryAfter(_) => {
                // Not reached with one attempt; kept total for clarity.
                let message = crate::conditions::find(&status.conditions, stage.condition_type())
                    .map(|c| c.message.clone())
                    .unwrap_or_else(|| format!("{stage} failed"));
                break Outcome::Broken(message);
            }
        }
    };
    let outcome = match outcome {
        Outcome::Ready => serving_health_check(options, &qm, &status, out)?,
        other => other,
    };
    write_report(out, &status, &outcome)?;
    Ok((status, outcome))
}

/// The gate table and where the artifacts are.
pub fn write_report(
    out: &mut impl Write,
    status: &QuantizedModelStatus,
    outcome: &Outcome,
) -> std::io::Result<()> {
    writeln!(out)?;
    if !status.gates.is_empty() {
        writeln!(
            out,
            "{:<24} {:<32} {:>12} {:>12} {:>12}  result",
            "gate", "metric", "baseline", "value", "threshold"
        )?;
        for g in &status.gates {
            let baseline = g
                .baseline
                .map(|b| format!("{b:.4}"))
                .unwrap_or_else(|| "-".into());
            let result = if g.passed { "PASS" } else { "FAIL" };
            writeln!(
                out,
                "{:<24} {:<32} {:>12} {:>12.4} {:>12.4}  {result}",
                g.name, g.metric, baseline, g.value, g.threshold
            )?;
        }
        writeln!(out)?;
    }
    if let (Some(b), Some(q)) = (status.baseline_perplexity, status.quantized_perplexity) {
        let delta = status.perplexity_delta.as_deref().unwrap_or("?");
        writeln!(
            out,
            "perplexity: baseline {b:.4}, quantized {q:.4} ({delta})"
        )?;
    }
    if let Some(variant) = &status.variant {
        writeln!(out, "variant:    {variant}")?;
    }
    if let Some(path) = &status.artifact_path {
        writeln!(out, "artifact:   {path}")?;
    }
    if let Some(digest) = &status.artifact_digest {
        writeln!(out, "digest:     {digest}")?;
    }
    match outcome {
        Outcome::Ready => writeln!(out, "phase:      Ready (every gate passed)"),
        Outcome::GatesFailed(message) => writeln!(out, "phase:      Failed ({message})"),
        Outcome::Broken(message) => writeln!(out, "phase:      Failed ({message})"),
    }
}

#[cfg(test)]
mod tests {
    //! Exercises the process handling with a small fake worker script that
    //! writes canned summaries; the real worker's end-to-end run is tested
    //! where its stages are built.
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SPEC: &str = "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: fake}\nspec:\n  baseModel: {name: example/tiny, path: m}\n  version: v1\n  quantization: {method: rtn}\n";

    fn setup(name: &str, script: &str) -> LocalOptions {
        let dir =
            std::env::temp_dir().join(format!("quantops-local-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let spec = dir.join("qm.yaml");
        std::fs::write(&spec, SPEC).unwrap_or_else(|e| panic!("{e}"));
        let worker = dir.join("fake-worker");
        std::fs::write(&worker, script).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        LocalOptions {
            spec,
            root: None,
            output_root: None,
            worker,
            scratch: dir,
        }
    }

    /// A worker that records its calls, and answers each stage from `$RESULT_<stage>`.
    const SCRIPT: &str = r#"#!/bin/sh
echo "$*" >> "$(dirname "$0")/args"
stage="$1"; shift
log=""
while [ $# -gt 0 ]; do
  case "$1" in --termination-log) log="$2"; shift 2;; *) shift;; esac
done
echo "$stage" >> "$(dirname "$0")/calls"
echo "progress: $stage 1/1" >&2
case "$stage" in
  baseline) echo '{"stage":"baseline","variant":"tiny-v1-int4-rtn-g128","baseline_perplexity":20.0,"seconds":1.5}' > "$log";;
  quantize) QUANTIZE_RESULT
  ;;
  validate) echo "{\"stage\":\"validate\",\"variant\":\"tiny-v1-int4-rtn-g128\",\"overall_pass\":$PASS,\"quantized_perplexity\":20.5,\"gates\":[{\"name\":\"perplexity\",\"metric\":\"perplexity_increase_percent\",\"baseline\":20.0,\"value\":2.5,\"threshold\":3.0,\"passed\":$PASS}]}" > "$log";;
esac
"#;

    fn script(quantize: &str, pass: &str) -> String {
        SCRIPT
            .replace("QUANTIZE_RESULT", quantize)
            .replace("$PASS", pass)
    }

    const QUANTIZE_OK: &str = r#"echo '{"stage":"quantize","variant":"tiny-v1-int4-rtn-g128","artifact_path":"quantized/tiny/v1-int4-rtn-g128","artifact_digest":"sha256:ab"}' > "$log""#;

    fn calls(options: &LocalOptions) -> String {
        std::fs::read_to_string(options.scratch.join("calls")).unwrap_or_default()
    }

    #[test]
    fn runs_stages_in_order_and_reports_ready() {
        let options = setup("ready", &script(QUANTIZE_OK, "true"));
        let mut out = Vec::new();
        let (status, outcome) = run_pipeline(&options, &mut out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome, Outcome::Ready);
        assert_eq!(calls(&options), "baseline\nquantize\nvalidate\n");
        assert_eq!(status.phase.as_deref(), Some("Ready"));
        assert_eq!(status.perplexity_delta.as_deref(), Some("+2.50%"));
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("perplexity") && text.contains("PASS"),
            "{text}"
        );
        assert!(text.contains("quantized/tiny/v1-int4-rtn-g128"), "{text}");
    }

    /// The data tree is the user's: local mode lets the worker follow its
    /// links out of `--root` (a Job's worker refuses them).
    #[test]
    fn the_worker_may_follow_links_out_of_the_root() {
        let options = setup("links", &script(QUANTIZE_OK, "true"));
        run_pipeline(&options, &mut Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        let args = std::fs::read_to_string(options.scratch.join("args")).unwrap_or_default();
        assert_eq!(args.lines().count(), 3, "{args}");
        assert!(
            args.lines().all(|l| l.contains(ALLOW_LINKS_OUT_OF_ROOT)),
            "{args}"
        );
    }

    #[test]
    fn failed_gate_stops_with_the_gate_named() {
        let options = setup("gates", &script(QUANTIZE_OK, "false"));
        let mut out = Vec::new();
        let (status, outcome) = run_pipeline(&options, &mut out).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&outcome, Outcome::GatesFailed(m) if m.contains("perplexity")),
            "{outcome:?}"
        );
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert!(String::from_utf8_lossy(&out).contains("FAIL"));
    }

    #[test]
    fn broken_stage_stops_the_pipeline_with_its_error() {
        let broken =
            r#"echo '{"stage":"quantize","variant":"","error":"out of memory"}' > "$log"; exit 1"#;
        let options = setup("broken", &script(broken, "true"));
        let mut out = Vec::new();
        let (status, outcome) = run_pipeline(&options, &mut out).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&outcome, Outcome::Broken(m) if m.contains("out of memory")),
            "{outcome:?}"
        );
        assert_eq!(calls(&options), "baseline\nquantize\n");
        assert_eq!(status.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn crash_without_summary_is_broken() {
        let options = setup("crash", &script("exit 3", "true"));
        let mut out = Vec::new();
        let (_, outcome) = run_pipeline(&options, &mut out).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&outcome, Outcome::Broken(m) if m.contains("without a summary")),
            "{outcome:?}"
        );
    }

    #[test]
    fn missing_worker_is_named() {
        let err = find_worker(Some(PathBuf::from("/nonexistent/quantizer-job")));
        assert!(matches!(err, Err(LocalError::NoWorker(m)) if m.contains("/nonexistent")));
    }
}
