//! The operator's one in-memory view of the cluster.
//!
//! Six watches feed it — policies, agent DaemonSets, agent pods,
//! NodeDeviceStatus objects, Nodes (metadata only) and the DaemonSet
//! controller's `FailedCreate` Events — each exactly once per process. Both
//! controllers read this index and nothing else to decide: what an agent
//! DaemonSet should be, which policies serve a node, which entries are
//! stale, what a policy's device counts and conditions are, are pure
//! functions (`desired`, `conflict`, `devices`, `status`,
//! `node_controller::decide`) of what it holds. The API server is never
//! listed by a reconcile; it is read only where no watch can answer (a node
//! missing from the index is confirmed with one GET before its status is
//! deleted; objects no watch covers — ServiceAccounts, ClusterRoles,
//! ClusterRoleBindings — are remembered as applied).
//!
//! Besides the stores it keeps the agent pods by node and by policy
//! ([`Index::agent_pods_on`], [`Index::agent_pods_of`]), kept up to date
//! by the pod watch ([`Index::agent_pod_event`]): a node reconcile looks at
//! the few pods of one node, not at the fleet's 20,000.
//!
//! The index answers only once every store has listed the cluster
//! ([`Index::ready`]): an unlisted store would read as "no agent runs
//! here", "no entries", and the controllers would act on that.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use devplug_api::{DevicePluginPolicy, POLICY_LABEL, ResourceExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use crate::agent_pod::AgentPod;
use crate::synced::Synced;
use crate::view::NodeView;

/// Watch-fed stores, shared by both controllers.
#[derive(Clone)]
pub struct Index {
    /// Every policy.
    pub policies: Store<DevicePluginPolicy>,
    /// Agent DaemonSets in the operator's namespace.
    pub daemonsets: Store<DaemonSet>,
    /// Agent pods in the operator's namespace, as the operator's
    /// projection ([`AgentPod`]).
    pub agent_pods: Store<AgentPod>,
    /// Every NodeDeviceStatus, as the operator's compact projection
    /// ([`NodeView`]).
    pub nds: Store<NodeView>,
    /// Every Node, metadata only (labels decide which policies serve it).
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// The DaemonSet controller's `FailedCreate` Events in the operator's
    /// namespace (why an agent DaemonSet has fewer pods than nodes). Not
    /// part of [`Index::ready`]: only a message is read from it.
    pub failed_creates: Store<Event>,
    /// Whether each store has listed the cluster.
    pub synced: Synced,
    /// Agent pods by node and by policy.
    pods_by: PodGroups,
    /// What this process wrote, which the watches may not show yet.
    pub writes: Arc<OwnWrites>,
    /// Each node's entries as per-policy shares, remembered by the
    /// entries' version: a policy's device counts are summed from these,
    /// not from every entry of every node again.
    pub shares: Arc<crate::devices::Shares>,
}

/// The record of the operator's own writes. The stores lag the API server
/// (seconds, on a loaded one), so a reconcile triggered again before its
/// own write comes back would judge the old version and write again; and
/// some objects (ServiceAccounts, agent ClusterRoles and bindings) have no
/// watch at all. Each record is trusted for a bounded time only, after
/// which the stores decide again, so a foreign change is still repaired.
#[derive(Default)]
pub struct OwnWrites {
    /// Objects no watch reports back, by `Kind/name`: the hash applied,
    /// and when.
    pub(crate) applied: Mutex<HashMap<String, (String, Instant)>>,
    /// Each policy's status as last written: the resourceVersion it was
    /// computed from, the status, and when.
    pub(crate) policy_status:
        Mutex<HashMap<String, (String, devplug_api::DevicePluginPolicyStatus, Instant)>>,
    /// What the node controller last wrote per node, with its due times.
    pub(crate) nodes: Mutex<HashMap<String, crate::node_controller::Wrote>>,
}

/// Locks a record; a panic while it was held leaves at worst a record the
/// next write replaces.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Agent pods by node and by policy, kept up to date by the pod watch
/// ([`PodGroups::follow`]).
#[derive(Clone, Default)]
pub struct PodGroups(Arc<RwLock<PodsBy>>);

impl PodGroups {
    /// Follows an event of the agent pod watch, once `store` has applied
    /// it: a listing regroups every pod, a change or deletion moves one.
    pub fn follow(&self, ev: &watcher::Event<AgentPod>, store: &Store<AgentPod>) {
        let mut by = self.write();
        match ev {
            watcher::Event::Apply(p) => {
                let key = ObjectRef::from_obj(p);
                match store.get(&key) {
                    Some(stored) => by.insert(stored),
                    None => by.remove(&key),
                }
            }
            watcher::Event::Delete(p) => by.remove(&ObjectRef::from_obj(p)),
            watcher::Event::InitDone => *by = PodsBy::rebuild(store),
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PodsBy> {
        // A panic while holding the lock leaves at worst a stale group,
        // which the next listing rebuilds.
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodsBy> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Agent pods grouped two ways, sharing the store's objects.
#[derive(Default)]
struct PodsBy {
    /// By the node they are bound to (unbound pods are in no group).
    node: HashMap<String, Vec<Arc<AgentPod>>>,
    /// By their policy label.
    policy: HashMap<String, Vec<Arc<AgentPod>>>,
    /// Each pod's groups: (node, policy label), to move or drop it.
    of: HashMap<ObjectRef<AgentPod>, (Option<String>, Option<String>)>,
}

impl PodsBy {
    fn insert(&mut self, pod: Arc<AgentPod>) {
        let key = ObjectRef::from_obj(pod.as_ref());
        self.remove(&key);
        let node = pod.node.clone();
        let policy = pod.labels().get(POLICY_LABEL).cloned();
        if let Some(n) = &node {
            self.node.entry(n.clone()).or_default().push(pod.clone());
        }
        if let Some(p) = &policy {
            self.policy.entry(p.clone()).or_default().push(pod);
        }
        self.of.insert(key, (node, policy));
    }

    fn remove(&mut self, key: &ObjectRef<AgentPod>) {
        let Some((node, policy)) = self.of.remove(key) else {
            return;
        };
        let drop_from = |map: &mut HashMap<String, Vec<Arc<AgentPod>>>, group: &str| {
            if let Some(v) = map.get_mut(group) {
                // Compared in place: a policy's group holds a pod per node, and
                // building an ObjectRef (two string copies) per member on
                // every pod event cost more than the comparison.
                v.retain(|p| {
                    p.metadata.name.as_deref() != Some(key.name.as_str())
                        || p.metadata.namespace != key.namespace
                });
                if v.is_empty() {
                    map.remove(group);
                }
            }
        };
        if let Some(n) = node {
            drop_from(&mut self.node, &n);
        }
        if let Some(p) = policy {
            drop_from(&mut self.policy, &p);
        }
    }

    fn rebuild(store: &Store<AgentPod>) -> PodsBy {
        let mut by = PodsBy::default();
        for p in store.state() {
            by.insert(p);
        }
        by
    }
}

impl Index {
    /// The index of a process's watches.
    pub fn of(w: &crate::watches::Watches) -> Index {
        Index {
            policies: w.policies.store.clone(),
            daemonsets: w.daemonsets.store.clone(),
            agent_pods: w.agent_pods.store.clone(),
            nds: w.nds.store.clone(),
            nodes: w.nodes.store.clone(),
            failed_creates: w.failed_creates.store.clone(),
            synced: w.synced.clone(),
            pods_by: w.pod_groups.clone(),
            writes: Arc::default(),
            shares: Arc::default(),
        }
    }

    /// An index over stores filled by other means than [`Watches`]
    /// (tests, benches); the agent pods already in `agent_pods` are grouped
    /// at once, later ones by [`Index::agent_pod_event`] or
    /// [`Index::regroup_agent_pods`].
    ///
    /// [`Watches`]: crate::watches::Watches
    pub fn new(
        policies: Store<DevicePluginPolicy>,
        daemonsets: Store<DaemonSet>,
        agent_pods: Store<AgentPod>,
        nds: Store<NodeView>,
        nodes: Store<PartialObjectMeta<Node>>,
        failed_creates: Store<Event>,
        synced: Synced,
    ) -> Index {
        let pods_by = PodGroups(Arc::new(RwLock::new(PodsBy::rebuild(&agent_pods))));
        Index {
            policies,
            daemonsets,
            agent_pods,
            nds,
            nodes,
            failed_creates,
            synced,
            pods_by,
            writes: Arc::default(),
            shares: Arc::default(),
        }
    }

    /// Whether every store has listed the cluster once.
    pub fn ready(&self) -> bool {
        self.synced.ready()
    }

    /// Every policy by name.
    pub fn policies_by_name(&self) -> BTreeMap<String, Arc<DevicePluginPolicy>> {
        self.policies
            .state()
            .into_iter()
            .map(|p| (p.name_any(), p))
            .collect()
    }

    /// A node's metadata, if the index has the node.
    pub fn node(&self, name: &str) -> Option<Arc<PartialObjectMeta<Node>>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// Names of the nodes that carry the label `key`.
    pub fn nodes_labelled(&self, key: &str) -> Vec<String> {
        self.nodes
            .state()
            .iter()
            .filter(|n| n.labels().contains_key(key))
            .map(|n| n.name_any())
            .collect()
    }

    /// An agent DaemonSet in `namespace`.
    pub fn daemonset(&self, namespace: &str, name: &str) -> Option<Arc<DaemonSet>> {
        self.daemonsets.get(&ObjectRef::new(name).within(namespace))
    }

    /// The agent pods bound to `node`, of every policy.
    pub fn agent_pods_on(&self, node: &str) -> Vec<Arc<AgentPod>> {
        self.pods_by
            .read()
            .node
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    /// The agent pods of `policy` (by its label, as the DaemonSet's
    /// selector has it), on every node.
    pub fn agent_pods_of(&self, policy: &str) -> Vec<Arc<AgentPod>> {
        let label = crate::desired::label_value(policy);
        self.pods_by
            .read()
            .policy
            .get(&label)
            .map(|v| {
                v.iter()
                    .filter(|p| crate::desired::is_agent_of(p.labels(), policy))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Follows an event of the agent pod watch once the store has applied
    /// it (what the watch does itself; for stores fed by hand).
    pub fn agent_pod_event(&self, ev: &watcher::Event<AgentPod>) {
        self.pods_by.follow(ev, &self.agent_pods);
    }

    /// Groups the agent pods again from the store (after the store was
    /// filled by other means than the watch, as tests do).
    pub fn regroup_agent_pods(&self) {
        *self.pods_by.write() = PodsBy::rebuild(&self.agent_pods);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;

    fn pod(name: &str, node: Option<&str>, policy: &str) -> AgentPod {
        let mut p = AgentPod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("devplug".into());
        p.metadata.labels = Some(
            [
                (
                    crate::desired::APP_LABEL.to_string(),
                    crate::desired::APP.to_string(),
                ),
                (POLICY_LABEL.to_string(), policy.to_string()),
            ]
            .into(),
        );
        p.node = node.map(str::to_string);
        p
    }

    fn names(v: Vec<Arc<AgentPod>>) -> Vec<String> {
        let mut n: Vec<String> = v.iter().map(|p| p.name_any()).collect();
        n.sort();
        n
    }

    /// The groups follow the watch: a listing, a pod bound to a node, a pod
    /// moved by a relist, a deletion; and they share the store's objects.
    #[test]
    fn pods_by_node_and_policy_follow_the_watch() {
        let (s, _) = empty::<DevicePluginPolicy>();
        let mut w: Writer<AgentPod> = Writer::default();
        let pods = w.as_reader();
        let idx = Index::new(
            s,
            empty().0,
            pods,
            empty().0,
            empty().0,
            empty().0,
            Synced::all(),
        );
        let mut feed = |ev: watcher::Event<AgentPod>| {
            w.apply_watcher_event(&ev);
            idx.agent_pod_event(&ev);
        };
        feed(watcher::Event::Init);
        feed(watcher::Event::InitApply(pod("a1", Some("n1"), "gpus")));
        feed(watcher::Event::InitApply(pod("b1", Some("n1"), "nics")));
        assert!(
            idx.agent_pods_on("n1").is_empty(),
            "nothing before the listing ends"
        );
        feed(watcher::Event::InitDone);
        assert_eq!(names(idx.agent_pods_on("n1")), ["a1", "b1"]);
        assert_eq!(names(idx.agent_pods_of("gpus")), ["a1"]);

        // A new pod, unbound, then bound.
        feed(watcher::Event::Apply(pod("a2", None, "gpus")));
        assert_eq!(names(idx.agent_pods_of("gpus")), ["a1", "a2"]);
        assert!(idx.agent_pods_on("n2").is_empty());
        feed(watcher::Event::Apply(pod("a2", Some("n2"), "gpus")));
        assert_eq!(names(idx.agent_pods_on("n2")), ["a2"]);
        assert!(
            Arc::ptr_eq(
                &idx.agent_pods_on("n2")[0],
                &idx.agent_pods
                    .get(&ObjectRef::new("a2").within("devplug"))
                    .unwrap()
            ),
            "the groups hold the store's object, not a copy"
        );

        // Deleted: gone from both groups.
        feed(watcher::Event::Delete(pod("a1", Some("n1"), "gpus")));
        assert_eq!(names(idx.agent_pods_on("n1")), ["b1"]);
        assert_eq!(names(idx.agent_pods_of("gpus")), ["a2"]);

        // A relist that no longer has b1 and has a2 elsewhere.
        feed(watcher::Event::Init);
        feed(watcher::Event::InitApply(pod("a2", Some("n3"), "gpus")));
        feed(watcher::Event::InitDone);
        assert!(idx.agent_pods_on("n1").is_empty());
        assert!(idx.agent_pods_on("n2").is_empty());
        assert_eq!(names(idx.agent_pods_on("n3")), ["a2"]);
        assert!(idx.agent_pods_of("nics").is_empty());
    }

    pub(super) fn empty<K>() -> (Store<K>, Writer<K>)
    where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let mut w = Writer::default();
        w.apply_watcher_event(&watcher::Event::Init);
        w.apply_watcher_event(&watcher::Event::InitDone);
        (w.as_reader(), w)
    }
}
