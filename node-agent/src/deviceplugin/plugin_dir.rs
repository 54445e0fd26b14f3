//! Watches the kubelet's plugin directory with inotify and tells each
//! plugin's registration loop when to register again: on creation of
//! `kubelet.sock` (all plugins) and on removal of a plugin's own socket.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use devplug_proto::deviceplugin::v1beta1::KUBELET_SOCKET;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

/// A registration trigger: an epoch counter. Each reason to register again
/// bumps it; a registration attempt covers every bump it has seen, so two
/// events of one kubelet restart cause one registration, not two.
pub type Trigger = watch::Sender<u64>;

/// Fires a trigger.
pub fn fire(t: &Trigger) {
    t.send_modify(|epoch| *epoch = epoch.wrapping_add(1));
}

/// Socket file names of the plugins served now, with their registration
/// triggers; plugins come and go as policies are reloaded.
pub type Triggers = Arc<std::sync::Mutex<HashMap<String, Arc<Trigger>>>>;

/// Watches `dir` until shutdown.
pub async fn run(
    dir: PathBuf,
    plugins: Triggers,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut watches = inotify.watches();
    let mask = WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE_SELF;
    watches.add(&dir, mask)?;
    // The directory itself may be removed and re-created by a kubelet reinstall.
    if let Some(parent) = dir.parent()
        && let Err(e) = watches.add(parent, WatchMask::CREATE | WatchMask::MOVED_TO)
    {
        debug!(error = %e, "cannot watch the plugin directory's parent");
    }
    let dir_name = dir.file_name().map(|n| n.to_os_string());
    let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
    let all = || {
        if let Ok(map) = plugins.lock() {
            for t in map.values() {
                fire(t);
            }
        }
    };
    loop {
        let ev = tokio::select! {
            _ = crate::stopped(&mut shutdown) => return Ok(()),
            ev = events.next() => ev,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                warn!(error = %e, "plugin directory watch error; re-registering to be safe");
                all();
                continue;
            }
            None => return Ok(()),
        };
        let name = ev.name.map(|n| n.to_os_string());
        if ev.mask.contains(EventMask::DELETE_SELF) {
            info!(dir = %dir.display(), "plugin directory removed; waiting for it to return");
            continue;
        }
        if name.is_some() && name == dir_name && dir.is_dir() {
            info!(dir = %dir.display(), "plugin directory re-created");
            if let Err(e) = watches.add(&dir, mask) {
                warn!(error = %e, "cannot watch the re-created plugin directory");
            }
            all();
            continue;
        }
        let Some(name) = name.as_ref().and_then(|n| n.to_str()) else {
            continue;
        };
        let created = ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
        if created && name == KUBELET_SOCKET {
            info!("kubelet.sock created: kubelet (re)started");
            all();
        } else if !created
            && let Some(t) = plugins.lock().ok().and_then(|m| m.get(name).cloned())
            // Our own re-bind also unlinks the file first; only a socket
            // that is really gone is a reason to act.
            && !dir.join(name).exists()
        {
            info!(socket = name, "plugin socket removed");
            fire(&t);
        }
    }
}
