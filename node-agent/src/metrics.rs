//! The agent's `/metrics`, in the OpenMetrics text format, following the
//! Kubernetes instrumentation guidelines (snake_case, base units, `_total`
//! counters).
//!
//! - `devplug_device_health{node,resource,device,state,namespace,pod,container}`:
//!   1 for the device's state (`Healthy`, `Unhealthy`, `Unknown`) and 0 for
//!   the two others, as kube-state-metrics gives a pod's phase; one set per
//!   container holding the device (empty pod labels when it is free);
//! - `devplug_allocate_requests_total{resource,result}` and
//!   `devplug_allocate_duration_seconds{resource}` (device plugin path);
//! - `devplug_dra_requests_total{call,resource,result}` and
//!   `devplug_dra_request_duration_seconds{call,resource}`, per claim,
//!   `call` = `prepare` or `unprepare` (DRA path);
//! - `devplug_registrations_total{resource}`;
//! - `devplug_status_writes_total{resource,result}`;
//! - `devplug_build_info{version}` and the standard `process_*` metrics.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::plugin::PluginState;
use devplug_api::DeviceHealth;

type Labels = Vec<(String, String)>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_025, 2.0, 14))
}

/// Metrics registry of one agent.
pub struct AgentMetrics {
    registry: Registry,
    allocations: Family<Labels, Counter>,
    allocate_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    dra_calls: Family<Labels, Counter>,
    dra_seconds: Family<Labels, Histogram, fn() -> Histogram>,
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
        let dra_calls = Family::<Labels, Counter>::default();
        let dra_seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "dra_requests",
            "DRA NodePrepareResources and NodeUnprepareResources, per claim, by call and result",
            dra_calls.clone(),
        );
        registry.register(
            "dra_request_duration_seconds",
            "Time to prepare or unprepare one claim",
            dra_seconds.clone(),
        );
        let build = Family::<Labels, prometheus_client::metrics::gauge::Gauge>::default();
        build
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version of this agent as a label",
            build,
        );
        Self {
            registry,
            allocations,
            allocate_seconds,
            dra_calls,
            dra_seconds,
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

    /// Records one DRA call for one claim (`prepare` or `unprepare`).
    pub fn dra_call(&self, call: &str, resource: &str, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "error" };
        self.dra_calls
            .get_or_create(&vec![
                ("call".into(), call.into()),
                ("resource".into(), resource.into()),
                ("result".into(), result.into()),
            ])
            .inc();
        self.dra_seconds
            .get_or_create(&vec![
                ("call".into(), call.into()),
                ("resource".into(), resource.into()),
            ])
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
            "# HELP devplug_device_health 1 for the state a device is in (Healthy, Unhealthy, Unknown), 0 for the others; one set per container holding it."
        );
        let _ = writeln!(out, "# TYPE devplug_device_health gauge");
        for p in plugins {
            let snap = p.snapshots.borrow().clone();
            let allocs = p.allocations.borrow().clone();
            let cfg = p.cfg();
            let res = &cfg.resource_name;
            let report = crate::status::report::resource_status(&cfg, &snap, &allocs);
            for d in &report.devices {
                let state = match d.health {
                    DeviceHealth::Healthy => "Healthy",
                    DeviceHealth::Unhealthy => "Unhealthy",
                    DeviceHealth::Unknown => "Unknown",
                };
                let holders: Vec<(String, String, String)> = if d.allocations.is_empty() {
                    vec![Default::default()]
                } else {
                    d.allocations
                        .iter()
                        .map(|a| (escape(&a.namespace), escape(&a.pod), escape(&a.container)))
                        .collect()
                };
                for (ns, pod, container) in &holders {
                    for s in ["Healthy", "Unhealthy", "Unknown"] {
                        let _ = writeln!(
                            out,
                            "devplug_device_health{{node=\"{}\",resource=\"{}\",device=\"{}\",state=\"{s}\",namespace=\"{ns}\",pod=\"{pod}\",container=\"{container}\"}} {}",
                            escape(node),
                            escape(res),
                            escape(&d.id),
                            u8::from(s == state)
                        );
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP devplug_kubelet_ready 1 while the kubelet has the policy: registered, and its ListAndWatch (or DRA health) stream open."
        );
        let _ = writeln!(out, "# TYPE devplug_kubelet_ready gauge");
        for p in plugins {
            let cfg = p.cfg();
            let _ = writeln!(
                out,
                "devplug_kubelet_ready{{node=\"{}\",resource=\"{}\",policy=\"{}\"}} {}",
                escape(node),
                escape(&cfg.resource_name),
                escape(&cfg.name),
                u8::from(p.ready())
            );
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
        out.push_str(&devplug_api::process::render(
            &|p| std::fs::read_to_string(p).ok(),
            std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count()),
        ));
        out.push_str("# EOF\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dra_calls_are_counted_apart_from_allocate() {
        let m = AgentMetrics::default();
        m.dra_call("prepare", "example.com/gpu", true, Duration::from_millis(2));
        m.dra_call(
            "prepare",
            "example.com/gpu",
            false,
            Duration::from_millis(1),
        );
        m.dra_call(
            "unprepare",
            "example.com/gpu",
            true,
            Duration::from_millis(1),
        );
        let text = m.render("n1", &[]);
        for line in [
            r#"devplug_dra_requests_total{call="prepare",resource="example.com/gpu",result="success"} 1"#,
            r#"devplug_dra_requests_total{call="prepare",resource="example.com/gpu",result="error"} 1"#,
            r#"devplug_dra_requests_total{call="unprepare",resource="example.com/gpu",result="success"} 1"#,
            r#"devplug_dra_request_duration_seconds_count{call="prepare",resource="example.com/gpu"} 2"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("devplug_allocate_requests_total{"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
