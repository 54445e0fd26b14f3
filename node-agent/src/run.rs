//! Wiring only: flags → the host's paths and sockets, the plugin-directory
//! watcher, the admin server, signals, then standalone mode (the policies of
//! a file, [`crate::config::load_config`]) or cluster mode (one policy
//! followed through the API server, [`crate::cluster`]). What a served
//! policy is and how it starts, changes and stops is [`crate::plugin`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use devplug_proto::deviceplugin::v1beta1::KUBELET_SOCKET;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin;
use crate::args::ServeArgs;
use crate::deviceplugin::plugin_dir;
use crate::devices::device::Roots;
use crate::devices::sources::SourceContext;
use crate::error::AgentError;
use crate::metrics::AgentMetrics;
use crate::plugin::{Host, Plugin};

pub use crate::config::load_config;

fn signals() -> Result<(Signal, Signal), AgentError> {
    let io = |source| AgentError::Io {
        what: "installing signal handler",
        path: String::new(),
        source,
    };
    Ok((
        signal(SignalKind::terminate()).map_err(io)?,
        signal(SignalKind::interrupt()).map_err(io)?,
    ))
}

pub(crate) async fn terminated(sigterm: &mut Signal, sigint: &mut Signal) {
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }
}

/// Runs the agent until SIGTERM or SIGINT; then stops serving, removes its
/// sockets and returns.
pub async fn run(args: ServeArgs) -> Result<(), AgentError> {
    let standalone = match (&args.config, &args.policy) {
        (Some(path), _) => Some(load_config(path)?),
        (None, Some(_)) => None,
        (None, None) => return Err(AgentError::NoConfig),
    };
    let admin_addr = args.admin_addr().map_err(AgentError::Flag)?;
    let plugin_dir = args.plugin_dir();
    if !plugin_dir.is_dir() {
        std::fs::create_dir_all(&plugin_dir).map_err(|source| AgentError::Io {
            what: "creating plugin directory",
            path: plugin_dir.display().to_string(),
            source,
        })?;
    }
    let node_name = args
        .node_name
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    info!(node = %node_name, plugin_dir = %plugin_dir.display(), "devplug agent starting");
    let (mut sigterm, mut sigint) = signals()?;

    // One configuration for both clients: kube's default one, and the
    // HTTP/2 reader DRA prepare reads claims with.
    let (client, reader) = match &args.policy {
        Some(_) if standalone.is_none() => {
            let config = kube::Config::infer()
                .await
                .map_err(|e| AgentError::Kube(kube::Error::InferConfig(e)))?;
            let reader = match crate::http2::client(&config) {
                Ok(c) => {
                    let warm = c.clone();
                    tokio::spawn(async move { crate::http2::warm(&warm).await });
                    Some(c)
                }
                Err(e) => {
                    warn!(error = %e, "cannot build the HTTP/2 claim reader; claims are read over HTTP/1.1");
                    None
                }
            };
            let client = kube::Client::try_from(config).map_err(AgentError::Kube)?;
            (Some(client), reader)
        }
        _ => (None, None),
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    let node = Host {
        name: node_name.clone(),
        pod_resources: args.pod_resources_socket(),
        cdi_dir: args.cdi_dir.clone(),
        kubelet_root: args.kubelet_root.clone(),
        metrics: Arc::new(AgentMetrics::default()),
        client,
        reader,
        kubelet_sock: plugin_dir.join(KUBELET_SOCKET),
        plugin_dir: plugin_dir.clone(),
        sources: SourceContext {
            roots: Roots {
                dev: args.dev_root.clone(),
                sys: args.sys_root.clone(),
            },
            sim_control_dir: args.sim_control_dir.clone(),
            mig_minors: args.mig_minors.clone(),
            allowed_device_nodes: args
                .allowed_device_nodes
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
        },
        triggers: Arc::new(std::sync::Mutex::new(HashMap::new())),
        plugins: Arc::new(RwLock::new(Vec::new())),
    };

    let mut background = Vec::new();
    {
        let dir = plugin_dir.clone();
        let triggers = node.triggers.clone();
        let sd = shutdown.clone();
        background.push(tokio::spawn(async move {
            if let Err(e) = plugin_dir::run(dir.clone(), triggers, sd).await {
                warn!(dir = %dir.display(), error = %e, "cannot watch the plugin directory; kubelet restarts are detected only through dropped streams");
            }
        }));
    }
    if let Some(addr) = admin_addr {
        let state = admin::AdminState {
            plugins: node.plugins.clone(),
            metrics: node.metrics.clone(),
            node: node_name.clone(),
        };
        let (bound, task) =
            admin::serve(addr, state, shutdown.clone())
                .await
                .map_err(|source| AgentError::Io {
                    what: "listening on",
                    path: addr.to_string(),
                    source,
                })?;
        info!(addr = %bound, "admin server listening (/metrics, /healthz, /readyz)");
        background.push(task);
    }

    let mut running: Vec<Plugin> = Vec::new();
    let result = match standalone {
        Some(policies) => {
            let mut started = Ok(());
            for p in &policies {
                match node.start(p).await {
                    Ok(plugin) => running.push(plugin),
                    Err(e) => {
                        started = Err(e);
                        break;
                    }
                }
            }
            if started.is_ok() {
                terminated(&mut sigterm, &mut sigint).await;
            }
            started
        }
        None => {
            let name = args.policy.clone().unwrap_or_default();
            let mut allowed = None;
            if let Some(list) = &args.allowed_host_paths {
                let mut parsed = Vec::new();
                for a in list.iter().filter(|s| !s.is_empty()) {
                    parsed.push(a.parse().map_err(|e: String| {
                        AgentError::Flag(format!("--allowed-host-paths: {e}"))
                    })?);
                }
                allowed = Some(parsed);
            }
            crate::cluster::follow_policy(
                &node,
                &name,
                allowed.as_deref(),
                &mut running,
                &mut sigterm,
                &mut sigint,
            )
            .await
        }
    };

    for p in running.drain(..) {
        node.stop(p).await;
    }
    let _ = shutdown_tx.send(true);
    for t in background {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    info!("stopped");
    result
}
