//! DRA benchmark: prints figures, asserts nothing about time.
//!
//! `cargo bench -p devplug-agent --bench dra`
//!
//! One cluster-mode agent with a DRA policy (64 simulated devices) against
//! the real etcd + kube-apiserver of `devplug-testenv` (the agent's real
//! bound token, straight to the server: not through the test relay, whose
//! hop would count), and the kubelet's
//! side played by this process over the real Unix sockets. On the driver
//! socket it times:
//! - an empty NodePrepareResources (no claims): the floor of one call;
//! - preparing a claim the agent has prepared before (answered from its
//!   checkpoint, as after every kubelet restart);
//! - preparing a new claim: a real ResourceClaim (all created before the
//!   timing) read from the API server, the device checks, the CDI spec and
//!   the checkpoint written;
//! - the same number of GETs of those claims by the agent's identity alone
//!   (the floor the new-claim figure sits on), in turns with the prepares,
//!   and the ratio;
//! - the same GETs again over HTTP/1.1 (kube's default client) and over the
//!   agent's HTTP/2 claim reader, alternating: the protocol's share;
//! - 100 concurrent NodePrepareResources calls for 100 new claims, and the
//!   same 100 GETs alone, all at once (the floor of that figure).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use devplug_proto::dra::v1;
use devplug_proto::pluginregistration as reg;
use futures::StreamExt;
use kube::api::Api;
use serde_json::json;
use support::cluster::Cluster;
use support::podresources::FakePodResources;
use support::{Agent, Node, dial};

const DEVICES: usize = 64;
const CALLS: usize = 2000;
const NEW: usize = 500;
const CONCURRENT: usize = 100;
const NS: &str = "ml";

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// An audit log timestamp.
fn ts(v: &serde_json::Value) -> SystemTime {
    v.as_str()
        .unwrap()
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap()
        .into()
}

/// p50/p99 of the API server's own handling time (audit log: received to
/// answered) of the claim GETs between `from` and `to`, the agent's and
/// this process's apart (each claim `c-<i>` is read twice: by the agent
/// first when `i` is even, by this process first when it is odd), and
/// the count of writes of any kind in that window.
fn server_side(
    api: &Cluster,
    from: SystemTime,
    to: SystemTime,
) -> ((Duration, Duration), (Duration, Duration), usize) {
    let mut by_claim: std::collections::BTreeMap<usize, Vec<(SystemTime, Duration)>> =
        Default::default();
    let mut writes = 0;
    for e in api.audit_events() {
        let recv = ts(&e["requestReceivedTimestamp"]);
        if recv < from || recv > to {
            continue;
        }
        let uri = e["requestURI"].as_str().unwrap_or_default();
        let took = ts(&e["stageTimestamp"])
            .duration_since(recv)
            .unwrap_or_default();
        if e["verb"] == "get" && uri.contains("/resourceclaims/c-") {
            let i: usize = uri.rsplit("/c-").next().unwrap().parse().unwrap();
            by_claim.entry(i).or_default().push((recv, took));
        } else if !matches!(e["verb"].as_str(), Some("get" | "list" | "watch")) {
            writes += 1;
        }
    }
    let (mut agent, mut this) = (Vec::new(), Vec::new());
    for (i, mut v) in by_claim {
        assert_eq!(v.len(), 2, "claim c-{i} read {} times", v.len());
        v.sort();
        let (first, second) = (v[0].1, v[1].1);
        if i % 2 == 0 {
            agent.push(first);
            this.push(second);
        } else {
            this.push(first);
            agent.push(second);
        }
    }
    (p50_p99(&mut agent), p50_p99(&mut this), writes)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn req(uid: &str, name: &str) -> v1::NodePrepareResourcesRequest {
    v1::NodePrepareResourcesRequest {
        claims: vec![claim(uid, name)],
    }
}

fn claim(uid: &str, name: &str) -> v1::Claim {
    v1::Claim {
        namespace: NS.into(),
        uid: uid.into(),
        name: name.into(),
    }
}

fn p50_p99(v: &mut [Duration]) -> (Duration, Duration) {
    (pct(v, 0.5), pct(v, 0.99))
}

fn line(what: &str, (p50, p99): (Duration, Duration), unit: fn(Duration) -> String, note: &str) {
    println!(
        "  {what:<52} p50 {:>10}  p99 {:>10}  {note}",
        unit(p50),
        unit(p99)
    );
}

fn ratio(a: (Duration, Duration), b: (Duration, Duration)) -> String {
    format!(
        "{:.2}x / {:.2}x",
        a.0.as_secs_f64() / b.0.as_secs_f64(),
        a.1.as_secs_f64() / b.1.as_secs_f64()
    )
}

/// Creates the ResourceClaims `names` (allocated to `sim-<device>` of this
/// node), 8 at a time; returns their uids in order.
async fn create_claims(
    api: &Cluster,
    class: &str,
    driver: &str,
    node: &str,
    claims: &[(String, usize)],
) -> Vec<String> {
    let mut uids: Vec<(usize, String)> = futures::stream::iter(claims.iter().enumerate())
        .map(|(i, (name, device))| async move {
            let dev = format!("sim-{device}");
            let uid = api
                .allocated_claim(NS, name, &[("r", class)], &[("r", driver, node, &dev)])
                .await;
            (i, uid)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    uids.sort();
    uids.into_iter().map(|(_, u)| u).collect()
}

/// The GETs of `names`, all started at once with at most `at_once` in
/// flight (a semaphore, as the agent reads); each one's time from the
/// common start to its answer, and the wall time of all.
async fn time_gets_at_once(
    client: kube::Client,
    names: &[String],
    at_once: usize,
) -> (Vec<Duration>, Duration) {
    let api: Api<k8s_openapi::api::resource::v1::ResourceClaim> = Api::namespaced(client, NS);
    // One warm connection, as the agent's is by then.
    for name in names.iter().take(20) {
        api.get(name).await.unwrap();
    }
    let turns = Arc::new(tokio::sync::Semaphore::new(at_once));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for name in names {
        let name = name.clone();
        let api = api.clone();
        let turns = turns.clone();
        tasks.push(tokio::spawn(async move {
            let _turn = turns.acquire().await.unwrap();
            let got = api.get(&name).await.unwrap();
            assert!(got.metadata.uid.is_some());
            start.elapsed()
        }));
    }
    let mut v = Vec::with_capacity(names.len());
    for t in tasks {
        v.push(t.await.unwrap());
    }
    (v, start.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let began = Instant::now();
    let node = Node::new();
    let root = node.tmp.path().join("kubelet");
    // The node's PodResources service (nothing allocated through it).
    let (_pods, _pr) = FakePodResources::start(&node.pod_resources_socket());
    let api = Cluster::start(
        &node.name,
        json!({
            "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
            "metadata": {"name": "bench"},
            "spec": {"resourceName": "bench.example/r", "kubeletApi": "DRA",
                     "source": {"simulated": {"count": DEVICES}}}}),
    )
    .await;
    let driver = devplug_api::dra_driver_name(&api.policy);
    let class = devplug_api::dra_device_class_name(&api.policy);
    devplug_testenv::apply_value(
        &api.admin(),
        &json!({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                "metadata": {"name": class},
                "spec": {"selectors": [{"cel": {"expression": format!("device.driver == {driver:?}")}}]}}),
    )
    .await
    .unwrap();

    // Every claim the figures use, created before any timing.
    let mut specs: Vec<(String, usize)> = vec![("held".into(), 0)];
    specs.extend((0..NEW).map(|i| (format!("c-{i}"), 1 + i % (DEVICES - 1))));
    specs.extend((0..CONCURRENT).map(|i| (format!("p-{i}"), 1 + i % (DEVICES - 1))));
    let created = Instant::now();
    let uids = create_claims(&api, &class, &driver, &node.name, &specs).await;
    let created = created.elapsed();
    let held_uid = uids[0].clone();
    let fresh_claims: Vec<(String, String)> = (0..NEW)
        .map(|i| (format!("c-{i}"), uids[1 + i].clone()))
        .collect();
    let par_claims: Vec<(String, String)> = (0..CONCURRENT)
        .map(|i| (format!("p-{i}"), uids[1 + NEW + i].clone()))
        .collect();

    // The runtime's CDI directory, /var/run/cdi, is a tmpfs on the nodes
    // we know, as here: the claim specs' fsyncs cost nothing there, while
    // the claim checkpoint (under the kubelet's root, on disk) is fsynced
    // for real.
    let cdi_tmpfs = tempfile::Builder::new()
        .prefix("devplug-bench-cdi-")
        .tempdir_in("/dev/shm")
        .unwrap();
    std::os::unix::fs::symlink(cdi_tmpfs.path(), node.cdi()).unwrap();
    println!(
        "  CDI directory on tmpfs ({}), as /var/run/cdi; checkpoint on disk ({})",
        cdi_tmpfs.path().display(),
        root.display()
    );
    let kc = api.kubeconfig_direct(node.tmp.path());
    let _agent = Agent::spawn_cluster_with(
        &node,
        &api.policy,
        &kc,
        &[
            "--admin-addr",
            "off",
            "--kubelet-root",
            root.to_str().unwrap(),
        ],
    );
    let reg_sock = root.join(format!("plugins_registry/{driver}-reg.sock"));
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
    let mut c =
        v1::dra_plugin_client::DraPluginClient::new(dial(Path::new(&info.endpoint)).await.unwrap());
    // The agent is serving its inventory once its pool is published.
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.slices().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the agent never published its pool"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "devplug DRA benchmark: 1 cluster-mode agent, {DEVICES} simulated devices, real kube-apiserver \
         (devplug-testenv; the agent's bound token, no relay), release build"
    );
    println!(
        "  setup: {} ResourceClaims created (and allocated) before any timing in {:.1} s",
        specs.len(),
        created.as_secs_f64()
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
    let floor = p50_p99(&mut empty);

    let first = c
        .node_prepare_resources(req(&held_uid, "held"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.claims[&held_uid].error, "");
    let mut again = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        let r = c
            .node_prepare_resources(req(&held_uid, "held"))
            .await
            .unwrap();
        again.push(t.elapsed());
        assert_eq!(r.into_inner().claims[&held_uid].error, "");
    }
    let again = p50_p99(&mut again);

    // New claims, one call each, unprepared after each (the checkpoint
    // holds one other claim throughout), and the GET of the same claim
    // alone by the agent's identity from this process: interleaved, in
    // turns (prepare first on even claims, the GET first on odd ones), so
    // the figure and its floor see the same machine. On this shared
    // 2-core machine, runs done one after the other differed by up to 2x.
    let reader: Api<k8s_openapi::api::resource::v1::ResourceClaim> =
        Api::namespaced(api.agent_client(), NS);
    // Warm the connection, as the agent's is by then.
    const WARM: usize = 50;
    for (name, _) in fresh_claims.iter().take(WARM) {
        reader.get(name).await.unwrap();
    }
    let fresh_from = SystemTime::now();
    let mut fresh = Vec::with_capacity(NEW);
    let mut get = Vec::with_capacity(NEW);
    for (i, (name, uid)) in fresh_claims.iter().enumerate() {
        for prepare_turn in [i % 2 == 0, i % 2 == 1] {
            if prepare_turn {
                let t = Instant::now();
                let r = c.node_prepare_resources(req(uid, name)).await.unwrap();
                fresh.push(t.elapsed());
                let r = r.into_inner();
                assert_eq!(r.claims[uid].error, "", "{name}");
                assert_eq!(r.claims[uid].devices.len(), 1);
                c.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                    claims: vec![claim(uid, name)],
                })
                .await
                .unwrap();
            } else {
                let t = Instant::now();
                let got = reader.get(name).await.unwrap();
                get.push(t.elapsed());
                assert_eq!(got.metadata.uid.as_deref(), Some(uid.as_str()));
            }
        }
    }
    let fresh = p50_p99(&mut fresh);
    let get = p50_p99(&mut get);
    let fresh_to = SystemTime::now();
    // This process's claim GETs so far: the warm-up and one per claim.
    let this_reads = WARM + NEW;

    // 100 pods' claims at once: 100 concurrent calls on the one connection
    // (as the kubelet multiplexes them), one new claim each.
    let start = Arc::new(tokio::sync::Barrier::new(CONCURRENT + 1));
    let mut tasks = Vec::new();
    for (name, uid) in par_claims.clone() {
        let mut c = c.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let t = Instant::now();
            let r = c.node_prepare_resources(req(&uid, &name)).await.unwrap();
            let took = t.elapsed();
            let r = r.into_inner();
            assert_eq!(r.claims[&uid].error, "", "{name}");
            assert_eq!(r.claims[&uid].devices.len(), 1);
            took
        }));
    }
    start.wait().await;
    let wall = Instant::now();
    let mut par = Vec::with_capacity(CONCURRENT);
    for t in tasks {
        par.push(t.await.unwrap());
    }
    let wall = wall.elapsed();
    let par = p50_p99(&mut par);
    c.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
        claims: par_claims.iter().map(|(n, u)| claim(u, n)).collect(),
    })
    .await
    .unwrap();
    // The protocol's share of the read: the same claims read again by the
    // agent's identity over kube's default client (HTTP/1.1, one warm
    // connection) and over the agent's reader (HTTP/2, `http2::client`),
    // alternating, with nothing else running.
    let (h1, h2) = {
        let kubeconfig = kube::config::Kubeconfig::read_from(&kc).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let over_h2 = devplug_agent::http2::client(&config).unwrap();
        devplug_agent::http2::warm(&over_h2).await;
        let over_h2: Api<k8s_openapi::api::resource::v1::ResourceClaim> =
            Api::namespaced(over_h2, NS);
        let over_h1: Api<k8s_openapi::api::resource::v1::ResourceClaim> =
            Api::namespaced(kube::Client::try_from(config).unwrap(), NS);
        for (name, _) in fresh_claims.iter().take(WARM) {
            over_h1.get(name).await.unwrap();
            over_h2.get(name).await.unwrap();
        }
        let (mut h1, mut h2) = (Vec::with_capacity(NEW), Vec::with_capacity(NEW));
        for (i, (name, _)) in fresh_claims.iter().enumerate() {
            for h2_turn in [i % 2 == 0, i % 2 == 1] {
                let t = Instant::now();
                if h2_turn {
                    over_h2.get(name).await.unwrap();
                    h2.push(t.elapsed());
                } else {
                    over_h1.get(name).await.unwrap();
                    h1.push(t.elapsed());
                }
            }
        }
        (p50_p99(&mut h1), p50_p99(&mut h2))
    };
    let protocol_reads = 2 * (WARM + NEW);
    let reads = api.claim_reads() - this_reads - protocol_reads;
    // The same 100 GETs alone, at once: the floor of the concurrent figure.
    // Both ways a client may send them (a fresh client each, one warm
    // connection): all at once (a new TLS connection for each request the
    // warm one is busy with; HTTP/1.1), and at most as many at once as the
    // agent reads.
    let par_names: Vec<String> = par_claims.iter().map(|(n, _)| n.clone()).collect();
    let (mut all_once, all_wall) =
        time_gets_at_once(api.agent_client(), &par_names, CONCURRENT).await;
    let (mut limited, limited_wall) = time_gets_at_once(
        api.agent_client(),
        &par_names,
        devplug_agent::dra::server::READS_AT_ONCE,
    )
    .await;
    let all_once = p50_p99(&mut all_once);
    let limited = p50_p99(&mut limited);
    let par_floor = if limited.1 < all_once.1 {
        limited
    } else {
        all_once
    };
    let (fresh_server, get_server, fresh_writes) = server_side(&api, fresh_from, fresh_to);

    println!("NodePrepareResources on the driver socket, one call at a time (wall time per call):");
    line(
        "no claims (the floor of one gRPC call)",
        floor,
        us,
        &format!("{CALLS} calls"),
    );
    line(
        "claim prepared before (from the checkpoint)",
        again,
        us,
        &format!("{CALLS} calls; {} the floor", ratio(again, floor)),
    );
    line(
        "new claim (ResourceClaim GET + checks + CDI + ckpt)",
        fresh,
        us,
        &format!("{NEW} claims; {} the floor", ratio(fresh, floor)),
    );
    println!(
        "GET of the same ResourceClaims by the agent's identity, alone (this process, in turns with the prepares):"
    );
    line(
        "GET (Api<ResourceClaim>::get, as the agent reads)",
        get,
        us,
        &format!("{NEW} GETs"),
    );
    println!(
        "  new-claim prepare / GET: {} (p50 / p99; issue target <= 1.5x)",
        ratio(fresh, get)
    );
    println!(
        "  new-claim prepare - GET: p50 {}  p99 {} (what the agent adds to the read)",
        us(fresh.0.saturating_sub(get.0)),
        us(fresh.1.saturating_sub(get.1))
    );
    println!(
        "  the API server's own handling of each GET (audit log, received -> answered): the agent's \
         p50 {} p99 {}; this process's p50 {} p99 {}",
        us(fresh_server.0),
        us(fresh_server.1),
        us(get_server.0),
        us(get_server.1)
    );
    println!(
        "  the agent's writes to the API server during the {NEW} new-claim prepares/unprepares (audit log): {fresh_writes}"
    );
    println!(
        "the same GETs again by the agent's identity, alternating, nothing else running (the protocol's share):"
    );
    line(
        "over HTTP/1.1 (kube's default client)",
        h1,
        us,
        &format!("{NEW} GETs"),
    );
    line(
        "over HTTP/2 (the agent's claim reader)",
        h2,
        us,
        &format!("{NEW} GETs; {} the HTTP/1.1 ones", ratio(h2, h1)),
    );
    println!(
        "{CONCURRENT} concurrent NodePrepareResources calls, one new claim each, on one node (one connection):"
    );
    line(
        "per call, from its send to its answer",
        par,
        ms,
        &format!(
            "all {CONCURRENT} answered in {}; issue target p99 <= 100 ms + one GET (= {})",
            ms(wall),
            ms(Duration::from_millis(100) + get.1)
        ),
    );
    println!("the same {CONCURRENT} GETs alone, started at once (this process):");
    line(
        "all at once",
        all_once,
        ms,
        &format!("all answered in {}", ms(all_wall)),
    );
    line(
        &format!(
            "at most {} at a time (as the agent reads)",
            devplug_agent::dra::server::READS_AT_ONCE
        ),
        limited,
        ms,
        &format!("all answered in {}", ms(limited_wall)),
    );
    println!(
        "  concurrent prepares - the faster GETs alone: p50 {}  p99 {} (what the agent adds; issue target p99 <= 100 ms)",
        ms(par.0.saturating_sub(par_floor.0)),
        ms(par.1.saturating_sub(par_floor.1))
    );
    println!(
        "  the agent's ResourceClaim GETs in the audit log (this process's GETs above left out): {reads} \
         (expected {}: one per new claim)",
        1 + NEW + CONCURRENT
    );
    println!("  bench wall time {:.1} s", began.elapsed().as_secs_f64());
}
