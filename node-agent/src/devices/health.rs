//! Device health as a small state machine.
//!
//! A probe reports what it sees ([`Health`]); a [`Tracker`] decides what is
//! advertised. Going bad is immediate. Coming back is damped: the device must
//! look good for the whole settle time before it is advertised `Healthy`
//! again, so a flapping device does not flap the node's allocatable count.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// Health of one physical device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Working.
    Healthy,
    /// Broken, with the reason.
    Unhealthy(String),
    /// The probe itself failed: we cannot tell. Distinct from a broken device,
    /// but the kubelet only knows Healthy/Unhealthy, so it is advertised as
    /// Unhealthy (never hand out a device we cannot vouch for).
    Unknown(String),
}

impl Health {
    /// True only for [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }

    /// The value the kubelet understands.
    pub fn kubelet_value(&self) -> &'static str {
        use devplug_proto::deviceplugin::v1beta1::{HEALTHY, UNHEALTHY};
        if self.is_healthy() {
            HEALTHY
        } else {
            UNHEALTHY
        }
    }

    /// The reason, empty when healthy.
    pub fn reason(&self) -> &str {
        match self {
            Health::Healthy => "",
            Health::Unhealthy(r) | Health::Unknown(r) => r,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Healthy => f.write_str("Healthy"),
            Health::Unhealthy(r) => write!(f, "Unhealthy ({r})"),
            Health::Unknown(r) => write!(f, "Unknown ({r})"),
        }
    }
}

/// Decides the advertised health of one device from its observations.
#[derive(Debug, Clone)]
pub struct Tracker {
    advertised: Health,
    /// When observations turned good while advertised bad.
    good_since: Option<Instant>,
    settle: Duration,
    last_transition: SystemTime,
}

impl Tracker {
    /// A tracker for a device first seen now; its first observation is
    /// advertised as is.
    pub fn new(first: Health, settle: Duration) -> Self {
        Self {
            advertised: first,
            good_since: None,
            settle,
            last_transition: SystemTime::now(),
        }
    }

    /// A tracker for a device that reappeared soon after vanishing: it starts
    /// unhealthy and must settle like any recovery.
    pub fn reappeared(settle: Duration, now: Instant) -> Self {
        let mut t = Self::new(
            Health::Unhealthy("reappeared after removal; settling".into()),
            settle,
        );
        t.good_since = Some(now);
        t
    }

    /// What is advertised now.
    pub fn advertised(&self) -> &Health {
        &self.advertised
    }

    /// Wall-clock time of the last advertised change.
    pub fn last_transition(&self) -> SystemTime {
        self.last_transition
    }

    /// Feeds one observation; returns true when the advertised health changed.
    pub fn observe(&mut self, seen: Health, now: Instant) -> bool {
        if seen.is_healthy() {
            if self.advertised.is_healthy() {
                return false;
            }
            let since = *self.good_since.get_or_insert(now);
            return self.tick_at(since, now);
        }
        self.good_since = None;
        if self.advertised == seen {
            return false;
        }
        self.set(seen);
        true
    }

    /// Advances time; returns true when a settled recovery became Healthy.
    pub fn tick(&mut self, now: Instant) -> bool {
        match self.good_since {
            Some(since) => self.tick_at(since, now),
            None => false,
        }
    }

    /// When [`Tracker::tick`] next needs to run, if a recovery is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.good_since.map(|s| s + self.settle)
    }

    fn tick_at(&mut self, since: Instant, now: Instant) -> bool {
        if now.saturating_duration_since(since) >= self.settle {
            self.good_since = None;
            self.set(Health::Healthy);
            true
        } else {
            false
        }
    }

    fn set(&mut self, h: Health) {
        self.advertised = h;
        self.last_transition = SystemTime::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(5);

    fn bad() -> Health {
        Health::Unhealthy("ecc".into())
    }

    #[test]
    fn going_bad_is_immediate() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Health::Healthy, S);
        assert!(t.observe(bad(), t0));
        assert_eq!(t.advertised(), &bad());
        assert!(!t.observe(bad(), t0), "same observation is not a change");
        assert!(
            t.observe(Health::Unknown("probe".into()), t0),
            "reason change"
        );
    }

    #[test]
    fn recovery_waits_for_settle_time() {
        let t0 = Instant::now();
        let mut t = Tracker::new(bad(), S);
        assert!(!t.observe(Health::Healthy, t0));
        assert_eq!(t.deadline(), Some(t0 + S));
        assert!(!t.tick(t0 + S - Duration::from_millis(1)));
        assert!(!t.advertised().is_healthy());
        assert!(t.tick(t0 + S));
        assert!(t.advertised().is_healthy());
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn flapping_restarts_the_settle_clock() {
        let t0 = Instant::now();
        let mut t = Tracker::new(bad(), S);
        t.observe(Health::Healthy, t0);
        t.observe(bad(), t0 + Duration::from_secs(3));
        t.observe(Health::Healthy, t0 + Duration::from_secs(4));
        assert!(
            !t.tick(t0 + Duration::from_secs(6)),
            "clock restarted at 4s"
        );
        assert!(t.tick(t0 + Duration::from_secs(9)));
    }

    #[test]
    fn zero_settle_recovers_at_once() {
        let mut t = Tracker::new(bad(), Duration::ZERO);
        assert!(t.observe(Health::Healthy, Instant::now()));
    }

    #[test]
    fn reappeared_device_must_settle() {
        let t0 = Instant::now();
        let mut t = Tracker::reappeared(S, t0);
        assert!(!t.advertised().is_healthy());
        assert!(!t.observe(Health::Healthy, t0 + Duration::from_secs(1)));
        assert!(t.tick(t0 + S));
    }

    #[test]
    fn kubelet_values() {
        assert_eq!(Health::Healthy.kubelet_value(), "Healthy");
        assert_eq!(bad().kubelet_value(), "Unhealthy");
        assert_eq!(Health::Unknown("x".into()).kubelet_value(), "Unhealthy");
    }
}
