//! What the QuantizedModel controller watches, caches and is woken by.
//!
//! One watch per kind: the QuantizedModels, the operator's Jobs and their
//! pods, each feeding a reflector cache that reconciliations read instead of
//! the API server. The model and Job watches also wake the controller, but
//! only on changes a reconciliation acts on: a model's spec (its
//! generation), a Job appearing, finishing or going away. Without that
//! filter every status write of the operator's own and every step of a
//! Job's status (`active`, `ready`, ...) was a reconciliation: about 15 per
//! model, which under load is the queue that delays other models' first Job.
//!
//! The cached objects are trimmed to what the operator reads (no managed
//! fields, no pod spec, no Job pod template), which is most of their size.

use std::collections::{HashMap, HashSet};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStatus, Pod, PodStatus, PodTemplateSpec,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use quantops_api::QuantizedModel;

use crate::k8s::{JOB_NAME_LABEL, JobState, job_state};

/// The label selector of everything the operator creates.
pub const MANAGED_BY_QUANTOPS: &str = "app.kubernetes.io/managed-by=quantops";

/// A stream of objects that wake the controller.
pub type Triggers<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The watches of one scope (a namespace, or the cluster): the caches and
/// the trigger streams. The triggers must be polled (the controller does)
/// for the model and Job caches to fill; the pod watch is polled by
/// whoever runs [`ModelWatch::pods`].
pub struct ModelWatch {
    pub models: Store<QuantizedModel>,
    pub jobs: Store<Job>,
    pub pods: Store<Pod>,
    pub model_triggers: Triggers<QuantizedModel>,
    pub job_triggers: Triggers<Job>,
    /// The pod watch, which wakes nothing: run it until the scope stops.
    pub pod_watch: BoxFuture<'static, ()>,
}

impl ModelWatch {
    /// Sets up the watches of `models`, `jobs` and `pods` (one scope).
    pub fn new(models: Api<QuantizedModel>, jobs: Api<Job>, pods: Api<Pod>) -> ModelWatch {
        let ours = watcher::Config::default().labels(MANAGED_BY_QUANTOPS);
        let (model_cache, model_writer) = reflector::store();
        let (job_cache, job_writer) = reflector::store();
        let (pod_cache, pod_writer) = reflector::store();
        let model_events = watcher(models, watcher::Config::default())
            .default_backoff()
            .modify(trim_model)
            .reflect(model_writer);
        let job_events = watcher(jobs, ours.clone())
            .default_backoff()
            .modify(trim_job)
            .reflect(job_writer);
        let pod_events = watcher(pods, ours)
            .default_backoff()
            .modify(trim_pod)
            .reflect(pod_writer);
        ModelWatch {
            models: model_cache,
            jobs: job_cache,
            pods: pod_cache,
            model_triggers: changes(model_events, model_trigger).boxed(),
            job_triggers: changes(job_events, job_trigger).boxed(),
            pod_watch: pod_events
                .for_each(|event| async move {
                    if let Err(error) = event {
                        tracing::debug!(%error, "pod watch error; retrying");
                    }
                })
                .boxed(),
        }
    }
}

/// What of a model wakes the controller: its spec (the generation moves
/// with it, never with status) and its deletion.
fn model_trigger(qm: &QuantizedModel) -> (Option<i64>, bool) {
    (
        qm.metadata.generation,
        qm.metadata.deletion_timestamp.is_some(),
    )
}

/// What of a Job wakes its model: whether it runs, succeeded or failed, and
/// its deletion.
fn job_trigger(job: &Job) -> (u8, bool) {
    let state = match job_state(job) {
        JobState::Running => 0,
        JobState::Succeeded => 1,
        JobState::Failed(_) => 2,
    };
    (state, job.metadata.deletion_timestamp.is_some())
}

/// Passes on each object whose `key` differs from what it was when the same
/// object (by uid) last passed, and every deletion; drops the rest. A
/// relist forgets the objects it no longer finds, so the memory follows the
/// objects that exist.
pub fn changes<K, T, S>(
    events: S,
    key: fn(&K) -> T,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
    T: PartialEq + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let mut last: HashMap<String, T> = HashMap::new();
    let mut relisted: HashSet<String> = HashSet::new();
    events.filter_map(move |event| {
        let passed = match event {
            Err(error) => Some(Err(error)),
            Ok(watcher::Event::Init) => {
                relisted.clear();
                None
            }
            Ok(watcher::Event::InitDone) => {
                last.retain(|uid, _| relisted.contains(uid));
                None
            }
            Ok(watcher::Event::Delete(object)) => {
                last.remove(&uid_of(&object));
                Some(Ok(object))
            }
            Ok(watcher::Event::Apply(object)) => changed(&mut last, object, key).map(Ok),
            Ok(watcher::Event::InitApply(object)) => {
                relisted.insert(uid_of(&object));
                changed(&mut last, object, key).map(Ok)
            }
        };
        std::future::ready(passed)
    })
}

fn changed<K: Resource, T: PartialEq>(
    last: &mut HashMap<String, T>,
    object: K,
    key: fn(&K) -> T,
) -> Option<K> {
    let uid = uid_of(&object);
    let now = key(&object);
    if last.get(&uid) == Some(&now) {
        return None;
    }
    last.insert(uid, now);
    Some(object)
}

/// An object's uid, or its namespace and name for one without (none that
/// the API server returns).
fn uid_of<K: Resource>(object: &K) -> String {
    object.uid().unwrap_or_else(|| {
        format!(
            "{}/{}",
            object.namespace().unwrap_or_default(),
            object.name_any()
        )
    })
}

/// Managed fields are the API server's bookkeeping, and no annotation of a
/// model is read (`kubectl apply` leaves a copy of the whole spec in one).
fn trim_model(qm: &mut QuantizedModel) {
    qm.metadata.managed_fields = None;
    qm.metadata.annotations = None;
}

/// A cached Job keeps its metadata (labels, owner, deletion) and status;
/// its pod template, the bulk of it, is never read from the cache.
fn trim_job(job: &mut Job) {
    job.metadata.managed_fields = None;
    job.metadata.annotations = None;
    if let Some(spec) = job.spec.as_mut() {
        spec.template = PodTemplateSpec::default();
    }
}

/// A cached pod keeps only what [`crate::k8s`] reads from it: its identity,
/// deletion and Job label, the `PodScheduled` condition and the worker
/// container's termination. A thousand models leave three thousand finished
/// pods in the cache, so the rest of the status (addresses, images, other
/// conditions) was most of the operator's memory.
fn trim_pod(pod: &mut Pod) {
    let metadata = &mut pod.metadata;
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.owner_references = None;
    metadata.generate_name = None;
    if let Some(labels) = metadata.labels.as_mut() {
        labels.retain(|key, _| key == JOB_NAME_LABEL);
    }
    pod.spec = None;
    let Some(status) = pod.status.take() else {
        return;
    };
    let conditions = status.conditions.map(|conditions| {
        conditions
            .into_iter()
            .filter(|c| c.type_ == "PodScheduled")
            .collect()
    });
    let container_statuses = status.container_statuses.map(|containers| {
        containers
            .into_iter()
            .filter(|c| c.name == crate::k8s::WORKER_CONTAINER)
            .map(|c| ContainerStatus {
                name: c.name,
                state: c.state.map(|state| ContainerState {
                    terminated: state.terminated,
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            })
            .collect()
    });
    pod.status = Some(PodStatus {
        phase: status.phase,
        conditions,
        container_statuses,
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use kube::api::ObjectMeta;

    fn job(uid: &str, complete: bool, active: i32) -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some(format!("job-{uid}")),
                uid: Some(uid.to_string()),
                ..ObjectMeta::default()
            },
            status: Some(JobStatus {
                active: Some(active),
                conditions: complete.then(|| {
                    vec![JobCondition {
                        type_: "Complete".to_string(),
                        status: "True".to_string(),
                        ..JobCondition::default()
                    }]
                }),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    fn passed(events: Vec<watcher::Event<Job>>) -> Vec<(String, bool)> {
        let stream = changes(
            futures::stream::iter(events.into_iter().map(Ok)),
            job_trigger,
        );
        futures::executor::block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .map(|r| {
                let job = r.expect("no watch errors in this test");
                let done = job_state(&job) == JobState::Succeeded;
                (job.uid().unwrap_or_default(), done)
            })
            .collect()
    }

    #[test]
    fn a_job_wakes_its_model_when_it_appears_finishes_or_goes() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let events = vec![
            Init,
            InitApply(job("a", false, 1)),
            InitDone,
            // Status steps of a running Job: not a change of state.
            Apply(job("a", false, 0)),
            Apply(job("a", false, 1)),
            Apply(job("a", true, 0)),
            // Seen finished again (a resync, a label change): dropped.
            Apply(job("a", true, 0)),
            Apply(job("b", false, 1)),
            Delete(job("b", false, 1)),
            // A relist that finds "a" unchanged passes nothing.
            Init,
            InitApply(job("a", true, 0)),
            InitDone,
        ];
        assert_eq!(
            passed(events),
            vec![
                ("a".to_string(), false),
                ("a".to_string(), true),
                ("b".to_string(), false),
                ("b".to_string(), false),
            ]
        );
    }

    #[test]
    fn a_relist_forgets_objects_that_are_gone() {
        use watcher::Event::{Init, InitApply, InitDone};
        // "b" vanished during a watch gap; when it comes back (a new object
        // with the same uid cannot, but the entry must not linger) it passes.
        let events = vec![
            Init,
            InitApply(job("a", false, 1)),
            InitApply(job("b", false, 1)),
            InitDone,
            Init,
            InitApply(job("a", false, 1)),
            InitDone,
            Init,
            InitApply(job("b", false, 1)),
            InitDone,
        ];
        assert_eq!(
            passed(events),
            vec![
                ("a".to_string(), false),
                ("b".to_string(), false),
                ("b".to_string(), false),
            ]
        );
    }

    #[test]
    fn cached_objects_keep_what_the_controller_reads() {
        use k8s_openapi::api::core::v1::{ContainerStateTerminated, PodCondition};
        let condition = |type_: &str, status: &str, reason: &str| PodCondition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: Some(reason.to_string()),
            message: Some(format!("{type_} {reason}")),
            ..PodCondition::default()
        };
        let container = |name: &str, message: &str| ContainerStatus {
            name: name.to_string(),
            image: "worker:1".to_string(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    message: Some(message.to_string()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        };
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".to_string()),
                labels: Some(
                    [
                        (JOB_NAME_LABEL.to_string(), "j".to_string()),
                        ("controller-uid".to_string(), "u".to_string()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(Default::default()),
            status: Some(PodStatus {
                conditions: Some(vec![
                    condition("Ready", "False", "PodCompleted"),
                    condition("PodScheduled", "False", "Unschedulable"),
                ]),
                container_statuses: Some(vec![
                    container("sidecar", "not the worker"),
                    container(crate::k8s::WORKER_CONTAINER, "{}"),
                ]),
                host_ip: Some("10.0.0.1".to_string()),
                ..PodStatus::default()
            }),
        };
        let mut trimmed = pod.clone();
        trim_pod(&mut trimmed);
        assert!(trimmed.spec.is_none());
        assert_eq!(trimmed.labels().len(), 1, "only the Job's name is kept");
        let pods = |p: &Pod| std::slice::from_ref(p).to_vec();
        assert_eq!(
            crate::k8s::unschedulable(&pods(&trimmed)),
            crate::k8s::unschedulable(&pods(&pod))
        );
        assert_eq!(
            crate::k8s::termination_message(&pods(&trimmed)).as_deref(),
            Some("{}")
        );
        let status = trimmed.status.unwrap_or_default();
        assert_eq!(status.conditions.map(|c| c.len()), Some(1));
        assert_eq!(status.container_statuses.map(|c| c.len()), Some(1));
        assert_eq!(status.host_ip, None);

        let mut finished = job("a", true, 0);
        trim_job(&mut finished);
        assert_eq!(job_state(&finished), JobState::Succeeded);
        assert_eq!(finished.uid().as_deref(), Some("a"));
    }
}
