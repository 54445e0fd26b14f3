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

use crate::devices::device::Device;
use crate::devices::inventory::{Inventory, Snapshot};
use crate::devices::sources::{Source, SourceError};

/// How often sysfs-based sources are re-read without an event.
pub const RESYNC: Duration = Duration::from_secs(60);

/// Longest a source may take to answer (an NVML call, a sysfs walk) before
/// its devices read `Unknown`. Sources run on the blocking pool, never on
/// the async workers that answer the kubelet.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

type Pending = tokio::task::JoinHandle<Result<Vec<Device>, SourceError>>;

/// Runs the source on the blocking pool and waits at most `timeout`. A call
/// that is still running from before is not doubled: while it hangs, the
/// answer is "stalled" at once.
async fn discover_bounded(
    source: &Arc<dyn Source>,
    pending: &mut Option<Pending>,
    timeout: Duration,
) -> Result<Vec<Device>, SourceError> {
    let mut call = match pending.take() {
        Some(call) if !call.is_finished() => {
            *pending = Some(call);
            return Err(SourceError::Stalled(timeout));
        }
        Some(call) => call,
        None => {
            let s = source.clone();
            tokio::task::spawn_blocking(move || s.discover())
        }
    };
    match tokio::time::timeout(timeout, &mut call).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => Err(SourceError::Config(format!(
            "the device source failed: {e}"
        ))),
        Err(_) => {
            *pending = Some(call);
            Err(SourceError::Stalled(timeout))
        }
    }
}

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
    timeout: Duration,
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

    let mut pending: Option<Pending> = None;
    macro_rules! rediscover {
        ($inv:expr) => {{
            let found = discover_bounded(&source, &mut pending, timeout).await;
            if let Err(e) = &found {
                warn!(%policy, source = source.kind(), error = %e, "discovery failed");
            }
            $inv.apply(found, Instant::now().into_std())
        }};
    }

    rediscover!(inventory);
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
                rediscover!(inventory)
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => inventory.tick(Instant::now().into_std()),
            _ = resync.tick() => rediscover!(inventory),
            _ = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => rediscover!(inventory),
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
    use crate::devices::health::Health;

    /// Answers once, then hangs (as a wedged NVML call does) until released.
    struct Wedged {
        calls: std::sync::atomic::AtomicUsize,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        wake: Arc<tokio::sync::Notify>,
    }

    impl Source for Wedged {
        fn kind(&self) -> &'static str {
            "wedged"
        }
        fn discover(&self) -> Result<Vec<Device>, SourceError> {
            if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                // Bounded so a broken test fails instead of hanging.
                let _ = self
                    .release
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(20));
            }
            Ok(vec![Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                id: "d0".into(),
                numa_node: None,
                nodes: vec![],
                health: Health::Healthy,
                links: vec![],
                attributes: Default::default(),
            }])
        }
        fn watch_dirs(&self) -> Vec<PathBuf> {
            Vec::new()
        }
        fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
            Some(self.wake.clone())
        }
    }

    /// Before: discovery ran on the async worker, so a wedged source call
    /// stalled the runtime (on this single-threaded one, everything, Allocate
    /// included) and the devices kept their last health. Now it times out
    /// and the devices read Unknown with the reason, while the runtime goes on.
    #[tokio::test(flavor = "current_thread")]
    async fn a_wedged_source_turns_devices_unknown_without_stalling_the_runtime() {
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let wake = Arc::new(tokio::sync::Notify::new());
        let source = Box::new(Wedged {
            calls: Default::default(),
            release: std::sync::Mutex::new(release_rx),
            wake: wake.clone(),
        });
        let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
        let (_stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(
            "p".into(),
            source,
            Inventory::new(Duration::ZERO, 1),
            tx,
            stop,
            Duration::from_millis(300),
        ));
        rx.changed().await.unwrap();
        assert!(rx.borrow_and_update().devices["d0"].health.is_healthy());
        let started = std::time::Instant::now();
        wake.notify_one();
        // The runtime keeps running: this very timer fires.
        let snap = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.unwrap();
                let s = rx.borrow_and_update().clone();
                if !s.devices["d0"].health.is_healthy() {
                    return s;
                }
            }
        })
        .await
        .expect("devices never turned Unknown");
        assert!(started.elapsed() < Duration::from_secs(5));
        match &snap.devices["d0"].health {
            Health::Unknown(r) => assert!(r.contains("did not answer within"), "{r}"),
            h => panic!("wanted Unknown, got {h:?}"),
        }
        // Released: healthy again on the next discovery.
        release_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        wake.notify_one();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow_and_update().devices["d0"].health.is_healthy() {
                    return;
                }
            }
        })
        .await
        .expect("never healthy again");
        task.abort();
    }

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
