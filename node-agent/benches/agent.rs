//! Agent benchmark: prints figures, asserts nothing about time.
//!
//! `cargo bench -p devplug-agent --bench agent`
//!
//! Drives the real agent binary (release build) in standalone mode over a
//! temp plugin directory, with the test suite's kubelet simulator as its
//! kubelet:
//! - Allocate latency p50/p99 over the real Unix socket, next to an empty
//!   unary call on the same socket (GetDevicePluginOptions) as the floor;
//! - health flip → ListAndWatch update latency;
//! - re-registration time after a bind-then-listen kubelet restart, and
//!   registrations per restart;
//! - peak RSS serving 4 policies × 64 devices × 8 replicas.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use devplug_proto::deviceplugin::v1beta1 as dp;
use support::{Agent, KubeletSim, Node, policy};

const POLICIES: usize = 4;
const DEVICES: usize = 64;
const REPLICAS: usize = 8;
const CALLS: usize = 20_000;
const FLIPS: usize = 300;
const RESTARTS: usize = 50;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let node = Node::new();
    let mut kubelet = KubeletSim::start(&node.plugins);
    let docs: Vec<String> = (0..POLICIES)
        .map(|i| {
            policy(
                &format!("p{i}"),
                &format!("bench.example/r{i}"),
                &format!(
                    "  source:\n    simulated:\n      count: {DEVICES}\n      numaNodes: 2\n\
                     \x20 sharing:\n    strategy: TimeSlicing\n    replicas: {REPLICAS}\n\
                     \x20 health:\n    settleSeconds: 0\n"
                ),
            )
        })
        .collect();
    let agent = Agent::spawn(&node, &docs.join("---\n"));
    let t = Duration::from_secs(20);
    kubelet.wait_registrations(POLICIES, t).await;
    for i in 0..POLICIES {
        kubelet
            .wait_list(&format!("bench.example/r{i}"), t, |l| {
                l.len() == DEVICES * REPLICAS
            })
            .await;
    }
    println!(
        "devplug-agent benchmark ({POLICIES} policies x {DEVICES} devices x {REPLICAS} replicas, release build)"
    );

    // Allocate vs the empty-call floor, interleaved so both see the same machine.
    let mut c = kubelet.client("devplug-p0.sock").await;
    for _ in 0..500 {
        c.get_device_plugin_options(dp::Empty {}).await.unwrap();
    }
    let mut floor = Vec::with_capacity(CALLS);
    let mut alloc = Vec::with_capacity(CALLS);
    for n in 0..CALLS {
        let id = format!("sim-{}::{}", n % DEVICES, n % REPLICAS);
        let req = dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec![id],
            }],
        };
        let t0 = Instant::now();
        c.get_device_plugin_options(dp::Empty {}).await.unwrap();
        floor.push(t0.elapsed());
        let t0 = Instant::now();
        let r = c.allocate(req).await.unwrap();
        alloc.push(t0.elapsed());
        assert_eq!(r.get_ref().container_responses.len(), 1);
    }
    let (f50, f99) = (pct(&mut floor, 0.50), pct(&mut floor, 0.99));
    let (a50, a99) = (pct(&mut alloc, 0.50), pct(&mut alloc, 0.99));
    println!(
        "empty unary call (floor), {CALLS} calls: p50 {}  p99 {}",
        us(f50),
        us(f99)
    );
    println!(
        "Allocate (1 replica),     {CALLS} calls: p50 {}  p99 {}",
        us(a50),
        us(a99)
    );
    println!(
        "  Allocate p99 / floor p99 = {:.2}x (target <= 2x)",
        a99.as_secs_f64() / f99.as_secs_f64()
    );

    // Health flip -> ListAndWatch update.
    let r0 = "bench.example/r0";
    let mut prop = Vec::with_capacity(FLIPS);
    for n in 0..FLIPS {
        let dev = format!("sim-{}", n % DEVICES);
        let rid = format!("{dev}::0");
        let (content, want) = if (n / DEVICES).is_multiple_of(2) {
            ("Unhealthy: bench", "Unhealthy")
        } else {
            ("Healthy", "Healthy")
        };
        let t0 = Instant::now();
        node.sim_write("p0", &dev, content);
        let (_, at) = kubelet
            .wait_list(r0, t, |l| l.iter().any(|d| d.id == rid && d.health == want))
            .await;
        prop.push(at.duration_since(t0));
    }
    println!(
        "health flip -> ListAndWatch update, {FLIPS} flips: p50 {}  p99 {}  max {} (target p99 <= 10 ms)",
        ms(pct(&mut prop, 0.50)),
        ms(pct(&mut prop, 0.99)),
        ms(*prop.iter().max().unwrap())
    );

    // Re-registration after a kubelet restart as the real kubelet does it:
    // kubelet.sock is created LISTEN_DELAY before the kubelet listens, after
    // the kubelet was down long enough (DOWN) for the agent's retries to
    // back off. Measured from the moment the kubelet listens to the last
    // policy's registration; each start must bring exactly one registration
    // per policy.
    const LISTEN_DELAY: Duration = Duration::from_millis(150);
    const DOWN: Duration = Duration::from_millis(1000);
    let mut rereg = Vec::with_capacity(RESTARTS);
    let mut per_start = Vec::with_capacity(RESTARTS);
    let mut seen = kubelet.registrations().len();
    for _ in 0..RESTARTS {
        kubelet.stop();
        kubelet.wipe_sockets();
        tokio::time::sleep(DOWN).await;
        let created = kubelet.restart_bind_then_listen(LISTEN_DELAY);
        let listening = created + LISTEN_DELAY;
        kubelet.wait_registrations(seen + POLICIES, t).await;
        for i in 0..POLICIES {
            kubelet
                .wait_list(&format!("bench.example/r{i}"), t, |l| {
                    l.len() == DEVICES * REPLICAS
                })
                .await;
        }
        // A window past the stream grace period, for duplicates to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let regs = kubelet.registrations();
        let last = regs[seen..].iter().map(|r| r.at).max().unwrap();
        rereg.push(last.saturating_duration_since(listening));
        per_start.push((regs.len() - seen) as f64 / POLICIES as f64);
        seen = regs.len();
    }
    let max_per_start = per_start.iter().cloned().fold(0.0, f64::max);
    let min_per_start = per_start.iter().cloned().fold(f64::MAX, f64::min);
    println!(
        "re-registration of all {POLICIES} policies after {RESTARTS} bind-then-listen kubelet restarts (listen {} ms after the socket appears, kubelet down {} ms before): p50 {}  p99 {}  max {} after the kubelet listens (target max <= 100 ms); registrations per policy per restart: min {min_per_start} max {max_per_start} (target exactly 1)",
        LISTEN_DELAY.as_millis(),
        DOWN.as_millis(),
        ms(pct(&mut rereg, 0.50)),
        ms(pct(&mut rereg, 0.99)),
        ms(*rereg.iter().max().unwrap())
    );

    let rss = agent.peak_rss_kib();
    println!(
        "agent peak RSS (VmHWM) after all of the above: {:.1} MiB (target <= 15 MiB)",
        rss as f64 / 1024.0
    );
}
