//! NVIDIA GPUs through NVML, loaded at run time (the agent builds and runs on
//! machines without a driver; `nvml-wrapper` dlopens `libnvidia-ml.so.1`).
//!
//! - ID = GPU UUID; NUMA node from the PCI bus id through sysfs; device nodes
//!   `/dev/nvidia<minor>`, `/dev/nvidiactl`, `/dev/nvidia-uvm`,
//!   `/dev/nvidia-uvm-tools` (those that exist);
//! - health from NVML events: a critical XID makes the GPU unhealthy with the
//!   XID in the reason, except the XIDs applications cause (13, 31, 43, 45,
//!   68, 109 by default; `spec.source.nvidia.ignoredXids`); double-bit ECC
//!   errors too. NVML reports no recovery, so a GPU stays unhealthy until it
//!   disappears and comes back (its health starts afresh then), or the agent
//!   restarts;
//! - a GPU that falls off the bus is no longer enumerated by NVML: it stays
//!   in the list as Unhealthy, "GPU lost", so the pods holding it show up in
//!   the status, until it is enumerated again or the agent restarts; NVLink
//!   peers feed GetPreferredAllocation;
//! - the NVML event thread belongs to the source and stops when the source
//!   is dropped (a spec change builds a new source);
//! - no NVML on the node: discovery fails with a clear reason, which shows
//!   in NodeDeviceStatus and the policy status, and is retried on every
//!   resync (a driver installed later is picked up).
//!
//! With `migPartitions`, a GPU in MIG mode is published as partitionable
//! devices (see [`mig`]).
//!
//! NVML sits behind [`GpuLibrary`] so all of this is tested with a fake.

pub mod mig;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devplug_api::NvidiaSource;
use devplug_api::topology;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Source, SourceError};
use crate::devices::device::{Device, DeviceNode, Roots};
use crate::devices::health::Health;

/// XIDs caused by applications rather than the GPU, ignored by default.
pub const DEFAULT_IGNORED_XIDS: &[u64] = &[13, 31, 43, 45, 68, 109];

/// One GPU as the library reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Minor number of `/dev/nvidia<minor>`.
    pub minor: u32,
    /// PCI bus id as NVML writes it (`00000000:3B:00.0`).
    pub bus_id: String,
    /// Bus ids of the GPUs at the other end of active NVLinks.
    pub nvlink_peers: Vec<String>,
    /// Total memory in bytes, if NVML says.
    pub memory_bytes: Option<u64>,
    /// Its MIG layout, when MIG mode is on (read only with `migPartitions`).
    pub mig: Option<mig::MigLayout>,
}

/// GPU memory as a DRA capacity quantity, in whole MiB (`81559Mi`).
pub fn memory_quantity(bytes: u64) -> String {
    format!("{}Mi", bytes / (1024 * 1024))
}

/// A health event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuEvent {
    /// A critical XID error.
    Xid {
        /// The GPU.
        uuid: String,
        /// The XID.
        xid: u64,
    },
    /// A double-bit (uncorrectable) ECC error.
    DoubleBitEcc {
        /// The GPU.
        uuid: String,
    },
}

/// What the source needs from NVML.
pub trait GpuLibrary: Send + Sync + 'static {
    /// Every GPU present now.
    fn gpus(&self) -> Result<Vec<Gpu>, String>;
    /// Starts delivering health events to `sink` (on a thread of the
    /// library's own) until `stop` is set; returns once watching has started.
    fn watch(
        &self,
        sink: Box<dyn Fn(GpuEvent) + Send + Sync>,
        stop: Arc<AtomicBool>,
    ) -> Result<(), String>;
    /// The MIG instances on `gpu` now.
    fn mig_instances(&self, gpu: &str) -> Result<Vec<mig::MigInstance>, String> {
        let _ = gpu;
        Err(mig::NO_MIG.into())
    }
    /// Makes a GPU instance of `profile` at `start` on `gpu`, with one
    /// compute instance spanning it.
    fn create_mig(&self, gpu: &str, profile: u32, start: u32) -> Result<mig::MigInstance, String> {
        let _ = (gpu, profile, start);
        Err(mig::NO_MIG.into())
    }
    /// Removes compute instance `compute` and GPU instance `instance` of
    /// `gpu`; an instance already gone counts as removed.
    fn destroy_mig(&self, gpu: &str, instance: u32, compute: u32) -> Result<(), String> {
        let _ = (gpu, instance, compute);
        Err(mig::NO_MIG.into())
    }
}

/// Loads the GPU library; called again on every discovery until it works.
pub type Loader = Box<dyn Fn() -> Result<Arc<dyn GpuLibrary>, String> + Send + Sync>;

/// The nvidia source.
pub struct Nvidia {
    ignored: Vec<u64>,
    roots: Roots,
    loader: Loader,
    lib: Arc<Mutex<Option<Arc<dyn GpuLibrary>>>>,
    health: Arc<Mutex<HashMap<String, Health>>>,
    /// Every GPU seen since start, for reporting one NVML stops listing.
    seen: Arc<Mutex<BTreeMap<String, Gpu>>>,
    /// `migPartitions`: GPUs in MIG mode are published as partitions.
    partitions: bool,
    /// The driver's MIG minors table.
    minors: PathBuf,
    wake: Arc<Notify>,
    /// Ends the event thread when the source goes.
    stop: Arc<AtomicBool>,
}

impl Drop for Nvidia {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Health of a GPU NVML no longer enumerates.
pub const GPU_LOST: &str = "GPU lost: NVML no longer enumerates it (fallen off the bus?); the node needs a GPU reset or reboot";

/// sysfs name of an NVML bus id: `00000000:3B:00.0` → `0000:3b:00.0`.
pub fn sysfs_bus_id(nvml: &str) -> Option<String> {
    let (domain, rest) = nvml.split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    Some(format!("{domain:04x}:{}", rest.to_ascii_lowercase()))
}

impl Nvidia {
    /// A source with the real NVML.
    pub fn new(spec: &NvidiaSource, roots: Roots, mig_minors: PathBuf) -> Self {
        Self::with_loader(spec, roots, Box::new(real::load)).mig_minors(mig_minors)
    }

    /// Where the driver's MIG minors table is read.
    pub fn mig_minors(mut self, path: PathBuf) -> Self {
        self.minors = path;
        self
    }

    /// A source with another library (tests).
    pub fn with_loader(spec: &NvidiaSource, roots: Roots, loader: Loader) -> Self {
        Self {
            ignored: spec
                .ignored_xids
                .clone()
                .unwrap_or_else(|| DEFAULT_IGNORED_XIDS.to_vec()),
            roots,
            loader,
            lib: Arc::default(),
            health: Arc::default(),
            seen: Arc::default(),
            partitions: spec.mig_partitions,
            minors: PathBuf::from("/proc/driver/nvidia-caps/mig-minors"),
            wake: Arc::new(Notify::new()),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn library(&self) -> Result<Arc<dyn GpuLibrary>, SourceError> {
        let mut slot = self
            .lib
            .lock()
            .map_err(|_| SourceError::Config("NVML state poisoned".into()))?;
        if let Some(lib) = slot.as_ref() {
            return Ok(lib.clone());
        }
        let lib = (self.loader)().map_err(SourceError::Unavailable)?;
        let health = self.health.clone();
        let wake = self.wake.clone();
        let ignored = self.ignored.clone();
        let watching = lib.watch(
            Box::new(move |ev| {
                let (uuid, h) = match ev {
                    GpuEvent::Xid { xid, .. } if ignored.contains(&xid) => return,
                    GpuEvent::Xid { uuid, xid } => {
                        (uuid, Health::Unhealthy(format!("XID {xid} (critical)")))
                    }
                    GpuEvent::DoubleBitEcc { uuid } => {
                        (uuid, Health::Unhealthy("double-bit ECC error".into()))
                    }
                };
                warn!(gpu = %uuid, health = %h, "GPU health event");
                if let Ok(mut m) = health.lock() {
                    m.insert(uuid, h);
                }
                wake.notify_one();
            }),
            self.stop.clone(),
        );
        if let Err(e) = watching {
            // Still serve the GPUs; their health just cannot be watched.
            warn!(error = %e, "cannot watch NVML events; GPU health is not monitored");
        }
        info!("NVML loaded");
        *slot = Some(lib.clone());
        Ok(lib)
    }

    /// The sysfs bus entry of the GPU at `bus_id`.
    fn pci_entry(&self, bus_id: &str) -> Option<PathBuf> {
        Some(
            self.roots
                .sys
                .join("bus/pci/devices")
                .join(sysfs_bus_id(bus_id)?),
        )
    }

    fn numa(&self, bus_id: &str) -> Option<i64> {
        std::fs::read_to_string(self.pci_entry(bus_id)?.join("numa_node"))
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
    }

    /// The PCIe root complex of the GPU at `bus_id`, from its sysfs link.
    fn pcie_root(&self, bus_id: &str) -> Option<String> {
        super::pcie_root(&self.pci_entry(bus_id)?)
    }

    fn node(&self, host: &str) -> Option<DeviceNode> {
        self.roots.dev_local(host).exists().then(|| DeviceNode {
            host_path: host.into(),
            container_path: host.into(),
            permissions: "rw".into(),
        })
    }
}

impl Source for Nvidia {
    fn kind(&self) -> &'static str {
        "nvidia"
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        let lib = self.library()?;
        let gpus = lib.gpus().map_err(SourceError::Unavailable)?;
        let by_bus: BTreeMap<String, String> = gpus
            .iter()
            .map(|g| (g.bus_id.to_ascii_lowercase(), g.uuid.clone()))
            .collect();
        let lost: Vec<Gpu> = match self.seen.lock() {
            Ok(mut seen) => {
                for g in &gpus {
                    seen.insert(g.uuid.clone(), g.clone());
                }
                seen.values()
                    .filter(|s| !gpus.iter().any(|g| g.uuid == s.uuid))
                    .cloned()
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        let health = match self.health.lock() {
            Ok(mut m) => {
                // A lost GPU starts afresh if it comes back.
                for g in &lost {
                    m.remove(&g.uuid);
                }
                m.clone()
            }
            Err(_) => HashMap::new(),
        };
        let control: Vec<DeviceNode> =
            ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
                .iter()
                .filter_map(|p| self.node(p))
                .collect();
        let mut out = Vec::with_capacity(gpus.len());
        for mut g in gpus {
            if !self.partitions {
                g.mig = None;
            }
            let dev_node = format!("/dev/nvidia{}", g.minor);
            let mut nodes: Vec<DeviceNode> = self.node(&dev_node).into_iter().collect();
            let h = match health.get(&g.uuid) {
                Some(h) => h.clone(),
                None if nodes.is_empty() => Health::Unhealthy(format!("{dev_node} is missing")),
                None => Health::Healthy,
            };
            nodes.extend(control.iter().cloned());
            let mut links: Vec<String> = g
                .nvlink_peers
                .iter()
                .filter_map(|b| by_bus.get(&b.to_ascii_lowercase()).cloned())
                .collect();
            links.sort();
            links.dedup();
            let mut attributes: std::collections::BTreeMap<String, String> = [
                ("uuid".to_string(), g.uuid.clone()),
                ("pciBusID".to_string(), g.bus_id.to_ascii_lowercase()),
                ("minor".to_string(), g.minor.to_string()),
            ]
            .into();
            if let Some(b) = topology::normalize_pci_bus_id(&g.bus_id) {
                attributes.insert(topology::PCI_BUS_ID_ATTRIBUTE.into(), b);
            }
            if let Some(r) = self.pcie_root(&g.bus_id) {
                attributes.insert(topology::PCIE_ROOT_ATTRIBUTE.into(), r);
            }
            let mut whole = Device {
                capacity: g
                    .memory_bytes
                    .map(|b| ("memory".to_string(), memory_quantity(b)))
                    .into_iter()
                    .collect(),
                numa_node: self.numa(&g.bus_id),
                attributes,
                id: g.uuid.clone(),
                nodes,
                health: h,
                links,
                partitioning: Default::default(),
            };
            if let Some(layout) = &g.mig {
                out.extend(mig::partitions(&g, layout, &whole));
                whole.partitioning = crate::devices::device::Partitioning::Divided {
                    counters: mig::counters(layout),
                };
            }
            out.push(whole);
        }
        for g in lost {
            out.push(Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                numa_node: self.numa(&g.bus_id),
                id: g.uuid,
                nodes: Vec::new(),
                health: Health::Unhealthy(GPU_LOST.into()),
                links: Vec::new(),
                attributes: Default::default(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![self.roots.dev.clone()]
    }

    fn wake(&self) -> Option<Arc<Notify>> {
        Some(self.wake.clone())
    }

    fn partitioner(&self) -> Option<Arc<dyn super::Partitioner>> {
        self.partitions.then(|| {
            Arc::new(mig::MigPartitioner {
                lib: self.lib.clone(),
                seen: self.seen.clone(),
                minors: self.minors.clone(),
            }) as Arc<dyn super::Partitioner>
        })
    }
}

/// The real NVML, through `nvml-wrapper`.
mod real {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use nvml_wrapper::Nvml;
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    use nvml_wrapper::error::NvmlError;
    use tracing::warn;

    use super::mig::{MigInstance, MigLayout, MigProfile};
    use super::{Gpu, GpuEvent, GpuLibrary};

    /// Links per GPU NVML may report.
    const MAX_LINKS: u32 = 18;

    pub struct RealNvml {
        nvml: Arc<Nvml>,
    }

    impl RealNvml {
        fn device(&self, uuid: &str) -> Result<nvml_wrapper::Device<'_>, String> {
            self.nvml
                .device_by_uuid(uuid)
                .map_err(|e| format!("GPU {uuid}: {e}"))
        }
    }

    /// The MIG layout of `d` when MIG mode is on: its profiles, and as many
    /// slots as the widest placement reaches.
    fn mig_layout(nvml: &Nvml, d: &nvml_wrapper::Device<'_>) -> Option<MigLayout> {
        if !devplug_nvml_mig::enabled(d) {
            return None;
        }
        let profiles = match devplug_nvml_mig::profiles(nvml, d) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the GPU's MIG profiles; published whole");
                return None;
            }
        };
        let slots = profiles
            .iter()
            .flat_map(|p| p.placements.iter().map(|(s, n)| s + n))
            .max()?;
        Some(MigLayout {
            slots,
            profiles: profiles
                .into_iter()
                .map(|p| MigProfile {
                    id: p.id,
                    name: p.name,
                    memory_bytes: p.memory_mib * 1024 * 1024,
                    multiprocessors: p.multiprocessors,
                    placements: p.placements,
                })
                .collect(),
        })
    }

    pub fn load() -> Result<Arc<dyn GpuLibrary>, String> {
        match Nvml::init() {
            Ok(nvml) => Ok(Arc::new(RealNvml {
                nvml: Arc::new(nvml),
            })),
            Err(NvmlError::LibloadingError(e)) => Err(format!(
                "NVML is not available on this node ({e}); is the NVIDIA driver installed and \
                 libnvidia-ml.so.1 visible to the agent?"
            )),
            Err(e) => Err(format!("NVML failed to initialise: {e}")),
        }
    }

    impl GpuLibrary for RealNvml {
        fn gpus(&self) -> Result<Vec<Gpu>, String> {
            let n = self
                .nvml
                .device_count()
                .map_err(|e| format!("NVML device count: {e}"))?;
            let mut out = Vec::new();
            for i in 0..n {
                let d = match self.nvml.device_by_index(i) {
                    Ok(d) => d,
                    // A GPU that fell off the bus: leave it out.
                    Err(e) => {
                        warn!(index = i, error = %e, "GPU not usable; left out");
                        continue;
                    }
                };
                let (Ok(uuid), Ok(minor), Ok(pci)) = (d.uuid(), d.minor_number(), d.pci_info())
                else {
                    warn!(
                        index = i,
                        "GPU without UUID, minor number or PCI info; left out"
                    );
                    continue;
                };
                let mut peers = Vec::new();
                for link in 0..MAX_LINKS {
                    let l = d.link_wrapper_for(link);
                    if matches!(l.is_active(), Ok(true))
                        && let Ok(remote) = l.remote_pci_info()
                    {
                        peers.push(remote.bus_id);
                    }
                }
                out.push(Gpu {
                    uuid,
                    minor,
                    bus_id: pci.bus_id,
                    nvlink_peers: peers,
                    memory_bytes: d.memory_info().ok().map(|m| m.total),
                    mig: mig_layout(&self.nvml, &d),
                });
            }
            Ok(out)
        }

        fn mig_instances(&self, gpu: &str) -> Result<Vec<MigInstance>, String> {
            let d = self.device(gpu)?;
            let found = devplug_nvml_mig::instances(&self.nvml, &d)
                .map_err(|e| format!("listing the MIG instances of {gpu}: {e}"))?;
            Ok(found
                .into_iter()
                .map(|i| MigInstance {
                    profile: i.profile,
                    start: i.start,
                    instance: i.gpu_instance,
                    compute: i.compute_instance,
                    uuid: i.uuid,
                })
                .collect())
        }

        fn create_mig(&self, gpu: &str, profile: u32, start: u32) -> Result<MigInstance, String> {
            let d = self.device(gpu)?;
            let i = devplug_nvml_mig::create(&self.nvml, &d, profile, start)
                .map_err(|e| format!("making a MIG instance on {gpu}: {e}"))?;
            Ok(MigInstance {
                profile: i.profile,
                start: i.start,
                instance: i.gpu_instance,
                compute: i.compute_instance,
                uuid: i.uuid,
            })
        }

        fn destroy_mig(&self, gpu: &str, instance: u32, compute: u32) -> Result<(), String> {
            let d = self.device(gpu)?;
            devplug_nvml_mig::destroy(&self.nvml, &d, instance, compute).map_err(|e| {
                format!("removing MIG instance {instance} (compute {compute}) of {gpu}: {e}")
            })
        }

        fn watch(
            &self,
            sink: Box<dyn Fn(GpuEvent) + Send + Sync>,
            stop: Arc<AtomicBool>,
        ) -> Result<(), String> {
            let nvml = self.nvml.clone();
            let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
            std::thread::Builder::new()
                .name("nvml-events".into())
                .spawn(move || {
                    let mut set = match nvml.create_event_set() {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = started_tx.send(Err(format!("NVML event set: {e}")));
                            return;
                        }
                    };
                    let n = nvml.device_count().unwrap_or(0);
                    for i in 0..n {
                        let Ok(d) = nvml.device_by_index(i) else {
                            continue;
                        };
                        let wanted =
                            EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
                        let types = d
                            .supported_event_types()
                            .map(|s| s & wanted)
                            .unwrap_or(wanted);
                        set = match d.register_events(types, set) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = started_tx
                                    .send(Err(format!("NVML event registration: {}", e.error)));
                                return;
                            }
                        };
                    }
                    let _ = started_tx.send(Ok(()));
                    // Ends (dropping the event set and NVML) when the source
                    // that started it is dropped.
                    while !stop.load(Ordering::SeqCst) {
                        match set.wait(1000) {
                            Ok(ev) => {
                                let Ok(uuid) = ev.device.uuid() else { continue };
                                if ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                                    let xid = match ev.event_data {
                                        Some(XidError::Value(x)) => x,
                                        _ => 0,
                                    };
                                    sink(GpuEvent::Xid { uuid, xid });
                                } else if ev.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                                    sink(GpuEvent::DoubleBitEcc { uuid });
                                }
                            }
                            Err(NvmlError::Timeout) => {}
                            Err(e) => {
                                warn!(error = %e, "NVML event wait failed");
                                std::thread::sleep(std::time::Duration::from_secs(1));
                            }
                        }
                    }
                })
                .map_err(|e| format!("cannot start the NVML event thread: {e}"))?;
            started_rx
                .recv()
                .map_err(|_| "the NVML event thread stopped".to_string())?
        }
    }
}

#[cfg(test)]
mod tests;
