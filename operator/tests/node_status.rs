//! The NodeDeviceStatus controller against the fake API server (with the
//! chart's RBAC): ownership by the Node, agents not reporting named in the
//! operator's own field (never by writing the agent's entry), stale entries
//! removed only on the version judged, summary and node labels, no writes
//! when nothing changed, and nothing judged before the stores are synced.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use devplug_api::DevicePluginPolicy;
use devplug_operator::agent_pod::AgentPod;
use devplug_operator::metrics::Metrics;
use devplug_operator::node_controller::{self, NodeContext};
use kube::runtime::watcher;
use serde_json::{Value, json};
use support::{FakeApi, paths, policy_json, seed, synced};

const NDS: &str = "/apis/devplug.io/v1alpha1/nodedevicestatuses/n1";
const NODE: &str = "/api/v1/nodes/n1";

fn agent_pod(ready: bool) -> AgentPod {
    serde_json::from_value(json!({
        "metadata": {"name": "devplug-agent-foo-abcde", "namespace": paths::NS,
                     "labels": {"app.kubernetes.io/name": "devplug-agent", "devplug.io/policy": "foo"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "agent"}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

fn current_nds(api: &FakeApi) -> Arc<devplug_operator::view::NodeView> {
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
    api.enforce_chart_rbac();
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
    let (pods_store, mut pods) = synced(vec![agent_pod(true)]);
    let ctx = Arc::new(
        NodeContext::new(
            client,
            devplug_operator::index::Index {
                policies: policies.clone(),
                daemonsets: support::synced(Vec::new()).0,
                agent_pods: pods_store,
                nds: support::synced(Vec::new()).0,
                nodes: support::synced(Vec::new()).0,
                synced: devplug_operator::synced::Synced::all(),
            },
            Arc::new(Metrics::default()),
            Default::default(),
        )
        .delaying_node_writes_by(std::time::Duration::ZERO),
    );

    // First look: own it, summarise it, label the node.
    let stale = current_nds(&api);
    node_controller::reconcile(stale.clone(), ctx.clone())
        .await
        .unwrap();
    assert_eq!(api.writes().len(), 3, "{:?}", writes(&api));

    // Triggered again before the watch delivered those writes (the index
    // still holds the version judged, as on a loaded API server): the same
    // verdict is not written twice.
    api.clear_log();
    node_controller::reconcile(stale.clone(), ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "rewrote from a stale copy: {:?}",
        writes(&api)
    );
    // Nor from a version newer than the one judged but older than the
    // operator's own writes (an agent wrote in between; the watch has not
    // caught up): what this process wrote moments ago still stands.
    let mut between = (*stale).clone();
    between.metadata.resource_version = Some("between".into());
    node_controller::reconcile(Arc::new(between), ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "rewrote from a lagging index: {:?}",
        writes(&api)
    );
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

    // The agent stops being ready: the operator says so in its own field,
    // under its own field manager; the agent's entry is left as it wrote it.
    pods.apply_watcher_event(&watcher::Event::Apply(agent_pod(false)));
    api.clear_log();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    let w = writes(&api);
    assert!(
        w.iter().all(|w| !w.contains("fieldManager=devplug-agent")),
        "the operator never writes as an agent: {w:?}"
    );
    assert!(
        w[0].contains("/status") && w[0].contains("fieldManager=devplug-operator"),
        "{w:?}"
    );
    let e = entry(&api);
    assert_eq!(e["state"], "Serving", "the agent's entry is untouched: {e}");
    assert!(
        e["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["health"] == "Healthy")
    );
    let nr = &api.get(NDS).unwrap()["status"]["notReporting"];
    assert_eq!(nr[0]["policy"], "foo");
    assert!(
        nr[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("AgentNotReady"),
        "{nr}"
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
        "already not reporting: {:?}",
        writes(&api)
    );

    // Ready again: the operator withdraws its verdict; nothing else to repair.
    pods.apply_watcher_event(&watcher::Event::Apply(agent_pod(true)));
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    let st = &api.get(NDS).unwrap()["status"];
    assert!(st.get("notReporting").is_none(), "{st}");
    assert_eq!(st["summary"]["healthy"], "2/2");
    assert_eq!(
        api.get(NODE).unwrap()["metadata"]["labels"]["devplug.io/foo.count"],
        "2"
    );

    // The pod is gone altogether while the policy still wants the node.
    pods.apply_watcher_event(&watcher::Event::Delete(agent_pod(true)));
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    let st = &api.get(NDS).unwrap()["status"];
    assert!(
        st["notReporting"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("AgentGone"),
        "{st}"
    );
    assert_eq!(
        st["resources"].as_array().unwrap().len(),
        1,
        "kept while the policy wants the node"
    );

    // The policy is deleted: its entry is removed, guarded by the
    // resourceVersion the decision was made on.
    let p: DevicePluginPolicy =
        serde_json::from_value(api.get(&paths::policy("foo")).unwrap()).unwrap();
    pw.apply_watcher_event(&watcher::Event::Delete(p));
    let judged = current_nds(&api);
    // An agent writes meanwhile: the stale judgment must not remove anything.
    let mut newer = api.get(NDS).unwrap();
    newer["metadata"]["resourceVersion"] = json!("999999");
    api.put(NDS, newer);
    node_controller::reconcile(judged, ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        api.get(NDS).unwrap()["status"]["resources"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "an entry must not be removed on a judgment of an older version"
    );
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(api.get(NDS).unwrap()["status"]["resources"], json!([]));
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(api.get(NDS).unwrap()["status"]["summary"]["resources"], 0);
    assert!(
        api.get(NDS).unwrap()["status"]
            .get("notReporting")
            .is_none()
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());

    // The node is gone: so is its status.
    api.delete_object(NODE);
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert!(api.get(NDS).is_none());
}

#[tokio::test]
async fn nothing_is_judged_before_the_stores_are_synced() {
    let (client, api) = FakeApi::start();
    api.enforce_chart_rbac();
    let (policies, _pw) = seed(
        &api,
        &[policy_json(
            "foo",
            "example.com/foo",
            "2026-11-01T00:00:00Z",
            json!({}),
        )],
    );
    api.put(
        NODE,
        json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "uid": "node-uid-1"}}),
    );
    api.put(NDS, json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": "n1", "uid": "nds-1", "resourceVersion": "1"}, "spec": {"nodeName": "n1"},
        "status": {"resources": [{"resourceName": "example.com/foo", "policy": "foo", "state": "Serving",
            "healthy": 1, "total": 1, "allocated": 0, "devices": [{"id": "a", "health": "Healthy"}]}]}}));
    // The agent pod store has not listed yet: an empty store must not read
    // as "no agent runs here". The flags come from the watch streams.
    let synced = devplug_operator::synced::Synced::all();
    synced
        .agent_pods
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (pods_store, _w) = support::synced(Vec::<AgentPod>::new());
    let ctx = Arc::new(NodeContext::new(
        client,
        devplug_operator::index::Index {
            policies,
            daemonsets: support::synced(Vec::new()).0,
            agent_pods: pods_store,
            nds: support::synced(Vec::new()).0,
            nodes: support::synced(Vec::new()).0,
            synced: synced.clone(),
        },
        Arc::new(Metrics::default()),
        Default::default(),
    ));
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "judged from an unsynced store: {:?}",
        writes(&api)
    );

    // The listing arrives through the stream that sets the flag.
    let (pods_store, pods_writer) = kube::runtime::reflector::store::<AgentPod>();
    let events = futures::stream::iter(vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(agent_pod(true))),
        Ok(watcher::Event::InitDone),
    ]);
    let stream = devplug_operator::synced::mark(
        kube::runtime::reflector(pods_writer, events),
        synced.agent_pods.clone(),
    );
    futures::StreamExt::collect::<Vec<_>>(stream).await;
    assert!(synced.ready());
    let ctx = Arc::new(
        NodeContext::new(
            ctx.client.clone(),
            devplug_operator::index::Index {
                policies: ctx.index.policies.clone(),
                daemonsets: support::synced(Vec::new()).0,
                agent_pods: pods_store,
                nds: support::synced(Vec::new()).0,
                nodes: support::synced(Vec::new()).0,
                synced,
            },
            Arc::new(Metrics::default()),
            Default::default(),
        )
        .delaying_node_writes_by(std::time::Duration::ZERO),
    );
    node_controller::reconcile(current_nds(&api), ctx)
        .await
        .unwrap();
    let st = &api.get(NDS).unwrap()["status"];
    assert!(st.get("notReporting").is_none(), "{st}");
    assert_eq!(st["summary"]["healthy"], "1/1");
}

/// Summary and label changes are written once, a delay after they were
/// first seen, from what the index holds then (a lagging watch delivers
/// every intermediate version; each used to cost a write); an agent that
/// stops reporting is written at once.
#[tokio::test]
async fn summary_and_label_changes_wait_notreporting_does_not() {
    let (client, api) = FakeApi::start();
    api.enforce_chart_rbac();
    let (policies, _pw) = seed(
        &api,
        &[policy_json(
            "foo",
            "example.com/foo",
            "2026-11-01T00:00:00Z",
            json!({}),
        )],
    );
    api.put(
        NODE,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "uid": "node-uid-1"}}),
    );
    let nds = |rv: &str, healthy: u32, allocated: u32| {
        json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
            "metadata": {"name": "n1", "uid": "nds-1", "resourceVersion": rv}, "spec": {"nodeName": "n1"},
            "status": {"resources": [{"resourceName": "example.com/foo", "policy": "foo", "state": "Serving",
                "healthy": healthy, "total": 2, "allocated": allocated,
                "devices": [{"id": "a", "health": "Healthy"},
                            {"id": "b", "health": if healthy == 2 { "Healthy" } else { "Unhealthy" }}]}]}})
    };
    api.put(NDS, nds("1", 2, 0));
    let (pods_store, mut pods) = synced(vec![agent_pod(true)]);
    let delay = std::time::Duration::from_millis(600);
    let ctx = Arc::new(
        NodeContext::new(
            client,
            devplug_operator::index::Index {
                policies,
                daemonsets: support::synced(Vec::new()).0,
                agent_pods: pods_store,
                nds: support::synced(Vec::new()).0,
                nodes: support::synced(Vec::new()).0,
                synced: devplug_operator::synced::Synced::all(),
            },
            Arc::new(Metrics::default()),
            Default::default(),
        )
        .delaying_node_writes_by(delay),
    );
    let summary = |api: &FakeApi| api.get(NDS).unwrap()["status"]["summary"].clone();
    let status_writes = |api: &FakeApi| {
        writes(api)
            .into_iter()
            .filter(|w| w.contains("/nodedevicestatuses/n1/status"))
            .count()
    };
    let label_writes = |api: &FakeApi| {
        writes(api)
            .into_iter()
            .filter(|w| w.contains("/api/v1/nodes/n1"))
            .count()
    };
    // First look: owned at once; summary and labels wait.
    let first_seen = std::time::Instant::now();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 0, "{:?}", writes(&api));
    assert_eq!(label_writes(&api), 0, "{:?}", writes(&api));
    assert_eq!(
        api.get(NDS).unwrap()["metadata"]["ownerReferences"][0]["uid"],
        "node-uid-1"
    );
    tokio::time::sleep(
        delay.saturating_sub(first_seen.elapsed()) + std::time::Duration::from_millis(50),
    )
    .await;
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(summary(&api)["healthy"], "2/2");
    assert_eq!(status_writes(&api), 1, "{:?}", writes(&api));
    assert_eq!(label_writes(&api), 1, "{:?}", writes(&api));

    // b turns Unhealthy: the agent's entry says so at once; the summary waits.
    let mut o = nds("2", 1, 0);
    o["status"]["summary"] = summary(&api);
    api.put(NDS, o);
    api.clear_log();
    let first_seen = std::time::Instant::now();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 0, "{:?}", writes(&api));
    // A pod takes a device meanwhile: joins the same write.
    let mut o = nds("3", 1, 1);
    o["status"]["summary"] = summary(&api);
    api.put(NDS, o);
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 0, "{:?}", writes(&api));
    assert_eq!(summary(&api)["healthy"], "2/2");
    // Once due (the controller requeues for then), one write with both.
    tokio::time::sleep(
        delay.saturating_sub(first_seen.elapsed()) + std::time::Duration::from_millis(50),
    )
    .await;
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 1, "{:?}", writes(&api));
    assert_eq!(
        summary(&api),
        json!({"resources": 1, "healthy": "1/2", "allocated": 1})
    );

    // The agent stops being ready: said at once.
    pods.apply_watcher_event(&watcher::Event::Apply(agent_pod(false)));
    api.clear_log();
    node_controller::reconcile(current_nds(&api), ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 1, "{:?}", writes(&api));
    assert_eq!(
        api.get(NDS).unwrap()["status"]["notReporting"][0]["policy"],
        "foo"
    );
}
