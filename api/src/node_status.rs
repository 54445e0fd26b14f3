//! `NodeDeviceStatus`: one per Node, named after it. Each agent writes only
//! its own entry of `status.resources` (a list-map keyed by `resourceName`)
//! with its own field manager, so agents of different policies never
//! overwrite each other. The vocabulary follows the kubelet's own
//! `allocatedResourcesStatus`, so the two can be correlated.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The devices of one node, per extended resource, with their health and
/// the containers holding them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devplug.io",
    version = "v1alpha1",
    kind = "NodeDeviceStatus",
    plural = "nodedevicestatuses",
    shortname = "nds",
    status = "NodeDeviceStatusStatus",
    doc = "NodeDeviceStatus holds the devices devplug serves on one node (named after the Node): per extended resource, each device's health with its reason and the containers holding it, written by that resource's agent; the summary and notReporting are the operator's.",
    printcolumn = r#"{"name":"Resources","type":"integer","jsonPath":".status.summary.resources"}"#,
    printcolumn = r#"{"name":"Healthy/Total","type":"string","jsonPath":".status.summary.healthy"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.summary.allocated"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Unhealthy","type":"integer","priority":1,"description":"devices Unhealthy or Unknown, as their agents report them","jsonPath":".status.summary.unhealthy"}"#,
    printcolumn = r#"{"name":"Not Reporting","type":"integer","priority":1,"description":"resources whose agent is not ready or gone","jsonPath":".status.summary.notReporting"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeDeviceStatusSpec {
    /// The Node this object describes (same as metadata.name). Written by
    /// the operator only (with the object's owner reference); an agent
    /// that creates the object leaves it out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
}

/// Observed devices of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDeviceStatusStatus {
    /// One entry per extended resource served on the node, each written by
    /// that resource's agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["resourceName"]))]
    pub resources: Vec<ResourceStatus>,
    /// Totals over all entries, written by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<NodeSummary>,
    /// Entries whose agent cannot vouch for them (its pod is missing or not
    /// ready), as the operator sees it; written by the operator only, never
    /// by an agent. While an entry is listed here its devices count as
    /// `Unknown` in every summary and policy status; the entry itself keeps
    /// what the agent last wrote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["resourceName"]))]
    pub not_reporting: Vec<NotReporting>,
}

/// An entry whose agent is not reporting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotReporting {
    /// The entry's resource name.
    pub resource_name: String,
    /// The entry's policy.
    pub policy: String,
    /// Why, for example `AgentNotReady: agent pod x is not ready`.
    pub reason: String,
}

impl NodeDeviceStatusStatus {
    /// The entries as every reader should count them: an entry whose agent
    /// is not reporting has its devices `Unknown` (in memory only; what the
    /// agent wrote stays as it is).
    pub fn effective_resources(&self) -> Vec<ResourceStatus> {
        self.resources
            .iter()
            .map(|e| {
                match self
                    .not_reporting
                    .iter()
                    .find(|n| n.resource_name == e.resource_name && n.policy == e.policy)
                {
                    Some(n) => e.as_unknown(&n.reason),
                    None => e.clone(),
                }
            })
            .collect()
    }
}

impl ResourceStatus {
    /// This entry as it reads when its agent cannot vouch for it.
    pub fn as_unknown(&self, reason: &str) -> ResourceStatus {
        let mut u = self.clone();
        u.state = STATE_UNKNOWN.into();
        u.reason = Some(reason.into());
        u.healthy = 0;
        for d in &mut u.devices {
            if d.health != DeviceHealth::Unknown {
                d.health = DeviceHealth::Unknown;
                d.reason = Some(format!(
                    "the agent on this node is not reporting ({reason})"
                ));
            }
        }
        u
    }
}

/// Totals over a node's resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    /// Number of resources served.
    pub resources: i64,
    /// `healthy/total` physical devices.
    pub healthy: String,
    /// Physical devices held by at least one container.
    pub allocated: i64,
    /// Devices that are not Healthy, among resources whose agent reports.
    #[serde(default)]
    pub unhealthy: i64,
    /// Resources whose agent is not reporting (listed in `notReporting`).
    #[serde(default)]
    pub not_reporting: i64,
}

/// The devices of one resource on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// Extended resource name.
    pub resource_name: String,
    /// The policy that serves it.
    pub policy: String,
    /// `Serving`: the agent writes this entry only while it serves. (Whether
    /// the agent is still there is the operator's `notReporting`.)
    pub state: String,
    /// Why the state or the allocations may be incomplete (for example the
    /// kubelet's PodResources socket is missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Healthy physical devices.
    pub healthy: i64,
    /// Physical devices.
    pub total: i64,
    /// Physical devices held by at least one container.
    pub allocated: i64,
    /// Every physical device, written whole by the entry's agent.
    // Atomic, not a list map keyed by ID: one agent writes the whole entry,
    // so the API server need not track an owner per device field. As a list
    // map it kept about 6 KB of managed fields per entry of 64 devices, more
    // than the entry itself, in every stored version and watch event.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub devices: Vec<DeviceStatus>,
    /// Device IDs that running containers still hold but the agent no
    /// longer advertises, for example after `sharing.replicas` was lowered
    /// or a device was removed from the spec. The kubelet keeps them
    /// assigned until those pods end; nothing else can get them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub orphaned: Vec<OrphanedDevice>,
}

/// A device ID held by containers but no longer advertised.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrphanedDevice {
    /// The ID as the kubelet assigned it (a replica ID when shared).
    pub id: String,
    /// The containers holding it.
    pub allocations: Vec<Allocation>,
}

/// Value of [`ResourceStatus::state`] while the agent reports.
pub const STATE_SERVING: &str = "Serving";
/// Value of [`ResourceStatus::state`] when the agent is gone or not ready.
pub const STATE_UNKNOWN: &str = "Unknown";

/// Health of a device as reported in the API.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeviceHealth {
    /// Working.
    Healthy,
    /// Broken; see the reason.
    Unhealthy,
    /// The probe failed, or the agent is gone.
    Unknown,
}

/// One physical device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Device ID (physical; replicas of a shared device are not listed).
    pub id: String,
    /// Health.
    pub health: DeviceHealth,
    /// Short reason when not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When `health` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// NUMA nodes of the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa_nodes: Vec<i64>,
    /// Containers holding the device (or one of its replicas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<Allocation>,
}

/// A container holding a device.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
}

/// Field manager of the agent serving `policy` when it writes its entry.
pub fn agent_manager(policy: &str) -> String {
    let mut m = format!("devplug-agent-{policy}");
    m.truncate(128);
    m
}
