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
    /// The lease as we last wrote it while holding it: a renewal replaces it
    /// directly (one request, not a read and a write); the resourceVersion
    /// it carries makes the replace fail if anyone changed it since.
    written: Mutex<Option<Lease>>,
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
            written: Mutex::new(None),
        }
    }

    fn remember(&self, lease: Option<Lease>) {
        if let Ok(mut w) = self.written.lock() {
            *w = lease;
        }
    }

    /// Renews the lease we wrote last, without reading it first. `None`
    /// when there is nothing to renew that way or someone else changed the
    /// lease (the full path then reads it).
    async fn renew_written(&self) -> Option<Result<bool, kube::Error>> {
        let mut lease = self.written.lock().ok()?.clone()?;
        let spec = lease.spec.as_mut()?;
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return None;
        }
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.write(&lease).await {
            Ok(false) => None,
            r => Some(r),
        }
    }

    /// Replaces the lease with `lease` (its resourceVersion guards the
    /// write) and remembers what the server answered; `false` when someone
    /// changed it meanwhile.
    async fn write(&self, lease: &Lease) -> Result<bool, kube::Error> {
        match self
            .api
            .replace(&self.name, &PostParams::default(), lease)
            .await
        {
            Ok(l) => {
                self.remember(Some(l));
                Ok(true)
            }
            Err(e) if is_conflict(&e) => {
                self.remember(None);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the lease if it is free or expired, or renews it if we hold it.
    /// Returns whether we hold it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        if let Some(r) = self.renew_written().await {
            return r;
        }
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
                Ok(l) => {
                    self.remember(Some(l));
                    Ok(true)
                }
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
        self.write(&lease).await
    }

    /// Gives the lease up if we hold it, so a standby takes over at its
    /// next try instead of waiting for the lease to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        self.remember(None);
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

/// How a leader keeps its lease.
#[derive(Clone, Copy, Debug)]
pub struct Renewal {
    /// Time between renewals while they succeed.
    pub every: Duration,
    /// Time between tries after one failed.
    pub retry: Duration,
    /// The longest one try may take (a hung request is abandoned and
    /// tried again, not waited on until the deadline).
    pub attempt: Duration,
    /// A leader that could not renew for this long since its last renewal
    /// stops acting, before the lease can be taken over.
    pub deadline: Duration,
}

/// Renews through `try_renew` until leadership ends, and says why: the
/// lease was found held by another, or no try succeeded within the
/// deadline (with the last failure). One slow or failed request on a
/// loaded API server is retried, not fatal.
pub async fn keep_renewing<F, Fut, E>(mut try_renew: F, r: Renewal) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let mut last_ok = Instant::now();
    let mut wait = r.every;
    loop {
        let left = r.deadline.saturating_sub(last_ok.elapsed());
        tokio::time::sleep(wait.min(left)).await;
        let left = r.deadline.saturating_sub(last_ok.elapsed());
        let why = match tokio::time::timeout(r.attempt.min(left), try_renew()).await {
            Ok(Ok(true)) => {
                last_ok = Instant::now();
                wait = r.every;
                continue;
            }
            Ok(Ok(false)) => return "another candidate holds the lease".into(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "the API server did not answer within {} ms",
                r.attempt.min(left).as_millis()
            ),
        };
        if last_ok.elapsed() >= r.deadline {
            return format!(
                "no renewal succeeded for {} s; the last try: {why}",
                r.deadline.as_secs_f32()
            );
        }
        tracing::warn!(error = %why, "renewing the lease; trying again");
        wait = r.retry;
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

    const TIMING: Renewal = Renewal {
        every: Duration::from_secs(5),
        retry: Duration::from_secs(1),
        attempt: Duration::from_secs(2),
        deadline: Duration::from_secs(10),
    };

    /// A renewal that hangs (a loaded API server) is abandoned and tried
    /// again: leadership goes on. Before, the one try allowed after a hung
    /// one came after the deadline, and the leader exited.
    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_is_retried_not_fatal() {
        let tries = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = tries.clone();
        let renewing = keep_renewing(
            move || {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 1 {
                        // The second renewal hangs far past every limit.
                        tokio::time::sleep(Duration::from_secs(600)).await;
                    }
                    Ok::<bool, String>(true)
                }
            },
            TIMING,
        );
        let out = tokio::time::timeout(Duration::from_secs(120), renewing).await;
        assert!(out.is_err(), "leadership ended: {out:?}");
        assert!(tries.load(std::sync::atomic::Ordering::SeqCst) > 20);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_end_leadership_at_the_deadline_saying_why() {
        let start = Instant::now();
        let why = keep_renewing(|| async { Err::<bool, _>("connection refused") }, TIMING).await;
        let took = start.elapsed();
        assert!(why.contains("connection refused"), "{why}");
        assert!(why.contains("10 s"), "{why}");
        assert!(
            took >= Duration::from_secs(10) && took <= Duration::from_secs(11),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hung_renewals_end_leadership_by_the_deadline() {
        let start = Instant::now();
        let why = keep_renewing(
            || async {
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok::<bool, String>(true)
            },
            TIMING,
        )
        .await;
        let took = start.elapsed();
        assert!(why.contains("did not answer"), "{why}");
        assert!(took <= Duration::from_secs(11), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn another_holder_ends_leadership_at_once() {
        let why = keep_renewing(|| async { Ok::<bool, String>(false) }, TIMING).await;
        assert!(why.contains("another candidate"), "{why}");
    }
}
