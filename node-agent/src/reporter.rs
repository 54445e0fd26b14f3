//! Writes this agent's entry of its node's `NodeDeviceStatus`.
//!
//! Server-side apply of the `/status` subresource with the agent's own field
//! manager, holding only its own `resources[]` entry, so agents of different
//! policies on one node never overwrite each other. A burst of changes is
//! coalesced into one write; nothing is written when the entry is unchanged;
//! when the API server is unreachable the latest entry is kept and written
//! once it returns. The kubelet-facing side never waits on any of this.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use devplug_api::{NodeDeviceStatus, ResourceStatus, agent_manager};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::PluginConfig;
use crate::inventory::Snapshot;
use crate::podresources::AllocView;
use crate::report::resource_status;

/// Coalescing window after the first change of a burst.
pub const COALESCE: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Counters of the writer, for metrics and tests.
#[derive(Default, Debug)]
pub struct WriteStats {
    /// Successful writes.
    pub writes: AtomicU64,
    /// Failed writes.
    pub failures: AtomicU64,
    /// Bytes of the last successful status body.
    pub last_bytes: AtomicU64,
}

async fn write(
    api: &Api<NodeDeviceStatus>,
    node: &str,
    manager: &str,
    entry: &ResourceStatus,
) -> Result<u64, kube::Error> {
    let pp = PatchParams::apply(manager).force();
    let body = json!({
        "apiVersion": "devplug.io/v1alpha1",
        "kind": "NodeDeviceStatus",
        "metadata": {"name": node},
        "status": {"resources": [entry]},
    });
    let bytes = serde_json::to_vec(&body)
        .map(|b| b.len() as u64)
        .unwrap_or(0);
    match api.patch_status(node, &pp, &Patch::Apply(&body)).await {
        Ok(_) => Ok(bytes),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            // First agent on this node: create the object, then the status.
            let obj = json!({
                "apiVersion": "devplug.io/v1alpha1",
                "kind": "NodeDeviceStatus",
                "metadata": {"name": node},
                "spec": {"nodeName": node},
            });
            api.patch(node, &pp, &Patch::Apply(&obj)).await?;
            api.patch_status(node, &pp, &Patch::Apply(&body)).await?;
            Ok(bytes)
        }
        Err(e) => Err(e),
    }
}

/// Keeps the entry of `cfg` on `node` up to date until shutdown.
pub async fn run(
    client: kube::Client,
    node: String,
    cfg: PluginConfig,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    mut allocs: watch::Receiver<AllocView>,
    stats: Arc<WriteStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<NodeDeviceStatus> = Api::all(client);
    let manager = agent_manager(&cfg.name);
    let mut written: Option<ResourceStatus> = None;
    let mut retry: Option<Duration> = None;
    loop {
        // Coalesce: whatever else changes in this window joins the write.
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(COALESCE) => {}
        }
        let entry = resource_status(
            &cfg,
            &snaps.borrow_and_update(),
            &allocs.borrow_and_update(),
        );
        if written.as_ref() != Some(&entry) {
            match write(&api, &node, &manager, &entry).await {
                Ok(bytes) => {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    stats.last_bytes.store(bytes, Ordering::Relaxed);
                    if retry.is_some() {
                        info!(policy = %cfg.name, "device status written again after API errors");
                    }
                    debug!(policy = %cfg.name, bytes, healthy = entry.healthy, total = entry.total, "device status written");
                    written = Some(entry);
                    retry = None;
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    let wait = retry.map_or(RETRY_MIN, |w| (w * 2).min(RETRY_MAX));
                    warn!(policy = %cfg.name, error = %e, retry_in = ?wait, "cannot write device status; serving goes on");
                    retry = Some(wait);
                }
            }
        }
        // Wait for the next change, or for the retry time.
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            r = snaps.changed() => if r.is_err() { return },
            r = allocs.changed() => if r.is_err() { return },
            _ = async {
                match retry {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}
