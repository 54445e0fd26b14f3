//! Reconciles one `NodeDeviceStatus` (one node):
//! - owned by its Node, so it is garbage-collected with it (deleted outright
//!   when the Node is already gone);
//! - an entry whose agent pod is missing or not ready is marked `Unknown`
//!   with a reason, so a dead agent never leaves a stale "Healthy"; an entry
//!   whose policy is gone is removed. Both are written as the entry's own
//!   agent field manager, so the agent simply takes the entry back when it
//!   returns (no ownership conflicts);
//! - `status.summary` for `kubectl get nds`;
//! - the node's `devplug.io/<policy>.{count,sharing,replicas}` labels (one
//!   apply of the full set, so labels of removed policies disappear).
//!
//! Agents never touch Node objects; only the operator does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use devplug_api::{
    DeviceHealth, DevicePluginPolicy, NodeDeviceStatus, OPERATOR_MANAGER, ResourceExt,
    ResourceStatus, STATE_UNKNOWN, agent_manager,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use serde_json::json;
use tracing::{info, warn};

use crate::desired::label_value;
use crate::devices::{self, NODE_LABEL_PREFIX};
use crate::error::{Error, Result, kube_err};
use crate::metrics::Metrics;

/// Shared state of node reconciles.
pub struct NodeContext {
    /// API client.
    pub client: Client,
    /// Every policy.
    pub policies: Store<DevicePluginPolicy>,
    /// Agent pods (operator namespace, labelled `app.kubernetes.io/name=devplug-agent`).
    pub agent_pods: Store<Pod>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why the agent of `policy` on `node` cannot vouch for its entry, if it cannot.
pub fn agent_problem(policy: &str, node: &str, pods: &[Arc<Pod>]) -> Option<String> {
    let label = label_value(policy);
    let mine: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| {
            p.labels().get(devplug_api::POLICY_LABEL) == Some(&label)
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    match mine.iter().find(|p| pod_ready(p)) {
        Some(_) => None,
        None => match mine.first() {
            Some(p) => Some(format!(
                "AgentNotReady: agent pod {} is not ready",
                p.name_any()
            )),
            None => Some("AgentGone: no agent pod runs on this node".into()),
        },
    }
}

/// The entry as the operator writes it for an agent that cannot report.
pub fn unknown_entry(e: &ResourceStatus, reason: &str) -> ResourceStatus {
    let mut u = e.clone();
    u.state = STATE_UNKNOWN.into();
    u.reason = Some(reason.into());
    u.healthy = 0;
    for d in &mut u.devices {
        if d.health != DeviceHealth::Unknown {
            d.health = DeviceHealth::Unknown;
            d.reason = Some("the agent on this node is not reporting".into());
            d.last_transition_time = None;
        }
    }
    u
}

fn node_owner(node: &Node) -> Option<serde_json::Value> {
    let uid = node.metadata.uid.as_ref()?;
    Some(json!({"apiVersion": "v1", "kind": "Node", "name": node.name_any(), "uid": uid}))
}

/// Reconciles one node's NodeDeviceStatus.
pub async fn reconcile(nds: Arc<NodeDeviceStatus>, ctx: Arc<NodeContext>) -> Result<Action> {
    let name = nds.name_any();
    let api: Api<NodeDeviceStatus> = Api::all(ctx.client.clone());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let Some(node) = nodes
        .get_opt(&name)
        .await
        .map_err(kube_err("get", "Node", &name))?
    else {
        // A status for a node that no longer exists describes nothing.
        if nds.metadata.deletion_timestamp.is_none() {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(kube_err("delete", "NodeDeviceStatus", &name)(e)),
            }
            ctx.metrics.wrote("NodeDeviceStatusDelete");
            info!(node = %name, "removed the device status of a node that is gone");
        }
        return Ok(Action::await_change());
    };

    // Owned by the Node.
    let owner = node_owner(&node);
    let owned = nds
        .owner_references()
        .iter()
        .any(|o| o.kind == "Node" && Some(&o.uid) == node.metadata.uid.as_ref());
    if let Some(owner) = owner
        && !owned
    {
        let body = json!({
            "apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
            "metadata": {"name": name, "ownerReferences": [owner]},
        });
        api.patch(
            &name,
            &PatchParams::apply(OPERATOR_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(kube_err("apply owner of", "NodeDeviceStatus", &name))?;
        ctx.metrics.wrote("NodeDeviceStatusOwner");
    }

    // Entries whose agent cannot speak for them.
    let policies: BTreeMap<String, Arc<DevicePluginPolicy>> = ctx
        .policies
        .state()
        .into_iter()
        .map(|p| (p.name_any(), p))
        .collect();
    let pods = ctx.agent_pods.state();
    let mut effective = (*nds).clone();
    let entries: Vec<ResourceStatus> = nds
        .status
        .iter()
        .flat_map(|s| s.resources.clone())
        .collect();
    let mut kept = Vec::new();
    for e in entries {
        let manager = agent_manager(&e.policy);
        let pp = PatchParams::apply(&manager).force();
        let gone = policies
            .get(&e.policy)
            .is_none_or(|p| p.spec.resource_name != e.resource_name);
        if gone {
            // Drop what the departed agent's field manager owned.
            let body = json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                              "metadata": {"name": name}, "status": {"resources": []}});
            api.patch_status(&name, &pp, &Patch::Apply(&body))
                .await
                .map_err(kube_err("remove stale entry of", "NodeDeviceStatus", &name))?;
            ctx.metrics.wrote("NodeDeviceStatusEntry");
            info!(node = %name, policy = %e.policy, "removed the entry of a policy that is gone");
            continue;
        }
        match agent_problem(&e.policy, &name, &pods) {
            Some(reason) if e.state != STATE_UNKNOWN || e.reason.as_deref() != Some(&reason) => {
                let u = unknown_entry(&e, &reason);
                let body = json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                                  "metadata": {"name": name}, "status": {"resources": [u]}});
                api.patch_status(&name, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(kube_err("mark unknown in", "NodeDeviceStatus", &name))?;
                ctx.metrics.wrote("NodeDeviceStatusEntry");
                warn!(node = %name, policy = %e.policy, %reason, "device status marked Unknown");
                kept.push(u);
            }
            _ => kept.push(e),
        }
    }
    if let Some(s) = effective.status.as_mut() {
        s.resources = kept;
    }

    // Summary for `kubectl get nds`.
    let summary = devices::summary(&effective);
    if nds.status.as_ref().and_then(|s| s.summary.as_ref()) != Some(&summary) {
        let body = json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                          "metadata": {"name": name}, "status": {"summary": summary}});
        api.patch_status(
            &name,
            &PatchParams::apply(OPERATOR_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(kube_err("apply summary of", "NodeDeviceStatus", &name))?;
        ctx.metrics.wrote("NodeDeviceStatusSummary");
    }

    // Node labels.
    let by_name: BTreeMap<String, &DevicePluginPolicy> = policies
        .iter()
        .map(|(k, v)| (k.clone(), v.as_ref()))
        .collect();
    let want = devices::node_labels(&effective, &by_name);
    let have: BTreeMap<String, String> = node
        .labels()
        .iter()
        .filter(|(k, _)| {
            k.starts_with(NODE_LABEL_PREFIX)
                && (k.ends_with(".count") || k.ends_with(".sharing") || k.ends_with(".replicas"))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if want != have {
        let body =
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": want}});
        nodes
            .patch(
                &name,
                &PatchParams::apply(OPERATOR_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(kube_err("apply labels to", "Node", &name))?;
        ctx.metrics.wrote("NodeLabels");
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Requeues a failed node with a fixed delay.
pub fn error_policy(nds: Arc<NodeDeviceStatus>, err: &Error, ctx: Arc<NodeContext>) -> Action {
    ctx.metrics.failed(err.metric_label());
    warn!(node = %nds.name_any(), error = %err, "node device status reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

/// The NodeDeviceStatus a pod's node maps to.
pub fn nds_of_pod(pod: &Pod) -> Option<kube::runtime::reflector::ObjectRef<NodeDeviceStatus>> {
    let node = pod.spec.as_ref()?.node_name.as_ref()?;
    Some(kube::runtime::reflector::ObjectRef::new(node))
}

/// Policies that have an entry in a NodeDeviceStatus.
pub fn policies_of_nds(
    nds: &NodeDeviceStatus,
) -> Vec<kube::runtime::reflector::ObjectRef<DevicePluginPolicy>> {
    nds.status
        .iter()
        .flat_map(|s| &s.resources)
        .map(|e| kube::runtime::reflector::ObjectRef::new(&e.policy))
        .collect()
}

/// Makes the compiler check that NodeDeviceStatus is cluster-scoped, which
/// the `ObjectRef::new` calls above assume.
const _: () = {
    fn assert_cluster_scoped<K: Resource<Scope = k8s_openapi::ClusterResourceScope>>() {}
    let _ = assert_cluster_scoped::<NodeDeviceStatus>;
};
