//! Registering with the kubelet, and registering again whenever the kubelet
//! may have forgotten us:
//! - `kubelet.sock` is (re)created: a new kubelet is listening;
//! - our own socket is deleted: the kubelet restarted and cleaned the
//!   directory (we re-create the socket first, then register);
//! - every ListAndWatch stream ended and none replaced it within
//!   [`STREAM_GRACE`]: the kubelet dropped us.
//!
//! Failures (kubelet not up yet, or refusing) are retried, never fatal. A
//! registration round starts fast: every [`FAST_RETRY`] for
//! [`FAST_WINDOW`], because a starting kubelet creates `kubelet.sock` before
//! it listens (a dial right on the inotify event is refused); only then does
//! the exponential backoff take over. A trigger during the backoff starts a
//! fast window again.
//!
//! One kubelet start means one registration: a trigger that arrives for the
//! kubelet we are already registered with (the same `kubelet.sock` inode,
//! our socket still there, a ListAndWatch stream open) is ignored; a
//! restart's socket removal and socket creation arrive as two events.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use devplug_proto::deviceplugin::v1beta1 as dp;
use devplug_proto::deviceplugin::v1beta1::registration_client::RegistrationClient;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::deviceplugin::plugin::options;
use crate::deviceplugin::server::Rebind;
use crate::plugin::PluginState;
use crate::unix::{dial, error_chain};

/// How long a dropped ListAndWatch stream may go unreplaced.
pub const STREAM_GRACE: Duration = Duration::from_millis(300);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Retry interval right after a trigger.
pub const FAST_RETRY: Duration = Duration::from_millis(20);
/// How long retries stay fast after a trigger.
pub const FAST_WINDOW: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of one registration attempt.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Could not reach the kubelet's socket.
    #[error("cannot connect to {path}: {detail}")]
    Connect {
        /// kubelet.sock.
        path: String,
        /// The transport error with its causes.
        detail: String,
    },
    /// The kubelet answered with an error.
    #[error("kubelet refused registration: {code:?}: {message}")]
    Refused {
        /// gRPC code.
        code: tonic::Code,
        /// The kubelet's message.
        message: String,
    },
    /// The connection broke during the call (the kubelet went away).
    #[error("connection to the kubelet lost during Register: {0}")]
    Lost(String),
    /// No answer in time.
    #[error("registration timed out")]
    Timeout,
}

/// Calls `Registration.Register` on the kubelet socket once.
pub async fn register_once(
    kubelet_sock: &Path,
    req: dp::RegisterRequest,
) -> Result<(), RegisterError> {
    let attempt = async {
        let channel = dial(kubelet_sock)
            .await
            .map_err(|e| RegisterError::Connect {
                path: kubelet_sock.display().to_string(),
                detail: error_chain(&e),
            })?;
        RegistrationClient::new(channel)
            .register(req)
            .await
            .map_err(|status| match std::error::Error::source(&status) {
                // A transport failure surfaces as a status with a source.
                Some(src) if status.code() == tonic::Code::Unknown => {
                    RegisterError::Lost(error_chain(src))
                }
                _ => RegisterError::Refused {
                    code: status.code(),
                    message: status.message().to_string(),
                },
            })?;
        Ok(())
    };
    tokio::time::timeout(CALL_TIMEOUT, attempt)
        .await
        .map_err(|_| RegisterError::Timeout)?
}

/// Keeps one plugin registered until shutdown.
pub async fn run(
    state: Arc<PluginState>,
    kubelet_sock: PathBuf,
    rebind: Rebind,
    mut trigger: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = state.cfg();
    let req = dp::RegisterRequest {
        version: dp::VERSION.to_string(),
        endpoint: cfg.socket_name.clone(),
        resource_name: cfg.resource_name.clone(),
        options: Some(options(&cfg)),
    };
    loop {
        // Register: fast first, then with backoff.
        let mut backoff = crate::retry::Retry::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut attempt = 0u32;
        let mut fast_until = Instant::now() + FAST_WINDOW;
        loop {
            attempt += 1;
            if *shutdown.borrow() {
                return;
            }
            // This attempt answers every trigger fired so far.
            trigger.borrow_and_update();
            if !rebind.path().exists()
                && let Err(e) = rebind.rebind().await
            {
                warn!(policy = %cfg.name, error = %e, "cannot re-create plugin socket");
            }
            match register_once(&kubelet_sock, req.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    let fast = Instant::now() < fast_until;
                    let wait = if fast {
                        FAST_RETRY
                    } else {
                        backoff.next_delay()
                    };
                    // A kubelet restart costs a few quick failures; say so
                    // loudly only when it outlasts the fast window.
                    if attempt >= 4 && !fast {
                        warn!(policy = %cfg.name, error = %e, attempt, retry_in = ?wait, "registration failed");
                    } else {
                        debug!(policy = %cfg.name, error = %e, attempt, retry_in = ?wait, "registration failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = trigger.changed() => {
                            // A new kubelet.sock: its kubelet listens soon.
                            fast_until = Instant::now() + FAST_WINDOW;
                            backoff.reset();
                        }
                        _ = crate::stopped(&mut shutdown) => return,
                    }
                }
            }
        }
        let registered_with = socket_id(&kubelet_sock);
        state.registered.store(true, Ordering::SeqCst);
        let n = state.registrations.fetch_add(1, Ordering::SeqCst) + 1;
        info!(policy = %cfg.name, resource = %cfg.resource_name, socket = %cfg.socket_name, registrations = n, "registered with the kubelet");

        // Wait for a reason to register again.
        let mut inner_shutdown = shutdown.clone();
        let reason = loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = trigger.changed() => {
                    if still_registered(&state, &kubelet_sock, &rebind, registered_with) {
                        debug!(policy = %cfg.name, "trigger for the kubelet we are registered with; not registering twice");
                        continue;
                    }
                    break "kubelet socket re-created or plugin socket removed";
                }
                _ = state.streams.closed.notified() => {
                    if state.streams.active() > 0 {
                        continue;
                    }
                    let opened = state.streams.opened();
                    tokio::select! {
                        _ = crate::stopped(&mut inner_shutdown) => return,
                        _ = trigger.changed() => break "kubelet socket re-created or plugin socket removed",
                        _ = tokio::time::sleep(STREAM_GRACE) => {}
                    }
                    if state.streams.active() == 0 && state.streams.opened() == opened {
                        break "the kubelet closed ListAndWatch and did not reopen it";
                    }
                }
            }
        };
        state.registered.store(false, Ordering::SeqCst);
        info!(policy = %cfg.name, %reason, "registering again");
    }
}

/// (device, inode) of a socket file: one kubelet start creates one.
fn socket_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether a trigger is stale: the kubelet we registered with still has its
/// socket, ours is still there, and it streams from us.
fn still_registered(
    state: &PluginState,
    kubelet_sock: &Path,
    rebind: &Rebind,
    registered_with: Option<(u64, u64)>,
) -> bool {
    registered_with.is_some()
        && socket_id(kubelet_sock) == registered_with
        && rebind.path().exists()
        && state.streams.active() > 0
}
