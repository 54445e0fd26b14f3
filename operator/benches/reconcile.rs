//! Operator benchmark: prints figures, asserts nothing about time.
//!
//! `cargo bench -p devplug-operator --bench reconcile`
//!
//! Reconciles 1,000 policies against the real kube-apiserver the reconcile
//! tests use (`devplug-testenv`: etcd and the cluster kit's kube-apiserver on
//! loopback, the operator as the chart's ServiceAccount): the first pass
//! creates every agent's objects, the second is the steady state and must
//! write nothing. Prints reconciles per second, API requests per reconcile
//! and this process's peak RSS (the API server's is its own).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use devplug_operator::controller::{self, Context};
use devplug_operator::desired::AgentDefaults;
use devplug_operator::metrics::Metrics;
use futures::StreamExt;
use serde_json::json;
use support::{TestApi, current, paths, policy_json, unique};

const POLICIES: usize = 1000;
const CONCURRENCY: usize = 16;

async fn pass(
    api: &TestApi,
    ctx: &Arc<Context>,
    names: &[String],
    concurrency: usize,
) -> (f64, usize, usize) {
    // The policies as the watch would hand them over, read before the clock.
    let mut policies = Vec::new();
    for n in names {
        policies.push(Arc::new(current(api, n).await));
    }
    api.clear_log();
    let start = Instant::now();
    let results: Vec<_> = futures::stream::iter(policies)
        .map(|p| {
            let ctx = ctx.clone();
            async move { controller::reconcile(p, ctx).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    assert!(results.iter().all(Result::is_ok));
    let log = api.log();
    let writes = log.iter().filter(|c| c.is_write()).count();
    (names.len() as f64 / secs, log.len(), writes)
}

fn rss_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

async fn fresh(
    policies: &[serde_json::Value],
) -> (
    TestApi,
    Arc<Context>,
    kube::runtime::reflector::store::Writer<devplug_api::DevicePluginPolicy>,
    std::sync::Mutex<
        kube::runtime::reflector::store::Writer<k8s_openapi::api::apps::v1::DaemonSet>,
    >,
) {
    let (client, api) = support::start().await;
    // Created 16 at a time (no two claim one resource, so their ages do
    // not matter), then read back as the policy watch would list them.
    futures::stream::iter(policies.iter().cloned())
        .map(|p| {
            let api = api.clone();
            async move {
                let name = p["metadata"]["name"].as_str().unwrap().to_string();
                api.put(&paths::policy(&name), p).await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut typed = Vec::new();
    for p in policies {
        typed.push(current(&api, p["metadata"]["name"].as_str().unwrap()).await);
    }
    let (store, writer) = support::synced(typed);
    let (ds_store, ds_writer) = support::synced(Vec::new());
    let ctx = Arc::new(Context::new(
        client,
        AgentDefaults {
            namespace: paths::NS.into(),
            release: "devplug".into(),
            image: "devplug-agent:bench".into(),
            kubelet_root: "/var/lib/kubelet".into(),
            device_plugin_dir: "/var/lib/kubelet/device-plugins".into(),
            ..Default::default()
        },
        devplug_operator::index::Index::new(
            store,
            ds_store,
            support::synced(Vec::new()).0,
            support::synced(Vec::new()).0,
            support::synced(Vec::new()).0,
            support::synced(Vec::new()).0,
            devplug_operator::synced::Synced::all(),
        ),
        Arc::new(Metrics::default()),
    ));
    (api, ctx, writer, std::sync::Mutex::new(ds_writer))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let baseline = rss_mib("VmRSS:");
    println!(
        "devplug-operator reconcile benchmark ({POLICIES} policies, the real kube-apiserver of devplug-testenv on loopback, release build)"
    );
    for (label, concurrency) in [("sequential", 1), ("concurrent", CONCURRENCY)] {
        let run = unique("p");
        let names: Vec<String> = (0..POLICIES).map(|i| format!("{run}-{i:04}")).collect();
        let policies: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                policy_json(
                    n,
                    &format!("bench{i}.example.com/dev"),
                    json!({"sharing": {"strategy": "TimeSlicing", "replicas": 4}}),
                )
            })
            .collect();
        let (api, ctx, _writer, ds) = fresh(&policies).await;
        run_passes(&api, &ctx, &names, label, concurrency, &ds).await;
        assert_eq!(
            ctx.metrics.total_writes() as usize,
            POLICIES * 6,
            "6 writes per policy (finalizer, 4 agent objects, status), then none"
        );
    }
    println!(
        "process RSS: {baseline:.1} MiB at start, peak {:.1} MiB (the operator's side: its stores and client)",
        rss_mib("VmHWM:")
    );
}
async fn run_passes(
    api: &TestApi,
    ctx: &Arc<Context>,
    names: &[String],
    label: &str,
    concurrency: usize,
    ds: &std::sync::Mutex<
        kube::runtime::reflector::store::Writer<k8s_openapi::api::apps::v1::DaemonSet>,
    >,
) {
    let (rate, reqs, writes) = pass(api, ctx, names, concurrency).await;
    // The DaemonSet watch reports what the first pass created.
    support::mirror(api, paths::DAEMONSETS, ds).await;
    println!(
        "{label:>10} (x{concurrency:<2}) first pass : {rate:>7.0} reconciles/s, {:.1} requests and {:.1} writes per reconcile",
        reqs as f64 / names.len() as f64,
        writes as f64 / names.len() as f64
    );
    let (rate, reqs, writes) = pass(api, ctx, names, concurrency).await;
    println!(
        "{label:>10} (x{concurrency:<2}) steady pass: {rate:>7.0} reconciles/s, {:.1} requests and {} writes in total",
        reqs as f64 / names.len() as f64,
        writes
    );
}
