//! Leader election through a `coordination.k8s.io/v1` Lease, so that of the
//! operator's replicas exactly one runs the controllers while the others
//! stay warm and keep answering probes.
//!
//! The decision is a pure function of the Lease and the clock; the API
//! calls are guarded by the Lease's resourceVersion, so two replicas that
//! decide to acquire at the same moment cannot both win: the second replace
//! fails with a conflict. A leader that cannot renew within its renew
//! deadline steps down before its Lease expires (see [`run`]), so a frozen
//! or unreachable API server never leaves two replicas leading.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

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

/// How long a Lease lasts and how it is kept, as in client-go:
/// `retry_period < renew_deadline < lease_duration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a Lease is valid after its last renewal: a follower takes
    /// over only after this long without one.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down. Shorter than
    /// `lease_duration`, so it has stopped before anyone may take over.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Default for Timings {
    /// Client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    fn default() -> Self {
        Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Timings that cannot keep one leader at a time.
#[derive(Debug, thiserror::Error)]
pub enum TimingError {
    #[error(
        "renew deadline ({renew_deadline:?}) must be shorter than the lease duration ({lease_duration:?}): \
         a leader must stop before its Lease can expire"
    )]
    DeadlineNotBelowLease {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
    #[error(
        "retry period ({retry_period:?}) must be above zero and shorter than the renew deadline ({renew_deadline:?}), \
         or a leader never retries before stepping down"
    )]
    RetryNotBelowDeadline {
        retry_period: Duration,
        renew_deadline: Duration,
    },
}

impl Timings {
    pub fn validate(self) -> Result<Timings, TimingError> {
        if self.renew_deadline >= self.lease_duration {
            return Err(TimingError::DeadlineNotBelowLease {
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            });
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(TimingError::RetryNotBelowDeadline {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
            });
        }
        Ok(self)
    }
}

/// The elector's settings.
#[derive(Clone, Debug)]
pub struct ElectorConfig {
    pub lease_name: String,
    pub identity: String,
    pub timings: Timings,
}

/// One acquire-or-renew round against the Lease: the API server's
/// ([`ApiLease`]), or a scripted one in tests.
pub trait LeaseLock {
    type Error: std::fmt::Display;
    /// `Ok(true)` when this replica holds the Lease afterwards.
    fn try_acquire_or_renew(
        &self,
        config: &ElectorConfig,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
}

/// The Lease object in the API server.
pub struct ApiLease(pub Api<Lease>);

impl LeaseLock for ApiLease {
    type Error = kube::Error;
    fn try_acquire_or_renew(
        &self,
        config: &ElectorConfig,
    ) -> impl Future<Output = Result<bool, kube::Error>> + Send {
        try_acquire_or_renew(&self.0, config)
    }
}

/// Runs the election forever, publishing `true` on `leader` while this
/// replica holds the Lease.
///
/// Every attempt is cut off by a timeout, so a frozen API server cannot
/// hold the loop: a leader's attempt may last only until its renew
/// deadline (counted from the start of its last successful renewal, when
/// the Lease's `renewTime` was taken), a follower's at most a renew
/// deadline. When the deadline passes without a renewal the leader logs
/// it and publishes `false` — while its Lease, renewed at most a renew
/// deadline ago, is still valid for every other replica.
pub async fn run<L: LeaseLock>(lock: L, config: ElectorConfig, leader: watch::Sender<bool>) {
    let Timings {
        renew_deadline,
        retry_period,
        ..
    } = config.timings;
    // The start of the last successful renewal, while leading.
    let mut renewed: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let budget = renewed.map_or(renew_deadline, |r| {
            (r + renew_deadline).saturating_duration_since(started)
        });
        match tokio::time::timeout(budget, lock.try_acquire_or_renew(&config)).await {
            Ok(Ok(true)) => {
                if renewed.is_none() {
                    tracing::info!(identity = %config.identity, lease = %config.lease_name, "became leader");
                }
                renewed = Some(started);
                leader.send_replace(true);
            }
            Ok(Ok(false)) => {
                if renewed.take().is_some() {
                    tracing::warn!(identity = %config.identity, lease = %config.lease_name, "lost the lease to another replica");
                }
                leader.send_replace(false);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, lease = %config.lease_name, "cannot acquire or renew the lease");
            }
            Err(_) => {
                tracing::warn!(
                    lease = %config.lease_name,
                    timeout_ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
                    "acquiring or renewing the lease timed out"
                );
            }
        }
        if let Some(r) = renewed
            && must_step_down(r.elapsed(), renew_deadline)
        {
            tracing::warn!(
                identity = %config.identity,
                lease = %config.lease_name,
                since_renewal_s = r.elapsed().as_secs_f64(),
                renew_deadline_s = renew_deadline.as_secs_f64(),
                "renew deadline passed without a successful renewal: stepping down"
            );
            renewed = None;
            leader.send_replace(false);
        }
        // A leader never sleeps past its deadline: the next attempt (or
        // the step-down) comes no later.
        let pause = renewed.map_or(retry_period, |r| {
            retry_period.min((r + renew_deadline).saturating_duration_since(Instant::now()))
        });
        tokio::time::sleep(pause).await;
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
        config.timings.lease_duration,
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
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

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

    #[test]
    fn timings_keep_retry_below_deadline_below_lease() {
        let secs = Duration::from_secs;
        assert!(Timings::default().validate().is_ok());
        let t = |lease, deadline, retry| Timings {
            lease_duration: secs(lease),
            renew_deadline: secs(deadline),
            retry_period: secs(retry),
        };
        assert!(matches!(
            t(10, 10, 2).validate(),
            Err(TimingError::DeadlineNotBelowLease { .. })
        ));
        assert!(matches!(
            t(15, 10, 10).validate(),
            Err(TimingError::RetryNotBelowDeadline { .. })
        ));
        assert!(matches!(
            t(15, 10, 0).validate(),
            Err(TimingError::RetryNotBelowDeadline { .. })
        ));
        assert!(t(6, 4, 1).validate().is_ok());
    }

    /// What a scripted Lease answers, one round each.
    #[derive(Clone, Copy)]
    enum Round {
        Hold,
        Lost,
        Fail,
        /// Never answers, like a frozen API server.
        Hang,
    }

    /// Plays `rounds`, then hangs; counts the rounds asked.
    #[derive(Clone)]
    struct Scripted {
        rounds: Arc<Mutex<VecDeque<Round>>>,
        asked: Arc<Mutex<u32>>,
    }

    impl Scripted {
        fn new(rounds: impl IntoIterator<Item = Round>) -> Scripted {
            Scripted {
                rounds: Arc::new(Mutex::new(rounds.into_iter().collect())),
                asked: Arc::new(Mutex::new(0)),
            }
        }
    }

    impl LeaseLock for Scripted {
        type Error = String;
        fn try_acquire_or_renew(
            &self,
            _: &ElectorConfig,
        ) -> impl Future<Output = Result<bool, String>> + Send {
            let round = self
                .rounds
                .lock()
                .map_or(Round::Hang, |mut r| r.pop_front().unwrap_or(Round::Hang));
            if let Ok(mut asked) = self.asked.lock() {
                *asked += 1;
            }
            async move {
                match round {
                    Round::Hold => Ok(true),
                    Round::Lost => Ok(false),
                    Round::Fail => Err("connection refused".to_string()),
                    Round::Hang => std::future::pending().await,
                }
            }
        }
    }

    fn config() -> ElectorConfig {
        ElectorConfig {
            lease_name: "quantops-operator".into(),
            identity: "a".into(),
            timings: Timings::default(),
        }
    }

    /// Starts the elector on `lock`; the leadership channel and the start.
    fn start(lock: Scripted) -> (watch::Receiver<bool>, Instant) {
        let (tx, rx) = watch::channel(false);
        let began = Instant::now();
        tokio::spawn(run(lock, config(), tx));
        (rx, began)
    }

    /// How long after `began` the replica led, and then stopped leading.
    async fn led_then_stepped_down(rx: &mut watch::Receiver<bool>, began: Instant) -> Duration {
        assert!(rx.wait_for(|l| *l).await.is_ok(), "became leader");
        assert!(rx.wait_for(|l| !*l).await.is_ok(), "stepped down");
        began.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_hang_steps_down_at_the_renew_deadline() {
        // Renewed at 0, 2 and 4 s; from 6 s on the API server never answers.
        let (mut rx, began) = start(Scripted::new([Round::Hold; 3]));
        let led = led_then_stepped_down(&mut rx, began).await;
        // The deadline counts from the last renewal's start (4 s).
        assert_eq!(led, Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_fail_keeps_trying_until_the_deadline() {
        let lock = Scripted::new([Round::Hold].into_iter().chain([Round::Fail; 20]));
        let (mut rx, began) = start(lock.clone());
        let led = led_then_stepped_down(&mut rx, began).await;
        assert_eq!(led, Duration::from_secs(10));
        // Attempts at 0, 2, 4, 6, 8 and the last one at 10 s.
        assert_eq!(lock.asked.lock().map(|a| *a).ok(), Some(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_renews_stays_leader_and_steps_down_before_the_lease_expires() {
        let (mut rx, began) = start(Scripted::new([Round::Hold; 30]));
        assert!(rx.wait_for(|l| *l).await.is_ok());
        tokio::time::sleep(Duration::from_secs(55)).await;
        assert!(*rx.borrow(), "still leading while renewing");
        let led = led_then_stepped_down(&mut rx, began).await;
        // Last renewal started at 58 s; every other replica sees the Lease
        // valid until 58 + 15 s, this one stopped at 58 + 10 s.
        assert_eq!(led, Duration::from_secs(68));
        assert!(led < Duration::from_secs(58) + Timings::default().lease_duration);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_loses_the_lease_steps_down_at_once() {
        let (mut rx, began) = start(Scripted::new([Round::Hold, Round::Lost]));
        let led = led_then_stepped_down(&mut rx, began).await;
        assert_eq!(led, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_never_leads_while_the_api_server_hangs() {
        let (rx, _) = start(Scripted::new([]));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!*rx.borrow());
    }
}
