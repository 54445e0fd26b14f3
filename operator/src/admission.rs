//! Pods that requested a policy's resource and failed admission on their
//! node (`UnexpectedAdmissionError`, which the kubelet does not retry) get an
//! Event on the policy, naming the pod and the node.

use std::collections::HashSet;
use std::sync::Arc;

use devplug_api::{DevicePluginPolicy, Resource, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::warn;

use crate::metrics::Metrics;

/// The kubelet's reason for a pod that failed device admission.
pub const REASON: &str = "UnexpectedAdmissionError";

/// (policy name, event note) for each policy whose resource the failed pod asked for.
pub fn failures(pod: &Pod, policies: &[Arc<DevicePluginPolicy>]) -> Vec<(String, String)> {
    let Some(st) = &pod.status else { return vec![] };
    if st.reason.as_deref() != Some(REASON) {
        return vec![];
    }
    let mut wanted = HashSet::new();
    for c in pod.spec.iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    }) {
        if let Some(r) = &c.resources {
            wanted.extend(r.limits.iter().flatten().map(|(k, _)| k.clone()));
            wanted.extend(r.requests.iter().flatten().map(|(k, _)| k.clone()));
        }
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "?".into());
    let msg = st.message.clone().unwrap_or_default();
    policies
        .iter()
        .filter(|p| wanted.contains(&p.spec.resource_name))
        .map(|p| {
            (
                p.name_any(),
                format!(
                    "pod {}/{} on node {node} failed admission for {}: {msg}",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any(),
                    p.spec.resource_name
                ),
            )
        })
        .collect()
}

/// Watches failed pods cluster-wide until the stream ends.
pub async fn run(
    client: kube::Client,
    policies: Store<DevicePluginPolicy>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
) {
    let pods: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields("status.phase=Failed");
    let mut seen: HashSet<String> = HashSet::new();
    let mut stream = watcher(pods, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ev) = stream.next().await {
        let pod = match ev {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "watching failed pods");
                continue;
            }
        };
        let Some(uid) = pod.uid() else { continue };
        if seen.contains(&uid) {
            continue;
        }
        let found = failures(&pod, &policies.state());
        if found.is_empty() {
            continue;
        }
        if seen.len() > 10_000 {
            seen.clear();
        }
        seen.insert(uid);
        for (policy, note) in found {
            let Some(p) = policies
                .state()
                .into_iter()
                .find(|p| p.name_any() == policy)
            else {
                continue;
            };
            let ev = Event {
                type_: EventType::Warning,
                reason: "AdmissionFailed".into(),
                note: Some(note),
                action: "AdmitPod".into(),
                secondary: Some(pod.object_ref(&())),
            };
            match recorder.publish(&ev, &p.object_ref(&())).await {
                Ok(()) => metrics.wrote("Event"),
                Err(e) => warn!(%policy, error = %e, "cannot publish event"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pod_node_and_policy() {
        let p = Arc::new(
            devplug_api::policies_from_yaml(
                "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {name: gpu}\nspec:\n  resourceName: x.io/gpu\n  source: {simulated: {count: 1}}\n",
            )
            .unwrap()
            .remove(0),
        );
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "train", "namespace": "ml", "uid": "u"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "resources": {"limits": {"x.io/gpu": "1"}}}]},
            "status": {"phase": "Failed", "reason": "UnexpectedAdmissionError",
                       "message": "Allocate failed due to no healthy devices present"}
        }))
        .unwrap();
        let f = failures(&pod, std::slice::from_ref(&p));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "gpu");
        assert!(
            f[0].1.contains("ml/train on node n1") && f[0].1.contains("no healthy devices"),
            "{}",
            f[0].1
        );
        let mut other = pod.clone();
        other.status.as_mut().unwrap().reason = Some("Evicted".into());
        assert!(failures(&other, &[p]).is_empty());
    }
}
