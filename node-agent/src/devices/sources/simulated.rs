//! Simulated devices, for demos, e2e tests and benchmarks.
//!
//! Health is flipped from outside the process through a control directory,
//! `<sim-control-dir>/<policy-name>/<device-id>`: a missing file or one that
//! starts with `Healthy` means healthy; `Unhealthy: <reason>` and
//! `Unknown: <reason>` mean what they say. A file named `<device-id>.absent`
//! removes the device from the list (simulated hot-unplug). The
//! `devplug-agent sim` subcommand writes these files atomically.
//!
//! With `partitionSlots`, each device is partitionable (DRA, KEP-4815) the
//! way a GPU in MIG mode is: a counter set of its slots, and partitions of
//! 1, 2, 4, … slots at aligned placements. Making and removing a partition
//! is bookkeeping in memory ([`SimPartitions`]), refused where a real
//! device would refuse it (an overlap).

use std::path::{Path, PathBuf};

use devplug_api::SimulatedSource;
use devplug_api::topology;

use super::{Partitioner, Source, SourceError};
use crate::devices::device::{Device, Made, Partition, Partitioning, slot_counters};
use crate::devices::health::Health;

/// One simulated device as configured: ID, NUMA node, PCIe root, PCI
/// address.
struct SimDevice {
    id: String,
    numa: Option<i64>,
    pcie_root: Option<String>,
    pci_bus_id: Option<String>,
}

/// The simulated source.
pub struct Simulated {
    devices: Vec<SimDevice>,
    control: PathBuf,
    /// `partitionSlots`.
    slots: Option<u32>,
    partitions: std::sync::Arc<SimPartitions>,
}

/// Counter name of slot `i` of a partitionable simulated device.
pub fn slot_counter(i: u32) -> String {
    format!("slot-{i}")
}

/// The partitions of `parent`, divided into `slots` slots: for each size
/// 1, 2, 4, … up to `slots`, one at every start that is a multiple of it.
pub fn partitions(parent: &Device, slots: u32) -> Vec<Device> {
    let mut out = Vec::new();
    let mut size = 1;
    while size <= slots {
        let profile = format!("{size}s");
        for start in (0..=slots - size).step_by(size as usize) {
            let mut attributes = parent.attributes.clone();
            attributes.insert("parent".into(), parent.id.clone());
            attributes.insert("profile".into(), profile.clone());
            out.push(Device {
                id: format!("{}-part-{profile}-{start}", parent.id),
                numa_node: parent.numa_node,
                nodes: parent.nodes.clone(),
                health: parent.health.clone(),
                links: Vec::new(),
                attributes,
                capacity: Default::default(),
                partitioning: Partitioning::Partition(Partition {
                    parent: parent.id.clone(),
                    profile: size,
                    profile_name: profile.clone(),
                    start,
                    size,
                    counters: slot_counters(start..start + size, slot_counter),
                }),
            });
        }
        size *= 2;
    }
    out
}

/// The partitions made on simulated devices: kept in memory, refused
/// where they overlap one already made, as a real device refuses.
#[derive(Default)]
pub struct SimPartitions {
    made: std::sync::Mutex<Vec<(Made, u32)>>,
    next: std::sync::atomic::AtomicU32,
}

impl Partitioner for SimPartitions {
    fn create(&self, p: &Partition) -> Result<Made, String> {
        let mut made = self
            .made
            .lock()
            .map_err(|_| "partition state poisoned".to_string())?;
        if let Some((m, _)) = made
            .iter()
            .find(|(m, _)| m.parent == p.parent && m.start == p.start && m.profile == p.profile)
        {
            return Ok(m.clone());
        }
        if let Some((m, _)) = made.iter().find(|(m, size)| {
            m.parent == p.parent && p.start < m.start + size && m.start < p.start + p.size
        }) {
            return Err(format!("overlaps partition {} made before", m.id));
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let id = format!("{}-part-{}-{}", p.parent, p.profile_name, p.start);
        let m = Made {
            parent: p.parent.clone(),
            uuid: id.clone(),
            id,
            profile: p.profile,
            start: p.start,
            instance: n,
            compute: 0,
            nodes: Vec::new(),
        };
        made.push((m.clone(), p.size));
        Ok(m)
    }

    fn destroy(&self, m: &Made) -> Result<(), String> {
        self.made
            .lock()
            .map_err(|_| "partition state poisoned".to_string())?
            .retain(|(x, _)| !(x.parent == m.parent && x.instance == m.instance));
        Ok(())
    }

    fn existing(&self) -> Result<Vec<Made>, String> {
        Ok(self
            .made
            .lock()
            .map_err(|_| "partition state poisoned".to_string())?
            .iter()
            .map(|(m, _)| m.clone())
            .collect())
    }
}

impl Simulated {
    /// Devices from the spec; `control` is this policy's control directory.
    pub fn new(spec: &SimulatedSource, control: PathBuf) -> Self {
        let devices = if spec.devices.is_empty() {
            let prefix = spec.id_prefix.as_deref().unwrap_or("sim");
            let n = spec.count.max(1);
            let block = n.div_ceil(spec.numa_nodes.max(1));
            let root_block = n.div_ceil(spec.pcie_roots.max(1));
            (0..n)
                .map(|i| {
                    let pci = spec.pcie_roots > 0;
                    SimDevice {
                        id: format!("{prefix}-{i}"),
                        numa: (spec.numa_nodes > 0).then(|| i64::from(i / block)),
                        pcie_root: pci.then(|| format!("pci0000:{:02x}", i / root_block)),
                        pci_bus_id: pci.then(|| format!("0000:{:02x}:{:02x}.0", i / 32, i % 32)),
                    }
                })
                .collect()
        } else {
            spec.devices
                .iter()
                .map(|d| SimDevice {
                    id: d.id.clone(),
                    numa: d.numa_node,
                    pcie_root: d.pcie_root.clone(),
                    pci_bus_id: d.pci_bus_id.clone(),
                })
                .collect()
        };
        Self {
            devices,
            control,
            slots: spec.partition_slots,
            partitions: Default::default(),
        }
    }
}

/// Parses one control file's content.
pub fn parse_state(text: &str) -> Health {
    let t = text.trim();
    let (state, reason) = match t.split_once(':') {
        Some((s, r)) => (s.trim(), r.trim()),
        None => (t, ""),
    };
    let reason = if reason.is_empty() {
        "set through the simulation control directory".to_string()
    } else {
        reason.to_string()
    };
    match state {
        "" | "Healthy" => Health::Healthy,
        "Unknown" => Health::Unknown(reason),
        "Unhealthy" => Health::Unhealthy(reason),
        other => Health::Unknown(format!("unreadable simulation state {other:?}")),
    }
}

fn read_state(path: &Path) -> Result<Option<String>, SourceError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SourceError::io(path, e)),
    }
}

impl Source for Simulated {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        let mut out = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            let id = &d.id;
            if self.control.join(format!("{id}.absent")).exists() {
                continue;
            }
            let health = match read_state(&self.control.join(id)) {
                Ok(None) => Health::Healthy,
                Ok(Some(text)) => parse_state(&text),
                Err(e) => Health::Unknown(e.to_string()),
            };
            let mut attributes = std::collections::BTreeMap::new();
            if let Some(r) = &d.pcie_root {
                attributes.insert(topology::PCIE_ROOT_ATTRIBUTE.to_string(), r.clone());
            }
            if let Some(b) = &d.pci_bus_id {
                attributes.insert(topology::PCI_BUS_ID_ATTRIBUTE.to_string(), b.clone());
            }
            let mut device = Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                id: id.clone(),
                numa_node: d.numa,
                nodes: Vec::new(),
                health,
                links: Vec::new(),
                attributes,
            };
            if let Some(n) = self.slots {
                out.extend(partitions(&device, n));
                device.partitioning = Partitioning::Divided {
                    counters: slot_counters(0..n, slot_counter),
                };
            }
            out.push(device);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![self.control.clone()]
    }

    fn watch_contents(&self) -> bool {
        true
    }

    fn partitioner(&self) -> Option<std::sync::Arc<dyn Partitioner>> {
        self.slots
            .is_some()
            .then(|| self.partitions.clone() as std::sync::Arc<dyn Partitioner>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_and_numa_blocks() {
        let s = Simulated::new(
            &SimulatedSource {
                count: 4,
                numa_nodes: 2,
                id_prefix: Some("foo".into()),
                devices: vec![],
                pcie_roots: 0,
                partition_slots: None,
            },
            PathBuf::from("/nonexistent"),
        );
        let d = s.discover().unwrap();
        assert!(
            d.iter().all(|d| d.attributes.is_empty()),
            "no PCI facts asked for"
        );
        let got: Vec<_> = d.iter().map(|d| (d.id.as_str(), d.numa_node)).collect();
        assert_eq!(
            got,
            vec![
                ("foo-0", Some(0)),
                ("foo-1", Some(0)),
                ("foo-2", Some(1)),
                ("foo-3", Some(1))
            ]
        );
        assert!(d.iter().all(|d| d.health.is_healthy()));
    }

    #[test]
    fn generated_devices_spread_over_pcie_roots_with_distinct_addresses() {
        let s = Simulated::new(
            &SimulatedSource {
                count: 70,
                pcie_roots: 2,
                ..Default::default()
            },
            PathBuf::from("/nonexistent"),
        );
        let d = s.discover().unwrap();
        let attr = |i: usize, k: &str| d[i].attributes.get(k).cloned();
        let by_id: std::collections::BTreeMap<_, _> = d
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i))
            .collect();
        let root = |id: &str| attr(by_id[id], topology::PCIE_ROOT_ATTRIBUTE);
        assert_eq!(root("sim-0").as_deref(), Some("pci0000:00"));
        assert_eq!(root("sim-34").as_deref(), Some("pci0000:00"));
        assert_eq!(root("sim-35").as_deref(), Some("pci0000:01"));
        assert_eq!(root("sim-69").as_deref(), Some("pci0000:01"));
        let bus = |id: &str| attr(by_id[id], topology::PCI_BUS_ID_ATTRIBUTE).unwrap();
        assert_eq!(bus("sim-33"), "0000:01:01.0");
        let all: std::collections::BTreeSet<_> =
            (0..70).map(|i| bus(&format!("sim-{i}"))).collect();
        assert_eq!(all.len(), 70, "addresses are distinct");
        assert!(all.iter().all(|b| topology::is_pci_bus_id(b)));
        // Explicit devices carry what they are given, and only that.
        let s = Simulated::new(
            &SimulatedSource {
                devices: vec![
                    devplug_api::SimulatedDevice {
                        id: "a".into(),
                        numa_node: None,
                        pcie_root: Some("pci0000:40".into()),
                        pci_bus_id: None,
                    },
                    devplug_api::SimulatedDevice {
                        id: "b".into(),
                        numa_node: None,
                        pcie_root: None,
                        pci_bus_id: None,
                    },
                ],
                ..Default::default()
            },
            PathBuf::from("/nonexistent"),
        );
        let d = s.discover().unwrap();
        assert_eq!(
            d[0].attributes,
            [(
                topology::PCIE_ROOT_ATTRIBUTE.to_string(),
                "pci0000:40".to_string()
            )]
            .into()
        );
        assert!(d[1].attributes.is_empty());
    }

    #[test]
    fn control_files_set_health_and_presence() {
        let dir = tempfile::tempdir().unwrap();
        let s = Simulated::new(
            &SimulatedSource {
                count: 3,
                ..Default::default()
            },
            dir.path().to_path_buf(),
        );
        std::fs::write(dir.path().join("sim-0"), "Unhealthy: fan stopped\n").unwrap();
        std::fs::write(dir.path().join("sim-1"), "Unknown").unwrap();
        std::fs::write(dir.path().join("sim-2.absent"), "").unwrap();
        let d = s.discover().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].health, Health::Unhealthy("fan stopped".into()));
        assert!(matches!(d[1].health, Health::Unknown(_)));
    }

    #[test]
    fn parse_states() {
        assert_eq!(parse_state("Healthy\n"), Health::Healthy);
        assert_eq!(parse_state(""), Health::Healthy);
        assert!(matches!(parse_state("garbage"), Health::Unknown(r) if r.contains("garbage")));
    }

    #[test]
    fn partition_slots_divide_each_device_into_aligned_partitions() {
        let s = Simulated::new(
            &SimulatedSource {
                count: 1,
                partition_slots: Some(4),
                ..Default::default()
            },
            PathBuf::from("/nonexistent"),
        );
        let d = s.discover().unwrap();
        let ids: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "sim-0",
                "sim-0-part-1s-0",
                "sim-0-part-1s-1",
                "sim-0-part-1s-2",
                "sim-0-part-1s-3",
                "sim-0-part-2s-0",
                "sim-0-part-2s-2",
                "sim-0-part-4s-0",
            ]
        );
        let Partitioning::Divided { counters } = &d[0].partitioning else {
            panic!("{:?}", d[0].partitioning)
        };
        assert_eq!(counters.len(), 4);
        let part = |id: &str| match &d.iter().find(|x| x.id == id).unwrap().partitioning {
            Partitioning::Partition(p) => p.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            part("sim-0-part-2s-2").counters.keys().collect::<Vec<_>>(),
            ["slot-2", "slot-3"]
        );
        let parts = s.partitioner().unwrap();
        let a = parts.create(&part("sim-0-part-2s-0")).unwrap();
        assert_eq!(parts.create(&part("sim-0-part-2s-0")).unwrap(), a);
        let e = parts.create(&part("sim-0-part-1s-1")).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        parts.create(&part("sim-0-part-1s-3")).unwrap();
        assert_eq!(parts.existing().unwrap().len(), 2);
        parts.destroy(&a).unwrap();
        parts.create(&part("sim-0-part-1s-1")).unwrap();
        // Without partitionSlots: plain devices, no partitioner.
        let plain = Simulated::new(
            &SimulatedSource {
                count: 1,
                ..Default::default()
            },
            PathBuf::from("/nonexistent"),
        );
        assert_eq!(plain.discover().unwrap().len(), 1);
        assert!(plain.partitioner().is_none());
    }
}
