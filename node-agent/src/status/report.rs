//! The agent's entry in its node's `NodeDeviceStatus`, as a pure function of
//! the device snapshot and the allocations.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use devplug_api::{
    Allocation, DeviceHealth, DeviceStatus, OrphanedDevice, ResourceStatus, STATE_SERVING,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::config::PluginConfig;
use crate::devices::health::Health;
use crate::devices::inventory::Snapshot;
use crate::devices::sharing;
use crate::status::podresources::AllocView;

fn time(t: SystemTime) -> Option<Time> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    // Whole seconds: metav1.Time has second precision on the wire, and a
    // sub-second difference must not look like a change.
    Timestamp::from_second(i64::try_from(secs).ok()?)
        .ok()
        .map(Time)
}

/// A device's health in NodeDeviceStatus's vocabulary (the kubelet's
/// `allocatedResourcesStatus`); the reason goes in its own field.
impl From<&Health> for DeviceHealth {
    fn from(h: &Health) -> DeviceHealth {
        match h {
            Health::Healthy => DeviceHealth::Healthy,
            Health::Unhealthy(_) => DeviceHealth::Unhealthy,
            Health::Unknown(_) => DeviceHealth::Unknown,
        }
    }
}

/// Builds the entry of one resource.
pub fn resource_status(cfg: &PluginConfig, snap: &Snapshot, allocs: &AllocView) -> ResourceStatus {
    let mut by_physical: BTreeMap<&str, BTreeSet<&Allocation>> = BTreeMap::new();
    let mut orphaned = Vec::new();
    for (id, holders) in &allocs.by_device {
        match sharing::physical_of(id, snap.replicas) {
            Some(p) if snap.devices.contains_key(p) => {
                by_physical.entry(p).or_default().extend(holders.iter());
            }
            // Held, but not an ID we advertise (any more).
            _ => orphaned.push(OrphanedDevice {
                id: id.clone(),
                allocations: holders.iter().cloned().collect(),
            }),
        }
    }
    let mut devices = Vec::with_capacity(snap.devices.len());
    let (mut healthy, mut allocated) = (0, 0);
    for (id, st) in &snap.devices {
        let health = DeviceHealth::from(&st.health);
        let reason = (!st.health.is_healthy()).then(|| st.health.reason().to_string());
        if health == DeviceHealth::Healthy {
            healthy += 1;
        }
        let allocations: Vec<Allocation> = by_physical
            .get(id.as_str())
            .map(|s| s.iter().map(|a| (*a).clone()).collect())
            .unwrap_or_default();
        if !allocations.is_empty() {
            allocated += 1;
        }
        devices.push(DeviceStatus {
            id: id.clone(),
            health,
            reason,
            last_transition_time: time(st.last_transition),
            numa_nodes: st.device.numa_node.into_iter().collect(),
            allocations,
        });
    }
    ResourceStatus {
        resource_name: cfg.resource_name.clone(),
        policy: cfg.name.clone(),
        state: STATE_SERVING.into(),
        reason: snap.source_error.clone().or_else(|| allocs.error.clone()),
        healthy,
        total: devices.len() as i64,
        allocated,
        devices,
        orphaned,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::device::Device;
    use crate::devices::inventory::Inventory;

    fn cfg() -> PluginConfig {
        let p = devplug_api::policies_from_yaml(
            "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {name: gpus}\nspec:\n  resourceName: x.io/gpu\n  source: {simulated: {count: 1}}\n  sharing: {strategy: TimeSlicing, replicas: 2}\n",
        )
        .unwrap()
        .remove(0);
        PluginConfig::from_policy(&p)
    }

    /// After `sharing.replicas` goes from 4 to 2, the containers holding
    /// replicas 2 and 3 still run: those IDs are reported as orphaned with
    /// their holders, and the devices still count the holders they know.
    #[test]
    fn ids_dropped_by_a_spec_change_are_orphans_not_lost() {
        let mut inv = Inventory::new(Duration::from_secs(1), 2);
        inv.apply(
            Ok(vec![Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                id: "g0".into(),
                numa_node: None,
                nodes: vec![],
                health: Health::Healthy,
                links: vec![],
                attributes: Default::default(),
            }]),
            Instant::now(),
        );
        let a = |pod: &str| Allocation {
            namespace: "ns".into(),
            pod: pod.into(),
            container: "c".into(),
        };
        let view = AllocView {
            by_device: BTreeMap::from([
                ("g0::1".to_string(), BTreeSet::from([a("kept")])),
                ("g0::3".to_string(), BTreeSet::from([a("old")])),
                ("g9::0".to_string(), BTreeSet::from([a("gone")])),
            ]),
            error: None,
        };
        let r = resource_status(&cfg(), &inv.snapshot(), &view);
        assert_eq!(r.allocated, 1);
        assert_eq!(r.devices[0].allocations, vec![a("kept")]);
        let ids: Vec<_> = r.orphaned.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, vec!["g0::3", "g9::0"]);
        assert_eq!(r.orphaned[0].allocations, vec![a("old")]);
    }

    #[test]
    fn replicas_fold_into_physical_devices_with_their_holders() {
        let mut inv = Inventory::new(Duration::from_secs(1), 2);
        inv.apply(
            Ok(vec![
                Device {
                    capacity: Default::default(),
                    partitioning: Default::default(),
                    id: "g0".into(),
                    numa_node: Some(1),
                    nodes: vec![],
                    health: Health::Healthy,
                    links: vec![],
                    attributes: Default::default(),
                },
                Device {
                    capacity: Default::default(),
                    partitioning: Default::default(),
                    id: "g1".into(),
                    numa_node: None,
                    nodes: vec![],
                    health: Health::Unhealthy("xid 79".into()),
                    links: vec![],
                    attributes: Default::default(),
                },
            ]),
            Instant::now(),
        );
        let a = |ns: &str, pod: &str| Allocation {
            namespace: ns.into(),
            pod: pod.into(),
            container: "c".into(),
        };
        let view = AllocView {
            by_device: BTreeMap::from([
                ("g0::0".to_string(), BTreeSet::from([a("ns", "p1")])),
                (
                    "g0::1".to_string(),
                    BTreeSet::from([a("ns", "p2"), a("ns", "p1")]),
                ),
                ("g1::1".to_string(), BTreeSet::from([a("ml", "trainer")])),
                ("other".to_string(), BTreeSet::from([a("x", "y")])),
            ]),
            error: Some("PodResources List timed out".into()),
        };
        let r = resource_status(&cfg(), &inv.snapshot(), &view);
        assert_eq!((r.total, r.healthy, r.allocated), (2, 1, 2));
        assert_eq!(r.reason.as_deref(), Some("PodResources List timed out"));
        assert_eq!(r.devices[0].allocations, vec![a("ns", "p1"), a("ns", "p2")]);
        assert_eq!(r.devices[0].numa_nodes, vec![1]);
        assert_eq!(r.devices[1].health, DeviceHealth::Unhealthy);
        assert_eq!(r.devices[1].reason.as_deref(), Some("xid 79"));
        assert_eq!(
            r.devices[1].allocations,
            vec![a("ml", "trainer")],
            "affected workloads of a broken device"
        );
        assert!(r.devices[1].last_transition_time.is_some());
        // An ID held by a container but not advertised is reported, not
        // silently dropped.
        assert_eq!(
            r.orphaned,
            vec![OrphanedDevice {
                id: "other".into(),
                allocations: vec![a("x", "y")]
            }]
        );
        // Same inputs, same entry: the writer compares entries to skip writes.
        assert_eq!(r, resource_status(&cfg(), &inv.snapshot(), &view));
    }
}
