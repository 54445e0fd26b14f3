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
    policy_degraded: Family<Labels, Gauge>,
    policy_nodes: Family<Labels, Gauge>,
    policy_devices: Family<Labels, Gauge>,
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
            "Requests sent to the API server, by verb (read = get or list) and the response's status code (error: no response)",
            requests.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version of this operator as a label",
            build,
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
        let policy_degraded = Family::<Labels, Gauge>::default();
        registry.register(
            "policy_degraded",
            "1 while a policy's Degraded condition is True (kubectl describe dpp says why)",
            policy_degraded.clone(),
        );
        let policy_nodes = Family::<Labels, Gauge>::default();
        registry.register(
            "policy_nodes",
            "A policy's agent nodes: desired, ready (registered with the kubelet) and updated",
            policy_nodes.clone(),
        );
        let policy_devices = Family::<Labels, Gauge>::default();
        registry.register(
            "policy_devices",
            "A policy's physical devices over all nodes, by state (healthy, unhealthy: Unhealthy or Unknown) and allocated",
            policy_devices.clone(),
        );
        Self {
            policy_degraded,
            policy_nodes,
            policy_devices,
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

    /// Counts one request to the API server and its outcome: the status
    /// code, or `error` when no response came back.
    pub fn requested(&self, verb: &str, code: &str) {
        self.requests
            .get_or_create(&vec![
                ("verb".into(), verb.into()),
                ("code".into(), code.into()),
            ])
            .inc();
    }

    /// A policy's status as gauges (what the chart's alerts watch).
    pub fn policy_status(&self, policy: &str, st: &devplug_api::DevicePluginPolicyStatus) {
        let degraded = devplug_api::conditions::is_true(
            &st.conditions,
            devplug_api::conditions::types::DEGRADED,
        );
        self.policy_degraded
            .get_or_create(&vec![("policy".into(), policy.into())])
            .set(i64::from(degraded));
        for (state, n) in [
            ("desired", st.nodes.desired),
            ("ready", st.nodes.ready),
            ("updated", st.nodes.updated),
        ] {
            self.policy_nodes
                .get_or_create(&vec![
                    ("policy".into(), policy.into()),
                    ("state".into(), state.into()),
                ])
                .set(i64::from(n));
        }
        for (state, n) in [
            ("healthy", st.devices.healthy),
            ("unhealthy", st.devices.unhealthy),
            ("allocated", st.devices.allocated),
        ] {
            self.policy_devices
                .get_or_create(&vec![
                    ("policy".into(), policy.into()),
                    ("state".into(), state.into()),
                ])
                .set(n);
        }
    }

    /// Drops a deleted policy's gauges.
    pub fn forget_policy(&self, policy: &str) {
        self.policy_degraded
            .remove(&vec![("policy".into(), policy.into())]);
        for state in ["desired", "ready", "updated"] {
            self.policy_nodes.remove(&vec![
                ("policy".into(), policy.into()),
                ("state".into(), state.into()),
            ]);
        }
        for state in ["healthy", "unhealthy", "allocated"] {
            self.policy_devices.remove(&vec![
                ("policy".into(), policy.into()),
                ("state".into(), state.into()),
            ]);
        }
    }

    /// Total writes so far (all kinds).
    pub fn total_writes(&self) -> u64 {
        self.total_writes.get()
    }

    /// The text exposition, with the process's own metrics.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        if let Some(i) = s.rfind("# EOF") {
            s.truncate(i);
        }
        s.push_str(&devplug_api::process::render(
            &|p| std::fs::read_to_string(p).ok(),
            std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count()),
        ));
        s.push_str("# EOF\n");
        s
    }
}

/// The verb of a request to the API server (`read` = get or list).
pub fn verb_of(method: &http::Method, query: Option<&str>) -> &'static str {
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET => "read",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "update",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// A client layer counting every request by verb and status code, so that
/// conflicts (409) and throttling (429) show on `/metrics`.
#[derive(Clone)]
pub struct CountRequests(pub std::sync::Arc<Metrics>);

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`CountRequests`] wraps.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: std::sync::Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verb = verb_of(req.method(), req.uri().query());
        let metrics = self.metrics.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            let code = match &r {
                Ok(resp) => resp.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            metrics.requested(verb, &code);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_verb_and_code() {
        assert_eq!(
            verb_of(&http::Method::GET, Some("&watch=true&timeoutSeconds=290")),
            "watch"
        );
        assert_eq!(verb_of(&http::Method::GET, Some("&limit=500")), "read");
        assert_eq!(verb_of(&http::Method::GET, None), "read");
        assert_eq!(
            verb_of(&http::Method::PATCH, Some("fieldManager=x")),
            "patch"
        );
        let m = Metrics::default();
        m.requested("read", "200");
        m.requested("read", "200");
        m.requested("patch", "409");
        m.requested("watch", "error");
        let text = m.render();
        for line in [
            r#"devplug_operator_api_requests_total{verb="read",code="200"} 2"#,
            r#"devplug_operator_api_requests_total{verb="patch",code="409"} 1"#,
            r#"devplug_operator_api_requests_total{verb="watch",code="error"} 1"#,
            r#"devplug_operator_build_info{version=""#,
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// The layer sees the real status of each answer.
    #[tokio::test]
    async fn the_layer_counts_each_answer_with_its_status() {
        use tower::{Layer, ServiceExt};
        let m = std::sync::Arc::new(Metrics::default());
        let svc = tower::service_fn(|req: http::Request<()>| async move {
            let code = if req.method() == http::Method::PATCH {
                409
            } else {
                200
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().status(code).body(()).unwrap(),
            )
        });
        let svc = CountRequests(m.clone()).layer(svc);
        for method in [http::Method::GET, http::Method::PATCH, http::Method::PATCH] {
            let req = http::Request::builder()
                .method(method)
                .uri("/api/v1/nodes")
                .body(())
                .unwrap();
            svc.clone().oneshot(req).await.unwrap();
        }
        let text = m.render();
        assert!(
            text.contains(r#"devplug_operator_api_requests_total{verb="read",code="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"devplug_operator_api_requests_total{verb="patch",code="409"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn a_policys_status_is_a_set_of_gauges_removed_with_the_policy() {
        let m = Metrics::default();
        let mut st = devplug_api::DevicePluginPolicyStatus::default();
        st.nodes.desired = 3;
        st.nodes.ready = 2;
        st.devices.healthy = 5;
        st.devices.unhealthy = 1;
        st.conditions.push(
            devplug_api::k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Degraded".into(),
                status: "True".into(),
                reason: "DevicesUnhealthy".into(),
                message: String::new(),
                last_transition_time:
                    devplug_api::k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        devplug_api::k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ),
                observed_generation: None,
            },
        );
        m.policy_status("gpus", &st);
        let text = m.render();
        for line in [
            r#"devplug_operator_policy_degraded{policy="gpus"} 1"#,
            r#"devplug_operator_policy_nodes{policy="gpus",state="desired"} 3"#,
            r#"devplug_operator_policy_nodes{policy="gpus",state="ready"} 2"#,
            r#"devplug_operator_policy_devices{policy="gpus",state="unhealthy"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        m.forget_policy("gpus");
        assert!(!m.render().contains(r#"policy="gpus""#));
    }
}
