//! Whether each watch-fed store has listed the cluster once.
//!
//! A reconcile that judges from a store that has not listed yet sees an
//! empty cluster ("no agent pod runs here", "no NodeDeviceStatus"), so every
//! reconcile first checks these flags and comes back shortly while one is
//! false. The flags are set by the watch streams themselves, after the
//! reflector has applied the listing, rather than by awaiting
//! `Store::wait_until_ready`, which wakes only one of several concurrent
//! waiters (kube's own controller runner already waits on its store).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::Stream;
use futures::StreamExt;
use kube::runtime::watcher;

/// One flag per store the controllers read.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    /// Policies.
    pub policies: Arc<AtomicBool>,
    /// NodeDeviceStatus objects.
    pub nds: Arc<AtomicBool>,
    /// Agent pods.
    pub agent_pods: Arc<AtomicBool>,
    /// Agent DaemonSets.
    pub daemonsets: Arc<AtomicBool>,
    /// Nodes (metadata only).
    pub nodes: Arc<AtomicBool>,
}

impl Synced {
    /// Flags that are all set: for tests whose stores are filled by hand.
    pub fn all() -> Self {
        let s = Self::default();
        for f in s.flags() {
            f.store(true, Ordering::SeqCst);
        }
        s
    }

    fn flags(&self) -> [&Arc<AtomicBool>; 5] {
        [
            &self.policies,
            &self.nds,
            &self.agent_pods,
            &self.daemonsets,
            &self.nodes,
        ]
    }

    /// Whether every store has listed once.
    pub fn ready(&self) -> bool {
        self.flags().iter().all(|f| f.load(Ordering::SeqCst))
    }
}

/// Sets `flag` once a reflector stream has passed its first complete listing.
pub fn mark<S, K>(
    stream: S,
    flag: Arc<AtomicBool>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    stream.inspect(move |e| {
        if matches!(e, Ok(watcher::Event::InitDone)) {
            flag.store(true, Ordering::SeqCst);
        }
    })
}
