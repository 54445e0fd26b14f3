//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator
//! replicas are safe: only the holder reconciles. The lease is renewed by
//! optimistic concurrency (a replace carrying the resourceVersion read), so
//! two candidates can never both believe they hold it.
//!
//! Expiry is judged on the local clock as observed, the way client-go does:
//! another holder's lease is expired when it has not changed for its
//! duration since *we* first saw it in that state. The holder's `renewTime`
//! is never compared with our clock, so clock skew between nodes can
//! neither shorten a lease (a takeover while the leader still acts) nor
//! stretch it.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// A lease-based lock.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's lease as last seen (holder, renewTime,
    /// resourceVersion) and when we first saw it so.
    observed: Mutex<Option<(String, Instant)>>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether another holder's lease, in the state `key`, has stood still for
/// `secs` on our clock since we first saw that state (recorded in `seen`).
fn expired_as_observed(
    seen: &Mutex<Option<(String, Instant)>>,
    key: String,
    secs: u64,
    now: Instant,
) -> bool {
    let Ok(mut seen) = seen.lock() else {
        return false;
    };
    match seen.as_ref() {
        Some((k, since)) if *k == key => now.duration_since(*since) > Duration::from_secs(secs),
        _ => {
            *seen = Some((key, now));
            false
        }
    }
}

impl LeaseLock {
    /// A lock on lease `name` in the namespace of `api`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Mutex::new(None),
        }
    }

    /// Takes the lease if it is free or expired, or renews it if we hold it.
    /// Returns whether we hold it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(self.identity.as_str());
        if let Some(h) = holder
            && !mine
        {
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|MicroTime(t)| t.to_string())
                .unwrap_or_default();
            let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
            let key = format!("{h}|{renewed}|{version}");
            if !expired_as_observed(&self.observed, key, secs, Instant::now()) {
                return Ok(false);
            }
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if we hold it, so a standby takes over at its
    /// next try instead of waiting for the lease to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_judged_by_how_long_we_have_seen_the_lease_unchanged() {
        let seen = Mutex::new(None);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert!(
            !expired_as_observed(&seen, "a|1|r1".into(), 15, t0),
            "first sight"
        );
        assert!(!expired_as_observed(&seen, "a|1|r1".into(), 15, t0 + s(15)));
        assert!(expired_as_observed(&seen, "a|1|r1".into(), 15, t0 + s(16)));
        // A renewal (a new state) restarts the clock.
        assert!(!expired_as_observed(&seen, "a|2|r2".into(), 15, t0 + s(17)));
        assert!(!expired_as_observed(&seen, "a|2|r2".into(), 15, t0 + s(30)));
        assert!(expired_as_observed(&seen, "a|2|r2".into(), 15, t0 + s(33)));
    }
}
