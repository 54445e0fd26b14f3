//! DRA benchmark: prints figures, asserts nothing about time.
//!
//! `cargo bench -p devplug-agent --bench dra`
//!
//! One cluster-mode agent with a DRA policy (64 simulated devices), an HTTP
//! API server holding the ResourceClaims, and the kubelet's side played by
//! this process over the real Unix sockets. On the driver socket it times:
//! - an empty NodePrepareResources (no claims): the floor of one call;
//! - preparing a claim the agent has prepared before (answered from its
//!   checkpoint, as after every kubelet restart);
//! - preparing a new claim: the ResourceClaim read from the API server, the
//!   device checks, the CDI spec and the checkpoint written.
//!
//! It prints p50/p99 of each and their ratio to the floor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use devplug_proto::dra::v1;
use devplug_proto::pluginregistration as reg;
use serde_json::json;
use support::apiserver::ApiServer;
use support::{Agent, Node, dial};

const DEVICES: usize = 64;
const CALLS: usize = 2000;
const NEW: usize = 500;
const DRIVER: &str = "bench.devplug.io";

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn claim(uid: &str, name: &str, device: usize) -> serde_json::Value {
    json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
           "metadata": {"name": name, "namespace": "ml", "uid": uid, "resourceVersion": "1"},
           "status": {"allocation": {"devices": {"results": [
               {"request": "r", "driver": DRIVER, "pool": "test-node", "device": format!("sim-{device}")}]}}}})
}

fn req(uid: &str, name: &str) -> v1::NodePrepareResourcesRequest {
    v1::NodePrepareResourcesRequest {
        claims: vec![v1::Claim {
            namespace: "ml".into(),
            uid: uid.into(),
            name: name.into(),
        }],
    }
}

fn report(what: &str, v: &mut [Duration], floor: (Duration, Duration)) {
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    println!(
        "{what:<44} p50 {:>9}  p99 {:>9}  ({:.2}x / {:.2}x the empty call)",
        us(p50),
        us(p99),
        p50.as_secs_f64() / floor.0.as_secs_f64(),
        p99.as_secs_f64() / floor.1.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = ApiServer::start(json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": "bench", "uid": "u", "generation": 1},
        "spec": {"resourceName": "bench.example/r", "kubeletApi": "DRA",
                 "source": {"simulated": {"count": DEVICES}}}}))
    .await;
    let kc = api.kubeconfig(node.tmp.path());
    let _agent = Agent::spawn_cluster_with(
        &node,
        "bench",
        &kc,
        &[
            "--admin-addr",
            "off",
            "--kubelet-root",
            root.to_str().unwrap(),
        ],
    );
    let reg_sock = root.join(format!("plugins_registry/{DRIVER}-reg.sock"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reg_sock.exists() {
        assert!(Instant::now() < deadline, "the agent never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut r = reg::registration_client::RegistrationClient::new(dial(&reg_sock).await.unwrap());
    let info = r.get_info(reg::InfoRequest {}).await.unwrap().into_inner();
    r.notify_registration_status(reg::RegistrationStatus {
        plugin_registered: true,
        error: String::new(),
    })
    .await
    .unwrap();
    let mut c = v1::dra_plugin_client::DraPluginClient::new(
        dial(std::path::Path::new(&info.endpoint)).await.unwrap(),
    );
    println!(
        "devplug DRA benchmark: 1 agent, {DEVICES} devices, {CALLS} calls per figure ({NEW} new claims)"
    );

    // Warm up the connection and the agent.
    for _ in 0..200 {
        c.node_prepare_resources(v1::NodePrepareResourcesRequest::default())
            .await
            .unwrap();
    }
    let mut empty = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        c.node_prepare_resources(v1::NodePrepareResourcesRequest::default())
            .await
            .unwrap();
        empty.push(t.elapsed());
    }
    let floor = (pct(&mut empty, 0.5), pct(&mut empty, 0.99));

    api.set_claim("ml", "held", Some(claim("uid-held", "held", 0)));
    let first = c
        .node_prepare_resources(req("uid-held", "held"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.claims["uid-held"].error, "");
    let mut again = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        let r = c
            .node_prepare_resources(req("uid-held", "held"))
            .await
            .unwrap();
        again.push(t.elapsed());
        assert_eq!(r.into_inner().claims["uid-held"].error, "");
    }

    let mut fresh = Vec::with_capacity(NEW);
    for i in 0..NEW {
        let (uid, name) = (format!("uid-{i}"), format!("c-{i}"));
        api.set_claim("ml", &name, Some(claim(&uid, &name, 1 + i % (DEVICES - 1))));
        let t = Instant::now();
        let r = c.node_prepare_resources(req(&uid, &name)).await.unwrap();
        fresh.push(t.elapsed());
        assert_eq!(r.into_inner().claims[&uid].error, "");
        c.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![v1::Claim {
                namespace: "ml".into(),
                uid: uid.clone(),
                name: name.clone(),
            }],
        })
        .await
        .unwrap();
    }

    println!(
        "{:<44} p50 {:>9}  p99 {:>9}",
        "NodePrepareResources, no claims (floor)",
        us(floor.0),
        us(floor.1)
    );
    report(
        "NodePrepareResources, claim prepared before",
        &mut again,
        floor,
    );
    report(
        "NodePrepareResources, new claim (API read, CDI)",
        &mut fresh,
        floor,
    );
}
