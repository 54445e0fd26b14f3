//! The node's ResourceSlices: what the scheduler allocates DRA claims from.
//!
//! One pool per node and policy (pool name = node name, driver = the
//! policy's driver), split into slices of at most 64 devices: the API takes
//! 128 per slice, but only 64 once any device of the slice carries a taint,
//! and any device may turn unhealthy. Always 64 means a health change never
//! moves a device to another slice, and never makes a slice too big. Each
//! physical device is one DRA device. A shared policy's device (time-slicing
//! with `replicas` N) allows several allocations (consumable capacity,
//! KEP-5075, beta in 1.36) and has a capacity `shares` of N; a request
//! takes 1 share unless it asks for more (`capacity.requests`, 1 to N), so
//! N claims fit on it, the next stays Pending, and `foo: 1` through the
//! extended-resource bridge means one share, as with the device plugin.
//! Before, such a device was published as N devices. Each device carries
//! its original ID, its
//! NUMA node as the `numaNode` attribute and what its source knows (PCI
//! address, USB vendor/product, GPU UUID, and for PCI devices the standard
//! `resource.kubernetes.io/pciBusID` and `pcieRoot`, see
//! `devplug_api::topology`). An unhealthy device carries
//! a `NoSchedule` taint, removed when it recovers.
//!
//! The pool's generation goes up on every change; slices of an older
//! generation left over (fewer devices now) are deleted. A publish the API
//! server refuses part-way puts the last published pool back whole at a
//! newer generation, so a pool is never left split across generations. A watch of the
//! pool's own slices publishes it again when anyone else deletes one (the
//! kubelet wipes a node's slices when it restarts). Nothing is
//! published before discovery has run once, so the scheduler never sees an
//! empty pool for a node that has devices.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use devplug_api::agent_manager;
use futures::StreamExt;
use k8s_openapi::api::resource::v1::{
    CapacityRequestPolicy, CapacityRequestPolicyRange, Counter, CounterSet, Device,
    DeviceAttribute, DeviceCapacity, DeviceCounterConsumption, DeviceTaint, ResourcePool,
    ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::names;
use crate::config::PluginConfig;
use crate::devices::device::Partitioning;
use crate::devices::health::Health;
use crate::devices::inventory::Snapshot;

/// Most devices one ResourceSlice of ours holds: the `resource.k8s.io/v1`
/// limit for a slice whose devices carry taints (128 without any).
pub const MAX_DEVICES_PER_SLICE: usize = 64;
/// Most counter sets one ResourceSlice holds (the `resource.k8s.io/v1`
/// limit). A slice holds devices or counter sets, never both.
pub const MAX_COUNTER_SETS_PER_SLICE: usize = 8;
/// Longest string attribute value the API takes.
pub const MAX_ATTRIBUTE_STRING: usize = 64;
/// The taint an unhealthy device carries.
pub const UNHEALTHY_TAINT: &str = "devplug.io/unhealthy";
/// The capacity a shared device is divided into (in the driver's domain:
/// `<driver>/shares` in a claim's `capacity.requests`).
pub const SHARES_CAPACITY: &str = "shares";

fn string_attr(v: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(v.chars().take(MAX_ATTRIBUTE_STRING).collect()),
        ..Default::default()
    }
}

/// The capacity of a shared device: `replicas` shares, 1 taken by a
/// request that names none, any whole number up to all of them on request.
fn shares(replicas: u32) -> std::collections::BTreeMap<String, DeviceCapacity> {
    let q = |n: u32| Quantity(n.to_string());
    [(
        SHARES_CAPACITY.to_string(),
        DeviceCapacity {
            value: q(replicas),
            request_policy: Some(CapacityRequestPolicy {
                default: Some(q(1)),
                valid_range: Some(CapacityRequestPolicyRange {
                    min: q(1),
                    max: Some(q(replicas)),
                    step: Some(q(1)),
                }),
                valid_values: None,
            }),
        },
    )]
    .into()
}

/// The pool's devices, in a stable order: one per physical device; an
/// unhealthy one tainted `NoSchedule`.
pub fn devices(snap: &Snapshot) -> Vec<Device> {
    devices_with(snap, devplug_api::TaintEffect::NoSchedule)
}

/// Same, with the policy's taint effect.
pub fn devices_with(snap: &Snapshot, effect: devplug_api::TaintEffect) -> Vec<Device> {
    let mut out = Vec::new();
    let shared = snap.replicas > 1;
    for (id, state) in &snap.devices {
        let consumes = match &state.device.partitioning {
            // Published as a counter set (see [`counter_sets`]).
            Partitioning::Divided { .. } => continue,
            Partitioning::Partition(p) => Some(vec![DeviceCounterConsumption {
                counter_set: names::device_name(&p.parent),
                counters: counters(&p.counters),
            }]),
            Partitioning::Whole => None,
        };
        let mut attrs = std::collections::BTreeMap::new();
        attrs.insert("id".to_string(), string_attr(id));
        if let Some(n) = state.device.numa_node {
            let int = DeviceAttribute {
                int: Some(n),
                ..Default::default()
            };
            attrs.insert("numaNode".into(), int);
        }
        for (k, v) in &state.device.attributes {
            attrs.insert(k.clone(), string_attr(v));
        }
        let taints = match state.health {
            Health::Unhealthy(_) | Health::Unknown(_) => Some(vec![DeviceTaint {
                key: UNHEALTHY_TAINT.into(),
                effect: effect.as_str().into(),
                ..Default::default()
            }]),
            Health::Healthy => None,
        };
        // What the source knows the device holds (GPU memory), for
        // selection; on a shared device every capacity is consumed
        // by its allocations, so there only the shares are published.
        let capacity = if shared {
            Some(shares(snap.replicas))
        } else if state.device.capacity.is_empty() {
            None
        } else {
            Some(
                state
                    .device
                    .capacity
                    .iter()
                    .map(|(k, v)| {
                        let c = DeviceCapacity {
                            value: Quantity(v.clone()),
                            request_policy: None,
                        };
                        (k.clone(), c)
                    })
                    .collect(),
            )
        };
        out.push(Device {
            name: names::device_name(id),
            attributes: Some(attrs),
            taints,
            allow_multiple_allocations: shared.then_some(true),
            capacity,
            consumes_counters: consumes,
            ..Default::default()
        });
    }
    out
}

fn counters(
    m: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, Counter> {
    m.iter()
        .map(|(k, v)| {
            let c = Counter {
                value: Quantity(v.clone()),
            };
            (k.clone(), c)
        })
        .collect()
}

/// The pool's counter sets: one per divided device (a GPU in MIG mode),
/// named as its device would be, which its partitions consume from.
pub fn counter_sets(snap: &Snapshot) -> Vec<CounterSet> {
    snap.devices
        .iter()
        .filter_map(|(id, state)| match &state.device.partitioning {
            Partitioning::Divided { counters: c } => Some(CounterSet {
                name: names::device_name(id),
                counters: counters(c),
            }),
            _ => None,
        })
        .collect()
}

/// What a node's pool publishes: devices, and the counter sets partitions
/// draw on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Pool {
    /// The devices, in a stable order.
    pub devices: Vec<Device>,
    /// The counter sets, in a stable order.
    pub counter_sets: Vec<CounterSet>,
}

impl Pool {
    /// The pool of `snap`, an unhealthy device tainted with `effect`.
    pub fn of(snap: &Snapshot, effect: devplug_api::TaintEffect) -> Self {
        Self {
            devices: devices_with(snap, effect),
            counter_sets: counter_sets(snap),
        }
    }
}

/// The slices of a pool holding `devices` (and no counter sets).
pub fn slices(
    node: &str,
    cfg: &PluginConfig,
    generation: i64,
    devices: &[Device],
) -> Vec<(String, ResourceSlice)> {
    let pool = Pool {
        devices: devices.to_vec(),
        counter_sets: Vec::new(),
    };
    pool_slices(node, cfg, generation, &pool)
}

/// One slice's content: devices or counter sets.
type Chunk<'a> = (Option<&'a [Device]>, Option<&'a [CounterSet]>);

/// The slices of `pool`: its counter sets first, at most 8 a slice, then
/// its devices, at most 64 a slice (a slice holds one or the other).
pub fn pool_slices(
    node: &str,
    cfg: &PluginConfig,
    generation: i64,
    pool: &Pool,
) -> Vec<(String, ResourceSlice)> {
    let devices = &pool.devices;
    let mut chunks: Vec<Chunk<'_>> = pool
        .counter_sets
        .chunks(MAX_COUNTER_SETS_PER_SLICE)
        .map(|c| (None, Some(c)))
        .collect();
    if devices.is_empty() {
        if chunks.is_empty() {
            chunks.push((Some(&[]), None));
        }
    } else {
        chunks.extend(
            devices
                .chunks(MAX_DEVICES_PER_SLICE)
                .map(|c| (Some(c), None)),
        );
    }
    let count = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (chunk, sets))| {
            let name = names::slice_name(node, &cfg.driver, i);
            let body = ResourceSlice {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                spec: ResourceSliceSpec {
                    driver: cfg.driver.clone(),
                    node_name: Some(node.to_string()),
                    pool: ResourcePool {
                        name: node.to_string(),
                        generation,
                        resource_slice_count: count as i64,
                    },
                    devices: chunk.map(<[Device]>::to_vec),
                    shared_counters: sets.map(<[CounterSet]>::to_vec),
                    ..Default::default()
                },
            };
            (name, body)
        })
        .collect()
}

/// Our slices as the server has them: names and the highest generation.
async fn existing(
    api: &Api<ResourceSlice>,
    node: &str,
    driver: &str,
) -> Result<(BTreeSet<String>, i64), kube::Error> {
    let list = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={node},spec.driver={driver}")))
        .await?;
    let mut names = BTreeSet::new();
    let mut generation = 0;
    for o in list.items {
        if let Some(n) = o.metadata.name.clone() {
            names.insert(n);
        }
        generation = generation.max(o.spec.pool.generation);
    }
    Ok((names, generation))
}

/// What the API server left out of `sent` when it stored it as `stored`:
/// fields of a feature its gate has off are dropped without an error, and
/// the devices then mean something else (a shared device allocated to one
/// claim at a time, an unhealthy one not tainted). One line per kind, with
/// the gate to look at.
pub fn dropped(sent: &ResourceSlice, stored: &ResourceSlice) -> Vec<String> {
    let count = |s: &ResourceSlice, f: &dyn Fn(&Device) -> bool| {
        s.spec.devices.iter().flatten().filter(|d| f(d)).count()
    };
    type Has<'a> = &'a dyn Fn(&Device) -> bool;
    let checks: [(Has, &str); 2] = [
        (
            &|d| d.allow_multiple_allocations == Some(true) || d.capacity.is_some(),
            "allowMultipleAllocations and capacity (feature gate DRAConsumableCapacity): shared devices are allocated to one claim at a time",
        ),
        (
            &|d| d.taints.as_ref().is_some_and(|t| !t.is_empty()),
            "device taints (feature gate DRADeviceTaints): unhealthy devices can still be allocated",
        ),
    ];
    checks
        .iter()
        .filter(|(f, _)| count(sent, *f) > count(stored, *f))
        .map(|(_, what)| what.to_string())
        .collect()
}

/// Applies `slices`, then deletes the names in `names` they no longer use.
/// `names` follows every step that succeeded (a slice applied, a stale one
/// deleted), so after a failure part-way it still says what the server
/// holds. Returns what the API server dropped (see [`dropped`]).
async fn write(
    api: &Api<ResourceSlice>,
    manager: &str,
    slices: &[(String, ResourceSlice)],
    names: &mut BTreeSet<String>,
) -> Result<BTreeSet<String>, kube::Error> {
    let pp = PatchParams::apply(manager).force();
    let wanted: BTreeSet<&String> = slices.iter().map(|(n, _)| n).collect();
    let mut lost = BTreeSet::new();
    for (name, body) in slices {
        let stored = api.patch(name, &pp, &Patch::Apply(body)).await?;
        lost.extend(dropped(body, &stored));
        names.insert(name.clone());
    }
    let stale: Vec<String> = names
        .iter()
        .filter(|n| !wanted.contains(n))
        .cloned()
        .collect();
    for stale in stale {
        match api.delete(&stale, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        names.remove(&stale);
    }
    Ok(lost)
}

/// Publishes the node's pool until `shutdown`: on every change of what the
/// slices say, a new generation. API errors are retried with backoff; the
/// latest state is what gets written.
pub async fn publish(
    client: kube::Client,
    node: String,
    mut cfgs: watch::Receiver<Arc<PluginConfig>>,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    problems: watch::Sender<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = cfgs.borrow().clone();
    let api: Api<ResourceSlice> = Api::all(client);
    let manager = agent_manager(&cfg.name);
    let mut backoff = crate::retry::Retry::new(Duration::from_millis(500), Duration::from_secs(30));
    let (mut names, mut generation) = loop {
        match existing(&api, &node, &cfg.driver).await {
            Ok(x) => break x,
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(policy = %cfg.name, error = %e, retry_in = ?wait, "cannot list this node's ResourceSlices; retrying");
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    let mut published: Option<Pool> = None;
    let mut ours = watcher(
        api.clone(),
        watcher::Config::default()
            .fields(&format!("spec.nodeName={node},spec.driver={}", cfg.driver)),
    )
    .default_backoff()
    .boxed();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    loop {
        let snap = snaps.borrow_and_update().clone();
        let effect = cfgs.borrow_and_update().taint_effect;
        // Never an empty pool before discovery has looked.
        let want = (snap.version > 0).then(|| Pool::of(&snap, effect));
        if let Some(want) = want
            && published.as_ref() != Some(&want)
        {
            let cfg = cfgs.borrow().clone();
            generation += 1;
            let layout = pool_slices(&node, &cfg, generation, &want);
            match write(&api, &manager, &layout, &mut names).await {
                Ok(lost) => {
                    if published.is_none() {
                        info!(policy = %cfg.name, devices = want.devices.len(), counter_sets = want.counter_sets.len(), slices = names.len(), generation, "ResourceSlices published");
                    } else {
                        debug!(policy = %cfg.name, devices = want.devices.len(), generation, "ResourceSlices updated");
                    }
                    published = Some(want);
                    backoff.reset();
                    // Stored, but not as sent: said on NodeDeviceStatus and
                    // so in the policy's Degraded condition.
                    let why = (!lost.is_empty()).then(|| {
                        format!(
                            "the API server stored this node's ResourceSlices without {}",
                            lost.into_iter().collect::<Vec<_>>().join("; without ")
                        )
                    });
                    problems.send_if_modified(|p| {
                        if *p == why {
                            return false;
                        }
                        if let Some(w) = &why {
                            warn!(policy = %cfg.name, "{w}");
                        }
                        *p = why;
                        true
                    });
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(policy = %cfg.name, error = %e, retry_in = ?wait, "cannot publish ResourceSlices");
                    // On NodeDeviceStatus and so the policy's Degraded
                    // condition, in the API server's words.
                    let why = format!(
                        "the API server refused this node's ResourceSlices (generation {generation}), retrying; the scheduler sees the last pool published: {}",
                        crate::dra::server::api_message(&e)
                    );
                    problems.send_if_modified(|p| {
                        let changed = p.as_deref() != Some(why.as_str());
                        *p = Some(why);
                        changed
                    });
                    // Part of the new generation may be on the server and
                    // part not: the scheduler then sees an incomplete pool
                    // and allocates nothing from it. Put the last pool that
                    // was published back, whole, at a newer generation, and
                    // retry the new one after the backoff.
                    if let Some(prev) = &published {
                        generation += 1;
                        let back = pool_slices(&node, &cfg, generation, prev);
                        match write(&api, &manager, &back, &mut names).await {
                            Ok(_) => {
                                info!(policy = %cfg.name, generation, "kept the last published pool whole")
                            }
                            Err(e) => {
                                warn!(policy = %cfg.name, error = %e, "cannot restore the last published pool either")
                            }
                        }
                    }
                    tokio::select! {
                        _ = crate::stopped(&mut shutdown) => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            r = snaps.changed() => if r.is_err() { return },
            r = cfgs.changed() => if r.is_err() { return },
            ev = ours.next() => {
                // Slices deleted by anyone else (the kubelet wipes a node's
                // slices when it restarts; a user may delete them): the
                // pool is published again at once.
                let gone = match ev {
                    Some(Ok(watcher::Event::Delete(o))) => {
                        o.metadata.name.filter(|n| names.contains(n)).into_iter().collect()
                    }
                    Some(Ok(watcher::Event::Init)) => {
                        listed.clear();
                        Vec::new()
                    }
                    Some(Ok(watcher::Event::InitApply(o))) => {
                        listed.extend(o.metadata.name);
                        Vec::new()
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        names.difference(&listed).cloned().collect()
                    }
                    _ => Vec::new(),
                };
                if !gone.is_empty() && published.is_some() {
                    info!(policy = %cfg.name, slices = ?gone, "ResourceSlices removed by someone else; publishing again");
                    for g in &gone {
                        names.remove(g);
                    }
                    published = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::device::Device;
    use crate::devices::inventory::DeviceState;
    use serde_json::json;

    fn snap(n: usize, replicas: u32) -> Snapshot {
        let mut s = Snapshot {
            replicas,
            version: 1,
            ..Snapshot::default()
        };
        for i in 0..n {
            let id = format!("Dev_{i:03}");
            s.devices.insert(
                id.clone(),
                DeviceState {
                    device: Device {
                        capacity: Default::default(),
                        partitioning: Default::default(),
                        id,
                        numa_node: Some((i % 2) as i64),
                        nodes: vec![],
                        health: Health::Healthy,
                        links: vec![],
                        attributes: [("pciAddress".to_string(), format!("0000:{i:02x}:00.0"))]
                            .into(),
                    },
                    health: if i == 0 {
                        Health::Unhealthy("fell off the bus".into())
                    } else {
                        Health::Healthy
                    },
                    last_transition: std::time::SystemTime::UNIX_EPOCH,
                },
            );
        }
        s
    }

    #[test]
    fn a_shared_device_is_one_device_with_shares_and_large_pools_split_at_64() {
        // Not shared: one exclusive device per physical device.
        let plain = serde_json::to_value(devices(&snap(3, 1))).unwrap();
        assert!(plain[0].get("allowMultipleAllocations").is_none());
        assert!(plain[0].get("capacity").is_none());
        // Shared 4 ways: still one device each, allowing several
        // allocations, with 4 shares of which a request takes 1 by default.
        let devs = devices(&snap(400, 4));
        assert_eq!(devs.len(), 400);
        let names: BTreeSet<&str> = devs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names.len(), 400, "distinct names");
        assert!(names.iter().all(|n| names::is_dns_label(n)));
        // As the API server takes them (the wire form).
        let wire = serde_json::to_value(&devs).unwrap();
        assert_eq!(wire[0]["attributes"]["id"], json!({"string": "Dev_000"}));
        assert!(wire[0]["attributes"].get("physicalID").is_none());
        assert_eq!(wire[0]["allowMultipleAllocations"], true);
        assert_eq!(
            wire[0]["capacity"],
            json!({"shares": {"value": "4", "requestPolicy": {
                "default": "1", "validRange": {"min": "1", "max": "4", "step": "1"}}}})
        );
        assert_eq!(wire[3]["attributes"]["numaNode"], json!({"int": 1}));
        assert_eq!(
            wire[0]["attributes"]["pciAddress"],
            json!({"string": "0000:00:00.0"})
        );
        assert_eq!(
            wire[0]["taints"],
            json!([{"key": UNHEALTHY_TAINT, "effect": "NoSchedule"}])
        );
        assert!(wire[2].get("taints").is_none());
        // The policy may ask for NoExecute (evicting the device's pods).
        let evicting = serde_json::to_value(devices_with(
            &snap(3, 1),
            devplug_api::TaintEffect::NoExecute,
        ))
        .unwrap();
        assert_eq!(
            evicting[0]["taints"],
            json!([{"key": UNHEALTHY_TAINT, "effect": "NoExecute"}])
        );
        assert!(evicting[1].get("taints").is_none());
        // What the source knows a device holds is published as capacity,
        // except on a shared device (its allocations would consume it all).
        let mut with_memory = snap(2, 1);
        if let Some(d) = with_memory.devices.get_mut("Dev_001") {
            d.device.capacity = [("memory".to_string(), "81559Mi".to_string())].into();
        }
        let wire = serde_json::to_value(devices(&with_memory)).unwrap();
        assert_eq!(wire[1]["capacity"], json!({"memory": {"value": "81559Mi"}}));
        assert!(wire[0].get("capacity").is_none());
        with_memory.replicas = 2;
        let wire = serde_json::to_value(devices(&with_memory)).unwrap();
        assert_eq!(
            wire[1]["capacity"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["shares"]
        );

        let mut cfg = crate::config::PluginConfig::from_policy(
            &devplug_api::policies_from_yaml(
                "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata:\n  name: gpu\nspec:\n  resourceName: example.com/gpu\n  kubeletApi: DRA\n  source:\n    simulated:\n      count: 1\n",
            )
            .unwrap()[0],
        );
        cfg.driver = "gpu.devplug.io".into();
        let s = slices("n1", &cfg, 7, &devs);
        assert_eq!(s.len(), 7);
        let sizes: Vec<usize> = s
            .iter()
            .map(|(_, b)| b.spec.devices.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, [64, 64, 64, 64, 64, 64, 16]);
        for (i, (name, b)) in s.iter().enumerate() {
            assert_eq!(*name, names::slice_name("n1", "gpu.devplug.io", i));
            let wire = serde_json::to_value(b).unwrap();
            assert_eq!(wire["apiVersion"], "resource.k8s.io/v1");
            assert_eq!(wire["kind"], "ResourceSlice");
            assert_eq!(
                wire["spec"]["pool"],
                json!({"name": "n1", "generation": 7, "resourceSliceCount": 7})
            );
        }
        // What an API server with a feature gate off drops is named.
        let sent = &s[0].1;
        assert!(dropped(sent, sent).is_empty());
        let mut stored = sent.clone();
        for d in stored.spec.devices.iter_mut().flatten() {
            d.taints = None;
        }
        let lost = dropped(sent, &stored);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("DRADeviceTaints"), "{lost:?}");
        let shared = slices("n1", &cfg, 1, &devices(&snap(2, 4)));
        let mut plain = shared[0].1.clone();
        for d in plain.spec.devices.iter_mut().flatten() {
            d.allow_multiple_allocations = None;
            d.capacity = None;
        }
        let lost = dropped(&shared[0].1, &plain);
        assert!(
            lost.iter().any(|l| l.contains("DRAConsumableCapacity")),
            "{lost:?}"
        );

        // An empty pool is one empty slice (after discovery ran).
        let s = slices("n1", &cfg, 1, &[]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].1.spec.devices, Some(vec![]));
    }
}
