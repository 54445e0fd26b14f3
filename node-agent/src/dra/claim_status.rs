//! Device status in the ResourceClaims this driver prepared
//! (`status.devices`, the DRAResourceClaimDeviceStatus feature): for each
//! device of ours in a prepared claim, a `Ready` condition (prepared on
//! this node) and a `Healthy` condition from the same health the kubelet's
//! ListAndWatch and DRA health stream and the slice taints are built from,
//! with its reason.
//!
//! Written by server-side apply on the claim's `status` subresource under
//! one field manager per driver, so entries of other drivers (the list is
//! keyed by driver, pool, device and share) are never touched. The API
//! server allows it only under the granular authorization for drivers:
//! `resourceclaims/driver` with verb `associated-node:patch` for this
//! driver's name, which it grants only to a service account whose token is
//! bound to the node the claim is allocated on; the operator's
//! ClusterRole for the agent holds exactly that. Applies run in the
//! background, never in the kubelet's prepare call: a slow or refused
//! write delays no pod.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::claims::PreparedClaim;
use super::server::{DraState, api_message};
use crate::devices::health::Health;
use crate::devices::inventory::Snapshot;

/// Condition type: the device is prepared on its node.
pub const READY: &str = "Ready";
/// Condition type: the device's health, as every other path reports it.
pub const HEALTHY: &str = "Healthy";
/// How long a refused or failed write waits before it is tried again
/// (sooner if anything changes).
pub const RETRY: Duration = Duration::from_secs(10);
/// Claims written at once.
const WRITES_AT_ONCE: usize = 8;

/// The field manager of `driver`'s entries.
pub fn field_manager(driver: &str) -> String {
    // Field managers are at most 128 characters; driver names at most 63.
    format!("devplug-agent/{driver}")
}

fn time(t: SystemTime) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::try_from(t)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// The entries of one prepared claim: one per device of ours, in the
/// order of its allocation. `prepared_at` is when prepare answered
/// (`Ready`'s transition); the `Healthy` transition is the device's own.
pub fn entries(
    driver: &str,
    p: &PreparedClaim,
    snap: &Snapshot,
    node: &str,
    prepared_at: SystemTime,
) -> Vec<AllocatedDeviceStatus> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for d in &p.devices {
        let key = (
            d.result.pool.clone(),
            d.result.device.clone(),
            d.result.share_id.clone(),
        );
        if !seen.insert(key) {
            continue;
        }
        let (status, reason, message, since) = match super::claims::dra_device(snap, &d.id) {
            Some(state) => {
                let c = HealthyCondition::from(&state.health);
                (c.status, c.reason, c.message, state.last_transition)
            }
            None => (
                "False",
                "Missing",
                format!("device {} is no longer on node {node}", d.id),
                prepared_at,
            ),
        };
        let message: String = message.chars().take(1024).collect();
        out.push(AllocatedDeviceStatus {
            driver: driver.to_string(),
            pool: d.result.pool.clone(),
            device: d.result.device.clone(),
            share_id: d.result.share_id.clone(),
            conditions: Some(vec![
                Condition {
                    type_: READY.into(),
                    status: "True".into(),
                    reason: "Prepared".into(),
                    message: format!("prepared by devplug on node {node}"),
                    last_transition_time: time(prepared_at),
                    observed_generation: None,
                },
                Condition {
                    type_: HEALTHY.into(),
                    status: status.into(),
                    reason: reason.into(),
                    message,
                    last_transition_time: time(since),
                    observed_generation: None,
                },
            ]),
            ..Default::default()
        });
    }
    out
}

/// One claim as written: where, and its entries (none: ours removed).
#[derive(Debug, Clone, PartialEq)]
struct Written {
    namespace: String,
    name: String,
    entries: Vec<AllocatedDeviceStatus>,
}

/// Applies `w` to its claim.
async fn apply(api: &Api<ResourceClaim>, manager: &str, w: &Written) -> Result<(), kube::Error> {
    let devices: Vec<serde_json::Value> = w
        .entries
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(kube::Error::SerdeError)?;
    let body = json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": w.name, "namespace": w.namespace},
        "status": {"devices": devices},
    });
    api.patch_status(
        &w.name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

/// Keeps the device status of every claim this driver prepared in step
/// with its health until `shutdown`: on each prepare and unprepare
/// (`DraState::claims_changed`), each health change, and after a failed
/// write. A claim unprepared has its entries removed; one deleted or
/// deallocated meanwhile is left alone (nothing of ours remains to show).
pub async fn run(state: Arc<DraState>, mut shutdown: watch::Receiver<bool>) {
    let Some(client) = state.client.clone() else {
        return;
    };
    let cfg = state.plugin.cfg();
    let driver = cfg.driver.clone();
    let manager = field_manager(&driver);
    let mut snaps = state.plugin.snapshots.clone();
    let mut written: BTreeMap<String, Written> = BTreeMap::new();
    // What was said about each claim's last failure, so a lasting refusal
    // is logged once, not every round.
    let mut said: BTreeMap<String, String> = BTreeMap::new();
    let started = SystemTime::now();
    loop {
        let snap = snaps.borrow_and_update().clone();
        let want: BTreeMap<String, Written> = {
            let cp = state.checkpoint.lock().await;
            cp.claims
                .iter()
                .filter(|(_, p)| !p.pending)
                .map(|(uid, p)| {
                    let at = p
                        .prepared_at
                        .as_deref()
                        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                        .map(SystemTime::from)
                        .unwrap_or(started);
                    let w = Written {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        entries: entries(&driver, p, &snap, &state.node, at),
                    };
                    (uid.clone(), w)
                })
                .collect()
        };
        let mut todo: Vec<(String, Written, bool)> = want
            .iter()
            .filter(|(uid, w)| written.get(*uid) != Some(*w))
            .map(|(uid, w)| (uid.clone(), w.clone(), false))
            .collect();
        todo.extend(
            written
                .iter()
                .filter(|(uid, _)| !want.contains_key(*uid))
                .map(|(uid, w)| {
                    let gone = Written {
                        entries: Vec::new(),
                        ..w.clone()
                    };
                    (uid.clone(), gone, true)
                }),
        );
        let results: Vec<_> = futures::stream::iter(todo)
            .map(|(uid, w, removal)| {
                let api: Api<ResourceClaim> = Api::namespaced(client.clone(), &w.namespace);
                let manager = manager.clone();
                async move {
                    let r = apply(&api, &manager, &w).await;
                    (uid, w, removal, r)
                }
            })
            .buffer_unordered(WRITES_AT_ONCE)
            .collect()
            .await;
        let mut failed = false;
        for (uid, w, removal, r) in results {
            let claim = format!("{}/{}", w.namespace, w.name);
            match r {
                Ok(()) if removal => {
                    debug!(policy = %cfg.name, %claim, "removed the claim's device status");
                    written.remove(&uid);
                    said.remove(&uid);
                }
                Ok(()) => {
                    if said.remove(&uid).is_some() {
                        info!(policy = %cfg.name, %claim, "claim device status written again");
                    }
                    written.insert(uid, w);
                }
                // Unprepared and then deleted or deallocated: its device
                // status went with the allocation, or this node may no
                // longer write it.
                Err(kube::Error::Api(s)) if removal && matches!(s.code, 403 | 404 | 409 | 422) => {
                    debug!(policy = %cfg.name, %claim, error = %s.message, "claim device status not removed (the claim moved on)");
                    written.remove(&uid);
                    said.remove(&uid);
                }
                Err(kube::Error::Api(s)) if !removal && s.code == 404 => {
                    // Deleted while prepared: nothing to write until the
                    // kubelet unprepares it.
                    written.insert(uid.clone(), w);
                    said.remove(&uid);
                }
                Err(e) => {
                    failed = true;
                    let msg = api_message(&e);
                    if said.get(&uid) != Some(&msg) {
                        warn!(policy = %cfg.name, %claim, error = %msg, "cannot write the claim's device status (retried)");
                        said.insert(uid, msg);
                    }
                }
            }
        }
        let prepared_or_unprepared = tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            r = snaps.changed() => if r.is_err() { return } else { false },
            _ = state.claims_changed.notified() => true,
            _ = tokio::time::sleep(RETRY), if failed => false,
        };
        // Prepares and unprepares come in bursts (a hundred pods starting
        // together): their status is written once the burst has settled,
        // not between the claim reads the kubelet is waiting on. A health
        // change is written at once.
        if prepared_or_unprepared {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(SETTLE) => {}
            }
        }
    }
}

/// How long a prepare's or unprepare's status write waits for the rest of
/// its burst.
pub const SETTLE: Duration = Duration::from_millis(500);

/// A device's health as the claim's `Healthy` condition says it.
struct HealthyCondition {
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl From<&Health> for HealthyCondition {
    fn from(h: &Health) -> HealthyCondition {
        let (status, reason) = match h {
            Health::Healthy => ("True", "Healthy"),
            Health::Unhealthy(_) => ("False", "Unhealthy"),
            Health::Unknown(_) => ("Unknown", "Unknown"),
        };
        HealthyCondition {
            status,
            reason,
            message: h.reason().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::device::Device;
    use crate::devices::inventory::DeviceState;
    use crate::dra::claims::{AllocResult, PreparedDevice};

    fn snap(devices: &[(&str, Health)]) -> Snapshot {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        Snapshot {
            devices: devices
                .iter()
                .map(|(id, h)| {
                    let state = DeviceState {
                        device: Device {
                            capacity: Default::default(),
                            partitioning: Default::default(),
                            id: id.to_string(),
                            numa_node: None,
                            nodes: vec![],
                            health: h.clone(),
                            links: vec![],
                            attributes: Default::default(),
                        },
                        health: h.clone(),
                        last_transition: t0,
                    };
                    (id.to_string(), state)
                })
                .collect(),
            replicas: 1,
            ..Default::default()
        }
    }

    fn claim(devs: &[(&str, &str)]) -> PreparedClaim {
        let mut p = PreparedClaim::begun("ns", "c", "d.io", "u");
        p.pending = false;
        p.devices = devs
            .iter()
            .map(|(req, id)| PreparedDevice {
                result: AllocResult {
                    request: req.to_string(),
                    pool: "node-1".into(),
                    device: id.to_string(),
                    share_id: None,
                    shares: None,
                },
                id: id.to_string(),
                cdi_ids: vec![],
            })
            .collect();
        p
    }

    fn cond<'a>(e: &'a AllocatedDeviceStatus, t: &str) -> &'a Condition {
        e.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    #[test]
    fn each_device_is_ready_and_carries_its_health_with_the_reason() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000);
        let s = snap(&[
            ("a", Health::Healthy),
            ("b", Health::Unhealthy("XID 79: fell off the bus".into())),
            ("c", Health::Unknown("probe timed out".into())),
        ]);
        let e = entries(
            "d.io",
            &claim(&[("r", "a"), ("r", "b"), ("s", "c"), ("t", "gone")]),
            &s,
            "node-1",
            at,
        );
        assert_eq!(e.len(), 4);
        assert!(
            e.iter()
                .all(|e| e.driver == "d.io" && e.pool == "node-1" && e.share_id.is_none())
        );
        for x in &e {
            let r = cond(x, READY);
            assert_eq!((r.status.as_str(), r.reason.as_str()), ("True", "Prepared"));
            assert_eq!(r.last_transition_time, time(at));
        }
        let h: Vec<_> = e
            .iter()
            .map(|x| {
                let c = cond(x, HEALTHY);
                (
                    x.device.as_str(),
                    c.status.as_str(),
                    c.reason.as_str(),
                    c.message.as_str(),
                )
            })
            .collect();
        assert_eq!(
            h,
            vec![
                ("a", "True", "Healthy", ""),
                ("b", "False", "Unhealthy", "XID 79: fell off the bus"),
                ("c", "Unknown", "Unknown", "probe timed out"),
                (
                    "gone",
                    "False",
                    "Missing",
                    "device gone is no longer on node node-1"
                ),
            ]
        );
        // The health's own transition time, so a write is only made when
        // something changed.
        assert_eq!(
            cond(&e[1], HEALTHY).last_transition_time,
            time(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000))
        );
    }

    #[test]
    fn a_device_given_twice_in_one_claim_has_one_entry() {
        // Two requests of one claim may name the same device (admin access).
        let s = snap(&[("a", Health::Healthy)]);
        let e = entries(
            "d.io",
            &claim(&[("r", "a"), ("s", "a")]),
            &s,
            "n",
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn the_field_manager_names_the_driver() {
        assert_eq!(
            field_manager("gpu.devplug.io"),
            "devplug-agent/gpu.devplug.io"
        );
    }
}
