//! What a source discovers: physical devices, the host nodes that belong to
//! them, and what their probe says about health.

use std::path::{Path, PathBuf};

use crate::devices::health::Health;

/// A device node handed to the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path on the host, as the kubelet and container runtime see it.
    pub host_path: String,
    /// Path inside the container.
    pub container_path: String,
    /// cgroup permissions, any of `r`, `w`, `m`.
    pub permissions: String,
}

/// One physical device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Stable ID: serial, UUID, PCI address or a configured name; never an
    /// enumeration index.
    pub id: String,
    /// NUMA node, when the platform says.
    pub numa_node: Option<i64>,
    /// Nodes the container needs.
    pub nodes: Vec<DeviceNode>,
    /// What the probe sees now.
    pub health: Health,
    /// IDs of devices with a direct fast link to this one (NVLink), which
    /// GetPreferredAllocation keeps together.
    pub links: Vec<String>,
    /// What a user may select the device by through DRA (ResourceSlice
    /// attributes): source-specific facts such as the PCI address, USB
    /// vendor and product, GPU UUID. Keys are DRA attribute names.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// What the device holds, where the source knows it (GPU memory from
    /// NVML): DRA capacity name to a quantity (`"81559Mi"`), published in
    /// the device's ResourceSlice entry for claims to select on.
    pub capacity: std::collections::BTreeMap<String, String>,
}

/// Where the agent finds the host's `/dev` and `/sys`. Tests and benchmarks
/// point these at fake trees; in a pod they are the host's, mounted in.
#[derive(Debug, Clone)]
pub struct Roots {
    /// Local directory that holds the host's `/dev`.
    pub dev: PathBuf,
    /// Local directory that holds the host's `/sys`.
    pub sys: PathBuf,
}

impl Roots {
    /// Local path of a host `/dev/...` path.
    pub fn dev_local(&self, host: &str) -> PathBuf {
        let rel = host.strip_prefix("/dev").unwrap_or(host);
        self.dev.join(rel.trim_start_matches('/'))
    }

    /// Host `/dev/...` path of a local path under the dev root.
    pub fn dev_host(&self, local: &Path) -> Option<String> {
        let rel = local.strip_prefix(&self.dev).ok()?;
        Some(format!("/dev/{}", rel.to_str()?))
    }
}
