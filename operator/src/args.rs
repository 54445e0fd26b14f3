//! Command line of the operator.

use std::net::SocketAddr;

use clap::Parser;

/// devplug operator: rolls out a node agent for every DevicePluginPolicy.
#[derive(Debug, Parser, Clone)]
#[command(name = "devplug-operator", version)]
pub struct Args {
    /// A one-off task instead of running the operator.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Namespace of the agents (and of the leader-election Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "devplug-system")]
    pub namespace: String,

    /// Agent image used when a policy names none.
    #[arg(
        long,
        env = "DEVPLUG_AGENT_IMAGE",
        default_value = "ghcr.io/devplug/devplug-agent:0.1.0"
    )]
    pub agent_image: String,

    /// The kubelet's root directory on the nodes (k3s, k0s and microk8s move it).
    #[arg(long, env = "DEVPLUG_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: String,

    /// Host paths policies may mount into workloads, comma-separated;
    /// `:ro` requires the mount to be read-only. Empty allows none.
    #[arg(
        long,
        env = "DEVPLUG_ALLOWED_HOST_PATHS",
        value_delimiter = ',',
        default_value = "/dev:ro,/sys:ro"
    )]
    pub allowed_host_paths: Vec<String>,

    /// Device nodes policies may hand out although they give a container
    /// the host (`/dev/mem`, `/dev/kmem`, `/dev/port`, block devices),
    /// comma-separated. Empty allows none of them.
    #[arg(long, env = "DEVPLUG_ALLOWED_DEVICE_NODES", value_delimiter = ',')]
    pub allowed_device_nodes: Vec<String>,

    /// Agent images policies may name in `spec.agent.image` besides the
    /// chart's own, comma-separated. Empty allows only the chart's; `*`
    /// allows any.
    #[arg(long, env = "DEVPLUG_ALLOWED_AGENT_IMAGES", value_delimiter = ',')]
    pub allowed_agent_images: Vec<String>,

    /// Pod Security level the operator puts on its namespace at start
    /// (`pod-security.kubernetes.io/enforce`); agents need `privileged`.
    /// Empty leaves the namespace alone.
    #[arg(long, env = "DEVPLUG_NAMESPACE_POD_SECURITY", default_value = "")]
    pub namespace_pod_security: String,

    /// Pull policy of agent images (Always, IfNotPresent, Never).
    #[arg(long, env = "DEVPLUG_AGENT_IMAGE_PULL_POLICY")]
    pub agent_image_pull_policy: Option<String>,

    /// Pull secrets of agent pods, comma-separated names.
    #[arg(long, env = "DEVPLUG_AGENT_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    pub agent_image_pull_secrets: Vec<String>,

    /// The kubelet's device-plugin directory on the nodes (the kubelet fixes
    /// it; only pod-resources follows the kubelet root).
    #[arg(
        long,
        env = "DEVPLUG_DEVICE_PLUGIN_DIR",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    pub device_plugin_dir: String,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DEVPLUG_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Elect a leader through a Lease so several replicas are safe.
    #[arg(long, env = "DEVPLUG_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = "devplug-operator")]
    pub lease_name: String,

    /// The Helm release the operator belongs to, put on agent objects as
    /// `app.kubernetes.io/instance`.
    #[arg(long, env = "DEVPLUG_RELEASE_NAME", default_value = "devplug")]
    pub release_name: String,
}

/// One-off tasks.
#[derive(Debug, clap::Subcommand, Clone)]
pub enum Command {
    /// Delete every DevicePluginPolicy and wait until the operator has
    /// cleaned each up (the chart's pre-delete hook, so `helm uninstall`
    /// leaves nothing behind).
    Cleanup {
        /// Give up after this many seconds, naming what is left.
        #[arg(long, default_value_t = 150)]
        timeout_seconds: u64,
    },
    /// Apply the CRDs this version was built with (the chart's pre-upgrade
    /// hook: helm never upgrades the CRDs it installed).
    Crds,
}
