//! The kubelet's PodResources API: which container holds which device.
//!
//! The kubelet offers no watch here, so the agent polls `List` (every few
//! seconds, and shortly after each Allocate, when a new allocation is about
//! to appear). A missing or restarting socket is reported as a reason, never
//! fatal; the last known allocations are kept meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devplug_api::Allocation;
use devplug_proto::podresources::v1 as pr;
use devplug_proto::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::devices::inventory::Snapshot;
use crate::unix::{dial, error_chain};

/// How often allocations are read without a hint.
pub const POLL: Duration = Duration::from_secs(5);
/// How long after an Allocate the kubelet is asked again.
pub const AFTER_ALLOCATE: Duration = Duration::from_millis(500);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Which containers hold each advertised device ID of one resource, and why
/// that view may be stale.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocView {
    /// Advertised device ID → containers.
    pub by_device: BTreeMap<String, BTreeSet<Allocation>>,
    /// Set while the PodResources API cannot be read.
    pub error: Option<String>,
}

/// Calls `List` on the PodResources socket.
pub async fn list(socket: &Path) -> Result<Vec<pr::PodResources>, String> {
    let call = async {
        let channel = dial(socket).await.map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                socket.display(),
                error_chain(&e)
            )
        })?;
        let resp = PodResourcesListerClient::new(channel)
            .list(pr::ListPodResourcesRequest {})
            .await
            .map_err(|s| format!("PodResources List failed: {}", s.message()))?;
        Ok(resp.into_inner().pod_resources)
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| "PodResources List timed out".to_string())?
}

/// The containers holding each device ID of `resource`.
pub fn allocations(
    resource: &str,
    pods: &[pr::PodResources],
) -> BTreeMap<String, BTreeSet<Allocation>> {
    let mut out: BTreeMap<String, BTreeSet<Allocation>> = BTreeMap::new();
    for pod in pods {
        for c in &pod.containers {
            for d in c.devices.iter().filter(|d| d.resource_name == resource) {
                for id in &d.device_ids {
                    out.entry(id.clone()).or_default().insert(Allocation {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Which of the kubelet's allocations are ours.
pub enum Match {
    /// Device plugin devices of this extended resource.
    Resource(String),
    /// DRA claim devices of this driver; DRA device names are mapped back
    /// to advertised IDs through the snapshot.
    Driver(String, watch::Receiver<Arc<Snapshot>>),
}

impl Match {
    fn label(&self) -> &str {
        match self {
            Match::Resource(r) | Match::Driver(r, _) => r,
        }
    }

    fn allocations(&self, pods: &[pr::PodResources]) -> BTreeMap<String, BTreeSet<Allocation>> {
        match self {
            Match::Resource(r) => allocations(r, pods),
            Match::Driver(driver, snaps) => {
                let snap = snaps.borrow().clone();
                let ids: BTreeMap<String, String> = snap
                    .devices
                    .keys()
                    .flat_map(|id| crate::devices::sharing::replica_ids(id, snap.replicas))
                    .map(|adv| (crate::dra::names::device_name(&adv), adv))
                    .collect();
                claim_allocations(driver, &ids, pods)
            }
        }
    }
}

/// The containers holding each device of DRA `driver`, keyed by the
/// advertised ID behind its DRA name (`ids`).
pub fn claim_allocations(
    driver: &str,
    ids: &BTreeMap<String, String>,
    pods: &[pr::PodResources],
) -> BTreeMap<String, BTreeSet<Allocation>> {
    let mut out: BTreeMap<String, BTreeSet<Allocation>> = BTreeMap::new();
    for pod in pods {
        for c in &pod.containers {
            for dr in &c.dynamic_resources {
                for r in dr
                    .claim_resources
                    .iter()
                    .filter(|r| r.driver_name == driver)
                {
                    let id = ids
                        .get(&r.device_name)
                        .cloned()
                        .unwrap_or_else(|| r.device_name.clone());
                    out.entry(id).or_default().insert(Allocation {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Polls our allocations until `shutdown`, publishing changes. `kick` asks
/// for an early read (after an Allocate or a prepared claim).
pub async fn poll(
    socket: PathBuf,
    which: Match,
    tx: watch::Sender<AllocView>,
    kick: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let resource = which.label().to_string();
    loop {
        let next = match list(&socket).await {
            Ok(pods) => AllocView {
                by_device: which.allocations(&pods),
                error: None,
            },
            Err(e) => {
                if tx.borrow().error.as_ref() != Some(&e) {
                    warn!(%resource, error = %e, "cannot read allocations; keeping the last known ones");
                }
                AllocView {
                    by_device: tx.borrow().by_device.clone(),
                    error: Some(e),
                }
            }
        };
        tx.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            debug!(%resource, devices = next.by_device.len(), "allocations changed");
            *cur = next;
            true
        });
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(POLL) => {}
            _ = kick.notified() => tokio::time::sleep(AFTER_ALLOCATE).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, containers: &[(&str, &str, &[&str])]) -> pr::PodResources {
        pr::PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers: containers
                .iter()
                .map(|(c, res, ids)| pr::ContainerResources {
                    name: (*c).into(),
                    devices: vec![pr::ContainerDevices {
                        resource_name: (*res).into(),
                        device_ids: ids.iter().map(|s| s.to_string()).collect(),
                        topology: None,
                    }],
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn maps_device_ids_of_our_resource_to_containers() {
        let pods = vec![
            pod(
                "default",
                "a",
                &[
                    ("main", "x.io/gpu", &["g0", "g1"]),
                    ("side", "y.io/nic", &["n0"]),
                ],
            ),
            pod("ml", "b", &[("train", "x.io/gpu", &["g1"])]),
        ];
        let m = allocations("x.io/gpu", &pods);
        assert_eq!(m.len(), 2);
        let g1: Vec<_> = m["g1"]
            .iter()
            .map(|a| format!("{}/{}/{}", a.namespace, a.pod, a.container))
            .collect();
        assert_eq!(g1, vec!["default/a/main", "ml/b/train"]);
        assert!(!m.contains_key("n0"));
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error_not_a_panic() {
        let e = list(Path::new("/nonexistent/pod-resources/kubelet.sock"))
            .await
            .unwrap_err();
        assert!(e.contains("/nonexistent/pod-resources/kubelet.sock"), "{e}");
    }
}
