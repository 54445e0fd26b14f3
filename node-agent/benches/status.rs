//! Status-path benchmark: prints figures, asserts nothing about time.
//!
//! `cargo bench -p devplug-agent --bench status`
//!
//! A node with 4 policies × 64 devices × 8 replicas, as a cluster runs it:
//! 4 agents in cluster mode (one per policy), a kubelet simulator, a fake
//! PodResources service with 16 devices of each policy allocated, and an
//! HTTP API server per agent that records every write. Measures, on one
//! agent while all four run: health flip (control file written) → the
//! NodeDeviceStatus apply request arriving at the API server, and the bytes
//! of each write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::apiserver::ApiServer;
use support::podresources::FakePodResources;
use support::{Agent, KubeletSim, Node};

const POLICIES: usize = 4;
const DEVICES: usize = 64;
const REPLICAS: usize = 8;
const FLIPS: usize = 200;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let node = Node::new();
    let kubelet = KubeletSim::start(&node.plugins);
    let (pods, _pr) = FakePodResources::start(&node.pod_resources_socket());
    let mut apis = Vec::new();
    let mut agents = Vec::new();
    for i in 0..POLICIES {
        let res = format!("bench.example/r{i}");
        for d in 0..16 {
            pods.hold(
                "ml",
                &format!("job-{i}-{d}"),
                "main",
                &res,
                &[&format!("sim-{d}::0")],
            );
        }
        let api = ApiServer::start(json!({
            "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
            "metadata": {"name": format!("p{i}"), "uid": format!("u{i}"), "generation": 1},
            "spec": {"resourceName": res, "source": {"simulated": {"count": DEVICES, "numaNodes": 2}},
                     "sharing": {"strategy": "TimeSlicing", "replicas": REPLICAS},
                     "health": {"settleSeconds": 0}},
        }))
        .await;
        let dir = node.tmp.path().join(format!("api{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        agents.push(Agent::spawn_cluster(
            &node,
            &format!("p{i}"),
            &api.kubeconfig(&dir),
        ));
        apis.push(api);
    }
    let t = Duration::from_secs(30);
    for (i, api) in apis.iter().enumerate() {
        let deadline = Instant::now() + t;
        loop {
            let done = api.nds("test-node").is_some_and(|n| {
                n["status"]["resources"][0]["total"] == DEVICES
                    && n["status"]["resources"][0]["allocated"] == 16
            });
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "agent {i} never reported");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kubelet
            .wait_list(&format!("bench.example/r{i}"), t, |l| {
                l.len() == DEVICES * REPLICAS
            })
            .await;
    }
    println!(
        "devplug-agent status path ({POLICIES} agents x {DEVICES} devices x {REPLICAS} replicas, 16 devices allocated each, release build)"
    );

    let api = &apis[0];
    let mut lat = Vec::with_capacity(FLIPS);
    let mut bytes = Vec::with_capacity(FLIPS);
    for n in 0..FLIPS {
        let dev = format!("sim-{}", n % DEVICES);
        let (content, want) = if (n / DEVICES).is_multiple_of(2) {
            ("Unhealthy: bench", "Unhealthy")
        } else {
            ("Healthy", "Healthy")
        };
        let seen = api.writes().len();
        let t0 = Instant::now();
        node.sim_write("p0", &dev, content);
        let deadline = t0 + t;
        let w = loop {
            let ws = api.writes();
            if let Some(w) = ws[seen..].iter().find(|w| {
                w.body["status"]["resources"][0]["devices"]
                    .as_array()
                    .is_some_and(|ds| {
                        ds.iter()
                            .any(|d| d["id"] == dev.as_str() && d["health"] == want)
                    })
            }) {
                break w.clone();
            }
            assert!(Instant::now() < deadline, "flip {n} never written");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        lat.push(w.at.duration_since(t0));
        bytes.push(w.bytes);
    }
    let writes_per_flip = (api.writes().len() as f64) / (FLIPS as f64 + 1.0);
    bytes.sort();
    println!(
        "health flip -> NodeDeviceStatus apply at the API server, {FLIPS} flips: p50 {}  p99 {}  max {} (target: visible within 2 s)",
        ms(pct(&mut lat.clone(), 0.50)),
        ms(pct(&mut lat, 0.99)),
        ms(*lat.iter().max().unwrap())
    );
    println!(
        "bytes per write: median {} B, max {} B ({DEVICES} devices, 16 allocated); {:.2} writes per flip",
        bytes[bytes.len() / 2],
        bytes[bytes.len() - 1],
        writes_per_flip
    );
    let idle_from = api.writes().len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    println!(
        "idle for 6 s (one PodResources poll included): {} writes",
        api.writes().len() - idle_from
    );
    let rss: Vec<f64> = agents
        .iter()
        .map(|a| a.peak_rss_kib() as f64 / 1024.0)
        .collect();
    println!(
        "cluster-mode agent peak RSS (VmHWM), one policy each: {}",
        rss.iter()
            .map(|r| format!("{r:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(agents);
}
