//! The agent in cluster mode: it watches its policy through the API server,
//! applies spec changes without restarting, and keeps serving the kubelet
//! when the API server goes away.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use devplug_proto::deviceplugin::v1beta1 as dp;
use serde_json::json;
use support::cluster::Cluster;
use support::podresources::FakePodResources;
use support::{Agent, KubeletSim, Node};

const T: Duration = Duration::from_secs(15);
const R: &str = "example.com/live";

async fn env_of(kubelet: &KubeletSim, policy: &str, key: &str) -> Option<String> {
    let mut c = kubelet.client(&format!("devplug-{policy}.sock")).await;
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
    let api = Cluster::start(
        &node.name,
        json!({
            "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
            "metadata": {"name": "live"},
            "spec": {"resourceName": R, "source": {"simulated": {"count": 2}},
                     "allocate": {"env": {"MODE": "one"}}},
        }),
    )
    .await;
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let _agent = Agent::spawn_cluster(&node, &api.policy, &kubeconfig);
    kubelet.wait_registrations(1, T).await;
    kubelet.wait_list(R, T, |l| l.len() == 2).await;
    assert_eq!(
        env_of(&kubelet, &api.policy, "MODE").await.as_deref(),
        Some("one")
    );

    // A serving change reaches the agent without a restart of the process.
    let changed = Instant::now();
    api.update(|p| {
        p["spec"]["allocate"]["env"]["MODE"] = json!("two");
        p["spec"]["source"]["simulated"]["count"] = json!(3);
    })
    .await;
    let (list, _) = kubelet.wait_list(R, T, |l| l.len() == 3).await;
    assert!(list.iter().all(|d| d.health == "Healthy"));
    let deadline = Instant::now() + T;
    while env_of(&kubelet, &api.policy, "MODE").await.as_deref() != Some("two") {
        assert!(Instant::now() < deadline, "new env never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(10), "spec change took {took:?}");
    let regs = kubelet.registrations().len();

    // Placement-only changes are the operator's business: no plugin restart.
    api.update(|p| p["spec"]["nodeSelector"] = json!({"zone": "a"}))
        .await;
    // An invalid spec never reaches the agent: the API server refuses it.
    let refused = api
        .try_update(|p| p["spec"]["resourceName"] = json!("kubernetes.io/nope"))
        .await
        .unwrap_err();
    assert!(refused.contains("spec.resourceName"), "{refused}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(kubelet.registrations().len(), regs, "no re-registration");
    assert_eq!(
        env_of(&kubelet, &api.policy, "MODE").await.as_deref(),
        Some("two")
    );

    // The API server goes away: serving goes on, health still flows.
    api.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.sim_set(&api.policy, "sim-1", "Unhealthy");
    kubelet
        .wait_list(R, T, |l| {
            l.iter().any(|d| d.id == "sim-1" && d.health == "Unhealthy")
        })
        .await;
    assert_eq!(
        env_of(&kubelet, &api.policy, "MODE").await.as_deref(),
        Some("two")
    );
}

fn shared_policy(replicas: u32) -> serde_json::Value {
    json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": "live"},
        "spec": {"resourceName": R, "source": {"simulated": {"count": 2}},
                 "sharing": {"strategy": "TimeSlicing", "replicas": replicas}},
    })
}

/// A `sharing.replicas` change needs no new registration: the new list goes
/// down the open ListAndWatch stream. Before, the agent stopped the plugin
/// and registered again, and the kubelet saw the resource disconnected
/// (every device Unhealthy) in between. IDs that running containers hold
/// but the new spec no longer advertises are reported, with an Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_change_keeps_the_registration_and_reports_orphans() {
    let node = Node::new();
    let (pods, _pr) = FakePodResources::start(&node.pod_resources_socket());
    let mut kubelet = KubeletSim::start(&node.plugins);
    let api = Cluster::start(&node.name, shared_policy(3)).await;
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let _agent = Agent::spawn_cluster(&node, &api.policy, &kubeconfig);
    kubelet.wait_registrations(1, T).await;
    kubelet.wait_list(R, T, |l| l.len() == 6).await;

    api.update(|p| p["spec"]["sharing"]["replicas"] = json!(6))
        .await;
    kubelet
        .wait_list(R, T, |l| {
            l.len() == 12 && l.iter().all(|d| d.health == "Healthy")
        })
        .await;
    pods.hold("ml", "old", "main", R, &["sim-0::5"]);
    pods.hold("ml", "kept", "main", R, &["sim-1::0"]);
    api.update(|p| p["spec"]["sharing"]["replicas"] = json!(2))
        .await;
    let (list, _) = kubelet
        .wait_list(R, T, |l| {
            l.len() == 4 && l.iter().all(|d| d.health == "Healthy")
        })
        .await;
    assert!(list.iter().any(|d| d.id == "sim-1::0"));
    assert_eq!(kubelet.registrations().len(), 1, "re-registered");
    assert_eq!(kubelet.disconnects(R), 0, "the kubelet saw a disconnect");
    assert_eq!(kubelet.open_streams(), 1);

    // The orphan is in the agent's entry, with its holder, and an Event on
    // the policy names it.
    let deadline = Instant::now() + T;
    loop {
        let entry = api.nds(&node.name).await.and_then(|n| {
            n["status"]["resources"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["resourceName"] == R).cloned())
        });
        if let Some(e) = &entry
            && e["orphaned"]
                == json!([{"id": "sim-0::5", "allocations": [{"namespace": "ml", "pod": "old", "container": "main"}]}])
        {
            assert_eq!(e["allocated"], json!(1), "sim-1 is held by ml/kept");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no orphan in the entry: {entry:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + T;
    loop {
        let events = api.events().await;
        if let Some(ev) = events.iter().find(|e| e["reason"] == "DevicesOrphaned") {
            assert_eq!(ev["type"], "Warning");
            assert_eq!(ev["regarding"]["kind"], "DevicePluginPolicy");
            let p = api.policy_json().await;
            assert_eq!(ev["regarding"]["name"], p["metadata"]["name"]);
            assert_eq!(ev["regarding"]["uid"], p["metadata"]["uid"]);
            let note = ev["note"].as_str().unwrap();
            assert!(note.contains("sim-0::5 (ml/old)"), "{note}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no DevicesOrphaned event: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once the pod ends, the orphan goes from the entry.
    pods.clear();
    pods.hold("ml", "kept", "main", R, &["sim-1::0"]);
    let deadline = Instant::now() + T;
    loop {
        let e = api.nds(&node.name).await.unwrap()["status"]["resources"][0].clone();
        if e.get("orphaned").is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "orphan never cleared: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A spec whose source cannot start keeps the last good spec serving (no
/// withdrawal, no new registration) and is retried on a backoff, without
/// waiting for another change of the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_that_cannot_start_keeps_the_last_good_one_and_is_retried() {
    let node = Node::new();
    let mut kubelet = KubeletSim::start(&node.plugins);
    let api = Cluster::start(&node.name, shared_policy(1)).await;
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let _agent = Agent::spawn_cluster(&node, &api.policy, &kubeconfig);
    kubelet.wait_registrations(1, T).await;
    kubelet.wait_list(R, T, |l| l.len() == 2).await;

    // The simulated source's control directory cannot be created: a file
    // stands where it should be.
    let control = node.sim.join(&api.policy);
    std::fs::remove_dir_all(&control).unwrap();
    std::fs::write(&control, b"in the way").unwrap();
    api.update(|p| p["spec"]["source"]["simulated"]["count"] = json!(3))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let list = kubelet.list(R).unwrap();
    assert_eq!(list.len(), 2, "the last good spec must keep serving");
    assert_eq!(kubelet.registrations().len(), 1);
    assert_eq!(kubelet.disconnects(R), 0);

    // The obstacle goes; the retry serves the new spec on its own.
    std::fs::remove_file(&control).unwrap();
    kubelet.wait_list(R, T, |l| l.len() == 3).await;
    assert_eq!(kubelet.registrations().len(), 1);
    assert_eq!(kubelet.disconnects(R), 0);
}

/// The MODE variable and the host paths mounted for a container given
/// `sim-0`, as the kubelet would get them.
async fn served(kubelet: &KubeletSim, policy: &str) -> Option<(String, Vec<String>)> {
    let mut c = kubelet.client(&format!("devplug-{policy}.sock")).await;
    let req = dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: vec!["sim-0".into()],
        }],
    };
    let resp = c.allocate(req).await.ok()?.into_inner();
    let r = &resp.container_responses[0];
    Some((
        r.envs.get("MODE").cloned().unwrap_or_default(),
        r.mounts.iter().map(|m| m.host_path.clone()).collect(),
    ))
}

/// What was found on the real cluster: a policy edited to mount the host's
/// /etc read-write was served by the agent from its own watch one second
/// later, before the operator judged it. Now the agent serves only the spec
/// the operator approved (`status.approvedSpec`), and checks it against
/// the allow-list it was started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_approved_spec_within_the_allow_list_is_served() {
    let node = Node::new();
    let mut kubelet = KubeletSim::start(&node.plugins);
    let api = Cluster::start(
        &node.name,
        json!({
            "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
            "metadata": {"name": "approved"},
            "spec": {"resourceName": R, "source": {"simulated": {"count": 2}},
                     "allocate": {"env": {"MODE": "one"},
                                  "mounts": [{"hostPath": "/dev/null", "containerPath": "/x", "readOnly": true}]}},
        }),
    )
    .await;
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let _agent = Agent::spawn_cluster_with(
        &node,
        &api.policy,
        &kubeconfig,
        &[
            "--admin-addr",
            "off",
            "--allowed-host-paths=/dev:ro,/sys:ro",
        ],
    );
    kubelet.wait_registrations(1, T).await;
    kubelet.wait_list(R, T, |l| l.len() == 2).await;
    let first = (String::from("one"), vec![String::from("/dev/null")]);
    assert_eq!(served(&kubelet, &api.policy).await, Some(first.clone()));
    let evil = |p: &mut serde_json::Value| {
        p["spec"]["allocate"]["env"]["MODE"] = json!("evil");
        p["spec"]["allocate"]["mounts"] =
            json!([{"hostPath": "/etc", "containerPath": "/host-etc"}]);
    };
    // Not approved (the operator has not judged it, or refused it).
    api.try_update_unapproved(evil).await.unwrap();
    // Nothing to wait for but time: it must not be served within 3 s
    // (the approved path below takes well under one).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(served(&kubelet, &api.policy).await, Some(first.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Approved but outside this agent's allow-list (a status written by
    // hand, or an operator with other lists): not served either.
    api.try_update(evil).await.unwrap();
    let approved = api.policy_json().await;
    assert_eq!(
        approved["status"]["approvedSpec"]["allocate"]["env"]["MODE"],
        "evil"
    );
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(served(&kubelet, &api.policy).await, Some(first.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Approved and allowed: served.
    let changed = Instant::now();
    api.update(|p| {
        p["spec"]["allocate"]["env"]["MODE"] = json!("two");
        p["spec"]["allocate"]["mounts"] =
            json!([{"hostPath": "/sys/class", "containerPath": "/c", "readOnly": true}]);
    })
    .await;
    let deadline = Instant::now() + T;
    loop {
        let got = served(&kubelet, &api.policy).await;
        if got == Some(("two".into(), vec!["/sys/class".into()])) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "approved spec never served: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(3), "approved spec took {took:?}");
}
