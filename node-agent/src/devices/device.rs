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
    /// Its place in a partitionable layout (DRA, KEP-4815), if any.
    pub partitioning: Partitioning,
}

/// Where a device stands in a partitionable layout (DRA, KEP-4815): a
/// device divided into partitions is published as a counter set, each
/// partition as a device consuming some of those counters, so the
/// scheduler never hands out two partitions that overlap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Partitioning {
    /// A plain device.
    #[default]
    Whole,
    /// Divided into partitions: published as a counter set named after it
    /// (counter name to quantity), not as a device of its own.
    Divided {
        /// What its partitions draw on.
        counters: std::collections::BTreeMap<String, String>,
    },
    /// A partition of a divided device, made in prepare and removed in
    /// unprepare.
    Partition(Partition),
}

/// Counters of one each for slots `slots` of a divided device, named by
/// `name` (`memory-slice-<i>` for MIG, `slot-<i>` simulated): what a
/// divided device offers (all its slots) and what a partition takes (the
/// slots of its placement).
pub fn slot_counters(
    slots: std::ops::Range<u32>,
    name: impl Fn(u32) -> String,
) -> std::collections::BTreeMap<String, String> {
    slots.map(|i| (name(i), "1".to_string())).collect()
}

/// A partition a divided device may be cut into: a profile at a placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The divided device's ID (its counter set is named after it).
    pub parent: String,
    /// The source's profile ID (NVML: the GPU instance profile).
    pub profile: u32,
    /// The profile's name (`1g.10gb`).
    pub profile_name: String,
    /// First slot of the placement.
    pub start: u32,
    /// Slots it takes.
    pub size: u32,
    /// What it takes from the parent's counter set.
    pub counters: std::collections::BTreeMap<String, String>,
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

/// A partition made on the node (see [`Partition`]): what prepare recorded,
/// what unprepare removes, what the container is given.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Made {
    /// The divided device's ID.
    pub parent: String,
    /// The partition's device ID.
    pub id: String,
    /// Profile and placement start it was made with.
    pub profile: u32,
    /// First slot of its placement.
    pub start: u32,
    /// The source's handle on it (NVML: GPU instance ID).
    pub instance: u32,
    /// The source's handle on what runs in it (NVML: compute instance ID).
    pub compute: u32,
    /// Its own identity (NVML: the `MIG-…` UUID), what the container's
    /// variables name.
    pub uuid: String,
    /// Host device nodes the container needs besides the parent's (NVML:
    /// the `nvidia-caps` nodes of the GPU and compute instance).
    pub nodes: Vec<String>,
}
