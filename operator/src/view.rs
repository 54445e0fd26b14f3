//! What the operator keeps of each NodeDeviceStatus: a compact projection.
//!
//! A NodeDeviceStatus carries every device of every policy on its node, with
//! topology, transition times and containers: 16 KB of JSON and about 68 KB
//! once parsed for 4 policies of 64 devices. The operator reads much less:
//! each entry's header (policy, resource, state, reason, counts) for the
//! verdict, the summary and the node labels; each device's ID, health,
//! reason and the pods holding it for the policy counts and its unhealthy
//! list. [`NodeView`] keeps exactly that, the IDs of one entry in one string,
//! and is parsed straight from the watch (`#[serde(from)]`), so a list page
//! or an event never holds the whole object longer than one parse.
//!
//! What is dropped is never read by the operator: device NUMA nodes,
//! transition times, an allocation's container (a policy status names pods),
//! orphaned devices, labels, annotations and managed fields.

use devplug_api::{
    Allocation, DeviceHealth, DeviceStatus, NodeDeviceStatus, NodeSummary, NotReporting,
    ResourceStatus,
};
use k8s_openapi::ClusterResourceScope;
use kube::core::ObjectMeta;
use serde::Deserialize;

/// The operator's projection of one NodeDeviceStatus.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "NodeDeviceStatus")]
pub struct NodeView {
    /// Name, UID, resourceVersion, owner references and deletion timestamp.
    pub metadata: ObjectMeta,
    /// What the object's status says, compact.
    pub status: Option<ViewStatus>,
}

/// A NodeDeviceStatus's status as the operator keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViewStatus {
    /// Each entry's header: `devices` and `orphaned` are empty here (see
    /// [`ViewStatus::devices`]).
    pub resources: Vec<ResourceStatus>,
    /// Each entry's devices, in the order of `resources`.
    pub devices: Vec<Devices>,
    /// The summary as last written.
    pub summary: Option<NodeSummary>,
    /// Entries the operator listed as not reporting, as last written.
    pub not_reporting: Vec<NotReporting>,
}

/// One entry's devices: every ID in order, and what differs from "healthy,
/// no reason, held by nobody" for the few that differ.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Devices {
    /// The IDs, one after another.
    ids: String,
    /// Where each ID ends in `ids`.
    ends: Vec<u32>,
    /// Devices not healthy or with a reason, by index: health, reason and
    /// allocations (containers dropped).
    notable: Vec<(u32, DeviceStatus)>,
    /// Healthy devices held by pods, by index: the pods as `namespace/pod`.
    held: Vec<(u32, Vec<Box<str>>)>,
}

impl Devices {
    /// Keeps what the operator reads of `devices`.
    pub fn of(devices: &[DeviceStatus]) -> Self {
        let mut out = Devices {
            ids: String::with_capacity(devices.iter().map(|d| d.id.len()).sum()),
            ends: Vec::with_capacity(devices.len()),
            ..Devices::default()
        };
        for (i, d) in devices.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            out.ids.push_str(&d.id);
            out.ends
                .push(u32::try_from(out.ids.len()).unwrap_or(u32::MAX));
            if d.health != DeviceHealth::Healthy || d.reason.is_some() {
                out.notable.push((
                    i,
                    DeviceStatus {
                        id: String::new(),
                        health: d.health,
                        reason: d.reason.clone(),
                        last_transition_time: None,
                        numa_nodes: Vec::new(),
                        allocations: d
                            .allocations
                            .iter()
                            .map(|a| Allocation {
                                namespace: a.namespace.clone(),
                                pod: a.pod.clone(),
                                container: String::new(),
                            })
                            .collect(),
                    },
                ));
            } else if !d.allocations.is_empty() {
                let pods = d
                    .allocations
                    .iter()
                    .map(|a| format!("{}/{}", a.namespace, a.pod).into_boxed_str())
                    .collect();
                out.held.push((i, pods));
            }
        }
        out.ids.shrink_to_fit();
        out.notable.shrink_to_fit();
        out.held.shrink_to_fit();
        out
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no devices.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn id(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends[i] as usize;
        self.ids.get(start..end).unwrap_or_default()
    }

    /// The devices again, as the operator reads them: IDs, health, reasons
    /// and the pods holding each (an allocation's container left empty).
    pub fn expand(&self) -> Vec<DeviceStatus> {
        let mut notable = self.notable.iter().peekable();
        let mut held = self.held.iter().peekable();
        (0..self.len())
            .map(|i| {
                let id = self.id(i).to_string();
                let at = i as u32;
                if let Some((_, d)) = notable.next_if(|(j, _)| *j == at) {
                    return DeviceStatus { id, ..d.clone() };
                }
                let allocations = match held.next_if(|(j, _)| *j == at) {
                    Some((_, pods)) => pods
                        .iter()
                        .map(|p| {
                            let (namespace, pod) = p.split_once('/').unwrap_or(("", p));
                            Allocation {
                                namespace: namespace.to_string(),
                                pod: pod.to_string(),
                                container: String::new(),
                            }
                        })
                        .collect(),
                    None => Vec::new(),
                };
                DeviceStatus {
                    id,
                    health: DeviceHealth::Healthy,
                    reason: None,
                    last_transition_time: None,
                    numa_nodes: Vec::new(),
                    allocations,
                }
            })
            .collect()
    }
}

impl From<NodeDeviceStatus> for NodeView {
    fn from(n: NodeDeviceStatus) -> Self {
        let m = n.metadata;
        let metadata = ObjectMeta {
            name: m.name,
            uid: m.uid,
            resource_version: m.resource_version,
            owner_references: m.owner_references,
            deletion_timestamp: m.deletion_timestamp,
            ..ObjectMeta::default()
        };
        let status = n.status.map(|s| {
            let devices = s
                .resources
                .iter()
                .map(|e| Devices::of(&e.devices))
                .collect();
            let resources = s
                .resources
                .into_iter()
                .map(|e| ResourceStatus {
                    devices: Vec::new(),
                    orphaned: Vec::new(),
                    ..e
                })
                .collect();
            ViewStatus {
                resources,
                devices,
                summary: s.summary,
                not_reporting: s.not_reporting,
            }
        });
        NodeView { metadata, status }
    }
}

impl From<&NodeDeviceStatus> for NodeView {
    fn from(n: &NodeDeviceStatus) -> Self {
        NodeView::from(n.clone())
    }
}

impl NodeView {
    /// The entries with their devices, as the operator reads them.
    pub fn entries(&self) -> impl Iterator<Item = ResourceStatus> + '_ {
        self.status.iter().flat_map(|s| {
            s.resources
                .iter()
                .zip(&s.devices)
                .map(|(e, d)| ResourceStatus {
                    devices: d.expand(),
                    ..e.clone()
                })
        })
    }
}

/// `kube::Resource` for a projection `$view` of the API type `$whole`: the
/// same kind, group, version and plural (so an `Api<$view>` lists and
/// watches `$whole`), with the projection's own `metadata`.
macro_rules! projection_of {
    ($view:ty, $whole:ty, $scope:ty) => {
        impl kube::Resource for $view {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
                <$whole as kube::Resource>::kind(dt)
            }

            fn group(dt: &()) -> std::borrow::Cow<'_, str> {
                <$whole as kube::Resource>::group(dt)
            }

            fn version(dt: &()) -> std::borrow::Cow<'_, str> {
                <$whole as kube::Resource>::version(dt)
            }

            fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
                <$whole as kube::Resource>::plural(dt)
            }

            fn meta(&self) -> &kube::core::ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use projection_of;

projection_of!(NodeView, NodeDeviceStatus, ClusterResourceScope);

#[cfg(test)]
mod tests {
    use super::*;
    use devplug_api::{NodeDeviceStatusSpec, NodeDeviceStatusStatus};

    fn dev(id: &str, health: DeviceHealth, reason: Option<&str>, pods: &[&str]) -> DeviceStatus {
        DeviceStatus {
            id: id.into(),
            health,
            reason: reason.map(str::to_string),
            last_transition_time: None,
            numa_nodes: vec![1],
            allocations: pods
                .iter()
                .map(|p| {
                    let (namespace, pod) = p.split_once('/').unwrap();
                    Allocation {
                        namespace: namespace.into(),
                        pod: pod.into(),
                        container: "c".into(),
                    }
                })
                .collect(),
        }
    }

    /// What the operator reads of a device: all but topology, transition
    /// time and containers.
    fn read(d: &DeviceStatus) -> DeviceStatus {
        DeviceStatus {
            numa_nodes: Vec::new(),
            last_transition_time: None,
            allocations: d
                .allocations
                .iter()
                .map(|a| Allocation {
                    container: String::new(),
                    ..a.clone()
                })
                .collect(),
            ..d.clone()
        }
    }

    #[test]
    fn keeps_every_id_health_reason_and_pod_in_order() {
        let devices = vec![
            dev("a", DeviceHealth::Healthy, None, &[]),
            dev("bb", DeviceHealth::Healthy, None, &["ns/p1", "ns/p2"]),
            dev("", DeviceHealth::Healthy, None, &[]),
            dev("ccc", DeviceHealth::Unhealthy, Some("XID 79"), &["x/q"]),
            dev("d", DeviceHealth::Unknown, None, &[]),
            dev("é/ü", DeviceHealth::Healthy, Some("recovered"), &[]),
            dev("e", DeviceHealth::Healthy, None, &["odd/ns/pod"]),
        ];
        let c = Devices::of(&devices);
        assert_eq!(c.len(), devices.len());
        let back = c.expand();
        let want: Vec<DeviceStatus> = devices.iter().map(read).collect();
        // Held devices come back as namespace/pod split at the first '/',
        // which reads the same wherever the original split was.
        assert_eq!(back[..6], want[..6]);
        assert_eq!(back[6].allocations[0].namespace, "odd");
        assert_eq!(back[6].allocations[0].pod, "ns/pod");
        assert!(Devices::of(&[]).expand().is_empty());
    }

    #[test]
    fn a_view_keeps_headers_summary_and_not_reporting() {
        let mut n = NodeDeviceStatus::new(
            "n1",
            NodeDeviceStatusSpec {
                node_name: "n1".into(),
            },
        );
        n.metadata.resource_version = Some("7".into());
        n.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        let entry = ResourceStatus {
            resource_name: "x.io/gpu".into(),
            policy: "gpu".into(),
            state: "Serving".into(),
            reason: Some("r".into()),
            healthy: 1,
            total: 2,
            allocated: 1,
            devices: vec![
                dev("g0", DeviceHealth::Healthy, None, &["ns/p"]),
                dev("g1", DeviceHealth::Unhealthy, Some("ecc"), &[]),
            ],
            orphaned: Vec::new(),
        };
        n.status = Some(NodeDeviceStatusStatus {
            resources: vec![entry.clone()],
            summary: Some(NodeSummary {
                resources: 1,
                healthy: "1/2".into(),
                allocated: 1,
                unhealthy: 0,
                not_reporting: 1,
            }),
            not_reporting: vec![NotReporting {
                resource_name: "x.io/gpu".into(),
                policy: "gpu".into(),
                reason: "AgentGone".into(),
            }],
        });
        // Parsed from the wire as the watch parses it.
        let v: NodeView = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
        assert_eq!(v.metadata.name.as_deref(), Some("n1"));
        assert_eq!(v.metadata.resource_version.as_deref(), Some("7"));
        assert!(v.metadata.labels.is_none());
        let st = v.status.as_ref().unwrap();
        assert!(st.resources[0].devices.is_empty());
        assert_eq!(st.resources[0].total, 2);
        assert_eq!(st.summary, n.status.as_ref().unwrap().summary);
        assert_eq!(st.not_reporting, n.status.as_ref().unwrap().not_reporting);
        let entries: Vec<ResourceStatus> = v.entries().collect();
        assert_eq!(
            entries,
            vec![ResourceStatus {
                devices: entry.devices.iter().map(read).collect(),
                ..entry
            }]
        );
        assert_eq!(
            <NodeView as kube::Resource>::plural(&()),
            "nodedevicestatuses"
        );
    }
}
