//! The device plugin API front (`v1beta1.DevicePlugin`): the gRPC service
//! ([`plugin`], [`allocate`], [`prestart`]), its socket ([`server`]), staying
//! registered with the kubelet ([`registration`], [`plugin_dir`]).

pub mod allocate;
pub mod plugin;
pub mod plugin_dir;
pub mod prestart;
pub mod registration;
pub mod server;
