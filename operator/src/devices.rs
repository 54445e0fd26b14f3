//! What the operator derives from the NodeDeviceStatus objects, as pure
//! functions: a policy's device counts and its unhealthy devices, a node's
//! summary and its labels.

use std::collections::{BTreeMap, BTreeSet};

#[cfg(doc)]
use devplug_api::NodeDeviceStatusStatus;
use devplug_api::{
    DeviceCounts, DeviceHealth, DevicePluginPolicy, NodeSummary, NotReporting, ResourceExt,
    ResourceStatus, STATE_UNKNOWN, SharingStrategy, UnhealthyDevice,
};

use crate::desired::{label_value, stable_hash};
use crate::view::NodeView;

/// Most unhealthy devices listed in a policy's status.
pub const MAX_UNHEALTHY: usize = 20;

/// The entries of one policy over all nodes, with their node names, as
/// they count: an entry the operator lists as not reporting has its devices
/// `Unknown` ([`NodeDeviceStatusStatus::effective_resources`]).
pub fn entries_of<'a>(
    policy: &DevicePluginPolicy,
    all: impl IntoIterator<Item = &'a NodeView>,
) -> Vec<(String, ResourceStatus)> {
    let name = policy.name_any();
    let mut out = Vec::new();
    for nds in all {
        let node = nds.name_any();
        let Some(status) = &nds.status else { continue };
        for (head, devices) in status.resources.iter().zip(&status.devices) {
            if head.policy != name || head.resource_name != policy.spec.resource_name {
                continue;
            }
            let e = ResourceStatus {
                devices: devices.expand(),
                ..head.clone()
            };
            let e = match not_reporting_reason(head, &status.not_reporting) {
                Some(reason) => e.as_unknown(reason),
                None => e,
            };
            out.push((node.clone(), e));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// What a policy's status says about its devices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregate {
    /// Counts over all nodes.
    pub counts: DeviceCounts,
    /// The first [`MAX_UNHEALTHY`] devices that are not healthy.
    pub unhealthy: Vec<UnhealthyDevice>,
    /// Every device that is not healthy, by (node, device): what device
    /// Events are diffed over (never the truncated list).
    pub all_unhealthy: BTreeMap<(String, String), UnhealthyDevice>,
    /// `node: reason` for entries that report a problem (no NVML, no
    /// PodResources, agent gone).
    pub node_reasons: Vec<String>,
}

/// One entry's part of its policy's [`Aggregate`]: what a policy reconcile
/// sums over the nodes. Computed once per version of a NodeDeviceStatus
/// (see [`Shares`]), not once per policy reconcile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    /// Counts of this entry's devices.
    pub counts: DeviceCounts,
    /// Its devices that are not healthy, in the entry's order.
    pub unhealthy: Vec<UnhealthyDevice>,
    /// The problem the entry reports, if any.
    pub reason: Option<String>,
}

/// The share of one entry as it counts (`e` already effective).
fn share_of(node: &str, e: &ResourceStatus) -> Share {
    let mut sh = Share {
        reason: e.reason.clone(),
        ..Share::default()
    };
    for d in &e.devices {
        sh.counts.total += 1;
        if !d.allocations.is_empty() {
            sh.counts.allocated += 1;
        }
        if d.health == DeviceHealth::Healthy {
            sh.counts.healthy += 1;
            continue;
        }
        sh.counts.unhealthy += 1;
        let pods: BTreeSet<String> = d
            .allocations
            .iter()
            .map(|a| format!("{}/{}", a.namespace, a.pod))
            .collect();
        sh.unhealthy.push(UnhealthyDevice {
            node: node.to_string(),
            device: d.id.clone(),
            health: format!("{:?}", d.health),
            reason: d.reason.clone(),
            pods: pods.into_iter().collect(),
        });
    }
    sh
}

/// The shares of every entry of one NodeDeviceStatus, keyed by (policy,
/// resource name). An entry the operator lists as not reporting counts with
/// its devices `Unknown`.
pub fn shares(nds: &NodeView) -> Vec<((String, String), Share)> {
    let node = nds.name_any();
    let Some(status) = &nds.status else {
        return Vec::new();
    };
    status
        .resources
        .iter()
        .zip(&status.devices)
        .map(|(head, devices)| {
            let e = ResourceStatus {
                devices: devices.expand(),
                ..head.clone()
            };
            let sh = match not_reporting_reason(head, &status.not_reporting) {
                Some(reason) => share_of(&node, &e.as_unknown(reason)),
                None => share_of(&node, &e),
            };
            ((head.policy.clone(), head.resource_name.clone()), sh)
        })
        .collect()
}

/// Sums the shares of one policy over its nodes, given as (node, share) in
/// any order: counts, the first [`MAX_UNHEALTHY`] devices that are not
/// healthy (by node, then in each entry's order), every one of them by
/// (node, device), and the problems nodes report.
pub fn merge<'a>(parts: impl IntoIterator<Item = (&'a str, &'a Share)>) -> Aggregate {
    let mut counts = DeviceCounts::default();
    let mut notable: Vec<(&str, &Share)> = Vec::new();
    for (node, sh) in parts {
        counts.total += sh.counts.total;
        counts.healthy += sh.counts.healthy;
        counts.unhealthy += sh.counts.unhealthy;
        counts.allocated += sh.counts.allocated;
        if !sh.unhealthy.is_empty() || sh.reason.is_some() {
            notable.push((node, sh));
        }
    }
    notable.sort_by(|a, b| a.0.cmp(b.0));
    let mut agg = Aggregate {
        counts,
        ..Aggregate::default()
    };
    for (node, sh) in notable {
        if let Some(r) = &sh.reason {
            agg.node_reasons.push(format!("{node}: {r}"));
        }
        for u in &sh.unhealthy {
            if agg.unhealthy.len() < MAX_UNHEALTHY {
                agg.unhealthy.push(u.clone());
            }
            agg.all_unhealthy
                .insert((node.to_string(), u.device.clone()), u.clone());
        }
    }
    agg
}

/// Device counts and the first [`MAX_UNHEALTHY`] devices that are not
/// healthy (sorted by node and device), with the pods they affect, and the
/// problems nodes report.
pub fn aggregate(entries: &[(String, ResourceStatus)]) -> Aggregate {
    let shares: Vec<(&str, Share)> = entries
        .iter()
        .map(|(node, e)| (node.as_str(), share_of(node, e)))
        .collect();
    merge(shares.iter().map(|(n, s)| (*n, s)))
}

/// Shares of every NodeDeviceStatus, remembered per object version: a
/// policy reconcile reads each node's shares from here and computes them
/// again only for objects that changed since. Before, every reconcile copied
/// every entry of every node (all policies' entries, 64 devices each) to
/// count one policy's.
#[derive(Default)]
pub struct Shares {
    by_node: std::sync::Mutex<std::collections::HashMap<String, NodeShares>>,
}

/// The shares of one node's entries, by (policy, resource name).
type EntryShares = std::sync::Arc<Vec<((String, String), Share)>>;

#[derive(Clone)]
struct NodeShares {
    version: String,
    shares: EntryShares,
}

impl Shares {
    /// The aggregate of `policy` over `all` (the index's NodeDeviceStatus
    /// objects); forgets nodes no longer in `all`.
    pub fn aggregate<'a>(
        &self,
        policy: &DevicePluginPolicy,
        all: impl IntoIterator<Item = &'a NodeView>,
    ) -> Aggregate {
        let name = policy.name_any();
        let key = (name, policy.spec.resource_name.clone());
        let mut current: Vec<(String, EntryShares)> = Vec::new();
        {
            let mut map = self.by_node.lock().unwrap_or_else(|e| e.into_inner());
            let mut kept = std::collections::HashMap::with_capacity(map.len());
            for nds in all {
                let node = nds.name_any();
                let version = nds.resource_version().unwrap_or_default();
                let ns = match map.remove(&node) {
                    Some(ns) if ns.version == version && !version.is_empty() => ns,
                    _ => NodeShares {
                        version,
                        shares: std::sync::Arc::new(shares(nds)),
                    },
                };
                current.push((node.clone(), ns.shares.clone()));
                kept.insert(node, ns);
            }
            *map = kept;
        }
        merge(current.iter().flat_map(|(node, sh)| {
            sh.iter()
                .filter(|(k, _)| *k == key)
                .map(move |(_, s)| (node.as_str(), s))
        }))
    }
}

/// A node's summary for `kubectl get nds`.
pub fn summary(nds: &NodeView) -> NodeSummary {
    let st = nds.status.as_ref();
    summary_of(
        st.map_or(&[][..], |s| &s.resources),
        st.map_or(&[][..], |s| &s.not_reporting),
    )
}

/// Why the agent of entry `e` does not vouch for it, if it is listed in
/// `not_reporting` (its devices then count `Unknown`).
fn not_reporting_reason<'a>(
    e: &ResourceStatus,
    not_reporting: &'a [NotReporting],
) -> Option<&'a str> {
    not_reporting
        .iter()
        .find(|n| n.resource_name == e.resource_name && n.policy == e.policy)
        .map(|n| n.reason.as_str())
}

/// A node's summary from its entries and who is not reporting, read in
/// place (an entry not reporting counts no healthy device).
pub fn summary_of(resources: &[ResourceStatus], not_reporting: &[NotReporting]) -> NodeSummary {
    let (mut healthy, mut total, mut allocated) = (0, 0, 0);
    let (mut unhealthy, mut silent) = (0, 0);
    for e in resources {
        if not_reporting_reason(e, not_reporting).is_none() {
            healthy += e.healthy;
            unhealthy += e.total - e.healthy;
        } else {
            silent += 1;
        }
        total += e.total;
        allocated += e.allocated;
    }
    NodeSummary {
        resources: resources.len() as i64,
        healthy: format!("{healthy}/{total}"),
        allocated,
        unhealthy,
        not_reporting: silent,
    }
}

/// Prefix of every label the operator puts on nodes.
pub const NODE_LABEL_PREFIX: &str = "devplug.io/";

/// The label key `devplug.io/<policy>.<what>`, always a valid key: the name
/// part stops at 63 characters, so long policy names are shortened and made
/// unique with a hash.
pub fn node_label_key(policy: &str, what: &str) -> String {
    let suffix = format!(".{what}");
    let room = 63 - suffix.len();
    let base = if policy.len() <= room {
        policy.to_string()
    } else {
        let h = stable_hash(policy.as_bytes());
        let keep = room - h.len() - 1;
        let mut p: String = label_value(policy).chars().take(keep).collect();
        while p.ends_with(['-', '.']) {
            p.pop();
        }
        format!("{p}-{h}")
    };
    format!("{NODE_LABEL_PREFIX}{base}{suffix}")
}

/// The devplug labels a node should carry: for each policy served there,
/// its device count, sharing strategy and replicas.
pub fn node_labels(
    nds: &NodeView,
    policies: &BTreeMap<String, &DevicePluginPolicy>,
) -> BTreeMap<String, String> {
    let st = nds.status.as_ref();
    node_labels_of(
        st.map_or(&[][..], |s| &s.resources),
        st.map_or(&[][..], |s| &s.not_reporting),
        policies,
    )
}

/// [`node_labels`] from a node's entries and who is not reporting, read in
/// place: an entry nobody vouches for (not reporting, or `Unknown`) gets none.
pub fn node_labels_of(
    resources: &[ResourceStatus],
    not_reporting: &[NotReporting],
    policies: &BTreeMap<String, &DevicePluginPolicy>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in resources {
        let Some(p) = policies.get(&e.policy) else {
            continue;
        };
        if e.state == STATE_UNKNOWN || not_reporting_reason(e, not_reporting).is_some() {
            continue;
        }
        let strategy = match p.spec.sharing.strategy {
            SharingStrategy::Exclusive => "Exclusive",
            SharingStrategy::TimeSlicing => "TimeSlicing",
        };
        out.insert(node_label_key(&e.policy, "count"), e.total.to_string());
        out.insert(node_label_key(&e.policy, "sharing"), strategy.to_string());
        out.insert(
            node_label_key(&e.policy, "replicas"),
            p.spec.sharing.effective_replicas().to_string(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplug_api::{
        Allocation, DeviceStatus, NodeDeviceStatus, NodeDeviceStatusSpec, NodeDeviceStatusStatus,
    };

    /// The objects as the index keeps them.
    fn views(all: &[NodeDeviceStatus]) -> Vec<NodeView> {
        all.iter().map(NodeView::from).collect()
    }

    fn dev(id: &str, health: DeviceHealth, pods: &[&str]) -> DeviceStatus {
        DeviceStatus {
            id: id.into(),
            health,
            reason: (health != DeviceHealth::Healthy).then(|| "ecc".to_string()),
            last_transition_time: None,
            numa_nodes: vec![],
            allocations: pods
                .iter()
                .map(|p| Allocation {
                    namespace: "ns".into(),
                    pod: (*p).into(),
                    container: "c".into(),
                })
                .collect(),
        }
    }

    fn nds(node: &str, entries: Vec<ResourceStatus>) -> NodeDeviceStatus {
        let mut n = NodeDeviceStatus::new(
            node,
            NodeDeviceStatusSpec {
                node_name: node.into(),
            },
        );
        n.status = Some(NodeDeviceStatusStatus {
            resources: entries,
            ..Default::default()
        });
        n
    }

    fn entry(policy: &str, res: &str, devices: Vec<DeviceStatus>) -> ResourceStatus {
        let healthy = devices
            .iter()
            .filter(|d| d.health == DeviceHealth::Healthy)
            .count() as i64;
        let allocated = devices.iter().filter(|d| !d.allocations.is_empty()).count() as i64;
        ResourceStatus {
            resource_name: res.into(),
            policy: policy.into(),
            state: "Serving".into(),
            reason: None,
            healthy,
            total: devices.len() as i64,
            allocated,
            devices,
            orphaned: Vec::new(),
        }
    }

    fn policy(name: &str, res: &str, shared: bool) -> DevicePluginPolicy {
        let sharing = if shared {
            "  sharing: {strategy: TimeSlicing, replicas: 4}\n"
        } else {
            ""
        };
        devplug_api::policies_from_yaml(&format!(
            "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {{name: {name}}}\nspec:\n  resourceName: {res}\n  source: {{simulated: {{count: 1}}}}\n{sharing}"
        ))
        .unwrap()
        .remove(0)
    }

    #[test]
    fn aggregates_over_nodes_and_names_affected_pods() {
        let p = policy("gpu", "x.io/gpu", false);
        let all = vec![
            nds(
                "n2",
                vec![entry(
                    "gpu",
                    "x.io/gpu",
                    vec![dev("a", DeviceHealth::Unknown, &[])],
                )],
            ),
            nds(
                "n1",
                vec![
                    entry(
                        "gpu",
                        "x.io/gpu",
                        vec![
                            dev("a", DeviceHealth::Healthy, &["p1"]),
                            dev("b", DeviceHealth::Unhealthy, &["p2", "p3"]),
                        ],
                    ),
                    entry(
                        "nic",
                        "x.io/nic",
                        vec![dev("z", DeviceHealth::Unhealthy, &[])],
                    ),
                ],
            ),
        ];
        let e = entries_of(&p, &views(&all));
        assert_eq!(e.len(), 2);
        let Aggregate {
            counts: c,
            unhealthy: bad,
            ..
        } = aggregate(&e);
        assert_eq!((c.total, c.healthy, c.unhealthy, c.allocated), (3, 1, 2, 2));
        assert_eq!(bad.len(), 2);
        assert_eq!((bad[0].node.as_str(), bad[0].device.as_str()), ("n1", "b"));
        assert_eq!(bad[0].pods, vec!["ns/p2", "ns/p3"]);
        assert_eq!(bad[1].health, "Unknown");
    }

    /// The remembered shares give what copying every entry gave, and are
    /// computed again only for an object whose version changed; nodes gone
    /// from the index are forgotten.
    #[test]
    fn remembered_shares_match_the_full_count_and_follow_versions() {
        let p = policy("gpu", "x.io/gpu", false);
        let versioned = |mut n: NodeDeviceStatus, rv: &str| {
            n.metadata.resource_version = Some(rv.into());
            n
        };
        let mut quiet = nds(
            "n3",
            vec![entry(
                "gpu",
                "x.io/gpu",
                vec![dev("a", DeviceHealth::Healthy, &[])],
            )],
        );
        quiet.status.as_mut().unwrap().not_reporting = vec![devplug_api::NotReporting {
            resource_name: "x.io/gpu".into(),
            policy: "gpu".into(),
            reason: "AgentGone: no agent pod runs on this node".into(),
        }];
        let mut all = vec![
            versioned(
                nds(
                    "n2",
                    vec![entry(
                        "gpu",
                        "x.io/gpu",
                        vec![dev("a", DeviceHealth::Unknown, &[])],
                    )],
                ),
                "5",
            ),
            versioned(
                nds(
                    "n1",
                    vec![
                        entry(
                            "gpu",
                            "x.io/gpu",
                            vec![
                                dev("a", DeviceHealth::Healthy, &["p1"]),
                                dev("b", DeviceHealth::Unhealthy, &["p2", "p3"]),
                            ],
                        ),
                        entry(
                            "nic",
                            "x.io/nic",
                            vec![dev("z", DeviceHealth::Unhealthy, &[])],
                        ),
                        // Same policy name, another resource: not counted.
                        entry(
                            "gpu",
                            "x.io/other",
                            vec![dev("q", DeviceHealth::Unhealthy, &[])],
                        ),
                    ],
                ),
                "7",
            ),
            versioned(quiet, "9"),
        ];
        let shares = Shares::default();
        let want = aggregate(&entries_of(&p, &views(&all)));
        assert_eq!(shares.aggregate(&p, &views(&all)), want);
        assert_eq!(want.counts.unhealthy, 3);
        assert_eq!(want.node_reasons.len(), 1, "{:?}", want.node_reasons);

        // Same version, different content: the remembered share stands
        // (a version names one content, so this never happens for real).
        all[0].status.as_mut().unwrap().resources[0].devices[0].health = DeviceHealth::Healthy;
        assert_eq!(shares.aggregate(&p, &views(&all)).counts.unhealthy, 3);
        // A new version is counted again.
        all[0].metadata.resource_version = Some("6".into());
        let now = shares.aggregate(&p, &views(&all));
        assert_eq!(now.counts.unhealthy, 2);
        assert_eq!(now, aggregate(&entries_of(&p, &views(&all))));
        // n1 leaves the index: forgotten.
        all.remove(1);
        assert_eq!(
            shares.aggregate(&p, &views(&all)),
            aggregate(&entries_of(&p, &views(&all)))
        );
        assert_eq!(shares.by_node.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_entry_whose_agent_is_not_reporting_counts_as_unknown_without_being_rewritten() {
        let mut n = nds(
            "n1",
            vec![entry(
                "gpu",
                "x.io/gpu",
                vec![
                    dev("a", DeviceHealth::Healthy, &["p1"]),
                    dev("b", DeviceHealth::Healthy, &[]),
                ],
            )],
        );
        let p = policy("gpu", "x.io/gpu", false);
        let a = aggregate(&entries_of(&p, [&NodeView::from(&n)]));
        assert_eq!((a.counts.healthy, a.counts.unhealthy), (2, 0));
        n.status.as_mut().unwrap().not_reporting = vec![devplug_api::NotReporting {
            resource_name: "x.io/gpu".into(),
            policy: "gpu".into(),
            reason: "AgentGone: no agent pod runs on this node".into(),
        }];
        let v = NodeView::from(&n);
        let a = aggregate(&entries_of(&p, [&v]));
        assert_eq!(
            (a.counts.total, a.counts.healthy, a.counts.unhealthy),
            (2, 0, 2)
        );
        assert_eq!(a.unhealthy[0].health, "Unknown");
        assert_eq!(a.unhealthy[0].pods, vec!["ns/p1"]);
        assert!(
            a.node_reasons[0].contains("AgentGone"),
            "{:?}",
            a.node_reasons
        );
        assert_eq!(summary(&v).healthy, "0/2");
        assert!(node_labels(&v, &BTreeMap::from([("gpu".to_string(), &p)])).is_empty());
        // What the agent wrote is untouched.
        let stored = &n.status.as_ref().unwrap().resources[0];
        assert_eq!(stored.devices[0].health, DeviceHealth::Healthy);
        assert_eq!(stored.state, "Serving");
    }

    #[test]
    fn node_problems_are_reported() {
        let mut e = entry("gpu", "x.io/gpu", vec![]);
        e.reason = Some("NVML is not available on this node".into());
        let all = views(&[nds("n1", vec![e])]);
        let a = aggregate(&entries_of(&policy("gpu", "x.io/gpu", false), &all));
        assert_eq!(
            a.node_reasons,
            vec!["n1: NVML is not available on this node"]
        );
    }

    #[test]
    fn unhealthy_list_is_bounded() {
        let devs = (0..50)
            .map(|i| dev(&format!("d{i}"), DeviceHealth::Unhealthy, &[]))
            .collect();
        let all = views(&[nds("n", vec![entry("gpu", "x.io/gpu", devs)])]);
        let Aggregate {
            counts: c,
            unhealthy: bad,
            ..
        } = aggregate(&entries_of(&policy("gpu", "x.io/gpu", false), &all));
        assert_eq!(c.unhealthy, 50);
        assert_eq!(bad.len(), MAX_UNHEALTHY);
        let a = aggregate(&entries_of(&policy("gpu", "x.io/gpu", false), &all));
        assert_eq!(
            a.all_unhealthy.len(),
            50,
            "events are diffed over all of them"
        );
    }

    #[test]
    fn node_labels_per_policy_with_valid_keys() {
        let gpu = policy("gpu", "x.io/gpu", true);
        let long_name = "a".repeat(80);
        let long = policy(&long_name, "x.io/long", false);
        let policies = BTreeMap::from([("gpu".to_string(), &gpu), (long_name.clone(), &long)]);
        let n = nds(
            "n1",
            vec![
                entry(
                    "gpu",
                    "x.io/gpu",
                    vec![
                        dev("a", DeviceHealth::Healthy, &[]),
                        dev("b", DeviceHealth::Healthy, &[]),
                    ],
                ),
                entry(&long_name, "x.io/long", vec![]),
                entry("deleted", "x.io/old", vec![]),
            ],
        );
        let n = NodeView::from(n);
        let l = node_labels(&n, &policies);
        assert_eq!(l["devplug.io/gpu.count"], "2");
        assert_eq!(l["devplug.io/gpu.sharing"], "TimeSlicing");
        assert_eq!(l["devplug.io/gpu.replicas"], "4");
        assert_eq!(l.len(), 6, "{l:?}");
        for k in l.keys() {
            let name = k.strip_prefix(NODE_LABEL_PREFIX).unwrap();
            assert!(name.len() <= 63, "{k}");
            assert!(name.chars().next().unwrap().is_ascii_alphanumeric(), "{k}");
        }
        assert_eq!(
            summary(&n),
            NodeSummary {
                resources: 3,
                healthy: "2/2".into(),
                allocated: 0,
                unhealthy: 0,
                not_reporting: 0,
            }
        );
    }

    #[test]
    fn the_summary_counts_unhealthy_devices_and_silent_agents_apart() {
        let gpu = entry(
            "gpu",
            "x.io/gpu",
            vec![
                dev("a", DeviceHealth::Healthy, &["p"]),
                dev("b", DeviceHealth::Unhealthy, &[]),
                dev("c", DeviceHealth::Unknown, &[]),
            ],
        );
        let nic = entry(
            "nic",
            "x.io/nic",
            vec![dev("n", DeviceHealth::Healthy, &[])],
        );
        let silent = [NotReporting {
            resource_name: "x.io/nic".into(),
            policy: "nic".into(),
            reason: "AgentGone".into(),
        }];
        assert_eq!(
            summary_of(&[gpu, nic], &silent),
            NodeSummary {
                resources: 2,
                healthy: "1/4".into(),
                allocated: 1,
                unhealthy: 2,
                not_reporting: 1,
            }
        );
    }
}
