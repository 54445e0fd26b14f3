//! The agent's view of one policy: the spec digested once into what the
//! RPC handlers need.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use devplug_api::{DevicePluginPolicy, MountSpec, SharingStrategy, default_ids_env};

use crate::error::AgentError;

/// Loads and validates the policies of a standalone config file.
pub fn load_config(path: &Path) -> Result<Vec<DevicePluginPolicy>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    devplug_api::policies_from_yaml(&text).map_err(|source| AgentError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Longest policy name used whole in a socket name. A Unix socket path has
/// at most 107 bytes; the kubelet's directory takes 31
/// (`/var/lib/kubelet/device-plugins/`), so `devplug-<name>.sock` must stay
/// well under 76 bytes whatever the policy is called (names go to 253).
pub const MAX_SOCKET_NAME_PART: usize = 40;

/// The plugin's socket file name: `devplug-<policy>.sock`, or for a long
/// policy name its first characters and a hash of the whole name, so every
/// valid name gives a socket path the kernel accepts, and distinct names
/// distinct sockets.
pub fn socket_name(policy: &str) -> String {
    if policy.len() <= MAX_SOCKET_NAME_PART {
        return format!("devplug-{policy}.sock");
    }
    // FNV-1a, 64 bits: stable across versions, so a restarted agent finds
    // the same socket.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in policy.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let keep: String = policy.chars().take(MAX_SOCKET_NAME_PART - 17).collect();
    format!("devplug-{keep}-{h:016x}.sock")
}

/// One policy, ready to serve.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Policy name.
    pub name: String,
    /// Policy UID (cluster mode), for Events about the policy.
    pub uid: Option<String>,
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
    /// The agent writes the CDI spec for these devices (CDI on, and not the
    /// NVIDIA source, which relies on the NVIDIA container toolkit's).
    pub cdi_spec_owned: bool,
    /// PreStart program and arguments, with its time limit.
    pub pre_start: Option<(Vec<String>, Duration)>,
    /// Health settle time.
    pub settle: Duration,
    /// Effect of the taint on an unhealthy DRA device.
    pub taint_effect: devplug_api::TaintEffect,
    /// The kubelet API the devices are served through.
    pub kubelet_api: devplug_api::KubeletApi,
    /// DRA driver name (used in DRA mode).
    pub driver: String,
    /// CDI names come from a vendor toolkit's spec (the NVIDIA source).
    pub toolkit_cdi: bool,
    /// The source publishes partitions (NVIDIA `migPartitions`, simulated
    /// `partitionSlots`): claims may need them made.
    pub partitions: bool,
}

impl PluginConfig {
    /// Digests a validated policy.
    pub fn from_policy(p: &DevicePluginPolicy) -> Self {
        let name = p.metadata.name.clone().unwrap_or_default();
        let s = &p.spec;
        Self {
            socket_name: socket_name(&name),
            uid: p.metadata.uid.clone(),
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
            cdi_spec_owned: s.allocate.cdi.enabled && s.source.nvidia.is_none(),
            pre_start: s.pre_start.as_ref().map(|ps| {
                (
                    ps.command.clone(),
                    // Below the kubelet's 30 s PreStartContainer limit,
                    // whatever an older CRD admitted.
                    Duration::from_secs(u64::from(
                        ps.timeout_seconds
                            .unwrap_or(devplug_api::MAX_PRESTART_SECONDS)
                            .min(devplug_api::MAX_PRESTART_SECONDS),
                    )),
                )
            }),
            settle: Duration::from_secs(u64::from(s.health.settle_seconds())),
            taint_effect: s.health.taint_effect.unwrap_or_default(),
            kubelet_api: s.kubelet_api,
            driver: devplug_api::dra_driver_name(p.metadata.name.as_deref().unwrap_or_default()),
            toolkit_cdi: s.source.nvidia.is_some(),
            partitions: s.source.nvidia.as_ref().is_some_and(|n| n.mig_partitions)
                || s.source
                    .simulated
                    .as_ref()
                    .is_some_and(|m| m.partition_slots.is_some()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_valid_policy_name_gives_a_socket_path_the_kernel_takes() {
        let dir = "/var/lib/kubelet/device-plugins/";
        assert_eq!(socket_name("simulated-foo"), "devplug-simulated-foo.sock");
        let long = format!("{}.example", "a".repeat(245));
        assert_eq!(long.len(), 253);
        let s = socket_name(&long);
        assert!(
            dir.len() + s.len() <= 107,
            "{} bytes: {s}",
            dir.len() + s.len()
        );
        // Bind for real in a directory as long as the kubelet's: the kernel
        // is the judge of the limit (the unshortened name fails there).
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().as_os_str().len();
        let same_len = tmp.path().join("x".repeat(dir.len() - base - 2));
        std::fs::create_dir(&same_len).unwrap();
        assert_eq!(same_len.as_os_str().len() + 1, dir.len());
        std::os::unix::net::UnixListener::bind(same_len.join(&s)).unwrap();
        assert!(
            std::os::unix::net::UnixListener::bind(same_len.join(format!("devplug-{long}.sock")))
                .is_err()
        );
        // Distinct long names that share a prefix get distinct sockets.
        let other = format!("{}.example2", "a".repeat(244));
        assert_ne!(socket_name(&other), s);
        assert_eq!(socket_name(&long), s, "stable");
    }
}
