//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// devplug node agent: serves each DevicePluginPolicy as a kubelet device plugin.
#[derive(Debug, Parser)]
#[command(name = "devplug-agent", version)]
pub struct Args {
    /// Subcommand; without one the agent serves.
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Flags of the serving agent.
#[derive(Debug, clap::Args, Clone)]
pub struct ServeArgs {
    /// Standalone mode: serve the DevicePluginPolicy documents in this YAML
    /// file (the same YAML `kubectl apply` takes), with no API server.
    #[arg(long, env = "DEVPLUG_CONFIG", conflicts_with = "policy")]
    pub config: Option<PathBuf>,

    /// Cluster mode: serve this DevicePluginPolicy, watched through the API
    /// server (in-cluster config, or KUBECONFIG). Spec changes are applied
    /// without restarting; if the API server is unreachable the agent keeps
    /// serving the last spec it had.
    #[arg(long, env = "DEVPLUG_POLICY")]
    pub policy: Option<String>,

    /// The kubelet's root directory (k3s, k0s and microk8s move it).
    #[arg(long, env = "DEVPLUG_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,

    /// Device plugin directory [default: <kubelet-root>/device-plugins].
    #[arg(long, env = "DEVPLUG_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,

    /// The kubelet's PodResources socket [default: <kubelet-root>/pod-resources/kubelet.sock].
    #[arg(long, env = "DEVPLUG_POD_RESOURCES_SOCKET")]
    pub pod_resources_socket: Option<PathBuf>,

    /// Name of this node (for status and logs) [default: the hostname].
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Where the host's /dev is visible to the agent.
    #[arg(long, env = "DEVPLUG_DEV_ROOT", default_value = "/dev")]
    pub dev_root: PathBuf,

    /// Where the host's /sys is visible to the agent.
    #[arg(long, env = "DEVPLUG_SYS_ROOT", default_value = "/sys")]
    pub sys_root: PathBuf,

    /// The NVIDIA driver's MIG capability minors, as the agent sees the
    /// host's `/proc/driver/nvidia-caps/mig-minors` (NVIDIA `migPartitions`).
    #[arg(
        long,
        env = "DEVPLUG_MIG_MINORS",
        default_value = "/proc/driver/nvidia-caps/mig-minors"
    )]
    pub mig_minors: PathBuf,

    /// Control directory of simulated devices.
    #[arg(
        long,
        env = "DEVPLUG_SIM_CONTROL_DIR",
        default_value = "/run/devplug/sim"
    )]
    pub sim_control_dir: PathBuf,

    /// The container runtime's CDI spec directory, where policies with
    /// `allocate.cdi.enabled` get their spec file.
    #[arg(long, env = "DEVPLUG_CDI_DIR", default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,

    /// Host paths a policy may mount into workloads (`allocate.mounts`),
    /// comma-separated, `:ro` requiring read-only: the operator passes its
    /// own list, and the agent refuses a spec outside it as the operator
    /// does. Unset: no check (standalone mode).
    #[arg(long, env = "DEVPLUG_ALLOWED_HOST_PATHS", value_delimiter = ',')]
    pub allowed_host_paths: Option<Vec<String>>,

    /// Device nodes handed out although they give a container the host
    /// (`/dev/mem`, `/dev/kmem`, `/dev/port`, block devices),
    /// comma-separated. Others of that kind show Unhealthy and are never
    /// handed out.
    #[arg(long, env = "DEVPLUG_ALLOWED_DEVICE_NODES", value_delimiter = ',')]
    pub allowed_device_nodes: Vec<String>,

    /// Address of /healthz and /readyz ("off" disables).
    #[arg(long, env = "DEVPLUG_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: String,
}

impl ServeArgs {
    /// The plugin directory in effect.
    pub fn plugin_dir(&self) -> PathBuf {
        self.plugin_dir
            .clone()
            .unwrap_or_else(|| self.kubelet_root.join("device-plugins"))
    }

    /// The PodResources socket in effect.
    pub fn pod_resources_socket(&self) -> PathBuf {
        self.pod_resources_socket
            .clone()
            .unwrap_or_else(|| self.kubelet_root.join("pod-resources/kubelet.sock"))
    }

    /// The admin address, or None when disabled.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.admin_addr == "off" {
            return Ok(None);
        }
        self.admin_addr
            .parse()
            .map(Some)
            .map_err(|e| format!("--admin-addr {:?}: {e}", self.admin_addr))
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Change a simulated device: its health, or whether it is present.
    Sim {
        /// Control directory (as given to the serving agent).
        #[arg(
            long,
            env = "DEVPLUG_SIM_CONTROL_DIR",
            default_value = "/run/devplug/sim"
        )]
        control_dir: PathBuf,
        /// Policy name.
        policy: String,
        /// Device ID.
        device: String,
        /// Healthy, Unhealthy, Unknown, Absent (hot-unplug) or Present.
        state: String,
        /// Reason shown for Unhealthy or Unknown.
        reason: Option<String>,
    },
}
