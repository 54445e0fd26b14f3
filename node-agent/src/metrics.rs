//! The agent's `/metrics`, in the OpenMetrics text format, following the
//! Kubernetes instrumentation guidelines (snake_case, base units, `_total`
//! counters).
//!
//! - `devplug_device_health{node,resource,device,namespace,pod,container}`:
//!   1 healthy, 0 unhealthy, -1 unknown; one series per container holding the
//!   device (empty pod labels when it is free);
//! - `devplug_allocate_requests_total{resource,result}` and
//!   `devplug_allocate_duration_seconds{resource}`;
//! - `devplug_registrations_total{resource}`;
//! - `devplug_status_writes_total{resource,result}`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::deviceplugin::plugin::PluginState;
use crate::devices::health::Health;

type Labels = Vec<(String, String)>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_025, 2.0, 14))
}

/// Metrics registry of one agent.
pub struct AgentMetrics {
    registry: Registry,
    allocations: Family<Labels, Counter>,
    allocate_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("devplug");
        let allocations = Family::<Labels, Counter>::default();
        let allocate_seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "allocate_requests",
            "Allocate calls from the kubelet, by result",
            allocations.clone(),
        );
        registry.register(
            "allocate_duration_seconds",
            "Time to answer Allocate",
            allocate_seconds.clone(),
        );
        Self {
            registry,
            allocations,
            allocate_seconds,
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl AgentMetrics {
    /// Records one Allocate.
    pub fn allocated(&self, resource: &str, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "invalid" };
        self.allocations
            .get_or_create(&vec![
                ("resource".into(), resource.into()),
                ("result".into(), result.into()),
            ])
            .inc();
        self.allocate_seconds
            .get_or_create(&vec![("resource".into(), resource.into())])
            .observe(took.as_secs_f64());
    }

    /// The whole exposition.
    pub fn render(&self, node: &str, plugins: &[Arc<PluginState>]) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        // Our hand-written families go before the closing "# EOF".
        if let Some(i) = out.rfind("# EOF") {
            out.truncate(i);
        }
        let _ = writeln!(
            out,
            "# HELP devplug_device_health Device health: 1 healthy, 0 unhealthy, -1 unknown."
        );
        let _ = writeln!(out, "# TYPE devplug_device_health gauge");
        for p in plugins {
            let snap = p.snapshots.borrow().clone();
            let allocs = p.allocations.borrow().clone();
            let cfg = p.cfg();
            let res = &cfg.resource_name;
            let report = crate::status::report::resource_status(&cfg, &snap, &allocs);
            for d in &report.devices {
                let v = match snap.devices.get(&d.id).map(|s| &s.health) {
                    Some(Health::Healthy) => 1,
                    Some(Health::Unhealthy(_)) => 0,
                    _ => -1,
                };
                let base = format!(
                    "node=\"{}\",resource=\"{}\",device=\"{}\"",
                    escape(node),
                    escape(res),
                    escape(&d.id)
                );
                if d.allocations.is_empty() {
                    let _ = writeln!(
                        out,
                        "devplug_device_health{{{base},namespace=\"\",pod=\"\",container=\"\"}} {v}"
                    );
                }
                for a in &d.allocations {
                    let _ = writeln!(
                        out,
                        "devplug_device_health{{{base},namespace=\"{}\",pod=\"{}\",container=\"{}\"}} {v}",
                        escape(&a.namespace),
                        escape(&a.pod),
                        escape(&a.container)
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP devplug_registrations Successful registrations with the kubelet."
        );
        let _ = writeln!(out, "# TYPE devplug_registrations counter");
        for p in plugins {
            let _ = writeln!(
                out,
                "devplug_registrations_total{{resource=\"{}\"}} {}",
                escape(&p.cfg().resource_name),
                p.registrations.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP devplug_status_writes NodeDeviceStatus writes, by result."
        );
        let _ = writeln!(out, "# TYPE devplug_status_writes counter");
        for p in plugins {
            let r = escape(&p.cfg().resource_name);
            let _ = writeln!(
                out,
                "devplug_status_writes_total{{resource=\"{r}\",result=\"success\"}} {}",
                p.writes.writes.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "devplug_status_writes_total{{resource=\"{r}\",result=\"error\"}} {}",
                p.writes.failures.load(Ordering::Relaxed)
            );
        }
        out.push_str("# EOF\n");
        out
    }
}
