//! Allocate and GetPreferredAllocation, as pure functions of the current
//! snapshot, so every rule is unit-tested without sockets.

use std::collections::{BTreeMap, HashMap, HashSet};

use devplug_proto::deviceplugin::v1beta1 as dp;

use crate::config::PluginConfig;
use crate::devices::health::Health;
use crate::devices::inventory::{LookupError, Snapshot};

/// Why a request is refused. Every variant maps to gRPC `INVALID_ARGUMENT`
/// and names the offending ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A container request listed no IDs.
    #[error("container request {container} lists no device IDs")]
    Empty {
        /// Index of the container request.
        container: usize,
    },
    /// The same ID twice in one container request.
    #[error("device ID {id:?} is requested twice")]
    Duplicate {
        /// The ID.
        id: String,
    },
    /// An ID this plugin never advertised.
    #[error("unknown device ID {id:?} for resource {resource}")]
    Unknown {
        /// The ID.
        id: String,
        /// Our resource.
        resource: String,
    },
    /// A known device that is not healthy.
    #[error("device ID {id:?} is not healthy: {health}")]
    Unhealthy {
        /// The ID.
        id: String,
        /// Its health.
        health: Health,
    },
    /// More replicas than the sharing policy allows one container.
    #[error(
        "{count} replicas of {resource} requested ({ids}); this policy allows 1 per container \
         (sharing.failRequestsGreaterThanOne)"
    )]
    TooManyReplicas {
        /// How many were asked for.
        count: usize,
        /// Our resource.
        resource: String,
        /// The IDs asked for.
        ids: String,
    },
}

fn check_ids<'s>(
    cfg: &PluginConfig,
    snap: &'s Snapshot,
    ids: &[String],
    container: usize,
) -> Result<Vec<&'s str>, RequestError> {
    if ids.is_empty() {
        return Err(RequestError::Empty { container });
    }
    let mut seen = HashSet::with_capacity(ids.len());
    let mut physical: Vec<&str> = Vec::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id.as_str()) {
            return Err(RequestError::Duplicate { id: id.clone() });
        }
        let state = snap.usable(id).map_err(|e| match e {
            LookupError::Unknown(id) => RequestError::Unknown {
                id,
                resource: cfg.resource_name.clone(),
            },
            LookupError::Unhealthy(id, health) => RequestError::Unhealthy { id, health },
        })?;
        let p = state.device.id.as_str();
        if !physical.contains(&p) {
            physical.push(p);
        }
    }
    if cfg.fail_requests_greater_than_one && ids.len() > 1 {
        return Err(RequestError::TooManyReplicas {
            count: ids.len(),
            resource: cfg.resource_name.clone(),
            ids: ids.join(","),
        });
    }
    Ok(physical)
}

/// Builds the Allocate response, or refuses the whole request.
pub fn allocate(
    cfg: &PluginConfig,
    snap: &Snapshot,
    req: &dp::AllocateRequest,
) -> Result<dp::AllocateResponse, RequestError> {
    let mut out = Vec::with_capacity(req.container_requests.len());
    for (i, c) in req.container_requests.iter().enumerate() {
        let physical = check_ids(cfg, snap, c.device_ids(), i)?;
        let mut envs: HashMap<String, String> = cfg
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        envs.insert(cfg.ids_env.clone(), physical.join(","));
        let mounts = cfg
            .mounts
            .iter()
            .map(|m| dp::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                read_only: m.read_only,
            })
            .collect();
        let mut devices = Vec::new();
        let mut cdi_devices = Vec::new();
        match &cfg.cdi_kind {
            Some(kind) => {
                cdi_devices = physical
                    .iter()
                    .map(|p| dp::CdiDevice {
                        name: format!("{kind}={p}"),
                    })
                    .collect();
            }
            None => {
                let mut seen = HashSet::new();
                for p in &physical {
                    if let Some(state) = snap.devices.get(*p) {
                        for n in &state.device.nodes {
                            // Shared control nodes (/dev/vfio/vfio) appear once.
                            if seen.insert(n.host_path.as_str()) {
                                devices.push(dp::DeviceSpec {
                                    container_path: n.container_path.clone(),
                                    host_path: n.host_path.clone(),
                                    permissions: n.permissions.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        out.push(dp::ContainerAllocateResponse {
            envs,
            mounts,
            devices,
            annotations: cfg
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cdi_devices,
        });
    }
    Ok(dp::AllocateResponse {
        container_responses: out,
    })
}

/// Validates a PreStartContainer request and returns the physical IDs.
pub fn prestart_ids(
    cfg: &PluginConfig,
    snap: &Snapshot,
    ids: &[String],
) -> Result<Vec<String>, RequestError> {
    if ids.is_empty() {
        return Err(RequestError::Empty { container: 0 });
    }
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        let Some(state) = snap.physical(id) else {
            return Err(RequestError::Unknown {
                id: id.clone(),
                resource: cfg.resource_name.clone(),
            });
        };
        if !out.contains(&state.device.id) {
            out.push(state.device.id.clone());
        }
    }
    Ok(out)
}

/// Chooses `allocation_size` IDs from the available ones: every must-include
/// ID, then as few NUMA nodes as possible (one when it fits, best fit first),
/// and for shared devices as many distinct physical devices as possible,
/// preferring the least-used ones. Deterministic for a given input.
///
/// Best effort, never an error: the kubelet fails pod admission on any error
/// here, while it fills a short or empty answer from the available IDs
/// itself. IDs this agent does not know (a device that just left, a spec
/// change in flight) are ignored; must-include IDs that exist are honoured.
pub fn preferred(
    _cfg: &PluginConfig,
    snap: &Snapshot,
    req: &dp::ContainerPreferredAllocationRequest,
) -> Vec<String> {
    let Ok(want) = usize::try_from(req.allocation_size) else {
        return Vec::new();
    };
    if want == 0 {
        return Vec::new();
    }

    // Known available IDs, deduplicated, with their physical device and NUMA node.
    let mut info: BTreeMap<&str, (&str, Option<i64>, bool)> = BTreeMap::new();
    for id in req.available() {
        let Some(state) = snap.physical(id) else {
            continue;
        };
        info.insert(
            id.as_str(),
            (
                state.device.id.as_str(),
                state.device.numa_node,
                state.health.is_healthy(),
            ),
        );
    }
    let mut chosen: Vec<String> = Vec::with_capacity(want);
    for id in req.must_include() {
        if info.contains_key(id.as_str()) && !chosen.contains(id) {
            chosen.push(id.clone());
        }
    }
    if chosen.len() >= want {
        chosen.truncate(want);
        return chosen;
    }
    let candidates: Vec<&str> = info
        .iter()
        .filter(|(id, (_, _, healthy))| *healthy && !chosen.iter().any(|c| c == *id))
        .map(|(id, _)| *id)
        .collect();
    // Fewer healthy candidates than wanted: prefer them all; the kubelet
    // decides about the rest.
    let remaining = (want - chosen.len()).min(candidates.len());
    if remaining == 0 {
        return chosen;
    }

    // Replicas already taken per physical device, and free replicas per device.
    let mut used: HashMap<&str, usize> = HashMap::new();
    for id in &chosen {
        if let Some((p, _, _)) = info.get(id.as_str()) {
            *used.entry(p).or_default() += 1;
        }
    }
    let mut free: HashMap<&str, usize> = HashMap::new();
    for id in &candidates {
        *free.entry(info[id].0).or_default() += 1;
    }

    // NUMA grouping. `None` sorts first in Option's order; keep it last instead.
    let mut by_numa: BTreeMap<(bool, i64), Vec<&str>> = BTreeMap::new();
    for id in &candidates {
        let numa = info[id].1;
        by_numa
            .entry((numa.is_none(), numa.unwrap_or(0)))
            .or_default()
            .push(id);
    }
    let must_numa: HashSet<Option<i64>> = chosen.iter().map(|id| info[id.as_str()].1).collect();
    let key_numa = |k: &(bool, i64)| if k.0 { None } else { Some(k.1) };

    // One NUMA node that holds the must-include devices and enough candidates:
    // the tightest fit wins, ties to the lowest node.
    let single = by_numa
        .iter()
        .filter(|(k, ids)| {
            ids.len() >= remaining
                && !k.0
                && (must_numa.is_empty() || must_numa.iter().all(|m| *m == key_numa(k)))
        })
        .min_by_key(|(k, ids)| (ids.len(), **k))
        .map(|(k, _)| *k);
    let order: Vec<(bool, i64)> = match single {
        Some(k) => vec![k],
        None => {
            // Spread as little as possible: nodes of must-include devices
            // first, then the nodes with the most candidates.
            let mut keys: Vec<_> = by_numa.keys().copied().collect();
            keys.sort_by_key(|k| {
                (
                    !must_numa.contains(&key_numa(k)),
                    std::cmp::Reverse(by_numa[k].len()),
                    *k,
                )
            });
            keys
        }
    };

    // NVLink: how many of the already chosen physical devices a device links to.
    let linked_to_chosen = |p: &str, used: &HashMap<&str, usize>| -> usize {
        snap.devices.get(p).map_or(0, |d| {
            d.device
                .links
                .iter()
                .filter(|l| used.contains_key(l.as_str()))
                .count()
        })
    };
    let mut need = remaining;
    for k in order {
        let mut pool: Vec<&str> = by_numa[&k].clone();
        while need > 0 && !pool.is_empty() {
            // Fewest replicas already chosen on that device, then the most
            // NVLinks to devices already chosen, then the device with the
            // most free replicas (least used by others), then ID.
            let Some((idx, _)) = pool.iter().enumerate().min_by_key(|(_, id)| {
                let p = info[**id].0;
                (
                    used.get(p).copied().unwrap_or(0),
                    std::cmp::Reverse(linked_to_chosen(p, &used)),
                    std::cmp::Reverse(free.get(p).copied().unwrap_or(0)),
                    **id,
                )
            }) else {
                break;
            };
            let id = pool.swap_remove(idx);
            *used.entry(info[id].0).or_default() += 1;
            chosen.push(id.to_string());
            need -= 1;
        }
        if need == 0 {
            break;
        }
    }
    chosen
}

#[cfg(test)]
mod tests;
