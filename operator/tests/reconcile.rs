//! Reconcile scenarios against the real API server (devplug-testenv), the
//! operator acting as the chart's ServiceAccount.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use devplug_api::conditions::{self, types};
use devplug_operator::agent_pod::AgentPod;
use devplug_operator::controller::{self, Context};
use devplug_operator::desired::AgentDefaults;
use devplug_operator::metrics::Metrics;
use devplug_operator::view::NodeView;
use http::Method;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::json;
use support::{TestApi, current, paths, policy_json, seed, unique};

fn defaults() -> AgentDefaults {
    AgentDefaults {
        namespace: paths::NS.into(),
        image: "devplug-agent:test".into(),
        kubelet_root: "/var/lib/kubelet".into(),
        device_plugin_dir: "/var/lib/kubelet/device-plugins".into(),
        // The chart's default allow-list.
        allowed_host_paths: Some(vec!["/dev:ro".parse().unwrap(), "/sys:ro".parse().unwrap()]),
        ..Default::default()
    }
}

/// The operator's context, with the DaemonSet and agent-pod caches that its
/// watches keep; [`reconcile`] brings them up to the API server's state
/// first, as the watches would have.
struct TestCtx {
    ctx: Arc<Context>,
    daemonsets: std::sync::Mutex<Writer<DaemonSet>>,
    pods: std::sync::Mutex<Writer<AgentPod>>,
    events: std::sync::Mutex<Writer<k8s_openapi::api::core::v1::Event>>,
    nodes:
        std::sync::Mutex<Writer<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Node>>>,
}

impl std::ops::Deref for TestCtx {
    type Target = Arc<Context>;
    fn deref(&self) -> &Arc<Context> {
        &self.ctx
    }
}

fn ctx(client: kube::Client, store: Store<devplug_api::DevicePluginPolicy>) -> TestCtx {
    ctx_with(client, store, support::synced(Vec::new()).0)
}

fn ctx_with(
    client: kube::Client,
    store: Store<devplug_api::DevicePluginPolicy>,
    nds: Store<NodeView>,
) -> TestCtx {
    let (ds_store, ds_writer) = support::synced(Vec::<DaemonSet>::new());
    let (pod_store, pod_writer) = support::synced(Vec::<AgentPod>::new());
    let (event_store, event_writer) = support::synced(Vec::new());
    let (node_store, node_writer) = support::synced(Vec::new());
    TestCtx {
        ctx: Arc::new(Context::new(
            client,
            defaults(),
            devplug_operator::index::Index::new(
                store,
                ds_store,
                pod_store,
                nds,
                node_store,
                event_store,
                devplug_operator::synced::Synced::all(),
            ),
            Arc::new(Metrics::default()),
        )),
        daemonsets: std::sync::Mutex::new(ds_writer),
        pods: std::sync::Mutex::new(pod_writer),
        events: std::sync::Mutex::new(event_writer),
        nodes: std::sync::Mutex::new(node_writer),
    }
}

async fn reconcile(api: &TestApi, ctx: &TestCtx, name: &str) -> Result<(), String> {
    support::mirror(api, paths::DAEMONSETS, &ctx.daemonsets).await;
    support::mirror(api, paths::PODS, &ctx.pods).await;
    ctx.ctx.index.regroup_agent_pods();
    support::mirror(api, paths::CORE_EVENTS, &ctx.events).await;
    support::mirror(api, paths::NODES, &ctx.nodes).await;
    controller::reconcile(Arc::new(current(api, name).await), ctx.ctx.clone())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// LIST requests the operator made: reconciles read the index, never a
/// collection.
fn lists(api: &TestApi) -> Vec<String> {
    api.log()
        .iter()
        .filter(|c| c.method == http::Method::GET)
        .filter(|c| {
            let segs: Vec<&str> = c.path.trim_matches('/').split('/').collect();
            let rest = match segs.first() {
                Some(&"api") => segs.get(2..),
                Some(&"apis") => segs.get(3..),
                _ => None,
            }
            .unwrap_or_default();
            rest.len() == 1 || (rest.len() == 3 && rest[0] == "namespaces")
        })
        .map(|c| format!("{}?{}", c.path, c.query))
        .collect()
}

fn write_paths(api: &TestApi) -> Vec<String> {
    api.writes()
        .iter()
        .map(|c| format!("{} {}", c.method, c.path))
        .collect()
}

async fn condition(api: &TestApi, name: &str, type_: &str) -> (String, String, String) {
    let p = current(api, name).await;
    let c = conditions::get(&p.status.as_ref().unwrap().conditions, type_)
        .unwrap()
        .clone();
    (c.status, c.reason, c.message)
}

async fn set_ds_status(api: &TestApi, policy: &str, desired: i32, ready: i32, updated: i32) {
    let path = paths::daemonset(policy);
    let mut ds = api.get(&path).await.unwrap();
    let generation = ds["metadata"]["generation"].clone();
    ds["status"] = json!({"desiredNumberScheduled": desired, "numberReady": ready, "updatedNumberScheduled": updated,
                          "currentNumberScheduled": desired, "numberMisscheduled": 0, "observedGeneration": generation});
    api.put(&path, ds).await;
}

#[tokio::test]
async fn first_reconcile_applies_agent_objects_and_the_second_writes_nothing() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(
        write_paths(&api),
        vec![
            // The cleanup finalizer, then the agent objects.
            format!("PATCH {}", paths::policy(foo)),
            format!("PATCH {}", paths::service_account(foo)),
            format!("PATCH {}", paths::cluster_role(foo)),
            format!("PATCH {}", paths::cluster_role_binding(foo)),
            format!("PATCH {}", paths::daemonset(foo)),
            format!("PATCH {}/status", paths::policy(foo)),
        ]
    );
    assert_eq!(
        ctx.metrics.total_writes(),
        6,
        "the write counter counts what was written"
    );
    for w in api.writes() {
        assert!(w.query.contains("fieldManager=devplug-operator"), "{w:?}");
        // The finalizer is a set entry of its own: applied without force,
        // so it never takes another manager's finalizers.
        let finalizer = w.path == paths::policy(foo);
        assert_eq!(w.query.contains("force=true"), !finalizer, "{w:?}");
    }
    let ds = api.get(&paths::daemonset(foo)).await.unwrap();
    assert_eq!(
        ds["metadata"]["ownerReferences"][0]["uid"].as_str(),
        current(&api, foo).await.metadata.uid.as_deref()
    );
    assert_eq!(ds["metadata"]["ownerReferences"][0]["controller"], true);
    let cr = api.get(&paths::cluster_role(foo)).await.unwrap();
    assert_eq!(cr["rules"][0]["resourceNames"], json!([foo]));
    let st = current(&api, foo).await.status.unwrap();
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.nodes_ready.as_deref(), Some("0/0"));

    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(
        api.writes().is_empty(),
        "second reconcile wrote: {:?}",
        write_paths(&api)
    );
    // Nor read: the DaemonSet and the pods come from the watch caches, and
    // what no watch reports back was applied with this content moments ago.
    // (Before, each reconcile read 4 objects and listed the agent pods; a
    // fleet's NodeDeviceStatus events made that continuous.)
    assert!(
        api.log().is_empty(),
        "a settled reconcile touched the API server: {:?}",
        api.log()
            .iter()
            .map(|c| format!("{} {}", c.method, c.path))
            .collect::<Vec<_>>()
    );
    // Someone deletes the DaemonSet: the watch reports it, the next
    // reconcile applies it again.
    api.delete_object(&paths::daemonset(foo)).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(
        api.get(&paths::daemonset(foo)).await.is_some(),
        "DaemonSet not restored"
    );
}

#[tokio::test]
async fn a_stale_copy_of_the_policy_repeats_neither_the_status_nor_its_events() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let mut ctx = ctx(client, store);
    // Own writes trusted only while the index holds the very version they
    // were computed from, so the foreign change below is repaired at once
    // (by default they are also trusted for TRUST_OWN_WRITE).
    let inner = Arc::try_unwrap(ctx.ctx).ok().unwrap();
    ctx.ctx = Arc::new(inner.trusting_own_writes_for(Duration::ZERO));
    reconcile(&api, &ctx, foo).await.unwrap();
    set_ds_status(&api, foo, 2, 2, 2).await;
    support::mirror(&api, paths::DAEMONSETS, &ctx.daemonsets).await;
    let stale = Arc::new(current(&api, foo).await);
    api.clear_log();
    controller::reconcile(stale.clone(), ctx.ctx.clone())
        .await
        .unwrap();
    let first = write_paths(&api);
    assert!(
        first.contains(&format!("PATCH {}/status", paths::policy(foo))),
        "{first:?}"
    );
    // Triggered again before the watch delivered that write: the index
    // still holds the same version of the policy. Nothing new to say.
    api.clear_log();
    controller::reconcile(stale.clone(), ctx.ctx.clone())
        .await
        .unwrap();
    assert!(
        api.writes().is_empty(),
        "rewrote from a stale copy: {:?}",
        write_paths(&api)
    );
    // The write arrives: still nothing to do.
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(api.writes().is_empty(), "{:?}", write_paths(&api));
    // Someone else changes the status: the new version is judged afresh
    // and the operator's status restored.
    let mut p = current(&api, foo).await;
    p.status.as_mut().unwrap().nodes_ready = Some("9/9".into());
    p.metadata.resource_version = Some("someone-else".into());
    api.put(&paths::policy(foo), serde_json::to_value(&p).unwrap())
        .await;
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(
        current(&api, foo)
            .await
            .status
            .unwrap()
            .nodes_ready
            .as_deref(),
        Some("2/2")
    );
}

#[tokio::test]
async fn status_follows_the_daemonset_and_transitions_make_events() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();

    set_ds_status(&api, foo, 3, 1, 2).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(condition(&api, foo, types::READY).await.1, "AgentsNotReady");
    assert_eq!(
        condition(&api, foo, types::PROGRESSING).await,
        (
            "True".into(),
            "RollingOut".into(),
            "2/3 nodes run the current agent".into()
        )
    );
    assert_eq!(
        current(&api, foo)
            .await
            .status
            .unwrap()
            .nodes_ready
            .as_deref(),
        Some("1/3")
    );

    set_ds_status(&api, foo, 3, 3, 3).await;
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(condition(&api, foo, types::READY).await.0, "True");
    assert_eq!(condition(&api, foo, types::PROGRESSING).await.0, "False");
    let evs = support::policy_events(&api, foo).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["reason"], "AgentsReady");
    assert_eq!(evs[0]["type"], "Normal");
    assert_eq!(evs[0]["regarding"]["name"], foo);

    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(api.writes().is_empty(), "{:?}", write_paths(&api));
}

#[tokio::test]
async fn crashing_or_unschedulable_agents_degrade_the_policy() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    set_ds_status(&api, foo, 2, 0, 2).await;
    let agent_name = unique("agent-a");
    let agent = agent_name.as_str();
    let labels = json!({"app.kubernetes.io/name": "devplug-agent", "devplug.io/policy": foo});
    api.put(&paths::pod(agent), json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": agent, "namespace": paths::NS, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "agent", "image": "devplug-agent:test"}]},
        "status": {"containerStatuses": [{"name": "agent", "ready": false, "restartCount": 5, "image": "x", "imageID": "",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
    })).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    let (st, reason, msg) = condition(&api, foo, types::DEGRADED).await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "AgentsFailing"));
    assert!(
        msg.contains(&format!("{agent} on node-1: CrashLoopBackOff")),
        "{msg}"
    );
    let evs = support::policy_events(&api, foo).await;
    assert!(
        evs.iter()
            .any(|e| e["reason"] == "AgentsFailing" && e["type"] == "Warning"),
        "{evs:?}"
    );
}

/// Seen on a namespace enforcing `baseline`: the DaemonSet creates no pods
/// and the policy said only AgentsNotReady. Now the DaemonSet controller's
/// FailedCreate message is in Degraded, with the fix.
#[tokio::test]
async fn agents_the_daemonset_cannot_create_degrade_the_policy_with_the_reason() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    // One node, no pod: the DaemonSet controller was refused.
    let path = paths::daemonset(foo);
    let mut ds = api.get(&path).await.unwrap();
    let ds_name = ds["metadata"]["name"].as_str().unwrap().to_string();
    ds["status"] = json!({"desiredNumberScheduled": 1, "currentNumberScheduled": 0, "numberReady": 0,
                          "numberMisscheduled": 0, "observedGeneration": ds["metadata"]["generation"].clone()});
    api.put(&path, ds).await;
    let ev = |name: &str, obj: &str, reason: &str, msg: &str, at: &str| {
        json!({"apiVersion": "v1", "kind": "Event",
               "metadata": {"name": name, "namespace": paths::NS},
               "involvedObject": {"kind": "DaemonSet", "name": obj, "namespace": paths::NS},
               "reason": reason, "message": msg, "lastTimestamp": at, "type": "Warning"})
    };
    api.put(
        &format!("{}/e1", paths::CORE_EVENTS),
        ev(
            "e1",
            &ds_name,
            "FailedCreate",
            "Error creating: pods \"x\" is forbidden: old",
            "2026-11-30T00:00:00Z",
        ),
    )
    .await;
    api.put(&format!("{}/e2", paths::CORE_EVENTS), ev("e2", &ds_name, "FailedCreate",
        "Error creating: pods \"x\" is forbidden: violates PodSecurity \"baseline:latest\": hostPath volumes", "2026-11-30T00:01:00Z")).await;
    api.put(
        &format!("{}/e3", paths::CORE_EVENTS),
        ev(
            "e3",
            "other",
            "FailedCreate",
            "not ours",
            "2026-11-30T00:02:00Z",
        ),
    )
    .await;
    reconcile(&api, &ctx, foo).await.unwrap();
    let (st, reason, msg) = condition(&api, foo, types::DEGRADED).await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "AgentsNotCreated"));
    assert!(
        msg.contains("violates PodSecurity"),
        "the latest event: {msg}"
    );
    assert!(
        msg.contains("pod-security.kubernetes.io/enforce=privileged"),
        "the fix: {msg}"
    );
    assert!(
        api.denied().is_empty(),
        "under the chart's RBAC: {:?}",
        api.denied()
    );

    // Pods created: the condition clears.
    set_ds_status(&api, foo, 1, 1, 1).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    let (st, _, _) = condition(&api, foo, types::DEGRADED).await;
    assert_eq!(st, "False");
}

#[tokio::test]
async fn the_newer_of_two_conflicting_policies_gets_no_agents() {
    let old_name = unique("old");
    let old = old_name.as_str();
    let new_name = unique("new");
    let new = new_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(
        &api,
        &[
            policy_json(old, "example.com/gpu", json!({})),
            policy_json(
                new,
                "example.com/gpu",
                json!({"nodeSelector": {"gpu": "yes"}}),
            ),
        ],
    )
    .await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, old).await.unwrap();
    // The newer one had agents from before the older one existed.
    api.put(
        &paths::daemonset(new),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": format!("devplug-agent-{new}"), "namespace": paths::NS},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": {"app": "agent"}},
                              "spec": {"containers": [{"name": "agent", "image": "devplug-agent:old"}]}}}}),
    ).await;
    api.clear_log();
    reconcile(&api, &ctx, new).await.unwrap();
    assert_eq!(
        write_paths(&api)
            .iter()
            .filter(|w| !w.contains("/events"))
            .cloned()
            .collect::<Vec<_>>(),
        vec![
            format!("PATCH {}", paths::policy(new)),
            format!("DELETE {}", paths::daemonset(new)),
            format!("PATCH {}/status", paths::policy(new))
        ]
    );
    assert!(api.get(&paths::daemonset(new)).await.is_none());
    assert!(
        api.get(&paths::daemonset(old)).await.is_some(),
        "the older keeps its agents"
    );
    let (st, reason, msg) = condition(&api, new, types::CONFLICT).await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "ResourceClaimed"));
    assert!(msg.contains(&format!("older policy {old}")), "{msg}");
    assert_eq!(condition(&api, old, types::CONFLICT).await.0, "False");
    let evs = support::policy_events(&api, new).await;
    assert!(
        evs.iter()
            .any(|e| e["reason"] == "ResourceClaimed" && e["type"] == "Warning")
    );

    api.clear_log();
    reconcile(&api, &ctx, new).await.unwrap();
    assert!(api.writes().is_empty(), "{:?}", write_paths(&api));
}

#[tokio::test]
async fn api_errors_back_off_and_show_in_a_condition() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    api.fail(Method::PATCH, "/daemonsets/", 500);
    let err = reconcile(&api, &ctx, foo).await.unwrap_err();
    assert!(err.contains("apply DaemonSet devplug-agent-foo"), "{err}");
    let (st, reason, msg) = condition(&api, foo, types::DEGRADED).await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "ApplyFailed"));
    assert!(msg.contains("injected failure"), "{msg}");

    let p = Arc::new(current(&api, foo).await);
    let e = controller::reconcile(p.clone(), ctx.clone())
        .await
        .unwrap_err();
    let a1 = controller::error_policy(p.clone(), &e, ctx.clone());
    let a2 = controller::error_policy(p.clone(), &e, ctx.clone());
    // 2 s doubling, each plus up to as much again at random (jitter).
    let (d1, d2) = (requeue_secs(&a1), requeue_secs(&a2));
    assert!((2.0..4.0).contains(&d1), "{a1:?}");
    assert!((4.0..8.0).contains(&d2), "{a2:?}");
    assert!(
        ctx.metrics
            .render()
            .contains("devplug_operator_reconcile_errors_total{error=\"apply\"} 2")
    );

    api.heal();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(condition(&api, foo, types::DEGRADED).await.0, "False");
    let a3 = controller::error_policy(p, &e, ctx.clone());
    assert!(
        (2.0..4.0).contains(&requeue_secs(&a3)),
        "success resets the backoff: {a3:?}"
    );
}

/// The requeue delay of an Action, in seconds (kube keeps the field private;
/// its Debug form shows it, e.g. `Some(2.53s)`).
fn requeue_secs(a: &kube::runtime::controller::Action) -> f64 {
    let text = format!("{a:?}");
    let inner = text
        .split("Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no requeue in {text}"));
    if let Some(ms) = inner.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else {
        inner.trim_end_matches('s').parse::<f64>().unwrap()
    }
}

#[tokio::test]
async fn a_policy_being_deleted_is_left_to_the_garbage_collector() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    // Someone else's finalizer holds the deleted policy; ours is not on it.
    let mut p = policy_json(foo, "example.com/foo", json!({}));
    p["metadata"]["finalizers"] = json!(["example.com/hold"]);
    seed(&api, &[p]).await;
    api.delete_object(&paths::policy(foo)).await;
    let deleted = current(&api, foo).await;
    assert!(deleted.metadata.deletion_timestamp.is_some());
    let (store, _w) = support::synced(vec![deleted]);
    let ctx = ctx(client, store);
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(api.log().is_empty(), "{:?}", api.log());
}

#[tokio::test]
async fn only_pod_relevant_changes_roll_the_daemonset() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    let hash = async |api: &TestApi| {
        api.get(&paths::daemonset(foo)).await.unwrap()["spec"]["template"]["metadata"]["annotations"]["devplug.io/pod-config-hash"]
            .clone()
    };
    let h0 = hash(&api).await;

    // Allocation settings reach the agents through their watch: no rollout.
    let mut p = api.get(&paths::policy(foo)).await.unwrap();
    p["spec"]["allocate"] = json!({"env": {"MODE": "fast"}});
    p["metadata"]["generation"] = json!(2);
    api.put(&paths::policy(foo), p.clone()).await;
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(
        write_paths(&api),
        vec![format!("PATCH {}/status", paths::policy(foo))]
    );
    assert_eq!(hash(&api).await, h0);
    assert_eq!(
        current(&api, foo).await.status.unwrap().observed_generation,
        Some(2)
    );

    // A new image needs new pods.
    // (The chart's own agent image: the only one its admission policy
    // allows by default.)
    p["spec"]["agent"] = json!({"image": "ghcr.io/devplug/devplug-agent:0.1.0"});
    p["metadata"]["generation"] = json!(3);
    api.put(&paths::policy(foo), p).await;
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(write_paths(&api).contains(&format!("PATCH {}", paths::daemonset(foo))));
    assert_ne!(hash(&api).await, h0);
}

#[tokio::test]
async fn an_invalid_spec_that_got_past_admission_gets_no_agents() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    // The API server refuses it at admission (the CRD's CEL rules)...
    let bad = policy_json(foo, "kubernetes.io/foo", json!({}));
    let refused = api
        .admin
        .request::<serde_json::Value>(
            http::Request::post("/apis/devplug.io/v1alpha1/devicepluginpolicies")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&bad).unwrap())
                .unwrap(),
        )
        .await;
    match refused {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("spec.resourceName"), "{s:?}"),
        other => panic!("the API server took kubernetes.io/foo: {other:?}"),
    }
    // ...but a policy stored before the rule existed (an older CRD) can
    // still reach the operator: the watch delivers it as stored.
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    let mut p = current(&api, foo).await;
    p.spec.resource_name = "kubernetes.io/foo".into();
    controller::reconcile(Arc::new(p), ctx.ctx.clone())
        .await
        .unwrap();
    assert!(api.get(&paths::daemonset(foo)).await.is_none());
    let (st, reason, msg) = condition(&api, foo, types::DEGRADED).await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(msg.contains("spec.resourceName"), "{msg}");
}

fn nds(node: &str, entries: serde_json::Value) -> NodeView {
    serde_json::from_value(json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": node}, "spec": {"nodeName": node},
        "status": {"resources": entries},
    }))
    .unwrap()
}

fn gpu_entry(policy: &str, devices: serde_json::Value) -> serde_json::Value {
    json!([{"resourceName": "example.com/foo", "policy": policy, "state": "Serving",
            "healthy": 0, "total": 0, "allocated": 0, "devices": devices}])
}

#[tokio::test]
async fn device_health_from_every_node_lands_in_the_policy_status() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let (_, mut w) = support::synced(Vec::new());
    let healthy = |id: &str| json!({"id": id, "health": "Healthy"});
    w.apply_watcher_event(&watcher::Event::Apply(nds(
        "n1",
        gpu_entry(foo, json!([healthy("a"), healthy("b")])),
    )));
    w.apply_watcher_event(&watcher::Event::Apply(nds(
        "n2",
        gpu_entry(foo, json!([healthy("a")])),
    )));
    let ctx = ctx_with(client, store, w.as_reader());
    reconcile(&api, &ctx, foo).await.unwrap();
    set_ds_status(&api, foo, 2, 2, 2).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    let st = current(&api, foo).await.status.unwrap();
    assert_eq!((st.devices.total, st.devices.healthy), (3, 3));
    assert_eq!(st.devices_healthy.as_deref(), Some("3/3"));
    assert_eq!(
        condition(&api, foo, types::DEGRADED).await.1,
        "AgentsHealthy"
    );

    // A device breaks under a running pod on n1.
    w.apply_watcher_event(&watcher::Event::Apply(nds(
        "n1",
        gpu_entry(
            foo,
            json!([healthy("a"), {"id": "b", "health": "Unhealthy", "reason": "XID 79",
            "allocations": [{"namespace": "ml", "pod": "trainer", "container": "main"}]}]),
        ),
    )));
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    let st = current(&api, foo).await.status.unwrap();
    assert_eq!(
        (
            st.devices.total,
            st.devices.healthy,
            st.devices.unhealthy,
            st.devices.allocated
        ),
        (3, 2, 1, 1)
    );
    assert_eq!(st.unhealthy_devices.len(), 1);
    assert_eq!(st.unhealthy_devices[0].pods, vec!["ml/trainer"]);
    let (s, reason, msg) = condition(&api, foo, types::DEGRADED).await;
    assert_eq!((s.as_str(), reason.as_str()), ("True", "DevicesUnhealthy"));
    assert!(
        msg.contains("n1/b Unhealthy (XID 79), affects ml/trainer"),
        "{msg}"
    );
    let evs = support::policy_events(&api, foo).await;
    let ev = evs
        .iter()
        .find(|e| e["reason"] == "DeviceUnhealthy")
        .expect("device event");
    assert_eq!(ev["type"], "Warning");
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("device b on node n1 is Unhealthy: XID 79; affected pods: ml/trainer")
    );

    // Nothing changed: nothing written, no event repeated.
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(api.writes().is_empty(), "{:?}", write_paths(&api));

    // Recovery.
    w.apply_watcher_event(&watcher::Event::Apply(nds(
        "n1",
        gpu_entry(foo, json!([healthy("a"), healthy("b")])),
    )));
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(condition(&api, foo, types::DEGRADED).await.0, "False");
    assert!(
        support::policy_events(&api, foo)
            .await
            .iter()
            .any(|e| e["reason"] == "DeviceRecovered")
    );
}

/// `kubectl delete dpp X --wait` returns when nothing serves X any more: the
/// finalizer stays until the DaemonSet, the agent pods, the NodeDeviceStatus
/// entries and the node labels are gone, then the RBAC objects go and the
/// finalizer is released. Nothing is left to the garbage collector, which
/// never runs for them if the CRD is deleted first.
#[tokio::test]
async fn a_deleted_policy_is_released_only_when_nothing_serves_it() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, mut w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    assert_eq!(
        api.get(&paths::policy(foo)).await.unwrap()["metadata"]["finalizers"],
        json!(["devplug.io/cleanup"])
    );
    // An agent pod still runs; then it is deleted.
    let pod = format!("devplug-agent-{foo}-x");
    api.put(
        &paths::pod(&pod),
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": paths::NS,
            "labels": {"app.kubernetes.io/name": "devplug-agent", "devplug.io/policy": foo}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "agent", "image": "devplug-agent:test"}]}}),
    ).await;
    // Deleted: the finalizer keeps it, with a deletion timestamp.
    api.delete_object(&paths::policy(foo)).await;
    let p = current(&api, foo).await;
    assert!(p.metadata.deletion_timestamp.is_some());
    w.apply_watcher_event(&kube::runtime::watcher::Event::Apply(p));
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(
        api.get(&paths::daemonset(foo)).await.is_none(),
        "DaemonSet deleted at once"
    );
    assert!(
        api.get(&paths::service_account(foo)).await.is_some(),
        "RBAC kept while an agent may still write"
    );
    assert_eq!(
        api.get(&paths::policy(foo)).await.unwrap()["metadata"]["finalizers"],
        json!(["devplug.io/cleanup"]),
        "held while an agent pod runs"
    );
    api.delete_object(&paths::pod(&pod)).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    assert!(api.get(&paths::service_account(foo)).await.is_none());
    assert!(api.get(&paths::cluster_role(foo)).await.is_none());
    assert!(api.get(&paths::cluster_role_binding(foo)).await.is_none());
    assert!(
        api.get(&paths::policy(foo)).await.is_none(),
        "released: the API server removed the policy with its last finalizer"
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    assert!(
        lists(&api).is_empty(),
        "a deletion is followed from the index: {:?}",
        lists(&api)
    );
}

/// Found on the real cluster: a live policy edited into one the operator
/// refuses lost its DaemonSet, so every pod on every node lost service.
/// Now the refused edit leaves the last approved spec serving (the
/// DaemonSet untouched, `status.approvedSpec` unchanged) and the policy says
/// why, naming the field, until the spec is fixed.
#[tokio::test]
async fn a_refused_edit_keeps_the_last_approved_spec_serving() {
    let foo_name = unique("foo");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(&api, &[policy_json(foo, "example.com/foo", json!({}))]).await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    let ds0 = api.get(&paths::daemonset(foo)).await.unwrap();
    let first = current(&api, foo).await;
    let st = first.status.clone().unwrap();
    assert_eq!(
        st.approved_spec,
        Some(serde_json::to_value(&first.spec).unwrap())
    );
    assert_eq!(st.approved_generation, first.metadata.generation);

    // Past admission, refused by the operator: the host's /etc read-write
    // in every workload (found on the real cluster).
    let mut p = api.get(&paths::policy(foo)).await.unwrap();
    p["spec"]["allocate"] = json!({"mounts": [{"hostPath": "/etc", "containerPath": "/host-etc"}]});
    api.put(&paths::policy(foo), p).await;
    api.clear_log();
    reconcile(&api, &ctx, foo).await.unwrap();
    // Only the status and the transition's Event: no DaemonSet change or
    // deletion.
    let writes: Vec<String> = write_paths(&api)
        .into_iter()
        .filter(|w| !w.contains("/events"))
        .collect();
    assert_eq!(
        writes,
        vec![format!("PATCH {}/status", paths::policy(foo))],
        "only the status is written"
    );
    let ds1 = api.get(&paths::daemonset(foo)).await.unwrap();
    assert_eq!(ds1["metadata"]["uid"], ds0["metadata"]["uid"]);
    assert_eq!(ds1["spec"]["template"], ds0["spec"]["template"]);
    let now = current(&api, foo).await;
    let st = now.status.clone().unwrap();
    assert_eq!(
        st.approved_spec,
        Some(serde_json::to_value(&first.spec).unwrap())
    );
    assert_eq!(st.approved_generation, first.metadata.generation);
    let (s, reason, msg) = condition(&api, foo, types::READY).await;
    assert_eq!((s.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(
        msg.contains("spec.allocate.mounts[0].hostPath") && msg.contains("/etc"),
        "{msg}"
    );
    assert!(msg.contains("keeps serving"), "{msg}");

    // Fixed: approved and served again.
    let mut p = api.get(&paths::policy(foo)).await.unwrap();
    p["spec"]["allocate"] =
        json!({"mounts": [{"hostPath": "/dev/null", "containerPath": "/x", "readOnly": true}]});
    api.put(&paths::policy(foo), p).await;
    reconcile(&api, &ctx, foo).await.unwrap();
    let fixed = current(&api, foo).await;
    let st = fixed.status.clone().unwrap();
    assert_eq!(
        st.approved_spec,
        Some(serde_json::to_value(&fixed.spec).unwrap())
    );
    let (_, reason, _) = condition(&api, foo, types::READY).await;
    assert_ne!(reason, "InvalidSpec");
}

/// The release namespace deleted before the policies (an uninstall in that
/// order): the operator releases each policy first, so deleting it never
/// hangs on a finalizer nobody serves, and removes what the namespace's
/// deletion does not take: node labels, ResourceSlices, the DeviceClass,
/// the agent's ClusterRole and binding. The policy stays, as configuration.
#[tokio::test]
async fn uninstalling_releases_each_policy_and_removes_what_lives_outside_the_namespace() {
    let foo_name = unique("gone");
    let foo = foo_name.as_str();
    let (client, api) = support::start().await;
    let (store, _w) = seed(
        &api,
        &[policy_json(
            foo,
            "example.com/gone",
            json!({"kubeletApi": "DRA"}),
        )],
    )
    .await;
    let ctx = ctx(client, store);
    reconcile(&api, &ctx, foo).await.unwrap();
    // A second pass: the finalizer is on, the children applied.
    reconcile(&api, &ctx, foo).await.unwrap();
    let class = devplug_api::dra_device_class_name(foo);
    let driver = devplug_api::dra_driver_name(foo);
    assert!(api.get(&paths::device_class(&class)).await.is_some());
    assert!(api.get(&paths::cluster_role(foo)).await.is_some());
    assert!(
        current(&api, foo)
            .await
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&controller::FINALIZER.to_string())
    );
    // What agents and the node controller made meanwhile.
    let node = unique("gone-node");
    devplug_testenv::env().ensure_node(&node).await.unwrap();
    let label = devplug_operator::devices::node_label_key(foo, "count");
    api.admin
        .request::<serde_json::Value>(
            http::Request::patch(paths::node(&node))
                .header("content-type", "application/merge-patch+json")
                .body(serde_json::to_vec(&json!({"metadata": {"labels": {&label: "2"}}})).unwrap())
                .unwrap(),
        )
        .await
        .unwrap();
    let slice = format!("{node}-{driver}");
    api.put(
        &format!("/apis/resource.k8s.io/v1/resourceslices/{slice}"),
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
               "metadata": {"name": slice},
               "spec": {"driver": driver, "nodeName": node,
                        "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                        "devices": [{"name": "d0"}]}}),
    )
    .await;

    ctx.uninstalling
        .store(true, std::sync::atomic::Ordering::SeqCst);
    reconcile(&api, &ctx, foo).await.unwrap();
    let p = current(&api, foo).await;
    assert!(
        !p.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&controller::FINALIZER.to_string()),
        "released"
    );
    assert!(p.metadata.deletion_timestamp.is_none(), "the policy stays");
    assert!(api.get(&paths::device_class(&class)).await.is_none());
    assert!(api.get(&paths::cluster_role(foo)).await.is_none());
    assert!(api.get(&paths::cluster_role_binding(foo)).await.is_none());
    assert!(
        api.get(&format!("/apis/resource.k8s.io/v1/resourceslices/{slice}"))
            .await
            .is_none()
    );
    let n = api.get(&paths::node(&node)).await.unwrap();
    assert!(
        n["metadata"]["labels"][&label].is_null(),
        "{}",
        n["metadata"]["labels"]
    );
    assert!(
        lists(&api).is_empty(),
        "labelled nodes come from the index, slices go in one collection delete: {:?}",
        lists(&api)
    );
}
