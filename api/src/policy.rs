//! `DevicePluginPolicy`: one policy advertises one extended resource.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The types of this module accept fields they do not know (a CRD newer than
// a running agent or operator must not break its watch during an upgrade);
// unknown fields are refused at admission by the API server, and in
// standalone configuration files by `crate::policies_from_yaml`.

/// Advertise a class of node devices to the kubelet as one extended resource.
///
/// The operator runs a node agent (a kubelet device plugin) on every node the
/// policy selects; each agent discovers devices from `source`, shares them by
/// `sharing`, hands them to containers as `allocate` says and reports their
/// health back into the status.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "devplug.io",
    version = "v1alpha1",
    kind = "DevicePluginPolicy",
    plural = "devicepluginpolicies",
    shortname = "dpp",
    status = "DevicePluginPolicyStatus",
    doc = "DevicePluginPolicy advertises a class of node devices as one extended resource: the operator runs a node agent on every node it selects, which discovers the devices (source), shares them (sharing), hands them to containers (allocate) through the kubelet's device plugin API or Dynamic Resource Allocation (kubeletApi), and reports each device's health and holders into the status and NodeDeviceStatus.",
    printcolumn = r#"{"name":"Resource","type":"string","jsonPath":".spec.resourceName"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","description":"ready/desired agent nodes","jsonPath":".status.nodesReady"}"#,
    printcolumn = r#"{"name":"Healthy","type":"string","description":"healthy/total devices","jsonPath":".status.devicesHealthy"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.devices.allocated"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Kubelet API","type":"string","priority":1,"description":"DevicePlugin or DRA","jsonPath":".spec.kubeletApi"}"#,
    printcolumn = r#"{"name":"Sharing","type":"string","priority":1,"jsonPath":".spec.sharing.strategy"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","priority":1,"jsonPath":".spec.sharing.replicas"}"#,
    printcolumn = r#"{"name":"Degraded","type":"string","priority":1,"description":"the Degraded condition's reason (AgentsHealthy when all is well)","jsonPath":".status.conditions[?(@.type==\"Degraded\")].reason"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.source.simulated) || ((has(self.source.simulated.count) ? self.source.simulated.count : 0) + (has(self.source.simulated.devices) ? size(self.source.simulated.devices) : 0)) * (has(self.sharing) && has(self.sharing.replicas) ? self.sharing.replicas : 1) <= 16384",
     "message": "devices x sharing.replicas may be at most 16384: the kubelet's 4 MiB ListAndWatch message cannot carry more IDs"},
    {"rule": "!has(self.kubeletApi) || self.kubeletApi != 'DRA' || !has(self.preStart)",
     "fieldPath": ".preStart",
     "message": "DRA has no pre-start hook (PreStartContainer is a device plugin call); remove preStart or use kubeletApi DevicePlugin"},
    {"rule": "(has(self.allocate) && has(self.allocate.cdi) && has(self.allocate.cdi.kind)) || !((has(self.kubeletApi) && self.kubeletApi == 'DRA') || (has(self.allocate) && has(self.allocate.cdi) && has(self.allocate.cdi.enabled) && self.allocate.cdi.enabled)) || self.resourceName.matches('^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?/[A-Za-z]([A-Za-z0-9_-]*[A-Za-z0-9])?$')",
     "fieldPath": ".resourceName",
     "message": "the resource name is also the CDI kind here (DRA, or allocate.cdi.enabled without allocate.cdi.kind), and container runtimes refuse it: the CDI vendor (domain) must start with a letter, and the class (name) must start with a letter and hold only letters, digits, '-' and '_' (no '.'); set spec.allocate.cdi.kind"},
    {"rule": "!has(self.source.nvidia) || !has(self.source.nvidia.migPartitions) || !self.source.nvidia.migPartitions || (has(self.kubeletApi) && self.kubeletApi == 'DRA' && (!has(self.sharing) || !has(self.sharing.strategy) || self.sharing.strategy == 'Exclusive'))",
     "fieldPath": ".source.nvidia.migPartitions",
     "message": "MIG partitions are made per claim, which only DRA can ask for: set kubeletApi DRA and Exclusive sharing"},
    {"rule": "!has(self.source.simulated) || !has(self.source.simulated.partitionSlots) || (has(self.kubeletApi) && self.kubeletApi == 'DRA' && (!has(self.sharing) || !has(self.sharing.strategy) || self.sharing.strategy == 'Exclusive'))",
     "fieldPath": ".source.simulated.partitionSlots",
     "message": "partitions are made per claim, which only DRA can ask for: set kubeletApi DRA and Exclusive sharing"},
    {"rule": "!has(self.preStart) || (has(self.agent) && has(self.agent.image))",
     "message": "spec.preStart runs its program inside the agent container, and the stock agent image is distroless (no shell, no tools): set spec.agent.image to an image that contains the program"}
]))]
pub struct DevicePluginPolicySpec {
    /// Extended resource name, `<domain>/<name>`, for example
    /// `hardware-vendor.example/foo`: exactly what the kubelet accepts as an
    /// extended resource. Refused: the `kubernetes.io` and `k8s.io` domains,
    /// any name containing `kubernetes.io/`, the `requests.` prefix, and
    /// domains over 244 characters (the kubelet prefixes `requests.` and
    /// needs a 253-character DNS name).
    #[schemars(
        length(min = 3, max = 308),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"),
        extend("x-kubernetes-validations" = [
            {"rule": "!(self.contains('kubernetes.io/') || self.startsWith('k8s.io/') || self.contains('.k8s.io/'))",
             "message": "the kubernetes.io and k8s.io domains are reserved; use your own domain"},
            {"rule": "!self.startsWith('requests.')",
             "message": "the requests. prefix is reserved for resource quotas; the kubelet refuses such names"},
            {"rule": "!self.matches('^[^/]{245,}/')",
             "message": "the domain may have at most 244 characters (the kubelet's limit for extended resource names)"}
        ])
    )]
    pub resource_name: String,

    /// Run agents only on nodes with these labels. Empty selects every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations for the agent pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Priority class of the agent pods (default `system-node-critical`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Where the devices come from: exactly one source.
    pub source: SourceSpec,

    /// How each physical device is shared between containers.
    #[serde(default)]
    pub sharing: SharingSpec,

    /// What a container receives when it is given devices.
    #[serde(default)]
    pub allocate: AllocateSpec,

    /// Optional command run before each container that uses the devices
    /// starts. It runs inside the agent container, so the cluster requires
    /// `spec.agent.image` with it: the stock agent image is distroless (no
    /// shell, no tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<PreStartSpec>,

    /// Health damping.
    #[serde(default)]
    pub health: HealthSpec,

    /// How the agent itself is deployed.
    #[serde(default)]
    pub agent: AgentSpec,

    /// Which kubelet API serves the devices: `DevicePlugin` (default, the
    /// device plugin API: an extended resource) or `DRA` (Dynamic Resource
    /// Allocation: a ResourceSlice per node, a DeviceClass named after the
    /// policy, and pods written for the extended resource still served
    /// through the class's `extendedResourceName`). A node never serves one
    /// resource name both ways; changing it rolls the agents node by node.
    #[serde(default, skip_serializing_if = "KubeletApi::is_default")]
    pub kubelet_api: KubeletApi,
}

/// The kubelet API a policy's devices are served through.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KubeletApi {
    /// The device plugin API (`v1beta1.DevicePlugin`).
    #[default]
    DevicePlugin,
    /// Dynamic Resource Allocation (`resource.k8s.io/v1`, DRAPlugin v1/v1beta1).
    #[serde(rename = "DRA")]
    Dra,
}

impl KubeletApi {
    /// Whether this is the default, left out when serialized.
    pub fn is_default(&self) -> bool {
        *self == Self::DevicePlugin
    }
}

/// The DRA driver name of a policy: `<policy>.devplug.io`, a DNS subdomain
/// of at most 63 characters as the kubelet requires; a longer policy name is
/// cut and suffixed with a stable hash so that two policies never share one.
pub fn dra_driver_name(policy: &str) -> String {
    const SUFFIX: &str = ".devplug.io";
    if policy.len() + SUFFIX.len() <= 63 {
        return format!("{policy}{SUFFIX}");
    }
    let keep: String = policy.chars().take(63 - SUFFIX.len() - 9).collect();
    let keep = keep.trim_end_matches(['.', '-']);
    format!("{keep}-{:08x}{SUFFIX}", fnv1a(policy) as u32)
}

/// The DeviceClass the operator creates for a DRA policy: named like its
/// driver (`<policy>.devplug.io`), a name no other class is likely to hold.
pub fn dra_device_class_name(policy: &str) -> String {
    dra_driver_name(policy)
}

/// FNV-1a, 64 bits: stable across versions and platforms.
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Device discovery. Exactly one field must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.simulated), has(self.paths), has(self.usb), has(self.pci), has(self.nvidia)].filter(x, x).size() == 1",
     "message": "set exactly one source: simulated, paths, usb, pci or nvidia"}
]))]
pub struct SourceSpec {
    /// Simulated devices, for demos, tests and benchmarks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedSource>,
    /// Host device nodes matched by glob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<PathsSource>,
    /// USB devices matched by vendor and product ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<UsbSource>,
    /// PCI devices matched by vendor, device and class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<PciSource>,
    /// NVIDIA GPUs through NVML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvidia: Option<NvidiaSource>,
}

impl SourceSpec {
    /// Names of the sources that are set, in declaration order.
    pub fn set_sources(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.simulated.is_some() {
            v.push("simulated");
        }
        if self.paths.is_some() {
            v.push("paths");
        }
        if self.usb.is_some() {
            v.push("usb");
        }
        if self.pci.is_some() {
            v.push("pci");
        }
        if self.nvidia.is_some() {
            v.push("nvidia");
        }
        v
    }
}

/// Simulated devices. Either list `devices` explicitly, or give `count` and
/// the agent names them `<idPrefix>-<n>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.count) && self.count > 0) != (has(self.devices) && size(self.devices) > 0)",
     "message": "set either count >= 1 or a list of devices, not both"}
]))]
pub struct SimulatedSource {
    /// Number of devices to generate when `devices` is empty.
    #[serde(default)]
    #[schemars(range(max = 4096))]
    pub count: u32,
    /// Prefix of generated device IDs (default `sim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 56), regex(pattern = r"^[A-Za-z0-9._:-]{1,56}$"))]
    pub id_prefix: Option<String>,
    /// Spread generated devices over this many NUMA nodes, in contiguous
    /// blocks (0 or absent: no NUMA information).
    #[serde(default)]
    #[schemars(range(max = 64))]
    pub numa_nodes: u32,
    /// Spread generated devices over this many PCIe roots, in contiguous
    /// blocks (0 or absent: no PCI information). Root `r` is
    /// `pci0000:<r in hex>`; device `i` gets PCI bus ID
    /// `0000:<i/32 in hex>:<i%32 in hex>.0`. Published through DRA as the
    /// standard `resource.kubernetes.io/pcieRoot` and `pciBusID`
    /// attributes, so claims can be tried with `matchAttribute`.
    #[serde(default)]
    #[schemars(range(max = 256))]
    pub pcie_roots: u32,
    /// Divide each device into this many slots and publish it as
    /// partitionable (DRA, KEP-4815), like a GPU in MIG mode: a counter set
    /// per device (`slot-0` …), and a partition per size (1, 2, 4, … slots,
    /// profile `<size>s`) at each aligned placement, consuming the slots it
    /// covers. A claim's partition is "made" in prepare and removed in
    /// unprepare. Needs `kubeletApi: DRA` and `Exclusive` sharing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 8))]
    pub partition_slots: Option<u32>,
    /// Explicit devices; overrides `count`. IDs are unique (a list-map keyed
    /// by `id`, enforced by the API server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 4096),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"])
    )]
    pub devices: Vec<SimulatedDevice>,
}

/// One explicit simulated device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SimulatedDevice {
    /// Device ID as advertised to the kubelet.
    #[schemars(length(max = 63), regex(pattern = r"^[A-Za-z0-9._:-]{1,63}$"))]
    pub id: String,
    /// NUMA node of the device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub numa_node: Option<i64>,
    /// PCIe root complex of the device, as Linux names it under
    /// `/sys/devices` (for example `pci0000:00`); published through DRA
    /// as `resource.kubernetes.io/pcieRoot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^pci[0-9a-f]{4}:[0-9a-f]{2}$"))]
    pub pcie_root: Option<String>,
    /// PCI address of the device (`domain:bus:device.function`, for
    /// example `0000:3b:00.0`); published through DRA as
    /// `resource.kubernetes.io/pciBusID`.
    #[serde(default, rename = "pciBusID", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$"))]
    pub pci_bus_id: Option<String>,
}

/// Host device nodes. Each path matching one of `globs` is one device; its
/// ID is the file name (for example `fuse` for `/dev/fuse`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathsSource {
    /// Absolute globs under `/dev`, for example `/dev/foo[0-9]*` (1 to 32,
    /// each at most 256 characters).
    #[schemars(
        length(min = 1, max = 32),
        extend("items" = {"type": "string", "maxLength": 256, "pattern": "^/dev/([^\\[\\]]|\\[!?[^\\]]+\\])+$"}),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(g, !g.contains('/../'))", "message": "globs must stay under /dev/"}
        ])
    )]
    pub globs: Vec<String>,
    /// Extra nodes that belong to each matched device, as templates:
    /// `{path}` is the matched path and `{name}` its file name, for example
    /// `{path}-ctl`. A device whose companion is missing is unhealthy.
    /// Each starts with `/dev/` or `{path}` (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        extend("items" = {"type": "string", "maxLength": 256, "pattern": "^(/dev/|\\{path\\})"})
    )]
    pub companions: Vec<String>,
    /// cgroup permissions given to the container: any of `r`, `w`, `m`
    /// (default `rw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(r?w?m?|r?m?w?|w?r?m?|w?m?r?|m?r?w?|m?w?r?)$"),
        length(min = 1, max = 3)
    )]
    pub permissions: Option<String>,
    /// Path prefix inside the container replacing `/dev` (default: same
    /// path as on the host). Absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), regex(pattern = r"^/"))]
    pub container_path_prefix: Option<String>,
}

/// USB devices, from sysfs. The device node given to the container is
/// `/dev/bus/usb/<bus>/<dev>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsbSource {
    /// Devices to match; any match selects the device (1 to 64).
    #[schemars(length(min = 1, max = 64))]
    pub devices: Vec<UsbMatch>,
}

/// A USB vendor and, optionally, product ID (4 hex digits each).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsbMatch {
    /// Vendor ID, for example `046d`.
    #[schemars(length(max = 4), regex(pattern = r"^[0-9a-fA-F]{4}$"))]
    pub vendor: String,
    /// Product ID, for example `c52b`; absent matches any product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4), regex(pattern = r"^[0-9a-fA-F]{4}$"))]
    pub product: Option<String>,
}

/// PCI devices, from sysfs. The device ID is the PCI address; when the
/// device is bound to `vfio-pci` the container gets `/dev/vfio/vfio` and its
/// IOMMU group node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.vendor) || has(self.devices) || has(self.class)",
     "message": "set at least one of vendor, devices, class"}
]))]
pub struct PciSource {
    /// Vendor ID (4 hex digits), for example `10de`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 6), regex(pattern = r"^(0x)?[0-9a-fA-F]{4}$"))]
    pub vendor: Option<String>,
    /// Device IDs (4 hex digits each); empty matches any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        extend("items" = {"type": "string", "maxLength": 6, "pattern": "^(0x)?[0-9a-fA-F]{4}$"})
    )]
    pub devices: Vec<String>,
    /// Class prefix (2, 4 or 6 hex digits), for example `0300` for VGA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), regex(pattern = r"^(0x)?([0-9a-fA-F]{2}){1,3}$"))]
    pub class: Option<String>,
    /// Only advertise devices bound to `vfio-pci` (default false).
    #[serde(default)]
    pub require_vfio: bool,
}

/// NVIDIA GPUs, discovered through NVML (loaded at run time). IDs are GPU
/// UUIDs; containers get `NVIDIA_VISIBLE_DEVICES` (or CDI names
/// `nvidia.com/gpu=<UUID>` with `allocate.cdi.enabled`) and the device nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvidiaSource {
    /// XIDs that do not make a GPU unhealthy because applications cause them
    /// (default 13, 31, 43, 45, 68, 109).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub ignored_xids: Option<Vec<u64>>,
    /// Publish each GPU in MIG mode as partitionable (DRA, KEP-4815): the
    /// GPU's memory slices as a counter set, and every MIG profile at every
    /// placement NVML offers as a device consuming its slices. The GPU
    /// instance (with one compute instance spanning it) is made when a claim
    /// is prepared and removed when it is unprepared; the scheduler never
    /// hands out two that overlap. The agent owns the MIG layout of those
    /// GPUs: at start it removes instances no prepared claim holds. GPUs not
    /// in MIG mode are published whole, as without it. Needs `kubeletApi:
    /// DRA` and `Exclusive` sharing; the agent runs privileged (MIG
    /// configuration needs it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mig_partitions: bool,
}

/// Sharing strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SharingStrategy {
    /// Each device goes to one container at a time.
    #[default]
    Exclusive,
    /// Each device is advertised `replicas` times; containers share it.
    TimeSlicing,
}

/// How devices are shared.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.strategy) && self.strategy == 'TimeSlicing' ? has(self.replicas) : !has(self.replicas)",
     "message": "replicas is required with strategy TimeSlicing and not allowed with Exclusive"},
    {"rule": "!has(self.failRequestsGreaterThanOne) || !self.failRequestsGreaterThanOne || (has(self.strategy) && self.strategy == 'TimeSlicing')",
     "message": "failRequestsGreaterThanOne is only meaningful with strategy TimeSlicing"}
]))]
pub struct SharingSpec {
    /// `Exclusive` (default) or `TimeSlicing`.
    #[serde(default)]
    pub strategy: SharingStrategy,
    /// With `TimeSlicing`: how many IDs each physical device is advertised as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub replicas: Option<u32>,
    /// With `TimeSlicing`: refuse requests for more than one replica, so a
    /// container cannot believe it got more capacity than one device.
    #[serde(default)]
    pub fail_requests_greater_than_one: bool,
}

impl SharingSpec {
    /// Advertised IDs per physical device.
    pub fn effective_replicas(&self) -> u32 {
        match self.strategy {
            SharingStrategy::Exclusive => 1,
            SharingStrategy::TimeSlicing => self.replicas.unwrap_or(1).max(1),
        }
    }
}

/// What a container receives with its devices.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocateSpec {
    /// Environment variables set in the container (at most 64; names are
    /// `[A-Za-z_][A-Za-z0-9_]*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 32768},
        "x-kubernetes-validations" = [
            {"rule": "self.all(k, size(k) <= 128 && k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))",
             "message": "environment variable names are letters, digits and _, not starting with a digit, at most 128 characters"}
        ]
    ))]
    pub env: BTreeMap<String, String>,
    /// Name of the variable listing the allocated physical device IDs,
    /// comma-separated (default `DEVPLUG_<RESOURCE>`, the resource name
    /// upper-cased with non-alphanumerics as `_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub ids_env: Option<String>,
    /// Host paths mounted into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// Annotations passed to the container runtime.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Container Device Interface names instead of raw device nodes.
    #[serde(default)]
    pub cdi: CdiSpec,
}

/// A host path mounted into the container.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MountSpec {
    /// Absolute path on the host.
    #[schemars(regex(pattern = r"^/"))]
    pub host_path: String,
    /// Absolute path in the container.
    #[schemars(regex(pattern = r"^/"))]
    pub container_path: String,
    /// Mount read-only (default true).
    #[serde(default = "default_true")]
    pub read_only: bool,
}

fn default_true() -> bool {
    true
}

/// CDI settings. When enabled, Allocate returns the fully-qualified CDI
/// names `<kind>=<device ID>` and no raw device nodes; the node's container
/// runtime must have matching CDI specs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    /// Return CDI device names (default false).
    #[serde(default)]
    pub enabled: bool,
    /// CDI kind, `vendor.com/class` (default: the resource name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 317),
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
        ),
        extend("x-kubernetes-validations" = [
            {"rule": "self.matches('^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?/[A-Za-z]([A-Za-z0-9_-]*[A-Za-z0-9])?$')",
             "message": "container runtimes refuse this CDI kind: the vendor must start with a letter, and the class must start with a letter and hold only letters, digits, '-' and '_' (no '.')"}
        ])
    )]
    pub kind: Option<String>,
}

/// A device-preparation command, run by the agent before each container that
/// received devices starts. The allocated physical device IDs are appended
/// as arguments and also set in `DEVPLUG_DEVICE_IDS`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreStartSpec {
    /// Program and arguments; the program is an absolute path (at most 64
    /// words of 4096 characters).
    #[schemars(
        length(min = 1, max = 64),
        extend("items" = {"type": "string", "maxLength": 4096}),
        extend("x-kubernetes-validations" = [
            {"rule": "self[0].startsWith('/')", "message": "the program must be an absolute path"}
        ])
    )]
    pub command: Vec<String>,
    /// Time limit for one run, at most 25 s (default 25 s): the kubelet
    /// gives up on PreStartContainer after 30 s and fails the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 25))]
    pub timeout_seconds: Option<u32>,
}

/// Health damping.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthSpec {
    /// How long a recovered device must stay good before it is advertised
    /// healthy again (default 5 s). Going unhealthy is never delayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3600))]
    pub settle_seconds: Option<u32>,
    /// The effect of the taint an unhealthy device carries in the policy's
    /// ResourceSlices (`kubeletApi: DRA`). `NoSchedule` (default): no new
    /// claim is allocated the device; pods using it run on. `NoExecute`:
    /// also evicts the pods whose claims hold it, unless they tolerate
    /// `devplug.io/unhealthy` (the kube-controller-manager's device taint
    /// eviction, DRADeviceTaints); their claims are then freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taint_effect: Option<TaintEffect>,
}

/// Effect of the taint on an unhealthy DRA device.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    /// No new allocations; running pods keep the device.
    #[default]
    NoSchedule,
    /// No new allocations, and pods using the device are evicted.
    NoExecute,
}

impl TaintEffect {
    /// The effect as the ResourceSlice API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// Default settle time, in seconds.
pub const DEFAULT_SETTLE_SECONDS: u32 = 5;

impl HealthSpec {
    /// Settle time in seconds.
    pub fn settle_seconds(&self) -> u32 {
        self.settle_seconds.unwrap_or(DEFAULT_SETTLE_SECONDS)
    }
}

/// How the agent DaemonSet is deployed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Agent image (default: the operator's configured agent image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Resource requests and limits of the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// `RollingUpdate` (default, one node at a time, never two agents per
    /// node) or `OnDelete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["RollingUpdate", "OnDelete"]))]
    pub update_strategy: Option<String>,
}

/// Observed state of a policy, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePluginPolicyStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `Conflict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Agent nodes.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_ready: Option<String>,
    /// Devices over all nodes.
    #[serde(default)]
    pub devices: DeviceCounts,
    /// `healthy/total`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices_healthy: Option<String>,
    /// Up to 20 devices that are not healthy, with the workloads they hit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy_devices: Vec<UnhealthyDevice>,
    /// The spec the operator last approved (valid, within the allow-lists),
    /// which is what agents serve: an edit the operator refuses leaves the
    /// last approved spec serving, as a Deployment keeps its pods when a
    /// new template fails. Written by the operator only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("type" = "object", "x-kubernetes-preserve-unknown-fields" = true))]
    pub approved_spec: Option<serde_json::Value>,
    /// `metadata.generation` of the approved spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_generation: Option<i64>,
}

impl DevicePluginPolicy {
    /// The policy as its agents serve it: with the spec the operator last
    /// approved (`status.approvedSpec`). `Err` when none is approved yet,
    /// or when it cannot be read as a spec.
    pub fn approved(&self) -> Result<DevicePluginPolicy, String> {
        let Some(spec) = self.status.as_ref().and_then(|s| s.approved_spec.clone()) else {
            return Err("the operator has not approved a spec of this policy yet".into());
        };
        let spec: DevicePluginPolicySpec = serde_json::from_value(spec)
            .map_err(|e| format!("status.approvedSpec is not a policy spec: {e}"))?;
        let mut p = self.clone();
        p.spec = spec;
        Ok(p)
    }
}

/// A device that is not healthy, and who is affected.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnhealthyDevice {
    /// Node of the device.
    pub node: String,
    /// Device ID.
    pub device: String,
    /// `Unhealthy` or `Unknown`.
    pub health: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Pods holding the device, as `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

/// Agent pods of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes that should run an agent.
    pub desired: i32,
    /// Nodes whose agent is registered with the kubelet.
    pub ready: i32,
    /// Nodes running the current agent pod template.
    pub updated: i32,
}

/// Devices of a policy, over all nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounts {
    /// Physical devices.
    pub total: i64,
    /// Healthy physical devices.
    pub healthy: i64,
    /// Unhealthy or unknown physical devices.
    pub unhealthy: i64,
    /// Physical devices held by at least one container.
    pub allocated: i64,
}
