//! The CDI spec of a policy with `allocate.cdi.enabled`: Allocate answers
//! with CDI device names (`<kind>=<device ID>`), and the container runtime
//! resolves them from a spec file in its CDI directory (`/var/run/cdi`). The
//! agent writes and owns that file, one per policy: every known device with
//! its device nodes (and one variable naming it, as CDI refuses a device
//! without edits), plus the policy's environment and mounts. The file is
//! replaced atomically (written aside, then renamed) whenever discovery
//! changes what it describes, and removed when the plugin stops.
//!
//! The NVIDIA source does not write one: its CDI names (`nvidia.com/gpu=…`)
//! are those of the NVIDIA container toolkit's own spec (`nvidia-ctk cdi
//! generate`), which knows the driver libraries a GPU container needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::PluginConfig;
use crate::devices::inventory::{DeviceState, Snapshot};

/// CDI spec version written (understood by containerd 1.7+ and CRI-O 1.28+).
pub const CDI_VERSION: &str = "0.6.0";

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Spec {
    cdi_version: &'static str,
    kind: String,
    devices: Vec<CdiDevice>,
    #[serde(skip_serializing_if = "Edits::is_empty")]
    container_edits: Edits,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct CdiDevice {
    name: String,
    container_edits: Edits,
}

#[derive(Serialize, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Edits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    device_nodes: Vec<Node>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<Mount>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.env.is_empty() && self.device_nodes.is_empty() && self.mounts.is_empty()
    }
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Node {
    path: String,
    host_path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    permissions: String,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Mount {
    host_path: String,
    container_path: String,
    options: Vec<String>,
}

/// The device nodes of one device, as CDI edits.
fn nodes_of(state: &DeviceState) -> Vec<Node> {
    state
        .device
        .nodes
        .iter()
        .map(|n| Node {
            path: n.container_path.clone(),
            host_path: n.host_path.clone(),
            permissions: n.permissions.clone(),
        })
        .collect()
}

/// The variable a CDI device sets to its own ID, e.g. `DEVPLUG_DEVICE_FOO_0`.
pub fn device_env(id: &str) -> String {
    let tail: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("DEVPLUG_DEVICE_{tail}")
}

/// The spec file's name in the CDI directory.
pub fn file_name(cfg: &PluginConfig) -> String {
    let base = cfg
        .socket_name
        .strip_suffix(".sock")
        .unwrap_or(&cfg.socket_name);
    format!("{base}.json")
}

/// The spec for what discovery sees now, or `None` when CDI is off.
pub fn render(cfg: &PluginConfig, snap: &Snapshot) -> Option<Result<Vec<u8>, serde_json::Error>> {
    let kind = cfg.cdi_kind.clone()?;
    let devices = snap
        .devices
        .iter()
        .map(|(id, state)| CdiDevice {
            name: id.clone(),
            container_edits: Edits {
                env: vec![format!("{}={id}", device_env(id))],
                device_nodes: nodes_of(state),
                mounts: Vec::new(),
            },
        })
        .collect();
    let spec = Spec {
        cdi_version: CDI_VERSION,
        kind,
        devices,
        container_edits: policy_edits(cfg),
    };
    Some(serde_json::to_vec_pretty(&spec))
}

/// The edits the policy puts on every container (env and mounts).
fn policy_edits(cfg: &PluginConfig) -> Edits {
    Edits {
        env: cfg.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        device_nodes: Vec::new(),
        mounts: cfg
            .mounts
            .iter()
            .map(|m| Mount {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                options: vec!["rbind".into(), if m.read_only { "ro" } else { "rw" }.into()],
            })
            .collect(),
    }
}

/// One CDI device of a DRA claim: one physical device of one request.
pub struct ClaimDevice<'a> {
    /// CDI device name (unique per claim).
    pub name: String,
    /// Physical device ID.
    pub id: &'a str,
    /// Its state (device nodes); `None` where a vendor toolkit's own CDI
    /// device brings the nodes.
    pub state: Option<&'a DeviceState>,
    /// The physical IDs of its request, comma-separated.
    pub request_ids: String,
    /// For a shared device: the percent of it the claim's request was
    /// given (its `shares` of the device's), set as
    /// `DEVPLUG_DEVICE_<ID>_SHARE`.
    pub share_percent: Option<u32>,
    /// Host device nodes it needs besides its state's (a partition's
    /// capability nodes), at the same path in the container.
    pub extra_nodes: Vec<String>,
}

/// The CDI spec of a prepared DRA claim: per device, its device nodes, its
/// own variable and `<idsEnv>=<the IDs of its request>`; for the whole spec
/// the policy's env and mounts. Same edits as Allocate gives a
/// device-plugin container.
pub fn render_claim(
    cfg: &PluginConfig,
    kind: &str,
    devices: &[ClaimDevice<'_>],
) -> Result<Vec<u8>, serde_json::Error> {
    let devices = devices
        .iter()
        .map(|c| CdiDevice {
            name: c.name.clone(),
            container_edits: Edits {
                env: [
                    Some(format!("{}={}", cfg.ids_env, c.request_ids)),
                    Some(format!("{}={}", device_env(c.id), c.id)),
                    c.share_percent
                        .map(|p| format!("{}_SHARE={p}", device_env(c.id))),
                ]
                .into_iter()
                .flatten()
                .collect(),
                device_nodes: c
                    .state
                    .map(nodes_of)
                    .unwrap_or_default()
                    .into_iter()
                    .chain(c.extra_nodes.iter().map(|p| Node {
                        path: p.clone(),
                        host_path: p.clone(),
                        permissions: "rw".into(),
                    }))
                    .collect(),
                mounts: Vec::new(),
            },
        })
        .collect();
    serde_json::to_vec_pretty(&Spec {
        cdi_version: CDI_VERSION,
        kind: kind.to_string(),
        devices,
        container_edits: policy_edits(cfg),
    })
}

/// `statfs`'s type of a tmpfs.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Whether `dir` is on a tmpfs (as the runtime's `/var/run/cdi` is on
/// the nodes we know): there a write's fsyncs return at once, so a few
/// small files may be written without leaving the async workers. False
/// where it cannot be told (the directory is not there yet).
pub fn on_tmpfs(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|s| s.f_type as u64 == TMPFS_MAGIC)
}

/// Replaces `dir/name` with `bytes` atomically: readers see the old file or
/// the new one, never a half-written one (the temporary name does not end in
/// `.json`, so runtimes watching the directory ignore it).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    // On disk before it takes the name, and the name on disk before this
    // returns: after a crash the file is the old one or the new one, whole,
    // never empty (a checkpoint that vanished would forget prepared claims).
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Keeps the policy's spec file in step with discovery until shutdown, then
/// removes it.
pub async fn run(
    dir: PathBuf,
    mut cfgs: watch::Receiver<Arc<PluginConfig>>,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut cfg = cfgs.borrow_and_update().clone();
    let name = file_name(&cfg);
    let mut written: Option<Vec<u8>> = None;
    loop {
        let rendered = if cfg.cdi_spec_owned {
            render(&cfg, &snaps.borrow_and_update())
        } else {
            None
        };
        match rendered {
            Some(Ok(bytes)) if written.as_ref() != Some(&bytes) => {
                match write_atomic(&dir, &name, &bytes) {
                    Ok(()) => {
                        if written.is_none() {
                            info!(policy = %cfg.name, path = %dir.join(&name).display(), "CDI spec written");
                        } else {
                            debug!(policy = %cfg.name, "CDI spec updated");
                        }
                        written = Some(bytes);
                    }
                    Err(e) => {
                        warn!(policy = %cfg.name, dir = %dir.display(), error = %e, "cannot write the CDI spec; containers asking for these devices will fail to start");
                    }
                }
            }
            Some(Err(e)) => warn!(policy = %cfg.name, error = %e, "cannot render the CDI spec"),
            // CDI turned off by a spec change: the spec goes.
            None if written.is_some() => {
                remove(&dir, &name, &cfg.name);
                written = None;
            }
            _ => {}
        }
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            r = snaps.changed() => if r.is_err() { break },
            r = cfgs.changed() => {
                if r.is_err() { break }
                cfg = cfgs.borrow_and_update().clone();
            }
        }
    }
    if written.is_some() {
        remove(&dir, &name, &cfg.name);
    }
}

fn remove(dir: &Path, name: &str, policy: &str) {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => info!(%policy, "CDI spec removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(%policy, error = %e, "cannot remove the CDI spec"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::device::{Device, DeviceNode};
    use crate::devices::health::Health;
    use crate::devices::inventory::Inventory;

    fn cfg(extra: &str) -> PluginConfig {
        let p = devplug_api::policies_from_yaml(&format!(
            "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {{name: fuse}}\nspec:\n  resourceName: devices.example.com/fuse\n  source: {{paths: {{globs: [/dev/fuse]}}}}\n{extra}"
        ))
        .unwrap()
        .remove(0);
        PluginConfig::from_policy(&p)
    }

    fn snap() -> Snapshot {
        let mut inv = Inventory::new(Duration::from_secs(1), 1);
        inv.apply(
            Ok(vec![Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                id: "fuse".into(),
                numa_node: None,
                nodes: vec![DeviceNode {
                    host_path: "/dev/fuse".into(),
                    container_path: "/dev/fuse".into(),
                    permissions: "rw".into(),
                }],
                health: Health::Healthy,
                links: vec![],
                attributes: Default::default(),
            }]),
            Instant::now(),
        );
        inv.snapshot()
    }

    #[test]
    fn spec_names_each_device_with_its_nodes_and_the_policy_edits() {
        assert!(render(&cfg(""), &snap()).is_none(), "CDI off: no spec");
        let c = cfg(
            "  allocate:\n    env: {FUSE_MODE: x}\n    mounts: [{hostPath: /etc/fuse.conf, containerPath: /etc/fuse.conf}]\n    cdi: {enabled: true, kind: devices.example.com/fuse}\n",
        );
        let bytes = render(&c, &snap()).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["cdiVersion"], CDI_VERSION);
        assert_eq!(v["kind"], "devices.example.com/fuse");
        assert_eq!(v["devices"][0]["name"], "fuse");
        let d = &v["devices"][0]["containerEdits"];
        assert_eq!(d["deviceNodes"][0]["path"], "/dev/fuse");
        assert_eq!(d["deviceNodes"][0]["hostPath"], "/dev/fuse");
        assert_eq!(d["env"][0], "DEVPLUG_DEVICE_FUSE=fuse");
        assert_eq!(v["containerEdits"]["env"][0], "FUSE_MODE=x");
        assert_eq!(
            v["containerEdits"]["mounts"][0]["options"],
            serde_json::json!(["rbind", "ro"])
        );
        assert_eq!(file_name(&c), "devplug-fuse.json");
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "a.json", b"one").unwrap();
        write_atomic(dir.path(), "a.json", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a.json")).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary left behind: {names:?}");
    }

    #[test]
    fn a_tmpfs_is_told_from_a_disk() {
        assert!(on_tmpfs(Path::new("/dev/shm")), "/dev/shm is a tmpfs");
        assert!(!on_tmpfs(Path::new("/proc")), "procfs is not a tmpfs");
        assert!(!on_tmpfs(Path::new("/dev/shm/devplug-not-there")));
    }
}
