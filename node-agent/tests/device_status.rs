//! Device health and allocations from the real agent into NodeDeviceStatus,
//! with a fake PodResources service and the real API server (whose audit
//! log counts the agent's writes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use devplug_proto::deviceplugin::v1beta1 as dp;
use serde_json::{Value, json};
use support::cluster::Cluster;
use support::podresources::FakePodResources;
use support::{Agent, KubeletSim, Node, free_addr, http_get, policy};

const T: Duration = Duration::from_secs(15);
const R: &str = "example.com/gpu";

fn policy_json(extra: Value) -> Value {
    let mut spec = json!({"resourceName": R, "source": {"simulated": {"count": 3}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
           "metadata": {"name": "gpu"}, "spec": spec})
}

async fn entry(api: &Cluster) -> Option<Value> {
    let nds = api.nds(&api.node).await?;
    nds["status"]["resources"]
        .as_array()?
        .iter()
        .find(|e| e["resourceName"] == R)
        .cloned()
}

fn device(e: &Value, id: &str) -> Value {
    e["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn wait_entry(api: &Cluster, what: &str, pred: impl Fn(&Value) -> bool) -> (Value, Instant) {
    let deadline = Instant::now() + T;
    loop {
        if let Some(e) = entry(api).await
            && pred(&e)
        {
            return (e, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last entry {:?}",
            entry(api).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_writes(api: &Cluster) -> usize {
    api.writes()
        .iter()
        .filter(|w| w.path.ends_with("/status"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_allocations_reach_the_api_with_disciplined_writes() {
    let node = Node::new();
    let (pods, _pr) = FakePodResources::start(&node.pod_resources_socket());
    pods.hold("ml", "trainer", "main", R, &["sim-1"]);
    let kubelet = KubeletSim::start(&node.plugins);
    let api = Cluster::start(&node.name, policy_json(json!({}))).await;
    let _agent = Agent::spawn_cluster(&node, &api.policy, &api.kubeconfig(node.tmp.path()));

    // First write: the object did not exist, so the agent created it.
    let (e, _) = wait_entry(&api, "first entry", |e| {
        e["total"] == 3 && e["allocated"] == 1
    })
    .await;
    assert_eq!(e["policy"], api.policy.as_str());
    assert_eq!(e["state"], "Serving");
    assert_eq!(
        device(&e, "sim-1")["allocations"],
        json!([{"namespace": "ml", "pod": "trainer", "container": "main"}])
    );
    assert_eq!(device(&e, "sim-0")["health"], "Healthy");
    // One writer per field: spec.nodeName is the operator's (with the
    // owner reference); the agent that created the object left it out.
    let obj = api.nds(&node.name).await.unwrap();
    assert!(obj["spec"].get("nodeName").is_none(), "{}", obj["spec"]);
    assert!(
        obj["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|m| m["fieldsV1"]["f:spec"].get("f:nodeName").is_none()),
        "no manager but the operator owns spec.nodeName: {}",
        obj["metadata"]["managedFields"]
    );
    let manager = format!("fieldManager=devplug-agent-{}", api.policy);
    for w in api.writes() {
        assert!(w.query.contains(&manager), "{w:?}");
    }

    // Idle, through a full PodResources poll: no write at all.
    let before = api.writes().len();
    tokio::time::sleep(Duration::from_millis(5600)).await;
    assert_eq!(api.writes().len(), before, "steady state must not write");

    // A burst of flips is one write, and arrives well within 2 s.
    let flipped = Instant::now();
    for i in 0..5 {
        node.sim_write(&api.policy, "sim-0", &format!("Unhealthy: burst {i}"));
    }
    let (e, seen) = wait_entry(&api, "burst", |e| device(e, "sim-0")["reason"] == "burst 4").await;
    assert!(
        seen.duration_since(flipped) < Duration::from_secs(2),
        "took {:?}",
        seen.duration_since(flipped)
    );
    assert_eq!(device(&e, "sim-0")["health"], "Unhealthy");
    assert_eq!(e["healthy"], 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Coalesced: one write per 100 ms window. The five flips normally land
    // in one window; on a loaded machine they may straddle two.
    let burst = api.writes().len() - before;
    assert!(
        (1..=2).contains(&burst),
        "a burst of 5 flips made {burst} writes"
    );

    // The API server refuses writes: serving goes on, state is kept.
    api.refuse_writes(true).await;
    node.sim_set(&api.policy, "sim-2", "Unhealthy");
    kubelet
        .wait_list(R, T, |l| {
            l.iter().any(|d| d.id == "sim-2" && d.health == "Unhealthy")
        })
        .await;
    let mut c = kubelet
        .client(&format!("devplug-{}.sock", api.policy))
        .await;
    let ok = c
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["sim-1".into()],
            }],
        })
        .await;
    assert!(ok.is_ok(), "Allocate must not depend on the API server");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        api.writes().len() > before + burst + 1,
        "the agent keeps retrying"
    );
    api.refuse_writes(false).await;
    wait_entry(&api, "catch-up after the outage", |e| {
        device(e, "sim-2")["health"] == "Unhealthy"
    })
    .await;

    // A new allocation shows within 10 s (the PodResources poll).
    let changed = Instant::now();
    pods.hold("web", "cache", "redis", R, &["sim-0"]);
    let (_, seen) = wait_entry(&api, "new allocation", |e| {
        device(e, "sim-0")["allocations"][0]["pod"] == "cache"
    })
    .await;
    assert!(seen.duration_since(changed) < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pod_resources_socket_is_a_reason_not_a_failure() {
    let node = Node::new();
    let _kubelet = KubeletSim::start(&node.plugins);
    let api = Cluster::start(&node.name, policy_json(json!({}))).await;
    let _agent = Agent::spawn_cluster(&node, &api.policy, &api.kubeconfig(node.tmp.path()));
    let (e, _) = wait_entry(&api, "entry with a reason", |e| e["reason"].is_string()).await;
    assert!(
        e["reason"].as_str().unwrap().contains("pod-resources.sock"),
        "{e}"
    );
    assert_eq!(e["total"], 3, "devices are still reported");
    // The socket appears later (kubelet restarted): the reason clears.
    let (pods, _pr) = FakePodResources::start(&node.pod_resources_socket());
    pods.hold("ml", "a", "c", R, &["sim-0"]);
    wait_entry(&api, "reason cleared", |e| {
        e["reason"].is_null() && e["allocated"] == 1
    })
    .await;
    assert!(status_writes(&api) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_health_per_device_and_pod() {
    let node = Node::new();
    let (pods, _pr) = FakePodResources::start(&node.pod_resources_socket());
    pods.hold("ml", "trainer", "main", "example.com/m", &["sim-1"]);
    let mut kubelet = KubeletSim::start(&node.plugins);
    let addr = free_addr();
    let _agent = Agent::spawn_with(
        &node,
        &policy(
            "m",
            "example.com/m",
            "  source:\n    simulated:\n      count: 2\n",
        ),
        &["--admin-addr", &addr],
    );
    kubelet.wait_registrations(1, T).await;
    let mut c = kubelet.client("devplug-m.sock").await;
    c.allocate(dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: vec!["sim-0".into()],
        }],
    })
    .await
    .unwrap();
    node.sim_set("m", "sim-0", "Unhealthy");
    let want = [
        &format!(
            "devplug_device_health{{node=\"{}\",resource=\"example.com/m\",device=\"sim-1\",state=\"Healthy\",namespace=\"ml\",pod=\"trainer\",container=\"main\"}} 1",
            node.name
        ),
        &format!(
            "devplug_device_health{{node=\"{}\",resource=\"example.com/m\",device=\"sim-1\",state=\"Unhealthy\",namespace=\"ml\",pod=\"trainer\",container=\"main\"}} 0",
            node.name
        ),
        &format!(
            "devplug_device_health{{node=\"{}\",resource=\"example.com/m\",device=\"sim-0\",state=\"Unhealthy\",namespace=\"\",pod=\"\",container=\"\"}} 1",
            node.name
        ),
        &format!(
            "devplug_device_health{{node=\"{}\",resource=\"example.com/m\",device=\"sim-0\",state=\"Healthy\",namespace=\"\",pod=\"\",container=\"\"}} 0",
            node.name
        ),
        "devplug_build_info{version=\"",
        "process_resident_memory_bytes ",
        "devplug_allocate_requests_total{resource=\"example.com/m\",result=\"success\"} 1",
        "devplug_registrations_total{resource=\"example.com/m\"} 1",
        "devplug_allocate_duration_seconds_count{resource=\"example.com/m\"} 1",
    ];
    let deadline = Instant::now() + T;
    loop {
        let (code, body) = http_get(&addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        if want.iter().all(|w| body.contains(*w)) {
            assert!(body.trim_end().ends_with("# EOF"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {want:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
