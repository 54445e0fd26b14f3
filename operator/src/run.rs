//! Wiring: the watches, leader election, and both controllers over one
//! index. Nothing here decides anything; every decision lives in the
//! controllers' modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::Controller;
use kube::{Api, Client};
use tracing::{error, info, warn};

use crate::args::Args;
use crate::coalesce::{COALESCE_NODE_EVENTS, coalesce};
use crate::controller::{self, Context};
use crate::desired::AgentDefaults;
use crate::metrics::Metrics;
use crate::{admin, admission, agent_pod, index, leader, node_controller, release, watches};

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable kubeconfig or in-cluster config.
    #[error("cannot reach the API server: {0}")]
    Client(#[source] kube::Error),
    /// The admin server cannot listen.
    #[error("admin server: {0}")]
    Admin(#[source] std::io::Error),
    /// The SIGTERM handler cannot be installed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
}

const LEASE: Duration = Duration::from_secs(15);
/// A leader renews every 3 s (one request); a try may take up to 4 s (a
/// loaded API server answers in seconds) and is retried a second after it
/// fails; the leader stops acting once no renewal has succeeded for 10 s,
/// well before the lease (15 s) can be taken over.
pub const RENEWAL: leader::Renewal = leader::Renewal {
    every: Duration::from_secs(3),
    retry: Duration::from_secs(1),
    attempt: Duration::from_secs(4),
    deadline: Duration::from_secs(10),
};
/// How often a standby looks at the lease.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Events for one object within this window make one reconcile (a burst of
/// agent writes across a fleet is one pass per policy, not one per write).
const DEBOUNCE: Duration = Duration::from_millis(250);

/// At most this many reconciles of one controller run at once. Unbounded,
/// a 500-device burst at 1,000 nodes ran hundreds of node reconciles at
/// once, each with a request in flight; the client speaks HTTP/1.1, so each
/// took a connection of its own, which then sat idle in the pool with its
/// TLS buffers (the RSS after the burst stayed 1.46x the figure at rest).
/// A reconcile makes at most three requests, so 16 at a time still write a
/// fleet's 500 summaries in about a second.
pub const RECONCILES_AT_ONCE: u16 = 16;

fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default()
        .debounce(DEBOUNCE)
        .concurrency(RECONCILES_AT_ONCE)
}

/// Runs the operator until SIGTERM or until it loses leadership.
pub async fn run(args: Args) -> Result<(), RunError> {
    // First of all: a SIGTERM that arrives before the handler exists is
    // lost (PID 1 in a container ignores signals it does not handle), and a
    // standby or a fresh leader then runs on until the grace period ends.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let metrics = Arc::new(Metrics::default());
    // Every request the operator makes is counted by verb and status code.
    let config = kube::Config::infer()
        .await
        .map_err(|e| RunError::Client(kube::Error::InferConfig(e)))?;
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(RunError::Client)?
        .with_layer(&crate::metrics::CountRequests(metrics.clone()))
        .build();
    run_with(client, args, metrics, async move {
        term.recv().await;
        info!("SIGTERM");
    })
    .await
}

/// Runs the operator with `client` until `stop` completes. With leader
/// election, only the lease holder runs the controllers: a standby stops at
/// once when told; a leader stops renewing, releases the lease so a
/// standby takes over at its next try, and returns. A leader that cannot
/// renew stops its controllers before the lease can expire and stands by
/// again in the same process (no restart, no crash loop while the API
/// server is slow).
pub async fn run_with(
    client: Client,
    args: Args,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    run_with_renewal(client, args, metrics, stop, RENEWAL).await
}

/// [`run_with`] with the lease kept as `renewal` says (tests: shorter).
pub async fn run_with_renewal(
    client: Client,
    args: Args,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
    renewal: leader::Renewal,
) -> Result<(), RunError> {
    tokio::pin!(stop);
    let ready = Arc::new(AtomicBool::new(false));
    let mut admin = tokio::spawn(admin::serve(
        args.metrics_addr,
        admin::AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));
    let admin_failed = |r: Result<std::io::Result<()>, tokio::task::JoinError>| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RunError::Admin(e)),
        Err(e) => Err(RunError::Admin(std::io::Error::other(e))),
    };

    // Started before leader election and kept while standing by: a standby
    // that takes over already holds the cluster (`watches`). Dropped (and
    // the watches with it) when this returns.
    let mut watches = watches::Watches::start(&client, &args);
    // Ready once every store has listed the cluster, standby or leader: a
    // replica is ready to lead only warm (a rollout waits for it before it
    // stops the old leader), and listing also means the CRDs exist (a watch
    // of a missing CRD never lists). A local flag read, not an API call.
    {
        let (ready, synced) = (ready.clone(), watches.synced.clone());
        watches.tasks.spawn(async move {
            while !synced.ready() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ready.store(true, Ordering::SeqCst);
            info!("stores synced: ready");
        });
    }
    if !args.leader_elect {
        metrics.set_leading(true);
        return tokio::select! {
            _ = &mut stop => Ok(()),
            r = controller(client, &args, &watches, metrics.clone()) => r,
            r = &mut admin => admin_failed(r),
        };
    }
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("devplug-operator-{}", std::process::id()));
    let lock = Arc::new(leader::LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        &args.lease_name,
        &identity,
        LEASE,
    ));
    // A standby follows the lease: the leader's release on SIGTERM wakes it
    // at once (a poll every RETRY_EVERY alone made a failover wait up to
    // that long). Events only wake; the lease is judged by a fresh read.
    let mut lease_changed = {
        use kube::runtime::{WatchStreamExt, watcher};
        watcher(
            Api::<Lease>::namespaced(client.clone(), &args.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", args.lease_name)),
        )
        .default_backoff()
        .touched_objects()
        .filter_map(|e| futures::future::ready(e.ok().map(|_| ())))
        .boxed()
    };
    loop {
        metrics.set_leading(false);
        info!(%identity, lease = %args.lease_name, "waiting for leadership");
        loop {
            let held = tokio::select! {
                _ = &mut stop => {
                    info!("stopped while standing by");
                    return Ok(());
                }
                r = tokio::time::timeout(renewal.deadline, lock.try_acquire_or_renew()) => r,
            };
            match held {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "leader election"),
                Err(_) => warn!("leader election: the API server did not answer in time"),
            }
            tokio::select! {
                _ = &mut stop => {
                    info!("stopped while standing by");
                    return Ok(());
                }
                _ = tokio::time::sleep(RETRY_EVERY) => {}
                // A released lease is taken at once, not at the next try.
                _ = lease_changed.next() => {}
            }
        }
        info!(%identity, "leading");
        metrics.set_leading(true);
        let (lost_tx, mut lost_rx) = tokio::sync::oneshot::channel::<String>();
        let renewer = lock.clone();
        let renewing = tokio::spawn(async move {
            let why = leader::keep_renewing(|| renewer.try_acquire_or_renew(), renewal).await;
            let _ = lost_tx.send(why);
        });
        // Stopping ends leadership at once: renewing stops first (a renewal
        // after the release would take the lease back for a process that is
        // about to exit), then the lease is handed over, without waiting for
        // the controllers' graceful shutdown, which can outlast the pod's
        // grace period.
        let r = tokio::select! {
            _ = &mut stop => Ok(()),
            r = controller(client.clone(), &args, &watches, metrics.clone()) => r,
            why = &mut lost_rx => {
                // The controllers (this select's other branch) are dropped
                // here, before the lease can expire and another replica
                // take over: never two leaders at once.
                let why = why.unwrap_or_else(|_| "the renewal task ended".into());
                metrics.lost_leadership();
                error!(%why, "lost the leader lease; controllers stopped, standing by again");
                continue;
            }
            r = &mut admin => {
                renewing.abort();
                return admin_failed(r);
            }
        };
        renewing.abort();
        let _ = renewing.await;
        metrics.set_leading(false);
        match tokio::time::timeout(renewal.deadline, lock.release()).await {
            Ok(Ok(())) => info!("released the leader lease"),
            Ok(Err(e)) => warn!(error = %e, "cannot release the leader lease"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
        return r;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn controller(
    client: Client,
    args: &Args,
    watches: &watches::Watches,
    metrics: Arc<Metrics>,
) -> Result<(), RunError> {
    if !args.namespace_pod_security.is_empty() {
        release::label_namespace(&client, &args.namespace, &args.namespace_pod_security).await;
    }
    // The watches run for the life of the process (`watches`); leading,
    // the controllers follow what they touch.
    let nds_stream = watches.nds.replay_and_follow();
    // One NodeDeviceStatus watch serves both controllers: each object it
    // reports triggers its node, and through this channel every policy with
    // an entry in it, coalesced into at most one trigger per policy per
    // COALESCE_NODE_EVENTS (the controller's debounce alone restarts its
    // wait on every trigger, so a fleet's steady stream of node events
    // would hold a policy's status back until the stream paused).
    let (nds_to_policies, policy_triggers) = futures::channel::mpsc::unbounded();
    let policy_triggers = coalesce(policy_triggers, COALESCE_NODE_EVENTS);
    let nds_stream = nds_stream.inspect(move |n| {
        if let Ok(n) = n {
            for p in node_controller::policies_of_nds(n) {
                let _ = nds_to_policies.unbounded_send(p);
            }
        }
    });
    let nds_store = watches.nds.store.clone();
    let node_controller = Controller::for_stream(nds_stream, nds_store.clone())
        .watches_stream(watches.agent_pods.follow(), |pod: agent_pod::AgentPod| {
            node_controller::nds_of_pod(&pod)
        })
        .watches_stream(watches.nodes.follow(), |node| {
            Some(kube::runtime::reflector::ObjectRef::new(
                &kube::ResourceExt::name_any(&node),
            ))
        })
        .with_config(controller_config());

    let policy_store = watches.policies.store.clone();
    // Every policy again once the release namespace goes (uninstall).
    let (uninstall_tx, uninstall_rx) = futures::channel::mpsc::unbounded::<()>();
    let policy_controller =
        Controller::for_stream(watches.policies.replay_and_follow(), policy_store.clone())
            .owns_stream(watches.daemonsets.follow())
            .reconcile_on(policy_triggers)
            .reconcile_all_on(uninstall_rx)
            .with_config(controller_config());
    let index = index::Index::of(watches);
    let ctx = Arc::new(Context::new(
        client.clone(),
        AgentDefaults {
            namespace: args.namespace.clone(),
            release: args.release_name.clone(),
            image: args.agent_image.clone(),
            kubelet_root: args.kubelet_root.clone(),
            device_plugin_dir: args.device_plugin_dir.clone(),
            image_pull_policy: args
                .agent_image_pull_policy
                .clone()
                .filter(|p| !p.is_empty()),
            allowed_host_paths: Some(
                args.allowed_host_paths
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| match s.parse() {
                        Ok(a) => Some(a),
                        Err(e) => {
                            error!(error = %e, "ignoring an allowed host path");
                            None
                        }
                    })
                    .collect(),
            ),
            allowed_device_nodes: args
                .allowed_device_nodes
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            allowed_agent_images: (!args.allowed_agent_images.iter().any(|i| i == "*")).then(
                || {
                    args.allowed_agent_images
                        .iter()
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .collect()
                },
            ),
            image_pull_secrets: args
                .agent_image_pull_secrets
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
        },
        index.clone(),
        metrics.clone(),
    ));
    let node_ctx = Arc::new(node_controller::NodeContext::new(
        client.clone(),
        index,
        metrics.clone(),
        ctx.defaults.clone(),
    ));
    let release_ns = tokio::spawn(release::watch_release_namespace(
        client.clone(),
        args.namespace.clone(),
        ctx.clone(),
        uninstall_tx,
    ));
    let _stop_release_ns = AbortOnDrop(release_ns);
    let admission = admission::run(client, policy_store, ctx.recorder.clone(), metrics);
    info!(namespace = %args.namespace, "controllers started");
    let policies_done = policy_controller
        .shutdown_on_signal()
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "policy controller event");
            }
        });
    let nodes_done = node_controller
        .shutdown_on_signal()
        .run(
            node_controller::reconcile,
            node_controller::error_policy,
            node_ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "node controller event");
            }
        });
    // The controllers end on SIGTERM; the watchers then go with the process.
    tokio::select! {
        _ = futures::future::join(policies_done, nodes_done) => {}
        _ = admission => {}
    }
    info!("controllers stopped");
    Ok(())
}
