//! The operator's integration tests run against the real kube-apiserver of
//! `devplug-testenv` (one per test binary, the chart's RBAC and admission
//! policies applied). The operator's client acts as the chart's
//! ServiceAccount and goes through a [`Recorder`], so tests can say which
//! requests a reconcile made and inject the failures a real server does not
//! produce on demand; setup and checks use an admin client.
//!
//! Every test names what it creates with [`unique`]: the tests of a binary
//! share one API server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use devplug_api::DevicePluginPolicy;
use devplug_testenv::{Recorder, env};
use http::Method;
use kube::Client;
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

pub use devplug_testenv::{Call, unique};

/// The real API server, as the tests see it.
#[derive(Clone)]
pub struct TestApi {
    pub admin: Client,
    pub rec: Recorder,
}

/// The operator's client (the chart's ServiceAccount, recorded) and the
/// test's handle on the server.
pub async fn start() -> (Client, TestApi) {
    let env = env();
    let (client, rec) = env.operator_recorded().await;
    (
        client,
        TestApi {
            admin: env.admin(),
            rec,
        },
    )
}

fn request(method: Method, path: &str, body: Option<&Value>) -> http::Request<Vec<u8>> {
    let mut b = http::Request::builder().method(method).uri(path);
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    b.body(
        body.map(|v| serde_json::to_vec(v).unwrap())
            .unwrap_or_default(),
    )
    .unwrap()
}

/// `/a/b/c/name` → (`/a/b/c`, `name`).
fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap()
}

impl TestApi {
    /// Creates the object at `path`, or replaces it (spec and metadata
    /// as given, and its status when given: through the status
    /// subresource, as a controller writes it).
    pub async fn put(&self, path: &str, mut obj: Value) {
        let status = obj.as_object_mut().unwrap().remove("status");
        let current = self.get(path).await;
        let stored: Value = match &current {
            None => {
                let meta = obj["metadata"].as_object_mut().unwrap();
                meta.remove("resourceVersion");
                meta.remove("uid");
                meta.remove("creationTimestamp");
                let (collection, _) = split(path);
                self.send(Method::POST, collection, Some(&obj)).await
            }
            Some(cur) => {
                obj["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                obj["metadata"]["uid"] = cur["metadata"]["uid"].clone();
                self.send(Method::PUT, path, Some(&obj)).await
            }
        };
        if let Some(status) = status {
            let mut with = stored;
            with["status"] = status;
            self.send(Method::PUT, &format!("{path}/status"), Some(&with))
                .await;
        }
    }

    /// Applies `patch` (a JSON merge patch) to the object's status.
    pub async fn patch_status(&self, path: &str, patch: Value) {
        let req = http::Request::builder()
            .method(Method::PATCH)
            .uri(format!("{path}/status"))
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::to_vec(&patch).unwrap())
            .unwrap();
        self.admin
            .request::<Value>(req)
            .await
            .unwrap_or_else(|e| panic!("PATCH {path}/status: {e}"));
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let what = format!("{method} {path}");
        self.admin
            .request::<Value>(request(method, path, body))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// The object at a path.
    pub async fn get(&self, path: &str) -> Option<Value> {
        devplug_testenv::get_json(&self.admin, path).await
    }

    /// Deletes an object (the test's doing, not recorded), at once.
    pub async fn delete_object(&self, path: &str) {
        let req = request(
            Method::DELETE,
            path,
            Some(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})),
        );
        match self.admin.request::<Value>(req).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => panic!("DELETE {path}: {e}"),
        }
    }

    /// The objects of a collection (every test's: filter by name).
    pub async fn objects_under(&self, collection: &str) -> Vec<Value> {
        let list = self.send(Method::GET, collection, None).await;
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Every request the operator's client made.
    pub fn log(&self) -> Vec<Call> {
        self.rec.log()
    }

    /// Requests that change something.
    pub fn writes(&self) -> Vec<Call> {
        self.rec.writes()
    }

    pub fn clear_log(&self) {
        self.rec.clear()
    }

    /// From now on, matching requests of the operator fail with `code`.
    pub fn fail(&self, method: Method, path: &str, code: u16) {
        self.rec.fail(method, path, code)
    }

    pub fn heal(&self) {
        self.rec.heal()
    }

    /// The operator's requests the API server refused (403).
    pub fn denied(&self) -> Vec<String> {
        self.rec
            .denied()
            .iter()
            .map(|c| format!("{} {}?{}", c.method, c.path, c.query))
            .collect()
    }
}

pub mod paths {
    pub const NS: &str = devplug_testenv::RELEASE_NS;
    pub fn policy(name: &str) -> String {
        format!("/apis/devplug.io/v1alpha1/devicepluginpolicies/{name}")
    }
    pub fn daemonset(policy: &str) -> String {
        format!("/apis/apps/v1/namespaces/{NS}/daemonsets/devplug-agent-{policy}")
    }
    pub fn service_account(policy: &str) -> String {
        format!("/api/v1/namespaces/{NS}/serviceaccounts/devplug-agent-{policy}")
    }
    pub fn cluster_role(policy: &str) -> String {
        format!("/apis/rbac.authorization.k8s.io/v1/clusterroles/devplug-agent-{policy}")
    }
    pub fn cluster_role_binding(policy: &str) -> String {
        format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/devplug-agent-{policy}")
    }
    pub fn pod(name: &str) -> String {
        format!("/api/v1/namespaces/{NS}/pods/{name}")
    }
    pub fn node(name: &str) -> String {
        format!("/api/v1/nodes/{name}")
    }
    pub fn nds(name: &str) -> String {
        format!("/apis/devplug.io/v1alpha1/nodedevicestatuses/{name}")
    }
    pub fn device_class(name: &str) -> String {
        format!("/apis/resource.k8s.io/v1/deviceclasses/{name}")
    }
    pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
    pub const NODES: &str = "/api/v1/nodes";
    pub const NDS: &str = "/apis/devplug.io/v1alpha1/nodedevicestatuses";
    /// The agent DaemonSets and pods, as collections.
    pub const DAEMONSETS: &str = "/apis/apps/v1/namespaces/devplug-system/daemonsets";
    pub const PODS: &str = "/api/v1/namespaces/devplug-system/pods";
    /// Core events in the operator's namespace (the DaemonSet controller's).
    pub const CORE_EVENTS: &str = "/api/v1/namespaces/devplug-system/events";
}

/// A policy to create.
pub fn policy_json(name: &str, resource: &str, extra_spec: Value) -> Value {
    let mut spec = json!({"resourceName": resource, "source": {"simulated": {"count": 2}}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "devplug.io/v1alpha1",
        "kind": "DevicePluginPolicy",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Creates the policies on the server, in order, each at least a second
/// younger than the one before (creation timestamps have whole seconds,
/// and the older of two conflicting policies wins), and returns a store
/// holding them as the server has them.
pub async fn seed(
    api: &TestApi,
    policies: &[Value],
) -> (Store<DevicePluginPolicy>, Writer<DevicePluginPolicy>) {
    let mut typed: Vec<DevicePluginPolicy> = Vec::new();
    for p in policies {
        if let Some(prev) = typed.last() {
            younger_than(prev).await;
        }
        let name = p["metadata"]["name"].as_str().unwrap();
        api.put(&paths::policy(name), p.clone()).await;
        typed.push(current(api, name).await);
    }
    synced(typed)
}

/// Waits (for the clock, with a deadline) until an object created now
/// would be younger than `p`.
async fn younger_than(p: &DevicePluginPolicy) {
    let created = p.metadata.creation_timestamp.as_ref().unwrap().0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while jiff_now_secs() <= created.as_second() {
        assert!(Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn jiff_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A store that has listed `objs` (a watcher's Init, InitApply…, InitDone),
/// so `wait_until_ready` returns, and its writer for later events.
pub fn synced<K>(objs: Vec<K>) -> (Store<K>, Writer<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut w = Writer::default();
    w.apply_watcher_event(&watcher::Event::Init);
    for o in objs {
        w.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    w.apply_watcher_event(&watcher::Event::InitDone);
    (w.as_reader(), w)
}

/// Relists `collection` from the server into a store, as a watch does.
pub async fn mirror<K>(api: &TestApi, collection: &str, w: &Mutex<Writer<K>>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let objs = api.objects_under(collection).await;
    let mut w = w.lock().unwrap();
    w.apply_watcher_event(&watcher::Event::Init);
    for o in objs {
        w.apply_watcher_event(&watcher::Event::InitApply(
            serde_json::from_value(o).unwrap(),
        ));
    }
    w.apply_watcher_event(&watcher::Event::InitDone);
}

/// The typed policy as the server has it now.
pub async fn current(api: &TestApi, name: &str) -> DevicePluginPolicy {
    serde_json::from_value(api.get(&paths::policy(name)).await.unwrap()).unwrap()
}

/// Events (events.k8s.io, namespace default) about the policy `name`.
pub async fn policy_events(api: &TestApi, name: &str) -> Vec<Value> {
    api.objects_under(paths::EVENTS)
        .await
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .collect()
}
