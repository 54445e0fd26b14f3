//! devplug operator: one agent DaemonSet per `DevicePluginPolicy`, and the
//! policy's status from what the agents report.
//!
//! [`desired`] holds the pure builders of every object, [`controller`] the
//! reconcile, [`status`] and [`conflict`] the pure decisions it makes,
//! [`leader`] the Lease lock, [`metrics`] and [`admin`] what it exposes.

pub mod admin;
pub mod admission;
pub mod agent_pod;
pub mod args;
pub mod cleanup;
pub mod conflict;
pub mod controller;
pub mod crds;
pub mod desired;
pub mod devices;
pub mod error;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod node_controller;
pub mod status;
pub mod synced;
pub mod view;
pub mod watches;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::Controller;
use kube::{Api, Client};
use tracing::{error, info, warn};

use crate::args::Args;
use crate::controller::Context;
use crate::desired::AgentDefaults;
use crate::metrics::Metrics;

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

/// Puts the Pod Security level agents need on the operator's namespace.
/// Not fatal: without it agents may not be created, which their policies'
/// Degraded condition then says.
async fn label_namespace(client: &Client, namespace: &str, level: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = Namespace {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(namespace.to_string()),
            labels: Some([(POD_SECURITY_ENFORCE.to_string(), level.to_string())].into()),
            ..Default::default()
        },
        ..Namespace::default()
    };
    let params = kube::api::PatchParams::apply(devplug_api::OPERATOR_MANAGER);
    match api
        .patch(namespace, &params, &kube::api::Patch::Apply(&patch))
        .await
    {
        Ok(_) => info!(%namespace, %level, "namespace labelled for Pod Security"),
        Err(e) => {
            warn!(%namespace, error = %error::describe(&e), "cannot label the namespace for Pod Security; agents may be refused")
        }
    }
}

/// How often node events reach the policy controller, at most once per
/// policy each time.
pub const COALESCE_NODE_EVENTS: Duration = Duration::from_millis(500);

/// Forwards what `rx` receives, each distinct item at most once per
/// `every`: a steady stream of the same items comes out as one batch per
/// period, never held back longer than `every`.
pub fn coalesce<T>(
    mut rx: futures::channel::mpsc::UnboundedReceiver<T>,
    every: Duration,
) -> futures::channel::mpsc::UnboundedReceiver<T>
where
    T: std::hash::Hash + Eq + Send + 'static,
{
    let (tx, out) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        let mut pending = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.next() => match item {
                    Some(x) => {
                        pending.insert(x);
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    for x in pending.drain() {
                        if tx.unbounded_send(x).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        for x in pending.drain() {
            let _ = tx.unbounded_send(x);
        }
    });
    out
}

/// Cached objects keep no `managedFields`: nothing reads them, and for
/// NodeDeviceStatus (one field manager per agent over lists of devices)
/// they are most of each object's size.
pub(crate) fn drop_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// NodeDeviceStatus objects per list page.
pub const NDS_PAGE: u32 = 100;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches the release namespace: once it is being deleted (an uninstall
/// that takes the operator away first), every policy is released and
/// cleaned up at once ([`controller::uninstall`]), before the namespace's
/// deletion reaches this process and its identity.
async fn watch_release_namespace(
    client: Client,
    namespace: String,
    ctx: Arc<controller::Context>,
    all: futures::channel::mpsc::UnboundedSender<()>,
) {
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let mut events = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={namespace}")),
    )
    .default_backoff()
    .applied_objects()
    .boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(ns) if ns.metadata.deletion_timestamp.is_some() => {
                if !ctx
                    .uninstalling
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    tracing::warn!(%namespace, "the release namespace is being deleted: releasing every policy and removing what lives outside the namespace (node labels, ResourceSlices, DeviceClasses, agent ClusterRoles)");
                    let _ = all.unbounded_send(());
                    remove_chart_cluster_objects(&ctx).await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "release namespace watch"),
        }
    }
}

/// The chart's cluster-scoped objects (fixed names). Helm keeps its
/// release record in the release namespace, so when that namespace is
/// deleted first nothing would ever remove these, and a new install would
/// be refused for objects it does not own.
pub const CHART_CLUSTER_OBJECTS: &[(&str, &str, &str, &str)] = &[
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "devplug-policy-allow-lists",
    ),
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "devplug-policy-allow-lists",
    ),
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "devplug-agent-own-node",
    ),
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "devplug-agent-own-node",
    ),
    (
        "flowcontrol.apiserver.k8s.io/v1",
        "FlowSchema",
        "flowschemas",
        "devplug-operator-leader-election",
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        "devplug-viewer",
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        "devplug-editor",
    ),
    // The operator's own identity last.
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "devplug-operator",
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        "devplug-operator",
    ),
];

/// Once every policy is released (or after a bounded wait), deletes the
/// chart's cluster-scoped objects ([`CHART_CLUSTER_OBJECTS`]).
async fn remove_chart_cluster_objects(ctx: &controller::Context) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let held = ctx
            .index
            .policies
            .state()
            .iter()
            .filter(|p| {
                kube::ResourceExt::finalizers(p.as_ref())
                    .iter()
                    .any(|f| f == controller::FINALIZER)
            })
            .count();
        if held == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (api_version, kind, plural, name) in CHART_CLUSTER_OBJECTS {
        if *kind == "ClusterRoleBinding" && *name == "devplug-operator" {
            // Deleting the binding would take the right to delete the role
            // with it (the role would be left), and
            // the role first would take the right to delete the binding:
            // the binding is handed to the role, whose deletion the garbage
            // collector carries to it.
            hand_binding_to_role(&ctx.client).await;
            continue;
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk(group, version, kind),
            plural,
        );
        let api: Api<kube::api::DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        match api.delete(name, &Default::default()).await {
            Ok(_) => info!(%kind, %name, "deleted the chart's cluster-scoped object"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                warn!(%kind, %name, error = %e, "cannot delete the chart's cluster-scoped object")
            }
        }
    }
}

/// Makes the ClusterRole `devplug-operator` the owner of the binding of the
/// same name, so deleting the role removes the binding too.
async fn hand_binding_to_role(client: &Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let role = match Api::<ClusterRole>::all(client.clone())
        .get("devplug-operator")
        .await
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the operator's ClusterRole");
            return;
        }
    };
    let Some(uid) = role.metadata.uid else { return };
    let patch = serde_json::json!({"metadata": {"ownerReferences": [{
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "name": "devplug-operator", "uid": uid,
    }]}});
    match Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "devplug-operator",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => info!("the operator's ClusterRoleBinding goes with its ClusterRole"),
        Err(e) => {
            warn!(error = %e, "cannot hand the operator's ClusterRoleBinding to its ClusterRole")
        }
    }
}

/// The Pod Security admission label that sets the enforced level.
pub const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

async fn controller(
    client: Client,
    args: &Args,
    watches: &watches::Watches,
    metrics: Arc<Metrics>,
) -> Result<(), RunError> {
    if !args.namespace_pod_security.is_empty() {
        label_namespace(&client, &args.namespace, &args.namespace_pod_security).await;
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
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE));

    let policy_store = watches.policies.store.clone();
    // Every policy again once the release namespace goes (uninstall).
    let (uninstall_tx, uninstall_rx) = futures::channel::mpsc::unbounded::<()>();
    let policy_controller =
        Controller::for_stream(watches.policies.replay_and_follow(), policy_store.clone())
            .owns_stream(watches.daemonsets.follow())
            .reconcile_on(policy_triggers)
            .reconcile_all_on(uninstall_rx)
            .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE));
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
    let release_ns = tokio::spawn(watch_release_namespace(
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

#[cfg(test)]
mod coalesce_tests {
    use super::*;

    /// A steady stream of triggers for the same two keys comes out as one
    /// batch per period: deduplicated, and never held back until the
    /// stream pauses (what a debounce alone does).
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_batched_not_starved() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = coalesce(rx, Duration::from_millis(500));
        let feeder = tokio::spawn(async move {
            for i in 0..300u32 {
                tx.unbounded_send(i % 2).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let start = tokio::time::Instant::now();
        let mut got = Vec::new();
        while start.elapsed() < Duration::from_millis(2900) {
            if let Ok(Some(x)) = tokio::time::timeout(Duration::from_millis(50), out.next()).await {
                got.push((start.elapsed().as_millis() / 500, x));
            }
        }
        feeder.await.unwrap();
        // Both keys in every period while the stream flowed, once each.
        for period in 1..5 {
            let mut keys: Vec<u32> = got
                .iter()
                .filter(|(p, _)| *p == period)
                .map(|(_, k)| *k)
                .collect();
            keys.sort();
            assert_eq!(keys, [0, 1], "period {period}: {got:?}");
        }
    }
}
