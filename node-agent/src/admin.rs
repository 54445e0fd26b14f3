//! The agent's small HTTP server: `/healthz` (liveness: the process serves)
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(plugins): State<Plugins>) -> (StatusCode, String) {
    let plugins: Vec<Arc<PluginState>> = plugins.read().map(|v| v.clone()).unwrap_or_default();
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
            p.cfg.name,
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
    plugins: Plugins,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(plugins);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                crate::stopped(&mut shutdown).await;
            })
            .await;
    });
    Ok((bound, task))
}
