//! Leader election through a `coordination.k8s.io/v1` Lease, so that of the
//! operator's replicas exactly one runs the controllers while the others
//! stay warm and keep answering probes.
//!
//! The decision is a pure function of the Lease and the clock; the API
//! calls are guarded by the Lease's resourceVersion, so two replicas that
//! decide to acquire at the same moment cannot both win: the second replace
//! fails with a conflict.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use std::time::Duration;
use tokio::sync::watch;

/// What this replica should do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// Nobody holds it, or the holder stopped renewing: take it over.
    Acquire,
    /// This replica holds it: renew it.
    Renew,
    /// Another replica holds a live Lease.
    Follow { holder: String },
}

/// Decides from the Lease as read (`None` when absent) and the clock.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(renewed) if now.duration_since(renewed) < duration => Decision::Follow {
            holder: holder.to_string(),
        },
        _ => Decision::Acquire,
    }
}

/// The Lease spec after `decision` (not called for `Follow`).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    decision: &Decision,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let mut spec = current.cloned().unwrap_or_default();
    let seconds = i32::try_from(lease_duration.as_secs()).unwrap_or(i32::MAX);
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(MicroTime(now));
    if *decision != Decision::Renew {
        spec.holder_identity = Some(identity.to_string());
        spec.acquire_time = Some(MicroTime(now));
        if *decision == Decision::Acquire {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        } else {
            spec.lease_transitions = Some(0);
        }
    }
    spec
}

/// Whether a leader whose last successful renewal was `since_renewal` ago
/// must step down: after the renew deadline, before any other replica may
/// consider the Lease expired.
pub fn must_step_down(since_renewal: Duration, renew_deadline: Duration) -> bool {
    since_renewal >= renew_deadline
}

/// The elector's settings.
#[derive(Clone, Debug)]
pub struct ElectorConfig {
    pub lease_name: String,
    pub identity: String,
    /// How long a Lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down; below `lease_duration`.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl ElectorConfig {
    /// Client-go's defaults: 15s lease, 10s renew deadline, 2s retry.
    pub fn new(lease_name: String, identity: String) -> ElectorConfig {
        ElectorConfig {
            lease_name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Runs the election forever, publishing `true` on `leader` while this
/// replica holds the Lease.
pub async fn run(api: Api<Lease>, config: ElectorConfig, leader: watch::Sender<bool>) {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &config).await {
            Ok(true) => {
                last_renewal = Some(tokio::time::Instant::now());
                if !*leader.borrow() {
                    tracing::info!(identity = %config.identity, lease = %config.lease_name, "became leader");
                }
                leader.send_replace(true);
            }
            Ok(false) => {
                if *leader.borrow() {
                    tracing::warn!(identity = %config.identity, "lost the lease to another replica");
                }
                last_renewal = None;
                leader.send_replace(false);
            }
            Err(error) => {
                tracing::warn!(%error, lease = %config.lease_name, "cannot acquire or renew the lease");
                let stale =
                    last_renewal.is_none_or(|t| must_step_down(t.elapsed(), config.renew_deadline));
                if stale && *leader.borrow() {
                    tracing::warn!(identity = %config.identity, "renew deadline passed, stepping down");
                }
                if stale {
                    leader.send_replace(false);
                }
            }
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

/// One round: `Ok(true)` when this replica holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &ElectorConfig,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.lease_name).await?;
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &config.identity,
        now,
    );
    if let Decision::Follow { .. } = decision {
        return Ok(false);
    }
    let spec = next_spec(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &decision,
        &config.identity,
        config.lease_duration,
        now,
    );
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Some(mut lease) => {
            // The read resourceVersion stays in the metadata: a concurrent
            // writer makes this replace fail with 409 instead of overwriting.
            lease.spec = Some(spec);
            api.replace(&config.lease_name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", at(100)), Decision::Create);
        assert_eq!(
            decide(Some(&held_by("a", 90)), "a", at(100)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&held_by("b", 90)), "a", at(100)),
            Decision::Follow { holder: "b".into() }
        );
        // Expired: b last renewed 15s or more ago.
        assert_eq!(
            decide(Some(&held_by("b", 85)), "a", at(100)),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held_by("", 99)), "a", at(100)),
            Decision::Acquire
        );
    }

    #[test]
    fn acquiring_counts_a_transition_and_renewing_keeps_acquire_time() {
        let old = held_by("b", 80);
        let taken = next_spec(
            Some(&old),
            &Decision::Acquire,
            "a",
            Duration::from_secs(15),
            at(100),
        );
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(100))));
        let renewed = next_spec(
            Some(&taken),
            &Decision::Renew,
            "a",
            Duration::from_secs(15),
            at(110),
        );
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(100))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(110))));
        assert_eq!(renewed.lease_transitions, Some(3));
    }

    #[test]
    fn steps_down_after_the_renew_deadline() {
        let deadline = Duration::from_secs(10);
        assert!(!must_step_down(Duration::from_secs(9), deadline));
        assert!(must_step_down(Duration::from_secs(10), deadline));
    }
}
