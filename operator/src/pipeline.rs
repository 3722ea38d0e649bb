//! The pipeline's state machine, shared by the reconciler and local mode so
//! that both sequence the stages and read their results the same way: which
//! stage comes after which, what each stage depends on (the hashes that name
//! the Jobs), and how a stage's summary or breakage maps to conditions,
//! phase and retries.

use crate::conditions::{self, ConditionUpdate, FALSE, TRUE, UNKNOWN};
use k8s_openapi::jiff::Timestamp;
use quantops_api::report::GateResult;
use quantops_api::{QuantizedModelSpec, QuantizedModelStatus, StageSummary};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// The condition that is `True` once the variant is validated and passed.
pub const READY: &str = "Ready";

/// A stage the operator runs as one Job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Baseline,
    Quantize,
    Validate,
}

impl Stage {
    /// The stages in the order they run.
    pub const PIPELINE: [Stage; 3] = [Stage::Baseline, Stage::Quantize, Stage::Validate];

    /// The worker subcommand, also used in Job names, metrics and `stageAttempts`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Baseline => "baseline",
            Stage::Quantize => "quantize",
            Stage::Validate => "validate",
        }
    }

    /// The condition that records this stage's outcome.
    pub fn condition_type(self) -> &'static str {
        match self {
            Stage::Baseline => "BaselineReady",
            Stage::Quantize => "Quantized",
            Stage::Validate => "Validated",
        }
    }

    /// The phase shown while this stage runs.
    pub fn phase(self) -> Phase {
        match self {
            Stage::Baseline => Phase::Baseline,
            Stage::Quantize => Phase::Quantizing,
            Stage::Validate => Phase::Validating,
        }
    }

    /// The stage after this one, if any.
    pub fn next(self) -> Option<Stage> {
        match self {
            Stage::Baseline => Some(Stage::Quantize),
            Stage::Quantize => Some(Stage::Validate),
            Stage::Validate => None,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `status.phase`, for humans; conditions are what machines should read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Baseline,
    Quantizing,
    Validating,
    Ready,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Baseline,
        Phase::Quantizing,
        Phase::Validating,
        Phase::Ready,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Baseline => "Baseline",
            Phase::Quantizing => "Quantizing",
            Phase::Validating => "Validating",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
        }
    }
}

/// Hex sha256 of the JSON of `parts`, cut to `len` characters.
fn digest(parts: &[serde_json::Value], len: usize) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.to_string().as_bytes());
        hasher.update([0u8]);
    }
    let mut text = hex::encode(hasher.finalize());
    text.truncate(len);
    text
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A short hash of the spec fields a stage depends on, chained so that a
/// change re-runs exactly what it affects: the checkpoint, evaluation data or
/// output location → every stage; the recipe, calibration or version →
/// quantize and validate; the gates → validate only. Resources are left
/// out: they change where a stage runs, not what it produces.
pub fn stage_hash(spec: &QuantizedModelSpec, stage: Stage) -> String {
    let mut evaluation = spec.validation.clone();
    evaluation.gates = Default::default();
    let baseline = digest(
        &[
            json(&spec.base_model),
            json(&evaluation),
            json(&spec.output),
        ],
        16,
    );
    if stage == Stage::Baseline {
        return baseline;
    }
    let quantize = digest(
        &[
            json(&baseline),
            json(&spec.version),
            json(&spec.quantization),
            json(&spec.calibration),
        ],
        16,
    );
    if stage == Stage::Quantize {
        return quantize;
    }
    digest(&[json(&quantize), json(&spec.validation.gates)], 16)
}

/// Short hash of arbitrary text, for names that must stay unique when cut.
pub fn short_hash(text: &str, len: usize) -> String {
    digest(&[serde_json::Value::String(text.to_string())], len)
}

/// How often a broken stage is tried, and how long to wait between tries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Runs of one stage (the first included) before the model is Failed.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next run after `failures` failed runs:
    /// `base · 2^(failures-1)`, capped to avoid overflow.
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        self.base_delay.saturating_mul(1u32 << exponent)
    }
}

/// What the pipeline does after a stage's outcome was recorded.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Run this stage next.
    Run(Stage),
    /// All stages ran and every gate passed.
    Ready,
    /// Gates failed: a result, not retried.
    GatesFailed(String),
    /// The stage broke and will be tried again after the delay.
    RetryAfter(Duration),
    /// The stage broke too often; the error is in the stage's condition.
    GaveUp(String),
}

/// Everything a status update needs besides the status itself.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub generation: Option<i64>,
    pub now: Timestamp,
}

impl Observation {
    fn set(
        &self,
        status: &mut QuantizedModelStatus,
        type_: &str,
        status_value: &str,
        reason: &str,
        message: String,
    ) {
        conditions::set_condition(
            &mut status.conditions,
            ConditionUpdate {
                type_,
                status: status_value,
                reason,
                message,
            },
            self.generation,
            self.now,
        );
    }
}

/// Starts tracking a new generation: failed attempts of an older spec do
/// not count against the new one.
pub fn observe_generation(status: &mut QuantizedModelStatus, obs: &Observation) {
    if status.observed_generation != obs.generation {
        status.stage_attempts.clear();
        status.observed_generation = obs.generation;
    }
    if status.phase.is_none() {
        status.phase = Some(Phase::Pending.as_str().to_string());
    }
}

/// Records a spec the API server accepted but the pipeline cannot run
/// (the rules `spec_file::validate` has beyond the CRD's CEL rules): a
/// refusal, not retried until the spec changes.
pub fn record_invalid(
    status: &mut QuantizedModelStatus,
    field: &str,
    expected: &str,
    obs: &Observation,
) -> String {
    let message = format!("{field}: expected {expected}");
    obs.set(status, READY, FALSE, "InvalidSpec", message.clone());
    status.phase = Some(Phase::Failed.as_str().to_string());
    status.progress = None;
    message
}

/// Forgets the results of `stage` and of every later stage, which a re-run
/// is about to replace; stale figures must not sit beside a running stage.
fn clear_results_from(status: &mut QuantizedModelStatus, stage: Stage) {
    if stage == Stage::Baseline {
        status.baseline_perplexity = None;
    }
    if matches!(stage, Stage::Baseline | Stage::Quantize) {
        status.artifact_path = None;
        status.artifact_digest = None;
    }
    status.quantized_perplexity = None;
    status.perplexity_delta = None;
    status.gates.clear();
}

/// Records that `stage` is running (its Job exists, or its process started).
pub fn mark_running(
    status: &mut QuantizedModelStatus,
    stage: Stage,
    detail: &str,
    obs: &Observation,
) {
    clear_results_from(status, stage);
    status.phase = Some(stage.phase().as_str().to_string());
    if status.progress.is_none()
        || !status
            .progress
            .as_deref()
            .is_some_and(|p| p.starts_with(stage.name()))
    {
        status.progress = Some(format!("{stage}: running"));
    }
    obs.set(
        status,
        stage.condition_type(),
        UNKNOWN,
        "Running",
        detail.to_string(),
    );
    for later in Stage::PIPELINE.iter().skip_while(|s| **s != stage).skip(1) {
        obs.set(
            status,
            later.condition_type(),
            UNKNOWN,
            "Waiting",
            format!("waiting for {stage}"),
        );
    }
    obs.set(
        status,
        READY,
        FALSE,
        "InProgress",
        format!("{stage} is running"),
    );
}

/// Records a stage that ran (exit 0) and says what comes next.
pub fn record_success(
    status: &mut QuantizedModelStatus,
    stage: Stage,
    summary: &StageSummary,
    obs: &Observation,
) -> Next {
    if !summary.variant.is_empty() {
        status.variant = Some(summary.variant.clone());
    }
    status.stage_attempts.remove(stage.name());
    match stage {
        Stage::Baseline => {
            if summary.baseline_perplexity.is_some() {
                status.baseline_perplexity = summary.baseline_perplexity;
            }
            let message = match summary.baseline_perplexity {
                Some(ppl) => format!("baseline perplexity {ppl:.4}"),
                None => "baseline evaluated".to_string(),
            };
            obs.set(status, stage.condition_type(), TRUE, "Succeeded", message);
        }
        Stage::Quantize => {
            if summary.artifact_path.is_some() {
                status.artifact_path = summary.artifact_path.clone();
            }
            if summary.artifact_digest.is_some() {
                status.artifact_digest = summary.artifact_digest.clone();
            }
            let message = match &summary.artifact_path {
                Some(path) => format!("artifact written to {path}"),
                None => "quantized".to_string(),
            };
            obs.set(status, stage.condition_type(), TRUE, "Succeeded", message);
        }
        Stage::Validate => {
            if summary.baseline_perplexity.is_some() {
                status.baseline_perplexity = summary.baseline_perplexity;
            }
            status.quantized_perplexity = summary.quantized_perplexity;
            status.perplexity_delta =
                perplexity_delta(status.baseline_perplexity, status.quantized_perplexity);
            status.gates = summary.gates.clone();
            if summary.artifact_path.is_some() {
                status.artifact_path = summary.artifact_path.clone();
            }
            if summary.artifact_digest.is_some() {
                status.artifact_digest = summary.artifact_digest.clone();
            }
            let failed: Vec<&GateResult> = summary.gates.iter().filter(|g| !g.passed).collect();
            let passed = summary.overall_pass.unwrap_or(failed.is_empty()) && failed.is_empty();
            status.progress = None;
            if passed {
                obs.set(
                    status,
                    stage.condition_type(),
                    TRUE,
                    "GatesPassed",
                    format!("all {} gates passed", summary.gates.len()),
                );
                obs.set(
                    status,
                    READY,
                    TRUE,
                    "Validated",
                    "the variant passed every gate".into(),
                );
                status.phase = Some(Phase::Ready.as_str().to_string());
                return Next::Ready;
            }
            let message = gate_failure_message(&failed);
            obs.set(
                status,
                stage.condition_type(),
                FALSE,
                "GatesFailed",
                message.clone(),
            );
            obs.set(status, READY, FALSE, "GatesFailed", message.clone());
            status.phase = Some(Phase::Failed.as_str().to_string());
            return Next::GatesFailed(message);
        }
    }
    match stage.next() {
        Some(next) => Next::Run(next),
        None => Next::Ready,
    }
}

/// Records a stage that broke (non-zero exit or failed Job): counts the
/// attempt and either schedules a retry or gives up.
pub fn record_broken(
    status: &mut QuantizedModelStatus,
    stage: Stage,
    error: &str,
    policy: &RetryPolicy,
    obs: &Observation,
) -> Next {
    let attempts = status
        .stage_attempts
        .entry(stage.name().to_string())
        .or_insert(0);
    *attempts += 1;
    let failures = *attempts;
    if failures >= policy.max_attempts {
        let message = format!("{stage} failed {failures} time(s), giving up: {error}");
        obs.set(
            status,
            stage.condition_type(),
            FALSE,
            "StageFailed",
            message.clone(),
        );
        obs.set(status, READY, FALSE, "StageFailed", message.clone());
        status.phase = Some(Phase::Failed.as_str().to_string());
        status.progress = None;
        return Next::GaveUp(message);
    }
    let delay = policy.delay(failures);
    let message = format!(
        "{stage} attempt {failures} of {} failed, retrying in {}s: {error}",
        policy.max_attempts,
        delay.as_secs()
    );
    obs.set(
        status,
        stage.condition_type(),
        FALSE,
        "StageFailed",
        message,
    );
    status.progress = Some(format!("{stage}: retrying in {}s", delay.as_secs()));
    Next::RetryAfter(delay)
}

/// How much longer a broken stage must wait before its next run, judged from
/// when its condition turned False; `None` once the wait is over or when
/// the stage has not failed.
pub fn retry_wait(
    status: &QuantizedModelStatus,
    stage: Stage,
    policy: &RetryPolicy,
    now: Timestamp,
) -> Option<Duration> {
    let failures = status
        .stage_attempts
        .get(stage.name())
        .copied()
        .unwrap_or(0);
    if failures == 0 {
        return None;
    }
    let condition = conditions::find(&status.conditions, stage.condition_type())?;
    if condition.status != FALSE || condition.reason != "StageFailed" {
        return None;
    }
    let since = now.duration_since(condition.last_transition_time.0);
    let elapsed = Duration::try_from(since).unwrap_or(Duration::ZERO);
    policy
        .delay(failures)
        .checked_sub(elapsed)
        .filter(|d| !d.is_zero())
}

/// Whether a stage has used up its attempts for the observed generation.
pub fn gave_up(status: &QuantizedModelStatus, stage: Stage, policy: &RetryPolicy) -> bool {
    status
        .stage_attempts
        .get(stage.name())
        .copied()
        .unwrap_or(0)
        >= policy.max_attempts
}

/// `+0.64%`: the relative perplexity change, for `kubectl get qm`.
pub fn perplexity_delta(baseline: Option<f64>, quantized: Option<f64>) -> Option<String> {
    let (b, q) = (baseline?, quantized?);
    if !(b.is_finite() && q.is_finite()) || b <= 0.0 {
        return None;
    }
    Some(format!("{:+.2}%", (q - b) / b * 100.0))
}

/// Names each failed gate with its value, threshold and baseline.
pub fn gate_failure_message(failed: &[&GateResult]) -> String {
    if failed.is_empty() {
        return "the worker reported overall_pass=false without a failed gate".to_string();
    }
    let parts: Vec<String> = failed
        .iter()
        .map(|g| {
            let baseline = g
                .baseline
                .map(|b| format!(", baseline {b:.4}"))
                .unwrap_or_default();
            format!(
                "{} ({} {:.4}, threshold {:.4}{baseline})",
                g.name, g.metric, g.value, g.threshold
            )
        })
        .collect();
    format!("gate(s) failed: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::spec_file::parse_quantized_model;

    const SPEC: &str = "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: x}\nspec:\n  baseModel: {name: example/tiny-llama, path: m}\n  version: v1\n  quantization: {method: gptq, bits: 4, groupSize: 128}\n  calibration: {path: c.txt}\n  validation:\n    evalText: {path: e.txt}\n";

    fn spec() -> QuantizedModelSpec {
        parse_quantized_model(SPEC, "test")
            .map(|qm| qm.spec)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn obs(seconds: i64) -> Observation {
        Observation {
            generation: Some(1),
            now: Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH),
        }
    }

    fn gate(name: &str, passed: bool) -> GateResult {
        GateResult {
            name: name.into(),
            metric: format!("{name}_metric"),
            baseline: Some(10.0),
            value: 4.5,
            threshold: 3.0,
            passed,
        }
    }

    #[test]
    fn hashes_rerun_only_what_a_change_affects() {
        let base = spec();
        let hashes = |s: &QuantizedModelSpec| Stage::PIPELINE.map(|st| stage_hash(s, st));
        let before = hashes(&base);

        let mut gates = base.clone();
        gates.validation.gates.max_perplexity_increase_percent = 5.0;
        let after = hashes(&gates);
        assert_eq!(before[0], after[0]);
        assert_eq!(before[1], after[1]);
        assert_ne!(before[2], after[2]);

        let mut recipe = base.clone();
        recipe.quantization.bits = 8;
        let after = hashes(&recipe);
        assert_eq!(before[0], after[0]);
        assert_ne!(before[1], after[1]);
        assert_ne!(before[2], after[2]);

        let mut eval = base.clone();
        eval.base_model.path = "other".into();
        let after = hashes(&eval);
        assert!(before.iter().zip(after.iter()).all(|(a, b)| a != b));

        let mut resources = base.clone();
        resources.resources.gpus = 4;
        assert_eq!(before, hashes(&resources));
    }

    #[test]
    fn successful_stages_advance_to_ready() {
        let mut status = QuantizedModelStatus::default();
        observe_generation(&mut status, &obs(0));
        mark_running(&mut status, Stage::Baseline, "job x", &obs(1));
        assert_eq!(status.phase.as_deref(), Some("Baseline"));
        let baseline = StageSummary {
            stage: "baseline".into(),
            variant: "v".into(),
            baseline_perplexity: Some(20.0),
            ..Default::default()
        };
        assert_eq!(
            record_success(&mut status, Stage::Baseline, &baseline, &obs(2)),
            Next::Run(Stage::Quantize)
        );
        assert!(conditions::is_true(&status.conditions, "BaselineReady"));
        let validate = StageSummary {
            stage: "validate".into(),
            variant: "v".into(),
            overall_pass: Some(true),
            quantized_perplexity: Some(20.128),
            gates: vec![gate("perplexity", true)],
            ..Default::default()
        };
        assert_eq!(
            record_success(&mut status, Stage::Validate, &validate, &obs(3)),
            Next::Ready
        );
        assert_eq!(status.phase.as_deref(), Some("Ready"));
        assert_eq!(status.perplexity_delta.as_deref(), Some("+0.64%"));
        assert!(conditions::is_true(&status.conditions, READY));
    }

    #[test]
    fn failed_gate_is_a_result_naming_the_gate() {
        let mut status = QuantizedModelStatus::default();
        let summary = StageSummary {
            stage: "validate".into(),
            overall_pass: Some(false),
            gates: vec![gate("perplexity", false), gate("task_accuracy", true)],
            ..Default::default()
        };
        let next = record_success(&mut status, Stage::Validate, &summary, &obs(1));
        let Next::GatesFailed(message) = next else {
            panic!("expected GatesFailed, got {next:?}");
        };
        assert!(
            message.contains("perplexity") && !message.contains("task_accuracy"),
            "{message}"
        );
        let validated = conditions::find(&status.conditions, "Validated");
        assert_eq!(validated.map(|c| c.status.as_str()), Some(FALSE));
        assert_eq!(validated.map(|c| c.reason.as_str()), Some("GatesFailed"));
        assert!(validated.is_some_and(|c| c.message.contains("perplexity")));
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert!(
            status.stage_attempts.is_empty(),
            "a gate failure is not a retry"
        );
    }

    #[test]
    fn broken_stage_retries_with_backoff_then_gives_up() {
        let policy = RetryPolicy::default();
        let mut status = QuantizedModelStatus::default();
        mark_running(&mut status, Stage::Quantize, "job", &obs(0));
        assert_eq!(
            record_broken(&mut status, Stage::Quantize, "oom", &policy, &obs(100)),
            Next::RetryAfter(Duration::from_secs(30))
        );
        assert_eq!(
            retry_wait(&status, Stage::Quantize, &policy, obs(110).now),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            retry_wait(&status, Stage::Quantize, &policy, obs(130).now),
            None
        );
        mark_running(&mut status, Stage::Quantize, "job", &obs(131));
        assert_eq!(
            record_broken(&mut status, Stage::Quantize, "oom", &policy, &obs(200)),
            Next::RetryAfter(Duration::from_secs(60))
        );
        let next = record_broken(
            &mut status,
            Stage::Quantize,
            "oom again",
            &policy,
            &obs(300),
        );
        assert!(
            matches!(&next, Next::GaveUp(m) if m.contains("oom again")),
            "{next:?}"
        );
        assert!(gave_up(&status, Stage::Quantize, &policy));
        assert_eq!(status.phase.as_deref(), Some("Failed"));

        // A new generation starts counting afresh.
        observe_generation(
            &mut status,
            &Observation {
                generation: Some(2),
                now: obs(400).now,
            },
        );
        assert!(!gave_up(&status, Stage::Quantize, &policy));
    }

    #[test]
    fn rerun_forgets_stale_results_and_invalid_spec_is_refused() {
        let mut status = QuantizedModelStatus {
            baseline_perplexity: Some(20.0),
            quantized_perplexity: Some(21.0),
            perplexity_delta: Some("+5.00%".into()),
            artifact_path: Some("a".into()),
            gates: vec![gate("perplexity", false)],
            ..Default::default()
        };
        mark_running(&mut status, Stage::Quantize, "job", &obs(1));
        assert_eq!(status.baseline_perplexity, Some(20.0));
        assert_eq!(status.artifact_path, None);
        assert!(status.gates.is_empty() && status.perplexity_delta.is_none());

        let message = record_invalid(
            &mut status,
            "spec.version",
            "a non-empty version without '/'",
            &obs(2),
        );
        assert!(message.starts_with("spec.version"));
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        let ready = conditions::find(&status.conditions, READY);
        assert_eq!(ready.map(|c| c.reason.as_str()), Some("InvalidSpec"));
    }

    #[test]
    fn delays_double() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(1), Duration::from_secs(30));
        assert_eq!(policy.delay(2), Duration::from_secs(60));
        assert_eq!(policy.delay(3), Duration::from_secs(120));
    }

    #[test]
    fn delta_formats() {
        assert_eq!(
            perplexity_delta(Some(10.0), Some(9.9)).as_deref(),
            Some("-1.00%")
        );
        assert_eq!(perplexity_delta(Some(0.0), Some(9.9)), None);
    }
}
