//! What one served policy shares between its fronts (the device plugin
//! API and DRA), the admin server and the metrics: its config, device
//! snapshots, allocations, liveness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

use crate::config::PluginConfig;
use crate::devices::inventory::Snapshot;
use crate::metrics::AgentMetrics;
use crate::status::podresources::AllocView;
use crate::status::reporter::WriteStats;

/// Live ListAndWatch streams of one plugin. Every stream reads the shared
/// snapshot channel itself, so no stream can swallow another's updates, and
/// a stream ends when its client goes away (tonic drops it).
#[derive(Default)]
pub struct Streams {
    active: AtomicUsize,
    opened: AtomicU64,
    /// Signalled each time a stream ends.
    pub closed: Notify,
}

impl Streams {
    /// Counts a stream opened; the guard counts it closed when dropped.
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.opened.fetch_add(1, Ordering::SeqCst);
        StreamGuard(self.clone())
    }

    /// Streams open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Streams opened since start.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
}

/// One open ListAndWatch stream.
pub struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.closed.notify_one();
    }
}

/// Shared state of one plugin: its config, snapshots and liveness.
pub struct PluginState {
    /// The digested policy; replaced in place when a spec change keeps the
    /// registration (same resource name and options).
    pub cfg: watch::Receiver<Arc<PluginConfig>>,
    /// Latest device snapshot.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// ListAndWatch streams.
    pub streams: Arc<Streams>,
    /// True while the kubelet has accepted our registration.
    pub registered: AtomicBool,
    /// Successful registrations since start.
    pub registrations: AtomicU64,
    /// Flips to true on shutdown; ends every stream.
    pub shutdown: watch::Receiver<bool>,
    /// Which containers hold our devices (from the kubelet's PodResources).
    pub allocations: watch::Receiver<AllocView>,
    /// Asks the PodResources poller for an early read.
    pub kick: Arc<Notify>,
    /// Agent metrics.
    pub metrics: Arc<AgentMetrics>,
    /// NodeDeviceStatus writer counters (zero in standalone mode).
    pub writes: Arc<WriteStats>,
}

impl PluginState {
    /// The policy as served now.
    pub fn cfg(&self) -> Arc<PluginConfig> {
        self.cfg.borrow().clone()
    }

    /// The kubelet has us: registered and, for the device plugin API, at
    /// least one ListAndWatch stream open (DRA has no such stream; the
    /// kubelet's registration answer is the signal).
    pub fn ready(&self) -> bool {
        let registered = self.registered.load(Ordering::SeqCst);
        match self.cfg().kubelet_api {
            devplug_api::KubeletApi::Dra => registered,
            devplug_api::KubeletApi::DevicePlugin => registered && self.streams.active() > 0,
        }
    }
}
