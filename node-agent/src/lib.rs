//! devplug node agent: one kubelet device plugin per `DevicePluginPolicy`.
//!
//! Data flow: a [`sources::Source`] discovers devices; [`discovery`] re-runs
//! it on inotify events and feeds an [`inventory::Inventory`] (damped
//! [`health`], [`sharing`]); each change publishes a snapshot that the
//! [`plugin`] service streams to the kubelet. [`server`] owns the socket,
//! [`registration`] keeps the kubelet aware of us, [`plugin_dir`] notices
//! kubelet restarts, [`admin`] serves health and readiness.

pub mod admin;
pub mod allocate;
pub mod args;
pub mod cdi;
pub mod config;
pub mod device;
pub mod discovery;
pub mod dra;
pub mod health;
pub mod inventory;
pub mod metrics;
pub mod plugin;
pub mod plugin_dir;
pub mod podresources;
pub mod prestart;
pub mod registration;
pub mod report;
pub mod reporter;
pub mod run;
pub mod server;
pub mod sharing;
pub mod simctl;
pub mod sources;
pub mod unix;

/// Resolves once `shutdown` holds true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}
