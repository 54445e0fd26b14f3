//! Device sources. Each discovers the physical devices of one kind and names
//! the directories whose changes may change the answer; the discovery task
//! (`crate::devices::discovery`) re-runs [`Source::discover`] on inotify events there.

use std::path::PathBuf;

use devplug_api::{DevicePluginPolicy, SourceSpec};

use crate::devices::device::{Device, Made, Partition, Roots};

pub mod nvidia;
pub mod paths;
pub mod pci;
pub mod simulated;
pub mod usb;

/// Errors of a source's probe. Discovery turns them into `Unknown` health
/// for every device it knew, rather than dropping the devices.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading a directory or file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The spec cannot be served by this source.
    #[error("{0}")]
    Config(String),
    /// What the source needs is not on this node (for example NVML).
    #[error("{0}")]
    Unavailable(String),
    /// The source did not answer in time (a wedged driver call or sysfs read).
    #[error("the device source did not answer within {0:?} (a wedged driver call or sysfs read?)")]
    Stalled(std::time::Duration),
}

impl SourceError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// A kind of device.
pub trait Source: Send + Sync + 'static {
    /// Short name for logs: `simulated`, `paths`, ...
    fn kind(&self) -> &'static str;
    /// Every matching device with its probe health, sorted by ID.
    fn discover(&self) -> Result<Vec<Device>, SourceError>;
    /// Directories to watch; a change in any of them re-runs discovery.
    /// Directories that do not exist yet are watched through their nearest
    /// existing ancestor.
    fn watch_dirs(&self) -> Vec<PathBuf>;
    /// Whether writes to files in those directories matter too (the
    /// simulated source's control files). Device directories are watched
    /// for nodes appearing and disappearing only: every write-and-close of
    /// `/dev/null` on the host would otherwise re-run discovery.
    fn watch_contents(&self) -> bool {
        false
    }
    /// Signalled when the source has news that no directory shows (NVML
    /// health events); discovery runs again.
    fn wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// What makes and removes this source's partitions, if it publishes
    /// any (the NVIDIA source with `migPartitions`).
    fn partitioner(&self) -> Option<std::sync::Arc<dyn Partitioner>> {
        None
    }
}

/// Makes and removes the partitions a source publishes (DRA prepare and
/// unprepare). Calls block (NVML): call them off the async workers.
pub trait Partitioner: Send + Sync + 'static {
    /// Makes `p`, or adopts the partition already at its placement with its
    /// profile (a prepare repeated after a crash), and says what a container
    /// needs to use it.
    fn create(&self, p: &Partition) -> Result<Made, String>;
    /// Removes `m`; one already gone counts as removed.
    fn destroy(&self, m: &Made) -> Result<(), String>;
    /// Every partition on the node's divided devices now: at start, those
    /// no prepared claim records are removed.
    fn existing(&self) -> Result<Vec<Made>, String>;
}

/// Everything a source needs from outside the policy.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Host `/dev` and `/sys` roots.
    pub roots: Roots,
    /// Control directory of simulated devices (one subdirectory per policy).
    pub sim_control_dir: PathBuf,
    /// Device nodes handed out although they give a container the host
    /// (the chart's `allowedDeviceNodes`): see [`Guarded`].
    pub allowed_device_nodes: Vec<String>,
    /// The NVIDIA driver's table of MIG capability device minors
    /// (`/proc/driver/nvidia-caps/mig-minors` on the host).
    pub mig_minors: PathBuf,
}

/// Any source, with the device-node allow-list applied to what it finds: a
/// device with `/dev/mem`, `/dev/kmem`, `/dev/port` or a block device among
/// its nodes, not listed by the admin, is reported Unhealthy with the
/// reason and without those nodes, so it is never handed out (a glob such
/// as `/dev/*` cannot reach them) and the status says why.
pub struct Guarded {
    inner: Box<dyn Source>,
    roots: Roots,
    allowed: Vec<String>,
}

impl Guarded {
    /// `inner` under the allow-list `allowed`.
    pub fn new(inner: Box<dyn Source>, roots: Roots, allowed: Vec<String>) -> Self {
        Self {
            inner,
            roots,
            allowed,
        }
    }
}

impl Source for Guarded {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        use std::os::unix::fs::FileTypeExt;
        let mut found = self.inner.discover()?;
        for d in &mut found {
            let mut refused = Vec::new();
            d.nodes.retain(|n| {
                let block = std::fs::metadata(self.roots.dev_local(&n.host_path))
                    .is_ok_and(|m| m.file_type().is_block_device());
                match devplug_api::allow::device_node_refusal(&n.host_path, block, &self.allowed) {
                    Some(why) => {
                        refused.push(why);
                        false
                    }
                    None => true,
                }
            });
            if !refused.is_empty() {
                d.health = crate::devices::health::Health::Unhealthy(format!(
                    "refused: {}",
                    refused.join("; ")
                ));
            }
        }
        Ok(found)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        self.inner.watch_dirs()
    }

    fn watch_contents(&self) -> bool {
        self.inner.watch_contents()
    }

    fn wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.inner.wake()
    }

    fn partitioner(&self) -> Option<std::sync::Arc<dyn Partitioner>> {
        self.inner.partitioner()
    }
}

/// Builds the source a policy names, under the device-node allow-list.
pub fn build(
    policy: &DevicePluginPolicy,
    ctx: &SourceContext,
) -> Result<Box<dyn Source>, SourceError> {
    let inner = build_inner(policy, ctx)?;
    Ok(Box::new(Guarded::new(
        inner,
        ctx.roots.clone(),
        ctx.allowed_device_nodes.clone(),
    )))
}

fn build_inner(
    policy: &DevicePluginPolicy,
    ctx: &SourceContext,
) -> Result<Box<dyn Source>, SourceError> {
    let name = policy.metadata.name.clone().unwrap_or_default();
    let SourceSpec {
        simulated,
        paths,
        usb,
        pci,
        nvidia,
    } = &policy.spec.source;
    if let Some(s) = simulated {
        // Our own directory: create it so the watch lands on it rather than
        // on a busy ancestor such as /run.
        let control = ctx.sim_control_dir.join(&name);
        std::fs::create_dir_all(&control).map_err(|e| {
            SourceError::Config(format!(
                "cannot create the simulation control directory {}: {e}",
                control.display()
            ))
        })?;
        return Ok(Box::new(simulated::Simulated::new(s, control)));
    }
    if let Some(p) = paths {
        return Ok(Box::new(paths::Paths::new(p, ctx.roots.clone())));
    }
    if let Some(u) = usb {
        return Ok(Box::new(usb::Usb::new(u, ctx.roots.clone())));
    }
    if let Some(p) = pci {
        return Ok(Box::new(pci::Pci::new(p, ctx.roots.clone())));
    }
    if let Some(n) = nvidia {
        return Ok(Box::new(nvidia::Nvidia::new(
            n,
            ctx.roots.clone(),
            ctx.mig_minors.clone(),
        )));
    }
    Err(SourceError::Config(format!(
        "policy {name:?} sets no device source"
    )))
}

impl SourceError {
    /// True when the thing read no longer exists (a device unplugged while
    /// we were scanning it): skip that device, keep the scan.
    pub fn is_vanished(&self) -> bool {
        matches!(self, SourceError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The entries of a sysfs bus directory (`/sys/bus/<bus>/devices`). A bus
/// that does not exist on this machine has no devices; that is not an error.
pub(crate) fn bus_entries(base: &std::path::Path) -> Result<Vec<std::fs::DirEntry>, SourceError> {
    match std::fs::read_dir(base) {
        Ok(entries) => entries
            .map(|e| e.map_err(|err| SourceError::io(base, err)))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(SourceError::io(base, e)),
    }
}

/// Reads a small sysfs attribute, trimmed.
pub(crate) fn read_attr(path: &std::path::Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| SourceError::io(path, e))
}

/// The PCIe root complex of the PCI device whose sysfs bus entry is
/// `entry` (`/sys/bus/pci/devices/<address>`): named in the entry's link
/// into `/sys/devices`. `None` where the entry is no link.
pub fn pcie_root(entry: &std::path::Path) -> Option<String> {
    devplug_api::topology::pcie_root_of(&std::fs::read_link(entry).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_glob_reaching_dev_mem_finds_it_refused_unless_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: tmp.path().join("dev"),
            sys: tmp.path().join("sys"),
        };
        std::fs::create_dir_all(&roots.dev).unwrap();
        for n in ["fuse", "mem"] {
            std::fs::write(roots.dev.join(n), b"").unwrap();
        }
        let spec = devplug_api::PathsSource {
            globs: vec!["/dev/*".into()],
            ..Default::default()
        };
        let guarded = |allowed: Vec<String>| {
            Guarded::new(
                Box::new(paths::Paths::new(&spec, roots.clone())),
                roots.clone(),
                allowed,
            )
            .discover()
            .unwrap()
        };
        let found = guarded(Vec::new());
        let by_id = |id: &str| found.iter().find(|d| d.id == id).unwrap().clone();
        assert!(by_id("fuse").health.is_healthy());
        assert_eq!(by_id("fuse").nodes.len(), 1);
        let mem = by_id("mem");
        assert!(mem.nodes.is_empty(), "{mem:?}");
        match &mem.health {
            crate::devices::health::Health::Unhealthy(r) => {
                assert!(
                    r.contains("/dev/mem") && r.contains("allowedDeviceNodes"),
                    "{r}"
                )
            }
            h => panic!("/dev/mem is {h:?}"),
        }
        // Listed by the admin: handed out.
        let found = guarded(vec!["/dev/mem".into()]);
        let mem = found.iter().find(|d| d.id == "mem").unwrap();
        assert!(mem.health.is_healthy() && mem.nodes.len() == 1);
    }
}
