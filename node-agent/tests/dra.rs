//! The real agent binary with a DRA policy (`kubeletApi: DRA`), against a
//! simulated kubelet plugin watcher (registration socket, DRAPlugin v1 and
//! v1beta1, DRAResourceHealth) and the real kube-apiserver of
//! `devplug-testenv` holding ResourceSlices and ResourceClaims (the agent
//! talks to it with its real bound token, judged by the chart's RBAC and
//! admission policy).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devplug_agent::dra::names::slice_name;
use devplug_proto::dra::{v1, v1beta1};
use devplug_proto::drahealth::v1alpha1 as health;
use devplug_proto::pluginregistration as reg;
use devplug_testenv::unique;
use serde_json::{Value, json};
use support::cluster::Cluster;
use support::{Agent, Node, dial};

const T: Duration = Duration::from_secs(15);
const TAINT: &str = "devplug.io/unhealthy";

fn policy_json() -> Value {
    policy_of(3)
}

fn policy_of(count: u32) -> Value {
    json!({"apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
           "metadata": {"name": "gpu"},
           "spec": {"resourceName": "example.com/gpu", "kubeletApi": "DRA",
                    "source": {"simulated": {"count": count}},
                    "allocate": {"env": {"GREETING": "hello"}},
                    "health": {"settleSeconds": 1}}})
}

/// The policy's DRA driver (`<policy>.devplug.io`).
fn driver(api: &Cluster) -> String {
    devplug_api::dra_driver_name(&api.policy)
}

/// The policy's DeviceClass, as the operator makes it (every device of the
/// driver): what the claims' requests name. Returns its name.
async fn device_class(api: &Cluster) -> String {
    let name = devplug_api::dra_device_class_name(&api.policy);
    devplug_testenv::apply_value(
        &api.admin(),
        &json!({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                "metadata": {"name": name},
                "spec": {"selectors": [{"cel": {"expression": format!("device.driver == {:?}", driver(api))}}]}}),
    )
    .await
    .unwrap();
    name
}

fn c1(namespace: &str, uid: &str, name: &str) -> v1::Claim {
    v1::Claim {
        namespace: namespace.into(),
        uid: uid.into(),
        name: name.into(),
    }
}

async fn wait_file(path: &Path) {
    let deadline = Instant::now() + T;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn(node: &Node, api: &Cluster, root: &Path) -> Agent {
    spawn_env(node, api, root, &[])
}

/// [`spawn`], set to abort at the failpoint `point` (`DEVPLUG_FAILPOINT`).
fn spawn_failing(node: &Node, api: &Cluster, root: &Path, point: &str) -> Agent {
    spawn_env(node, api, root, &[("DEVPLUG_FAILPOINT", point)])
}

fn spawn_env(node: &Node, api: &Cluster, root: &Path, envs: &[(&str, &str)]) -> Agent {
    let kc = api.kubeconfig(node.tmp.path());
    Agent::spawn_cluster_env(
        node,
        &api.policy,
        &kc,
        &[
            "--admin-addr",
            "off",
            "--kubelet-root",
            root.to_str().unwrap(),
        ],
        envs,
    )
}

/// A client of the driver socket under `root`.
async fn driver_client(
    root: &Path,
    driver: &str,
) -> v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
    v1::dra_plugin_client::DraPluginClient::new(dial(&endpoint(root, driver)).await.unwrap())
}

fn registration(root: &Path, driver: &str) -> PathBuf {
    root.join(format!("plugins_registry/{driver}-reg.sock"))
}

/// Does what the kubelet's plugin watcher does: GetInfo, then says
/// "registered". Returns the info.
async fn register(root: &Path, driver: &str) -> reg::PluginInfo {
    let sock = registration(root, driver);
    wait_file(&sock).await;
    // The file can be a socket left by an agent that was stopped, until the
    // new one replaces it: dial until someone answers, as the kubelet's
    // plugin watcher retries.
    let deadline = Instant::now() + T;
    let channel = loop {
        match dial(&sock).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "{}: {e}", sock.display());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut c = reg::registration_client::RegistrationClient::new(channel);
    let info = c.get_info(reg::InfoRequest {}).await.unwrap().into_inner();
    c.notify_registration_status(reg::RegistrationStatus {
        plugin_registered: true,
        error: String::new(),
    })
    .await
    .unwrap();
    info
}

/// Waits until this node's ResourceSlices (by name) satisfy `pred`.
async fn wait_slices(api: &Cluster, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let all: Vec<Value> = api.slices().await.into_values().collect();
        if pred(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "{what}: slices {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint(root: &Path, driver: &str) -> PathBuf {
    root.join(format!("plugins/{driver}/dra.sock"))
}

fn device_names(slice: &Value) -> Vec<&str> {
    slice["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect()
}

/// The agent's writes the API server refused (RBAC, admission, validation).
/// Not counted: the 404 of the first NodeDeviceStatus status write on a
/// node where the object does not exist yet (the agent then creates it).
fn refused_writes(api: &Cluster) -> Vec<devplug_testenv::Audited> {
    api.writes()
        .into_iter()
        .filter(|w| w.code >= 400)
        .filter(|w| {
            !(w.code == 404
                && w.path.contains("/nodedevicestatuses/")
                && w.path.ends_with("/status"))
        })
        .collect()
}

/// The devices of `slices` that carry the unhealthy taint.
fn tainted_devices(slices: &[Value]) -> Vec<String> {
    slices
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().unwrap().iter())
        .filter(|d| {
            d.get("taints")
                .and_then(Value::as_array)
                .is_some_and(|t| t.iter().any(|t| t["key"] == TAINT))
        })
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dra_policy_registers_publishes_and_prepares_claims_across_restarts() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let class = device_class(&api).await;
    let ns = unique("ml");
    let mut agent = spawn(&node, &api, &root);

    let info = register(&root, &driver).await;
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, driver);
    assert_eq!(Path::new(&info.endpoint), endpoint(&root, &driver));
    for v in [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1alpha1.DRAResourceHealth",
    ] {
        assert!(info.supported_versions.iter().any(|s| s == v), "{info:?}");
    }

    // The node's pool: one slice, every device with its ID.
    let slices = wait_slices(&api, "pool published", |s| s.len() == 1).await;
    assert_eq!(
        slices[0]["metadata"]["name"],
        slice_name(&node.name, &driver, 0).as_str()
    );
    let spec = &slices[0]["spec"];
    assert_eq!(spec["driver"], driver.as_str());
    assert_eq!(spec["nodeName"], node.name.as_str());
    assert_eq!(spec["pool"]["name"], node.name.as_str());
    assert_eq!(spec["pool"]["resourceSliceCount"], 1);
    assert_eq!(device_names(&slices[0]), ["sim-0", "sim-1", "sim-2"]);
    assert_eq!(
        spec["devices"][1]["attributes"]["id"],
        json!({"string": "sim-1"})
    );

    // Someone deletes the slice (the kubelet does when it restarts): the
    // agent publishes its pool again (a new object, the same devices).
    let name = slices[0]["metadata"]["name"].as_str().unwrap().to_string();
    let old_uid = slices[0]["metadata"]["uid"].clone();
    api.delete_slice(&name).await;
    let again = wait_slices(&api, "pool published again after a deletion", |s| {
        s.len() == 1 && s[0]["metadata"]["uid"] != old_uid
    })
    .await;
    assert_eq!(again[0]["metadata"]["name"], name.as_str());
    assert_eq!(device_names(&again[0]), ["sim-0", "sim-1", "sim-2"]);

    // Prepare: the CDI spec of the claim, its name in the answer.
    let uid1 = api
        .allocated_claim(
            &ns,
            "c",
            &[("gpu", &class)],
            &[("gpu", &driver, &node.name, "sim-1")],
        )
        .await;
    let mut dra = driver_client(&root, &driver).await;
    let r = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![c1(&ns, &uid1, "c")],
        })
        .await
        .unwrap()
        .into_inner();
    let got = &r.claims[&uid1];
    assert_eq!(got.error, "");
    assert_eq!(got.devices.len(), 1);
    assert_eq!(got.devices[0].pool_name, node.name);
    assert_eq!(got.devices[0].device_name, "sim-1");
    assert_eq!(got.devices[0].request_names, ["gpu"]);
    assert_eq!(
        got.devices[0].cdi_device_ids,
        [format!("example.com/gpu=sim-1-gpu-{uid1}")]
    );
    let spec_file = node
        .cdi()
        .join(format!("devplug-claim-{driver}-{uid1}.json"));
    let cdi: Value = serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
    assert_eq!(cdi["kind"], "example.com/gpu");
    assert_eq!(cdi["devices"][0]["name"], format!("sim-1-gpu-{uid1}"));
    let env = cdi["devices"][0]["containerEdits"]["env"].to_string();
    assert!(env.contains("sim-1"), "{env}");
    assert!(
        cdi["containerEdits"]["env"]
            .to_string()
            .contains("GREETING=hello")
    );

    // Bad claims are refused one by one, with the reason; a good one in the
    // same call is still prepared.
    let uid2 = api
        .allocated_claim(
            &ns,
            "other-pool",
            &[("gpu", &class)],
            &[("gpu", &driver, "elsewhere", "sim-0")],
        )
        .await;
    let uid3 = api
        .allocated_claim(
            &ns,
            "unknown",
            &[("gpu", &class)],
            &[("gpu", &driver, &node.name, "sim-9")],
        )
        .await;
    let uid4 = api
        .unallocated_claim(&ns, "unallocated", &[("gpu", &class)])
        .await;
    // No claim of that name exists: the uid is the kubelet's word only.
    let uid5 = "9f0c7c3e-0000-4000-8000-000000000005".to_string();
    let uid6 = api
        .allocated_claim(
            &ns,
            "good",
            &[("a", &class), ("b", &class)],
            &[
                ("a", &driver, &node.name, "sim-0"),
                ("b", &driver, &node.name, "sim-2"),
            ],
        )
        .await;
    // The kubelet asks for "good" with the uid of a claim of that name that
    // was deleted and created again meanwhile.
    let wrong_uid = "9f0c7c3e-0000-4000-8000-00000000000f".to_string();
    let r = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![
                c1(&ns, &uid2, "other-pool"),
                c1(&ns, &uid3, "unknown"),
                c1(&ns, &uid4, "unallocated"),
                c1(&ns, &uid5, "missing"),
                c1(&ns, &wrong_uid, "good"),
                c1(&ns, &uid6, "good"),
                v1::Claim::default(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let err = |uid: &str| r.claims[uid].error.clone();
    assert!(err(&uid2).contains("pool elsewhere"), "{}", err(&uid2));
    assert!(
        err(&uid3).contains("sim-9 is not on this node"),
        "{}",
        err(&uid3)
    );
    assert!(err(&uid4).contains("not allocated"), "{}", err(&uid4));
    assert!(
        err(&uid5).contains(&format!("cannot read ResourceClaim {ns}/missing")),
        "{}",
        err(&uid5)
    );
    assert!(err(&wrong_uid).contains("replaced"), "{}", err(&wrong_uid));
    assert!(
        err("").contains("needs namespace, uid and name"),
        "{}",
        err("")
    );
    assert_eq!(err(&uid6), "");
    assert_eq!(r.claims[&uid6].devices.len(), 2);
    let ids: Vec<_> = r.claims[&uid6]
        .devices
        .iter()
        .map(|d| d.cdi_device_ids.clone())
        .collect();
    assert_eq!(
        ids,
        [
            vec![format!("example.com/gpu=sim-0-a-{uid6}")],
            vec![format!("example.com/gpu=sim-2-b-{uid6}")]
        ]
    );
    for bad in [&uid2, &uid3, &uid4, &uid5, &wrong_uid] {
        assert!(
            !node
                .cdi()
                .join(format!("devplug-claim-{driver}-{bad}.json"))
                .exists()
        );
    }

    // The agent restarts; the claim is gone from the API server: the
    // checkpoint answers, and a CDI file lost meanwhile is written again.
    assert!(agent.terminate().success());
    api.delete_claim(&ns, "c").await;
    assert!(
        devplug_testenv::get_json(
            &api.admin(),
            &format!("/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims/c")
        )
        .await
        .is_none(),
        "claim {ns}/c deleted"
    );
    std::fs::remove_file(&spec_file).unwrap();
    let reads = api.claim_reads();
    assert!(reads >= 6, "the agent read the claims it prepared: {reads}");
    let mut agent = spawn(&node, &api, &root);
    register(&root, &driver).await;
    let mut dra = driver_client(&root, &driver).await;
    let again = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![c1(&ns, &uid1, "c")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.claims[&uid1], *got);
    assert_eq!(api.claim_reads(), reads, "answered from the checkpoint");
    assert!(spec_file.exists(), "lost CDI spec written again");

    // Unprepare through v1beta1 removes what prepare made; twice is fine.
    let mut beta = v1beta1::dra_plugin_client::DraPluginClient::new(
        dial(&endpoint(&root, &driver)).await.unwrap(),
    );
    for _ in 0..2 {
        let u = beta
            .node_unprepare_resources(v1beta1::NodeUnprepareResourcesRequest {
                claims: vec![v1beta1::Claim {
                    namespace: ns.clone(),
                    uid: uid1.clone(),
                    name: "c".into(),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.claims[&uid1].error, "");
        assert!(!spec_file.exists());
    }
    let cp: Value = serde_json::from_slice(
        &std::fs::read(root.join(format!("plugins/{driver}/claims.json"))).unwrap(),
    )
    .unwrap();
    assert!(cp["claims"].get(&uid1).is_none(), "{cp}");
    assert!(cp["claims"].get(&uid6).is_some(), "{cp}");

    // Stopping deregisters: the registration socket goes.
    assert!(agent.terminate().success());
    assert!(!registration(&root, &driver).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_health_streams_to_the_kubelet_and_taints_the_slice() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let mut agent = spawn(&node, &api, &root);
    register(&root, &driver).await;
    let mut h = health::dra_resource_health_client::DraResourceHealthClient::new(
        dial(&endpoint(&root, &driver)).await.unwrap(),
    );
    let mut stream = h
        .node_watch_resources(health::NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.devices.len(), 3);
    assert!(
        first
            .devices
            .iter()
            .all(|d| d.health == health::HealthStatus::Healthy as i32)
    );
    assert_eq!(
        first.devices[0].device.as_ref().unwrap().pool_name,
        node.name
    );
    // The pool as published before the flip: nothing tainted.
    let before = wait_slices(&api, "pool published", |s| s.len() == 1).await;
    assert!(tainted_devices(&before).is_empty(), "{before:?}");
    let generation = before[0]["spec"]["pool"]["generation"].as_i64().unwrap();

    node.sim_set(&api.policy, "sim-0", "Unhealthy");
    let deadline = Instant::now() + T;
    let bad = loop {
        let m = tokio::time::timeout(T, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let d = m
            .devices
            .iter()
            .find(|d| d.device.as_ref().unwrap().device_name == "sim-0")
            .unwrap()
            .clone();
        if d.health == health::HealthStatus::Unhealthy as i32 {
            break d;
        }
        assert!(Instant::now() < deadline, "never unhealthy");
    };
    assert!(bad.message.contains("test flip"), "{bad:?}");
    assert!(bad.health_check_timeout_seconds > 0);
    let tainted = wait_slices(&api, "unhealthy device tainted", |s| {
        s.len() == 1 && tainted_devices(s) == ["sim-0"]
    })
    .await;
    let taint = &tainted[0]["spec"]["devices"][0]["taints"][0];
    assert_eq!(taint["key"], TAINT);
    assert_eq!(taint["effect"], "NoSchedule");
    let tainted_generation = tainted[0]["spec"]["pool"]["generation"].as_i64().unwrap();
    assert!(tainted_generation > generation, "{tainted:?}");

    node.sim_set(&api.policy, "sim-0", "Healthy");
    let healed = wait_slices(&api, "taint removed on recovery", |s| {
        s.len() == 1
            && s[0]["spec"]["devices"][0].get("taints").is_none()
            && tainted_devices(s).is_empty()
    })
    .await;
    assert!(healed[0]["spec"]["pool"]["generation"].as_i64().unwrap() > tainted_generation);
    assert_eq!(device_names(&healed[0]), ["sim-0", "sim-1", "sim-2"]);
    let refused = refused_writes(&api);
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(agent.terminate().success());
}

/// A pool larger than one slice, run by the real agent binary: 300
/// simulated devices are published complete (slices of at most 64 devices,
/// one generation, `resourceSliceCount` saying how many), an unhealthy
/// device's taint reaches its slice (the real API server takes a tainted
/// slice of at most 64 devices only), and goes again when it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_device_pool_is_published_whole_and_one_taint_comes_and_goes() {
    const N: usize = 300;
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = Cluster::start(&node.name, policy_of(N as u32)).await;
    let driver = driver(&api);
    let mut agent = spawn(&node, &api, &root);
    register(&root, &driver).await;

    // The pool at one generation, complete: every slice of that generation,
    // as many as it says, named as the agent numbers them, at most 64
    // devices each, every device once. Gives that generation.
    let names: Vec<String> = (0..N.div_ceil(64))
        .map(|i| slice_name(&node.name, &driver, i))
        .collect();
    let complete = |s: &[Value]| -> Option<i64> {
        let g = s.first()?["spec"]["pool"]["generation"].as_i64()?;
        let whole = s.len() == names.len()
            && s.iter().zip(&names).all(|(one, n)| {
                one["metadata"]["name"] == n.as_str()
                    && one["spec"]["driver"] == driver.as_str()
                    && one["spec"]["pool"]["name"] == node.name.as_str()
                    && one["spec"]["pool"]["generation"] == g
                    && one["spec"]["pool"]["resourceSliceCount"] == s.len()
                    && one["spec"]["devices"].as_array().unwrap().len() <= 64
            });
        let devices: BTreeSet<&str> = s.iter().flat_map(device_names).collect();
        let count: usize = s.iter().map(|s| device_names(s).len()).sum();
        let all = devices.len() == N
            && count == N
            && (0..N).all(|i| devices.contains(format!("sim-{i}").as_str()));
        (whole && all).then_some(g)
    };
    // The slices by name sort as the agent numbers them only below ten.
    assert!(names.len() < 10);
    let published = wait_slices(&api, "300-device pool published", |s| complete(s).is_some()).await;
    assert_eq!(published.len(), 5, "{names:?}");
    let g0 = complete(&published).unwrap();
    assert!(tainted_devices(&published).is_empty());

    node.sim_set(&api.policy, "sim-7", "Unhealthy");
    let tainted = wait_slices(&api, "sim-7 tainted in the 300-device pool", |s| {
        complete(s).is_some_and(|g| g > g0) && tainted_devices(s) == ["sim-7"]
    })
    .await;
    let g1 = complete(&tainted).unwrap();
    let carrier = tainted
        .iter()
        .find(|s| device_names(s).contains(&"sim-7"))
        .unwrap();
    let d = carrier["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "sim-7")
        .unwrap();
    let taints = d["taints"].as_array().unwrap();
    assert_eq!(taints.len(), 1, "{d}");
    assert_eq!(taints[0]["key"], TAINT, "{d}");
    assert_eq!(taints[0]["effect"], "NoSchedule", "{d}");

    node.sim_set(&api.policy, "sim-7", "Healthy");
    wait_slices(&api, "sim-7's taint removed", |s| {
        complete(s).is_some_and(|g| g > g1) && tainted_devices(s).is_empty()
    })
    .await;
    // The real API server took every write the agent made.
    let refused = refused_writes(&api);
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(
        api.writes()
            .iter()
            .any(|w| w.verb == "patch" && w.path.contains("/resourceslices/")),
        "the agent's slice writes are in the audit log"
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_claim_checkpoint_is_moved_aside_and_reported() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let dir = root.join(format!("plugins/{driver}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("claims.json"), b"{not json").unwrap();
    let mut agent = spawn(&node, &api, &root);
    register(&root, &driver).await;
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("claims.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let deadline = Instant::now() + T;
    let event = loop {
        let events = api.events().await;
        if let Some(e) = events
            .iter()
            .find(|e| e["reason"] == "CheckpointQuarantined")
        {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no event: {events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["type"], "Warning", "{event}");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains(&node.name), "{event}");
    assert!(note.contains(&aside[0]), "{event}");
    assert!(agent.terminate().success());
}

/// Frames of one HTTP/2 connection, read raw.
async fn read_frame(s: &mut tokio::net::UnixStream) -> (u8, u8, u32, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 9];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .unwrap()
        .unwrap();
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    (h[3], h[4], stream, p)
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let l = (payload.len() as u32).to_be_bytes();
    let mut f = vec![l[1], l[2], l[3], kind, flags];
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn plain(s: &[u8]) -> Vec<u8> {
    assert!(s.len() < 127);
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s);
    v
}

/// The kubelet's plugin watcher dials the registration socket with the
/// socket path as its gRPC target, so its requests carry the path as
/// `:authority`. Found on the real kubelet 1.36: the agent's HTTP/2 stack
/// reset such requests (PROTOCOL_ERROR) and the driver never registered.
/// This client sends exactly that shape, byte by byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_watchers_request_with_the_socket_path_as_authority_is_answered() {
    use tokio::io::AsyncWriteExt;
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let mut agent = spawn(&node, &api, &root);
    let sock = registration(&root, &driver);
    wait_file(&sock).await;
    for method in ["GetInfo", "GetInfo"] {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        let mut block = vec![0x83, 0x86, 0x41];
        block.extend(plain(sock.to_str().unwrap().as_bytes()));
        block.push(0x44);
        block.extend(plain(
            format!("/pluginregistration.Registration/{method}").as_bytes(),
        ));
        block.push(0x5f);
        block.extend(plain(b"application/grpc"));
        block.push(0x40);
        block.extend(plain(b"te"));
        block.extend(plain(b"trailers"));
        out.extend(frame(0x1, 0x4, 1, &block));
        out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
        s.write_all(&out).await.unwrap();
        let mut data = Vec::new();
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut s).await;
            match kind {
                0x4 if flags & 1 == 0 => s.write_all(&frame(0x4, 1, 0, &[])).await.unwrap(),
                0x3 => panic!(
                    "stream {stream} reset by the agent, error code {:?}",
                    payload
                ),
                0x7 => panic!("connection closed by the agent (GOAWAY {payload:?})"),
                0x0 if stream == 1 => {
                    data.extend(payload);
                    if data.windows(driver.len()).any(|w| w == driver.as_bytes()) {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    assert!(agent.terminate().success());
}

/// The prepare path in-process, with the agent's identity behind a
/// recorder: one claim whose ResourceClaim read hangs (the API server does
/// not answer it) stalls no other claim, and two calls for one claim make
/// one read. Before, one lock was held across the read, so every prepare
/// on the node waited for the slow one (up to its 10 s timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_claim_read_stalls_no_other_claim() {
    let node = Node::new();
    let api = Cluster::start(&node.name, policy_of(4)).await;
    let class = device_class(&api).await;
    let driver = driver(&api);
    let ns = unique("slow");
    let mut uids = Vec::new();
    for (name, dev) in [("slow", "sim-0"), ("quick", "sim-1")] {
        uids.push(
            api.allocated_claim(
                &ns,
                name,
                &[("gpu", &class)],
                &[("gpu", &driver, &node.name, dev)],
            )
            .await,
        );
    }
    let (state, rec) = in_process(&api, &node, 4).await;

    // The read of "slow" gets no answer until released.
    rec.hold(http::Method::GET, "/resourceclaims/slow");
    let slow = {
        let s = state.clone();
        let c = c1(&ns, &uids[0], "slow");
        tokio::spawn(async move { s.prepare_one(&c).await })
    };
    let again = {
        let s = state.clone();
        let c = c1(&ns, &uids[0], "slow");
        tokio::spawn(async move { s.prepare_one(&c).await })
    };
    let deadline = Instant::now() + T;
    while !rec
        .log()
        .iter()
        .any(|c| c.path.ends_with("/resourceclaims/slow"))
    {
        assert!(Instant::now() < deadline, "the slow read was never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let quick = tokio::time::timeout(
        Duration::from_secs(3),
        state.prepare_one(&c1(&ns, &uids[1], "quick")),
    )
    .await
    .expect("a claim waited for another claim's slow read")
    .unwrap();
    assert_eq!(quick[0].device_name, "sim-1");
    assert!(!slow.is_finished(), "the slow read was answered early");

    rec.release();
    let got = slow.await.unwrap().unwrap();
    assert_eq!(got[0].device_name, "sim-0");
    assert_eq!(
        again.await.unwrap().unwrap(),
        got,
        "the second call answers the same"
    );
    let reads = rec
        .log()
        .iter()
        .filter(|c| c.path.ends_with("/resourceclaims/slow"))
        .count();
    assert_eq!(reads, 1, "two calls for one claim, one read");
    assert!(state.claim_locks.is_empty(), "no lock left behind");
    let cp = devplug_agent::dra::server::prepared(&state).await;
    assert_eq!(cp.len(), 2);
}

/// The agent's DRA state in this process for `api`'s policy on `node`,
/// with `devices` healthy simulated devices, reading claims as the agent
/// (its token) behind a recorder.
async fn in_process(
    api: &Cluster,
    node: &Node,
    devices: usize,
) -> (
    std::sync::Arc<devplug_agent::dra::server::DraState>,
    devplug_testenv::Recorder,
) {
    let mut snap = devplug_agent::devices::inventory::Snapshot {
        replicas: 1,
        version: 1,
        ..Default::default()
    };
    for i in 0..devices {
        let id = format!("sim-{i}");
        snap.devices.insert(
            id.clone(),
            devplug_agent::devices::inventory::DeviceState {
                device: devplug_agent::devices::device::Device {
                    capacity: Default::default(),
                    partitioning: Default::default(),
                    id,
                    numa_node: None,
                    nodes: vec![],
                    health: devplug_agent::devices::health::Health::Healthy,
                    links: vec![],
                    attributes: Default::default(),
                },
                health: devplug_agent::devices::health::Health::Healthy,
                last_transition: std::time::SystemTime::UNIX_EPOCH,
            },
        );
    }
    in_process_with(api, node, snap, None).await
}

/// Same, with the devices of `snap` and a partitioner.
async fn in_process_with(
    api: &Cluster,
    node: &Node,
    snap: devplug_agent::devices::inventory::Snapshot,
    partitioner: Option<std::sync::Arc<dyn devplug_agent::devices::sources::Partitioner>>,
) -> (
    std::sync::Arc<devplug_agent::dra::server::DraState>,
    devplug_testenv::Recorder,
) {
    use devplug_agent::dra::server::DraState;
    use devplug_agent::plugin::{PluginState, Streams};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let driver = driver(api);
    let policy: devplug_api::DevicePluginPolicy =
        serde_json::from_value(api.policy_json().await).unwrap();
    let cfg = Arc::new(devplug_agent::config::PluginConfig::from_policy(&policy));
    let (_cfg_tx, cfg_rx) = tokio::sync::watch::channel(cfg.clone());
    let (_snap_tx, snap_rx) = tokio::sync::watch::channel(Arc::new(snap));
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (_alloc_tx, alloc_rx) = tokio::sync::watch::channel(Default::default());
    let plugin = Arc::new(PluginState {
        cfg: cfg_rx,
        snapshots: snap_rx,
        streams: Arc::new(Streams::default()),
        registered: AtomicBool::new(true),
        registrations: AtomicU64::new(1),
        shutdown: stop_rx,
        allocations: alloc_rx,
        kick: Arc::new(tokio::sync::Notify::new()),
        metrics: Arc::default(),
        writes: Arc::default(),
    });
    let paths = devplug_agent::dra::names::Paths::new(&node.tmp.path().join("kubelet"), &driver);
    std::fs::create_dir_all(&paths.dir).unwrap();
    let (client, rec) = api.agent_client_recorded();
    let state = Arc::new(DraState {
        plugin,
        node: node.name.clone(),
        paths,
        cdi_dir: node.cdi(),
        client: Some(client),
        reader: None,
        checkpoint: Default::default(),
        saved: Default::default(),
        save_failing: Default::default(),
        flush: Default::default(),
        claims_changed: Default::default(),
        reads: tokio::sync::Semaphore::new(devplug_agent::dra::server::READS_AT_ONCE),
        claim_locks: Default::default(),
        partitioner,
    });

    (state, rec)
}

/// One claim, two requests served by two DRA policies on one node: each
/// driver writes its own CDI spec for the claim, and unpreparing one leaves
/// the other's. Before, both were named by the claim's UID alone: the
/// second prepare overwrote the first's spec, and the first unprepare
/// deleted the second's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_of_one_claim_keep_their_own_cdi_specs() {
    let node = Node::new();
    let mut pa = policy_of(2);
    pa["spec"]["resourceName"] = json!("example.com/gpu-a");
    let mut pb = policy_of(2);
    pb["spec"]["resourceName"] = json!("example.com/gpu-b");
    let a = Cluster::start(&node.name, pa).await;
    let b = Cluster::start(&node.name, pb).await;
    let (class_a, class_b) = (device_class(&a).await, device_class(&b).await);
    let (driver_a, driver_b) = (driver(&a), driver(&b));
    let ns = unique("two");
    let uid = a
        .allocated_claim(
            &ns,
            "both",
            &[("a", &class_a), ("b", &class_b)],
            &[
                ("a", &driver_a, &node.name, "sim-0"),
                ("b", &driver_b, &node.name, "sim-0"),
            ],
        )
        .await;
    let (sa, _) = in_process(&a, &node, 2).await;
    let (sb, _) = in_process(&b, &node, 2).await;
    let claim = c1(&ns, &uid, "both");
    let got_a = sa.prepare_one(&claim).await.unwrap();
    let got_b = sb.prepare_one(&claim).await.unwrap();
    assert_eq!(got_a[0].request_names, ["a"]);
    assert_eq!(got_b[0].request_names, ["b"]);
    // The claims' CDI specs on the node, by kind.
    let kinds = || -> Vec<String> {
        let mut k: Vec<String> = std::fs::read_dir(node.cdi())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("devplug-claim-")
            })
            .map(|e| {
                let v: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
                v["kind"].as_str().unwrap().to_string()
            })
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        kinds(),
        ["example.com/gpu-a", "example.com/gpu-b"],
        "one spec per driver"
    );
    sa.unprepare_one(&claim).await.unwrap();
    assert_eq!(
        kinds(),
        ["example.com/gpu-b"],
        "a's unprepare left b's spec"
    );
    sb.unprepare_one(&claim).await.unwrap();
    assert!(kinds().is_empty());

    // Named by driver and claim.
    sa.prepare_one(&claim).await.unwrap();
    sb.prepare_one(&claim).await.unwrap();
    let file_a = node
        .cdi()
        .join(format!("devplug-claim-{driver_a}-{uid}.json"));
    let file_b = node
        .cdi()
        .join(format!("devplug-claim-{driver_b}-{uid}.json"));
    let kind = |f: &Path| -> Value {
        serde_json::from_slice::<Value>(&std::fs::read(f).unwrap()).unwrap()["kind"].clone()
    };
    assert_eq!(kind(&file_a), "example.com/gpu-a");
    assert_eq!(kind(&file_b), "example.com/gpu-b");
    sa.unprepare_one(&claim).await.unwrap();
    assert!(!file_a.exists(), "a's spec removed with a's unprepare");
    assert!(file_b.exists(), "b's spec left alone by a's unprepare");
    assert_eq!(kind(&file_b), "example.com/gpu-b");
    sb.unprepare_one(&claim).await.unwrap();
    assert!(!file_b.exists());
}

/// What a container gets from `cdi_ids` (in the kubelet's order) out of
/// the CDI specs in `dir`, the way the CDI library applies them: each
/// spec's own edits once, then each device's; a variable set twice keeps
/// the last value.
fn container_env(dir: &Path, cdi_ids: &[String]) -> std::collections::BTreeMap<String, String> {
    let specs: Vec<Value> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    let mut env = std::collections::BTreeMap::new();
    let mut set = |list: &Value| {
        for e in list.as_array().into_iter().flatten() {
            let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
            env.insert(k.to_string(), v.to_string());
        }
    };
    let mut applied = Vec::new();
    for id in cdi_ids {
        let (kind, name) = id.split_once('=').unwrap();
        let (i, dev) = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s["kind"] == kind)
            .find_map(|(i, s)| {
                s["devices"]
                    .as_array()?
                    .iter()
                    .find(|d| d["name"] == name)
                    .map(|d| (i, d))
            })
            .unwrap_or_else(|| panic!("no CDI device {id} in {}", dir.display()));
        if !applied.contains(&i) {
            applied.push(i);
            set(&specs[i]["containerEdits"]["env"]);
        }
        set(&dev["containerEdits"]["env"]);
    }
    env
}

/// The policy's variable lists every device a container was given: one
/// claim with two requests, and one container naming two claims (the
/// kubelet sends a pod's claims in one call; the agent reads the pod to
/// learn which container names which claim). Before, each CDI device set
/// the variable to its own request's devices and the last one won: the
/// container saw one device of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_sees_every_device_of_its_claims_in_the_variable() {
    let node = Node::new();
    let api = Cluster::start(&node.name, policy_of(4)).await;
    let class = device_class(&api).await;
    let driver = driver(&api);
    let var = {
        let p: devplug_api::DevicePluginPolicy =
            serde_json::from_value(api.policy_json().await).unwrap();
        devplug_agent::config::PluginConfig::from_policy(&p).ids_env
    };
    let ns = unique("every");
    let (state, _) = in_process(&api, &node, 4).await;
    let ids_of = |devices: &[devplug_proto::dra::v1::Device]| -> Vec<String> {
        devices
            .iter()
            .flat_map(|d| d.cdi_device_ids.clone())
            .collect()
    };

    // Case A: two requests of one claim.
    let uid = api
        .allocated_claim(
            &ns,
            "two-requests",
            &[("first", &class), ("second", &class)],
            &[
                ("first", &driver, &node.name, "sim-0"),
                ("second", &driver, &node.name, "sim-1"),
            ],
        )
        .await;
    let got = state
        .prepare_one(&c1(&ns, &uid, "two-requests"))
        .await
        .unwrap();
    assert_eq!(
        container_env(&node.cdi(), &ids_of(&got))[&var],
        "sim-0,sim-1",
        "a container naming the claim"
    );
    let first: Vec<_> = got
        .iter()
        .filter(|d| d.request_names == ["first"])
        .cloned()
        .collect();
    assert_eq!(
        container_env(&node.cdi(), &ids_of(&first))[&var],
        "sim-0",
        "a container naming the first request only"
    );

    // Case B: a container naming two claims, another naming one.
    let ua = api
        .allocated_claim(
            &ns,
            "ca",
            &[("r", &class)],
            &[("r", &driver, &node.name, "sim-2")],
        )
        .await;
    let ub = api
        .allocated_claim(
            &ns,
            "cb",
            &[("r", &class)],
            &[("r", &driver, &node.name, "sim-3")],
        )
        .await;
    api.pod_with_claims(
        &ns,
        "pod",
        &node.name,
        &[("a", "ca"), ("b", "cb")],
        &[&["a", "b"], &["a"]],
    )
    .await;
    let r = state
        .prepare(vec![c1(&ns, &ua, "ca"), c1(&ns, &ub, "cb")])
        .await;
    let (ra, rb) = (&r.claims[&ua], &r.claims[&ub]);
    assert!(ra.error.is_empty() && rb.error.is_empty(), "{r:?}");
    // The kubelet hands container 0 the CDI names of a, then b.
    let both: Vec<String> = ids_of(&ra.devices)
        .into_iter()
        .chain(ids_of(&rb.devices))
        .collect();
    assert_eq!(container_env(&node.cdi(), &both)[&var], "sim-2,sim-3");
    assert_eq!(
        container_env(&node.cdi(), &ids_of(&ra.devices))[&var],
        "sim-2"
    );
    // Case C: one container naming two claims. The order in which the
    // runtime applies the two claims' CDI devices varied on the real
    // cluster; the variable must be whole either way.
    let uc = api
        .allocated_claim(
            &ns,
            "cc",
            &[("r", &class)],
            &[("r", &driver, &node.name, "sim-0")],
        )
        .await;
    let ud = api
        .allocated_claim(
            &ns,
            "cd",
            &[("r", &class)],
            &[("r", &driver, &node.name, "sim-1")],
        )
        .await;
    api.pod_with_claims(
        &ns,
        "pod2",
        &node.name,
        &[("c", "cc"), ("d", "cd")],
        &[&["c", "d"]],
    )
    .await;
    let r = state
        .prepare(vec![c1(&ns, &uc, "cc"), c1(&ns, &ud, "cd")])
        .await;
    let (rc, rd) = (&r.claims[&uc], &r.claims[&ud]);
    assert!(rc.error.is_empty() && rd.error.is_empty(), "{r:?}");
    for (what, order) in [
        ("c, then d", [&rc.devices, &rd.devices]),
        ("d, then c", [&rd.devices, &rc.devices]),
    ] {
        let ids: Vec<String> = order.iter().flat_map(|d| ids_of(d)).collect();
        assert_eq!(
            container_env(&node.cdi(), &ids)[&var],
            "sim-0,sim-1",
            "CDI devices applied {what}"
        );
    }

    // Written again the same after the CDI directory is lost (a reboot).
    let before =
        std::fs::read(node.cdi().join(format!("devplug-claim-{driver}-{ub}.json"))).unwrap();
    std::fs::remove_file(node.cdi().join(format!("devplug-claim-{driver}-{ub}.json"))).unwrap();
    state.prepare_one(&c1(&ns, &ub, "cb")).await.unwrap();
    assert_eq!(
        std::fs::read(node.cdi().join(format!("devplug-claim-{driver}-{ub}.json"))).unwrap(),
        before
    );
}

/// The agent killed between the steps of prepare (claim read, CDI spec
/// written) and of unprepare (spec removed, claim forgotten): nothing is
/// left behind that no record owns, the kubelet's retry succeeds, and the
/// whole record reaches the disk after the answer. A spec written before
/// the kill is taken back as a begun record at the next start (the
/// kubelet may have been answered). Before, a kill after writing the spec
/// and before recording the claim (or after forgetting it and before
/// removing the spec) left the spec in the runtime's CDI directory for
/// good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_steps_of_prepare_or_unprepare_leaves_nothing_and_the_retry_works() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    // The CDI directory on a tmpfs, as the runtime's /var/run/cdi is (the
    // agent writes a call's few specs in place there, not on a blocking
    // thread): the layout of a real node.
    let cdi_tmpfs = tempfile::Builder::new()
        .prefix("devplug-kill-cdi-")
        .tempdir_in("/dev/shm")
        .unwrap();
    std::os::unix::fs::symlink(cdi_tmpfs.path(), node.cdi()).unwrap();
    assert!(devplug_agent::cdi::on_tmpfs(&node.cdi()));
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let class = device_class(&api).await;
    let ns = unique("kill");
    let checkpoint = root.join(format!("plugins/{driver}/claims.json"));
    // The claim's record on disk: none, begun, or whole.
    let record = |uid: &str| -> &'static str {
        match &record_in(&checkpoint, uid) {
            Value::Null => "none",
            r if r["pending"] == true => "begun",
            _ => "whole",
        }
    };
    let whole_within = |uid: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while record(uid) != "whole" {
            assert!(
                Instant::now() < deadline,
                "{what}: the whole record never reached the disk ({})",
                record(uid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Each point, and what the kubelet does after the restart: prepares
    // again, or unprepares (a claim adopted at start is unprepared without
    // a prepare first when its pod went meanwhile).
    for (i, (point, retry_unprepare)) in [
        ("prepare-after-read", false),
        ("prepare-after-cdi-spec", false),
        ("prepare-after-cdi-spec", true),
        ("unprepare-after-spec", true),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("k{i}");
        let uid = api
            .allocated_claim(
                &ns,
                &name,
                &[("gpu", &class)],
                &[("gpu", &driver, &node.name, "sim-0")],
            )
            .await;
        let claim = c1(&ns, &uid, &name);
        let spec = node
            .cdi()
            .join(format!("devplug-claim-{driver}-{uid}.json"));
        let unprepare = point.starts_with("unprepare");
        if unprepare {
            let mut a = spawn(&node, &api, &root);
            register(&root, &driver).await;
            let r = driver_client(&root, &driver)
                .await
                .node_prepare_resources(v1::NodePrepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.claims[&uid].error, "");
            whole_within(&uid, point);
            a.terminate();
        }
        // The run that dies at `point`.
        let mut dying = spawn_failing(&node, &api, &root, point);
        register(&root, &driver).await;
        let mut c = driver_client(&root, &driver).await;
        let call = if unprepare {
            c.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                claims: vec![claim.clone()],
            })
            .await
            .map(|_| ())
        } else {
            c.node_prepare_resources(v1::NodePrepareResourcesRequest {
                claims: vec![claim.clone()],
            })
            .await
            .map(|_| ())
        };
        assert!(call.is_err(), "{point}: the call was answered");
        assert!(!dying.wait_exit().success(), "{point}");
        drop(dying);
        // What the kill left.
        let left = (spec.exists(), record(&uid));
        match point {
            "prepare-after-read" => assert_eq!(left, (false, "none"), "{point}"),
            "prepare-after-cdi-spec" => assert_eq!(left, (true, "none"), "{point}"),
            _ => assert_eq!(left, (false, "whole"), "{point}"),
        }
        // Started again: nothing orphaned is left, and the retry works.
        // A spec no record owns may have been answered (the kill can follow
        // the answer): it is recorded as begun, owning the spec, until the
        // kubelet retries or unprepares. A record without its spec (an
        // unprepare cut short) waits for the kubelet's retry.
        let mut again = spawn(&node, &api, &root);
        register(&root, &driver).await;
        let kept = (spec.exists(), record(&uid));
        match point {
            "prepare-after-cdi-spec" => assert_eq!(kept, (true, "begun"), "{point}"),
            "unprepare-after-spec" => assert_eq!(kept, (false, "whole"), "{point}"),
            _ => assert_eq!(kept, (false, "none"), "{point}: an orphan was left"),
        }
        let mut c = driver_client(&root, &driver).await;
        if retry_unprepare {
            let r = c
                .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.claims[&uid].error, "", "{point}");
            assert_eq!((spec.exists(), record(&uid)), (false, "none"), "{point}");
        } else {
            let r = c
                .node_prepare_resources(v1::NodePrepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.claims[&uid].error, "", "{point}");
            assert!(spec.exists(), "{point}");
            whole_within(&uid, point);
            // And it unprepares cleanly.
            let r = c
                .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.claims[&uid].error, "");
            assert_eq!((spec.exists(), record(&uid)), (false, "none"), "{point}");
        }
        again.terminate();
    }
}

/// The claim's record in the checkpoint at `path`, if any.
fn record_in(path: &Path, uid: &str) -> Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|v| v["claims"][uid].clone())
        .unwrap_or_default()
}

/// Prepare saves nothing before it answers, so a checkpoint that cannot be
/// saved must not go unnoticed: once a save fails, new claims are refused
/// with the reason (no spec written), an unprepare fails and is retried,
/// and both go through once saves do. Before, every prepare was answered
/// while nothing reached the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_checkpoint_cannot_be_saved_new_claims_are_refused() {
    let node = Node::new();
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let class = device_class(&api).await;
    let ns = unique("nosave");
    let (state, _) = in_process(&api, &node, 4).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flusher = {
        let s = state.clone();
        tokio::spawn(async move { s.flush_until(stop_rx).await })
    };
    let mut claims = Vec::new();
    for (name, dev) in [("a", "sim-0"), ("b", "sim-1"), ("c", "sim-2")] {
        let uid = api
            .allocated_claim(
                &ns,
                name,
                &[("r", &class)],
                &[("r", &driver, &node.name, dev)],
            )
            .await;
        claims.push(c1(&ns, &uid, name));
    }
    let checkpoint = state.paths.checkpoint.clone();
    let spec = |c: &v1::Claim| {
        node.cdi()
            .join(format!("devplug-claim-{driver}-{}.json", c.uid))
    };
    let on_disk_within = |uid: &str, want: bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while record_in(&checkpoint, uid).is_object() != want {
            assert!(Instant::now() < deadline, "{uid}: never {want} on disk");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    state.prepare_one(&claims[0]).await.unwrap();
    on_disk_within(&claims[0].uid, true);

    // Saves fail from here: a directory where the save writes its
    // temporary file (refused even to root).
    let blocker = checkpoint.with_file_name(".claims.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    // Answered before any save failed; its spec owns it on disk.
    state.prepare_one(&claims[1]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state
        .save_failing
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        assert!(
            Instant::now() < deadline,
            "the failed save was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = state.prepare_one(&claims[2]).await.unwrap_err();
    assert!(
        refused.contains("cannot record claims in") && refused.contains("claims.json"),
        "{refused}"
    );
    assert!(
        !spec(&claims[2]).exists(),
        "a refused claim's spec was written"
    );
    let e = state.unprepare_one(&claims[1]).await.unwrap_err();
    assert!(e.contains("cannot update"), "{e}");

    // Saves work again: the same calls go through.
    std::fs::remove_dir(&blocker).unwrap();
    state.unprepare_one(&claims[1]).await.unwrap();
    state.prepare_one(&claims[2]).await.unwrap();
    assert!(spec(&claims[2]).exists());
    on_disk_within(&claims[2].uid, true);
    on_disk_within(&claims[1].uid, false);
    assert!(
        !state
            .save_failing
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    stop_tx.send(true).unwrap();
    flusher.await.unwrap();
}

/// A claim on a partition: its partitions are in a begun record on disk
/// before the spec that names them is written (the only save before the
/// answer), shown by killing the agent right after the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_record_is_on_disk_before_its_spec() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let mut policy = policy_of(1);
    policy["spec"]["source"]["simulated"]["partitionSlots"] = json!(4);
    let api = Cluster::start(&node.name, policy).await;
    let driver = driver(&api);
    let class = device_class(&api).await;
    let ns = unique("partkill");
    let uid = api
        .allocated_claim(
            &ns,
            "p",
            &[("r", &class)],
            &[("r", &driver, &node.name, "sim-0-part-2s-2")],
        )
        .await;
    let claim = c1(&ns, &uid, "p");
    let checkpoint = root.join(format!("plugins/{driver}/claims.json"));
    let spec = node
        .cdi()
        .join(format!("devplug-claim-{driver}-{uid}.json"));
    let mut dying = spawn_failing(&node, &api, &root, "prepare-after-cdi-spec");
    register(&root, &driver).await;
    let mut c = driver_client(&root, &driver).await;
    let call = c
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await;
    assert!(call.is_err(), "the call was answered");
    assert!(!dying.wait_exit().success());
    drop(dying);
    assert!(spec.exists());
    let rec = record_in(&checkpoint, &uid);
    assert_eq!(rec["pending"], true, "{rec}");
    let parts = rec["partitions"].as_array().cloned().unwrap_or_default();
    assert_eq!(parts.len(), 1, "{rec}");
    assert!(parts[0].to_string().contains("sim-0-part-2s-2"), "{rec}");

    // Started again: the retry prepares it whole, and unprepare clears it.
    let mut again = spawn(&node, &api, &root);
    register(&root, &driver).await;
    let mut c = driver_client(&root, &driver).await;
    let r = c
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims[&uid].error, "");
    let r = c
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims[&uid].error, "");
    assert!(!spec.exists());
    assert!(record_in(&checkpoint, &uid).is_null());
    again.terminate();
}

/// The claim's `status.devices` entries of `driver`: (device, Ready, Healthy
/// status, Healthy reason, Healthy message).
async fn device_status(
    api: &Cluster,
    ns: &str,
    name: &str,
    driver: &str,
) -> Vec<(String, String, String, String, String)> {
    let claims: kube::Api<k8s_openapi::api::resource::v1::ResourceClaim> =
        kube::Api::namespaced(api.admin(), ns);
    let c = claims.get(name).await.unwrap();
    c.status
        .and_then(|s| s.devices)
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.driver == driver)
        .map(|d| {
            let conds = d.conditions.unwrap_or_default();
            let get = |t: &str| conds.iter().find(|c| c.type_ == t).cloned();
            let ready = get("Ready").map(|c| c.status).unwrap_or_default();
            let h = get("Healthy");
            (
                d.device,
                ready,
                h.as_ref().map(|c| c.status.clone()).unwrap_or_default(),
                h.as_ref().map(|c| c.reason.clone()).unwrap_or_default(),
                h.map(|c| c.message).unwrap_or_default(),
            )
        })
        .collect()
}

/// A prepared claim shows each device's state in its `status.devices`
/// (DRAResourceClaimDeviceStatus), from the same health as every other
/// path: Healthy, then Unhealthy with the flip's reason, then Healthy
/// again; unprepare removes the entries. The real API server lets the
/// agent write this only for claims allocated to its own node (the
/// granular `resourceclaims/driver` check with `associated-node:patch`):
/// the same write by the agent's identity on another node's claim is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_claims_device_status_follows_health_and_is_written_for_its_own_node_only() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = Cluster::start(&node.name, policy_json()).await;
    let driver = driver(&api);
    let class = device_class(&api).await;
    let ns = unique("status");
    let mut agent = spawn(&node, &api, &root);
    register(&root, &driver).await;
    let uid = api
        .allocated_claim(
            &ns,
            "c",
            &[("gpu", &class)],
            &[("gpu", &driver, &node.name, "sim-1")],
        )
        .await;
    let mut c = driver_client(&root, &driver).await;
    let r = c
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![c1(&ns, &uid, "c")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims[&uid].error, "");

    let wait = |want: (&'static str, &'static str, &'static str), what: &'static str| {
        let api = &api;
        let ns = &ns;
        let driver = &driver;
        async move {
            let deadline = Instant::now() + T;
            loop {
                let got = device_status(api, ns, "c", driver).await;
                if let [(dev, ready, h, reason, msg)] = got.as_slice()
                    && dev == "sim-1"
                    && ready == "True"
                    && (h.as_str(), reason.as_str()) == (want.0, want.1)
                    && msg.contains(want.2)
                {
                    return;
                }
                assert!(Instant::now() < deadline, "{what}: the claim shows {got:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait(("True", "Healthy", ""), "after prepare").await;
    node.sim_set(&api.policy, "sim-1", "Unhealthy");
    wait(("False", "Unhealthy", "test flip"), "after the flip").await;
    node.sim_set(&api.policy, "sim-1", "Healthy");
    wait(("True", "Healthy", ""), "after recovery").await;

    // The same write by the agent's identity for a claim allocated to
    // another node: refused by the API server itself.
    let other = api
        .allocated_claim(
            &ns,
            "elsewhere",
            &[("gpu", &class)],
            &[("gpu", &driver, "some-other-node", "sim-0")],
        )
        .await;
    assert!(!other.is_empty());
    let as_agent: kube::Api<k8s_openapi::api::resource::v1::ResourceClaim> =
        kube::Api::namespaced(api.agent_client(), &ns);
    let body = |name: &str, pool: &str, device: &str| {
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": name, "namespace": ns},
               "status": {"devices": [{"driver": driver, "pool": pool, "device": device,
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Prepared",
                                   "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]}})
    };
    let pp = kube::api::PatchParams::apply("devplug-test").force();
    let refused = as_agent
        .patch_status(
            "elsewhere",
            &pp,
            &kube::api::Patch::Apply(body("elsewhere", "some-other-node", "sim-0")),
        )
        .await
        .unwrap_err();
    // (The API server says so as an invalid field, 422, naming the
    // permission: for another node's claim only `arbitrary-node:` counts.)
    match &refused {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains("changing status.devices requires")
                    && s.message.contains("arbitrary-node:patch"),
                "{}",
                s.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // And for another driver's entry on its own node's claim.
    let foreign = as_agent
        .patch_status(
            "c",
            &pp,
            &kube::api::Patch::Apply(
                body("c", &node.name, "sim-1")
                    .to_string()
                    .replace(&format!("\"{driver}\""), "\"other.example.com\"")
                    .parse::<Value>()
                    .unwrap(),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&foreign, kube::Error::Api(s) if s.code == 422
            && s.message.contains("changing status.devices requires")
            && s.message.contains("other.example.com")),
        "{foreign:?}"
    );

    // Unprepare removes the driver's entries.
    let r = c
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![c1(&ns, &uid, "c")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims[&uid].error, "");
    let deadline = Instant::now() + T;
    loop {
        let got = device_status(&api, &ns, "c", &driver).await;
        if got.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "after unprepare: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.terminate().success());
}

/// A shared policy (time-slicing, 4 replicas) served through DRA: each
/// physical device is one device that allows several allocations, with 4
/// `shares` (the real API server keeps both fields: DRAConsumableCapacity
/// is on), and a claim given one share of it sees `..._SHARE=25` and gets
/// its device status under its share's ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_device_is_published_once_with_shares_and_a_claims_share_reaches_the_container() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let mut policy = policy_of(2);
    policy["spec"]["sharing"] = json!({"strategy": "TimeSlicing", "replicas": 4});
    let api = Cluster::start(&node.name, policy).await;
    let driver = driver(&api);
    let class = device_class(&api).await;
    let ns = unique("share");
    let mut agent = spawn(&node, &api, &root);
    register(&root, &driver).await;
    let slices = wait_slices(&api, "shared pool published", |s| s.len() == 1).await;
    let devs = slices[0]["spec"]["devices"].as_array().unwrap().clone();
    assert_eq!(devs.len(), 2, "one device per physical device: {devs:?}");
    for d in &devs {
        assert_eq!(d["allowMultipleAllocations"], true, "{d}");
        assert_eq!(d["capacity"]["shares"]["value"], "4", "{d}");
        assert_eq!(
            d["capacity"]["shares"]["requestPolicy"]["default"], "1",
            "{d}"
        );
    }
    // Allocated as the scheduler allocates a share of such a device.
    let share = "0b5e3c2a-1111-4222-8333-444455556666";
    let uid = api
        .allocated_claim_with(
            &ns,
            "c",
            &[("gpu", &class)],
            vec![
                json!({"request": "gpu", "driver": driver, "pool": node.name, "device": "sim-1",
                        "shareID": share, "consumedCapacity": {"shares": "1"}}),
            ],
        )
        .await;
    let claims: kube::Api<k8s_openapi::api::resource::v1::ResourceClaim> =
        kube::Api::namespaced(api.admin(), &ns);
    let mut dra = driver_client(&root, &driver).await;
    let r = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![c1(&ns, &uid, "c")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims[&uid].error, "");
    let spec = std::fs::read_to_string(
        node.cdi()
            .join(format!("devplug-claim-{driver}-{uid}.json")),
    )
    .unwrap();
    assert!(spec.contains("DEVPLUG_DEVICE_SIM_1_SHARE=25"), "{spec}");
    assert!(spec.contains("DEVPLUG_EXAMPLE_COM_GPU=sim-1"), "{spec}");
    // The device status names the share.
    let deadline = Instant::now() + T;
    loop {
        let got = claims.get("c").await.unwrap();
        let entries = got.status.and_then(|s| s.devices).unwrap_or_default();
        if let [e] = entries.as_slice() {
            assert_eq!(e.share_id.as_deref(), Some(share));
            assert_eq!(e.device, "sim-1");
            break;
        }
        assert!(Instant::now() < deadline, "no device status: {entries:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.terminate().success());
}

/// MIG instances as a fake NVML would hold them.
#[derive(Default)]
struct FakePartitions {
    made: std::sync::Mutex<Vec<devplug_agent::devices::device::Made>>,
    /// Creations refused (no room on the GPU).
    full: std::sync::atomic::AtomicBool,
    /// Removals refused (a process still runs in the instance).
    busy: std::sync::atomic::AtomicBool,
    next: std::sync::atomic::AtomicU32,
}

impl devplug_agent::devices::sources::Partitioner for FakePartitions {
    fn create(
        &self,
        p: &devplug_agent::devices::device::Partition,
    ) -> Result<devplug_agent::devices::device::Made, String> {
        use std::sync::atomic::Ordering;
        let mut made = self.made.lock().unwrap();
        if let Some(m) = made
            .iter()
            .find(|m| m.parent == p.parent && m.start == p.start && m.profile == p.profile)
        {
            return Ok(m.clone());
        }
        if self.full.load(Ordering::SeqCst) {
            return Err("NVML: insufficient resources".into());
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let m = devplug_agent::devices::device::Made {
            parent: p.parent.clone(),
            id: devplug_agent::devices::sources::nvidia::mig::partition_id(
                &p.parent,
                &p.profile_name,
                p.start,
            ),
            profile: p.profile,
            start: p.start,
            instance: n,
            compute: 0,
            uuid: format!("MIG-{n:04}"),
            nodes: vec![format!("/dev/nvidia-caps/nvidia-cap{}", 100 + n)],
        };
        made.push(m.clone());
        Ok(m)
    }

    fn destroy(&self, m: &devplug_agent::devices::device::Made) -> Result<(), String> {
        if self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("NVML: in use by another client".into());
        }
        self.made
            .lock()
            .unwrap()
            .retain(|x| !(x.parent == m.parent && x.instance == m.instance));
        Ok(())
    }

    fn existing(&self) -> Result<Vec<devplug_agent::devices::device::Made>, String> {
        Ok(self.made.lock().unwrap().clone())
    }
}

/// One GPU in MIG mode (1g.10gb at 7 places, 3g.40gb at 2), as the NVIDIA
/// source publishes it with `migPartitions`.
fn mig_snapshot() -> devplug_agent::devices::inventory::Snapshot {
    use devplug_agent::devices::device::{Device, Partitioning};
    use devplug_agent::devices::health::Health;
    use devplug_agent::devices::inventory::{DeviceState, Snapshot};
    use devplug_agent::devices::sources::nvidia::{Gpu, mig};
    let layout = mig::MigLayout {
        slots: 8,
        profiles: vec![
            mig::MigProfile {
                id: 19,
                name: "1g.10gb".into(),
                memory_bytes: 10 << 30,
                multiprocessors: 16,
                placements: (0..7).map(|s| (s, 1)).collect(),
            },
            mig::MigProfile {
                id: 9,
                name: "3g.40gb".into(),
                memory_bytes: 40 << 30,
                multiprocessors: 60,
                placements: vec![(0, 4), (4, 4)],
            },
        ],
    };
    let gpu = Gpu {
        uuid: "GPU-0".into(),
        minor: 0,
        bus_id: "00000000:3B:00.0".into(),
        nvlink_peers: vec![],
        memory_bytes: Some(80 << 30),
        mig: Some(layout.clone()),
    };
    let mut parent = Device {
        id: "GPU-0".into(),
        numa_node: None,
        nodes: vec![],
        health: Health::Healthy,
        links: vec![],
        attributes: Default::default(),
        capacity: Default::default(),
        partitioning: Partitioning::Whole,
    };
    let parts = mig::partitions(&gpu, &layout, &parent);
    parent.partitioning = Partitioning::Divided {
        counters: mig::counters(&layout),
    };
    let mut snap = Snapshot {
        replicas: 1,
        version: 1,
        ..Default::default()
    };
    for d in parts.into_iter().chain([parent]) {
        snap.devices.insert(
            d.id.clone(),
            DeviceState {
                device: d,
                health: Health::Healthy,
                last_transition: std::time::SystemTime::UNIX_EPOCH,
            },
        );
    }
    snap
}

/// A claim for a MIG partition: prepare makes the instance and records it
/// on disk before the CDI spec (which carries its capability node and
/// names it by its `MIG-…` UUID) is written; a repeated prepare makes no
/// second one; an unprepare while the instance is busy fails and keeps the
/// claim, and succeeds once it is free, removing the instance; a claim
/// whose partition cannot be made is answered with NVML's reason and
/// leaves nothing; at start, instances no claim records are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mig_partition_is_made_in_prepare_and_removed_in_unprepare() {
    use devplug_agent::devices::sources::Partitioner;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let node = Node::new();
    let api = Cluster::start(&node.name, policy_of(1)).await;
    let class = device_class(&api).await;
    let driver = driver(&api);
    let parts = Arc::new(FakePartitions::default());
    let (state, _) = in_process_with(
        &api,
        &node,
        mig_snapshot(),
        Some(parts.clone() as Arc<dyn devplug_agent::devices::sources::Partitioner>),
    )
    .await;
    let dra_name = devplug_agent::dra::names::device_name("GPU-0-mig-3g.40gb-4");
    let ns = unique("mig");
    let uid = api
        .allocated_claim(
            &ns,
            "half",
            &[("gpu", &class)],
            &[("gpu", &driver, &node.name, &dra_name)],
        )
        .await;
    let claim = c1(&ns, &uid, "half");
    let got = state.prepare_one(&claim).await.unwrap();
    let made = parts.existing().unwrap();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!((made[0].start, made[0].profile), (4, 9));
    // On disk with the claim before the spec names it.
    let cp: Value =
        serde_json::from_slice(&std::fs::read(&state.paths.checkpoint).unwrap()).unwrap();
    assert_eq!(
        cp["claims"][&uid]["partitions"][0]["uuid"], "MIG-0001",
        "{cp}"
    );
    let spec_file = node
        .cdi()
        .join(format!("devplug-claim-{driver}-{uid}.json"));
    let spec: Value = serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
    let dev = &spec["devices"][0]["containerEdits"];
    assert_eq!(
        dev["deviceNodes"][0]["path"], "/dev/nvidia-caps/nvidia-cap101",
        "{spec}"
    );
    let env = container_env(&node.cdi(), &got[0].cdi_device_ids);
    assert!(
        env.values().any(|v| v == "MIG-0001"),
        "the container's variables name the instance: {env:?}"
    );
    // The kubelet repeats the call: no second instance.
    assert_eq!(state.prepare_one(&claim).await.unwrap(), got);
    assert_eq!(parts.existing().unwrap().len(), 1);

    // Busy: the claim stays, and the kubelet's retry removes it.
    parts.busy.store(true, Ordering::SeqCst);
    let e = state.unprepare_one(&claim).await.unwrap_err();
    assert!(e.contains("in use"), "{e}");
    assert!(state.checkpoint.lock().await.claims.contains_key(&uid));
    assert!(spec_file.exists());
    parts.busy.store(false, Ordering::SeqCst);
    state.unprepare_one(&claim).await.unwrap();
    assert!(parts.existing().unwrap().is_empty());
    assert!(!spec_file.exists());
    assert!(!state.checkpoint.lock().await.claims.contains_key(&uid));

    // No room: NVML's reason, nothing left behind.
    parts.full.store(true, Ordering::SeqCst);
    let uid2 = api
        .allocated_claim(
            &ns,
            "full",
            &[("gpu", &class)],
            &[(
                "gpu",
                &driver,
                &node.name,
                &devplug_agent::dra::names::device_name("GPU-0-mig-1g.10gb-0"),
            )],
        )
        .await;
    let e = state
        .prepare_one(&c1(&ns, &uid2, "full"))
        .await
        .unwrap_err();
    assert!(
        e.contains("cannot make partition 1g.10gb at slot 0 of GPU-0")
            && e.contains("insufficient"),
        "{e}"
    );
    assert!(parts.existing().unwrap().is_empty());
    assert!(!state.checkpoint.lock().await.claims.contains_key(&uid2));
    assert!(
        !node
            .cdi()
            .join(format!("devplug-claim-{driver}-{uid2}.json"))
            .exists()
    );

    // At start: an instance no claim holds (a prepare killed after making
    // it) goes; one a claim holds stays.
    parts.full.store(false, Ordering::SeqCst);
    state.prepare_one(&claim).await.unwrap();
    let orphan = devplug_agent::devices::device::Partition {
        parent: "GPU-0".into(),
        profile: 19,
        profile_name: "1g.10gb".into(),
        start: 0,
        size: 1,
        counters: Default::default(),
    };
    let orphan = parts.create(&orphan).unwrap();
    let cp = state.checkpoint.lock().await.clone();
    let removed = devplug_agent::dra::claims::sweep_partitions(parts.as_ref(), &cp);
    assert_eq!(removed, [format!("{} ({})", orphan.id, orphan.uuid)]);
    let left = parts.existing().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].start, 4);
    state.unprepare_one(&claim).await.unwrap();
}
