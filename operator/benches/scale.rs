//! Scale benchmark against a real API server: `make bench-scale` (not part
//! of `make test`). Prints figures; asserts nothing about time.
//!
//! Uses `KUBECONFIG` (default: the cluster kit's admin kubeconfig) and
//! `SCALE_NODES` (default `500,1000,2000,5000`; the fleet grows from one
//! size to the next). Per size it builds a simulated fleet the way a real
//! one looks to the control plane:
//! - N Node objects, tainted `devplug.io/bench=true:NoSchedule` so no real
//!   pod lands there, with a Ready condition and a node Lease renewed every
//!   20 s, a slice of the fleet each second (as kubelets do; KWOK does the
//!   same), so the node lifecycle
//!   controller leaves them and their pods alone; one it marks not Ready
//!   anyway (a lease renewed late on a saturated API server: seen at 2,000
//!   nodes) is posted Ready again with its pods, as its kubelet would, and
//!   the count is printed;
//! - per node and policy, an agent pod bound to the node, Running and Ready,
//!   labelled like the operator's agents (4 policies: 4 pods per node);
//! - per node and policy, the NodeDeviceStatus entry applied exactly as the
//!   agent applies it (its field manager, its payload: 64 devices, 8 held).
//!
//! The released operator binary runs against it (out of cluster, leader
//! election on, as the chart runs it) and the benchmark prints, per size: the operator's peak
//! RSS and CPU seconds per minute and its API requests per second by verb
//! (its own `devplug_operator_api_requests_total`), at steady state (60 s,
//! once the operator has caught up with the fleet: no write for 15 s, and
//! how long that took is printed) and during a burst; the time from 500 devices flipping Unhealthy across the
//! fleet to the policy status showing them, and back; the time from
//! applying a new policy to its DaemonSet existing and its status written;
//! a failover (a standby started and ready, which means its stores have
//! listed the cluster; then the leader sent SIGTERM while one device flips):
//! time to the new leader and to its status showing the flip, its writes
//! and the policy Events meanwhile; and the API server's RSS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fleet;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devplug_api::{DevicePluginPolicy, NodeDeviceStatus, agent_manager};
use fleet::{DEVICES, HELD, POLICIES, entry, node_name, policy_name, resource};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const NS: &str = "devplug-bench";
const CONCURRENCY: usize = 64;
const FLIPS: usize = 500;
/// No operator write for this long: it has caught up with the fleet.
const QUIET: Duration = Duration::from_secs(15);
const METRICS: &str = "127.0.0.1:18931";
const METRICS_B: &str = "127.0.0.1:18932";
const BENCH_LABEL: &str = "devplug.io/bench";

/// Runs `f` over `items` with bounded concurrency; panics on the first error.
async fn each<T, R, F, Fut>(items: Vec<T>, f: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<R, kube::Error>>,
{
    let results: Vec<_> = futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("API error while building the fleet: {e}")))
        .collect()
}

/// What the bench's own NodeDeviceStatus watch delivered while recording:
/// each object's resourceVersion and when it arrived. It shares the API
/// server's watch cache with the operator's watch, so it tells how much of
/// a burst's latency is the API server's and how much the operator's.
/// (resourceVersions are opaque to clients; the kit's etcd revisions are
/// numbers, and this diagnostic compares them as such.)
#[derive(Clone, Default)]
struct WatchLog(std::sync::Arc<std::sync::Mutex<Option<Vec<Seen>>>>);

/// A resourceVersion and when the watch delivered it.
type Seen = (u64, Instant);

impl WatchLog {
    fn start(client: &Client) -> WatchLog {
        let log = WatchLog::default();
        let rec = log.clone();
        // Metadata only: the resourceVersion is all it reads.
        let api: Api<kube::core::PartialObjectMeta<NodeDeviceStatus>> = Api::all(client.clone());
        tokio::spawn(async move {
            use kube::runtime::WatchStreamExt;
            let s = kube::runtime::watcher(api, kube::runtime::watcher::Config::default())
                .default_backoff();
            let mut s = std::pin::pin!(s);
            while let Some(ev) = s.next().await {
                if let Ok(kube::runtime::watcher::Event::Apply(o)) = ev
                    && let Some(v) = o.metadata.resource_version.and_then(|v| v.parse().ok())
                    && let Some(seen) = rec.0.lock().unwrap().as_mut()
                {
                    seen.push((v, Instant::now()));
                }
            }
        });
        log
    }

    /// Starts recording afresh.
    fn record(&self) {
        *self.0.lock().unwrap() = Some(Vec::new());
    }

    /// When the watch first delivered `rv` or a later version.
    fn seen(&self, rv: u64) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .as_ref()?
            .iter()
            .find(|(v, _)| *v >= rv)
            .map(|(_, at)| *at)
    }
}

/// Applies an agent's entry exactly as the agent does (reporter.rs).
async fn write_entry(
    client: &Client,
    k: usize,
    i: usize,
    unhealthy: bool,
) -> Result<u64, kube::Error> {
    let api: Api<NodeDeviceStatus> = Api::all(client.clone());
    let node = node_name(i);
    let pp = PatchParams::apply(&agent_manager(&policy_name(k))).force();
    let body = json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": node},
        "status": {"resources": [entry(k, i, unhealthy)]},
    });
    let rv = |o: NodeDeviceStatus| {
        o.metadata
            .resource_version
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    match api.patch_status(&node, &pp, &Patch::Apply(&body)).await {
        Ok(o) => Ok(rv(o)),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let obj = json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                             "metadata": {"name": node}, "spec": {"nodeName": node}});
            api.patch(&node, &pp, &Patch::Apply(&obj)).await?;
            Ok(rv(api
                .patch_status(&node, &pp, &Patch::Apply(&body))
                .await?))
        }
        Err(e) => Err(e),
    }
}

/// Now as a metav1.Time (whole seconds).
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Now as a metav1.MicroTime (exactly six fractional digits).
fn now_micro() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// Each simulated node's Lease is renewed every `renew_every()` seconds,
/// one slice of the fleet each second (as a fleet's kubelets spread their
/// renewals), by a merge patch of `renewTime` (a kubelet updates its cached
/// Lease; an apply costs the API server more). The node lifecycle
/// controller allows 50 s (`--node-monitor-grace-period`, v1.32+) before it
/// marks a node not Ready: every 20 s by default, and a quarter of
/// `SCALE_NODE_GRACE` when the kit's controller manager was given that
/// longer grace (`hack/kit-node-grace.sh`, `make bench-scale
/// SCALE_NODE_GRACE=600`).
fn renew_every() -> usize {
    static EVERY: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("SCALE_NODE_GRACE")
            .ok()
            .and_then(|g| g.trim().parse::<usize>().ok())
            .map_or(20, |g| (g / 4).max(20))
    })
}
/// Lease renewals in flight at most.
const RENEWING: usize = 16;

async fn touch_lease(client: &Client, i: usize) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let body = json!({"spec": {"renewTime": now_micro()}});
    api.patch(&node_name(i), &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(|_| ())
}

/// Creates (or takes over) a simulated node's Lease.
async fn renew_lease(client: &Client, i: usize) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let name = node_name(i);
    let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_micro()}});
    api.patch(
        &name,
        &PatchParams::apply("devplug-bench").force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

/// Creates `obj` unless it exists already (a rerun over a partial fleet).
async fn create_or_exists<K>(api: &Api<K>, obj: Value) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// One simulated node: the Node (tainted, Ready), its Lease, and one Ready
/// agent pod per policy.
async fn add_node(client: &Client, i: usize) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = node_name(i);
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {BENCH_LABEL: "true", "kubernetes.io/hostname": name}},
        "spec": {"taints": [{"key": BENCH_LABEL, "value": "true", "effect": "NoSchedule"}]}});
    create_or_exists(&nodes, node).await?;
    let uid = nodes.get(&name).await?.metadata.uid.unwrap_or_default();
    let now = now_rfc3339();
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "simulated by devplug's scale bench", "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    renew_lease(client, i).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for k in 0..POLICIES {
        let pod_name = format!("agent-{}-{name}", policy_name(k));
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            // Controlled by its Node: the policy's DaemonSet (same labels)
            // neither adopts nor deletes it, and it goes with the Node.
            "metadata": {"name": pod_name, "labels": {
                "app.kubernetes.io/name": "devplug-agent", "devplug.io/policy": policy_name(k)},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid,
                                     "controller": true}]},
            "spec": {"nodeName": name, "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "agent", "image": "registry.k8s.io/pause:3.10"}]}});
        create_or_exists(&pods, pod).await?;
        let st = json!({"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [{"name": "agent", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.k8s.io/pause:3.10", "imageID": "", "state": {"running": {"startedAt": now}}}]}});
        pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&st))
            .await?;
    }
    Ok(())
}

/// What a kubelet does that the lease alone does not: when the node
/// lifecycle controller has marked a simulated node not Ready (its lease was
/// renewed too late on a saturated API server) and with it the node's pods,
/// the node's status is posted Ready again and its agent pods' Ready
/// condition set again. Returns how many nodes it revived.
async fn revive(client: &Client) -> usize {
    let nodes: Api<Node> = Api::all(client.clone());
    let Ok(list) = nodes
        .list(&ListParams::default().labels(&format!("{BENCH_LABEL}=true")))
        .await
    else {
        return 0;
    };
    let down: Vec<String> = list
        .items
        .iter()
        .filter(|n| {
            !n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|n| n.name_any())
        .collect();
    let revived = down.len();
    futures::stream::iter(down.into_iter().map(|name| {
        let client = client.clone();
        async move {
            let now = now_rfc3339();
            let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "simulated by devplug's scale bench", "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
            let _ = Api::<Node>::all(client.clone())
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
            let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
            for k in 0..POLICIES {
                let st = json!({"status": {"conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}});
                let _ = pods
                    .patch_status(
                        &format!("agent-{}-{name}", policy_name(k)),
                        &PatchParams::default(),
                        &Patch::Strategic(&st),
                    )
                    .await;
            }
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    revived
}

fn policy(k: usize) -> Value {
    json!({"apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": policy_name(k)},
        "spec": {"resourceName": resource(k), "nodeSelector": {BENCH_LABEL: "true"},
                 "source": {"simulated": {"count": DEVICES}}}})
}

/// `healthy/total` of every bench policy, as its status says.
async fn healthy_of(client: &Client, k: usize) -> Option<String> {
    let api: Api<DevicePluginPolicy> = Api::all(client.clone());
    api.get_opt(&policy_name(k))
        .await
        .ok()
        .flatten()
        .and_then(|p| p.status.and_then(|s| s.devices_healthy))
}

/// Waits until every policy in `ks` reads `want`; returns the time taken.
async fn wait_healthy(
    client: &Client,
    ks: &[usize],
    want: &str,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for &k in ks {
            if healthy_of(client, k).await.as_deref() != Some(want) {
                all = false;
                break;
            }
        }
        if all {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator's counters: requests by verb and writes in total.
#[derive(Default, Clone, Debug)]
struct Counters {
    requests: BTreeMap<String, f64>,
    writes: BTreeMap<String, f64>,
}

async fn scrape_at(addr: &str) -> Counters {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = Counters::default();
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return c;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    for line in body.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if let Some(rest) = name.strip_prefix("devplug_operator_api_requests_total{verb=\"") {
            // One series per verb and status code: summed per verb.
            let verb = rest.split('"').next().unwrap_or_default().to_string();
            *c.requests.entry(verb).or_default() += v;
        } else if let Some(rest) = name.strip_prefix("devplug_operator_api_writes_total{kind=\"") {
            c.writes.insert(rest.trim_end_matches("\"}").to_string(), v);
        }
    }
    c
}

fn rates(before: &Counters, after: &Counters, secs: f64) -> String {
    let mut parts = Vec::new();
    let mut total = 0.0;
    for (verb, v) in &after.requests {
        let d = v - before.requests.get(verb).copied().unwrap_or(0.0);
        total += d;
        if d > 0.0 {
            parts.push(format!("{verb} {:.2}", d / secs));
        }
    }
    let mut writes = Vec::new();
    let mut written = 0.0;
    for (kind, v) in &after.writes {
        let d = v - before.writes.get(kind).copied().unwrap_or(0.0);
        written += d;
        if d > 0.0 {
            writes.push(format!("{kind} {d:.0}"));
        }
    }
    format!(
        "{:.2} req/s ({}), {written:.0} writes ({})",
        total / secs,
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        },
        if writes.is_empty() {
            "none".into()
        } else {
            writes.join(", ")
        }
    )
}

fn proc_field(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    // Clock ticks per second, asked once.
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tick = *TICK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0)
    });
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick)
        })
        .unwrap_or(0.0)
}

fn apiserver_pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-xo", "kube-apiserver"])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Everything the bench made, gone.
async fn cleanup(client: &Client) {
    let dp = DeleteParams::background();
    let policies: Api<DevicePluginPolicy> = Api::all(client.clone());
    let mut names: Vec<String> = (0..POLICIES).map(policy_name).collect();
    names.push("bench-new".into());
    for n in &names {
        let _ = policies
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
            )
            .await;
        let _ = policies.delete(n, &dp).await;
    }
    // No kubelet confirms the deletion of a simulated agent pod: delete
    // them at once, or they (and the namespace) stay Terminating.
    let at_once = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let _ = Api::<Pod>::namespaced(client.clone(), NS)
        .delete_collection(&at_once, &ListParams::default())
        .await;
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes
        .delete_collection(
            &dp,
            &ListParams::default().labels(&format!("{BENCH_LABEL}=true")),
        )
        .await;
    let nds: Api<NodeDeviceStatus> = Api::all(client.clone());
    if let Ok(list) = nds.list_metadata(&ListParams::default()).await {
        for o in list.items {
            if o.name_any().starts_with("bench-node-") {
                let _ = nds.delete(&o.name_any(), &dp).await;
            }
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    if let Ok(list) = leases.list_metadata(&ListParams::default()).await {
        for o in list.items {
            if o.name_any().starts_with("bench-node-") {
                let _ = leases.delete(&o.name_any(), &dp).await;
            }
        }
    }
    for n in &names {
        let agent = format!("devplug-agent-{n}");
        let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone())
            .delete(&agent, &dp)
            .await;
        let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
            .delete(&agent, &dp)
            .await;
    }
    let _ = Api::<Namespace>::all(client.clone()).delete(NS, &dp).await;
    // Wait for the namespace to go, so a next run can create it again. The
    // namespace controller deletes what is left with the default grace,
    // which no kubelet confirms for a simulated pod: those are deleted at
    // once again while waiting (20,000 of them took minutes).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_push = Instant::now();
    while Api::<Namespace>::all(client.clone())
        .get_opt(NS)
        .await
        .ok()
        .flatten()
        .is_some()
        && Instant::now() < deadline
    {
        if last_push.elapsed() > Duration::from_secs(10) {
            let _ = Api::<Pod>::namespaced(client.clone(), NS)
                .delete_collection(&at_once, &ListParams::default())
                .await;
            last_push = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A running operator process: killed when dropped.
struct Operator {
    child: Child,
    metrics: &'static str,
}

impl Operator {
    /// Starts the released operator with leader election on, as
    /// `identity`, serving /metrics on `metrics`.
    fn start(kubeconfig: &str, identity: &str, metrics: &'static str) -> Operator {
        let child = Command::new(env!("CARGO_BIN_EXE_devplug-operator"))
            .args([
                "--namespace",
                NS,
                "--leader-elect",
                "true",
                "--lease-name",
                "devplug-bench",
                "--metrics-addr",
                metrics,
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", identity)
            .env("DEVPLUG_NAMESPACE_POD_SECURITY", "")
            .env(
                "DEVPLUG_LOG",
                std::env::var("DEVPLUG_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the operator");
        Operator { child, metrics }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The other of the two metrics addresses.
fn other(addr: &'static str) -> &'static str {
    if addr == METRICS { METRICS_B } else { METRICS }
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), NS)
        .get_opt("devplug-bench")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec.and_then(|s| s.holder_identity))
}

/// Events about the bench policies, by reason, summing their counts.
async fn policy_events(client: &Client) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let lp = ListParams::default().fields("involvedObject.kind=DevicePluginPolicy");
    if let Ok(list) = Api::<k8s_openapi::api::core::v1::Event>::all(client.clone())
        .list(&lp)
        .await
    {
        for e in list.items {
            if e.involved_object
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("bench-"))
            {
                *out.entry(e.reason.unwrap_or_default()).or_default() +=
                    i64::from(e.count.unwrap_or(1));
            }
        }
    }
    out
}

/// Whether a GET of `path` answered 200.
async fn http_ok(addr: &str, path: &str) -> Option<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    // "HTTP/1.0 200 OK": the server answers in the request's version.
    (body.split_whitespace().nth(1) == Some("200")).then_some(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let kubeconfig = std::env::var("KUBECONFIG")
        .unwrap_or_else(|_| "/var/lib/devplug-cluster/admin.kubeconfig".into());
    let sizes: Vec<usize> = std::env::var("SCALE_NODES")
        .unwrap_or_else(|_| "500,1000,2000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let config = match kube::config::Kubeconfig::read_from(&kubeconfig) {
        Ok(k) => kube::Config::from_custom_kubeconfig(k, &Default::default())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let client = match config.and_then(|c| Client::try_from(c).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => {
            println!(
                "bench-scale: SKIPPED, no API server ({e}); set KUBECONFIG or bring the kit up"
            );
            return;
        }
    };
    println!(
        "devplug operator scale benchmark: {POLICIES} policies, {DEVICES} devices per node and policy ({HELD} held), sizes {sizes:?}; node Leases renewed every {} s ({})",
        renew_every(),
        std::env::var("SCALE_NODE_GRACE").map_or(
            "the node lifecycle controller's default grace, 50 s".to_string(),
            |g| format!("SCALE_NODE_GRACE={g}: the kit's node lifecycle controller given {g} s")
        )
    );
    // SCALE_KEEP=1: the fleet a run leaves is kept, and a run that finds
    // one starts from it (a 5,000-node fleet takes half an hour to build on
    // this machine; a change to the operator is measured again in minutes).
    let keep = std::env::var("SCALE_KEEP").is_ok_and(|v| v == "1");
    let kept = if keep {
        Api::<Node>::all(client.clone())
            .list_metadata(&ListParams::default().labels(&format!("{BENCH_LABEL}=true")))
            .await
            .map_or(0, |l| l.items.len())
    } else {
        0
    };
    if kept == 0 {
        cleanup(&client).await;
    } else {
        println!(
            "SCALE_KEEP=1: starting from the {kept} simulated nodes (with their pods and entries) a run left"
        );
    }
    let exists = |r: Result<_, kube::Error>, what: &str| match r {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 && kept > 0 => {}
        Err(e) => panic!("{what}: {e}"),
    };
    exists(
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
            )
            .await
            .map(|_| ()),
        "creating the bench namespace",
    );
    let policies: Api<DevicePluginPolicy> = Api::all(client.clone());
    for k in 0..POLICIES {
        exists(
            policies
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(policy(k)).unwrap(),
                )
                .await
                .map(|_| ()),
            "creating a bench policy (are the CRDs applied?)",
        );
    }

    let mut op = Operator::start(&kubeconfig, "bench-operator-0", METRICS);
    let mut generation = 0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "operator RSS before the fleet: {:.1} MiB",
        proc_field(op.pid(), "VmRSS:")
    );

    // Leases renewed every renew_every() s for every node so far, one slice a
    // second; the longest time a slice went between renewals is printed.
    let fleet = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Nodes the lifecycle controller marked not Ready and the simulated
    // kubelets revived, so far.
    let revived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let renew_gap = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let renewer = {
        let client = client.clone();
        let fleet = fleet.clone();
        let renew_gap = renew_gap.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let last = std::sync::Arc::new(std::sync::Mutex::new(vec![None; renew_every()]));
            // At most RENEWING renewals in flight, however far behind the
            // API server is (without a cap, slices that overlapped piled up
            // hundreds of requests and starved everyone else's); a slice
            // still being renewed is not started again, so a slow API
            // server shows as a longer gap, not as a growing queue.
            let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(RENEWING));
            let busy = std::sync::Arc::new(
                (0..renew_every())
                    .map(|_| std::sync::atomic::AtomicBool::new(false))
                    .collect::<Vec<_>>(),
            );
            for t in 0usize.. {
                tick.tick().await;
                let slice = t % renew_every();
                if busy[slice].swap(true, std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let n = fleet.load(std::sync::atomic::Ordering::SeqCst);
                let (client, last, gap) = (client.clone(), last.clone(), renew_gap.clone());
                let (permits, busy) = (permits.clone(), busy.clone());
                tokio::spawn(async move {
                    let _ = futures::stream::iter((slice..n).step_by(renew_every()).map(|i| {
                        let (c, permits) = (client.clone(), permits.clone());
                        async move {
                            let _permit = permits.acquire().await;
                            touch_lease(&c, i).await
                        }
                    }))
                    .buffer_unordered(RENEWING)
                    .collect::<Vec<_>>()
                    .await;
                    let now = Instant::now();
                    let mut last = last.lock().unwrap();
                    if let Some(before) = last[slice].replace(now) {
                        let mut g = gap.lock().unwrap();
                        *g = (*g).max(now.duration_since(before));
                    }
                    busy[slice].store(false, std::sync::atomic::Ordering::SeqCst);
                });
            }
        })
    };
    let reviver = {
        let client = client.clone();
        let revived = revived.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(renew_every() as u64)).await;
                revived.fetch_add(revive(&client).await, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };

    let watch_log = WatchLog::start(&client);
    let all: Vec<usize> = (0..POLICIES).collect();
    let mut have = 0;
    if kept > 0 {
        fleet.store(kept, std::sync::atomic::Ordering::SeqCst);
        have = kept;
    }
    let start_at = have;
    for &n in sizes.iter().filter(|&&n| n >= start_at) {
        println!("\n== {n} nodes ==");
        let pid = op.pid();
        let metrics = op.metrics;
        let scrape = || scrape_at(metrics);
        let (c0, cpu0, t0) = (scrape().await, cpu_secs(pid), Instant::now());
        // A node's lease is renewed from its creation on (renewing one not
        // created yet fails harmlessly), not from the end of the growth.
        each((have..n).collect(), |i| {
            let c = client.clone();
            let fleet = fleet.clone();
            async move {
                fleet.fetch_max(i + 1, std::sync::atomic::Ordering::SeqCst);
                add_node(&c, i).await
            }
        })
        .await;
        let pairs: Vec<(usize, usize)> = (have..n)
            .flat_map(|i| (0..POLICIES).map(move |k| (k, i)))
            .collect();
        each(pairs, |(k, i)| {
            let c = client.clone();
            async move { write_entry(&c, k, i, false).await }
        })
        .await;
        let built = t0.elapsed();
        let want = format!("{}/{}", n * DEVICES, n * DEVICES);
        let settled = wait_healthy(&client, &all, &want, Duration::from_secs(600)).await;
        let grow_secs = t0.elapsed().as_secs_f64();
        let c1 = scrape().await;
        println!(
            "fleet grown {have} -> {n} nodes in {:.1} s; every policy status {want} after {}; operator while it grew: {}, CPU {:.1} s",
            built.as_secs_f64(),
            settled.map_or("NEVER (10 min)".to_string(), |d| format!(
                "{:.1} s more",
                d.as_secs_f64()
            )),
            rates(&c0, &c1, grow_secs),
            cpu_secs(pid) - cpu0
        );
        have = n;

        // Catching up: the operator's watch lags a loaded API server, and a
        // node's summary and labels are written 10 s after a change, so it
        // still writes for a while after every policy status is full.
        // Steady state starts once it has written nothing for QUIET.
        let (c0, t0) = (scrape().await, Instant::now());
        let mut last = c0.writes.values().sum::<f64>();
        let mut still = Instant::now();
        while still.elapsed() < QUIET && t0.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let w = scrape().await.writes.values().sum::<f64>();
            if w != last {
                last = w;
                still = Instant::now();
            }
        }
        let caught_up = still.duration_since(t0);
        println!(
            "operator caught up: its last write {:.1} s after every policy status was full (quiet for {} s{}); meanwhile: {}",
            caught_up.as_secs_f64(),
            QUIET.as_secs(),
            if still.elapsed() < QUIET {
                ", NOT reached within 10 min"
            } else {
                ""
            },
            rates(&c0, &scrape().await, t0.elapsed().as_secs_f64())
        );

        // Steady state: nothing changes for 60 s.
        let (c0, cpu0, t0) = (scrape().await, cpu_secs(pid), Instant::now());
        tokio::time::sleep(Duration::from_secs(60)).await;
        let secs = t0.elapsed().as_secs_f64();
        let rss_at_rest = proc_field(pid, "VmRSS:");
        println!(
            "steady 60 s: {}, CPU {:.2} s/min, RSS {:.1} MiB (peak {:.1} MiB)",
            rates(&c0, &scrape().await, secs),
            (cpu_secs(pid) - cpu0) * 60.0 / secs,
            proc_field(pid, "VmRSS:"),
            proc_field(pid, "VmHWM:")
        );

        // Burst: 500 devices (one per node) of policy 0 go Unhealthy.
        let flips: Vec<usize> = (0..FLIPS.min(n)).collect();
        // The bench's own watch says when the API server delivered the
        // last write of each half, to anyone watching.
        let lag = |log: &WatchLog, rvs: &[u64], written: Instant| {
            let rv = rvs.iter().copied().max().unwrap_or(0);
            log.seen(rv).map_or("NEVER".to_string(), |at| {
                format!(
                    "{:.2} s",
                    at.saturating_duration_since(written).as_secs_f64()
                )
            })
        };
        watch_log.record();
        let (c0, cpu0, t0) = (scrape().await, cpu_secs(pid), Instant::now());
        let rvs = each(flips.clone(), |i| {
            let c = client.clone();
            async move { write_entry(&c, 0, i, true).await }
        })
        .await;
        let down_written = t0.elapsed();
        let down = format!("{}/{}", n * DEVICES - flips.len(), n * DEVICES);
        let shown = wait_healthy(&client, &[0], &down, Duration::from_secs(300)).await;
        let flipped = t0.elapsed();
        let down_watched = lag(&watch_log, &rvs, t0 + down_written);
        // The operator's own share: from the watch delivering the fleet's
        // last write to the status showing it.
        let own = |log: &WatchLog, rvs: &[u64], shown_at: Instant| {
            let rv = rvs.iter().copied().max().unwrap_or(0);
            log.seen(rv).map_or("NEVER".to_string(), |at| {
                format!(
                    "{:.2} s",
                    shown_at.saturating_duration_since(at).as_secs_f64()
                )
            })
        };
        let down_own = own(&watch_log, &rvs, t0 + flipped);
        watch_log.record();
        let t1 = Instant::now();
        let rvs = each(flips.clone(), |i| {
            let c = client.clone();
            async move { write_entry(&c, 0, i, false).await }
        })
        .await;
        let up_written = t1.elapsed();
        let back = wait_healthy(&client, &[0], &want, Duration::from_secs(300)).await;
        let up_watched = lag(&watch_log, &rvs, t1 + up_written);
        let up_own = own(&watch_log, &rvs, t1 + up_written + back.unwrap_or_default());
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "burst: {} devices Unhealthy (the fleet's writes took {:.2} s) -> policy status {down} {} after the first write, {} after the last (the API server's watch delivered the last write {down_watched} after it; the operator's own share {down_own}); back (writes {:.2} s) -> {want} {} after the last write (watch: {up_watched}; operator: {up_own}); during the burst: {}, CPU {:.2} s/min, peak RSS {:.1} MiB",
            flips.len(),
            down_written.as_secs_f64(),
            shown.map_or("NEVER".to_string(), |_| format!(
                "{:.2} s",
                flipped.as_secs_f64()
            )),
            shown.map_or("NEVER".to_string(), |_| format!(
                "{:.2} s",
                (flipped.saturating_sub(down_written)).as_secs_f64()
            )),
            up_written.as_secs_f64(),
            back.map_or("NEVER".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            rates(&c0, &scrape().await, secs),
            (cpu_secs(pid) - cpu0) * 60.0 / secs,
            proc_field(pid, "VmHWM:")
        );
        // Memory once the burst is over: the operator quiet (no write) for
        // QUIET, then 30 s more, against the figure at rest before it.
        let t0 = Instant::now();
        let mut last = scrape().await.writes.values().sum::<f64>();
        let mut still = Instant::now();
        while still.elapsed() < QUIET && t0.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let w = scrape().await.writes.values().sum::<f64>();
            if w != last {
                last = w;
                still = Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        let rss_after = proc_field(pid, "VmRSS:");
        println!(
            "after the burst ({:.0} s later, quiet for {} s then 30 s): RSS {:.1} MiB, {:.2}x the {:.1} MiB at rest before it",
            t0.elapsed().as_secs_f64(),
            QUIET.as_secs(),
            rss_after,
            rss_after / rss_at_rest.max(0.1),
            rss_at_rest
        );

        // A new policy: time to its DaemonSet and its first status.
        let mut p = policy(POLICIES);
        p["metadata"]["name"] = json!("bench-new");
        let t0 = Instant::now();
        policies
            .create(&PostParams::default(), &serde_json::from_value(p).unwrap())
            .await
            .expect("creating bench-new");
        let dss: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
        let mut ds_at = None;
        let mut status_at = None;
        while t0.elapsed() < Duration::from_secs(120) && (ds_at.is_none() || status_at.is_none()) {
            if ds_at.is_none()
                && dss
                    .get_opt("devplug-agent-bench-new")
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            {
                ds_at = Some(t0.elapsed());
            }
            if status_at.is_none()
                && policies
                    .get_opt("bench-new")
                    .await
                    .ok()
                    .flatten()
                    .and_then(|p| p.status.and_then(|s| s.observed_generation))
                    .is_some()
            {
                status_at = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ms = |d: Option<Duration>| {
            d.map_or("NEVER".to_string(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1000.0)
            })
        };
        println!(
            "new policy: DaemonSet after {}, status after {}",
            ms(ds_at),
            ms(status_at)
        );
        let _ = policies
            .patch(
                "bench-new",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
            )
            .await;
        let _ = policies
            .delete("bench-new", &DeleteParams::background())
            .await;
        // Failover: a standby takes over from the leader on SIGTERM; a
        // device flips at that moment, and the new leader must show it.
        generation += 1;
        let standby = Operator::start(
            &kubeconfig,
            &format!("bench-operator-{generation}"),
            other(op.metrics),
        );
        // Ready means warm: the standby's stores have listed the cluster.
        let started = Instant::now();
        let ready_by = started + Duration::from_secs(300);
        while http_ok(standby.metrics, "/readyz").await.is_none() && Instant::now() < ready_by {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let warm = if http_ok(standby.metrics, "/readyz").await.is_some() {
            format!("{:.1} s", started.elapsed().as_secs_f64())
        } else {
            "NOT within 5 min".to_string()
        };
        let events0 = policy_events(&client).await;
        let was_leading = lease_holder(&client).await;
        watch_log.record();
        let t0 = Instant::now();
        op.terminate();
        let flip_rv = write_entry(&client, 0, n - 1, true)
            .await
            .expect("flipping a device at failover");
        let flip_written = t0.elapsed();
        let mut led_at = None;
        let deadline = t0 + Duration::from_secs(300);
        let down1 = format!("{}/{}", n * DEVICES - 1, n * DEVICES);
        let mut shown_at = None;
        while Instant::now() < deadline && shown_at.is_none() {
            if led_at.is_none()
                && lease_holder(&client).await.as_deref()
                    == Some(&format!("bench-operator-{generation}"))
            {
                led_at = Some(t0.elapsed());
            }
            if led_at.is_some() && healthy_of(&client, 0).await.as_deref() == Some(down1.as_str()) {
                shown_at = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let old_exit = {
            let mut waited = None;
            for _ in 0..200 {
                if let Ok(Some(st)) = op.child.try_wait() {
                    waited = Some(st);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            waited.map_or("still running after 10 s".to_string(), |s| {
                format!("exited ({s})")
            })
        };
        let c_new = scrape_at(standby.metrics).await;
        write_entry(&client, 0, n - 1, false)
            .await
            .expect("flipping the device back");
        let back_by = Instant::now() + Duration::from_secs(300);
        while Instant::now() < back_by
            && healthy_of(&client, 0).await.as_deref() != Some(want.as_str())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let events1 = policy_events(&client).await;
        let new_events: Vec<String> = events1
            .iter()
            .filter_map(|(r, c)| {
                let d = c - events0.get(r).copied().unwrap_or(0);
                (d > 0).then(|| format!("{r} {d}"))
            })
            .collect();
        let writes: f64 = c_new.writes.values().sum();
        let by_kind: Vec<String> = c_new
            .writes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "failover (a standby started and ready, its stores listed, after {warm}; then SIGTERM to the leader ({}), one device flipped at that moment): new leader after {}, status showing the flip after {} (the flip's write returned after {}, the API server's watch delivered it after {}); old leader {old_exit}; new leader's writes until then {writes} ({}); policy Events during the failover and flip: {}",
            was_leading.as_deref().unwrap_or("no lease holder"),
            ms(led_at),
            ms(shown_at),
            ms(Some(flip_written)),
            ms(watch_log
                .seen(flip_rv)
                .map(|at| at.saturating_duration_since(t0))),
            if by_kind.is_empty() {
                "none".to_string()
            } else {
                by_kind.join(", ")
            },
            if new_events.is_empty() {
                "none".to_string()
            } else {
                new_events.join(", ")
            }
        );
        op = standby;

        if let Some(api_pid) = apiserver_pid() {
            println!(
                "API server RSS {:.0} MiB (peak {:.0} MiB), with the simulated fleet's {} node leases renewed every {} s (the longest gap between two renewals of a node so far: {:.1} s)",
                proc_field(api_pid, "VmRSS:"),
                proc_field(api_pid, "VmHWM:"),
                n,
                renew_every(),
                renew_gap.lock().unwrap().as_secs_f64()
            );
        }
        println!(
            "simulated nodes the node lifecycle controller marked not Ready (lease renewed late) and the bench set Ready again, so far: {}",
            revived.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
    renewer.abort();
    reviver.abort();
    drop(op);
    if keep {
        println!("\nSCALE_KEEP=1: the fleet stays for the next run");
        return;
    }
    println!("\ncleaning up");
    cleanup(&client).await;
}
