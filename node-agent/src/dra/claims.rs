//! Prepared claims: what NodePrepareResources did, kept on disk so that an
//! agent or kubelet restart finds every prepared claim again.
//!
//! Prepare reads the claim's allocation (the devices the scheduler chose
//! for this driver), checks each device is ours and usable, writes one CDI
//! spec file for the claim (`devplug-claim-<driver>-<uid>.json`: per request, the
//! device nodes, `<idsEnv>` and each device's variable; the policy's env and
//! mounts), records the claim in the checkpoint and answers with the CDI
//! names. A claim already in the checkpoint is answered from it (the kubelet
//! repeats calls after restarts), re-writing its CDI file if it is gone
//! (`/var/run/cdi` is a tmpfs). Unprepare removes exactly the file and the
//! entry prepare made; an unknown claim is already unprepared.
//!
//! A checkpoint that cannot be read is moved aside (`claims.json.corrupt-<time>`)
//! and the agent starts with none, saying so (log and Event), never a crash
//! loop: the kubelet prepares again whatever it still needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::names;
use crate::cdi;
use crate::config::PluginConfig;
use crate::devices::inventory::{DeviceState, LookupError, Snapshot};
use crate::devices::sharing;

/// Version of the checkpoint format written.
pub const CHECKPOINT_VERSION: u32 = 1;

/// One device the scheduler allocated to a claim, for this driver.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AllocResult {
    /// The claim's request it serves.
    pub request: String,
    /// Pool (our node's name).
    pub pool: String,
    /// DRA device name.
    pub device: String,
}

/// One prepared device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// What the scheduler allocated.
    #[serde(flatten)]
    pub result: AllocResult,
    /// The advertised device ID behind the DRA name.
    pub id: String,
    /// CDI names the runtime injects for it.
    pub cdi_ids: Vec<String>,
}

/// One prepared claim.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// Claim namespace.
    pub namespace: String,
    /// Claim name.
    pub name: String,
    /// Devices, in allocation order.
    pub devices: Vec<PreparedDevice>,
    /// The CDI spec file written for it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdi_file: Option<String>,
}

/// Prepared claims by UID.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Claim UID → what was prepared.
    pub claims: BTreeMap<String, PreparedClaim>,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            version: CHECKPOINT_VERSION,
            claims: BTreeMap::new(),
        }
    }
}

/// Reads the checkpoint. A missing file is an empty checkpoint; an
/// unreadable one is moved aside and reported in the second value.
pub fn load(path: &Path) -> (Checkpoint, Option<String>) {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Checkpoint::default(), None),
        Err(e) => {
            return (
                Checkpoint::default(),
                Some(format!("cannot read {}: {e}", path.display())),
            );
        }
    };
    match serde_json::from_slice::<Checkpoint>(&text) {
        Ok(c) if c.version == CHECKPOINT_VERSION => (c, None),
        Ok(c) => (
            Checkpoint::default(),
            Some(quarantine(
                path,
                &format!("unknown checkpoint version {}", c.version),
            )),
        ),
        Err(e) => (
            Checkpoint::default(),
            Some(quarantine(path, &e.to_string())),
        ),
    }
}

fn quarantine(path: &Path, why: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let aside = PathBuf::from(format!("{}.corrupt-{secs}", path.display()));
    match std::fs::rename(path, &aside) {
        Ok(()) => format!(
            "the prepared-claims checkpoint {} was unreadable ({why}); moved to {} and started with none (the kubelet prepares again what it needs)",
            path.display(),
            aside.display()
        ),
        Err(e) => format!(
            "the prepared-claims checkpoint {} was unreadable ({why}) and could not be moved aside ({e}); started with none",
            path.display()
        ),
    }
}

/// Writes the checkpoint atomically.
pub fn save(path: &Path, c: &Checkpoint) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("claims.json");
    cdi::write_atomic(dir, name, &bytes)
}

/// The devices a ResourceClaim (as JSON) was allocated from `driver`.
pub fn results_of(claim: &Value, driver: &str) -> Result<Vec<AllocResult>, String> {
    let Some(results) = claim
        .pointer("/status/allocation/devices/results")
        .and_then(Value::as_array)
    else {
        return Err("the claim is not allocated".into());
    };
    let mut out = Vec::new();
    for r in results {
        if r["driver"].as_str() != Some(driver) {
            continue;
        }
        let field = |k: &str| -> Result<String, String> {
            r[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("an allocation result has no {k}"))
        };
        out.push(AllocResult {
            request: field("request")?,
            pool: field("pool")?,
            device: field("device")?,
        });
    }
    Ok(out)
}

/// What preparing `results` means for this node now: the prepared claim
/// and the CDI spec to write (none for sources whose CDI spec belongs to a
/// vendor toolkit). Refuses devices of other pools, unknown devices and
/// devices that are not healthy.
pub fn plan(
    uid: &str,
    namespace: &str,
    name: &str,
    results: &[AllocResult],
    pool: &str,
    cfg: &PluginConfig,
    snap: &Snapshot,
) -> Result<(PreparedClaim, Option<Vec<u8>>), String> {
    let by_name: BTreeMap<String, String> = snap
        .devices
        .keys()
        .flat_map(|id| sharing::replica_ids(id, snap.replicas))
        .map(|adv| (names::device_name(&adv), adv))
        .collect();
    let mut devices = Vec::with_capacity(results.len());
    let mut per_request: BTreeMap<&str, Vec<(&str, &DeviceState)>> = BTreeMap::new();
    for r in results {
        if r.pool != pool {
            return Err(format!(
                "device {} is in pool {}, not this node's pool {pool}",
                r.device, r.pool
            ));
        }
        let Some(adv) = by_name.get(&r.device) else {
            return Err(format!("device {} is not on this node", r.device));
        };
        let state = snap.usable(adv).map_err(|e| match e {
            LookupError::Unknown(id) => format!("device {id} is not on this node"),
            LookupError::Unhealthy(id, h) => format!("device {id} is {h}"),
        })?;
        let physical = sharing::physical_of(adv, snap.replicas).unwrap_or(adv);
        let list = per_request.entry(r.request.as_str()).or_default();
        if !list.iter().any(|(p, _)| *p == physical) {
            list.push((physical, state));
        }
        devices.push(PreparedDevice {
            result: r.clone(),
            id: adv.clone(),
            cdi_ids: Vec::new(),
        });
    }
    let (cdi_file, spec) = if cfg.toolkit_cdi {
        // The vendor toolkit's spec names every GPU by its ID.
        let kind = cfg.cdi_kind.as_deref().unwrap_or("nvidia.com/gpu");
        for d in &mut devices {
            let physical = sharing::physical_of(&d.id, snap.replicas).unwrap_or(&d.id);
            d.cdi_ids = vec![format!("{kind}={physical}")];
        }
        (None, None)
    } else {
        let kind = cfg
            .cdi_kind
            .clone()
            .unwrap_or_else(|| cfg.resource_name.clone());
        // One CDI device per physical device and request, named after the
        // device (the kubelet shows CDI names in the pod's
        // allocatedResourcesStatus): its nodes, its own variable, and the
        // request's list of IDs.
        let mut claim_devices: Vec<cdi::ClaimDevice<'_>> = Vec::new();
        for (req, list) in &per_request {
            let ids: Vec<&str> = list.iter().map(|(p, _)| *p).collect();
            for (physical, state) in list {
                claim_devices.push(cdi::ClaimDevice {
                    name: names::cdi_device(uid, req, physical),
                    id: physical,
                    state,
                    request_ids: ids.join(","),
                });
            }
        }
        let mut given = std::collections::BTreeSet::new();
        for d in &mut devices {
            let physical = sharing::physical_of(&d.id, snap.replicas)
                .unwrap_or(&d.id)
                .to_string();
            if given.insert((d.result.request.clone(), physical.clone())) {
                d.cdi_ids = vec![format!(
                    "{kind}={}",
                    names::cdi_device(uid, &d.result.request, &physical)
                )];
            }
        }
        let bytes = cdi::render_claim(cfg, &kind, &claim_devices).map_err(|e| e.to_string())?;
        (Some(names::cdi_file(&cfg.driver, uid)), Some(bytes))
    };
    Ok((
        PreparedClaim {
            namespace: namespace.to_string(),
            name: name.to_string(),
            devices,
            cdi_file,
        },
        spec,
    ))
}
