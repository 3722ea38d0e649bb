//! The Kubernetes calls both controllers make the same way, in one place:
//! server-side apply of objects and of status as the `quantops` field
//! manager, deletes that tolerate a missing object, events that never fail a
//! reconciliation, and the error that says what was being done, and what a
//! finished Job left behind (its state and its pod's termination message).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The field manager of every object and status the operator applies.
pub const FIELD_MANAGER: &str = "quantops";

/// The name of the worker's container in every pod the operator renders;
/// its termination message is the worker's result.
pub const WORKER_CONTAINER: &str = "quantizer";

/// The label the Job controller puts on each pod of a Job, naming the Job.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

/// A failed API call, with what the operator was doing.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}")]
pub struct KubeError {
    pub action: String,
    #[source]
    pub source: kube::Error,
}

impl KubeError {
    /// Whether the API server refused the object as invalid (HTTP 422).
    pub fn is_invalid(&self) -> bool {
        matches!(&self.source, kube::Error::Api(status) if status.code == 422)
    }

    /// The API server's own words, without what the operator was doing.
    pub fn api_message(&self) -> String {
        match &self.source {
            kube::Error::Api(status) => status.message.clone(),
            other => other.to_string(),
        }
    }
}

/// Adds what was being done to a kube error.
pub trait KubeContext<T> {
    fn during(self, action: impl FnOnce() -> String) -> Result<T, KubeError>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn during(self, action: impl FnOnce() -> String) -> Result<T, KubeError> {
        self.map_err(|source| KubeError {
            action: action(),
            source,
        })
    }
}

/// Applies an object with server-side apply as [`FIELD_MANAGER`], forcing
/// ownership of the fields it sets: the operator owns what it renders.
pub async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, KubeError>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .during(|| format!("applying {} {name}", K::kind(&())))
}

/// Writes `status` with server-side apply on the status subresource; the
/// fields the operator stops setting are removed because it owns them.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
) -> Result<(), KubeError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .during(|| format!("writing the status of {} {name}", K::kind(&())))?;
    Ok(())
}

/// How a status write made against a resourceVersion ended.
#[derive(Clone, Debug, PartialEq)]
pub enum StatusWrite {
    /// Stored; the object's new resourceVersion.
    Written(Option<String>),
    /// The object changed since that version (HTTP 409): nothing was written.
    Stale,
}

/// Writes `status` like [`apply_status`], but only if the object is still at
/// `resource_version`: the version the writer's view of it came from. A
/// view from a stale cache then cannot undo a newer status, and whoever's
/// write succeeds knows it made the transition it wrote.
pub async fn apply_status_at<K>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<&str>,
    status: &impl Serialize,
) -> Result<StatusWrite, KubeError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(version) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    match api
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(object) => Ok(StatusWrite::Written(object.meta().resource_version.clone())),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(StatusWrite::Stale),
        Err(source) => Err(KubeError {
            action: format!("writing the status of {} {name}", K::kind(&())),
            source,
        }),
    }
}

/// Deletes an object in the background (its dependents follow through the
/// garbage collector); `Ok(false)` when it was already gone.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, KubeError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(KubeError {
            action: format!("deleting {} {name}", K::kind(&())),
            source,
        }),
    }
}

/// Publishes an event on `object`. Events are advisory: a failure to
/// publish is logged, never returned.
pub async fn publish_event(
    recorder: &Recorder,
    object: &ObjectReference,
    type_: EventType,
    action: &str,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, object).await {
        let name = object.name.as_deref().unwrap_or_default();
        tracing::warn!(%error, object = name, reason, "cannot publish event");
    }
}

/// Where a Job stands.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Running,
    Succeeded,
    /// Failed, with the Job's own reason when it gave one.
    Failed(Option<String>),
}

/// Reads the Job's terminal conditions (`Complete`, `Failed`).
pub fn job_state(job: &Job) -> JobState {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for condition in conditions {
        if condition.status != "True" {
            continue;
        }
        match condition.type_.as_str() {
            "Complete" => return JobState::Succeeded,
            "Failed" => {
                let reason = [condition.reason.as_deref(), condition.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ");
                return JobState::Failed((!reason.is_empty()).then_some(reason));
            }
            _ => {}
        }
    }
    JobState::Running
}

/// A pod the scheduler could not place, in its own words.
#[derive(Clone, Debug, PartialEq)]
pub struct Unschedulable {
    pub pod: String,
    /// The scheduler's message, e.g. `0/1 nodes are available: 1 Insufficient nvidia.com/gpu.`
    pub message: String,
    /// Since when (the `PodScheduled` condition's last transition).
    pub since: Option<Timestamp>,
}

/// The first of `pods` that is waiting with `PodScheduled=False`, reason
/// `Unschedulable`; pods being deleted are left out.
pub fn unschedulable(pods: &[Pod]) -> Option<Unschedulable> {
    pods.iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .find_map(|pod| {
            let condition = pod
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "PodScheduled")?;
            (condition.status == "False" && condition.reason.as_deref() == Some("Unschedulable"))
                .then(|| Unschedulable {
                    pod: pod.metadata.name.clone().unwrap_or_default(),
                    message: condition
                        .message
                        .clone()
                        .unwrap_or_else(|| "no node fits it".to_string()),
                    since: condition.last_transition_time.as_ref().map(|t| t.0),
                })
        })
}

/// The worker's termination message from a Job's pods: the newest
/// terminated [`WORKER_CONTAINER`]'s, as raw text.
pub fn termination_message(pods: &[Pod]) -> Option<String> {
    let mut terminated: Vec<(Option<Timestamp>, String)> = pods
        .iter()
        .flat_map(|pod| pod.status.iter())
        .flat_map(|status| status.container_statuses.iter().flatten())
        .filter(|c| c.name == WORKER_CONTAINER)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .filter_map(|t| Some((t.finished_at.as_ref().map(|f| f.0), t.message.clone()?)))
        .collect();
    terminated.sort_by_key(|(finished, _)| *finished);
    terminated.pop().map(|(_, message)| message)
}

/// A finished Job's termination message: from `cached` pods when they have
/// the terminated container already, else from the API server (a pod watch
/// may lag behind the Job's, and not every caller has one).
pub async fn read_termination_message(
    pods: &Api<Pod>,
    cached: &[Pod],
    job_name: &str,
) -> Result<Option<String>, KubeError> {
    if let Some(message) = termination_message(cached) {
        return Ok(Some(message));
    }
    let listed = pods
        .list(&ListParams::default().labels(&format!("{JOB_NAME_LABEL}={job_name}")))
        .await
        .during(|| format!("listing the pods of Job {job_name}"))?;
    Ok(termination_message(&listed.items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job_with(type_: &str, status: &str, message: Option<&str>) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: type_.to_string(),
                    status: status.to_string(),
                    reason: Some("BackoffLimitExceeded".to_string()),
                    message: message.map(str::to_string),
                    ..JobCondition::default()
                }]),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn job_states() {
        assert_eq!(job_state(&Job::default()), JobState::Running);
        assert_eq!(
            job_state(&job_with("Complete", "True", None)),
            JobState::Succeeded
        );
        assert_eq!(
            job_state(&job_with("Complete", "False", None)),
            JobState::Running
        );
        assert_eq!(
            job_state(&job_with(
                "Failed",
                "True",
                Some("Job has reached the specified backoff limit")
            )),
            JobState::Failed(Some(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".to_string()
            ))
        );
    }

    fn pod(container: &str, message: &str, finished: i64) -> Pod {
        Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: container.to_string(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            message: Some(message.to_string()),
                            finished_at: Timestamp::from_second(finished).ok().map(Time),
                            ..ContainerStateTerminated::default()
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn pending_pod(name: &str, status: &str, reason: &str) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Pending".to_string()),
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".to_string(),
                    status: status.to_string(),
                    reason: Some(reason.to_string()),
                    message: Some(
                        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".to_string(),
                    ),
                    last_transition_time: Timestamp::from_second(100).ok().map(Time),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn an_unschedulable_pod_is_found_with_the_schedulers_words() {
        let found = unschedulable(&[
            pending_pod("scheduled", "True", ""),
            pending_pod("stuck", "False", "Unschedulable"),
        ]);
        assert_eq!(
            found,
            Some(Unschedulable {
                pod: "stuck".to_string(),
                message: "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".to_string(),
                since: Timestamp::from_second(100).ok(),
            })
        );
        // Waiting for a scheduling gate is not "unschedulable".
        assert_eq!(
            unschedulable(&[pending_pod("gated", "False", "SchedulingGated")]),
            None
        );
        assert_eq!(unschedulable(&[]), None);
    }

    #[test]
    fn newest_worker_termination_message_wins() {
        let pods = [
            pod(WORKER_CONTAINER, "old", 10),
            pod(WORKER_CONTAINER, "new", 20),
            pod("sidecar", "not the worker", 30),
        ];
        assert_eq!(termination_message(&pods).as_deref(), Some("new"));
        assert_eq!(termination_message(&[]), None);
    }
}
