//! Policy device counts over a fleet's NodeDeviceStatus objects: the work a
//! policy reconcile does on every coalesced node event, measured without an
//! API server, so 5,000 nodes fit on a small machine. Prints figures,
//! asserts only that both ways count the same.
//!
//! `cargo bench -p devplug-operator --bench aggregate`
//!
//! Fleet shape as in `bench-scale`: 4 policies, one entry per node and
//! policy, 64 devices each, 8 held. Compares copying every entry of every
//! node on each reconcile (what the operator did before; now expanded from
//! the projection, cheaper than from whole objects) with the shares
//! remembered per object version (what it does now), warm (nothing
//! changed), after one node changed, and with 500 devices unhealthy across
//! the fleet; and what the index holds per node, whole objects against
//! the operator's projection (`view::NodeView`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fleet;

use std::time::{Duration, Instant};

use devplug_api::{
    DevicePluginPolicy, NodeDeviceStatus, NodeDeviceStatusSpec, NodeDeviceStatusStatus,
};
use devplug_operator::devices::{self, Shares};
use devplug_operator::view::NodeView;
use fleet::{DEVICES, HELD, POLICIES, entry, node_name};

/// The object an API server holds for node `i`.
fn object(i: usize, rv: u64, unhealthy: bool) -> NodeDeviceStatus {
    let name = node_name(i);
    let mut n = NodeDeviceStatus::new(
        &name,
        NodeDeviceStatusSpec {
            node_name: name.clone(),
        },
    );
    n.metadata.resource_version = Some(rv.to_string());
    n.status = Some(NodeDeviceStatusStatus {
        resources: (0..POLICIES)
            .map(|k| entry(k, i, unhealthy && k == 0))
            .collect(),
        ..Default::default()
    });
    n
}

/// Node `i` as the operator's index keeps it.
fn node(i: usize, rv: u64, unhealthy: bool) -> NodeView {
    NodeView::from(object(i, rv, unhealthy))
}

fn policy(k: usize) -> DevicePluginPolicy {
    devplug_api::policies_from_yaml(&format!(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {{name: bench-p{k}}}\nspec:\n  resourceName: bench.example/r{k}\n  source: {{simulated: {{count: 1}}}}\n"
    ))
    .unwrap()
    .remove(0)
}

/// Median time of `f` over `runs` runs.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let policies: Vec<DevicePluginPolicy> = (0..POLICIES).map(policy).collect();
    println!(
        "policy aggregation over NodeDeviceStatus objects: {POLICIES} policies, {DEVICES} devices per node and policy ({HELD} held); median of 7 runs per figure"
    );
    println!(
        "{:>6} | {:>14} | {:>14} | {:>16} | {:>16} | {:>18}",
        "nodes",
        "copy (before)",
        "shares, warm",
        "one node changed",
        "first (cold) pass",
        "500 unhealthy, warm"
    );
    for n in [1000usize, 5000] {
        let mut fleet: Vec<NodeView> = (0..n).map(|i| node(i, 1, false)).collect();
        let p = &policies[0];

        let before = median(7, || {
            let a = devices::aggregate(&devices::entries_of(p, &fleet));
            std::hint::black_box(a);
        });
        let cold = median(7, || {
            let shares = Shares::default();
            std::hint::black_box(shares.aggregate(p, &fleet));
        });
        let shares = Shares::default();
        for q in &policies {
            shares.aggregate(q, &fleet);
        }
        let warm = median(7, || {
            std::hint::black_box(shares.aggregate(p, &fleet));
        });
        let mut rv = 2;
        let one = median(7, || {
            rv += 1;
            fleet[n / 2] = node(n / 2, rv, false);
            std::hint::black_box(shares.aggregate(p, &fleet));
        });
        assert_eq!(
            shares.aggregate(p, &fleet),
            devices::aggregate(&devices::entries_of(p, &fleet)),
            "both ways count the same"
        );
        // 500 devices Unhealthy: one on each of 500 nodes.
        for (i, nds) in fleet.iter_mut().enumerate().take(500) {
            *nds = node(i, 1_000_000, true);
        }
        shares.aggregate(p, &fleet);
        let burst = median(7, || {
            std::hint::black_box(shares.aggregate(p, &fleet));
        });
        let agg = shares.aggregate(p, &fleet);
        assert_eq!(agg.counts.unhealthy, 500);
        assert_eq!(agg, devices::aggregate(&devices::entries_of(p, &fleet)));
        println!(
            "{n:>6} | {:>14} | {:>14} | {:>16} | {:>16} | {:>18}",
            ms(before),
            ms(warm),
            ms(one),
            ms(cold),
            ms(burst)
        );
        println!(
            "       at 2 reconciles/s per policy (the 500 ms coalescing), {POLICIES} policies: copy {:.1} CPU s/min, shares {:.1} CPU s/min",
            before.as_secs_f64() * 2.0 * POLICIES as f64 * 60.0,
            warm.as_secs_f64() * 2.0 * POLICIES as f64 * 60.0
        );
    }

    // What the index holds per node, parsed from the JSON an API server
    // sends: whole objects (what it kept before) and the projection.
    let n = 5000;
    let jsons: Vec<String> = (0..n)
        .map(|i| serde_json::to_string(&object(i, 1, i < 500)).unwrap())
        .collect();
    let r0 = rss_kib();
    let t = Instant::now();
    let views: Vec<NodeView> = jsons
        .iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    let parse_view = t.elapsed();
    let r1 = rss_kib();
    let t = Instant::now();
    let whole: Vec<NodeDeviceStatus> = jsons
        .iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    let parse_whole = t.elapsed();
    let r2 = rss_kib();
    // The projection loses nothing a policy status reads: counted from the
    // whole objects' entries, as the operator counted before it.
    for p in &policies {
        let from_whole: Vec<(String, devplug_api::ResourceStatus)> = whole
            .iter()
            .flat_map(|o| {
                let node = o.metadata.name.clone().unwrap();
                o.status
                    .iter()
                    .flat_map(|s| s.effective_resources())
                    .filter(|e| e.policy == p.metadata.name.clone().unwrap())
                    .map(move |e| (node.clone(), e))
            })
            .collect();
        assert_eq!(
            Shares::default().aggregate(p, &views),
            devices::aggregate(&from_whole),
            "the projection counts as the whole objects do"
        );
    }
    let per = |kib: i64| kib as f64 * 1024.0 / n as f64 / 1000.0;
    println!(
        "index memory, {n} nodes (JSON {:.1} KB per object): whole objects {:.1} MiB ({:.1} KB per node), the projection {:.1} MiB ({:.1} KB per node); parse per object: whole {:.1} us, projection {:.1} us",
        jsons[0].len() as f64 / 1000.0,
        (r2 - r1) as f64 / 1024.0,
        per(r2 - r1),
        (r1 - r0) as f64 / 1024.0,
        per(r1 - r0),
        parse_whole.as_secs_f64() * 1e6 / n as f64,
        parse_view.as_secs_f64() * 1e6 / n as f64,
    );
    std::hint::black_box((views, whole));
}

/// This process's resident set, KiB.
fn rss_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
