//! Status conditions kept by Kubernetes API conventions: one entry per type,
//! `lastTransitionTime` moves only when the status value changes, so that
//! `kubectl wait` and humans can tell how long a state has held.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition status values.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// What a caller wants a condition to say.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionUpdate<'a> {
    pub type_: &'a str,
    pub status: &'a str,
    pub reason: &'a str,
    pub message: String,
}

/// Sets a condition: inserts it when missing; otherwise updates reason,
/// message and observedGeneration, and the transition time only when the
/// status value itself changed. Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate<'_>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(existing) => {
            let before = existing.clone();
            if existing.status != update.status {
                existing.status = update.status.to_string();
                existing.last_transition_time = Time(now);
            }
            existing.reason = update.reason.to_string();
            existing.message = update.message;
            existing.observed_generation = observed_generation;
            *existing != before
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_string(),
                status: update.status.to_string(),
                reason: update.reason.to_string(),
                message: update.message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of a type, if present.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether a condition is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn update<'a>(status: &'a str, reason: &'a str) -> ConditionUpdate<'a> {
        ConditionUpdate {
            type_: "Quantized",
            status,
            reason,
            message: format!("{reason} message"),
        }
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            update(UNKNOWN, "Running"),
            Some(1),
            at(100)
        ));
        assert_eq!(conditions[0].last_transition_time, Time(at(100)));

        // Same status, new reason: updated, but the transition time holds.
        assert!(set_condition(
            &mut conditions,
            update(UNKNOWN, "Progressing"),
            Some(2),
            at(200)
        ));
        assert_eq!(conditions[0].last_transition_time, Time(at(100)));
        assert_eq!(conditions[0].reason, "Progressing");
        assert_eq!(conditions[0].observed_generation, Some(2));

        // Identical update: nothing changes.
        assert!(!set_condition(
            &mut conditions,
            update(UNKNOWN, "Progressing"),
            Some(2),
            at(300)
        ));

        // Status flips: the transition time moves.
        assert!(set_condition(
            &mut conditions,
            update(TRUE, "Succeeded"),
            Some(2),
            at(400)
        ));
        assert_eq!(conditions[0].last_transition_time, Time(at(400)));
        assert_eq!(conditions.len(), 1);
        assert!(is_true(&conditions, "Quantized"));
    }
}
