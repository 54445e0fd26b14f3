//! The agent's view of one policy: the spec digested once into what the
//! RPC handlers need.

use std::collections::BTreeMap;
use std::time::Duration;

use devplug_api::{DevicePluginPolicy, MountSpec, SharingStrategy, default_ids_env};

/// One policy, ready to serve.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Policy name.
    pub name: String,
    /// Extended resource name.
    pub resource_name: String,
    /// Socket file name in the plugin directory.
    pub socket_name: String,
    /// Advertised IDs per physical device.
    pub replicas: u32,
    /// Refuse containers asking for more than one replica.
    pub fail_requests_greater_than_one: bool,
    /// Variable listing the allocated physical IDs.
    pub ids_env: String,
    /// Extra container environment.
    pub env: BTreeMap<String, String>,
    /// Extra mounts.
    pub mounts: Vec<MountSpec>,
    /// Runtime annotations.
    pub annotations: BTreeMap<String, String>,
    /// CDI kind when CDI is on.
    pub cdi_kind: Option<String>,
    /// PreStart program and arguments, with its time limit.
    pub pre_start: Option<(Vec<String>, Duration)>,
    /// Health settle time.
    pub settle: Duration,
}

impl PluginConfig {
    /// Digests a validated policy.
    pub fn from_policy(p: &DevicePluginPolicy) -> Self {
        let name = p.metadata.name.clone().unwrap_or_default();
        let s = &p.spec;
        Self {
            socket_name: format!("devplug-{name}.sock"),
            name,
            resource_name: s.resource_name.clone(),
            replicas: s.sharing.effective_replicas(),
            fail_requests_greater_than_one: s.sharing.strategy == SharingStrategy::TimeSlicing
                && s.sharing.fail_requests_greater_than_one,
            // GPUs speak the NVIDIA container toolkit's language by default.
            ids_env: s.allocate.ids_env.clone().unwrap_or_else(|| {
                if s.source.nvidia.is_some() {
                    "NVIDIA_VISIBLE_DEVICES".into()
                } else {
                    default_ids_env(&s.resource_name)
                }
            }),
            env: s.allocate.env.clone(),
            mounts: s.allocate.mounts.clone(),
            annotations: s.allocate.annotations.clone(),
            cdi_kind: s.allocate.cdi.enabled.then(|| {
                s.allocate
                    .cdi
                    .kind
                    .clone()
                    .unwrap_or_else(|| s.resource_name.clone())
            }),
            pre_start: s.pre_start.as_ref().map(|ps| {
                (
                    ps.command.clone(),
                    Duration::from_secs(u64::from(ps.timeout_seconds.unwrap_or(30))),
                )
            }),
            settle: Duration::from_secs(u64::from(s.health.settle_seconds())),
        }
    }
}
