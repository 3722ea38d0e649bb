//! The pipeline's state machine, shared by the reconciler and local mode so
//! that both sequence the stages and read their results the same way: which
//! stage comes after which, what each stage depends on (the hashes that name
//! the Jobs), and how a stage's summary or breakage maps to conditions,
//! phase and retries.

use crate::conditions::{self, ConditionUpdate, FALSE, TRUE, UNKNOWN};
use k8s_openapi::jiff::Timestamp;
use quantops_api::quantized_model::{StageRecord, StageState};
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

/// Records a spec the API server accepted but the pipeline cannot run (the
/// rules `spec_file::validate` has beyond the CRD's, a value that cannot be
/// rendered into a Job, a Job the API server refused): a refusal, not
/// retried until the spec changes. `message` starts with the field.
pub fn record_invalid(status: &mut QuantizedModelStatus, message: &str, obs: &Observation) {
    obs.set(status, READY, FALSE, INVALID_SPEC, message.to_string());
    status.phase = Some(Phase::Failed.as_str().to_string());
    status.progress = None;
}

/// The `Ready` reason of a spec the pipeline refuses.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Whether this generation was already refused: a refusal that came from
/// the API server (a Job it would not accept) is not tried again until the
/// spec changes.
pub fn refused(status: &QuantizedModelStatus, generation: Option<i64>) -> bool {
    conditions::find(&status.conditions, READY)
        .is_some_and(|c| c.reason == INVALID_SPEC && c.observed_generation == generation)
}

/// The `Ready` reason of a model whose artifact directory another model uses.
pub const OUTPUT_CONFLICT: &str = "OutputConflict";

/// Records that the model waits for another one that writes the same
/// artifact directory; nothing runs until that one is gone or moved.
pub fn record_conflict(status: &mut QuantizedModelStatus, message: &str, obs: &Observation) {
    obs.set(status, READY, FALSE, OUTPUT_CONFLICT, message.to_string());
    status.phase = Some(Phase::Pending.as_str().to_string());
    status.progress = None;
}

/// The Job a stage runs in, as its record names it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageRun {
    /// The stage hash ([`stage_hash`]) of the spec the Job runs.
    pub hash: String,
    pub job: String,
    /// Known once the Job was seen.
    pub job_uid: Option<String>,
}

fn set_record(status: &mut QuantizedModelStatus, stage: Stage, run: &StageRun, state: StageState) {
    status.stages.insert(
        stage.name().to_string(),
        StageRecord {
            hash: run.hash.clone(),
            job: run.job.clone(),
            job_uid: run.job_uid.clone(),
            state,
        },
    );
}

/// The record of `stage` when it is for `hash`, the current spec's; a
/// record of another hash belongs to an older spec and says nothing.
pub fn record<'s>(
    status: &'s QuantizedModelStatus,
    stage: Stage,
    hash: &str,
) -> Option<&'s StageRecord> {
    status
        .stages
        .get(stage.name())
        .filter(|record| record.hash == hash)
}

/// A stage's Job as the reconciler found it (by its deterministic name).
#[derive(Clone, Debug, PartialEq)]
pub enum JobSeen {
    Absent,
    /// Being deleted: a retried stage's previous run.
    Deleting,
    Running {
        uid: Option<String>,
    },
    Finished {
        uid: Option<String>,
        succeeded: bool,
    },
}

/// What a reconciliation does about one stage. Deciding from the stage's
/// record as well as its Job is what makes a completion count once: a Job
/// seen finished again (a stale cache, a second watch event, a Job not yet
/// deleted) finds its outcome recorded and is not counted, emitted or acted
/// on a second time.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Recorded as succeeded for this spec: on to the next stage, whatever
    /// became of its Job.
    Done,
    /// A final verdict for this spec (a gate failed, or the stage gave up):
    /// nothing more runs until the spec changes.
    Final,
    /// Start the stage: record it `Running`, then create its Job.
    Start,
    /// Recorded `Running` but its Job is gone (deleted by someone, or the
    /// operator stopped between recording and creating it): create it again.
    Recreate,
    /// Its Job runs: refresh progress and scheduling.
    Watch,
    /// Its Job finished and the outcome is not recorded yet: record it, and
    /// only once that write went through, count, emit and go on.
    Record { succeeded: bool },
    /// The Job of a broken run that is already recorded still exists: delete
    /// it (a retry needs its name; an unschedulable pod must not start later).
    Cleanup,
    /// Look again later: a previous Job is still going away, or the retry
    /// backoff is not over.
    Wait(Duration),
}

/// How often a Job that is being deleted is looked at again.
pub const DELETION_POLL: Duration = Duration::from_secs(5);

/// The step for a stage whose record alone decides it, without looking at
/// its Job: done, or final.
pub fn settled(status: &QuantizedModelStatus, stage: Stage, hash: &str) -> Option<Step> {
    match record(status, stage, hash)?.state {
        StageState::Succeeded => Some(Step::Done),
        StageState::GatesFailed => Some(Step::Final),
        StageState::Running | StageState::Broken => None,
    }
}

/// The step for `stage` from its record, its Job and the retry policy.
pub fn step(
    status: &QuantizedModelStatus,
    stage: Stage,
    hash: &str,
    job: &JobSeen,
    policy: &RetryPolicy,
    now: Timestamp,
) -> Step {
    if let Some(step) = settled(status, stage, hash) {
        return step;
    }
    let record = record(status, stage, hash);
    let state = record.map(|r| r.state);
    // The recorded broken run is this Job (uids agree, or one is unknown).
    let recorded_broken = |uid: &Option<String>| {
        state == Some(StageState::Broken)
            && record.is_some_and(|r| r.job_uid.is_none() || uid.is_none() || r.job_uid == *uid)
    };
    match job {
        JobSeen::Deleting => Step::Wait(DELETION_POLL),
        JobSeen::Absent if state == Some(StageState::Running) => Step::Recreate,
        JobSeen::Absent => {
            if gave_up(status, stage, policy) {
                Step::Final
            } else if let Some(wait) = retry_wait(status, stage, policy, now) {
                Step::Wait(wait)
            } else {
                Step::Start
            }
        }
        JobSeen::Running { uid } if recorded_broken(uid) => Step::Cleanup,
        JobSeen::Running { .. } => Step::Watch,
        JobSeen::Finished { uid, .. } if recorded_broken(uid) => {
            if gave_up(status, stage, policy) {
                // The failed Job stays for its logs until the spec changes.
                Step::Final
            } else {
                Step::Cleanup
            }
        }
        JobSeen::Finished { succeeded, .. } => Step::Record {
            succeeded: *succeeded,
        },
    }
}

/// Re-states a stage recorded as succeeded for the observed generation (a
/// spec change that left its inputs alone keeps its result).
pub fn confirm_done(status: &mut QuantizedModelStatus, stage: Stage, obs: &Observation) {
    if let Some(condition) = conditions::find(&status.conditions, stage.condition_type()).cloned() {
        obs.set(
            status,
            stage.condition_type(),
            &condition.status,
            &condition.reason,
            condition.message,
        );
    }
}

/// Re-states `Ready` once every stage is recorded as succeeded: after a
/// refusal was lifted, or a spec change that re-ran nothing.
pub fn confirm_ready(status: &mut QuantizedModelStatus, obs: &Observation) {
    obs.set(
        status,
        READY,
        TRUE,
        "Validated",
        "the variant passed every gate".into(),
    );
    status.phase = Some(Phase::Ready.as_str().to_string());
    status.progress = None;
}

/// Re-states a final verdict already recorded for `stage` (gates failed, or
/// given up): `Ready=False` with the stage condition's reason and message,
/// phase `Failed`.
pub fn confirm_final(status: &mut QuantizedModelStatus, stage: Stage, obs: &Observation) {
    confirm_done(status, stage, obs);
    let (reason, message) = conditions::find(&status.conditions, stage.condition_type())
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_else(|| ("StageFailed".to_string(), format!("{stage} failed")));
    obs.set(status, READY, FALSE, &reason, message);
    status.phase = Some(Phase::Failed.as_str().to_string());
    status.progress = None;
}

/// Forgets the results of `stage` and of every later stage, which a re-run
/// is about to replace; stale figures must not sit beside a running stage.
fn clear_results_from(status: &mut QuantizedModelStatus, stage: Stage) {
    for later in Stage::PIPELINE.iter().skip_while(|s| **s != stage).skip(1) {
        status.stages.remove(later.name());
    }
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

/// The reason of a running stage's condition while its pod cannot be scheduled.
pub const UNSCHEDULABLE: &str = "Unschedulable";

/// Records that `stage` is running (its Job exists, or its process
/// started): results of it and of later stages are forgotten, later
/// stages' records too (they depend on this one's output).
pub fn mark_running(
    status: &mut QuantizedModelStatus,
    stage: Stage,
    run: &StageRun,
    detail: &str,
    obs: &Observation,
) {
    clear_results_from(status, stage);
    set_record(status, stage, run, StageState::Running);
    status.phase = Some(stage.phase().as_str().to_string());
    let was_unschedulable = conditions::find(&status.conditions, stage.condition_type())
        .is_some_and(|c| c.reason == UNSCHEDULABLE);
    if was_unschedulable
        || status.progress.is_none()
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

/// Records that a running stage's pod cannot be scheduled, quoting the
/// scheduler, after [`mark_running`] for the same observation.
pub fn mark_unschedulable(
    status: &mut QuantizedModelStatus,
    stage: Stage,
    pod: &str,
    scheduler_message: &str,
    obs: &Observation,
) {
    let message = format!("pod {pod} cannot be scheduled: {scheduler_message}");
    obs.set(
        status,
        stage.condition_type(),
        UNKNOWN,
        UNSCHEDULABLE,
        message.clone(),
    );
    obs.set(
        status,
        READY,
        FALSE,
        UNSCHEDULABLE,
        format!("{stage}: {message}"),
    );
    status.progress = Some(
        format!("{stage}: pending, unschedulable: {scheduler_message}")
            .chars()
            .take(PROGRESS_LENGTH)
            .collect(),
    );
}

/// Longest `status.progress`, to stay readable in `kubectl get`.
pub const PROGRESS_LENGTH: usize = 120;

/// Records a stage that ran (exit 0) and says what comes next.
pub fn record_success(
    status: &mut QuantizedModelStatus,
    stage: Stage,
    run: &StageRun,
    summary: &StageSummary,
    obs: &Observation,
) -> Next {
    set_record(status, stage, run, StageState::Succeeded);
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
            set_record(status, stage, run, StageState::GatesFailed);
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
    run: &StageRun,
    error: &str,
    policy: &RetryPolicy,
    obs: &Observation,
) -> Next {
    set_record(status, stage, run, StageState::Broken);
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

    /// The run of `stage` for the test spec, as a Job named after the stage.
    fn run(stage: Stage) -> StageRun {
        StageRun {
            hash: stage_hash(&spec(), stage),
            job: format!("x-{stage}"),
            job_uid: Some(format!("uid-{stage}")),
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
        mark_running(
            &mut status,
            Stage::Baseline,
            &run(Stage::Baseline),
            "job x",
            &obs(1),
        );
        assert_eq!(status.phase.as_deref(), Some("Baseline"));
        let baseline = StageSummary {
            stage: "baseline".into(),
            variant: "v".into(),
            baseline_perplexity: Some(20.0),
            ..Default::default()
        };
        assert_eq!(
            record_success(
                &mut status,
                Stage::Baseline,
                &run(Stage::Baseline),
                &baseline,
                &obs(2)
            ),
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
            record_success(
                &mut status,
                Stage::Validate,
                &run(Stage::Validate),
                &validate,
                &obs(3)
            ),
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
        let next = record_success(
            &mut status,
            Stage::Validate,
            &run(Stage::Validate),
            &summary,
            &obs(1),
        );
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
        mark_running(
            &mut status,
            Stage::Quantize,
            &run(Stage::Quantize),
            "job",
            &obs(0),
        );
        assert_eq!(
            record_broken(
                &mut status,
                Stage::Quantize,
                &run(Stage::Quantize),
                "oom",
                &policy,
                &obs(100)
            ),
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
        mark_running(
            &mut status,
            Stage::Quantize,
            &run(Stage::Quantize),
            "job",
            &obs(131),
        );
        assert_eq!(
            record_broken(
                &mut status,
                Stage::Quantize,
                &run(Stage::Quantize),
                "oom",
                &policy,
                &obs(200)
            ),
            Next::RetryAfter(Duration::from_secs(60))
        );
        let next = record_broken(
            &mut status,
            Stage::Quantize,
            &run(Stage::Quantize),
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
        mark_running(
            &mut status,
            Stage::Quantize,
            &run(Stage::Quantize),
            "job",
            &obs(1),
        );
        assert_eq!(status.baseline_perplexity, Some(20.0));
        assert_eq!(status.artifact_path, None);
        assert!(status.gates.is_empty() && status.perplexity_delta.is_none());

        record_invalid(
            &mut status,
            "spec.version: expected a non-empty version without '/'",
            &obs(2),
        );
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        let ready = conditions::find(&status.conditions, READY);
        assert_eq!(ready.map(|c| c.reason.as_str()), Some("InvalidSpec"));
        assert!(ready.is_some_and(|c| c.message.starts_with("spec.version")));
        assert!(
            refused(&status, Some(1)),
            "not tried again for this generation"
        );
        assert!(!refused(&status, Some(2)), "a new spec is looked at afresh");
    }

    fn finished(stage: Stage, succeeded: bool) -> JobSeen {
        JobSeen::Finished {
            uid: Some(format!("uid-{stage}")),
            succeeded,
        }
    }

    fn step_at(status: &QuantizedModelStatus, stage: Stage, job: &JobSeen, at: i64) -> Step {
        let hash = stage_hash(&spec(), stage);
        step(
            status,
            stage,
            &hash,
            job,
            &RetryPolicy::default(),
            obs(at).now,
        )
    }

    /// A finished Job is recorded once: seen again (a stale cache, another
    /// watch event) its outcome is found in the record, and seen gone (its
    /// Job deleted) the stage is still done; only a new hash runs it again.
    #[test]
    fn a_finished_job_is_recorded_once_and_stays_done() {
        let stage = Stage::Baseline;
        let mut status = QuantizedModelStatus::default();
        assert_eq!(step_at(&status, stage, &JobSeen::Absent, 0), Step::Start);
        let started = StageRun {
            job_uid: None,
            ..run(stage)
        };
        mark_running(&mut status, stage, &started, "started", &obs(1));
        assert_eq!(step_at(&status, stage, &JobSeen::Absent, 2), Step::Recreate);
        let running = JobSeen::Running {
            uid: Some("uid-baseline".into()),
        };
        assert_eq!(step_at(&status, stage, &running, 2), Step::Watch);
        assert_eq!(
            step_at(&status, stage, &finished(stage, true), 3),
            Step::Record { succeeded: true }
        );
        let summary = StageSummary {
            stage: "baseline".into(),
            baseline_perplexity: Some(20.0),
            ..Default::default()
        };
        record_success(&mut status, stage, &run(stage), &summary, &obs(4));
        let record = status.stages.get("baseline").cloned();
        assert_eq!(record.map(|r| r.state), Some(StageState::Succeeded));
        for job in [finished(stage, true), JobSeen::Absent, running] {
            assert_eq!(step_at(&status, stage, &job, 5), Step::Done, "{job:?}");
        }
        assert_eq!(
            settled(&status, stage, &stage_hash(&spec(), stage)),
            Some(Step::Done),
            "decided without looking at the Job"
        );
        // Another spec (another hash): the record says nothing about it.
        assert_eq!(settled(&status, stage, "another-hash"), None);
        assert_eq!(
            step(
                &status,
                stage,
                "another-hash",
                &JobSeen::Absent,
                &RetryPolicy::default(),
                obs(6).now
            ),
            Step::Start
        );
    }

    /// A broken run is counted once: its Job, seen again before it is
    /// deleted, is cleaned up, not counted; the retry waits for the backoff
    /// and for the old Job to be gone; a given-up stage is final.
    #[test]
    fn a_broken_run_is_counted_once_then_retried_then_final() {
        let stage = Stage::Quantize;
        let policy = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_secs(30),
        };
        let at = |status: &QuantizedModelStatus, job: &JobSeen, t: i64| {
            step(
                status,
                stage,
                &stage_hash(&spec(), stage),
                job,
                &policy,
                obs(t).now,
            )
        };
        let mut status = QuantizedModelStatus::default();
        mark_running(&mut status, stage, &run(stage), "running", &obs(0));
        assert_eq!(
            at(&status, &finished(stage, false), 10),
            Step::Record { succeeded: false }
        );
        record_broken(&mut status, stage, &run(stage), "oom", &policy, &obs(10));
        assert_eq!(status.stage_attempts.get("quantize"), Some(&1));
        assert_eq!(at(&status, &finished(stage, false), 11), Step::Cleanup);
        assert_eq!(
            at(&status, &JobSeen::Deleting, 12),
            Step::Wait(DELETION_POLL)
        );
        assert_eq!(
            at(&status, &JobSeen::Absent, 20),
            Step::Wait(Duration::from_secs(20))
        );
        assert_eq!(at(&status, &JobSeen::Absent, 40), Step::Start);

        // The retry's Job is another one: its failure counts.
        let retry = StageRun {
            job_uid: None,
            ..run(stage)
        };
        mark_running(&mut status, stage, &retry, "started", &obs(41));
        let second = JobSeen::Finished {
            uid: Some("uid-second".into()),
            succeeded: false,
        };
        assert_eq!(at(&status, &second, 50), Step::Record { succeeded: false });
        let second_run = StageRun {
            job_uid: Some("uid-second".into()),
            ..run(stage)
        };
        let next = record_broken(&mut status, stage, &second_run, "oom", &policy, &obs(50));
        assert!(matches!(next, Next::GaveUp(_)), "{next:?}");
        // Given up: the failed Job stays for its logs; one still running
        // (an unschedulable pod) is deleted.
        assert_eq!(at(&status, &second, 60), Step::Final);
        assert_eq!(at(&status, &JobSeen::Absent, 60), Step::Final);
        let pending = JobSeen::Running {
            uid: Some("uid-second".into()),
        };
        assert_eq!(at(&status, &pending, 60), Step::Cleanup);
    }

    #[test]
    fn a_gate_failure_is_final_and_a_ready_model_stays_ready() {
        let mut status = QuantizedModelStatus::default();
        let failing = StageSummary {
            stage: "validate".into(),
            overall_pass: Some(false),
            gates: vec![gate("perplexity", false)],
            ..Default::default()
        };
        record_success(
            &mut status,
            Stage::Validate,
            &run(Stage::Validate),
            &failing,
            &obs(1),
        );
        assert_eq!(
            step_at(&status, Stage::Validate, &JobSeen::Absent, 2),
            Step::Final
        );

        // Every stage recorded: a new generation that changed no stage
        // input (say, resources) re-states the results for it.
        let mut status = QuantizedModelStatus::default();
        observe_generation(&mut status, &obs(0));
        for stage in Stage::PIPELINE {
            let summary = StageSummary {
                stage: stage.name().into(),
                overall_pass: Some(true),
                ..Default::default()
            };
            record_success(&mut status, stage, &run(stage), &summary, &obs(1));
        }
        record_invalid(&mut status, "spec.resources.memory: bad", &obs(2));
        let second = Observation {
            generation: Some(2),
            now: obs(3).now,
        };
        observe_generation(&mut status, &second);
        for stage in Stage::PIPELINE {
            assert_eq!(step_at(&status, stage, &JobSeen::Absent, 3), Step::Done);
            confirm_done(&mut status, stage, &second);
        }
        confirm_ready(&mut status, &second);
        assert_eq!(status.phase.as_deref(), Some("Ready"));
        assert!(conditions::is_true(&status.conditions, READY));
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(2)),
            "{:?}",
            status.conditions
        );

        // Re-running quantize forgets validate's record: its input changes.
        mark_running(
            &mut status,
            Stage::Quantize,
            &run(Stage::Quantize),
            "r",
            &obs(4),
        );
        assert!(status.stages.contains_key("baseline"));
        assert!(!status.stages.contains_key("validate"));
        let quantize = status.stages.get("quantize").map(|r| r.state);
        assert_eq!(quantize, Some(StageState::Running));
    }

    #[test]
    fn an_unschedulable_pod_shows_in_conditions_and_progress() {
        let stage = Stage::Baseline;
        let mut status = QuantizedModelStatus::default();
        mark_running(&mut status, stage, &run(stage), "running", &obs(1));
        let scheduler = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.";
        mark_unschedulable(&mut status, stage, "x-baseline-abc", scheduler, &obs(2));
        let condition = conditions::find(&status.conditions, "BaselineReady").cloned();
        assert_eq!(condition.as_ref().map(|c| c.status.as_str()), Some(UNKNOWN));
        assert_eq!(
            condition.map(|c| (c.reason, c.message)),
            Some((
                UNSCHEDULABLE.to_string(),
                format!("pod x-baseline-abc cannot be scheduled: {scheduler}")
            ))
        );
        let ready = conditions::find(&status.conditions, READY);
        assert_eq!(ready.map(|c| c.reason.as_str()), Some(UNSCHEDULABLE));
        assert_eq!(
            status.progress.as_deref(),
            Some(
                "baseline: pending, unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
            )
        );
        // Scheduled after all: back to running.
        mark_running(&mut status, stage, &run(stage), "running", &obs(3));
        assert_eq!(status.progress.as_deref(), Some("baseline: running"));
        let condition = conditions::find(&status.conditions, "BaselineReady");
        assert_eq!(condition.map(|c| c.reason.as_str()), Some("Running"));
    }

    #[test]
    fn a_conflict_waits_in_pending() {
        let mut status = QuantizedModelStatus::default();
        record_conflict(&mut status, "spec.output: taken", &obs(1));
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let ready = conditions::find(&status.conditions, READY);
        assert_eq!(ready.map(|c| c.reason.as_str()), Some(OUTPUT_CONFLICT));
        assert!(!refused(&status, Some(1)), "a conflict is looked at again");
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
