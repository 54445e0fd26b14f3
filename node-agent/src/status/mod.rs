//! The status path, the same for both kubelet paths: which containers hold
//! which devices ([`podresources`], from the kubelet's PodResources API,
//! which lists device-plugin devices and DRA claims), this agent's
//! NodeDeviceStatus entry as a pure function ([`report`]) and its writer
//! ([`reporter`]).

pub mod podresources;
pub mod report;
pub mod reporter;
