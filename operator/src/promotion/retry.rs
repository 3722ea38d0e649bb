//! Bounded retries of a promotion's git writes (the commit, the revert).
//!
//! The state lives in the promotion's status (`gitAttempts`,
//! `nextGitAttemptTime`), not in the operator's memory, so that neither a
//! reconciliation triggered by the operator's own status write nor a restart
//! can bring an attempt forward: a write is tried only when it is due, at
//! most `max_attempts` times per generation of the spec, and then the
//! promotion stays `Failed` until its spec changes.

use k8s_openapi::jiff::Timestamp;
use std::time::Duration;

/// How often and how fast a failed git write is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GitRetry {
    /// Failed attempts after which the promotion is `Failed`.
    pub max_attempts: u32,
    /// The wait after the first failure; doubled after each further one.
    pub base_delay: Duration,
    /// The longest wait between two attempts.
    pub max_delay: Duration,
}

impl Default for GitRetry {
    fn default() -> Self {
        GitRetry {
            max_attempts: 6,
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(300),
        }
    }
}

/// What to do about a git write before trying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Before {
    /// Try it now.
    Attempt,
    /// Not due yet: look again after this long.
    Wait(Duration),
    /// Every attempt of this generation is spent.
    GaveUp,
}

/// What a failed attempt leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Try again after this long.
    RetryIn(Duration),
    /// That was the last attempt.
    GiveUp,
}

impl GitRetry {
    /// Whether a write with `attempts` failures so far, the next one due at
    /// `next_at`, may be tried at `now`.
    pub fn before(&self, attempts: u32, next_at: Option<Timestamp>, now: Timestamp) -> Before {
        if attempts >= self.max_attempts.max(1) {
            return Before::GaveUp;
        }
        match next_at {
            Some(due) if due > now => {
                let ms = due.as_millisecond().saturating_sub(now.as_millisecond());
                // A due time further off than any backoff was written by
                // someone else: do not wait longer than the policy would.
                let wait = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
                Before::Wait(wait.min(self.max_delay))
            }
            _ => Before::Attempt,
        }
    }

    /// After the `attempts`-th failure (counting it): retry with backoff,
    /// or give up.
    pub fn after(&self, attempts: u32) -> After {
        if attempts >= self.max_attempts.max(1) {
            After::GiveUp
        } else {
            After::RetryIn(self.delay(attempts))
        }
    }

    /// `base_delay * 2^(attempts-1)`, at most `max_delay`.
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// `now` plus `delay`, as stored in `status.nextGitAttemptTime`.
pub fn due_at(now: Timestamp, delay: Duration) -> Timestamp {
    let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    Timestamp::from_millisecond(now.as_millisecond().saturating_add(ms)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> GitRetry {
        GitRetry {
            max_attempts: 4,
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(60),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("a timestamp")
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy();
        let delays: Vec<u64> = (1..=6).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 60, 60, 60]);
        assert_eq!(p.after(1), After::RetryIn(Duration::from_secs(10)));
        assert_eq!(p.after(3), After::RetryIn(Duration::from_secs(40)));
        assert_eq!(p.after(4), After::GiveUp);
        assert_eq!(p.after(400), After::GiveUp);
    }

    #[test]
    fn an_attempt_waits_until_it_is_due() {
        let p = policy();
        assert_eq!(p.before(0, None, at(0)), Before::Attempt);
        let due = due_at(at(0), p.delay(1));
        assert_eq!(due, at(10));
        // A reconciliation right after the failure (the status write's own
        // watch event) does not retry.
        assert_eq!(
            p.before(1, Some(due), at(0)),
            Before::Wait(Duration::from_secs(10))
        );
        assert_eq!(
            p.before(1, Some(due), at(7)),
            Before::Wait(Duration::from_secs(3))
        );
        assert_eq!(p.before(1, Some(due), at(10)), Before::Attempt);
        assert_eq!(p.before(1, Some(due), at(99)), Before::Attempt);
        // A due time far off is capped at the longest backoff.
        assert_eq!(
            p.before(1, Some(at(100_000)), at(0)),
            Before::Wait(Duration::from_secs(60))
        );
    }

    #[test]
    fn spent_attempts_stay_spent() {
        let p = policy();
        assert_eq!(p.before(4, None, at(0)), Before::GaveUp);
        assert_eq!(p.before(756, Some(at(-5)), at(0)), Before::GaveUp);
        let once = GitRetry {
            max_attempts: 0,
            ..policy()
        };
        assert_eq!(once.before(1, None, at(0)), Before::GaveUp);
        assert_eq!(once.after(1), After::GiveUp);
    }
}
