//! The devices one policy advertises, as an immutable [`Snapshot`] rebuilt on
//! every change: discovery results, damped health and sharing combined.
//! Readers (ListAndWatch streams, Allocate) share the latest snapshot through
//! a `tokio::sync::watch` channel and never block the writer.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use devplug_proto::deviceplugin::v1beta1 as dp;

use crate::devices::device::Device;
use crate::devices::health::{Health, Tracker};
use crate::devices::sharing;
use crate::devices::sources::SourceError;

/// One physical device as advertised.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// What discovery found (its `health` is the raw probe result).
    pub device: Device,
    /// Advertised, damped health.
    pub health: Health,
    /// When `health` last changed.
    pub last_transition: SystemTime,
}

/// Everything advertised for one policy at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Physical devices by ID.
    pub devices: BTreeMap<String, DeviceState>,
    /// Advertised IDs per physical device (1 unless time-sliced).
    pub replicas: u32,
    /// The ListAndWatch message, built once per change.
    pub list: dp::ListAndWatchResponse,
    /// Increments on every change.
    pub version: u64,
    /// Why the last discovery failed, if it did (for example no NVML).
    pub source_error: Option<String>,
}

/// Why an advertised ID cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// No such advertised ID.
    Unknown(String),
    /// The ID exists but its device is not healthy.
    Unhealthy(String, Health),
}

impl Snapshot {
    /// The physical device behind an advertised ID, if it exists and is
    /// healthy.
    pub fn usable(&self, advertised: &str) -> Result<&DeviceState, LookupError> {
        let state = sharing::physical_of(advertised, self.replicas)
            .and_then(|p| self.devices.get(p))
            .ok_or_else(|| LookupError::Unknown(advertised.to_string()))?;
        if state.health.is_healthy() {
            Ok(state)
        } else {
            Err(LookupError::Unhealthy(
                advertised.to_string(),
                state.health.clone(),
            ))
        }
    }

    /// Physical device of an advertised ID, healthy or not.
    pub fn physical(&self, advertised: &str) -> Option<&DeviceState> {
        sharing::physical_of(advertised, self.replicas).and_then(|p| self.devices.get(p))
    }

    /// Counts of (healthy, total) physical devices.
    pub fn counts(&self) -> (usize, usize) {
        let healthy = self
            .devices
            .values()
            .filter(|d| d.health.is_healthy())
            .count();
        (healthy, self.devices.len())
    }
}

/// Mutable state behind the snapshots.
pub struct Inventory {
    source_error: Option<String>,
    known: BTreeMap<String, (Device, Tracker)>,
    gone: HashMap<String, Instant>,
    settle: Duration,
    replicas: u32,
    version: u64,
}

impl Inventory {
    /// An empty inventory.
    pub fn new(settle: Duration, replicas: u32) -> Self {
        Self {
            source_error: None,
            known: BTreeMap::new(),
            gone: HashMap::new(),
            settle,
            replicas: replicas.max(1),
            version: 0,
        }
    }

    /// Applies one discovery result; returns true when anything advertised
    /// changed. A failed probe keeps the known devices, as `Unknown`.
    pub fn apply(&mut self, found: Result<Vec<Device>, SourceError>, now: Instant) -> bool {
        // A cleared source error is a change on its own (it is a reason in
        // the status), even when the devices come back exactly as before.
        let (devices, mut changed) = match found {
            Ok(d) => (d, self.source_error.take().is_some()),
            Err(e) => {
                let reason = format!("probe failed: {e}");
                let mut changed = self.source_error.as_deref() != Some(&e.to_string());
                self.source_error = Some(e.to_string());
                for (_, t) in self.known.values_mut() {
                    changed |= t.observe(Health::Unknown(reason.clone()), now);
                }
                return self.bump(changed);
            }
        };
        self.gone
            .retain(|_, at| now.saturating_duration_since(*at) < self.settle);
        let mut next = BTreeMap::new();
        for dev in devices {
            let entry = match self.known.remove(&dev.id) {
                Some((old, mut tracker)) => {
                    changed |= tracker.observe(dev.health.clone(), now);
                    changed |= old.nodes != dev.nodes || old.numa_node != dev.numa_node;
                    (dev, tracker)
                }
                None => {
                    changed = true;
                    let tracker = if self.gone.remove(&dev.id).is_some() && !self.settle.is_zero() {
                        let mut t = Tracker::reappeared(self.settle, now);
                        t.observe(dev.health.clone(), now);
                        t
                    } else {
                        Tracker::new(dev.health.clone(), self.settle)
                    };
                    (dev, tracker)
                }
            };
            next.insert(entry.0.id.clone(), entry);
        }
        for id in std::mem::take(&mut self.known).into_keys() {
            changed = true;
            self.gone.insert(id, now);
        }
        self.known = next;
        self.bump(changed)
    }

    /// Advances settle timers; returns true when a device recovered.
    pub fn tick(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for (_, t) in self.known.values_mut() {
            changed |= t.tick(now);
        }
        self.bump(changed)
    }

    /// The earliest pending recovery.
    pub fn deadline(&self) -> Option<Instant> {
        self.known.values().filter_map(|(_, t)| t.deadline()).min()
    }

    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.version += 1;
        }
        changed
    }

    /// Builds the snapshot of the current state.
    pub fn snapshot(&self) -> Snapshot {
        let mut list = dp::ListAndWatchResponse {
            devices: Vec::with_capacity(self.known.len() * self.replicas as usize),
        };
        let mut devices = BTreeMap::new();
        for (id, (dev, tracker)) in &self.known {
            let health = tracker.advertised().clone();
            for rid in sharing::replica_ids(id, self.replicas) {
                list.devices.push(dp::Device {
                    id: rid,
                    health: health.kubelet_value().to_string(),
                    topology: dev.numa_node.map(dp::TopologyInfo::numa),
                });
            }
            devices.insert(
                id.clone(),
                DeviceState {
                    device: dev.clone(),
                    health,
                    last_transition: tracker.last_transition(),
                },
            );
        }
        Snapshot {
            devices,
            replicas: self.replicas,
            list,
            version: self.version,
            source_error: self.source_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, h: Health) -> Device {
        Device {
            capacity: Default::default(),
            partitioning: Default::default(),
            id: id.into(),
            numa_node: Some(0),
            nodes: vec![],
            health: h,
            links: vec![],
            attributes: Default::default(),
        }
    }

    const S: Duration = Duration::from_secs(2);

    #[test]
    fn replicas_share_the_physical_health() {
        let t0 = Instant::now();
        let mut inv = Inventory::new(S, 3);
        assert!(inv.apply(
            Ok(vec![dev("a", Health::Healthy), dev("b", Health::Healthy)]),
            t0
        ));
        let s = inv.snapshot();
        assert_eq!(s.list.devices.len(), 6);
        assert!(s.usable("a::2").is_ok());
        assert!(matches!(s.usable("a::3"), Err(LookupError::Unknown(_))));
        assert!(matches!(s.usable("a"), Err(LookupError::Unknown(_))));

        assert!(inv.apply(
            Ok(vec![
                dev("a", Health::Unhealthy("x".into())),
                dev("b", Health::Healthy)
            ]),
            t0
        ));
        let s = inv.snapshot();
        let bad: Vec<_> = s
            .list
            .devices
            .iter()
            .filter(|d| d.health == "Unhealthy")
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(bad, vec!["a::0", "a::1", "a::2"]);
        assert!(matches!(s.usable("a::1"), Err(LookupError::Unhealthy(..))));
        assert_eq!(s.list.devices[0].topology, Some(dp::TopologyInfo::numa(0)));
    }

    #[test]
    fn unchanged_discovery_is_not_a_change() {
        let t0 = Instant::now();
        let mut inv = Inventory::new(S, 1);
        inv.apply(Ok(vec![dev("a", Health::Healthy)]), t0);
        let v = inv.snapshot().version;
        assert!(!inv.apply(Ok(vec![dev("a", Health::Healthy)]), t0));
        assert_eq!(inv.snapshot().version, v);
    }

    #[test]
    fn probe_failure_marks_known_devices_unknown() {
        let t0 = Instant::now();
        let mut inv = Inventory::new(S, 1);
        inv.apply(Ok(vec![dev("a", Health::Healthy)]), t0);
        let err = SourceError::Config("sysfs vanished".into());
        assert!(inv.apply(Err(err), t0));
        let s = inv.snapshot();
        assert!(
            matches!(&s.devices["a"].health, Health::Unknown(r) if r.contains("sysfs vanished"))
        );
    }

    #[test]
    fn a_source_error_is_kept_as_a_reason_until_discovery_works_again() {
        let t0 = Instant::now();
        let mut inv = Inventory::new(S, 1);
        assert!(inv.apply(
            Err(SourceError::Unavailable("NVML is not available".into())),
            t0
        ));
        assert_eq!(
            inv.snapshot().source_error.as_deref(),
            Some("NVML is not available")
        );
        assert!(
            !inv.apply(
                Err(SourceError::Unavailable("NVML is not available".into())),
                t0
            ),
            "same reason"
        );
        assert!(inv.apply(Ok(vec![dev("g", Health::Healthy)]), t0));
        assert_eq!(inv.snapshot().source_error, None);
    }

    /// The error clears while the very same devices are found again: that
    /// is still news (the status carries the error as a reason).
    #[test]
    fn a_cleared_source_error_is_published_even_when_no_device_changed() {
        let t0 = Instant::now();
        let mut inv = Inventory::new(S, 1);
        assert!(inv.apply(Ok(vec![dev("g", Health::Healthy)]), t0));
        assert!(inv.apply(
            Err(SourceError::Unavailable("sysfs read failed".into())),
            t0
        ));
        let v = inv.snapshot().version;
        assert!(
            inv.apply(Ok(vec![dev("g", Health::Healthy)]), t0),
            "clearing the error must be published"
        );
        assert!(inv.snapshot().version > v);
        assert_eq!(inv.snapshot().source_error, None);
    }

    #[test]
    fn hotplug_and_reappearance_settle() {
        let t0 = Instant::now();
        let mut inv = Inventory::new(S, 1);
        inv.apply(Ok(vec![dev("a", Health::Healthy)]), t0);
        assert!(inv.apply(Ok(vec![]), t0), "removal is a change");
        assert!(inv.snapshot().list.devices.is_empty());
        assert!(inv.apply(
            Ok(vec![dev("a", Health::Healthy)]),
            t0 + Duration::from_millis(100)
        ));
        assert!(
            !inv.snapshot().devices["a"].health.is_healthy(),
            "flapping presence is damped"
        );
        assert!(inv.tick(t0 + Duration::from_millis(100) + S));
        assert!(inv.snapshot().devices["a"].health.is_healthy());
        // A brand-new device is advertised healthy at once.
        assert!(inv.apply(
            Ok(vec![dev("a", Health::Healthy), dev("c", Health::Healthy)]),
            t0 + S * 2
        ));
        assert!(inv.snapshot().devices["c"].health.is_healthy());
    }
}
