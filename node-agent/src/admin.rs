//! The agent's small HTTP server: `/metrics`, `/healthz` (liveness: the process serves)
//! and `/readyz` (readiness: every policy is registered with the kubelet and
//! has a ListAndWatch stream open, so "ready" means "the kubelet has it").

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

use crate::plugin::PluginState;

/// The plugins being served now; changes when a policy is reloaded.
pub type Plugins = Arc<std::sync::RwLock<Vec<Arc<PluginState>>>>;

/// What the admin server reports on.
#[derive(Clone)]
pub struct AdminState {
    /// Plugins served now.
    pub plugins: Plugins,
    /// Metrics registry.
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    /// This node's name, a metrics label.
    pub node: String,
}

async fn metrics(State(s): State<AdminState>) -> impl axum::response::IntoResponse {
    let plugins: Vec<Arc<PluginState>> = s.plugins.read().map(|v| v.clone()).unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(&s.node, &plugins),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let plugins: Vec<Arc<PluginState>> = s.plugins.read().map(|v| v.clone()).unwrap_or_default();
    let mut body = String::new();
    let mut ready = !plugins.is_empty();
    if plugins.is_empty() {
        body.push_str("no policy served yet\n");
    }
    for p in plugins.iter() {
        let r = p.ready();
        ready &= r;
        let snap = p.snapshots.borrow().clone();
        let (healthy, total) = snap.counts();
        body.push_str(&format!(
            "{} {}: registered={} streams={} registrations={} devices={}/{} healthy\n",
            p.cfg().name,
            if r { "ready" } else { "not-ready" },
            p.registered.load(Ordering::SeqCst),
            p.streams.active(),
            p.registrations.load(Ordering::SeqCst),
            healthy,
            total,
        ));
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// Binds `addr` and serves until shutdown; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                crate::stopped(&mut shutdown).await;
            })
            .await;
    });
    Ok((bound, task))
}
