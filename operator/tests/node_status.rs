//! The NodeDeviceStatus controller against the fake API server: ownership by
//! the Node, Unknown for a dead agent, stale entries removed, summary and
//! node labels, and no writes when nothing changed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use devplug_api::{DevicePluginPolicy, NodeDeviceStatus};
use devplug_operator::metrics::Metrics;
use devplug_operator::node_controller::{self, NodeContext};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};
use support::{FakeApi, paths, policy_json, seed};

const NDS: &str = "/apis/devplug.io/v1alpha1/nodedevicestatuses/n1";
const NODE: &str = "/api/v1/nodes/n1";

fn agent_pod(ready: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "devplug-agent-foo-abcde", "namespace": paths::NS,
                     "labels": {"app.kubernetes.io/name": "devplug-agent", "devplug.io/policy": "foo"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "agent"}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

fn current_nds(api: &FakeApi) -> Arc<NodeDeviceStatus> {
    Arc::new(serde_json::from_value(api.get(NDS).unwrap()).unwrap())
}

fn entry(api: &FakeApi) -> Value {
    api.get(NDS).unwrap()["status"]["resources"][0].clone()
}

fn writes(api: &FakeApi) -> Vec<String> {
    api.writes()
        .iter()
        .map(|c| format!("{} {} {}", c.method, c.path, c.query))
        .collect()
}

#[tokio::test]
async fn node_status_lifecycle() {
    let (client, api) = FakeApi::start();
    let (policies, mut pw) = seed(
        &api,
        &[policy_json(
            "foo",
            "example.com/foo",
            "2026-11-01T00:00:00Z",
            json!({"sharing": {"strategy": "TimeSlicing", "replicas": 4}}),
        )],
    );
    api.put(NODE, json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "uid": "node-uid-1", "labels": {"kubernetes.io/hostname": "n1"}}}));
    api.put(NDS, json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": "n1", "uid": "nds-1"}, "spec": {"nodeName": "n1"},
        "status": {"resources": [{"resourceName": "example.com/foo", "policy": "foo", "state": "Serving",
            "healthy": 2, "total": 2, "allocated": 1,
            "devices": [{"id": "a", "health": "Healthy"},
                        {"id": "b", "health": "Healthy", "allocations": [{"namespace": "ml", "pod": "p", "container": "c"}]}]}]}}));
    let mut pods = Writer::<Pod>::default();
    pods.apply_watcher_event(&watcher::Event::Apply(agent_pod(true)));
    let ctx = Arc::new(NodeContext {
        client,
        policies: policies.clone(),
        agent_pods: pods.as_reader(),
        metrics: Arc::new(Metrics::default()),
    });

    // First look: own it, summarise it, label the node.
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(api.writes().len(), 3, "{:?}", writes(&api));
    let nds = api.get(NDS).unwrap();
    assert_eq!(nds["metadata"]["ownerReferences"][0]["uid"], "node-uid-1");
    assert_eq!(nds["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(
        nds["status"]["summary"],
        json!({"resources": 1, "healthy": "2/2", "allocated": 1})
    );
    let labels = api.get(NODE).unwrap()["metadata"]["labels"].clone();
    assert_eq!(labels["devplug.io/foo.count"], "2");
    assert_eq!(labels["devplug.io/foo.sharing"], "TimeSlicing");
    assert_eq!(labels["devplug.io/foo.replicas"], "4");
    assert_eq!(
        labels["kubernetes.io/hostname"], "n1",
        "other labels untouched"
    );

    // Nothing changed: nothing written.
    api.clear_log();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert!(api.writes().is_empty(), "{:?}", writes(&api));

    // The agent stops being ready: its entry turns Unknown, written as the
    // agent's own field manager so the agent can take it back.
    pods.apply_watcher_event(&watcher::Event::Apply(agent_pod(false)));
    api.clear_log();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    let w = writes(&api);
    assert!(
        w[0].contains("/status") && w[0].contains("fieldManager=devplug-agent-foo"),
        "{w:?}"
    );
    let e = entry(&api);
    assert_eq!(e["state"], "Unknown");
    assert!(
        e["reason"].as_str().unwrap().starts_with("AgentNotReady"),
        "{e}"
    );
    assert!(
        e["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["health"] == "Unknown")
    );
    assert_eq!(
        e["devices"][1]["allocations"][0]["pod"], "p",
        "allocations are kept"
    );
    assert_eq!(api.get(NDS).unwrap()["status"]["summary"]["healthy"], "0/2");
    let labels = api.get(NODE).unwrap()["metadata"]["labels"].clone();
    assert!(
        labels.get("devplug.io/foo.count").is_none(),
        "no labels for a resource nobody vouches for: {labels}"
    );
    api.clear_log();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "already Unknown: {:?}",
        writes(&api)
    );

    // The pod is gone altogether: a different reason.
    pods.apply_watcher_event(&watcher::Event::Delete(agent_pod(false)));
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert!(
        entry(&api)["reason"]
            .as_str()
            .unwrap()
            .starts_with("AgentGone")
    );

    // The policy is deleted: its entry is removed.
    let p: DevicePluginPolicy =
        serde_json::from_value(api.get(&paths::policy("foo")).unwrap()).unwrap();
    pw.apply_watcher_event(&watcher::Event::Delete(p));
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(api.get(NDS).unwrap()["status"]["resources"], json!([]));
    assert_eq!(api.get(NDS).unwrap()["status"]["summary"]["resources"], 0);

    // The node is gone: so is its status.
    api.delete_object(NODE);
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert!(api.get(NDS).is_none());
}
