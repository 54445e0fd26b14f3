//! Device sources. Each discovers the physical devices of one kind and names
//! the directories whose changes may change the answer; the discovery task
//! (`crate::devices::discovery`) re-runs [`Source::discover`] on inotify events there.

use std::path::PathBuf;

use devplug_api::{DevicePluginPolicy, SourceSpec};

use crate::devices::device::{Device, Roots};

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
}

/// Everything a source needs from outside the policy.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Host `/dev` and `/sys` roots.
    pub roots: Roots,
    /// Control directory of simulated devices (one subdirectory per policy).
    pub sim_control_dir: PathBuf,
}

/// Builds the source a policy names.
pub fn build(
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
        return Ok(Box::new(nvidia::Nvidia::new(n, ctx.roots.clone())));
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
