//! Writes this agent's entry of its node's `NodeDeviceStatus`.
//!
//! Server-side apply of the `/status` subresource with the agent's own field
//! manager, holding only its own `resources[]` entry, so agents of different
//! policies on one node never overwrite each other. A burst of changes is
//! coalesced into one write; nothing is written when the entry is unchanged;
//! when the API server is unreachable the latest entry is kept and written
//! once it returns. The kubelet-facing side never waits on any of this.
//!
//! The agent is the only writer of its entry, and it re-asserts it: a watch
//! of its node's object compares what the server holds with what the server
//! answered to the agent's last write, so an entry changed or removed by
//! anyone else (or the whole object deleted) is written again at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use devplug_api::{
    DevicePluginPolicy, NodeDeviceStatus, NodeDeviceStatusSpec, NodeDeviceStatusStatus, Resource,
    ResourceStatus, agent_manager,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::PluginConfig;
use crate::devices::inventory::Snapshot;
use crate::status::podresources::AllocView;
use crate::status::report::resource_status;

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

/// This agent's entry in a NodeDeviceStatus, if it has one.
pub fn own_entry(nds: &NodeDeviceStatus, entry: &ResourceStatus) -> Option<ResourceStatus> {
    nds.status.as_ref().and_then(|s| {
        s.resources
            .iter()
            .find(|e| e.resource_name == entry.resource_name && e.policy == entry.policy)
            .cloned()
    })
}

/// What the server holds for this agent, as the watch last saw it:
/// `None` until the watch has listed once, `Some(None)` when the object or
/// the entry is missing.
type ServerView = Option<Option<NodeDeviceStatus>>;

/// Feeds `tx` with the node's object from a watch on it alone.
async fn watch_own(api: Api<NodeDeviceStatus>, node: String, tx: watch::Sender<ServerView>) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = watcher(api, cfg).boxed();
    let mut listing: Option<NodeDeviceStatus> = None;
    let mut backoff = crate::retry::Retry::new(RETRY_MIN, RETRY_MAX);
    while let Some(ev) = stream.next().await {
        if ev.is_ok() {
            backoff.reset();
        }
        match ev {
            Ok(watcher::Event::Apply(o)) => {
                let _ = tx.send(Some(Some(o)));
            }
            Ok(watcher::Event::Delete(_)) => {
                let _ = tx.send(Some(None));
            }
            Ok(watcher::Event::Init) => listing = None,
            Ok(watcher::Event::InitApply(o)) => listing = Some(o),
            Ok(watcher::Event::InitDone) => {
                let _ = tx.send(Some(listing.take()));
            }
            Err(e) => {
                let wait = backoff.next_delay();
                debug!(error = %e, retry_in = ?wait, "watch of the own NodeDeviceStatus; retrying");
                tokio::time::sleep(wait).await;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

async fn write(
    api: &Api<NodeDeviceStatus>,
    node: &str,
    manager: &str,
    entry: &ResourceStatus,
) -> Result<(u64, Option<ResourceStatus>), kube::Error> {
    let pp = PatchParams::apply(manager).force();
    // Only the agent's own entry: the spec (nodeName) and the rest of the
    // status are the operator's (one writer per field).
    let mut body = NodeDeviceStatus::new(node, NodeDeviceStatusSpec::default());
    body.status = Some(NodeDeviceStatusStatus {
        resources: vec![entry.clone()],
        ..NodeDeviceStatusStatus::default()
    });
    let bytes = serde_json::to_vec(&body)
        .map(|b| b.len() as u64)
        .unwrap_or(0);
    match api.patch_status(node, &pp, &Patch::Apply(&body)).await {
        Ok(o) => Ok((bytes, own_entry(&o, entry))),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            // First agent on this node: create the object, then the status.
            let obj = NodeDeviceStatus::new(node, NodeDeviceStatusSpec::default());
            api.patch(node, &pp, &Patch::Apply(&obj)).await?;
            let o = api.patch_status(node, &pp, &Patch::Apply(&body)).await?;
            Ok((bytes, own_entry(&o, entry)))
        }
        Err(e) => Err(e),
    }
}

/// Keeps the entry of `cfg` on `node` up to date until shutdown.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: kube::Client,
    node: String,
    cfgs: watch::Receiver<Arc<PluginConfig>>,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    mut allocs: watch::Receiver<AllocView>,
    mut problems: watch::Receiver<Option<String>>,
    stats: Arc<WriteStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Name and resource name are fixed for the life of this task (a change
    // of resource name is a new registration and a new reporter).
    let cfg = cfgs.borrow().clone();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: agent_manager(&cfg.name),
            instance: Some(node.clone()),
        },
    );
    let mut orphans_told: Vec<String> = Vec::new();
    let api: Api<NodeDeviceStatus> = Api::all(client);
    let manager = agent_manager(&cfg.name);
    let (server_tx, mut server) = watch::channel::<ServerView>(None);
    let watch_task = tokio::spawn(watch_own(api.clone(), node.clone(), server_tx));
    let _stop_watch = AbortOnDrop(watch_task);
    let mut written: Option<ResourceStatus> = None;
    // What the server answered to the last write: the reference for
    // "someone else changed my entry".
    let mut answered: Option<ResourceStatus> = None;
    let mut retry: Option<Duration> = None;
    let mut backoff = crate::retry::Retry::new(RETRY_MIN, RETRY_MAX);
    // Device plugin agents have nobody sending problems.
    let mut problems_open = true;
    loop {
        // Coalesce: whatever else changes in this window joins the write.
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(COALESCE) => {}
        }
        let mut entry = resource_status(
            &cfg,
            &snaps.borrow_and_update(),
            &allocs.borrow_and_update(),
        );
        // A problem of the serving path (a refused ResourceSlice publish).
        if let Some(p) = problems.borrow_and_update().clone() {
            entry.reason = Some(match entry.reason.take() {
                Some(r) => format!("{p}; {r}"),
                None => p,
            });
        }
        let mut foreign = match &*server.borrow_and_update() {
            Some(obj) if written.is_some() => {
                let held = obj.as_ref().and_then(|o| own_entry(o, &entry));
                held != answered
            }
            _ => false,
        };
        if foreign {
            // A watch event may predate our last write: confirm with a
            // fresh read before writing again.
            if let Ok(now) = api.get_opt(&node).await {
                foreign = now.as_ref().and_then(|o| own_entry(o, &entry)) != answered;
            }
        }
        if foreign {
            info!(policy = %cfg.name, "the device status entry was changed or removed by someone else; writing it again");
        }
        let orphans: Vec<String> = entry.orphaned.iter().map(|o| o.id.clone()).collect();
        if orphans != orphans_told {
            if !orphans.is_empty() {
                tell_orphans(&recorder, &cfg, &node, &entry.orphaned).await;
            }
            orphans_told = orphans;
        }
        if written.as_ref() != Some(&entry) || foreign {
            match write(&api, &node, &manager, &entry).await {
                Ok((bytes, held)) => {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    stats.last_bytes.store(bytes, Ordering::Relaxed);
                    if retry.is_some() {
                        info!(policy = %cfg.name, "device status written again after API errors");
                    }
                    debug!(policy = %cfg.name, bytes, healthy = entry.healthy, total = entry.total, "device status written");
                    written = Some(entry);
                    answered = held;
                    retry = None;
                    backoff.reset();
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff.next_delay();
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
            r = server.changed() => if r.is_err() { return },
            r = problems.changed(), if problems_open => if r.is_err() { problems_open = false },
            _ = async {
                match retry {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// One Warning Event on the policy when running containers hold device IDs
/// the agent no longer advertises.
async fn tell_orphans(
    recorder: &Recorder,
    cfg: &PluginConfig,
    node: &str,
    orphaned: &[devplug_api::OrphanedDevice],
) {
    let held: Vec<String> = orphaned
        .iter()
        .map(|o| {
            let pods: Vec<String> = o
                .allocations
                .iter()
                .map(|a| format!("{}/{}", a.namespace, a.pod))
                .collect();
            format!("{} ({})", o.id, pods.join(", "))
        })
        .collect();
    let note = format!(
        "node {node}: {} device ID(s) of {} are held by running containers but no longer advertised: {}; the kubelet keeps them assigned until those pods end",
        orphaned.len(),
        cfg.resource_name,
        held.join("; ")
    );
    let reference = policy_ref(cfg);
    let ev = Event {
        type_: EventType::Warning,
        reason: "DevicesOrphaned".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Serve".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &reference).await {
        warn!(policy = %cfg.name, error = %e, "cannot publish the orphaned-devices event");
    }
}

/// The agent's policy, as the object of its Events.
fn policy_ref(cfg: &PluginConfig) -> ObjectReference {
    ObjectReference {
        api_version: Some(DevicePluginPolicy::api_version(&()).into_owned()),
        kind: Some(DevicePluginPolicy::kind(&()).into_owned()),
        name: Some(cfg.name.clone()),
        uid: cfg.uid.clone(),
        ..ObjectReference::default()
    }
}

/// One Warning Event on the policy, from this node's agent.
pub async fn warn_policy(
    client: kube::Client,
    node: String,
    cfg: Arc<PluginConfig>,
    reason: &'static str,
    note: String,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: agent_manager(&cfg.name),
            instance: Some(node.clone()),
        },
    );
    let reference = policy_ref(&cfg);
    let ev = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(format!("node {node}: {note}").chars().take(1000).collect()),
        action: "Serve".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &reference).await {
        warn!(policy = %cfg.name, error = %e, "cannot publish an event");
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
