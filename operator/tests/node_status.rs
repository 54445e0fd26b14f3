//! The NodeDeviceStatus controller against the real API server (with the
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
use support::{TestApi, paths, policy_json, seed, synced, unique};

/// The agent pod of `policy` on `node`, created on the server if it is not
/// there yet, its Ready condition set as `ready` (no kubelet runs: the
/// test writes the status), and returned as the operator's store holds it.
async fn agent_pod(api: &TestApi, policy: &str, node: &str, ready: bool) -> AgentPod {
    let path = paths::pod(&format!("devplug-agent-{policy}-abcde"));
    if api.get(&path).await.is_none() {
        api.put(
            &path,
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("devplug-agent-{policy}-abcde"), "namespace": paths::NS,
                             "labels": {"app.kubernetes.io/name": "devplug-agent", "devplug.io/policy": policy}},
                "spec": {"nodeName": node,
                         "containers": [{"name": "agent", "image": "devplug-testenv/none:0"}]}}),
        )
        .await;
    }
    api.patch_status(
        &path,
        json!({"status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}),
    )
    .await;
    let pod: AgentPod = serde_json::from_value(api.get(&path).await.unwrap()).unwrap();
    assert_eq!(pod.ready, ready, "{pod:?}");
    assert_eq!(pod.node.as_deref(), Some(node), "{pod:?}");
    pod
}

async fn current_nds(api: &TestApi, nds: &str) -> Arc<devplug_operator::view::NodeView> {
    Arc::new(serde_json::from_value(api.get(nds).await.unwrap()).unwrap())
}

async fn entry(api: &TestApi, nds: &str) -> Value {
    api.get(nds).await.unwrap()["status"]["resources"][0].clone()
}

fn writes(api: &TestApi) -> Vec<String> {
    api.writes()
        .iter()
        .map(|c| format!("{} {} {}", c.method, c.path, c.query))
        .collect()
}

async fn summary(api: &TestApi, nds: &str) -> Value {
    api.get(nds).await.unwrap()["status"]["summary"].clone()
}

/// An agent (re)writes its entry: the status alone, as agents do.
async fn agent_writes(api: &TestApi, nds: &str, entry: Value) {
    api.patch_status(nds, json!({"status": {"resources": [entry]}}))
        .await;
}

#[tokio::test]
async fn node_status_lifecycle() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let n1_name = unique("n1");
    let n1 = n1_name.as_str();
    let resource = format!("example.com/{foo}");
    let (nds_path, node_path) = (paths::nds(n1), paths::node(n1));
    let (nds, node) = (nds_path.as_str(), node_path.as_str());
    let (client, api) = support::start().await;
    let (policies, mut pw) = seed(
        &api,
        &[policy_json(
            foo,
            &resource,
            json!({"sharing": {"strategy": "TimeSlicing", "replicas": 4}}),
        )],
    )
    .await;
    api.put(
        node,
        json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n1, "labels": {"kubernetes.io/hostname": n1}}}),
    )
    .await;
    let node_uid = api.get(node).await.unwrap()["metadata"]["uid"].clone();
    assert!(node_uid.is_string(), "the server gives the Node a uid");
    api.put(nds, json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": n1}, "spec": {"nodeName": n1},
        "status": {"resources": [{"resourceName": resource, "policy": foo, "state": "Serving",
            "healthy": 2, "total": 2, "allocated": 1,
            "devices": [{"id": "a", "health": "Healthy"},
                        {"id": "b", "health": "Healthy", "allocations": [{"namespace": "ml", "pod": "p", "container": "c"}]}]}]}})).await;
    let (pods_store, mut pods) = synced(vec![agent_pod(&api, foo, n1, true).await]);
    let ctx = Arc::new(
        NodeContext::new(
            client,
            devplug_operator::index::Index::new(
                policies.clone(),
                support::synced(Vec::new()).0,
                pods_store,
                support::synced(Vec::new()).0,
                support::synced(Vec::new()).0,
                support::synced(Vec::new()).0,
                devplug_operator::synced::Synced::all(),
            ),
            Arc::new(Metrics::default()),
            Default::default(),
        )
        .delaying_node_writes_by(std::time::Duration::ZERO),
    );

    // First look: own it, summarise it, label the node.
    let stale = current_nds(&api, nds).await;
    node_controller::reconcile(stale.clone(), ctx.clone())
        .await
        .unwrap();
    assert_eq!(api.writes().len(), 3, "{:?}", writes(&api));
    assert!(api.denied().is_empty(), "{:?}", api.denied());

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
    let got = api.get(nds).await.unwrap();
    assert_eq!(got["metadata"]["ownerReferences"][0]["uid"], node_uid);
    assert_eq!(got["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(got["metadata"]["ownerReferences"][0]["name"], n1);
    assert_eq!(
        got["status"]["summary"],
        json!({"resources": 1, "healthy": "2/2", "allocated": 1, "unhealthy": 0, "notReporting": 0})
    );
    let labels = api.get(node).await.unwrap()["metadata"]["labels"].clone();
    assert_eq!(labels[format!("devplug.io/{foo}.count")], "2");
    assert_eq!(labels[format!("devplug.io/{foo}.sharing")], "TimeSlicing");
    assert_eq!(labels[format!("devplug.io/{foo}.replicas")], "4");
    assert_eq!(
        labels["kubernetes.io/hostname"], n1,
        "other labels untouched"
    );

    // Nothing changed: nothing written.
    api.clear_log();
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert!(api.writes().is_empty(), "{:?}", writes(&api));

    // The agent stops being ready: the operator says so in its own field,
    // under its own field manager; the agent's entry is left as it wrote it.
    let ev = watcher::Event::Apply(agent_pod(&api, foo, n1, false).await);
    pods.apply_watcher_event(&ev);
    ctx.index.agent_pod_event(&ev);
    api.clear_log();
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    let w = writes(&api);
    assert!(
        w.iter().all(|w| !w.contains("fieldManager=devplug-agent")),
        "the operator never writes as an agent: {w:?}"
    );
    assert!(
        w[0].contains(&format!("{nds}/status")) && w[0].contains("fieldManager=devplug-operator"),
        "{w:?}"
    );
    let e = entry(&api, nds).await;
    assert_eq!(e["state"], "Serving", "the agent's entry is untouched: {e}");
    assert!(
        e["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["health"] == "Healthy")
    );
    let nr = &api.get(nds).await.unwrap()["status"]["notReporting"];
    assert_eq!(nr[0]["policy"], foo);
    assert!(
        nr[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("AgentNotReady"),
        "{nr}"
    );
    assert_eq!(
        api.get(nds).await.unwrap()["status"]["summary"]["healthy"],
        "0/2"
    );
    let labels = api.get(node).await.unwrap()["metadata"]["labels"].clone();
    assert!(
        labels.get(format!("devplug.io/{foo}.count")).is_none(),
        "no labels for a resource nobody vouches for: {labels}"
    );
    assert_eq!(
        labels["kubernetes.io/hostname"], n1,
        "other labels untouched"
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    api.clear_log();
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "already not reporting: {:?}",
        writes(&api)
    );

    // Ready again: the operator withdraws its verdict; nothing else to repair.
    let ready_again = agent_pod(&api, foo, n1, true).await;
    let ev = watcher::Event::Apply(ready_again.clone());
    pods.apply_watcher_event(&ev);
    ctx.index.agent_pod_event(&ev);
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    let st = &api.get(nds).await.unwrap()["status"];
    assert!(st.get("notReporting").is_none(), "{st}");
    assert_eq!(st["summary"]["healthy"], "2/2");
    assert_eq!(
        api.get(node).await.unwrap()["metadata"]["labels"][format!("devplug.io/{foo}.count")],
        "2"
    );

    // The pod is gone altogether while the policy still wants the node.
    let pod_path = paths::pod(&ready_again.metadata.name.clone().unwrap());
    api.delete_object(&pod_path).await;
    assert!(api.get(&pod_path).await.is_none(), "the agent pod is gone");
    let ev = watcher::Event::Delete(ready_again);
    pods.apply_watcher_event(&ev);
    ctx.index.agent_pod_event(&ev);
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    let st = &api.get(nds).await.unwrap()["status"];
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
    let p: DevicePluginPolicy = support::current(&api, foo).await;
    pw.apply_watcher_event(&watcher::Event::Delete(p));
    let judged = current_nds(&api, nds).await;
    // An agent writes meanwhile: the stale judgment must not remove anything.
    let mut e = entry(&api, nds).await;
    e["devices"][0]["lastTransitionTime"] = json!("2026-01-01T00:00:00Z");
    agent_writes(&api, nds, e).await;
    let newer = api.get(nds).await.unwrap();
    assert_ne!(
        newer["metadata"]["resourceVersion"].as_str(),
        judged.metadata.resource_version.as_deref(),
        "the agent's write made a new version"
    );
    api.clear_log();
    node_controller::reconcile(judged, ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        api.get(nds).await.unwrap()["status"]["resources"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "an entry must not be removed on a judgment of an older version"
    );
    // The removal was tried, and the server refused it for the version.
    let tried: Vec<u16> = api
        .writes()
        .iter()
        .filter(|c| c.method == http::Method::PATCH && c.path == format!("{nds}/status"))
        .map(|c| c.code)
        .collect();
    assert!(
        matches!(tried.as_slice(), [409 | 422]),
        "one guarded removal, refused: {tried:?}; {:?}",
        writes(&api)
    );
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        api.get(nds).await.unwrap()["status"]["resources"],
        json!([])
    );
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        api.get(nds).await.unwrap()["status"]["summary"]["resources"],
        0
    );
    assert!(
        api.get(nds).await.unwrap()["status"]
            .get("notReporting")
            .is_none()
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());

    // The node is gone: so is its status.
    api.delete_object(node).await;
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert!(api.get(nds).await.is_none());
    assert!(api.denied().is_empty(), "{:?}", api.denied());
}

#[tokio::test]
async fn nothing_is_judged_before_the_stores_are_synced() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let n1_name = unique("n1");
    let n1 = n1_name.as_str();
    let resource = format!("example.com/{foo}");
    let (nds_path, node_path) = (paths::nds(n1), paths::node(n1));
    let (nds, node) = (nds_path.as_str(), node_path.as_str());
    let (client, api) = support::start().await;
    let (policies, _pw) = seed(&api, &[policy_json(foo, &resource, json!({}))]).await;
    api.put(
        node,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n1}}),
    )
    .await;
    api.put(nds, json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": n1}, "spec": {"nodeName": n1},
        "status": {"resources": [{"resourceName": resource, "policy": foo, "state": "Serving",
            "healthy": 1, "total": 1, "allocated": 0, "devices": [{"id": "a", "health": "Healthy"}]}]}})).await;
    let pod = agent_pod(&api, foo, n1, true).await;
    // The agent pod store has not listed yet: an empty store must not read
    // as "no agent runs here". The flags come from the watch streams.
    let synced = devplug_operator::synced::Synced::all();
    synced
        .agent_pods
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (pods_store, _w) = support::synced(Vec::<AgentPod>::new());
    let ctx = Arc::new(NodeContext::new(
        client,
        devplug_operator::index::Index::new(
            policies,
            support::synced(Vec::new()).0,
            pods_store,
            support::synced(Vec::new()).0,
            support::synced(Vec::new()).0,
            support::synced(Vec::new()).0,
            synced.clone(),
        ),
        Arc::new(Metrics::default()),
        Default::default(),
    ));
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "judged from an unsynced store: {:?}",
        writes(&api)
    );
    let st = &api.get(nds).await.unwrap()["status"];
    assert!(st.get("notReporting").is_none(), "{st}");
    assert!(st.get("summary").is_none(), "{st}");

    // The listing arrives through the stream that sets the flag.
    let (pods_store, pods_writer) = kube::runtime::reflector::store::<AgentPod>();
    let events = futures::stream::iter(vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(pod)),
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
            devplug_operator::index::Index::new(
                ctx.index.policies.clone(),
                support::synced(Vec::new()).0,
                pods_store,
                support::synced(Vec::new()).0,
                support::synced(Vec::new()).0,
                support::synced(Vec::new()).0,
                synced,
            ),
            Arc::new(Metrics::default()),
            Default::default(),
        )
        .delaying_node_writes_by(std::time::Duration::ZERO),
    );
    node_controller::reconcile(current_nds(&api, nds).await, ctx)
        .await
        .unwrap();
    let st = &api.get(nds).await.unwrap()["status"];
    assert!(st.get("notReporting").is_none(), "{st}");
    assert_eq!(st["summary"]["healthy"], "1/1");
    assert!(api.denied().is_empty(), "{:?}", api.denied());
}

/// Summary and label changes are written once, a delay after they were
/// first seen, from what the index holds then (a lagging watch delivers
/// every intermediate version; each used to cost a write); an agent that
/// stops reporting is written at once.
#[tokio::test]
async fn summary_and_label_changes_wait_notreporting_does_not() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let n1_name = unique("n1");
    let n1 = n1_name.as_str();
    let resource = format!("example.com/{foo}");
    let (nds_path, node_path) = (paths::nds(n1), paths::node(n1));
    let (nds, node) = (nds_path.as_str(), node_path.as_str());
    let (client, api) = support::start().await;
    let (policies, _pw) = seed(&api, &[policy_json(foo, &resource, json!({}))]).await;
    api.put(
        node,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n1}}),
    )
    .await;
    let node_uid = api.get(node).await.unwrap()["metadata"]["uid"].clone();
    // The agent's entry with `healthy` of 2 devices, `allocated` held.
    let agent_entry = |healthy: u32, allocated: u32| {
        json!({"resourceName": resource, "policy": foo, "state": "Serving",
            "healthy": healthy, "total": 2, "allocated": allocated,
            "devices": [{"id": "a", "health": "Healthy"},
                        {"id": "b", "health": if healthy == 2 { "Healthy" } else { "Unhealthy" }}]})
    };
    api.put(
        nds,
        json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
            "metadata": {"name": n1}, "spec": {"nodeName": n1},
            "status": {"resources": [agent_entry(2, 0)]}}),
    )
    .await;
    let (pods_store, mut pods) = synced(vec![agent_pod(&api, foo, n1, true).await]);
    // Long enough that the steps below that must fall within it do so on a
    // loaded machine (each is a few requests to the API server).
    let delay = std::time::Duration::from_millis(1000);
    let ctx = Arc::new(
        NodeContext::new(
            client,
            devplug_operator::index::Index::new(
                policies,
                support::synced(Vec::new()).0,
                pods_store,
                support::synced(Vec::new()).0,
                support::synced(Vec::new()).0,
                support::synced(Vec::new()).0,
                devplug_operator::synced::Synced::all(),
            ),
            Arc::new(Metrics::default()),
            Default::default(),
        )
        .delaying_node_writes_by(delay),
    );
    let status_path = format!("{nds}/status");
    let status_writes = |api: &TestApi| {
        api.writes()
            .iter()
            .filter(|c| c.path == status_path)
            .count()
    };
    let label_writes = |api: &TestApi| api.writes().iter().filter(|c| c.path == node).count();
    // First look: owned at once; summary and labels wait.
    let first_seen = std::time::Instant::now();
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 0, "{:?}", writes(&api));
    assert_eq!(label_writes(&api), 0, "{:?}", writes(&api));
    assert_eq!(
        api.get(nds).await.unwrap()["metadata"]["ownerReferences"][0]["uid"],
        node_uid
    );
    // The delay passes (the controller requeues for then).
    tokio::time::sleep(
        delay.saturating_sub(first_seen.elapsed()) + std::time::Duration::from_millis(50),
    )
    .await;
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(summary(&api, nds).await["healthy"], "2/2");
    assert_eq!(status_writes(&api), 1, "{:?}", writes(&api));
    assert_eq!(label_writes(&api), 1, "{:?}", writes(&api));

    // b turns Unhealthy: the agent's entry says so at once; the summary waits.
    agent_writes(&api, nds, agent_entry(1, 0)).await;
    api.clear_log();
    let first_seen = std::time::Instant::now();
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 0, "{:?}", writes(&api));
    // A pod takes a device meanwhile: joins the same write.
    agent_writes(&api, nds, agent_entry(1, 1)).await;
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert!(
        first_seen.elapsed() < delay,
        "the steps above took longer than the delay ({:?}); the test cannot judge",
        first_seen.elapsed()
    );
    assert_eq!(status_writes(&api), 0, "{:?}", writes(&api));
    assert_eq!(summary(&api, nds).await["healthy"], "2/2");
    // Once due (the controller requeues for then), one write with both.
    tokio::time::sleep(
        delay.saturating_sub(first_seen.elapsed()) + std::time::Duration::from_millis(50),
    )
    .await;
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 1, "{:?}", writes(&api));
    assert_eq!(
        summary(&api, nds).await,
        json!({"resources": 1, "healthy": "1/2", "allocated": 1, "unhealthy": 1, "notReporting": 0})
    );
    assert_eq!(
        label_writes(&api),
        0,
        "the labels did not change: {:?}",
        writes(&api)
    );

    // The agent stops being ready: said at once.
    let ev = watcher::Event::Apply(agent_pod(&api, foo, n1, false).await);
    pods.apply_watcher_event(&ev);
    ctx.index.agent_pod_event(&ev);
    api.clear_log();
    node_controller::reconcile(current_nds(&api, nds).await, ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&api), 1, "{:?}", writes(&api));
    assert_eq!(
        api.get(nds).await.unwrap()["status"]["notReporting"][0]["policy"],
        foo
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
}
