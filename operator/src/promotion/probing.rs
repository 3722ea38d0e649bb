//! The quality step of a promotion's reconciliation, from the moment Argo
//! CD has synced it: keep the probe CronJob applied, turn every finished
//! probe Job into a sample of `status.quality`, and say what the window
//! means in the `QualityProbing` and `QualityDegraded` conditions.
//!
//! It starts at `Synced`, not at `Promoted`: in prod the canary's analysis
//! holds the new pods to the quality score, so the probe has to run while
//! the canary does; outside prod `Synced` and `Promoted` are the same pass.
//! A rolled-back promotion's CronJob is deleted ([`stop`]), not suspended:
//! its Service now serves the previous variant (or nothing), so probing on
//! would only measure the wrong thing; the samples stay in status.

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use quantops_api::{ProbeResult, QualitySample, QuantizedModel};

use super::controller::{Error, Pass};
use super::probe_job::{self, PROMOTION_ANNOTATION, PROMOTION_LABEL, ProbeInputs};
use super::quality;
use super::{QUALITY_DEGRADED, QUALITY_PROBING};
use crate::conditions::{self, FALSE, TRUE};
use crate::k8s::{self, JobState, KubeContext};

/// `QualityProbing` reasons.
const SCHEDULED: &str = "Scheduled";
const INVALID_SPEC: &str = "InvalidSpec";
const PROBE_FAILING: &str = "ProbeFailing";
const STOPPED: &str = "Stopped";

/// Applies the CronJob and records what the finished probe Jobs report.
pub(super) async fn reconcile(
    pass: &mut Pass<'_>,
    qm: &QuantizedModel,
    model: &str,
) -> Result<(), Error> {
    let variant = pass.status.variant.clone().unwrap_or_default();
    let inputs = match probe_job::probe_inputs(pass.mp, qm, model, &variant, &pass.ctx.settings) {
        Ok(inputs) => inputs,
        Err(invalid) => {
            // A CronJob applied for an earlier, valid spec would probe with
            // settings the user has since replaced.
            delete_cronjob(pass).await?;
            return refuse(pass, invalid.to_string()).await;
        }
    };
    let cronjob = probe_job::render_cronjob(pass.mp, &inputs, &pass.ctx.jobs)
        .map_err(|_| Error::Incomplete(pass.mp.name_any()))?;
    let cronjobs: Api<CronJob> = Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
    match k8s::apply(&cronjobs, &cronjob).await {
        Ok(_) => {}
        // What the local checks missed, the API server names (the schedule,
        // in practice): a condition, not a reconcile error retried forever.
        Err(error) if error.is_invalid() => {
            return refuse(
                pass,
                format!("spec.quality: the API server refused the probe CronJob: {error}"),
            )
            .await;
        }
        Err(error) => return Err(error.into()),
    }
    let outcome = collect(pass, &inputs).await?;
    record(pass, &inputs, &cronjob.name_any(), outcome).await
}

/// Deletes the probe CronJob (its Jobs follow) once the promotion is rolled
/// back, and says so.
pub(super) async fn stop(pass: &mut Pass<'_>, why: &str) -> Result<(), Error> {
    let name = probe_job::cronjob_name(&pass.mp.name_any());
    if delete_cronjob(pass).await? {
        pass.event(
            EventType::Normal,
            "QualityProbeStopped",
            format!("deleted the quality probe CronJob {name}: {why}"),
        )
        .await;
    }
    if conditions::find(&pass.status.conditions, QUALITY_PROBING).is_some() {
        pass.set(
            QUALITY_PROBING,
            FALSE,
            STOPPED,
            format!("the quality probe CronJob {name} was deleted: {why}"),
        );
    }
    Ok(())
}

async fn delete_cronjob(pass: &Pass<'_>) -> Result<bool, Error> {
    let cronjobs: Api<CronJob> = Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
    let name = probe_job::cronjob_name(&pass.mp.name_any());
    Ok(k8s::delete_if_present(&cronjobs, &name).await?)
}

async fn refuse(pass: &mut Pass<'_>, message: String) -> Result<(), Error> {
    if !same_condition(pass, QUALITY_PROBING, FALSE, &message) {
        pass.event(EventType::Warning, "QualityProbeInvalid", message.clone())
            .await;
    }
    pass.set(QUALITY_PROBING, FALSE, INVALID_SPEC, message);
    Ok(())
}

fn same_condition(pass: &Pass<'_>, type_: &str, status: &str, message: &str) -> bool {
    conditions::find(&pass.status.conditions, type_)
        .is_some_and(|c| c.status == status && c.message == message)
}

/// What the probe Jobs say: new samples, and whether the newest finished
/// run failed (with why).
struct Outcome {
    samples: Vec<QualitySample>,
    newest_failure: Option<(String, String)>,
}

/// Reads the promotion's finished probe Jobs that the window does not hold
/// yet. Only the newest finished run decides whether the probe is failing,
/// so an older failed Job (kept by the CronJob's history) is not read again.
async fn collect(pass: &Pass<'_>, inputs: &ProbeInputs) -> Result<Outcome, Error> {
    let promotion = pass.mp.name_any();
    let jobs: Api<Job> = Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
    let pods: Api<Pod> = Api::namespaced(pass.ctx.client.clone(), &pass.namespace);
    let selector = format!(
        "{},{PROMOTION_LABEL}={}",
        probe_job::PROBE_JOB_SELECTOR,
        crate::job::model_label(&promotion)
    );
    let listed = jobs
        .list(&ListParams::default().labels(&selector))
        .await
        .during(|| format!("listing the probe Jobs of ModelPromotion {promotion}"))?;
    let mut finished: Vec<(Job, JobState)> = listed
        .items
        .into_iter()
        .filter(|job| job.annotations().get(PROMOTION_ANNOTATION) == Some(&promotion))
        .map(|job| {
            let state = k8s::job_state(&job);
            (job, state)
        })
        .filter(|(_, state)| *state != JobState::Running)
        .collect();
    finished.sort_by_key(|(job, _)| (job.creation_timestamp().map(|t| t.0), job.name_any()));
    let window = pass.status.quality.clone().unwrap_or_default();
    let known = |name: &str| window.samples.iter().any(|s| s.job == name);
    let full = window.samples.len() >= usize::try_from(inputs.window).unwrap_or(usize::MAX);
    let oldest = window.samples.first().map(|s| s.finished_at.0);
    let newest = finished.last().map(|(job, _)| job.name_any());

    let mut outcome = Outcome {
        samples: Vec::new(),
        newest_failure: None,
    };
    for (job, state) in &finished {
        let name = job.name_any();
        let is_newest = newest.as_deref() == Some(name.as_str());
        if known(&name) {
            continue;
        }
        let completed = job
            .status
            .as_ref()
            .and_then(|s| s.completion_time.as_ref())
            .map(|t| t.0);
        // A run older than a full window's oldest sample would fall out again.
        if full && completed.is_some_and(|c| oldest.is_some_and(|o| c < o)) {
            continue;
        }
        let failure = match state {
            JobState::Succeeded => {
                let message = k8s::read_termination_message(&pods, &[], &name).await?;
                match message.as_deref().map(ProbeResult::parse) {
                    Some(Ok(result)) => match quality::sample(&name, &result) {
                        Ok(sample) => {
                            outcome.samples.push(sample);
                            None
                        }
                        Err(error) => Some(error),
                    },
                    Some(Err(error)) => Some(error.to_string()),
                    None => Some("its pod left no termination message".to_string()),
                }
            }
            JobState::Failed(reason) if is_newest => {
                let message = k8s::read_termination_message(&pods, &[], &name).await?;
                let tail = message
                    .map(|m| m.trim().chars().rev().take(400).collect::<Vec<_>>())
                    .map(|rev| rev.into_iter().rev().collect::<String>());
                Some(
                    [reason.clone(), tail]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(": "),
                )
                .filter(|m| !m.is_empty())
                .or_else(|| Some("the Job failed".to_string()))
            }
            JobState::Failed(_) | JobState::Running => None,
        };
        if is_newest && let Some(why) = failure {
            outcome.newest_failure = Some((name, why));
        }
    }
    Ok(outcome)
}

/// Updates the window and both conditions; a regression is written to
/// status before it is counted and announced, so a crash in between cannot
/// count it twice.
async fn record(
    pass: &mut Pass<'_>,
    inputs: &ProbeInputs,
    cronjob: &str,
    outcome: Outcome,
) -> Result<(), Error> {
    let old = pass.status.quality.clone();
    let mut window = quality::merge(
        old.as_ref(),
        outcome.samples,
        inputs.window,
        inputs.threshold,
    );
    window.model = Some(inputs.model.clone());
    pass.status.quality = Some(window.clone());

    match outcome.newest_failure {
        Some((job, why)) => {
            let message = format!("the latest probe run, Job {job}, failed: {why}");
            if !same_condition(pass, QUALITY_PROBING, FALSE, &message) {
                pass.event(EventType::Warning, PROBE_FAILING, message.clone())
                    .await;
            }
            pass.set(QUALITY_PROBING, FALSE, PROBE_FAILING, message);
        }
        None => {
            let message = format!(
                "CronJob {cronjob} probes {} with {} on {:?}",
                inputs.endpoint, inputs.suite, inputs.schedule
            );
            if !same_condition(pass, QUALITY_PROBING, TRUE, &message) {
                pass.event(EventType::Normal, "QualityProbeScheduled", message.clone())
                    .await;
            }
            pass.set(QUALITY_PROBING, TRUE, SCHEDULED, message);
        }
    }

    let stored = conditions::find(&pass.status.conditions, QUALITY_DEGRADED).cloned();
    let verdict = quality::assess(&window, inputs.window, stored.as_ref());
    let regression = verdict.starts_regression(stored.as_ref());
    let recovery = verdict.ends_regression(stored.as_ref());
    pass.set(
        QUALITY_DEGRADED,
        verdict.status,
        verdict.reason,
        verdict.message.clone(),
    );
    if regression {
        pass.write().await?;
        pass.ctx
            .metrics
            .quality_regressions
            .with_label_values(&[
                inputs.model.as_str(),
                inputs.variant.as_str(),
                inputs.environment.as_str(),
            ])
            .inc();
        pass.event(EventType::Warning, "QualityDegraded", verdict.message)
            .await;
    } else if recovery {
        pass.event(EventType::Normal, "QualityRecovered", verdict.message)
            .await;
    }
    Ok(())
}
