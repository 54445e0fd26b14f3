//! Prepared claims: what NodePrepareResources did, kept on disk so that an
//! agent or kubelet restart finds every prepared claim again.
//!
//! Prepare reads the claim's allocation (the devices the scheduler chose
//! for this driver), checks each device is ours and usable, writes one CDI
//! spec file for the claim (`devplug-claim-<driver>-<uid>.json`: per device
//! and request, its device nodes, its own variable and `<idsEnv>`; the
//! policy's env and mounts), records the claim in the checkpoint and answers
//! with the CDI names. For the NVIDIA source the spec carries no device
//! nodes: each device is answered with the NVIDIA container toolkit's name
//! (nodes and driver libraries) and this spec's (`devplug.io/claim`: env,
//! mounts, `idsEnv`). A claim already in the checkpoint is answered from it
//! (the kubelet repeats calls after restarts), re-writing its CDI file if it
//! is gone (`/var/run/cdi` is a tmpfs). Unprepare removes exactly the file
//! and the entry prepare made; an unknown claim is already unprepared.
//!
//! `<idsEnv>` lists every device a container was given by this policy: see
//! [`plan`] for a claim with several requests and [`neighbours`] for a
//! container naming several claims.
//!
//! A checkpoint that cannot be read is moved aside (`claims.json.corrupt-<time>`)
//! and the agent starts with none, saying so (log and Event), never a crash
//! loop: the kubelet prepares again whatever it still needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde::{Deserialize, Serialize};

use super::names;
use crate::cdi;
use crate::config::PluginConfig;
use crate::devices::device::{Made, Partition, Partitioning};
use crate::devices::inventory::{DeviceState, Snapshot};
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
    /// Which share of a device that allows several allocations (a shared
    /// policy's device), as the scheduler named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// How many of the device's `shares` this allocation consumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u32>,
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
    /// IDs of other claims its variable lists first (see [`plan`]), kept
    /// to write the same CDI spec again after a reboot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub before: Vec<String>,
    /// IDs of other claims its variable lists after its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// A prepare began and has not been recorded whole: `devices` is empty
    /// and `cdi_file` may or may not exist yet. Made by a prepare that made
    /// partitions (saved before the spec names them), or at start for a
    /// spec no record owned ([`adopt`]); a later save replaces it with the
    /// whole record. Never answered from: a repeated prepare reads the
    /// claim again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// When prepare answered (RFC 3339): the `Ready` condition's transition
    /// in the claim's device status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared_at: Option<String>,
    /// Partitions made for it (MIG instances), removed by unprepare.
    /// Recorded (also in a begun record) before its CDI spec is written, so
    /// a partition a container may use always has an owner on disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<Made>,
}

impl PreparedClaim {
    /// The record of a prepare that has begun (see [`PreparedClaim::pending`]).
    pub fn begun(namespace: &str, name: &str, driver: &str, uid: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            devices: Vec::new(),
            cdi_file: Some(names::cdi_file(driver, uid)),
            before: Vec::new(),
            after: Vec::new(),
            pending: true,
            prepared_at: None,
            partitions: Vec::new(),
        }
    }
}

/// The devices of the other claims a container names with this one, in the
/// order of the pod's claims: those before this claim and those after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Others {
    pub before: Vec<String>,
    pub after: Vec<String>,
}

/// Prepared claims by UID.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Claim UID → what was prepared.
    pub claims: BTreeMap<String, PreparedClaim>,
    /// Changes made in memory since start (not stored): what a save
    /// covers, so that one save serves every change made before it.
    #[serde(skip)]
    pub changes: u64,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            version: CHECKPOINT_VERSION,
            claims: BTreeMap::new(),
            changes: 0,
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

/// Forgets the begun prepares (see [`PreparedClaim::pending`]) whose spec
/// was never written: a kill came before the spec, so the kubelet was never
/// answered, and its retry reads the claim again. Returns their UIDs. A
/// begun prepare whose spec exists is kept: it may have been answered just
/// before the kill, and the kubelet unprepares every claim it tried.
pub fn settle(cdi_dir: &Path, cp: &mut Checkpoint) -> Vec<String> {
    let unwritten: Vec<String> = cp
        .claims
        .iter()
        .filter(|(_, p)| {
            p.pending
                && p.cdi_file
                    .as_ref()
                    .is_none_or(|f| !cdi_dir.join(f).exists())
        })
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in &unwritten {
        cp.claims.remove(uid);
    }
    if !unwritten.is_empty() {
        cp.changes += 1;
    }
    unwritten
}

/// Records as begun the claims whose CDI spec of `driver` is in `cdi_dir`
/// and which `cp` does not record, and returns their UIDs. Prepare saves
/// nothing before it answers (see [`crate::dra::server::DraState::prepare`]),
/// so a kill after a spec was written and before the next save leaves a
/// spec no record owns; the kubelet may have been answered, and a
/// container may use that spec. As a begun record it is kept until the
/// kubelet prepares the claim again (read again, as a new one) or
/// unprepares it (every claim it tried). The claim's namespace and name
/// are not in the file name; the kubelet's calls carry them.
/// Only file names `devplug-claim-<driver>-<36-character UID>.json` are
/// touched: never another driver's (a driver name may extend this one's).
pub fn adopt(cdi_dir: &Path, driver: &str, cp: &mut Checkpoint) -> Vec<String> {
    let prefix = format!("devplug-claim-{driver}-");
    let Ok(entries) = std::fs::read_dir(cdi_dir) else {
        return Vec::new();
    };
    let mut adopted = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(uid) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".json"))
        else {
            continue;
        };
        let is_uid = uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if !is_uid || cp.claims.contains_key(uid) {
            continue;
        }
        cp.claims
            .insert(uid.to_string(), PreparedClaim::begun("", "", driver, uid));
        adopted.push(uid.to_string());
    }
    if !adopted.is_empty() {
        cp.changes += 1;
    }
    adopted.sort();
    adopted
}

/// The devices a ResourceClaim was allocated from `driver`.
pub fn results_of(claim: &ResourceClaim, driver: &str) -> Result<Vec<AllocResult>, String> {
    let Some(results) = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
    else {
        return Err("the claim is not allocated".into());
    };
    Ok(results
        .iter()
        .filter(|r| r.driver == driver)
        .map(|r| AllocResult {
            request: r.request.clone(),
            pool: r.pool.clone(),
            device: r.device.clone(),
            share_id: r.share_id.clone(),
            shares: r.consumed_capacity.as_ref().and_then(|c| {
                c.iter()
                    .find(|(k, _)| k.rsplit('/').next() == Some(super::slices::SHARES_CAPACITY))
                    .and_then(|(_, q)| q.0.parse().ok())
            }),
        })
        .collect())
}

/// Every device on this node by its DRA device name. Through DRA each
/// physical device is one device, shared or not (a shared policy's device
/// allows several allocations, each taking some of its `shares`).
fn advertised_by_name(snap: &Snapshot) -> BTreeMap<String, String> {
    snap.devices
        .keys()
        .map(|id| (names::device_name(id), id.clone()))
        .collect()
}

/// The device `id` names through DRA: a physical ID, or (recorded by an
/// agent before shares were capacity) one of its replica IDs.
pub fn dra_device<'a>(snap: &'a Snapshot, id: &str) -> Option<&'a DeviceState> {
    snap.devices.get(id).or_else(|| snap.physical(id))
}

/// The physical ID behind a DRA device's ID (see [`dra_device`]).
fn dra_physical<'a>(snap: &Snapshot, id: &'a str) -> &'a str {
    if snap.devices.contains_key(id) {
        id
    } else {
        sharing::physical_of(id, snap.replicas).unwrap_or(id)
    }
}

/// The requests of `results`, in the order they first appear.
fn request_order(results: &[AllocResult]) -> Vec<&str> {
    let mut order: Vec<&str> = Vec::new();
    for r in results {
        if !order.contains(&r.request.as_str()) {
            order.push(&r.request);
        }
    }
    order
}

/// CDI kind of the specs the agent writes beside a vendor toolkit's (the
/// NVIDIA source): the toolkit's names bring the device nodes and driver
/// libraries, this one the policy's env, mounts and `idsEnv`.
pub const TOOLKIT_CLAIM_KIND: &str = "devplug.io/claim";

/// What preparing `results` means for this node now: the prepared claim
/// and the CDI spec to write. Refuses devices of other pools, unknown
/// devices and devices that are not healthy.
///
/// The policy's variable (`idsEnv`) must list every device a container was
/// given, and CDI sets a variable once per device (the last one wins). The
/// kubelet hands a container the CDI names of one claim in the order of the
/// answer's devices, but the order across claims is not one a driver can
/// rely on (on the real cluster it varied from run to run). So the devices
/// are answered grouped by request, in allocation order; the devices of
/// every request but the last set the variable to their request's IDs
/// (right for a container that names that request alone), those of the
/// last request to the whole container's list: `others.before`, every
/// device of the claim, `others.after` (the devices of the other claims the
/// containers naming this one name with it; see [`neighbours`]). Every
/// claim of such a container carries that same list, so whichever claim's
/// device comes last, the variable is right.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    uid: &str,
    namespace: &str,
    name: &str,
    results: &[AllocResult],
    others: &Others,
    pool: &str,
    cfg: &PluginConfig,
    snap: &Snapshot,
    made: &[Made],
) -> Result<(PreparedClaim, Option<Vec<u8>>), String> {
    let by_name = advertised_by_name(snap);
    // A partition is named by what was made for it (its `MIG-…` UUID).
    let made_for = |id: &str| made.iter().find(|m| m.id == id);
    let order = request_order(results);
    let mut devices = Vec::with_capacity(results.len());
    let mut per_request: Vec<Vec<(&str, &DeviceState)>> = vec![Vec::new(); order.len()];
    // Shares of a shared device taken per request, for its variable.
    let mut shares_of: BTreeMap<(&str, &str), u32> = BTreeMap::new();
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
        let state = match dra_device(snap, adv) {
            None => return Err(format!("device {adv} is not on this node")),
            Some(s) if !s.health.is_healthy() => {
                return Err(format!("device {adv} is {}", s.health));
            }
            Some(s) => s,
        };
        if matches!(state.device.partitioning, Partitioning::Partition(_))
            && made_for(adv).is_none()
        {
            return Err(format!("partition {adv} was not made"));
        }
        let physical = made_for(adv).map_or_else(|| dra_physical(snap, adv), |m| m.uuid.as_str());
        let i = order
            .iter()
            .position(|q| *q == r.request)
            .unwrap_or_default();
        let list = &mut per_request[i];
        if !list.iter().any(|(p, _)| *p == physical) {
            list.push((physical, state));
        }
        if let Some(n) = r.shares {
            *shares_of.entry((r.request.as_str(), physical)).or_default() += n;
        }
        devices.push(PreparedDevice {
            result: r.clone(),
            id: adv.clone(),
            cdi_ids: Vec::new(),
        });
    }
    // Grouped by request, each group in allocation order (a stable sort).
    devices.sort_by_key(|d| order.iter().position(|q| *q == d.result.request));
    let mut whole: Vec<&str> = Vec::new();
    for p in others
        .before
        .iter()
        .map(String::as_str)
        .chain(per_request.iter().flatten().map(|(p, _)| *p))
        .chain(others.after.iter().map(String::as_str))
    {
        if !whole.contains(&p) {
            whole.push(p);
        }
    }
    let ids_of = |i: usize| -> String {
        if i + 1 == per_request.len() {
            whole.join(",")
        } else {
            let own: Vec<&str> = per_request[i].iter().map(|(p, _)| *p).collect();
            own.join(",")
        }
    };
    // One CDI device per physical device and request, named after the
    // device (the kubelet shows CDI names in the pod's
    // allocatedResourcesStatus).
    let (kind, toolkit_kind) = if cfg.toolkit_cdi {
        (
            TOOLKIT_CLAIM_KIND.to_string(),
            Some(cfg.cdi_kind.as_deref().unwrap_or("nvidia.com/gpu")),
        )
    } else {
        (
            cfg.cdi_kind
                .clone()
                .unwrap_or_else(|| cfg.resource_name.clone()),
            None,
        )
    };
    let mut claim_devices: Vec<cdi::ClaimDevice<'_>> = Vec::new();
    for (i, (req, list)) in order.iter().zip(&per_request).enumerate() {
        let ids = ids_of(i);
        for (physical, state) in list {
            claim_devices.push(cdi::ClaimDevice {
                name: names::cdi_device(uid, req, physical),
                share_percent: shares_of.get(&(*req, *physical)).map(|n| {
                    (u64::from(*n) * 100 / u64::from(snap.replicas.max(1))).min(100) as u32
                }),
                id: physical,
                // The vendor toolkit's own names bring the nodes.
                state: toolkit_kind.is_none().then_some(*state),
                request_ids: ids.clone(),
                // A partition's own nodes; the toolkit's name for its GPU
                // brings the GPU's.
                extra_nodes: made
                    .iter()
                    .find(|m| m.uuid == *physical)
                    .map(|m| m.nodes.clone())
                    .unwrap_or_default(),
            });
        }
    }
    let mut given = std::collections::BTreeSet::new();
    for d in &mut devices {
        let m = made_for(&d.id);
        let physical = m.map_or_else(|| dra_physical(snap, &d.id), |m| m.uuid.as_str());
        let physical = physical.to_string();
        if given.insert((d.result.request.clone(), physical.clone())) {
            let ours = format!(
                "{kind}={}",
                names::cdi_device(uid, &d.result.request, &physical)
            );
            // The toolkit knows a partition's GPU, not the partition.
            let toolkit_id = m.map_or(physical.as_str(), |m| m.parent.as_str());
            d.cdi_ids = match toolkit_kind {
                Some(tk) => vec![format!("{tk}={toolkit_id}"), ours],
                None => vec![ours],
            };
        }
    }
    let bytes = cdi::render_claim(cfg, &kind, &claim_devices).map_err(|e| e.to_string())?;
    Ok((
        PreparedClaim {
            namespace: namespace.to_string(),
            name: name.to_string(),
            devices,
            cdi_file: Some(names::cdi_file(&cfg.driver, uid)),
            before: others.before.clone(),
            after: others.after.clone(),
            pending: false,
            prepared_at: None,
            partitions: made.to_vec(),
        },
        Some(bytes),
    ))
}

/// Removes the partitions on the node that no claim of `cp` records, and
/// returns what was removed (`<id> (<uuid>)`); what cannot be listed or
/// removed is logged and left.
pub fn sweep_partitions(
    parts: &dyn crate::devices::sources::Partitioner,
    cp: &Checkpoint,
) -> Vec<String> {
    let there = match parts.existing() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the partitions on this node; none removed");
            return Vec::new();
        }
    };
    let held = |m: &Made| {
        cp.claims.values().any(|c| {
            c.partitions
                .iter()
                .any(|p| p.parent == m.parent && p.instance == m.instance)
        })
    };
    let mut removed = Vec::new();
    for m in there.iter().filter(|m| !held(m)) {
        match parts.destroy(m) {
            Ok(()) => removed.push(format!("{} ({})", m.id, m.uuid)),
            Err(e) => {
                tracing::warn!(partition = %m.id, error = %e, "cannot remove a partition no claim holds")
            }
        }
    }
    removed
}

/// The partitions `results` need made (those of `pool`), in allocation
/// order, each once.
pub fn partitions_needed(results: &[AllocResult], pool: &str, snap: &Snapshot) -> Vec<Partition> {
    let by_name = advertised_by_name(snap);
    let mut out: Vec<Partition> = Vec::new();
    for r in results.iter().filter(|r| r.pool == pool) {
        if let Some(Partitioning::Partition(p)) = by_name
            .get(&r.device)
            .and_then(|id| snap.devices.get(id))
            .map(|s| &s.device.partitioning)
            && !out.contains(p)
        {
            out.push(p.clone());
        }
    }
    out
}

/// The physical IDs of `results` (those of `pool`), grouped by request in
/// allocation order, each once: the order [`plan`] lists a claim's devices.
pub fn physical_ids(results: &[AllocResult], pool: &str, snap: &Snapshot) -> Vec<String> {
    let by_name = advertised_by_name(snap);
    let order = request_order(results);
    let mut out: Vec<String> = Vec::new();
    for req in order {
        for r in results
            .iter()
            .filter(|r| r.request == req && r.pool == pool)
        {
            if let Some(adv) = by_name.get(&r.device) {
                let p = dra_physical(snap, adv);
                if !out.iter().any(|o| o == p) {
                    out.push(p.to_string());
                }
            }
        }
    }
    out
}

/// The pod (name, UID) every one of `claims` is reserved for, if there is
/// one.
pub fn common_pod<'a>(
    mut claims: impl Iterator<Item = &'a ResourceClaim>,
) -> Option<(String, String)> {
    let pods = |c: &ResourceClaim| -> Vec<(String, String)> {
        c.status
            .as_ref()
            .and_then(|s| s.reserved_for.as_ref())
            .into_iter()
            .flatten()
            .filter(|r| {
                r.resource == "pods" && r.api_group.as_deref().unwrap_or_default().is_empty()
            })
            .map(|r| (r.name.clone(), r.uid.clone()))
            .collect()
    };
    let mut common = pods(claims.next()?);
    for c in claims {
        let these = pods(c);
        common.retain(|p| these.contains(p));
    }
    common.into_iter().next()
}

/// For each claim of `ids` (claim name → its UID and physical IDs) that
/// a container of `pod` names with other claims of `ids`: those claims'
/// IDs, before and after its own, in the order of the pod's
/// `spec.resourceClaims` (the order the kubelet lists them in). A claim
/// that containers name with different other claims, or that a container
/// names with a request filter (next to any claim), gets none: its
/// variable lists its own devices.
pub fn neighbours(
    pod: &Pod,
    ids: &BTreeMap<&str, (&str, Vec<String>)>,
) -> BTreeMap<String, Others> {
    let Some(spec) = &pod.spec else {
        return BTreeMap::new();
    };
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_ref());
    let pod_claims: Vec<(&str, Option<&str>)> = spec
        .resource_claims
        .iter()
        .flatten()
        .map(|c| {
            let name = c.resource_claim_name.as_deref().or_else(|| {
                statuses
                    .into_iter()
                    .flatten()
                    .find(|s| s.name == c.name)
                    .and_then(|s| s.resource_claim_name.as_deref())
            });
            (c.name.as_str(), name)
        })
        .collect();
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    // Claim name → (claims before, claims after) it; None: containers
    // disagree, or a request filter.
    type Around = Option<(Vec<String>, Vec<String>)>;
    let mut candidate: BTreeMap<String, Around> = BTreeMap::new();
    for ctr in containers {
        let named: Vec<&k8s_openapi::api::core::v1::ResourceClaim> = ctr
            .resources
            .as_ref()
            .and_then(|r| r.claims.as_ref())
            .into_iter()
            .flatten()
            .collect();
        let mut entries: Vec<String> = Vec::new();
        let mut filtered = false;
        for (pod_claim, claim) in &pod_claims {
            for r in named.iter().filter(|r| r.name == *pod_claim) {
                let Some(claim) = claim.filter(|c| ids.contains_key(c)) else {
                    continue;
                };
                filtered |= r.request.as_deref().is_some_and(|q| !q.is_empty());
                if !entries.iter().any(|e| e == claim) {
                    entries.push(claim.to_string());
                }
            }
        }
        for (i, claim) in entries.iter().enumerate() {
            let cand = (!filtered).then(|| (entries[..i].to_vec(), entries[i + 1..].to_vec()));
            match candidate.get(claim) {
                None => {
                    candidate.insert(claim.clone(), cand);
                }
                Some(prev) if *prev != cand => {
                    candidate.insert(claim.clone(), None);
                }
                Some(_) => {}
            }
        }
    }
    let ids_of = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter_map(|n| ids.get(n.as_str()))
            .flat_map(|(_, v)| v.iter().cloned())
            .collect()
    };
    candidate
        .into_iter()
        .filter_map(|(name, cand)| {
            let (before, after) = cand?;
            if before.is_empty() && after.is_empty() {
                return None;
            }
            let (uid, _) = ids.get(name.as_str())?;
            Some((
                uid.to_string(),
                Others {
                    before: ids_of(&before),
                    after: ids_of(&after),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn ids() -> BTreeMap<&'static str, (&'static str, Vec<String>)> {
        [
            ("c1", ("u1", vec!["a".to_string()])),
            ("c2", ("u2", vec!["b".to_string(), "c".to_string()])),
            ("c3", ("u3", vec!["d".to_string()])),
        ]
        .into_iter()
        .collect()
    }

    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn pod(containers: Value) -> Pod {
        typed(json!({
            "spec": {
                "resourceClaims": [
                    {"name": "one", "resourceClaimTemplateName": "t"},
                    {"name": "two", "resourceClaimName": "c2"},
                    {"name": "three", "resourceClaimTemplateName": "t"},
                ],
                "containers": containers,
            },
            "status": {"resourceClaimStatuses": [
                {"name": "one", "resourceClaimName": "c1"},
                {"name": "three", "resourceClaimName": "c3"},
            ]},
        }))
    }

    fn others(before: &[&str], after: &[&str]) -> Others {
        Others {
            before: before.iter().map(|s| s.to_string()).collect(),
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn every_claim_a_container_names_lists_all_of_them_in_the_pods_order() {
        let p = pod(
            json!([{"name": "x", "resources": {"claims": [{"name": "one"}, {"name": "two"}]}}]),
        );
        assert_eq!(
            neighbours(&p, &ids()),
            BTreeMap::from([
                ("u1".to_string(), others(&[], &["b", "c"])),
                ("u2".to_string(), others(&["a"], &[])),
            ])
        );
        // The pod's order (one, two, three), whatever the container's.
        let p = pod(
            json!([{"name": "x", "resources": {"claims": [{"name": "two"}, {"name": "three"}, {"name": "one"}]}}]),
        );
        assert_eq!(
            neighbours(&p, &ids()),
            BTreeMap::from([
                ("u1".to_string(), others(&[], &["b", "c", "d"])),
                ("u2".to_string(), others(&["a"], &["d"])),
                ("u3".to_string(), others(&["a", "b", "c"], &[])),
            ])
        );
    }

    #[test]
    fn containers_that_disagree_or_filter_requests_get_nothing() {
        // c2 is named with c1 in x and alone in y: no single answer for
        // c2; c1 is named with c2 wherever it is named.
        let p = pod(json!([
            {"name": "x", "resources": {"claims": [{"name": "one"}, {"name": "two"}]}},
            {"name": "y", "resources": {"claims": [{"name": "two"}]}},
        ]));
        let n = neighbours(&p, &ids());
        assert_eq!(n.get("u2"), None);
        assert_eq!(n.get("u1"), Some(&others(&[], &["b", "c"])));
        // One container per claim: nothing to add.
        let p = pod(json!([
            {"name": "x", "resources": {"claims": [{"name": "one"}]}},
            {"name": "y", "resources": {"claims": [{"name": "two"}]}},
        ]));
        assert!(neighbours(&p, &ids()).is_empty());
        // A request filter hands out part of a claim only.
        let p = pod(
            json!([{"name": "x", "resources": {"claims": [{"name": "one"}, {"name": "two", "request": "r"}]}}]),
        );
        assert!(neighbours(&p, &ids()).is_empty());
        // The same claims in an init container and a container agree.
        let p: Pod = typed(json!({"spec": {
            "resourceClaims": [{"name": "one", "resourceClaimName": "c1"}, {"name": "two", "resourceClaimName": "c2"}],
            "initContainers": [{"name": "i", "resources": {"claims": [{"name": "one"}, {"name": "two"}]}}],
            "containers": [{"name": "x", "resources": {"claims": [{"name": "two"}, {"name": "one"}]}}],
        }}));
        assert_eq!(neighbours(&p, &ids()).len(), 2);
    }

    fn cfg(source: &str, extra: &str) -> PluginConfig {
        let p = devplug_api::policies_from_yaml(&format!(
            "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {{name: gpu}}\nspec:\n  resourceName: example.com/gpu\n  kubeletApi: DRA\n  source: {source}\n{extra}"
        ))
        .unwrap()
        .remove(0);
        PluginConfig::from_policy(&p)
    }

    fn snap(ids: &[&str]) -> Snapshot {
        use crate::devices::device::{Device, DeviceNode};
        use crate::devices::health::Health;
        let mut s = Snapshot {
            replicas: 1,
            version: 1,
            ..Default::default()
        };
        for id in ids {
            s.devices.insert(
                id.to_string(),
                DeviceState {
                    device: Device {
                        capacity: Default::default(),
                        partitioning: Default::default(),
                        id: id.to_string(),
                        numa_node: None,
                        nodes: vec![DeviceNode {
                            host_path: format!("/dev/{id}"),
                            container_path: format!("/dev/{id}"),
                            permissions: "rw".into(),
                        }],
                        health: Health::Healthy,
                        links: vec![],
                        attributes: Default::default(),
                    },
                    health: Health::Healthy,
                    last_transition: std::time::SystemTime::UNIX_EPOCH,
                },
            );
        }
        s
    }

    fn result(req: &str, dev: &str) -> AllocResult {
        AllocResult {
            request: req.into(),
            pool: "n".into(),
            device: dev.into(),
            share_id: None,
            shares: None,
        }
    }

    /// What a container gets from `cdi_ids` (in the kubelet's order) out
    /// of `spec`, the way the CDI library applies edits: the spec's own
    /// edits once, then each device's; a variable set twice keeps the
    /// last value.
    fn container_env(spec: &Value, cdi_ids: &[String]) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |list: &Value| {
            for e in list.as_array().into_iter().flatten() {
                let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
                env.insert(k.to_string(), v.to_string());
            }
        };
        set(&spec["containerEdits"]["env"]);
        let kind = spec["kind"].as_str().unwrap();
        for id in cdi_ids {
            let Some(name) = id.strip_prefix(&format!("{kind}=")) else {
                continue;
            };
            let dev = spec["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == name)
                .unwrap_or_else(|| panic!("{id} not in the spec"));
            set(&dev["containerEdits"]["env"]);
        }
        env
    }

    #[test]
    fn a_container_given_a_claim_of_two_requests_sees_both_in_the_variable() {
        let cfg = cfg("{simulated: {count: 3}}", "");
        let snap = snap(&["a", "b", "c"]);
        // Allocation results as the scheduler lists them, by request.
        let results = [result("r1", "a"), result("r2", "b"), result("r2", "c")];
        let (p, spec) = plan(
            "u",
            "ns",
            "claim",
            &results,
            &Others::default(),
            "n",
            &cfg,
            &snap,
            &[],
        )
        .unwrap();
        let spec: Value = serde_json::from_slice(&spec.unwrap()).unwrap();
        let ids = |filter: Option<&str>| -> Vec<String> {
            p.devices
                .iter()
                .filter(|d| filter.is_none_or(|r| d.result.request == r))
                .flat_map(|d| d.cdi_ids.clone())
                .collect()
        };
        let var = "DEVPLUG_EXAMPLE_COM_GPU";
        assert_eq!(container_env(&spec, &ids(None))[var], "a,b,c");
        // A container naming one request: that request's devices.
        assert_eq!(container_env(&spec, &ids(Some("r1")))[var], "a");
        // Each device keeps its own variable.
        assert_eq!(container_env(&spec, &ids(None))["DEVPLUG_DEVICE_B"], "b");
        // The other claims of the container: before and after its own.
        let (p, spec) = plan(
            "u",
            "ns",
            "claim",
            &results[..1],
            &others(&["x", "a"], &["y"]),
            "n",
            &cfg,
            &snap,
            &[],
        )
        .unwrap();
        let spec: Value = serde_json::from_slice(&spec.unwrap()).unwrap();
        let all: Vec<String> = p.devices.iter().flat_map(|d| d.cdi_ids.clone()).collect();
        assert_eq!(container_env(&spec, &all)[var], "x,a,y");
        assert_eq!(
            (p.before, p.after),
            (vec!["x".to_string(), "a".into()], vec!["y".to_string()])
        );
    }

    #[test]
    fn a_share_of_a_shared_device_reaches_the_container_as_a_percent() {
        let cfg = cfg(
            "{simulated: {count: 2}}",
            "  sharing: {strategy: TimeSlicing, replicas: 4}\n",
        );
        let mut snap = snap(&["a", "b"]);
        snap.replicas = 4;
        // The scheduler's results: one share of a, two of b (two requests).
        let mut one = result("r1", "a");
        one.share_id = Some("s-1".into());
        one.shares = Some(1);
        let mut two = result("r2", "b");
        two.share_id = Some("s-2".into());
        two.shares = Some(2);
        let (p, spec) = plan(
            "u",
            "ns",
            "claim",
            &[one, two],
            &Others::default(),
            "n",
            &cfg,
            &snap,
            &[],
        )
        .unwrap();
        let spec: Value = serde_json::from_slice(&spec.unwrap()).unwrap();
        let all: Vec<String> = p.devices.iter().flat_map(|d| d.cdi_ids.clone()).collect();
        let env = container_env(&spec, &all);
        assert_eq!(env["DEVPLUG_DEVICE_A_SHARE"], "25");
        assert_eq!(env["DEVPLUG_DEVICE_B_SHARE"], "50");
        assert_eq!(
            env["DEVPLUG_EXAMPLE_COM_GPU"], "a,b",
            "physical IDs, not replicas"
        );
        // The share is kept in the record (for the claim's device status).
        assert_eq!(p.devices[0].result.share_id.as_deref(), Some("s-1"));
        // An unshared device gets no share variable.
        let (_, spec) = plan(
            "u",
            "ns",
            "c",
            &[result("r", "a")],
            &Others::default(),
            "n",
            &cfg,
            &snap,
            &[],
        )
        .unwrap();
        let spec: Value = serde_json::from_slice(&spec.unwrap()).unwrap();
        assert!(!spec.to_string().contains("_SHARE="), "{spec}");
    }

    #[test]
    fn the_consumed_shares_and_share_id_are_read_from_the_allocation() {
        let claim: ResourceClaim = serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {},
            "status": {"allocation": {"devices": {"results": [
                {"request": "r", "driver": "gpu.devplug.io", "pool": "n", "device": "a",
                 "shareID": "6a6e3b1c-0000-4000-8000-000000000001",
                 "consumedCapacity": {"shares": "3"}},
                {"request": "r", "driver": "other.example.com", "pool": "n", "device": "z"}]}}}
        }))
        .unwrap();
        let r = results_of(&claim, "gpu.devplug.io").unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].shares, Some(3));
        assert_eq!(
            r[0].share_id.as_deref(),
            Some("6a6e3b1c-0000-4000-8000-000000000001")
        );
    }

    #[test]
    fn nvidia_claims_get_the_toolkit_names_plus_the_policy_env_and_mounts() {
        let cfg = cfg(
            "{nvidia: {}}",
            "  allocate:\n    env: {MODE: fast}\n    mounts: [{hostPath: /opt/x, containerPath: /x}]\n",
        );
        let snap = snap(&["GPU-1", "GPU-2"]);
        let results = [
            result("r", &names::device_name("GPU-1")),
            result("r", &names::device_name("GPU-2")),
        ];
        let (p, spec) = plan(
            "u",
            "ns",
            "c",
            &results,
            &Others::default(),
            "n",
            &cfg,
            &snap,
            &[],
        )
        .unwrap();
        let spec: Value =
            serde_json::from_slice(&spec.expect("a spec for the policy's edits")).unwrap();
        assert_eq!(spec["kind"], TOOLKIT_CLAIM_KIND);
        assert_eq!(p.devices[0].cdi_ids[0], "nvidia.com/gpu=GPU-1");
        let all: Vec<String> = p.devices.iter().flat_map(|d| d.cdi_ids.clone()).collect();
        let env = container_env(&spec, &all);
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "GPU-1,GPU-2");
        assert_eq!(env["MODE"], "fast");
        assert_eq!(spec["containerEdits"]["mounts"][0]["containerPath"], "/x");
        // The toolkit's names bring the nodes; ours carry none.
        for d in spec["devices"].as_array().unwrap() {
            assert!(d["containerEdits"]["deviceNodes"].is_null(), "{d}");
        }
    }

    #[test]
    fn the_common_pod_is_the_one_every_claim_is_reserved_for() {
        let c = |pods: Value| -> ResourceClaim {
            typed(json!({"metadata": {"name": "c"}, "spec": {}, "status": {"reservedFor": pods}}))
        };
        let a = c(
            json!([{"resource": "pods", "name": "p", "uid": "1"}, {"resource": "pods", "name": "q", "uid": "2"}]),
        );
        let b = c(json!([{"resource": "pods", "name": "q", "uid": "2"}]));
        assert_eq!(
            common_pod([&a, &b].into_iter()),
            Some(("q".into(), "2".into()))
        );
        let d = c(json!([{"resource": "jobs", "apiGroup": "batch", "name": "q", "uid": "2"}]));
        assert_eq!(common_pod([&a, &d].into_iter()), None);
    }

    #[test]
    fn begun_records_without_their_spec_are_forgotten_and_those_with_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let uid = |i: u8| format!("0000000{i}-0000-0000-0000-000000000000");
        let mut cp = Checkpoint::default();
        // Begun, spec never written: the kubelet was never answered.
        cp.claims
            .insert(uid(1), PreparedClaim::begun("ns", "a", "d.io", &uid(1)));
        // Begun, spec written: maybe answered just before a kill.
        let b = PreparedClaim::begun("ns", "b", "d.io", &uid(2));
        std::fs::write(dir.path().join(b.cdi_file.as_ref().unwrap()), b"{}").unwrap();
        cp.claims.insert(uid(2), b);
        // Whole, its spec lost with a tmpfs: answered from the record.
        let mut whole = PreparedClaim::begun("ns", "c", "d.io", &uid(3));
        whole.pending = false;
        cp.claims.insert(uid(3), whole);
        let gone = settle(dir.path(), &mut cp);
        assert_eq!(gone, vec![uid(1)]);
        assert_eq!(
            cp.claims.keys().cloned().collect::<Vec<_>>(),
            vec![uid(2), uid(3)]
        );
        assert_eq!(cp.changes, 1, "the change is saved");
        assert!(settle(dir.path(), &mut cp).is_empty());
        assert_eq!(cp.changes, 1);
    }

    #[test]
    fn a_spec_no_record_owns_is_recorded_as_begun_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let uid = |i: u8| format!("0000000{i}-0000-0000-0000-000000000000");
        let file = |driver: &str, u: &str| dir.path().join(names::cdi_file(driver, u));
        let mut cp = Checkpoint::default();
        // Recorded whole: stays as it is.
        let mut whole = PreparedClaim::begun("ns", "a", "d.io", &uid(1));
        whole.pending = false;
        cp.claims.insert(uid(1), whole.clone());
        std::fs::write(file("d.io", &uid(1)), b"{}").unwrap();
        // No record: a prepare cut short after its spec.
        std::fs::write(file("d.io", &uid(2)), b"{}").unwrap();
        // Another driver's, whose name extends this one's; not a UID; not ours.
        std::fs::write(file("d.io-x", &uid(3)), b"{}").unwrap();
        std::fs::write(dir.path().join("devplug-claim-d.io-notauid.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("vendor.yaml"), b"{}").unwrap();
        let adopted = adopt(dir.path(), "d.io", &mut cp);
        assert_eq!(adopted, vec![uid(2)]);
        let rec = &cp.claims[&uid(2)];
        assert!(rec.pending && rec.devices.is_empty(), "{rec:?}");
        assert_eq!(
            rec.cdi_file.as_deref(),
            Some(names::cdi_file("d.io", &uid(2)).as_str())
        );
        assert_eq!(cp.claims[&uid(1)], whole);
        assert_eq!(cp.claims.len(), 2, "{:?}", cp.claims.keys());
        assert_eq!(cp.changes, 1, "the change is saved");
        // It keeps its spec at the next start, and nothing was removed.
        assert!(settle(dir.path(), &mut cp).is_empty());
        assert!(adopt(dir.path(), "d.io", &mut cp).is_empty());
        assert_eq!(cp.changes, 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
    }

    #[test]
    fn a_whole_record_is_stored_without_the_begun_flag_and_old_records_read_as_whole() {
        let mut p = PreparedClaim::begun("ns", "a", "d.io", "u");
        let begun = serde_json::to_value(&p).unwrap();
        assert_eq!(begun["pending"], true);
        p.pending = false;
        let whole = serde_json::to_value(&p).unwrap();
        assert!(whole.get("pending").is_none(), "{whole}");
        // A checkpoint written before the flag existed.
        let old: PreparedClaim =
            serde_json::from_value(json!({"namespace": "ns", "name": "a", "devices": []})).unwrap();
        assert!(!old.pending);
    }
}
