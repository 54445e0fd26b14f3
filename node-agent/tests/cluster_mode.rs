//! The agent in cluster mode: it watches its policy through the API server,
//! applies spec changes without restarting, and keeps serving the kubelet
//! when the API server goes away.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use devplug_proto::deviceplugin::v1beta1 as dp;
use serde_json::json;
use support::apiserver::ApiServer;
use support::{Agent, KubeletSim, Node};

const T: Duration = Duration::from_secs(15);
const R: &str = "example.com/live";

async fn env_of(kubelet: &KubeletSim, key: &str) -> Option<String> {
    let mut c = kubelet.client("devplug-live.sock").await;
    let req = dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: vec!["sim-0".into()],
        }],
    };
    let resp = c.allocate(req).await.ok()?.into_inner();
    resp.container_responses[0].envs.get(key).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_its_policy_reloads_and_survives_the_api_server() {
    let node = Node::new();
    let mut kubelet = KubeletSim::start(&node.plugins);
    let api = ApiServer::start(json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": "live", "uid": "u1", "generation": 1},
        "spec": {"resourceName": R, "source": {"simulated": {"count": 2}},
                 "allocate": {"env": {"MODE": "one"}}},
    }))
    .await;
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let _agent = Agent::spawn_cluster(&node, "live", &kubeconfig);
    kubelet.wait_registrations(1, T).await;
    kubelet.wait_list(R, T, |l| l.len() == 2).await;
    assert_eq!(env_of(&kubelet, "MODE").await.as_deref(), Some("one"));

    // A serving change reaches the agent without a restart of the process.
    let changed = Instant::now();
    api.update(|p| {
        p["spec"]["allocate"]["env"]["MODE"] = json!("two");
        p["spec"]["source"]["simulated"]["count"] = json!(3);
        p["metadata"]["generation"] = json!(2);
    });
    let (list, _) = kubelet.wait_list(R, T, |l| l.len() == 3).await;
    assert!(list.iter().all(|d| d.health == "Healthy"));
    let deadline = Instant::now() + T;
    while env_of(&kubelet, "MODE").await.as_deref() != Some("two") {
        assert!(Instant::now() < deadline, "new env never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(10), "spec change took {took:?}");
    let regs = kubelet.registrations().len();

    // Placement-only changes are the operator's business: no plugin restart.
    api.update(|p| p["spec"]["nodeSelector"] = json!({"zone": "a"}));
    // An invalid spec (one that bypassed admission) is refused; the last good one stays.
    api.update(|p| p["spec"]["resourceName"] = json!("kubernetes.io/nope"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(kubelet.registrations().len(), regs, "no re-registration");
    assert_eq!(env_of(&kubelet, "MODE").await.as_deref(), Some("two"));

    // The API server goes away: serving goes on, health still flows.
    api.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.sim_set("live", "sim-1", "Unhealthy");
    kubelet
        .wait_list(R, T, |l| {
            l.iter().any(|d| d.id == "sim-1" && d.health == "Unhealthy")
        })
        .await;
    assert_eq!(env_of(&kubelet, "MODE").await.as_deref(), Some("two"));
}
