//! The real agent binary with a DRA policy (`kubeletApi: DRA`), against a
//! simulated kubelet plugin watcher (registration socket, DRAPlugin v1 and
//! v1beta1, DRAResourceHealth) and an HTTP API server holding
//! ResourceSlices and ResourceClaims.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devplug_proto::dra::{v1, v1beta1};
use devplug_proto::drahealth::v1alpha1 as health;
use devplug_proto::pluginregistration as reg;
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use support::{Agent, Node, dial};

const T: Duration = Duration::from_secs(15);
const DRIVER: &str = "gpu.devplug.io";

fn policy_json() -> Value {
    json!({"apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
           "metadata": {"name": "gpu", "uid": "u1", "generation": 1},
           "spec": {"resourceName": "example.com/gpu", "kubeletApi": "DRA",
                    "source": {"simulated": {"count": 3}},
                    "allocate": {"env": {"GREETING": "hello"}},
                    "health": {"settleSeconds": 1}}})
}

/// A ResourceClaim allocated `devices` (request, pool, device) of `driver`.
fn claim(uid: &str, devices: &[(&str, &str, &str)]) -> Value {
    let results: Vec<Value> = devices
        .iter()
        .map(|(req, pool, dev)| json!({"request": req, "driver": DRIVER, "pool": pool, "device": dev}))
        .collect();
    json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
           "metadata": {"name": "c", "namespace": "ml", "uid": uid, "resourceVersion": "1"},
           "spec": {"devices": {"requests": []}},
           "status": {"allocation": {"devices": {"results": results}}}})
}

fn c1(uid: &str, name: &str) -> v1::Claim {
    v1::Claim {
        namespace: "ml".into(),
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

fn spawn(node: &Node, api: &ApiServer, root: &Path) -> Agent {
    let kc = api.kubeconfig(node.tmp.path());
    Agent::spawn_cluster_with(
        node,
        "gpu",
        &kc,
        &[
            "--admin-addr",
            "off",
            "--kubelet-root",
            root.to_str().unwrap(),
        ],
    )
}

/// Does what the kubelet's plugin watcher does: GetInfo, then says
/// "registered". Returns the info.
async fn register(root: &Path) -> reg::PluginInfo {
    let sock = root.join(format!("plugins_registry/{DRIVER}-reg.sock"));
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

async fn wait_slices(api: &ApiServer, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let all: Vec<Value> = api.slices().into_values().collect();
        if pred(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "{what}: slices {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint(root: &Path) -> PathBuf {
    root.join(format!("plugins/{DRIVER}/dra.sock"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dra_policy_registers_publishes_and_prepares_claims_across_restarts() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = ApiServer::start(policy_json()).await;
    let mut agent = spawn(&node, &api, &root);

    let info = register(&root).await;
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, DRIVER);
    assert_eq!(Path::new(&info.endpoint), endpoint(&root));
    for v in [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1alpha1.DRAResourceHealth",
    ] {
        assert!(info.supported_versions.iter().any(|s| s == v), "{info:?}");
    }

    // The node's pool: one slice, every device with its ID.
    let slices = wait_slices(&api, "pool published", |s| s.len() == 1).await;
    let spec = &slices[0]["spec"];
    assert_eq!(spec["driver"], DRIVER);
    assert_eq!(spec["nodeName"], "test-node");
    assert_eq!(spec["pool"]["name"], "test-node");
    assert_eq!(spec["pool"]["resourceSliceCount"], 1);
    let names: Vec<&str> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sim-0", "sim-1", "sim-2"]);
    assert_eq!(
        spec["devices"][1]["attributes"]["id"],
        json!({"string": "sim-1"})
    );

    // Someone deletes the slice (the kubelet does when it restarts): the
    // agent publishes its pool again.
    let name = api.slices().into_keys().next().unwrap();
    api.delete_slice(&name);
    wait_slices(&api, "pool published again after a deletion", |s| {
        s.len() == 1
    })
    .await;

    // Prepare: the CDI spec of the claim, its name in the answer.
    api.set_claim(
        "ml",
        "c",
        Some(claim("uid-1", &[("gpu", "test-node", "sim-1")])),
    );
    let mut dra =
        v1::dra_plugin_client::DraPluginClient::new(dial(&endpoint(&root)).await.unwrap());
    let r = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![c1("uid-1", "c")],
        })
        .await
        .unwrap()
        .into_inner();
    let got = &r.claims["uid-1"];
    assert_eq!(got.error, "");
    assert_eq!(got.devices.len(), 1);
    assert_eq!(got.devices[0].pool_name, "test-node");
    assert_eq!(got.devices[0].device_name, "sim-1");
    assert_eq!(got.devices[0].request_names, ["gpu"]);
    assert_eq!(
        got.devices[0].cdi_device_ids,
        ["example.com/gpu=sim-1-gpu-uid-1"]
    );
    let spec_file = node.cdi().join("devplug-claim-uid-1.json");
    let cdi: Value = serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
    assert_eq!(cdi["kind"], "example.com/gpu");
    assert_eq!(cdi["devices"][0]["name"], "sim-1-gpu-uid-1");
    let env = cdi["devices"][0]["containerEdits"]["env"].to_string();
    assert!(env.contains("sim-1"), "{env}");
    assert!(
        cdi["containerEdits"]["env"]
            .to_string()
            .contains("GREETING=hello")
    );

    // Bad claims are refused one by one, with the reason; a good one in the
    // same call is still prepared.
    api.set_claim(
        "ml",
        "other-pool",
        Some(claim("uid-2", &[("gpu", "elsewhere", "sim-0")])),
    );
    api.set_claim(
        "ml",
        "unknown",
        Some(claim("uid-3", &[("gpu", "test-node", "sim-9")])),
    );
    let mut unallocated = claim("uid-4", &[]);
    unallocated["status"] = json!({});
    api.set_claim("ml", "unallocated", Some(unallocated));
    api.set_claim(
        "ml",
        "good",
        Some(claim(
            "uid-6",
            &[("a", "test-node", "sim-0"), ("b", "test-node", "sim-2")],
        )),
    );
    let r = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![
                c1("uid-2", "other-pool"),
                c1("uid-3", "unknown"),
                c1("uid-4", "unallocated"),
                c1("uid-5", "missing"),
                c1("wrong-uid", "good"),
                c1("uid-6", "good"),
                v1::Claim::default(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let err = |uid: &str| r.claims[uid].error.clone();
    assert!(err("uid-2").contains("pool elsewhere"), "{}", err("uid-2"));
    assert!(
        err("uid-3").contains("sim-9 is not on this node"),
        "{}",
        err("uid-3")
    );
    assert!(err("uid-4").contains("not allocated"), "{}", err("uid-4"));
    assert!(
        err("uid-5").contains("cannot read ResourceClaim ml/missing"),
        "{}",
        err("uid-5")
    );
    assert!(
        err("wrong-uid").contains("replaced"),
        "{}",
        err("wrong-uid")
    );
    assert!(
        err("").contains("needs namespace, uid and name"),
        "{}",
        err("")
    );
    assert_eq!(err("uid-6"), "");
    assert_eq!(r.claims["uid-6"].devices.len(), 2);
    let ids: Vec<_> = r.claims["uid-6"]
        .devices
        .iter()
        .map(|d| d.cdi_device_ids.clone())
        .collect();
    assert_eq!(
        ids,
        [
            vec!["example.com/gpu=sim-0-a-uid-6".to_string()],
            vec!["example.com/gpu=sim-2-b-uid-6".to_string()]
        ]
    );
    for bad in ["uid-2", "uid-3", "uid-4", "uid-5"] {
        assert!(
            !node
                .cdi()
                .join(format!("devplug-claim-{bad}.json"))
                .exists()
        );
    }

    // The agent restarts; the claim is gone from the API server: the
    // checkpoint answers, and a CDI file lost meanwhile is written again.
    assert!(agent.terminate().success());
    api.set_claim("ml", "c", None);
    std::fs::remove_file(&spec_file).unwrap();
    let reads = api.claim_reads();
    let mut agent = spawn(&node, &api, &root);
    register(&root).await;
    let mut dra =
        v1::dra_plugin_client::DraPluginClient::new(dial(&endpoint(&root)).await.unwrap());
    let again = dra
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![c1("uid-1", "c")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.claims["uid-1"], *got);
    assert_eq!(api.claim_reads(), reads, "answered from the checkpoint");
    assert!(spec_file.exists(), "lost CDI spec written again");

    // Unprepare through v1beta1 removes what prepare made; twice is fine.
    let mut beta =
        v1beta1::dra_plugin_client::DraPluginClient::new(dial(&endpoint(&root)).await.unwrap());
    for _ in 0..2 {
        let u = beta
            .node_unprepare_resources(v1beta1::NodeUnprepareResourcesRequest {
                claims: vec![v1beta1::Claim {
                    namespace: "ml".into(),
                    uid: "uid-1".into(),
                    name: "c".into(),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.claims["uid-1"].error, "");
        assert!(!spec_file.exists());
    }
    let cp: Value = serde_json::from_slice(
        &std::fs::read(root.join(format!("plugins/{DRIVER}/claims.json"))).unwrap(),
    )
    .unwrap();
    assert!(cp["claims"].get("uid-1").is_none(), "{cp}");
    assert!(cp["claims"].get("uid-6").is_some(), "{cp}");

    // Stopping deregisters: the registration socket goes.
    assert!(agent.terminate().success());
    assert!(
        !root
            .join(format!("plugins_registry/{DRIVER}-reg.sock"))
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_health_streams_to_the_kubelet_and_taints_the_slice() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let api = ApiServer::start(policy_json()).await;
    let mut agent = spawn(&node, &api, &root);
    register(&root).await;
    let mut h = health::dra_resource_health_client::DraResourceHealthClient::new(
        dial(&endpoint(&root)).await.unwrap(),
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
        "test-node"
    );

    node.sim_set("gpu", "sim-0", "Unhealthy");
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
    let tainted = |s: &[Value]| {
        s.first()
            .is_some_and(|s| s["spec"]["devices"][0]["taints"][0]["key"] == "devplug.io/unhealthy")
    };
    wait_slices(&api, "unhealthy device tainted", tainted).await;

    node.sim_set("gpu", "sim-0", "Healthy");
    wait_slices(&api, "taint removed on recovery", |s| {
        s.first()
            .is_some_and(|s| s["spec"]["devices"][0].get("taints").is_none())
            && !tainted(s)
    })
    .await;
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_claim_checkpoint_is_moved_aside_and_reported() {
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    let dir = root.join(format!("plugins/{DRIVER}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("claims.json"), b"{not json").unwrap();
    let api = ApiServer::start(policy_json()).await;
    let mut agent = spawn(&node, &api, &root);
    register(&root).await;
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("claims.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let deadline = Instant::now() + T;
    while !api
        .events()
        .iter()
        .any(|e| e["reason"] == "CheckpointQuarantined")
    {
        assert!(Instant::now() < deadline, "no event: {:?}", api.events());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let api = ApiServer::start(policy_json()).await;
    let mut agent = spawn(&node, &api, &root);
    let sock = root.join(format!("plugins_registry/{DRIVER}-reg.sock"));
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
                    if data.windows(DRIVER.len()).any(|w| w == DRIVER.as_bytes()) {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    assert!(agent.terminate().success());
}
