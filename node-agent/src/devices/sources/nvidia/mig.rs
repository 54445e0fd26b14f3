//! MIG partitions as DRA partitionable devices (KEP-4815,
//! `spec.source.nvidia.migPartitions`).
//!
//! A GPU in MIG mode is published as a counter set named after it, one
//! counter per memory slice (`memory-slice-0` … `memory-slice-7` on an
//! A100 or H100), and each MIG profile at each placement NVML offers as a
//! device that consumes the slices of its placement. The scheduler then
//! never gives out two partitions that overlap, which is the rule NVML
//! itself enforces for GPU instances. The GPU itself is not a device: in
//! MIG mode a process cannot use the GPU outside an instance; the biggest
//! profile (`7g.80gb`) stands for the whole GPU.
//!
//! Prepare makes the GPU instance at the placement, with one compute
//! instance spanning it ([`MigPartitioner::create`]), or adopts the one
//! already there (a prepare repeated after the agent died mid-way);
//! unprepare removes both. The container gets the parent GPU through the
//! NVIDIA container toolkit's CDI name (device node, driver libraries) and
//! the instance's two capability nodes (`/dev/nvidia-caps/nvidia-cap<N>`,
//! numbers from the driver's `mig-minors` table) through the claim's spec;
//! its variables name the instance by its `MIG-…` UUID.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{Gpu, GpuLibrary};
use crate::devices::device::{Made, Partition, Partitioning, slot_counters};
use crate::devices::sources::Partitioner;

/// A GPU's MIG layout, when MIG mode is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigLayout {
    /// Memory slices the GPU has: the slots placements are counted in.
    pub slots: u32,
    /// The GPU instance profiles it offers.
    pub profiles: Vec<MigProfile>,
}

/// One GPU instance profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigProfile {
    /// NVML's profile ID.
    pub id: u32,
    /// Its name (`1g.10gb`).
    pub name: String,
    /// Memory of an instance, in bytes.
    pub memory_bytes: u64,
    /// Streaming multiprocessors of an instance.
    pub multiprocessors: u32,
    /// Where an instance may go: (first slot, slots).
    pub placements: Vec<(u32, u32)>,
}

/// A GPU instance on the GPU (with its compute instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigInstance {
    /// The profile it was made with.
    pub profile: u32,
    /// First slot of its placement.
    pub start: u32,
    /// GPU instance ID.
    pub instance: u32,
    /// Compute instance ID.
    pub compute: u32,
    /// `MIG-…` UUID.
    pub uuid: String,
}

/// What a library without MIG support answers.
pub const NO_MIG: &str = "this NVML library cannot make MIG instances";

/// Counter name of memory slice `i`.
pub fn slice_counter(i: u32) -> String {
    format!("memory-slice-{i}")
}

/// The device ID of `profile` at `start` on `gpu`.
pub fn partition_id(gpu: &str, profile: &str, start: u32) -> String {
    format!("{gpu}-mig-{profile}-{start}")
}

/// The counters of a GPU in MIG mode: one per memory slice.
pub fn counters(layout: &MigLayout) -> BTreeMap<String, String> {
    slot_counters(0..layout.slots, slice_counter)
}

/// The partitions `gpu` offers, built from its published device `parent`
/// (nodes, health, topology carried over). A placement reaching past the
/// GPU's slots is left out (NVML would refuse it).
pub fn partitions(
    gpu: &Gpu,
    layout: &MigLayout,
    parent: &crate::devices::device::Device,
) -> Vec<crate::devices::device::Device> {
    let mut out = Vec::new();
    for p in &layout.profiles {
        for &(start, size) in &p.placements {
            if size == 0 || start.saturating_add(size) > layout.slots {
                continue;
            }
            let mut attributes = parent.attributes.clone();
            attributes.remove("uuid");
            attributes.insert("parentUUID".into(), gpu.uuid.clone());
            attributes.insert("profile".into(), p.name.clone());
            attributes.insert("placementStart".into(), start.to_string());
            attributes.insert("placementSize".into(), size.to_string());
            let mut capacity = BTreeMap::new();
            capacity.insert("memory".to_string(), super::memory_quantity(p.memory_bytes));
            capacity.insert("multiprocessors".to_string(), p.multiprocessors.to_string());
            out.push(crate::devices::device::Device {
                id: partition_id(&gpu.uuid, &p.name, start),
                numa_node: parent.numa_node,
                nodes: parent.nodes.clone(),
                health: parent.health.clone(),
                links: Vec::new(),
                attributes,
                capacity,
                partitioning: Partitioning::Partition(Partition {
                    parent: gpu.uuid.clone(),
                    profile: p.id,
                    profile_name: p.name.clone(),
                    start,
                    size,
                    counters: slot_counters(start..start + size, slice_counter),
                }),
            });
        }
    }
    out
}

/// The capability device nodes of GPU instance `gi` and its compute
/// instance `ci` on the GPU with minor `gpu`, from the driver's table
/// (`/proc/driver/nvidia-caps/mig-minors`: lines `gpu0/gi1/access 12` and
/// `gpu0/gi1/ci0/access 13`).
pub fn cap_nodes(table: &str, gpu: u32, gi: u32, ci: u32) -> Result<Vec<String>, String> {
    let want_gi = format!("gpu{gpu}/gi{gi}/access");
    let want_ci = format!("gpu{gpu}/gi{gi}/ci{ci}/access");
    let minor = |want: &str| -> Result<String, String> {
        table
            .lines()
            .find_map(|l| {
                let (k, v) = l.trim().split_once(char::is_whitespace)?;
                (k == want).then(|| v.trim().parse::<u32>().ok()).flatten()
            })
            .map(|m| format!("/dev/nvidia-caps/nvidia-cap{m}"))
            .ok_or_else(|| format!("the MIG minors table has no entry {want}"))
    };
    Ok(vec![minor(&want_gi)?, minor(&want_ci)?])
}

/// Makes and removes MIG instances through the source's NVML.
pub struct MigPartitioner {
    /// The source's library, once loaded.
    pub lib: Arc<Mutex<Option<Arc<dyn GpuLibrary>>>>,
    /// GPUs the source has seen, by UUID.
    pub seen: Arc<Mutex<BTreeMap<String, Gpu>>>,
    /// The driver's MIG minors table.
    pub minors: PathBuf,
}

impl MigPartitioner {
    fn library(&self) -> Result<Arc<dyn GpuLibrary>, String> {
        self.lib
            .lock()
            .map_err(|_| "NVML state poisoned".to_string())?
            .clone()
            .ok_or_else(|| "NVML is not loaded yet".to_string())
    }

    fn gpu(&self, uuid: &str) -> Result<Gpu, String> {
        self.seen
            .lock()
            .map_err(|_| "NVML state poisoned".to_string())?
            .get(uuid)
            .cloned()
            .ok_or_else(|| format!("GPU {uuid} is not on this node"))
    }

    fn made(&self, gpu: &Gpu, i: &MigInstance, nodes: Vec<String>) -> Made {
        let name = gpu
            .mig
            .as_ref()
            .and_then(|l| l.profiles.iter().find(|p| p.id == i.profile))
            .map(|p| p.name.clone())
            .unwrap_or_else(|| format!("profile{}", i.profile));
        Made {
            parent: gpu.uuid.clone(),
            id: partition_id(&gpu.uuid, &name, i.start),
            profile: i.profile,
            start: i.start,
            instance: i.instance,
            compute: i.compute,
            uuid: i.uuid.clone(),
            nodes,
        }
    }
}

impl Partitioner for MigPartitioner {
    fn create(&self, p: &Partition) -> Result<Made, String> {
        let lib = self.library()?;
        let gpu = self.gpu(&p.parent)?;
        let there = lib
            .mig_instances(&p.parent)?
            .into_iter()
            .find(|i| i.profile == p.profile && i.start == p.start);
        let (inst, adopted) = match there {
            Some(i) if !i.uuid.is_empty() => (i, true),
            // Half made (no compute instance): made again whole.
            Some(i) => {
                lib.destroy_mig(&p.parent, i.instance, i.compute)?;
                (lib.create_mig(&p.parent, p.profile, p.start)?, false)
            }
            None => (lib.create_mig(&p.parent, p.profile, p.start)?, false),
        };
        let nodes = std::fs::read_to_string(&self.minors)
            .map_err(|e| format!("cannot read {}: {e}", self.minors.display()))
            .and_then(|t| cap_nodes(&t, gpu.minor, inst.instance, inst.compute));
        match nodes {
            Ok(nodes) => Ok(self.made(&gpu, &inst, nodes)),
            Err(e) => {
                // Not handed out, so not left behind either.
                if !adopted {
                    let _ = lib.destroy_mig(&p.parent, inst.instance, inst.compute);
                }
                Err(e)
            }
        }
    }

    fn destroy(&self, m: &Made) -> Result<(), String> {
        self.library()?
            .destroy_mig(&m.parent, m.instance, m.compute)
    }

    fn existing(&self) -> Result<Vec<Made>, String> {
        let lib = self.library()?;
        let gpus: Vec<Gpu> = self
            .seen
            .lock()
            .map_err(|_| "NVML state poisoned".to_string())?
            .values()
            .filter(|g| g.mig.is_some())
            .cloned()
            .collect();
        let mut out = Vec::new();
        for g in gpus {
            for i in lib.mig_instances(&g.uuid)? {
                out.push(self.made(&g, &i, Vec::new()));
            }
        }
        Ok(out)
    }
}
