//! The discovery task of one policy: runs its source on start, again on
//! every inotify event in the source's directories, and on a slow resync
//! (sysfs offers no inotify events; the resync is the only polling and is
//! there only to catch PCI/USB sysfs changes that touch no /dev node).
//! Publishes a new snapshot only when something advertised changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inotify::{Inotify, WatchMask, Watches};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use crate::inventory::{Inventory, Snapshot};
use crate::sources::Source;

/// How often sysfs-based sources are re-read without an event.
pub const RESYNC: Duration = Duration::from_secs(60);

/// Creation and removal only, unless the source reads file contents.
fn mask(contents: bool) -> WatchMask {
    let m = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE_SELF;
    if contents {
        m | WatchMask::CLOSE_WRITE | WatchMask::ATTRIB
    } else {
        m
    }
}

/// Watches each directory, or its nearest existing ancestor while it does
/// not exist yet (so its creation is an event too).
fn add_watches(watches: &mut Watches, dirs: &[PathBuf], contents: bool) {
    for dir in dirs {
        let mut target: &Path = dir;
        while !target.is_dir() {
            match target.parent() {
                Some(p) => target = p,
                None => break,
            }
        }
        if let Err(e) = watches.add(target, mask(contents)) {
            debug!(dir = %target.display(), error = %e, "cannot watch directory");
        }
    }
}

/// Runs until `shutdown` flips to true.
pub async fn run(
    policy: String,
    source: Box<dyn Source>,
    mut inventory: Inventory,
    tx: watch::Sender<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let source: Arc<dyn Source> = Arc::from(source);
    let inotify = match Inotify::init() {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(%policy, error = %e, "inotify unavailable; device changes seen only on resync");
            None
        }
    };
    let (mut watches, mut events) = match inotify {
        Some(i) => {
            let w = i.watches();
            match i.into_event_stream(vec![0u8; 4096]) {
                Ok(s) => (Some(w), Some(s)),
                Err(e) => {
                    warn!(%policy, error = %e, "inotify stream failed");
                    (None, None)
                }
            }
        }
        None => (None, None),
    };
    let dirs = source.watch_dirs();
    if let Some(w) = watches.as_mut() {
        add_watches(w, &dirs, source.watch_contents());
    }

    let rediscover = |inventory: &mut Inventory| {
        let found = source.discover();
        if let Err(e) = &found {
            warn!(%policy, source = source.kind(), error = %e, "discovery failed");
        }
        inventory.apply(found, Instant::now().into_std())
    };

    rediscover(&mut inventory);
    let first = inventory.snapshot();
    let (healthy, total) = first.counts();
    info!(%policy, source = source.kind(), total, healthy, "devices discovered");
    tx.send_replace(Arc::new(first));

    let wake = source.wake();
    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
    loop {
        let deadline = inventory.deadline().map(Instant::from_std);
        let changed = tokio::select! {
            _ = shutdown.changed() => break,
            ev = async {
                match events.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if ev.is_none() {
                    events = None;
                }
                // Coalesce a burst: take whatever else is already queued.
                if let Some(s) = events.as_mut() {
                    while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, s.next()).await {}
                }
                if let Some(w) = watches.as_mut() {
                    add_watches(w, &source.watch_dirs(), source.watch_contents());
                }
                rediscover(&mut inventory)
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => inventory.tick(Instant::now().into_std()),
            _ = resync.tick() => rediscover(&mut inventory),
            _ = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => rediscover(&mut inventory),
        };
        if changed {
            let snap = inventory.snapshot();
            let (healthy, total) = snap.counts();
            info!(%policy, version = snap.version, total, healthy, "device list changed");
            tx.send_replace(Arc::new(snap));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write-and-close in a watched device directory (what every user of
    /// `/dev/null` does) must not wake discovery; a new node must.
    #[test]
    fn device_directories_wake_on_nodes_not_on_writes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("null"), b"").unwrap();
        let mut ino = Inotify::init().unwrap();
        ino.watches().add(dir.path(), mask(false)).unwrap();
        let mut buf = [0u8; 4096];
        std::fs::write(dir.path().join("null"), b"x").unwrap();
        let n = ino.read_events(&mut buf).map(|e| e.count()).unwrap_or(0);
        assert_eq!(n, 0, "a write-and-close woke discovery");
        std::fs::write(dir.path().join("foo0"), b"").unwrap();
        let n = ino.read_events(&mut buf).map(|e| e.count()).unwrap_or(0);
        assert!(n > 0, "a new node did not wake discovery");
        // The simulated source's control files are read for their content.
        let mut ino = Inotify::init().unwrap();
        ino.watches().add(dir.path(), mask(true)).unwrap();
        std::fs::write(dir.path().join("null"), b"y").unwrap();
        let n = ino.read_events(&mut buf).map(|e| e.count()).unwrap_or(0);
        assert!(n > 0);
    }
}
