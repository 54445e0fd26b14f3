//! Prometheus metrics of the operator, in the text exposition format.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Reconcile counters and timings.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<Labels, Counter>,
    duration: Histogram,
    writes: Family<Labels, Counter>,
    total_writes: Counter,
    requests: Family<Labels, Counter>,
    leading: Gauge,
    stepped_down: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("devplug_operator");
        let reconciles = Counter::default();
        let failures = Family::<Labels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let writes = Family::<Labels, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        registry.register(
            "api_writes",
            "Writes sent to the API server, by kind",
            writes.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests sent to the API server, by verb (read = get or list)",
            requests.clone(),
        );
        let leading = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads (runs the controllers), else 0",
            leading.clone(),
        );
        let stepped_down = Counter::default();
        registry.register(
            "leadership_lost",
            "Times this replica stopped leading because it could not renew the lease",
            stepped_down.clone(),
        );
        Self {
            leading,
            stepped_down,
            requests,
            registry,
            reconciles,
            failures,
            duration,
            writes,
            total_writes: Counter::default(),
        }
    }
}

impl Metrics {
    /// Says whether this replica leads.
    pub fn set_leading(&self, on: bool) {
        self.leading.set(i64::from(on));
    }

    /// Whether this replica leads, as last said.
    pub fn leading(&self) -> bool {
        self.leading.get() == 1
    }

    /// Counts one loss of leadership.
    pub fn lost_leadership(&self) {
        self.stepped_down.inc();
    }

    /// Counts one reconcile and its duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts one failed reconcile.
    pub fn failed(&self, kind: &str) {
        self.failures
            .get_or_create(&vec![("error".into(), kind.into())])
            .inc();
    }

    /// Counts one write to the API server.
    pub fn wrote(&self, kind: &str) {
        self.writes
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
        self.total_writes.inc();
    }

    /// Counts one request to the API server.
    pub fn requested(&self, method: &http::Method, query: Option<&str>) {
        let watch =
            query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let verb = match *method {
            http::Method::GET if watch => "watch",
            http::Method::GET => "read",
            http::Method::POST => "create",
            http::Method::PATCH => "patch",
            http::Method::PUT => "update",
            http::Method::DELETE => "delete",
            _ => "other",
        };
        self.requests
            .get_or_create(&vec![("verb".into(), verb.into())])
            .inc();
    }

    /// Total writes so far (all kinds).
    pub fn total_writes(&self) -> u64 {
        self.total_writes.get()
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_verb() {
        let m = Metrics::default();
        m.requested(&http::Method::GET, Some("&watch=true&timeoutSeconds=290"));
        m.requested(&http::Method::GET, Some("&limit=500"));
        m.requested(&http::Method::GET, None);
        m.requested(&http::Method::PATCH, Some("fieldManager=x"));
        let text = m.render();
        assert!(
            text.contains(r#"devplug_operator_api_requests_total{verb="watch"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"devplug_operator_api_requests_total{verb="read"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"devplug_operator_api_requests_total{verb="patch"} 1"#),
            "{text}"
        );
    }
}
