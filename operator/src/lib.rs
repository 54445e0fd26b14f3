//! devplug operator: one agent DaemonSet per `DevicePluginPolicy`, and the
//! policy's status from what the agents report.
//!
//! [`desired`] holds the pure builders of every object, [`controller`] the
//! reconcile, [`status`] and [`conflict`] the pure decisions it makes,
//! [`leader`] the Lease lock, [`metrics`] and [`admin`] what it exposes.

pub mod admin;
pub mod args;
pub mod conflict;
pub mod controller;
pub mod desired;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use devplug_api::DevicePluginPolicy;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{Controller, watcher};
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
    /// Leadership was lost; a new process should start as a standby.
    #[error("lost the leader lease")]
    LostLease,
}

const LEASE: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Runs the operator until it is stopped or loses leadership.
pub async fn run(args: Args) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(admin::serve(
        args.metrics_addr,
        admin::AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));

    if args.leader_elect {
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("devplug-operator-{}", std::process::id()));
        let lock = leader::LeaseLock::new(
            Api::<Lease>::namespaced(client.clone(), &args.namespace),
            &args.lease_name,
            &identity,
            LEASE,
        );
        ready.store(true, Ordering::SeqCst); // a standby is healthy too
        info!(%identity, lease = %args.lease_name, "waiting for leadership");
        loop {
            match lock.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
        info!(%identity, "leading");
        let (lost_tx, mut lost_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match lock.try_acquire_or_renew().await {
                    Ok(true) => last_ok = tokio::time::Instant::now(),
                    Ok(false) => break,
                    Err(e) => {
                        warn!(error = %e, "renewing the lease");
                        if last_ok.elapsed() > LEASE {
                            break;
                        }
                    }
                }
            }
            let _ = lost_tx.send(());
        });
        tokio::select! {
            r = controller(client, &args, metrics, ready) => return r,
            _ = &mut lost_rx => {
                error!("lost the leader lease; exiting so a standby can take over");
                return Err(RunError::LostLease);
            }
            r = admin => return r.map_err(|e| RunError::Admin(std::io::Error::other(e)))?.map_err(RunError::Admin),
        }
    }
    ready.store(true, Ordering::SeqCst);
    tokio::select! {
        r = controller(client, &args, metrics, Arc::new(AtomicBool::new(true))) => r,
        r = admin => r.map_err(|e| RunError::Admin(std::io::Error::other(e)))?.map_err(RunError::Admin),
    }
}

async fn controller(
    client: Client,
    args: &Args,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<(), RunError> {
    let policies: Api<DevicePluginPolicy> = Api::all(client.clone());
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &args.namespace);
    let controller = Controller::new(policies, watcher::Config::default().any_semantic()).owns(
        daemonsets,
        watcher::Config::default().labels("app.kubernetes.io/managed-by=devplug-operator"),
    );
    let ctx = Arc::new(Context::new(
        client,
        AgentDefaults {
            namespace: args.namespace.clone(),
            image: args.agent_image.clone(),
            kubelet_root: args.kubelet_root.clone(),
        },
        controller.store(),
        metrics,
    ));
    ready.store(true, Ordering::SeqCst);
    info!(namespace = %args.namespace, "controller started");
    controller
        .shutdown_on_signal()
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}
