//! Serving a policy's devices through Dynamic Resource Allocation
//! (`spec.kubeletApi: DRA`).
//!
//! The same discovery, health and sharing feed a second kubelet path:
//! - [`server`]: the kubelet's plugin watcher finds our registration socket
//!   in `<kubelet-root>/plugins_registry/`, asks `GetInfo` and connects to
//!   the driver socket, which serves `DRAPlugin` v1 and v1beta1 (prepare and
//!   unprepare claims) and `DRAResourceHealth` v1alpha1 (device health into
//!   the pod's `allocatedResourcesStatus`);
//! - [`claims`]: prepared claims, their CDI specs and the checkpoint that
//!   survives restarts;
//! - [`slices`]: the node's ResourceSlices, what the scheduler allocates from;
//! - [`names`]: DNS-label device names, slice names, socket paths.
//!
//! Status (NodeDeviceStatus, the policy's counts) is the same as for the
//! device plugin: allocations come from the kubelet's PodResources API,
//! which reports DRA claims per container.

pub mod authority;
pub mod claim_status;
pub mod claims;
pub mod hpack;
pub mod names;
pub mod server;
pub mod slices;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use devplug_proto::dra::{v1, v1beta1};
use devplug_proto::drahealth::v1alpha1 as health;
use devplug_proto::pluginregistration::registration_server::RegistrationServer;
use tokio::net::UnixListener;
use tokio::sync::{Mutex, watch};
use tracing::{error, info, warn};

use crate::plugin::PluginState;
use server::{DraService, DraState, Registrar};

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// What [`serve`] needs from the node.
pub struct Setup {
    /// The plugin's shared state (config, snapshots, flags, metrics).
    pub plugin: Arc<PluginState>,
    /// This node's name (the pool).
    pub node: String,
    /// The kubelet's root directory.
    pub kubelet_root: PathBuf,
    /// Where claim CDI specs go.
    pub cdi_dir: PathBuf,
    /// API access, in cluster mode.
    pub client: Option<kube::Client>,
    /// What prepare reads claims and pods with (HTTP/2 where the API server
    /// offers it); `None` reads with `client`.
    pub reader: Option<kube::Client>,
    /// Makes and removes the source's partitions, if it has any.
    pub partitioner: Option<Arc<dyn crate::devices::sources::Partitioner>>,
}

/// A started driver: its state, the registration socket (removing it
/// deregisters us), the server tasks, and what was wrong with the
/// checkpoint, if anything.
pub struct Started {
    /// Shared state.
    pub state: Arc<DraState>,
    /// `<root>/plugins_registry/<driver>-reg.sock`.
    pub registration: PathBuf,
    /// Server tasks; they end on shutdown.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// A checkpoint that could not be read (it was moved aside).
    pub problem: Option<String>,
}

/// Starts the driver: loads the checkpoint, serves the driver socket, then
/// the registration socket (so the kubelet never finds a registration
/// whose endpoint is not there yet). A bind error is returned at once.
pub fn serve(s: Setup, shutdown: watch::Receiver<bool>) -> std::io::Result<Started> {
    let cfg = s.plugin.cfg();
    let paths = names::Paths::new(&s.kubelet_root, &cfg.driver);
    let (mut checkpoint, problem) = claims::load(&paths.checkpoint);
    let unwritten = claims::settle(&s.cdi_dir, &mut checkpoint);
    if !unwritten.is_empty() {
        info!(policy = %cfg.name, claims = ?unwritten, "forgot prepares cut short before their CDI spec was written (the kubelet was never answered; its retry reads the claim again)");
    }
    // Specs no record owns: prepares cut short after their spec and before
    // the save that follows the answer (or, with an unreadable checkpoint,
    // every spec of this driver). They may serve running pods' restarts,
    // so they are kept, owned by begun records, until the kubelet prepares
    // or unprepares those claims. Such a record holds no partitions: the
    // sweep below removes the instances an adopted spec names unless a
    // container uses them (NVML refuses to remove a busy one).
    let adopted = claims::adopt(&s.cdi_dir, &cfg.driver, &mut checkpoint);
    if !adopted.is_empty() {
        info!(policy = %cfg.name, claims = ?adopted, "recorded claims whose CDI spec no record owned as begun (a prepare cut short after writing it); kept until the kubelet prepares or unprepares them");
    }
    if let Some(p) = &problem {
        warn!(policy = %cfg.name, "{p}");
    }
    let mut save_failing = false;
    if (!unwritten.is_empty() || !adopted.is_empty())
        && let Err(e) = claims::save(&paths.checkpoint, &checkpoint)
    {
        warn!(policy = %cfg.name, checkpoint = %paths.checkpoint.display(), error = %e, "cannot save the prepared claims; new claims are refused until a save goes through");
        save_failing = true;
    }
    if let Some(parts) = &s.partitioner {
        // Partitions no prepared claim holds: left by a prepare killed
        // before it recorded them, or made by hand. The agent owns the
        // partition layout of the devices it divides. Before the sockets
        // exist, so no prepare runs meanwhile.
        let removed = claims::sweep_partitions(parts.as_ref(), &checkpoint);
        if !removed.is_empty() {
            info!(policy = %cfg.name, partitions = ?removed, "removed partitions no prepared claim holds");
        }
    }
    let state = Arc::new(DraState {
        plugin: s.plugin,
        node: s.node,
        paths: paths.clone(),
        cdi_dir: s.cdi_dir,
        client: s.client,
        reader: s.reader,
        checkpoint: Mutex::new(checkpoint),
        saved: Mutex::new(0),
        save_failing: save_failing.into(),
        flush: Default::default(),
        claims_changed: Default::default(),
        reads: tokio::sync::Semaphore::new(server::READS_AT_ONCE),
        claim_locks: Default::default(),
        partitioner: s.partitioner,
    });
    let endpoint = bind(&paths.endpoint)?;
    let registration = bind(&paths.registration)?;
    let mut tasks = Vec::new();
    // The plugin watcher sends the (escaped) registration socket path as
    // :authority, which h2 refuses, so that socket goes through the relay
    // (see `authority`). The kubelet's DRA client sends `localhost` on the
    // driver socket (seen with kubelet 1.36.2), so it is served directly.
    let svc = DraService(state.clone());
    let mut down = shutdown.clone();
    let endpoint_path = paths.endpoint.clone();
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(v1::dra_plugin_server::DraPluginServer::new(svc.clone()))
            .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
                svc.clone(),
            ))
            .add_service(health::dra_resource_health_server::DraResourceHealthServer::new(svc))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(endpoint),
                async move {
                    crate::stopped(&mut down).await;
                },
            )
            .await;
        if let Err(e) = r {
            error!(error = %e, "DRA driver server failed");
        }
        let _ = std::fs::remove_file(&endpoint_path);
    }));
    let flusher = state.clone();
    let down = shutdown.clone();
    tasks.push(tokio::spawn(async move { flusher.flush_until(down).await }));
    tasks.push(tokio::spawn(claim_status::run(
        state.clone(),
        shutdown.clone(),
    )));
    let registrar = Registrar(state.clone());
    let mut down = shutdown;
    let registration_path = paths.registration.clone();
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(registrar))
            .serve_with_incoming_shutdown(authority::incoming(registration), async move {
                crate::stopped(&mut down).await;
            })
            .await;
        if let Err(e) = r {
            error!(error = %e, "DRA registration server failed");
        }
        let _ = std::fs::remove_file(&registration_path);
    }));
    info!(policy = %cfg.name, driver = %cfg.driver, registration = %paths.registration.display(), endpoint = %paths.endpoint.display(), "serving through DRA");
    Ok(Started {
        state,
        registration: paths.registration,
        tasks,
        problem,
    })
}
