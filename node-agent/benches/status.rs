//! Status-path benchmark: prints figures, asserts nothing about time.
//!
//! `cargo bench -p devplug-agent --bench status`
//!
//! A node with 4 policies × 64 devices × 8 replicas, as a cluster runs it:
//! 4 agents in cluster mode (one per policy, each with its own identity on
//! the same node), a kubelet simulator, a fake PodResources service with 16
//! devices of each policy allocated, and the real etcd + kube-apiserver of
//! `devplug-testenv` holding the node's one NodeDeviceStatus (the agents
//! talk to it directly, not through the test relay: the relay's hop adds
//! ~40 ms to a request with a body on this host). Measures, on
//! one agent while all four run: health flip (control file written) → the
//! flip visible in the NodeDeviceStatus on the server (seen by a watch of
//! that object), the size of the agent's entry as stored, and the agent's
//! writes per flip and while idle (from the API server's audit log).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use serde_json::{Value, json};
use support::cluster::Cluster;
use support::podresources::FakePodResources;
use support::{Agent, KubeletSim, Node};
use tokio::sync::mpsc;

const POLICIES: usize = 4;
const DEVICES: usize = 64;
const REPLICAS: usize = 8;
const FLIPS: usize = 200;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// An audit log timestamp.
fn ts(v: &Value) -> SystemTime {
    v.as_str()
        .unwrap()
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap()
        .into()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The entry of `policy` in a NodeDeviceStatus.
fn entry<'a>(nds: &'a Value, policy: &str) -> Option<&'a Value> {
    nds["status"]["resources"]
        .as_array()?
        .iter()
        .find(|e| e["policy"] == policy)
}

fn health_of<'a>(e: &'a Value, dev: &str) -> Option<&'a str> {
    e["devices"]
        .as_array()?
        .iter()
        .find(|d| d["id"] == dev)
        .and_then(|d| d["health"].as_str())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let began = Instant::now();
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
        let api = Cluster::start(
            &node.name,
            json!({
                "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
                "metadata": {"name": format!("p{i}")},
                "spec": {"resourceName": res, "source": {"simulated": {"count": DEVICES, "numaNodes": 2}},
                         "sharing": {"strategy": "TimeSlicing", "replicas": REPLICAS},
                         "health": {"settleSeconds": 0}},
            }),
        )
        .await;
        let dir = node.tmp.path().join(format!("api{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        agents.push(Agent::spawn_cluster(
            &node,
            &api.policy,
            &api.kubeconfig_direct(&dir),
        ));
        apis.push(api);
    }

    // A watch of the node's NodeDeviceStatus, as the admin: every version
    // the server shows, with the moment it arrived here.
    let nds_api: Api<DynamicObject> = Api::all_with(
        apis[0].admin(),
        &kube::core::ApiResource::erase::<devplug_api::NodeDeviceStatus>(&()),
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<(Value, Instant)>();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", node.name));
    tokio::spawn(async move {
        let mut s = watcher(nds_api, cfg).boxed();
        while let Some(ev) = s.next().await {
            let at = Instant::now();
            match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    if tx.send((serde_json::to_value(&o).unwrap(), at)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("NodeDeviceStatus watch: {e}"),
            }
        }
    });

    let t = Duration::from_secs(30);
    let deadline = Instant::now() + t;
    let mut latest = Value::Null;
    loop {
        let all_in = apis.iter().all(|api| {
            entry(&latest, &api.policy)
                .is_some_and(|e| e["total"] == DEVICES && e["allocated"] == 16)
        });
        if all_in {
            break;
        }
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some((o, _))) => latest = o,
            _ => panic!("not every agent reported within {t:?}; last NodeDeviceStatus {latest:#}"),
        }
    }
    for i in 0..POLICIES {
        kubelet
            .wait_list(&format!("bench.example/r{i}"), t, |l| {
                l.len() == DEVICES * REPLICAS
            })
            .await;
    }
    println!(
        "devplug-agent status path ({POLICIES} agents x {DEVICES} devices x {REPLICAS} replicas, 16 devices \
         allocated each, one node, real kube-apiserver (devplug-testenv; each agent its own bound token, \
         no relay), release build)"
    );
    println!(
        "  setup (API server, 4 agents reported) {:.1} s",
        began.elapsed().as_secs_f64()
    );

    let api = &apis[0];
    // Let the start-up writes finish before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_before = api.writes();
    let mut lat = Vec::with_capacity(FLIPS);
    let mut flipped_at = Vec::with_capacity(FLIPS);
    let mut entry_bytes = Vec::with_capacity(FLIPS);
    let mut object_bytes = Vec::with_capacity(FLIPS);
    for n in 0..FLIPS {
        let dev = format!("sim-{}", n % DEVICES);
        let (content, want) = if (n / DEVICES).is_multiple_of(2) {
            ("Unhealthy: bench", "Unhealthy")
        } else {
            ("Healthy", "Healthy")
        };
        // Versions already delivered cannot show this flip (the device was
        // the other way until now).
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        flipped_at.push(SystemTime::now());
        node.sim_write(&api.policy, &dev, content);
        let deadline = t0 + t;
        let (obj, at) = loop {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((o, at))) => {
                    let shown = entry(&o, &api.policy)
                        .and_then(|e| health_of(e, &dev))
                        .is_some_and(|h| h == want);
                    if shown {
                        break (o, at);
                    }
                }
                _ => panic!("flip {n} ({dev} {want}) never seen in the NodeDeviceStatus"),
            }
        };
        lat.push(at.duration_since(t0));
        let e = entry(&obj, &api.policy).unwrap();
        entry_bytes.push(serde_json::to_vec(e).unwrap().len());
        let mut stripped = obj.clone();
        if let Some(m) = stripped["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
        object_bytes.push(serde_json::to_vec(&stripped).unwrap().len());
    }
    // A write still under way is counted with the flips.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes_after = api.writes();
    let flip_writes = &writes_after[writes_before.len()..];
    let failed = flip_writes.iter().filter(|w| w.code >= 400).count();
    let status_writes = flip_writes
        .iter()
        .filter(|w| w.path.ends_with("/status"))
        .count();
    // Where the time goes, per flip: the audit log's timestamps of the
    // agent's first /status write after the flip (same host clock).
    let mut writes_at: Vec<(SystemTime, SystemTime)> = api
        .audit_events()
        .iter()
        .filter(|e| {
            e["verb"] != "get"
                && e["verb"] != "list"
                && e["verb"] != "watch"
                && e["requestURI"]
                    .as_str()
                    .is_some_and(|u| u.split('?').next().unwrap().ends_with("/status"))
        })
        .map(|e| (ts(&e["requestReceivedTimestamp"]), ts(&e["stageTimestamp"])))
        .collect();
    writes_at.sort();
    let (mut to_server, mut in_server, mut to_watch) = (Vec::new(), Vec::new(), Vec::new());
    for (t0, l) in flipped_at.iter().zip(&lat) {
        if let Some((recv, done)) = writes_at.iter().find(|(r, _)| r >= t0) {
            let seen = *t0 + *l;
            to_server.push(recv.duration_since(*t0).unwrap_or_default());
            in_server.push(done.duration_since(*recv).unwrap_or_default());
            to_watch.push(seen.duration_since(*done).unwrap_or_default());
        }
    }
    entry_bytes.sort_unstable();
    object_bytes.sort_unstable();
    println!(
        "health flip (control file written) -> the flip in the NodeDeviceStatus on the server, seen by a \
         watch of that object (admin client, this process), {FLIPS} flips one after another:"
    );
    println!(
        "  p50 {}  p99 {}  max {}  (includes the agent's 100 ms coalescing window; target: visible within 2 s)",
        ms(pct(&mut lat.clone(), 0.50)),
        ms(pct(&mut lat, 0.99)),
        ms(*lat.iter().max().unwrap())
    );
    println!(
        "  of which (audit log timestamps, {} flips matched to a write): flip -> write received by the API server \
         p50 {} p99 {}; API server handling the write p50 {} p99 {}; write done -> seen by the watch p50 {} p99 {}",
        to_server.len(),
        ms(pct(&mut to_server, 0.5)),
        ms(pct(&mut to_server, 0.99)),
        ms(pct(&mut in_server, 0.5)),
        ms(pct(&mut in_server, 0.99)),
        ms(pct(&mut to_watch, 0.5)),
        ms(pct(&mut to_watch, 0.99)),
    );
    println!(
        "size of the agent's status.resources[] entry as stored (serialized JSON): median {} B, max {} B \
         ({DEVICES} devices, 16 allocated); whole object without managedFields (4 entries): median {} B",
        entry_bytes[entry_bytes.len() / 2],
        entry_bytes[entry_bytes.len() - 1],
        object_bytes[object_bytes.len() / 2],
    );
    println!(
        "writes per flip (the agent's writes in the API server's audit log during the flips / {FLIPS}): {:.2} \
         ({} writes, {} of them to /status, {} refused)",
        flip_writes.len() as f64 / FLIPS as f64,
        flip_writes.len(),
        status_writes,
        failed
    );
    let idle_from: Vec<usize> = apis.iter().map(|a| a.writes().len()).collect();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let idle: Vec<usize> = apis
        .iter()
        .zip(&idle_from)
        .map(|(a, from)| a.writes().len() - from)
        .collect();
    println!(
        "idle for 6 s (one PodResources poll included): writes per agent (audit log) {idle:?}"
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
    println!("  bench wall time {:.1} s", began.elapsed().as_secs_f64());
    drop(agents);
}
