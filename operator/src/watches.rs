//! The operator's watches, kept for the life of the process.
//!
//! Each watch feeds a store that reconciles read instead of the API server.
//! They start before leader election and keep running while a replica
//! stands by, so a standby that takes over already holds the cluster: it
//! does not list every NodeDeviceStatus again (at 2,000 nodes a relist kept
//! a new leader from a correct status for 24 s). The cost is that each
//! replica watches, standby or not.
//!
//! The leader follows what the watches touch through a [`Watched::follow`]
//! (the stores of a standby are filled but trigger nothing); its primary
//! kinds replay the whole store first ([`Watched::replay_and_follow`]), so
//! the new leader reconciles everything once, as after a listing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devplug_api::DevicePluginPolicy;
use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::task::JoinSet;
use tracing::warn;

use crate::agent_pod::AgentPod;
use crate::args::Args;
use crate::index::PodGroups;
use crate::synced::{self, Synced};
use crate::view;

/// Cached objects keep no `managedFields`: nothing reads them, and for
/// NodeDeviceStatus (one field manager per agent over lists of devices)
/// they are most of each object's size.
fn drop_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// NodeDeviceStatus objects per list page.
pub const NDS_PAGE: u32 = 100;

/// Where a watch sends the objects it touches, while someone follows.
type Tap<K> = Arc<Mutex<Option<mpsc::UnboundedSender<K>>>>;

fn lock<K>(tap: &Tap<K>) -> MutexGuard<'_, Option<mpsc::UnboundedSender<K>>> {
    // A panic while holding this lock cannot leave the Option half-written.
    tap.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A store kept by a watch, and the objects the watch touches.
pub struct Watched<K: kube::Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    /// Everything the watch has seen, as of now.
    pub store: reflector::Store<K>,
    tap: Tap<K>,
    listed: Arc<AtomicBool>,
}

impl<K> Watched<K>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// The objects the watch touches from now on (applied, listed or
    /// deleted), for a controller to trigger on. A later call takes over:
    /// the earlier stream ends.
    pub fn follow(&self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + use<K> {
        let (tx, rx) = mpsc::unbounded();
        *lock(&self.tap) = Some(tx);
        rx.map(Ok)
    }

    /// Every object in the store once it has listed the cluster, then what
    /// [`Self::follow`] yields (an object touched meanwhile may come twice,
    /// which only triggers it twice).
    pub fn replay_and_follow(
        &self,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + use<K> {
        // Following first: nothing touched between the replay's snapshot
        // and the follow can be missed.
        let live = self.follow();
        let (store, listed) = (self.store.clone(), self.listed.clone());
        let replay = futures::stream::once(async move {
            while !listed.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            store.state()
        })
        .flat_map(|all| futures::stream::iter(all.into_iter().map(|o| Ok((*o).clone()))));
        futures::stream::select(replay, live)
    }
}

/// Starts a watch of `api` that trims each object with `trim` and sets
/// `flag` once it has listed; `then` sees each event once the store has
/// applied it. The watch runs in `tasks`.
fn watch<K>(
    tasks: &mut JoinSet<()>,
    what: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    flag: Arc<AtomicBool>,
    trim: fn(&mut K),
    then: impl Fn(&watcher::Event<K>, &reflector::Store<K>) + Send + 'static,
) -> Watched<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let tap: Tap<K> = Arc::default();
    let forward = tap.clone();
    let applied = store.clone();
    let events = synced::mark(
        reflector(writer, watcher(api, cfg).default_backoff().modify(trim)).inspect(move |e| {
            if let Ok(e) = e {
                then(e, &applied);
            }
        }),
        flag.clone(),
    )
    .touched_objects();
    tasks.spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(e) = events.next().await {
            match e {
                Ok(o) => {
                    let mut tap = lock(&forward);
                    if tap.as_ref().is_some_and(|tx| tx.unbounded_send(o).is_err()) {
                        // Nobody follows any more (leadership ended).
                        *tap = None;
                    }
                }
                // A resourceVersion too old (410) is routine: the watcher
                // lists again (Events expire within the hour, so their
                // watch sees it often).
                Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                    tracing::debug!(%what, "watch expired; listing again");
                }
                Err(e) => warn!(%what, error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    Watched {
        store,
        tap,
        listed: flag,
    }
}

/// Every watch the controllers read, with the tasks that run them (which
/// stop when `tasks` is dropped).
pub struct Watches {
    /// Policies.
    pub policies: Watched<DevicePluginPolicy>,
    /// The agent DaemonSets the operator manages.
    pub daemonsets: Watched<DaemonSet>,
    /// Agent pods, parsed into the operator's projection ([`AgentPod`]).
    pub agent_pods: Watched<AgentPod>,
    /// Nodes, metadata only (labels decide which policies serve a node; a
    /// full Node carries images and conditions the operator never reads).
    pub nodes: Watched<PartialObjectMeta<Node>>,
    /// NodeDeviceStatus objects, parsed into the operator's projection.
    pub nds: Watched<view::NodeView>,
    /// The DaemonSet controller's `FailedCreate` Events in the namespace.
    pub failed_creates: Watched<Event>,
    /// Agent pods by node and by policy, following the pod watch.
    pub pod_groups: PodGroups,
    /// Whether each store has listed once.
    pub synced: Synced,
    /// The tasks running the watches.
    pub tasks: JoinSet<()>,
}

impl Watches {
    /// Starts every watch.
    pub fn start(client: &Client, args: &Args) -> Watches {
        let synced = Synced::default();
        let mut tasks = JoinSet::new();
        let pod_groups = PodGroups::default();
        let policies = watch(
            &mut tasks,
            "DevicePluginPolicy",
            Api::all(client.clone()),
            watcher::Config::default().any_semantic(),
            synced.policies.clone(),
            drop_managed_fields,
            |_, _| {},
        );
        let daemonsets = watch(
            &mut tasks,
            "DaemonSet",
            Api::namespaced(client.clone(), &args.namespace),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=devplug-operator"),
            synced.daemonsets.clone(),
            drop_managed_fields,
            |_, _| {},
        );
        let agent_pods = watch(
            &mut tasks,
            "agent Pod",
            Api::namespaced(client.clone(), &args.namespace),
            watcher::Config::default().labels("app.kubernetes.io/name=devplug-agent"),
            synced.agent_pods.clone(),
            drop_managed_fields,
            {
                let groups = pod_groups.clone();
                move |e, store| groups.follow(e, store)
            },
        );
        let nodes = watch(
            &mut tasks,
            "Node",
            Api::all(client.clone()),
            watcher::Config::default(),
            synced.nodes.clone(),
            drop_managed_fields,
            |_, _| {},
        );
        let nds = watch(
            &mut tasks,
            "NodeDeviceStatus",
            Api::all(client.clone()),
            // Pages of 100: a page's JSON is held whole while it is parsed,
            // and these are the largest objects the operator lists.
            watcher::Config::default()
                .any_semantic()
                .page_size(NDS_PAGE),
            synced.nds.clone(),
            drop_managed_fields,
            |_, _| {},
        );
        // Why an agent DaemonSet is short of pods (Pod Security, quota, a
        // webhook): rare, small, and only a message is read of them.
        let failed_creates = watch(
            &mut tasks,
            "FailedCreate Event",
            Api::namespaced(client.clone(), &args.namespace),
            watcher::Config::default().fields("involvedObject.kind=DaemonSet,reason=FailedCreate"),
            Arc::new(AtomicBool::new(false)),
            drop_managed_fields,
            |_, _| {},
        );
        Watches {
            policies,
            daemonsets,
            agent_pods,
            nodes,
            nds,
            failed_creates,
            pod_groups,
            synced,
            tasks,
        }
    }
}
