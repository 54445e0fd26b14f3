//! The operator's one in-memory view of the cluster.
//!
//! Five watches feed it — policies, agent DaemonSets, agent pods,
//! NodeDeviceStatus objects and Nodes (metadata only) — each exactly once
//! per process. Both controllers read this index and nothing else to decide:
//! what an agent DaemonSet should be, which policies serve a node, which
//! entries are stale, what a policy's device counts and conditions are, are
//! pure functions (`desired`, `conflict`, `devices`, `status`,
//! `node_controller::judge`) of what it holds. The API server is read only
//! on the rare paths the watches cannot answer (a node missing from the
//! index is confirmed with one GET before its status is deleted; objects no
//! watch covers — ServiceAccounts, ClusterRoles, ClusterRoleBindings — are
//! remembered as applied).
//!
//! The index answers only once every store has listed the cluster
//! ([`Index::ready`]): an unlisted store would read as "no agent runs
//! here", "no entries", and the controllers would act on that.

use std::collections::BTreeMap;
use std::sync::Arc;

use devplug_api::{DevicePluginPolicy, ResourceExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::agent_pod::AgentPod;
use crate::synced::Synced;
use crate::view::NodeView;

/// Watch-fed stores, shared by both controllers.
#[derive(Clone)]
pub struct Index {
    /// Every policy.
    pub policies: Store<DevicePluginPolicy>,
    /// Agent DaemonSets in the operator's namespace.
    pub daemonsets: Store<DaemonSet>,
    /// Agent pods in the operator's namespace, as the operator's
    /// projection ([`AgentPod`]).
    pub agent_pods: Store<AgentPod>,
    /// Every NodeDeviceStatus, as the operator's compact projection
    /// ([`NodeView`]).
    pub nds: Store<NodeView>,
    /// Every Node, metadata only (labels decide which policies serve it).
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// Whether each store has listed the cluster.
    pub synced: Synced,
}

impl Index {
    /// Whether every store has listed the cluster once.
    pub fn ready(&self) -> bool {
        self.synced.ready()
    }

    /// Every policy by name.
    pub fn policies_by_name(&self) -> BTreeMap<String, Arc<DevicePluginPolicy>> {
        self.policies
            .state()
            .into_iter()
            .map(|p| (p.name_any(), p))
            .collect()
    }

    /// A node's metadata, if the index has the node.
    pub fn node(&self, name: &str) -> Option<Arc<PartialObjectMeta<Node>>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// An agent DaemonSet in `namespace`.
    pub fn daemonset(&self, namespace: &str, name: &str) -> Option<Arc<DaemonSet>> {
        self.daemonsets.get(&ObjectRef::new(name).within(namespace))
    }
}
