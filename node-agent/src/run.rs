//! Wiring: policies → plugins (source, inventory, server, registration),
//! plus the plugin-directory watcher, the admin server and signal handling.
//!
//! Standalone mode serves the policies of a file. Cluster mode watches one
//! policy through the API server and restarts its plugin when the serving
//! part of the spec changes; the kubelet keeps running containers' devices
//! across such a restart, and if the API server goes away the plugin simply
//! keeps serving the last spec.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use devplug_api::{DevicePluginPolicy, DevicePluginPolicySpec, LoadError};
use devplug_proto::deviceplugin::v1beta1::KUBELET_SOCKET;
use futures::StreamExt;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::admin;
use crate::admin::Plugins;
use crate::args::ServeArgs;
use crate::config::PluginConfig;
use crate::deviceplugin::plugin::{PluginService, PluginState, Streams};
use crate::deviceplugin::plugin_dir::Triggers;
use crate::deviceplugin::{plugin_dir, registration, server};
use crate::devices::device::Roots;
use crate::devices::discovery;
use crate::devices::inventory::{Inventory, Snapshot};
use crate::devices::sources::{self, SourceContext, SourceError};
use crate::metrics::AgentMetrics;
use crate::status::podresources::AllocView;
use crate::status::reporter::WriteStats;
use crate::status::{podresources, reporter};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Neither `--config` nor `--policy`.
    #[error("no configuration: pass --config FILE (standalone) or --policy NAME (cluster mode)")]
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
    /// No API server configuration in cluster mode.
    #[error("cluster mode: {0}")]
    Kube(#[source] kube::Error),
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

/// What every plugin of this agent shares.
struct Node {
    name: String,
    plugin_dir: PathBuf,
    kubelet_sock: PathBuf,
    pod_resources: PathBuf,
    cdi_dir: PathBuf,
    kubelet_root: PathBuf,
    sources: SourceContext,
    triggers: Triggers,
    plugins: Plugins,
    metrics: Arc<AgentMetrics>,
    /// Set in cluster mode: device status goes to the API.
    client: Option<kube::Client>,
}

/// One running plugin: the part the kubelet sees (socket, registration,
/// ListAndWatch streams, PodResources view, status writer, CDI spec), which
/// lives as long as the resource name and registration options stay the
/// same, and its discovery, which a spec change replaces in place.
struct Plugin {
    name: String,
    spec: DevicePluginPolicySpec,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    socket: PathBuf,
    state: Arc<PluginState>,
    cfg_tx: watch::Sender<Arc<PluginConfig>>,
    snap_tx: Arc<watch::Sender<Arc<Snapshot>>>,
    discovery: Discovery,
}

/// The discovery of one spec: its source and inventory, publishing into
/// its own channel until [`Discovery::forward`] connects it to the plugin.
struct Discovery {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    snaps: watch::Receiver<Arc<Snapshot>>,
}

impl Discovery {
    /// Copies every snapshot into the plugin's channel from now on.
    fn forward(&mut self, to: Arc<watch::Sender<Arc<Snapshot>>>) {
        let mut from = self.snaps.clone();
        let mut stopped = self.stop.subscribe();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let snap = from.borrow_and_update().clone();
                to.send_replace(snap);
                tokio::select! {
                    _ = crate::stopped(&mut stopped) => break,
                    r = from.changed() => if r.is_err() { break },
                }
            }
        }));
    }

    async fn stop(self, policy: &str) {
        let _ = self.stop.send(true);
        join_within(self.tasks, policy, "discovery").await;
    }
}

/// Waits for `tasks` to end, at most 5 s; says so when they do not.
async fn join_within(tasks: Vec<tokio::task::JoinHandle<()>>, policy: &str, what: &str) {
    let join = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .is_err()
    {
        warn!(%policy, "{what} did not stop within 5 s");
    }
}

/// Whether `new` can be served by the running plugin of `old` without a new
/// registration: the kubelet keys a plugin by resource name and learns its
/// options only when it registers.
fn same_registration(old: &PluginConfig, new: &PluginConfig) -> bool {
    old.kubelet_api == new.kubelet_api
        && old.driver == new.driver
        && old.resource_name == new.resource_name
        && old.socket_name == new.socket_name
        && crate::deviceplugin::plugin::options(old) == crate::deviceplugin::plugin::options(new)
}

impl Node {
    /// Builds the source of `policy` and runs its first discovery, so the
    /// kubelet never sees an empty list from a plugin that has devices.
    async fn discover(
        &self,
        policy: &DevicePluginPolicy,
        cfg: &PluginConfig,
    ) -> Result<Discovery, AgentError> {
        let source =
            sources::build(policy, &self.sources).map_err(|source| AgentError::Source {
                policy: cfg.name.clone(),
                source,
            })?;
        let (stop, stopped) = watch::channel(false);
        let (snap_tx, snaps) = watch::channel(Arc::new(Snapshot::default()));
        let mut first = snaps.clone();
        let task = tokio::spawn(discovery::run(
            cfg.name.clone(),
            source,
            Inventory::new(cfg.settle, cfg.replicas),
            snap_tx,
            stopped,
            discovery::DISCOVERY_TIMEOUT,
        ));
        let _ = first.changed().await;
        Ok(Discovery {
            stop,
            tasks: vec![task],
            snaps,
        })
    }

    async fn start(&self, policy: &DevicePluginPolicy) -> Result<Plugin, AgentError> {
        let cfg = PluginConfig::from_policy(policy);
        let discovery = self.discover(policy, &cfg).await?;
        self.serve(policy, cfg, discovery).await
    }

    /// Serves `discovery` to the kubelet under a new registration.
    async fn serve(
        &self,
        policy: &DevicePluginPolicy,
        cfg: PluginConfig,
        mut discovery: Discovery,
    ) -> Result<Plugin, AgentError> {
        let (stop, stopped) = watch::channel(false);
        let snap_tx = Arc::new(watch::Sender::new(discovery.snaps.borrow().clone()));
        let snap_rx = snap_tx.subscribe();
        discovery.forward(snap_tx.clone());
        let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg.clone()));
        let mut tasks = Vec::new();

        // CDI names need a spec the runtime can resolve; the NVIDIA source
        // uses the NVIDIA container toolkit's. The task follows spec
        // changes (CDI switched on or off included).
        let dra = cfg.kubelet_api == devplug_api::KubeletApi::Dra;
        if !dra {
            tasks.push(tokio::spawn(crate::cdi::run(
                self.cdi_dir.clone(),
                cfg_rx.clone(),
                snap_rx.clone(),
                stopped.clone(),
            )));
        }

        let (alloc_tx, alloc_rx) = watch::channel(AllocView::default());
        let kick = Arc::new(Notify::new());
        tasks.push(tokio::spawn(podresources::poll(
            self.pod_resources.clone(),
            if dra {
                podresources::Match::Driver(cfg.driver.clone(), snap_rx.clone())
            } else {
                podresources::Match::Resource(cfg.resource_name.clone())
            },
            alloc_tx,
            kick.clone(),
            stopped.clone(),
        )));
        let writes = Arc::new(WriteStats::default());
        // Problems of the serving path the status should show (a refused
        // ResourceSlice publish).
        let (problems_tx, problems_rx) = tokio::sync::watch::channel::<Option<String>>(None);
        if let Some(client) = &self.client {
            tasks.push(tokio::spawn(reporter::run(
                client.clone(),
                self.name.clone(),
                cfg_rx.clone(),
                snap_rx.clone(),
                alloc_rx.clone(),
                problems_rx,
                writes.clone(),
                stopped.clone(),
            )));
        }
        let state = Arc::new(PluginState {
            cfg: cfg_rx,
            snapshots: snap_rx,
            streams: Arc::new(Streams::default()),
            registered: AtomicBool::new(false),
            registrations: AtomicU64::new(0),
            shutdown: stopped.clone(),
            allocations: alloc_rx,
            kick,
            metrics: self.metrics.clone(),
            writes,
        });
        if dra {
            if let Some(client) = &self.client {
                tasks.push(tokio::spawn(crate::dra::slices::publish(
                    client.clone(),
                    self.name.clone(),
                    state.cfg.clone(),
                    state.snapshots.clone(),
                    problems_tx,
                    stopped.clone(),
                )));
            }
            let setup = crate::dra::Setup {
                plugin: state.clone(),
                node: self.name.clone(),
                kubelet_root: self.kubelet_root.clone(),
                cdi_dir: self.cdi_dir.clone(),
                client: self.client.clone(),
            };
            let started = match crate::dra::serve(setup, stopped) {
                Ok(x) => x,
                Err(source) => {
                    let _ = stop.send(true);
                    for t in tasks {
                        let _ = t.await;
                    }
                    discovery.stop(&cfg.name).await;
                    return Err(AgentError::Io {
                        what: "listening on the DRA sockets under",
                        path: self.kubelet_root.display().to_string(),
                        source,
                    });
                }
            };
            tasks.extend(started.tasks);
            let socket = started.registration;
            if let (Some(problem), Some(client)) = (started.problem, &self.client) {
                tasks.push(tokio::spawn(reporter::warn_policy(
                    client.clone(),
                    self.name.clone(),
                    state.cfg(),
                    "CheckpointQuarantined",
                    problem,
                )));
            }
            if let Ok(mut p) = self.plugins.write() {
                p.push(state.clone());
            }
            return Ok(Plugin {
                name: cfg.name.clone(),
                spec: policy.spec.clone(),
                stop,
                tasks,
                socket,
                state,
                cfg_tx,
                snap_tx,
                discovery,
            });
        }
        let socket = self.plugin_dir.join(&cfg.socket_name);
        let (rebind, server_task) = match server::serve(
            socket.clone(),
            PluginService(state.clone()),
            stopped.clone(),
        ) {
            Ok(x) => x,
            Err(source) => {
                let _ = stop.send(true);
                for t in tasks {
                    let _ = t.await;
                }
                discovery.stop(&cfg.name).await;
                return Err(AgentError::Io {
                    what: "listening on",
                    path: socket.display().to_string(),
                    source,
                });
            }
        };
        tasks.push(server_task);
        let (trigger, trigger_rx) = watch::channel(0u64);
        if let Ok(mut t) = self.triggers.lock() {
            t.insert(cfg.socket_name.clone(), Arc::new(trigger));
        }
        tasks.push(tokio::spawn(registration::run(
            state.clone(),
            self.kubelet_sock.clone(),
            rebind,
            trigger_rx,
            stopped,
        )));
        if let Ok(mut p) = self.plugins.write() {
            p.push(state.clone());
        }
        info!(policy = %cfg.name, resource = %cfg.resource_name, socket = %socket.display(), "serving");
        Ok(Plugin {
            name: cfg.name.clone(),
            spec: policy.spec.clone(),
            stop,
            tasks,
            socket,
            state,
            cfg_tx,
            snap_tx,
            discovery,
        })
    }

    /// Moves a running plugin to a new spec without a gap in service. When
    /// the registration stays the same the new discovery is swapped in
    /// behind the same socket, registration and ListAndWatch stream (the
    /// kubelet sees a new device list, never a disconnect). Otherwise the
    /// new source is built first and only then the old plugin is stopped
    /// and the new one registered. On any error before the switch the old
    /// spec keeps serving.
    async fn update(
        &self,
        running: &mut Vec<Plugin>,
        policy: &DevicePluginPolicy,
    ) -> Result<(), AgentError> {
        let cfg = PluginConfig::from_policy(policy);
        let Some(mut current) = running.pop() else {
            running.push(self.start(policy).await?);
            return Ok(());
        };
        let discovery = match self.discover(policy, &cfg).await {
            Ok(d) => d,
            Err(e) => {
                running.push(current);
                return Err(e);
            }
        };
        if same_registration(&current.state.cfg(), &cfg) {
            let old = std::mem::replace(&mut current.discovery, discovery);
            old.stop(&current.name).await;
            current.cfg_tx.send_replace(Arc::new(cfg));
            current.discovery.forward(current.snap_tx.clone());
            current.spec = policy.spec.clone();
            info!(policy = %current.name, "spec change served in place (same registration)");
            running.push(current);
            return Ok(());
        }
        info!(policy = %current.name, "resource name or registration options changed: registering anew");
        self.stop(current).await;
        running.push(self.serve(policy, cfg, discovery).await?);
        Ok(())
    }

    async fn stop(&self, p: Plugin) {
        p.discovery.stop(&p.name).await;
        let _ = p.stop.send(true);
        join_within(p.tasks, &p.name, "plugin tasks").await;
        let _ = std::fs::remove_file(&p.socket);
        if let Ok(mut t) = self.triggers.lock() {
            t.remove(&p.state.cfg().socket_name);
        }
        if let Ok(mut list) = self.plugins.write() {
            list.retain(|s| !Arc::ptr_eq(s, &p.state));
        }
        info!(policy = %p.name, "stopped serving");
    }
}

/// First and longest wait before serving a spec that failed to start again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The parts of a spec the agent serves from; the rest (placement, agent
/// image) is the operator's business and needs no plugin restart.
fn serving_part_changed(a: &DevicePluginPolicySpec, b: &DevicePluginPolicySpec) -> bool {
    a.resource_name != b.resource_name
        || a.kubelet_api != b.kubelet_api
        || a.source != b.source
        || a.sharing != b.sharing
        || a.allocate != b.allocate
        || a.pre_start != b.pre_start
        || a.health != b.health
}

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

async fn terminated(sigterm: &mut Signal, sigint: &mut Signal) {
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

    let client = match &args.policy {
        Some(_) if standalone.is_none() => Some(
            kube::Client::try_default()
                .await
                .map_err(AgentError::Kube)?,
        ),
        _ => None,
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    let node = Node {
        name: node_name.clone(),
        pod_resources: args.pod_resources_socket(),
        cdi_dir: args.cdi_dir.clone(),
        kubelet_root: args.kubelet_root.clone(),
        metrics: Arc::new(AgentMetrics::default()),
        client,
        kubelet_sock: plugin_dir.join(KUBELET_SOCKET),
        plugin_dir: plugin_dir.clone(),
        sources: SourceContext {
            roots: Roots {
                dev: args.dev_root.clone(),
                sys: args.sys_root.clone(),
            },
            sim_control_dir: args.sim_control_dir.clone(),
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
            cluster_mode(
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

/// Watches one policy and keeps its plugin in step with the spec.
async fn cluster_mode(
    node: &Node,
    name: &str,
    allowed_host_paths: Option<&[devplug_api::allow::AllowedHostPath]>,
    running: &mut Vec<Plugin>,
    sigterm: &mut Signal,
    sigint: &mut Signal,
) -> Result<(), AgentError> {
    use kube::runtime::{WatchStreamExt, watcher};
    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::Kube)?;
    let api: kube::Api<DevicePluginPolicy> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut policies = watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    info!(policy = %name, "cluster mode: watching the policy");
    // The newest valid spec not served yet, and when to try it next: a
    // failed start keeps the last good spec serving and is retried.
    let mut wanted: Option<DevicePluginPolicy> = None;
    let mut retry_at = tokio::time::Instant::now();
    let mut backoff = crate::retry::Retry::new(RETRY_MIN, RETRY_MAX);
    loop {
        if let Some(policy) = wanted.take_if(|_| tokio::time::Instant::now() >= retry_at) {
            match node.update(running, &policy).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    error!(policy = %name, error = %e, retry_in = ?wait, serving_last_good = !running.is_empty(), "cannot serve the new spec");
                    retry_at = tokio::time::Instant::now() + wait;
                    wanted = Some(policy);
                }
            }
            continue;
        }
        let next = tokio::select! {
            _ = terminated(sigterm, sigint) => return Ok(()),
            next = policies.next() => next,
            _ = tokio::time::sleep_until(retry_at), if wanted.is_some() => continue,
        };
        let policy = match next {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                // The watcher retries with backoff; the plugin keeps serving.
                warn!(policy = %name, error = %e, "policy watch interrupted; serving the last spec");
                continue;
            }
            None => return Ok(()),
        };
        // Only what the operator approved is served (status.approvedSpec):
        // an edit it has not judged, or refused, never reaches a workload.
        let policy = match policy.approved() {
            Ok(p) => p,
            Err(e) => {
                if running.is_empty() {
                    info!(policy = %name, reason = %e, "waiting for the operator to approve the spec");
                } else {
                    warn!(policy = %name, reason = %e, "serving the last approved spec");
                }
                continue;
            }
        };
        if let Err(e) = policy.spec.validate() {
            error!(policy = %name, error = %e, "invalid approved spec ignored; serving the last valid one");
            continue;
        }
        if let Some(why) = allowed_host_paths
            .and_then(|a| devplug_api::allow::host_path_violation(&policy.spec, a))
        {
            error!(policy = %name, error = %why, "approved spec outside this agent's allow-list ignored; serving the last valid one");
            continue;
        }
        if let Some(current) = running.first()
            && !serving_part_changed(&current.spec, &policy.spec)
        {
            // Back to what is served: a pending retry is moot.
            wanted = None;
            continue;
        }
        // A new spec is tried at once, whatever the backoff of the last.
        backoff.reset();
        retry_at = tokio::time::Instant::now();
        wanted = Some(policy);
    }
}
