//! Wiring: config → sources → inventories → servers → registration, plus
//! the plugin-directory watcher, the admin server and signal handling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use devplug_api::{DevicePluginPolicy, LoadError};
use devplug_proto::deviceplugin::v1beta1::KUBELET_SOCKET;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::args::ServeArgs;
use crate::config::PluginConfig;
use crate::device::Roots;
use crate::inventory::{Inventory, Snapshot};
use crate::plugin::{PluginService, PluginState, Streams};
use crate::sources::{self, SourceContext, SourceError};
use crate::{admin, discovery, plugin_dir, registration, server};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No `--config` and no cluster mode.
    #[error("no configuration: pass --config FILE with DevicePluginPolicy YAML")]
    NoConfig,
    /// The config file cannot be read.
    #[error("reading {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid policy YAML.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: LoadError,
    },
    /// A source cannot be built.
    #[error("policy {policy}: {source}")]
    Source {
        /// Policy name.
        policy: String,
        /// What is wrong.
        #[source]
        source: SourceError,
    },
    /// A socket or directory cannot be set up.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// Where.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A bad flag value.
    #[error("{0}")]
    Flag(String),
}

/// Loads and validates the policies of a standalone config file.
pub fn load_config(path: &Path) -> Result<Vec<DevicePluginPolicy>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    devplug_api::policies_from_yaml(&text).map_err(|source| AgentError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the agent until SIGTERM or SIGINT; then stops serving, removes its
/// sockets and returns.
pub async fn run(args: ServeArgs) -> Result<(), AgentError> {
    let config = args.config.clone().ok_or(AgentError::NoConfig)?;
    let policies = load_config(&config)?;
    let admin_addr = args.admin_addr().map_err(AgentError::Flag)?;
    let plugin_dir = args.plugin_dir();
    if !plugin_dir.is_dir() {
        std::fs::create_dir_all(&plugin_dir).map_err(|source| AgentError::Io {
            what: "creating plugin directory",
            path: plugin_dir.display().to_string(),
            source,
        })?;
    }
    let node = args
        .node_name
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    info!(%node, plugin_dir = %plugin_dir.display(), policies = policies.len(), "devplug agent starting");

    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| AgentError::Io {
        what: "installing SIGTERM handler",
        path: String::new(),
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| AgentError::Io {
        what: "installing SIGINT handler",
        path: String::new(),
        source,
    })?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let ctx = SourceContext {
        roots: Roots {
            dev: args.dev_root.clone(),
            sys: args.sys_root.clone(),
        },
        sim_control_dir: args.sim_control_dir.clone(),
    };
    let kubelet_sock = plugin_dir.join(KUBELET_SOCKET);
    let mut tasks = Vec::new();
    let mut states = Vec::new();
    let mut triggers = HashMap::new();
    let mut sockets = Vec::new();

    for policy in &policies {
        let cfg = PluginConfig::from_policy(policy);
        let source = sources::build(policy, &ctx).map_err(|source| AgentError::Source {
            policy: cfg.name.clone(),
            source,
        })?;
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let inventory = Inventory::new(cfg.settle, cfg.replicas);
        // The first discovery runs inside the task; wait for it so the
        // kubelet never sees an empty list from a plugin that has devices.
        let mut first = snap_rx.clone();
        tasks.push(tokio::spawn(discovery::run(
            cfg.name.clone(),
            source,
            inventory,
            snap_tx,
            shutdown.clone(),
        )));
        let _ = first.changed().await;

        let state = Arc::new(PluginState {
            cfg: cfg.clone(),
            snapshots: snap_rx,
            streams: Arc::new(Streams::default()),
            registered: AtomicBool::new(false),
            registrations: AtomicU64::new(0),
            shutdown: shutdown.clone(),
        });
        let socket = plugin_dir.join(&cfg.socket_name);
        let (rebind, server_task) = server::serve(
            socket.clone(),
            PluginService(state.clone()),
            shutdown.clone(),
        )
        .map_err(|source| AgentError::Io {
            what: "listening on",
            path: socket.display().to_string(),
            source,
        })?;
        info!(policy = %cfg.name, resource = %cfg.resource_name, socket = %socket.display(), "serving");
        tasks.push(server_task);
        let trigger = Arc::new(Notify::new());
        triggers.insert(cfg.socket_name.clone(), trigger.clone());
        tasks.push(tokio::spawn(registration::run(
            state.clone(),
            kubelet_sock.clone(),
            rebind,
            trigger,
            shutdown.clone(),
        )));
        states.push(state);
        sockets.push(socket);
    }

    {
        let dir = plugin_dir.clone();
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = plugin_dir::run(dir.clone(), triggers, sd).await {
                warn!(dir = %dir.display(), error = %e, "cannot watch the plugin directory; kubelet restarts are detected only through dropped streams");
            }
        }));
    }

    if let Some(addr) = admin_addr {
        let (bound, task) = admin::serve(addr, states.clone(), shutdown.clone())
            .await
            .map_err(|source| AgentError::Io {
                what: "listening on",
                path: addr.to_string(),
                source,
            })?;
        info!(addr = %bound, "admin server listening (/healthz, /readyz)");
        tasks.push(task);
    }

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }
    let _ = shutdown_tx.send(true);
    let all = futures_join(tasks);
    if tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .is_err()
    {
        warn!("some tasks did not stop within 5 s");
    }
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    info!("stopped");
    Ok(())
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
