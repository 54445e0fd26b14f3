//! devplug node agent: one kubelet device plugin per `DevicePluginPolicy`.

pub mod allocate;
pub mod config;
pub mod device;
pub mod discovery;
pub mod health;
pub mod inventory;
pub mod sharing;
pub mod sources;
