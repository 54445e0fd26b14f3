//! devplug operator: one agent DaemonSet per `DevicePluginPolicy`, and the
//! policy's status from what the agents report.
//!
//! Where to start reading: [`run`] wires everything (watches, leader
//! election, both controllers); [`index`] is what every decision reads;
//! [`controller`] reconciles a policy and [`node_controller`] a node's
//! NodeDeviceStatus, each a pure decision ([`desired`], [`conflict`],
//! [`status`], [`devices`], [`node_controller::decide`]) and its applies.
//! [`leader`] is the Lease lock, [`metrics`] and [`admin`] what it exposes,
//! [`release`] what an uninstall that deletes the namespace first needs.

pub mod admin;
pub mod admission;
pub mod agent_pod;
pub mod args;
pub mod cleanup;
pub mod coalesce;
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
pub mod release;
pub mod run;
pub mod status;
pub mod synced;
pub mod view;
pub mod watches;

pub use coalesce::{COALESCE_NODE_EVENTS, coalesce};
pub use release::{CHART_CLUSTER_OBJECTS, POD_SECURITY_ENFORCE};
pub use run::{RENEWAL, RunError, run, run_with, run_with_renewal};
