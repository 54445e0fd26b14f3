//! Standard `metav1.Condition` handling: a condition's `lastTransitionTime`
//! moves only when its status really changes, so a status write never churns
//! on a reason or message tweak alone.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types of a `DevicePluginPolicy`.
pub mod types {
    /// desired = ready = updated > 0: the kubelet has the agents everywhere.
    pub const READY: &str = "Ready";
    /// A rollout is in progress.
    pub const PROGRESSING: &str = "Progressing";
    /// Agents crash, cannot be scheduled, or devices are unhealthy.
    pub const DEGRADED: &str = "Degraded";
    /// An older policy claims the same resource on overlapping nodes.
    pub const CONFLICT: &str = "Conflict";
}

/// The desired state of one condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired<'a> {
    /// Condition type.
    pub type_: &'a str,
    /// True or false.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// Human-readable message.
    pub message: String,
}

/// Sets one condition in `conds`, keeping its `lastTransitionTime` unless the
/// status changed. Returns true when anything changed.
pub fn set(
    conds: &mut Vec<Condition>,
    want: Desired<'_>,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if want.status { "True" } else { "False" };
    match conds.iter_mut().find(|c| c.type_ == want.type_) {
        Some(c) => {
            let changed_status = c.status != status;
            let changed = changed_status
                || c.reason != want.reason
                || c.message != want.message
                || c.observed_generation != generation;
            if changed_status {
                c.last_transition_time = Time(now);
            }
            c.status = status.into();
            c.reason = want.reason.into();
            c.message = want.message;
            c.observed_generation = generation;
            changed
        }
        None => {
            conds.push(Condition {
                type_: want.type_.into(),
                status: status.into(),
                reason: want.reason.into(),
                message: want.message,
                observed_generation: generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of a type, if present.
pub fn get<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// True when the condition of that type is present and True.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    get(conds, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut c = Vec::new();
        let d = |status, reason: &'static str, msg: &str| Desired {
            type_: types::READY,
            status,
            reason,
            message: msg.into(),
        };
        assert!(set(&mut c, d(false, "Rolling", "0/1"), Some(1), ts(10)));
        assert!(set(&mut c, d(false, "Rolling", "0/2"), Some(1), ts(20)));
        assert_eq!(
            c[0].last_transition_time,
            Time(ts(10)),
            "message change keeps the time"
        );
        assert!(
            !set(&mut c, d(false, "Rolling", "0/2"), Some(1), ts(30)),
            "no change"
        );
        assert!(set(&mut c, d(true, "AgentsReady", "2/2"), Some(1), ts(40)));
        assert_eq!(c[0].last_transition_time, Time(ts(40)));
        assert!(is_true(&c, types::READY));
        assert_eq!(c.len(), 1);
    }
}
