//! The operator's projection of an agent pod.
//!
//! A fleet has one agent pod per node and policy (20,000 at 5,000 nodes and
//! 4 policies), and the operator reads six things of each: its name, its
//! labels, whether it is terminating, its node, whether it is Ready, and why
//! it cannot run (unschedulable, or a container waiting). A `Pod` value is
//! 2,176 bytes before any of its heap data, even with every other field
//! empty; this keeps what is read and nothing else. It is parsed straight
//! from the watch (`#[serde(from = "Pod")]`).

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::core::ObjectMeta;
use serde::Deserialize;

/// What the operator keeps of an agent pod.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Pod")]
pub struct AgentPod {
    /// Name, namespace, UID, resourceVersion, labels and deletion timestamp.
    pub metadata: ObjectMeta,
    /// The node it is bound to.
    pub node: Option<String>,
    /// Its Ready condition is True.
    pub ready: bool,
    /// The scheduler's message when its PodScheduled condition is False
    /// for `Unschedulable` (empty when the scheduler gave none).
    pub unschedulable: Option<String>,
    /// Each container's waiting reason, for those waiting with one.
    pub waiting: Vec<String>,
}

impl From<Pod> for AgentPod {
    fn from(p: Pod) -> AgentPod {
        let m = p.metadata;
        let status = p.status.unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        AgentPod {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                labels: m.labels,
                deletion_timestamp: m.deletion_timestamp,
                ..ObjectMeta::default()
            },
            node: p.spec.and_then(|s| s.node_name),
            ready: conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            unschedulable: conditions
                .into_iter()
                .find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
                .map(|c| c.message.unwrap_or_default()),
            waiting: status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.state?.waiting?.reason)
                .collect(),
        }
    }
}

crate::view::projection_of!(AgentPod, Pod, NamespaceResourceScope);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{desired, node_controller, status};
    use k8s_openapi::api::core::v1::PodSpec;
    use serde_json::json;
    use std::sync::Arc;

    /// An agent pod as the DaemonSet controller and the kubelet leave it:
    /// the operator's own template, bound to a node, one container stuck.
    fn agent_pod(ready: bool) -> Pod {
        let p = devplug_api::policies_from_yaml(
            "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {name: gpu}\nspec:\n  resourceName: x.io/gpu\n  source: {simulated: {count: 2}}\n",
        )
        .unwrap()
        .remove(0);
        let d = desired::AgentDefaults {
            namespace: "devplug-system".into(),
            release: "devplug".into(),
            image: "devplug-agent:test".into(),
            kubelet_root: "/var/lib/kubelet".into(),
            device_plugin_dir: "/var/lib/kubelet/device-plugins".into(),
            ..Default::default()
        };
        let ds = desired::daemonset(&p, &d).unwrap();
        let t = ds.spec.unwrap().template;
        let mut pod = Pod {
            metadata: t.metadata.unwrap(),
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                ..t.spec.unwrap()
            }),
            status: Some(
                serde_json::from_value(json!({
                    "phase": "Running", "hostIP": "10.0.0.1", "podIP": "10.1.0.7",
                    "startTime": "2026-11-30T00:00:00Z",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Initialized", "status": "True"},
                        {"type": "ContainersReady", "status": if ready { "True" } else { "False" }},
                        {"type": "Ready", "status": if ready { "True" } else { "False" }}],
                    "containerStatuses": [{"name": "agent", "ready": ready, "restartCount": 4,
                        "image": "devplug-agent:test", "imageID": "sha256:00", "containerID": "containerd://00",
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]
                }))
                .unwrap(),
            ),
        };
        pod.metadata.name = Some("devplug-agent-gpu-x7k2p".into());
        pod.metadata.namespace = Some("devplug-system".into());
        pod
    }

    /// Everything the operator reads of an agent pod it reads from the
    /// projection, which keeps a fraction of the pod; parsed from the
    /// watch's JSON or converted from a `Pod`, it is the same.
    #[test]
    fn the_projection_keeps_what_the_operator_reads() {
        for ready in [true, false] {
            let whole = agent_pod(ready);
            let json = serde_json::to_value(&whole).unwrap();
            let v: AgentPod = serde_json::from_value(json.clone()).unwrap();
            assert_eq!(v, AgentPod::from(whole));
            assert_eq!(v.metadata.name.as_deref(), Some("devplug-agent-gpu-x7k2p"));
            assert_eq!(v.metadata.namespace.as_deref(), Some("devplug-system"));
            assert!(v.metadata.annotations.is_none() && v.metadata.managed_fields.is_none());
            assert_eq!(v.node.as_deref(), Some("n1"));
            assert_eq!(v.ready, ready);
            assert_eq!(v.waiting, ["CrashLoopBackOff"]);
            let v = Arc::new(v);
            assert_eq!(
                status::pod_problems(std::slice::from_ref(&v)),
                ["devplug-agent-gpu-x7k2p on n1: CrashLoopBackOff"]
            );
            assert_eq!(
                node_controller::agent_problem("gpu", "n1", std::slice::from_ref(&v)).is_none(),
                ready
            );
            assert_eq!(
                node_controller::agent_problem("gpu", "n2", std::slice::from_ref(&v)).as_deref(),
                Some("AgentGone: no agent pod runs on this node")
            );
            assert_eq!(
                node_controller::nds_of_pod(&v),
                Some(kube::runtime::reflector::ObjectRef::new("n1"))
            );
            assert!(desired::is_agent_of(
                kube::ResourceExt::labels(v.as_ref()),
                "gpu"
            ));
        }
    }

    #[test]
    fn an_unschedulable_pod_keeps_the_schedulers_message() {
        let j = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "devplug-system"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/3 nodes are available"}]}});
        let v: AgentPod = serde_json::from_value(j).unwrap();
        assert_eq!(v.unschedulable.as_deref(), Some("0/3 nodes are available"));
        assert_eq!(
            status::pod_problems(std::slice::from_ref(&v)),
            ["a: unschedulable: 0/3 nodes are available"]
        );
        assert_eq!(v.node, None);
        assert!(!v.ready);
        // A pod with no status at all: nothing to say about it.
        let bare: AgentPod = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}}),
        )
        .unwrap();
        assert_eq!(
            bare,
            AgentPod {
                metadata: ObjectMeta {
                    name: Some("b".into()),
                    ..ObjectMeta::default()
                },
                ..AgentPod::default()
            }
        );
        assert!(status::pod_problems(&[bare]).is_empty());
    }
}
