//! The device model, shared by both kubelet paths: sources discover
//! physical devices and probe them ([`sources`]), [`discovery`] re-runs them
//! on change, and the [`inventory`] combines what they report with the
//! damped health state machine ([`health`], the one place where advertised
//! health is decided) and time-slicing ([`sharing`]) into immutable
//! snapshots. The device plugin front, the DRA front and the status path
//! all read those snapshots and decide nothing about health themselves.

pub mod device;
pub mod discovery;
pub mod health;
pub mod inventory;
pub mod sharing;
pub mod sources;
