//! A fake API server for reconcile tests and the benchmark: kube's client
//! over a `tower-test` mock service, answered by an in-memory object store
//! with real Kubernetes JSON. Every request is logged, so tests can assert
//! exactly which writes a reconcile made.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devplug_api::DevicePluginPolicy;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
}

impl Call {
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    log: Vec<Call>,
    /// (method, path substring, status code): answer matching requests with an error.
    fail: Vec<(Method, String, u16)>,
    next_uid: u64,
    rv: u64,
    /// (object path, resourceName) → field manager that applied that
    /// `status.resources[]` entry, to emulate list-map ownership.
    entry_owner: BTreeMap<(String, String), String>,
    /// (object path, top-level status field) → the field manager that
    /// applied it: a later apply by that manager without the field removes
    /// it, as server-side apply does.
    status_owner: BTreeMap<(String, String), String>,
    /// The RBAC rules requests are checked against (None: allow all).
    rbac: Option<rbac::Rules>,
    /// Messages of every refused request.
    denied: Vec<String>,
    /// Some: watch requests are held open and never answered, as a real
    /// watch with nothing to report (see `hold_watches`). None: a watch is
    /// answered with a listing, which the client's watcher takes for a
    /// failed watch and lists again after its backoff.
    held_watches: Option<Vec<tower_test::mock::SendResponse<Response<Body>>>>,
}

/// Deep merge of JSON objects (arrays and scalars are replaced), as an
/// apply of a partial object behaves for fields it sets.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The fake API server.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|kv| match kv.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
            // A bare key: the label exists.
            None => obj["metadata"]["labels"].get(kv).is_some(),
        })
}

/// `a.b=c,d=e` field selectors over the object's JSON (equality only).
fn fields_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|kv| match kv.split_once('=') {
            Some((k, v)) => {
                let ptr = format!("/{}", k.replace('.', "/"));
                obj.pointer(&ptr).and_then(Value::as_str) == Some(v)
            }
            None => false,
        })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
                .replace("%2E", ".")
        })
    })
}

/// Collection path → object kind, for list responses.
fn list_kind(path: &str) -> &'static str {
    if path.ends_with("/pods") {
        "PodList"
    } else {
        "List"
    }
}

impl FakeApi {
    /// A client talking to a new fake server that enforces the chart's RBAC
    /// for the operator, as a real API server would.
    pub fn start() -> (Client, FakeApi) {
        let (client, api) = Self::start_unchecked();
        api.enforce_chart_rbac();
        (client, api)
    }

    /// A fake server that allows every request (the benchmark, which must
    /// not need helm).
    pub fn start_unchecked() -> (Client, FakeApi) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi {
            state: Arc::default(),
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                if let Some(send) = server.hold_if_watch(&req, send) {
                    let resp = server.serve(req).await;
                    send.send_response(resp);
                }
            }
        });
        (Client::new(svc, "default"), api)
    }

    async fn serve(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let mut st = self.state.lock().unwrap();
        st.log.push(Call {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
        });
        if let Some((_, _, code)) = st
            .fail
            .iter()
            .find(|(m, p, _)| *m == method && path.contains(p.as_str()))
        {
            let code = *code;
            return respond(code, &status(code, "InternalError", "injected failure"));
        }
        // RBAC, as the real API server enforces it for the operator's
        // service account: the chart's rules, and an apply of an object
        // that does not exist yet needs `create` too.
        if let Some(rbac) = &st.rbac {
            let exists = st.objects.contains_key(path.trim_end_matches("/status"));
            let watch = query.contains("watch=true") || query.contains("watch=1");
            if let Err(msg) = rbac::authorize(rbac, &method, &path, watch, &content_type, exists) {
                st.denied.push(msg.clone());
                return respond(403, &status(403, "Forbidden", &msg));
            }
        }
        st.rv += 1;
        let rv = st.rv.to_string();
        match method {
            Method::GET => {
                if let Some(obj) = st.objects.get(&path) {
                    return respond(200, obj);
                }
                // A collection: list what lies directly under it.
                let prefix = format!("{path}/");
                let selector = query_param(&query, "labelSelector").unwrap_or_default();
                let fields = query_param(&query, "fieldSelector").unwrap_or_default();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .filter(|(_, v)| labels_match(v, &selector))
                    .filter(|(_, v)| fields_match(v, &fields))
                    .map(|(_, v)| v.clone())
                    .collect();
                if items.is_empty() && !is_collection(&path) {
                    return respond(404, &status(404, "NotFound", &format!("{path} not found")));
                }
                respond(
                    200,
                    &json!({"kind": list_kind(&path), "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            Method::PATCH if content_type.starts_with("application/json-patch") => {
                let obj_path = path.trim_end_matches("/status").to_string();
                let Some(obj) = st.objects.get(&obj_path).cloned() else {
                    return respond(404, &status(404, "NotFound", "no such object"));
                };
                let mut doc = obj.clone();
                for op in body.as_array().cloned().unwrap_or_default() {
                    let ptr = op["path"].as_str().unwrap_or("");
                    match op["op"].as_str() {
                        Some("test") => {
                            if doc.pointer(ptr) != Some(&op["value"]) {
                                return respond(
                                    422,
                                    &status(422, "Invalid", &format!("test failed at {ptr}")),
                                );
                            }
                        }
                        Some("remove") => {
                            let (parent, last) = ptr.rsplit_once('/').unwrap();
                            let Some(target) = doc.pointer_mut(parent) else {
                                return respond(422, &status(422, "Invalid", "no such path"));
                            };
                            match target {
                                Value::Array(a) => {
                                    let i: usize = last.parse().unwrap();
                                    if i >= a.len() {
                                        return respond(422, &status(422, "Invalid", "index"));
                                    }
                                    let removed = a.remove(i);
                                    if let Some(rn) = removed["resourceName"].as_str() {
                                        st.entry_owner.remove(&(obj_path.clone(), rn.to_string()));
                                    }
                                }
                                Value::Object(m) => {
                                    m.remove(last);
                                }
                                _ => {
                                    return respond(
                                        422,
                                        &status(422, "Invalid", "not a container"),
                                    );
                                }
                            }
                        }
                        other => panic!("the fake does not know JSON patch op {other:?}"),
                    }
                }
                doc["metadata"]["resourceVersion"] = json!(rv);
                st.objects.insert(obj_path, doc.clone());
                respond(200, &doc)
            }
            Method::PATCH if path.ends_with("/status") => {
                let obj_path = path.trim_end_matches("/status").to_string();
                if !st.objects.contains_key(&obj_path) {
                    return respond(404, &status(404, "NotFound", "no such object"));
                }
                let manager = query_param(&query, "fieldManager").unwrap_or_default();
                let mut new_status = body["status"].clone();
                // status.resources is a list-map keyed by resourceName: an
                // apply replaces only the entries its manager owns.
                if let Some(entries) = new_status
                    .get("resources")
                    .and_then(Value::as_array)
                    .cloned()
                {
                    let old: Vec<Value> = st.objects[&obj_path]["status"]["resources"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let mut merged: Vec<Value> = old
                        .into_iter()
                        .filter(|e| {
                            let key = (
                                obj_path.clone(),
                                e["resourceName"].as_str().unwrap_or("").to_string(),
                            );
                            st.entry_owner.get(&key) != Some(&manager)
                                && !entries
                                    .iter()
                                    .any(|n| n["resourceName"] == e["resourceName"])
                        })
                        .collect();
                    for e in &entries {
                        let key = (
                            obj_path.clone(),
                            e["resourceName"].as_str().unwrap_or("").to_string(),
                        );
                        st.entry_owner.insert(key, manager.clone());
                        merged.push(e.clone());
                    }
                    new_status["resources"] = Value::Array(merged);
                }
                let dropped: Vec<String> = st
                    .status_owner
                    .iter()
                    .filter(|((p, k), m)| {
                        *p == obj_path && **m == manager && new_status.get(k.as_str()).is_none()
                    })
                    .map(|((_, k), _)| k.clone())
                    .collect();
                if let Some(fields) = new_status.as_object() {
                    for k in fields.keys().filter(|k| *k != "resources") {
                        st.status_owner
                            .insert((obj_path.clone(), k.clone()), manager.clone());
                    }
                }
                let obj = st.objects.get_mut(&obj_path).unwrap();
                if obj.get("status").is_none_or(Value::is_null) {
                    obj["status"] = json!({});
                }
                if let Some(old) = obj["status"].as_object_mut() {
                    for k in &dropped {
                        old.remove(k);
                    }
                }
                merge(&mut obj["status"], &new_status);
                if let Some(r) = new_status.get("resources") {
                    obj["status"]["resources"] = r.clone();
                }
                obj["metadata"]["resourceVersion"] = json!(rv);
                respond(200, obj)
            }
            Method::PATCH => {
                st.next_uid += 1;
                let uid = format!("uid-{}", st.next_uid);
                let old = st.objects.get(&path).cloned();
                let mut new = match &old {
                    // Nodes: the operator applies the full set of its labels.
                    Some(o) if path.starts_with("/api/v1/nodes/") => {
                        let mut o = o.clone();
                        if let Some(labels) = o["metadata"]["labels"].as_object_mut() {
                            labels.retain(|k, _| !k.starts_with("devplug.io/"));
                        }
                        merge(&mut o, &body);
                        o
                    }
                    // Objects several managers apply to: a partial apply
                    // (finalizers, owner references) keeps the rest.
                    Some(o)
                        if path.contains("/nodedevicestatuses/")
                            || path.contains("/devicepluginpolicies/") =>
                    {
                        let mut o = o.clone();
                        merge(&mut o, &body);
                        o
                    }
                    _ => body.clone(),
                };
                let new_spec = new.get("spec").cloned();
                let meta = &mut new["metadata"];
                meta["resourceVersion"] = json!(rv);
                match &old {
                    Some(o) => {
                        meta["uid"] = o["metadata"]["uid"].clone();
                        meta["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
                        let generation = o["metadata"]["generation"].as_i64().unwrap_or(1);
                        let changed = o.get("spec") != new_spec.as_ref();
                        meta["generation"] =
                            json!(if changed { generation + 1 } else { generation });
                        if body.get("status").is_none() && o.get("status").is_some() {
                            new["status"] = o["status"].clone();
                        }
                    }
                    None => {
                        meta["uid"] = json!(uid);
                        meta["creationTimestamp"] = json!("2026-11-22T00:00:00Z");
                        meta["generation"] = json!(1);
                    }
                }
                st.objects.insert(path, new.clone());
                respond(if old.is_some() { 200 } else { 201 }, &new)
            }
            Method::PUT => {
                let Some(old) = st.objects.get(&path) else {
                    return respond(404, &status(404, "NotFound", "no such object"));
                };
                if body["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                    return respond(
                        409,
                        &status(409, "Conflict", "the object has been modified"),
                    );
                }
                let mut new = body.clone();
                new["metadata"]["resourceVersion"] = json!(rv);
                st.objects.insert(path, new.clone());
                respond(200, &new)
            }
            Method::POST => {
                st.next_uid += 1;
                let mut new = body.clone();
                let name = new["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!(
                            "{}{}",
                            new["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                            st.next_uid
                        )
                    });
                new["metadata"]["name"] = json!(name);
                new["metadata"]["resourceVersion"] = json!(rv);
                new["metadata"]["uid"] = json!(format!("uid-{}", st.next_uid));
                let key = format!("{path}/{name}");
                if st.objects.contains_key(&key) {
                    return respond(409, &status(409, "AlreadyExists", "exists"));
                }
                st.objects.insert(key, new.clone());
                respond(201, &new)
            }
            Method::DELETE => match st.objects.remove(&path) {
                Some(_) => respond(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                ),
                None => respond(404, &status(404, "NotFound", "no such object")),
            },
            _ => respond(405, &status(405, "MethodNotAllowed", "unsupported")),
        }
    }

    /// Checks every later request against the operator's RBAC as the chart
    /// renders it (`helm template`), the way the real API server does.
    pub fn enforce_chart_rbac(&self) {
        self.state.lock().unwrap().rbac = Some(rbac::chart_rules());
    }

    /// Messages of the requests RBAC refused.
    pub fn denied(&self) -> Vec<String> {
        self.state.lock().unwrap().denied.clone()
    }

    /// Puts an object at its API path.
    pub fn put(&self, path: &str, obj: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), obj);
    }

    /// The object at a path.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Removes an object without logging a request (the test's doing).
    pub fn delete_object(&self, path: &str) {
        self.state.lock().unwrap().objects.remove(path);
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Call> {
        self.state.lock().unwrap().log.clone()
    }

    /// Requests that change something.
    pub fn writes(&self) -> Vec<Call> {
        self.log().into_iter().filter(Call::is_write).collect()
    }

    /// Forgets the request log.
    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Makes requests with this method and path substring fail with `code`.
    pub fn fail(&self, method: Method, path: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .fail
            .push((method, path.to_string(), code));
    }

    /// From now on a watch request the RBAC rules allow is logged and held
    /// open without an answer, as a real watch with nothing to report: a
    /// client lists once and then sees no change it is not told about.
    pub fn hold_watches(&self) {
        self.state.lock().unwrap().held_watches = Some(Vec::new());
    }

    /// Holds `send` instead of answering when `req` is a watch and watches
    /// are held; gives it back otherwise.
    fn hold_if_watch(
        &self,
        req: &Request<Body>,
        send: tower_test::mock::SendResponse<Response<Body>>,
    ) -> Option<tower_test::mock::SendResponse<Response<Body>>> {
        let query = req.uri().query().unwrap_or("").to_string();
        let path = req.uri().path().to_string();
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let (Some(held), true) = (
            st.held_watches.as_mut(),
            query.contains("watch=true") || query.contains("watch=1"),
        ) else {
            return Some(send);
        };
        if let Some(rbac) = &st.rbac
            && rbac::authorize(rbac, req.method(), &path, true, "", false).is_err()
        {
            return Some(send); // refused by `serve`, as any request
        }
        st.log.push(Call {
            method: req.method().clone(),
            path,
            query,
        });
        held.push(send);
        None
    }

    /// Stops injecting failures.
    pub fn heal(&self) {
        self.state.lock().unwrap().fail.clear();
    }

    /// Objects stored directly under a collection path.
    pub fn objects_under(&self, collection: &str) -> Vec<Value> {
        let prefix = format!("{collection}/");
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Number of objects stored.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().objects.len()
    }
}

/// Collections this fake serves even when empty (the CRDs are installed;
/// a test simulates a missing CRD by injecting a 404).
fn is_collection(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or("");
    matches!(
        last,
        "pods"
            | "events"
            | "daemonsets"
            | "leases"
            | "nodes"
            | "devicepluginpolicies"
            | "nodedevicestatuses"
    )
}

/// API paths of what the operator manages.
pub mod paths {
    pub const NS: &str = "devplug-system";
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
    pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
    /// The agent DaemonSets and pods, as collections.
    pub const DAEMONSETS: &str = "/apis/apps/v1/namespaces/devplug-system/daemonsets";
    pub const PODS: &str = "/api/v1/namespaces/devplug-system/pods";
    /// Core events in the operator's namespace (the DaemonSet controller's).
    pub const CORE_EVENTS: &str = "/api/v1/namespaces/devplug-system/events";
}

/// A policy as the API server would hold it.
pub fn policy_json(name: &str, resource: &str, created: &str, extra_spec: Value) -> Value {
    let mut spec = json!({"resourceName": resource, "source": {"simulated": {"count": 2}}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "devplug.io/v1alpha1",
        "kind": "DevicePluginPolicy",
        "metadata": {"name": name, "uid": format!("policy-uid-{name}"), "generation": 1,
                     "resourceVersion": "1", "creationTimestamp": created},
        "spec": spec,
    })
}

/// Stores the policies in the fake server and in a reflector store.
pub fn seed(
    api: &FakeApi,
    policies: &[Value],
) -> (Store<DevicePluginPolicy>, Writer<DevicePluginPolicy>) {
    let mut typed = Vec::new();
    for p in policies {
        let name = p["metadata"]["name"].as_str().unwrap();
        api.put(&paths::policy(name), p.clone());
        typed.push(serde_json::from_value(p.clone()).unwrap());
    }
    synced(typed)
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

/// Relists `collection` of the fake server into a store, as a watch does.
pub fn mirror<K>(api: &FakeApi, collection: &str, w: &Mutex<Writer<K>>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut w = w.lock().unwrap();
    w.apply_watcher_event(&watcher::Event::Init);
    for o in api.objects_under(collection) {
        w.apply_watcher_event(&watcher::Event::InitApply(
            serde_json::from_value(o).unwrap(),
        ));
    }
    w.apply_watcher_event(&watcher::Event::InitDone);
}

/// The typed policy as currently stored by the fake server.
pub fn current(api: &FakeApi, name: &str) -> DevicePluginPolicy {
    serde_json::from_value(api.get(&paths::policy(name)).unwrap()).unwrap()
}

/// The operator's RBAC rules as the chart renders them, and the API
/// server's authorization of a request against them.
pub mod rbac {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use http::Method;
    use serde_json::Value;

    /// (namespace the rule applies in, or None for cluster-wide; the rule).
    pub type Rules = Vec<(Option<String>, Value)>;

    fn helm() -> PathBuf {
        if let Ok(p) = std::env::var("DEVPLUG_HELM") {
            return PathBuf::from(p);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let local = root.join(".tools/bin/helm");
        assert!(
            local.exists(),
            "helm not found: run `make tools` (installs it into .tools/bin) or set DEVPLUG_HELM"
        );
        local
    }

    /// The rules of the operator's ClusterRole and Role, from `helm template`.
    pub fn chart_rules() -> Rules {
        static RULES: OnceLock<Rules> = OnceLock::new();
        RULES
            .get_or_init(|| {
                let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/devplug");
                let out = std::process::Command::new(helm())
                    .args(["template", "devplug"])
                    .arg(&chart)
                    .args(["--namespace", "devplug-system"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8(out.stdout).unwrap();
                let mut rules = Vec::new();
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let v: Value = match serde::Deserialize::deserialize(doc) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    let kind = v["kind"].as_str().unwrap_or("");
                    if v["metadata"]["name"] != "devplug-operator" {
                        continue;
                    }
                    let ns = match kind {
                        "ClusterRole" => None,
                        "Role" => Some(v["metadata"]["namespace"].as_str().unwrap().to_string()),
                        _ => continue,
                    };
                    for r in v["rules"].as_array().cloned().unwrap_or_default() {
                        rules.push((ns.clone(), r));
                    }
                }
                assert!(!rules.is_empty(), "the chart renders no operator rules");
                rules
            })
            .clone()
    }

    /// (group, namespace, resource[/subresource], name) of an API path.
    pub fn parse(path: &str) -> (String, Option<String>, String, Option<String>) {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.first() {
            Some(&"api") => (String::new(), &parts[2..]),
            _ => (parts[1].to_string(), &parts[3..]),
        };
        let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
            (Some(rest[1].to_string()), &rest[2..])
        } else {
            (None, rest)
        };
        let resource = match rest.get(2) {
            Some(sub) => format!("{}/{sub}", rest[0]),
            None => rest[0].to_string(),
        };
        (group, ns, resource, rest.get(1).map(|s| s.to_string()))
    }

    fn allows(rules: &Rules, ns: Option<&str>, group: &str, resource: &str, verb: &str) -> bool {
        rules.iter().any(|(rns, r)| {
            let has = |field: &str, want: &str| {
                r[field]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == want || x == "*"))
            };
            (rns.is_none() || rns.as_deref() == ns)
                && has("apiGroups", group)
                && has("resources", resource)
                && has("verbs", verb)
        })
    }

    /// The verbs a request needs, then whether the rules allow each.
    pub fn authorize(
        rules: &Rules,
        method: &Method,
        path: &str,
        watch: bool,
        content_type: &str,
        exists: bool,
    ) -> Result<(), String> {
        let (group, ns, resource, name) = parse(path);
        let mut verbs = vec![match *method {
            Method::GET if name.is_none() => {
                if watch {
                    "watch"
                } else {
                    "list"
                }
            }
            Method::GET => "get",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "unknown",
        }];
        if *method == Method::PATCH
            && content_type.starts_with("application/apply-patch")
            && !exists
        {
            verbs.push("create");
        }
        for verb in verbs {
            if !allows(rules, ns.as_deref(), &group, &resource, verb) {
                let g = if group.is_empty() {
                    "\"\"".to_string()
                } else {
                    format!("\"{group}\"")
                };
                return Err(format!(
                    "User \"system:serviceaccount:devplug-system:devplug-operator\" cannot {verb} resource \"{resource}\" in API group {g}{}",
                    ns.map(|n| format!(" in the namespace \"{n}\""))
                        .unwrap_or_default()
                ));
            }
        }
        Ok(())
    }
}
