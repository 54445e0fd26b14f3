//! The reconciler of `DevicePluginPolicy`.
//!
//! One reconcile: validate, check for a conflicting older policy, apply the
//! agent's ServiceAccount, ClusterRole, ClusterRoleBinding and DaemonSet
//! (server-side apply, field manager `devplug-operator`, owned by the policy
//! so deleting it removes them), then write the status and publish Events
//! for condition transitions. Nothing is written when nothing changed: each
//! applied object carries the hash of what it was applied from, and the
//! status is compared before it is written.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent_pod::AgentPod;
use devplug_api::conditions::{self, types};
use devplug_api::{DevicePluginPolicy, OPERATOR_MANAGER, Resource, ResourceExt, UnhealthyDevice};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::conflict;
use crate::desired::{self, AgentDefaults};
use crate::devices;
use crate::error::{Error, Result, kube_err};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::status::{self, Observed};

/// How often a settled policy is looked at again without any event.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How long this process trusts its own last write of a field over what
/// the watch shows: the watch lags the API server by seconds when it is
/// loaded, and a trigger in between must not write the same again. A
/// foreign change of the operator's own fields is repaired after this.
pub const TRUST_OWN_WRITE: Duration = Duration::from_secs(60);
/// How soon a policy that is rolling out, degraded or in conflict is looked at again.
pub const RECHECK: Duration = Duration::from_secs(15);

/// Shared state of all reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Settings of every agent.
    pub defaults: AgentDefaults,
    /// What the watches hold: every decision reads this.
    pub index: Index,
    /// Event publisher.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per policy, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Every unhealthy device per policy as last seen by this process, what
    /// device Events are diffed against. Empty after a start: the first look
    /// at a policy publishes nothing (no event storm on restart or failover).
    last_unhealthy: Mutex<HashMap<String, UnhealthySet>>,
    /// How long own writes are trusted over the index ([`TRUST_OWN_WRITE`]).
    trust_own_write: Duration,
    /// The release namespace is being deleted: every reconcile releases
    /// and cleans up instead of serving (see [`uninstall`]).
    pub uninstalling: std::sync::atomic::AtomicBool,
}

/// Unhealthy devices of a policy by (node, device).
type UnhealthySet = BTreeMap<(String, String), UnhealthyDevice>;

impl Context {
    /// A context over a client.
    pub fn new(
        client: Client,
        defaults: AgentDefaults,
        index: Index,
        metrics: Arc<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: OPERATOR_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            defaults,
            index,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
            last_unhealthy: Mutex::new(HashMap::new()),
            trust_own_write: TRUST_OWN_WRITE,
            uninstalling: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Trusts own writes over the index for `d` instead of
    /// [`TRUST_OWN_WRITE`] (tests: zero, to see a foreign change repaired
    /// at once).
    pub fn trusting_own_writes_for(mut self, d: Duration) -> Self {
        self.trust_own_write = d;
        self
    }

    /// The status `p` has as far as this process knows: the one it wrote
    /// from this very version of `p` if it did, else the one `p` carries.
    fn known_status(
        &self,
        p: &DevicePluginPolicy,
    ) -> Option<devplug_api::DevicePluginPolicyStatus> {
        let rv = p.resource_version().unwrap_or_default();
        let written = crate::index::lock(&self.index.writes.policy_status);
        match written.get(&p.name_any()) {
            Some((from, s, at)) if *from == rv || at.elapsed() < self.trust_own_write => {
                Some(s.clone())
            }
            _ => p.status.clone(),
        }
    }

    fn wrote_status(&self, p: &DevicePluginPolicy, s: &devplug_api::DevicePluginPolicyStatus) {
        crate::index::lock(&self.index.writes.policy_status).insert(
            p.name_any(),
            (
                p.resource_version().unwrap_or_default(),
                s.clone(),
                Instant::now(),
            ),
        );
    }

    fn record_failure(&self, name: &str) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(name.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Swaps in the current unhealthy set of a policy; returns the one seen
    /// before, if this process has seen one.
    fn swap_unhealthy(&self, name: &str, now: UnhealthySet) -> Option<UnhealthySet> {
        self.last_unhealthy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), now)
    }

    fn forget(&self, name: &str) {
        self.last_unhealthy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        crate::index::lock(&self.index.writes.policy_status).remove(name);
        self.clear_failures(name);
    }

    fn clear_failures(&self, name: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

/// Backoff after `n` consecutive failures: 2 s doubling, capped at 5 min,
/// plus up to as much again at random (backon's jitter), so that policies
/// failing together (an API server outage) do not retry in lockstep.
pub fn backoff(n: u32) -> Duration {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(2))
        .with_max_delay(Duration::from_secs(300))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(n.saturating_sub(1).min(16) as usize)
        .unwrap_or(Duration::from_secs(300))
}

/// Where `ensure` learns the live object from.
enum Live<K> {
    /// A watch cache: the object as it holds it (`None`: not there).
    Cached(Option<K>),
    /// No watch for this kind: remember what was applied, read when unsure.
    Unwatched,
}

/// Applies `obj` unless the live object was applied from the same content.
/// Reads nothing when a watch cache holds the object, or when this process
/// applied the same content within [`RESYNC`]. Returns the live object (or
/// the desired one when it was not read).
async fn ensure<K>(
    api: &Api<K>,
    obj: K,
    kind: &'static str,
    ctx: &Context,
    live: Live<K>,
) -> Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let obj = desired::stamp(obj).map_err(|e| Error::Serialize(kind, e))?;
    let name = obj.name_any();
    let want = desired::applied_hash(&obj).map(str::to_string);
    let key = format!("{kind}/{name}");
    let live = match live {
        Live::Cached(live) => live,
        Live::Unwatched => {
            let recent = crate::index::lock(&ctx.index.writes.applied)
                .get(&key)
                .is_some_and(|(h, at)| {
                    want.as_deref() == Some(h.as_str()) && at.elapsed() < RESYNC
                });
            if recent {
                return Ok(obj);
            }
            api.get_opt(&name)
                .await
                .map_err(kube_err("get", kind, &name))?
        }
    };
    if let Some(live) = live
        && desired::applied_hash(&live) == want.as_deref()
    {
        remember(ctx, key, want);
        return Ok(live);
    }
    let pp = PatchParams::apply(OPERATOR_MANAGER).force();
    let applied = api
        .patch(&name, &pp, &Patch::Apply(&obj))
        .await
        .map_err(kube_err("apply", kind, &name))?;
    ctx.metrics.wrote(kind);
    info!(kind, %name, "applied");
    remember(ctx, key, want);
    Ok(applied)
}

fn remember(ctx: &Context, key: String, hash: Option<String>) {
    let mut applied = crate::index::lock(&ctx.index.writes.applied);
    match hash {
        Some(h) => {
            applied.insert(key, (h, std::time::Instant::now()));
        }
        None => {
            applied.remove(&key);
        }
    }
}

/// The cached live DaemonSet of `name` in the operator's namespace.
fn cached_daemonset(ctx: &Context, name: &str) -> Option<DaemonSet> {
    ctx.index
        .daemonset(&ctx.defaults.namespace, name)
        .map(|d| (*d).clone())
}

/// The agent pods of `policy`, from the watch cache (shared, not copied:
/// a fleet has one per node).
fn cached_agent_pods(ctx: &Context, policy: &str) -> Vec<Arc<AgentPod>> {
    ctx.index.agent_pods_of(policy)
}

/// A server-side apply of a policy carrying only the fields the operator
/// owns (its finalizer, or the status). The `DevicePluginPolicy` type itself
/// would send a `spec` (a required field), and the apply would make the
/// operator a co-owner of the user's spec.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct PolicyApply {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<devplug_api::DevicePluginPolicyStatus>,
}

impl PolicyApply {
    fn new(name: &str, mut metadata: ObjectMeta) -> Self {
        metadata.name = Some(name.to_string());
        Self {
            api_version: DevicePluginPolicy::api_version(&()).into_owned(),
            kind: DevicePluginPolicy::kind(&()).into_owned(),
            metadata,
            status: None,
        }
    }

    fn with_status(mut self, status: devplug_api::DevicePluginPolicyStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// The finalizer that keeps a deleted policy until nothing serves it.
pub const FINALIZER: &str = "devplug.io/cleanup";

/// Deletes an object; gone already is fine, any other error is an error.
async fn delete_if_present<K>(
    api: &Api<K>,
    name: &str,
    kind: &'static str,
    ctx: &Context,
) -> Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            ctx.metrics.wrote(kind);
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(kube_err("delete", kind, name)(e)),
    }
}

/// What still serves a deleted policy, in words; empty when nothing does.
async fn still_serving(p: &DevicePluginPolicy, ctx: &Context) -> Result<Vec<String>> {
    let name = p.name_any();
    let d = &ctx.defaults;
    let c = ctx.client.clone();
    let agent = desired::agent_name(&name);
    let mut left = Vec::new();
    // The agent objects: deleted here, not left to the garbage collector
    // (which never runs for them if the CRD goes first).
    if delete_if_present(
        &Api::<DaemonSet>::namespaced(c.clone(), &d.namespace),
        &agent,
        "DaemonSetDelete",
        ctx,
    )
    .await?
    {
        left.push(format!("DaemonSet {agent}"));
    }
    let running = cached_agent_pods(ctx, &name);
    if !running.is_empty() {
        left.push(format!("{} agent pod(s)", running.len()));
    }
    // Entries and labels go once no agent runs (the node controller's
    // work); the RBAC objects last, so a terminating agent can still write.
    let entries = ctx
        .index
        .nds
        .state()
        .iter()
        .filter(|n| {
            n.status
                .iter()
                .flat_map(|s| &s.resources)
                .any(|e| e.policy == name)
        })
        .count();
    if entries > 0 {
        left.push(format!("{entries} NodeDeviceStatus entr(ies)"));
    }
    let labelled = ctx
        .index
        .nodes_labelled(&devices::node_label_key(&name, "count"))
        .len();
    if labelled > 0 {
        left.push(format!("labels on {labelled} node(s)"));
    }
    // A DRA policy's slices and class, once no agent runs (an agent could
    // publish again); the kubelet would also drop the slices of a driver
    // that went away, but only after its grace period.
    if left.is_empty() && p.spec.kubelet_api == devplug_api::KubeletApi::Dra {
        let slices = delete_dra_objects(&name, ctx).await?;
        if slices > 0 {
            left.push(format!("{slices} ResourceSlice(s)"));
        }
    }
    if left.is_empty() {
        remember(ctx, format!("ServiceAccount/{agent}"), None);
        delete_if_present(
            &Api::<ServiceAccount>::namespaced(c, &d.namespace),
            &agent,
            "ServiceAccountDelete",
            ctx,
        )
        .await?;
        delete_agent_cluster_rbac(&agent, ctx).await?;
    }
    Ok(left)
}

/// Deletes a DRA policy's ResourceSlices (all of its driver's, in one
/// collection delete: no listing) and its DeviceClass; returns how many
/// slices were still there. A cluster without the DRA API has none.
async fn delete_dra_objects(policy: &str, ctx: &Context) -> Result<usize> {
    let c = ctx.client.clone();
    let driver = devplug_api::dra_driver_name(policy);
    let slices: Api<ResourceSlice> = Api::all(c.clone());
    let found = match slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().fields(&format!("spec.driver={driver}")),
        )
        .await
    {
        // A list of what was deleted, or a Status: deleted without saying
        // how many (the next look counts again).
        Ok(answer) => answer.left().map_or(0, |list| list.items.len()),
        Err(kube::Error::Api(s)) if s.code == 404 => 0,
        Err(e) => {
            return Err(kube_err("delete the slices of", "ResourceSlice", &driver)(
                e,
            ));
        }
    };
    if found > 0 {
        for _ in 0..found {
            ctx.metrics.wrote("ResourceSliceDelete");
        }
        info!(%driver, slices = found, "deleted the driver's ResourceSlices");
    }
    let class = devplug_api::dra_device_class_name(policy);
    remember(ctx, format!("DeviceClass/{class}"), None);
    delete_if_present(
        &Api::<DeviceClass>::all(c),
        &class,
        "DeviceClassDelete",
        ctx,
    )
    .await?;
    Ok(found)
}

/// Deletes an agent's ClusterRoleBinding and ClusterRole.
async fn delete_agent_cluster_rbac(agent: &str, ctx: &Context) -> Result<()> {
    for kind in ["ClusterRoleBinding", "ClusterRole"] {
        remember(ctx, format!("{kind}/{agent}"), None);
    }
    delete_if_present(
        &Api::<ClusterRoleBinding>::all(ctx.client.clone()),
        agent,
        "ClusterRoleBindingDelete",
        ctx,
    )
    .await?;
    delete_if_present(
        &Api::<ClusterRole>::all(ctx.client.clone()),
        agent,
        "ClusterRoleDelete",
        ctx,
    )
    .await?;
    Ok(())
}

/// Sets or clears this operator's finalizer (server-side apply of the
/// operator's own entry in the `finalizers` set).
async fn set_finalizer(p: &DevicePluginPolicy, on: bool, ctx: &Context) -> Result<()> {
    let name = p.name_any();
    let api: Api<DevicePluginPolicy> = Api::all(ctx.client.clone());
    let body = PolicyApply::new(
        &name,
        ObjectMeta {
            finalizers: Some(if on {
                vec![FINALIZER.into()]
            } else {
                Vec::new()
            }),
            ..ObjectMeta::default()
        },
    );
    api.patch(
        &name,
        &PatchParams::apply(OPERATOR_MANAGER),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err(
        if on {
            "add finalizer to"
        } else {
            "remove finalizer from"
        },
        "DevicePluginPolicy",
        &name,
    ))?;
    ctx.metrics.wrote("Finalizer");
    Ok(())
}

/// Removes the agent DaemonSet of a policy that must not have agents.
async fn remove_agents(ctx: &Context, name: &str) -> Result<bool> {
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.defaults.namespace);
    let ds = desired::agent_name(name);
    if cached_daemonset(ctx, &ds).is_none() {
        return Ok(false);
    }
    match api.delete(&ds, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
        Err(e) => return Err(kube_err("delete", "DaemonSet", &ds)(e)),
    }
    ctx.metrics.wrote("DaemonSetDelete");
    Ok(true)
}

async fn apply_agents(
    p: &DevicePluginPolicy,
    ctx: &Context,
) -> Result<(DaemonSet, Vec<Arc<AgentPod>>)> {
    let d = &ctx.defaults;
    let c = ctx.client.clone();
    ensure(
        &Api::<ServiceAccount>::namespaced(c.clone(), &d.namespace),
        desired::service_account(p, d),
        "ServiceAccount",
        ctx,
        Live::Unwatched,
    )
    .await?;
    ensure(
        &Api::<ClusterRole>::all(c.clone()),
        desired::cluster_role(p),
        "ClusterRole",
        ctx,
        Live::Unwatched,
    )
    .await?;
    ensure(
        &Api::<ClusterRoleBinding>::all(c.clone()),
        desired::cluster_role_binding(p, d),
        "ClusterRoleBinding",
        ctx,
        Live::Unwatched,
    )
    .await?;
    let class_api: Api<DeviceClass> = Api::all(c.clone());
    let class = devplug_api::dra_device_class_name(&p.name_any());
    if p.spec.kubelet_api == devplug_api::KubeletApi::Dra {
        ensure(
            &class_api,
            desired::device_class(p),
            "DeviceClass",
            ctx,
            Live::Unwatched,
        )
        .await?;
    }
    let live = cached_daemonset(ctx, &desired::agent_name(&p.name_any()));
    if p.spec.kubelet_api != devplug_api::KubeletApi::Dra
        && live.as_ref().is_some_and(desired::serves_dra)
    {
        // Switched back to the device plugin API: the class goes before
        // the agents change (the DaemonSet still says DRA until then, so a
        // failed delete is tried again).
        remember(ctx, format!("DeviceClass/{class}"), None);
        delete_if_present(&class_api, &class, "DeviceClassDelete", ctx).await?;
    }
    let ds = desired::daemonset(p, d).map_err(|e| Error::Serialize("DaemonSet", e))?;
    let ds = ensure(
        &Api::<DaemonSet>::namespaced(c.clone(), &d.namespace),
        ds,
        "DaemonSet",
        ctx,
        Live::Cached(live),
    )
    .await?;
    Ok((ds, cached_agent_pods(ctx, &p.name_any())))
}

/// While the DaemonSet has fewer pods than nodes to run on, the message of
/// its latest `FailedCreate` event (Pod Security, quota, a webhook), with
/// what to do where known; from the index's Event watch.
fn create_failure(ds: &DaemonSet, ctx: &Context) -> Option<String> {
    let st = ds.status.as_ref()?;
    if st.current_number_scheduled >= st.desired_number_scheduled {
        return None;
    }
    let name = ds.metadata.name.clone()?;
    let latest = ctx
        .index
        .failed_creates
        .state()
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name.as_str())
                && e.involved_object.kind.as_deref() == Some("DaemonSet")
                && e.reason.as_deref() == Some("FailedCreate")
        })
        .max_by_key(|e| {
            e.last_timestamp
                .as_ref()
                .map(|t| t.0)
                .or_else(|| e.event_time.as_ref().map(|t| t.0))
        })?;
    let msg = latest.message.clone().unwrap_or_default();
    Some(status::create_failure_message(
        &name,
        &ctx.defaults.namespace,
        &msg,
    ))
}

/// Writes the status when it differs from the current one.
async fn write_status(
    p: &DevicePluginPolicy,
    new: &devplug_api::DevicePluginPolicyStatus,
    ctx: &Context,
) -> Result<bool> {
    if p.status.as_ref() == Some(new) {
        return Ok(false);
    }
    let api: Api<DevicePluginPolicy> = Api::all(ctx.client.clone());
    let name = p.name_any();
    let body = PolicyApply::new(&name, ObjectMeta::default()).with_status(new.clone());
    api.patch_status(
        &name,
        &PatchParams::apply(OPERATOR_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err("apply status of", "DevicePluginPolicy", &name))?;
    ctx.metrics.wrote("Status");
    ctx.wrote_status(p, new);
    Ok(true)
}

/// One Event per condition that changed status.
async fn publish_transitions(
    p: &DevicePluginPolicy,
    old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    new: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ctx: &Context,
) {
    for c in new {
        let before = conditions::get(old, &c.type_).map(|o| o.status.as_str());
        if before == Some(c.status.as_str()) || (before.is_none() && c.status == "False") {
            continue;
        }
        let bad = match c.type_.as_str() {
            types::READY => c.status != "True",
            types::DEGRADED | types::CONFLICT => c.status == "True",
            _ => false,
        };
        if c.type_ == types::PROGRESSING {
            continue; // rollouts are visible in the status; no event spam
        }
        let note = if c.message.is_empty() {
            format!("{} is {}", c.type_, c.status)
        } else {
            format!("{} is {}: {}", c.type_, c.status, c.message)
        };
        let ev = Event {
            type_: if bad {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.clone(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match ctx.recorder.publish(&ev, &p.object_ref(&())).await {
            Ok(()) => ctx.metrics.wrote("Event"),
            Err(e) => warn!(policy = %p.name_any(), error = %e, "cannot publish event"),
        }
    }
}

/// Most device Events per reconcile; the rest are summed up in one more.
pub const MAX_DEVICE_EVENTS: usize = 5;

/// The device Events between two complete unhealthy sets: `DeviceUnhealthy`
/// for each device that entered, `DeviceRecovered` for each that left.
pub fn device_transitions(
    old: &UnhealthySet,
    new: &UnhealthySet,
) -> Vec<(EventType, &'static str, String)> {
    let mut notes: Vec<(EventType, &str, String)> = Vec::new();
    for d in new
        .iter()
        .filter(|(k, _)| !old.contains_key(*k))
        .map(|(_, d)| d)
    {
        let mut note = format!("device {} on node {} is {}", d.device, d.node, d.health);
        if let Some(r) = &d.reason {
            note.push_str(&format!(": {r}"));
        }
        if !d.pods.is_empty() {
            note.push_str(&format!("; affected pods: {}", d.pods.join(", ")));
        }
        notes.push((EventType::Warning, "DeviceUnhealthy", note));
    }
    for d in old
        .iter()
        .filter(|(k, _)| !new.contains_key(*k))
        .map(|(_, d)| d)
    {
        notes.push((
            EventType::Normal,
            "DeviceRecovered",
            format!(
                "device {} on node {} is no longer reported unhealthy",
                d.device, d.node
            ),
        ));
    }
    notes
}

/// One Event per device that turned unhealthy or recovered, at most
/// [`MAX_DEVICE_EVENTS`] per reconcile plus one that counts the rest.
async fn publish_device_transitions(
    p: &DevicePluginPolicy,
    old: &UnhealthySet,
    new: &UnhealthySet,
    ctx: &Context,
) {
    let mut notes = device_transitions(old, new);
    let extra = notes.len().saturating_sub(MAX_DEVICE_EVENTS);
    notes.truncate(MAX_DEVICE_EVENTS);
    if extra > 0 {
        notes.push((
            EventType::Warning,
            "DeviceTransitions",
            format!("{extra} more device health transitions; see status.unhealthyDevices"),
        ));
    }
    for (type_, reason, note) in notes {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "ObserveDevices".into(),
            secondary: None,
        };
        match ctx.recorder.publish(&ev, &p.object_ref(&())).await {
            Ok(()) => ctx.metrics.wrote("Event"),
            Err(e) => warn!(policy = %p.name_any(), error = %e, "cannot publish event"),
        }
    }
}

/// Reconciles one policy.
pub async fn reconcile(p: Arc<DevicePluginPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let name = p.name_any();
    // Conflicts and device counts are judged from the stores: never before
    // they hold the whole cluster.
    if !ctx.index.ready() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if ctx.uninstalling.load(std::sync::atomic::Ordering::SeqCst) {
        return uninstall(&p, &ctx).await;
    }
    let ours = p.finalizers().iter().any(|f| f == FINALIZER);
    if p.metadata.deletion_timestamp.is_some() {
        ctx.forget(&name);
        ctx.metrics.forget_policy(&name);
        if !ours {
            return Ok(Action::await_change());
        }
        // Released only when no node serves it any more, so that
        // `kubectl delete dpp X --wait` means "gone everywhere".
        let left = still_serving(&p, &ctx).await?;
        if left.is_empty() {
            set_finalizer(&p, false, &ctx).await?;
            info!(policy = %name, "cleaned up; released the policy");
            return Ok(Action::await_change());
        }
        debug!(policy = %name, left = %left.join(", "), "waiting for cleanup");
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if !ours {
        set_finalizer(&p, true, &ctx).await?;
    }
    let mut seen = Observed::default();
    let result: Result<()> = async {
        // What agents serve is the spec the operator approved
        // (status.approvedSpec). An edit it refuses leaves the last
        // approved spec serving everywhere, as a Deployment keeps its pods
        // when a new template fails; only a policy never approved gets no
        // agents.
        let p = match desired::refusal(&p, &ctx.defaults) {
            None => {
                seen.approved = Some(
                    serde_json::to_value(&p.spec).map_err(|e| Error::Serialize("the approved spec", e))?,
                );
                p.clone()
            }
            Some(why) => {
                seen.invalid = Some(why);
                let last = p
                    .approved()
                    .ok()
                    .filter(|a| desired::refusal(a, &ctx.defaults).is_none());
                match last {
                    Some(a) => {
                        seen.serving_approved =
                            p.status.as_ref().and_then(|s| s.approved_generation);
                        Arc::new(a)
                    }
                    None => {
                        remove_agents(&ctx, &name).await?;
                        return Ok(());
                    }
                }
            }
        };
        let all = ctx.index.policies.state();
        if let Some(winner) = conflict::older_claimant(&p, all.iter().map(|a| a.as_ref()), &ctx.defaults) {
            seen.conflict_with = Some(conflict::describe_winner(&p, winner));
            if remove_agents(&ctx, &name).await? {
                info!(policy = %name, winner = %winner.name_any(), "removed agents of a conflicting policy");
            }
            return Ok(());
        }
        let (ds, pods) = apply_agents(&p, &ctx).await?;
        seen.create_failure = create_failure(&ds, &ctx);
        seen.pod_problems = status::pod_problems(&pods);
        seen.daemonset = Some(ds);
        let all = ctx.index.nds.state();
        seen.devices = Some(ctx.index.shares.aggregate(&p, all.iter().map(|n| n.as_ref())));
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        seen.apply_error = Some(e.to_string());
    }

    // Judged against the status as last known, so that a stale copy of the
    // policy (our own write not yet seen) neither repeats the write nor the
    // transition Events.
    let known = ctx.known_status(&p);
    let p_known = if known != p.status {
        let mut q = (*p).clone();
        q.status = known;
        Arc::new(q)
    } else {
        p.clone()
    };
    let p = p_known;
    let new = status::compute(&p, &seen, Timestamp::now());
    ctx.metrics.policy_status(&name, &new);
    let old_conditions = p
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status_result = write_status(&p, &new, &ctx).await;
    if matches!(status_result, Ok(true)) {
        publish_transitions(&p, &old_conditions, &new.conditions, &ctx).await;
    }
    if let Some(agg) = &seen.devices
        && let Some(old) = ctx.swap_unhealthy(&name, agg.all_unhealthy.clone())
        && old != agg.all_unhealthy
    {
        publish_device_transitions(&p, &old, &agg.all_unhealthy, &ctx).await;
    }
    ctx.metrics.reconciled(start.elapsed());
    result?;
    status_result?;
    ctx.clear_failures(&name);
    debug!(policy = %name, took = ?start.elapsed(), "reconciled");

    let settled = conditions::is_true(&new.conditions, types::READY)
        && !conditions::is_true(&new.conditions, types::DEGRADED);
    Ok(Action::requeue(if settled { RESYNC } else { RECHECK }))
}

/// The release namespace is being deleted (an uninstall that takes the
/// operator away before the policies): the namespace's deletion removes the
/// agents, but not what lives outside it, and no operator will be left to
/// serve the finalizer. So, most urgent first, while this process still
/// has its identity: release the policy (deleting it never hangs), then
/// remove its node labels, ResourceSlices, DeviceClass and agent
/// ClusterRole and binding. The policy itself stays, as configuration a
/// new install serves again. Repeated while the process lives: an agent
/// not yet stopped may publish its slices again (the kubelet also wipes a
/// driver's slices once it is gone).
pub async fn uninstall(p: &DevicePluginPolicy, ctx: &Context) -> Result<Action> {
    let name = p.name_any();
    ctx.forget(&name);
    if p.finalizers().iter().any(|f| f == FINALIZER) {
        set_finalizer(p, false, ctx).await?;
        info!(policy = %name, "release namespace deleted: released the policy");
    }
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(ctx.client.clone());
    let labelled = ctx
        .index
        .nodes_labelled(&devices::node_label_key(&name, "count"));
    let keys: serde_json::Map<String, serde_json::Value> = ["count", "sharing", "replicas"]
        .iter()
        .map(|w| (devices::node_label_key(&name, w), serde_json::Value::Null))
        .collect();
    let patch = serde_json::json!({"metadata": {"labels": keys}});
    for node in labelled {
        match nodes
            .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err("patch", "Node", &node)(e)),
        }
    }
    delete_dra_objects(&name, ctx).await?;
    delete_agent_cluster_rbac(&desired::agent_name(&name), ctx).await?;
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// Requeues a failed policy with per-policy exponential backoff.
pub fn error_policy(p: Arc<DevicePluginPolicy>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.record_failure(&p.name_any());
    let wait = backoff(n);
    ctx.metrics.failed(err.metric_label());
    warn!(policy = %p.name_any(), error = %err, attempt = n, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_five_minutes_with_jitter() {
        for (n, step) in [(1u32, 2u64), (2, 4), (3, 8), (8, 256), (9, 300), (40, 300)] {
            let d = backoff(n);
            let step = Duration::from_secs(step);
            assert!(d >= step && d < step * 2, "failure {n}: {d:?}");
        }
        let a: Vec<Duration> = (0..8).map(|_| backoff(3)).collect();
        assert!(a.iter().any(|d| *d != a[0]), "jitter: {a:?}");
    }
}
