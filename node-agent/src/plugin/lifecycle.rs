//! The life of one served policy, whichever kubelet API it uses: discover
//! its devices, serve them (the parts both fronts share, then the device
//! plugin front or the DRA front), move to a new spec without a gap, stop.
//! The fronts themselves live in [`crate::deviceplugin`] and [`crate::dra`];
//! this module only starts and stops them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use devplug_api::{DevicePluginPolicy, DevicePluginPolicySpec};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::admin::Plugins;
use crate::config::PluginConfig;
use crate::deviceplugin::{
    self, plugin::PluginService, plugin_dir::Triggers, registration, server,
};
use crate::devices::discovery;
use crate::devices::inventory::{Inventory, Snapshot};
use crate::devices::sources::{self, SourceContext};
use crate::error::AgentError;
use crate::metrics::AgentMetrics;
use crate::plugin::{PluginState, Streams};
use crate::status::podresources::{self, AllocView};
use crate::status::reporter::{self, WriteStats};

/// What every plugin of this agent shares: the host's paths, the kubelet's
/// sockets, the API client.
pub struct Host {
    /// The node's name.
    pub name: String,
    /// The kubelet's device plugin directory.
    pub plugin_dir: PathBuf,
    /// The kubelet's registration socket.
    pub kubelet_sock: PathBuf,
    /// The kubelet's PodResources socket.
    pub pod_resources: PathBuf,
    /// Where CDI specs are written.
    pub cdi_dir: PathBuf,
    /// The kubelet's root (DRA sockets live under it).
    pub kubelet_root: PathBuf,
    /// What sources are built with.
    pub sources: SourceContext,
    /// Re-registration triggers, by socket name (the plugin-directory watcher).
    pub triggers: Triggers,
    /// The plugins served now (admin server, metrics).
    pub plugins: Plugins,
    /// Agent metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Set in cluster mode: device status goes to the API.
    pub client: Option<kube::Client>,
    /// Set in cluster mode: what DRA prepare reads claims and pods with
    /// (HTTP/2, see [`crate::http2`]); `client` where it could not be built.
    pub reader: Option<kube::Client>,
}

/// One running plugin: the part the kubelet sees (socket, registration,
/// ListAndWatch streams, PodResources view, status writer, CDI spec), which
/// lives as long as the resource name and registration options stay the
/// same, and its discovery, which a spec change replaces in place.
pub struct Plugin {
    name: String,
    /// The spec served.
    pub spec: DevicePluginPolicySpec,
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
    /// The source's partitioner, if it has one.
    partitioner: Option<Arc<dyn sources::Partitioner>>,
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
/// options only when it registers. A policy with partitions is always
/// served anew: its DRA front holds the source's partitioner.
fn same_registration(old: &PluginConfig, new: &PluginConfig) -> bool {
    !old.partitions
        && !new.partitions
        && old.kubelet_api == new.kubelet_api
        && old.driver == new.driver
        && old.resource_name == new.resource_name
        && old.socket_name == new.socket_name
        && deviceplugin::plugin::options(old) == deviceplugin::plugin::options(new)
}

impl Host {
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
        let partitioner = source.partitioner();
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
            partitioner,
            tasks: vec![task],
            snaps,
        })
    }

    /// Starts serving `policy`: its first discovery, then a registration.
    pub async fn start(&self, policy: &DevicePluginPolicy) -> Result<Plugin, AgentError> {
        let cfg = PluginConfig::from_policy(policy);
        let discovery = self.discover(policy, &cfg).await?;
        self.serve(policy, cfg, discovery).await
    }

    /// Serves `discovery` to the kubelet under a new registration: what
    /// both fronts share (CDI for the device plugin API, PodResources,
    /// the status writer, the plugin state), then the front the spec names.
    /// If the front cannot start, everything started here is stopped again.
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
        // changes (CDI switched on or off included). DRA writes its own
        // spec per claim.
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
        let (problems_tx, problems_rx) = watch::channel::<Option<String>>(None);
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
        let front = if dra {
            self.dra_front(&state, discovery.partitioner.clone(), problems_tx, stopped)
        } else {
            self.device_plugin_front(&state, &cfg, stopped)
        };
        let (socket, front_tasks) = match front {
            Ok(x) => x,
            Err(e) => {
                let _ = stop.send(true);
                join_within(tasks, &cfg.name, "plugin tasks").await;
                discovery.stop(&cfg.name).await;
                return Err(e);
            }
        };
        tasks.extend(front_tasks);
        if let Ok(mut p) = self.plugins.write() {
            p.push(state.clone());
        }
        info!(policy = %cfg.name, resource = %cfg.resource_name, socket = %socket.display(), api = ?cfg.kubelet_api, "serving");
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

    /// The DRA front: the slice publisher (cluster mode), the kubelet
    /// plugin and registration sockets. Returns the registration socket and
    /// its tasks.
    fn dra_front(
        &self,
        state: &Arc<PluginState>,
        partitioner: Option<Arc<dyn sources::Partitioner>>,
        problems: watch::Sender<Option<String>>,
        stopped: watch::Receiver<bool>,
    ) -> Result<(PathBuf, Vec<tokio::task::JoinHandle<()>>), AgentError> {
        let mut tasks = Vec::new();
        if let Some(client) = &self.client {
            tasks.push(tokio::spawn(crate::dra::slices::publish(
                client.clone(),
                self.name.clone(),
                state.cfg.clone(),
                state.snapshots.clone(),
                problems,
                stopped.clone(),
            )));
        }
        let setup = crate::dra::Setup {
            plugin: state.clone(),
            node: self.name.clone(),
            kubelet_root: self.kubelet_root.clone(),
            cdi_dir: self.cdi_dir.clone(),
            client: self.client.clone(),
            reader: self.reader.clone().or_else(|| self.client.clone()),
            partitioner,
        };
        let started = match crate::dra::serve(setup, stopped) {
            Ok(x) => x,
            Err(source) => {
                for t in &tasks {
                    t.abort();
                }
                return Err(AgentError::Io {
                    what: "listening on the DRA sockets under",
                    path: self.kubelet_root.display().to_string(),
                    source,
                });
            }
        };
        tasks.extend(started.tasks);
        if let (Some(problem), Some(client)) = (started.problem, &self.client) {
            tasks.push(tokio::spawn(reporter::warn_policy(
                client.clone(),
                self.name.clone(),
                state.cfg(),
                "CheckpointQuarantined",
                problem,
            )));
        }
        Ok((started.registration, tasks))
    }

    /// The device plugin API front: the plugin's gRPC socket and staying
    /// registered with the kubelet. Returns the socket and its tasks.
    fn device_plugin_front(
        &self,
        state: &Arc<PluginState>,
        cfg: &PluginConfig,
        stopped: watch::Receiver<bool>,
    ) -> Result<(PathBuf, Vec<tokio::task::JoinHandle<()>>), AgentError> {
        let socket = self.plugin_dir.join(&cfg.socket_name);
        let (rebind, server_task) = server::serve(
            socket.clone(),
            PluginService(state.clone()),
            stopped.clone(),
        )
        .map_err(|source| AgentError::Io {
            what: "listening on",
            path: socket.display().to_string(),
            source,
        })?;
        let (trigger, trigger_rx) = watch::channel(0u64);
        if let Ok(mut t) = self.triggers.lock() {
            t.insert(cfg.socket_name.clone(), Arc::new(trigger));
        }
        let registration = tokio::spawn(registration::run(
            state.clone(),
            self.kubelet_sock.clone(),
            rebind,
            trigger_rx,
            stopped,
        ));
        Ok((socket, vec![server_task, registration]))
    }

    /// Moves a running plugin to a new spec without a gap in service. When
    /// the registration stays the same the new discovery is swapped in
    /// behind the same socket, registration and ListAndWatch stream (the
    /// kubelet sees a new device list, never a disconnect). Otherwise the
    /// new source is built first and only then the old plugin is stopped
    /// and the new one registered. On any error before the switch the old
    /// spec keeps serving.
    pub async fn update(
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

    /// Stops serving `p`: its discovery, its front and shared tasks, its
    /// socket, its re-registration trigger; the one cleanup path.
    pub async fn stop(&self, p: Plugin) {
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
