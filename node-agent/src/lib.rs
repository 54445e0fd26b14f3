//! devplug node agent: serves each `DevicePluginPolicy` to the kubelet.
//!
//! One device model feeds two kubelet paths and one status path:
//! - [`devices`]: sources, discovery, the health state machine (the one
//!   place health is decided), sharing, and the snapshots they publish;
//! - [`deviceplugin`]: the device plugin API (`spec.kubeletApi:
//!   DevicePlugin`, the default);
//! - [`dra`]: Dynamic Resource Allocation (`spec.kubeletApi: DRA`);
//! - [`status`]: allocations from PodResources and the NodeDeviceStatus
//!   entry, for both paths.
//!
//! Around them: [`plugin`] is one served policy whichever API serves it
//! (its shared state and its life: start, update, stop), [`run`] wires the
//! agent (standalone or [`cluster`] mode), [`cdi`] writes CDI specs,
//! [`admin`] serves health, readiness and [`metrics`].
//!
//! Where to start reading: [`run::run`], then [`plugin::lifecycle`].

pub mod admin;
pub mod args;
pub mod cdi;
pub mod cluster;
pub mod config;
pub mod deviceplugin;
pub mod devices;
pub mod dra;
pub mod error;
pub mod http2;
pub mod metrics;
pub mod plugin;
pub mod retry;
pub mod run;
pub mod simctl;
pub mod status;
pub mod unix;

/// Resolves once `shutdown` holds true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}
