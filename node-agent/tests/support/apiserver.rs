//! A minimal API server over HTTP for cluster-mode tests: list and watch of
//! DevicePluginPolicies, with real JSON, and a way to push updates or go away.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;

/// One write received.
#[derive(Clone, Debug)]
pub struct Write {
    pub method: String,
    pub path: String,
    pub query: String,
    pub at: std::time::Instant,
    pub body: Value,
    pub bytes: usize,
}

#[derive(Clone)]
struct Shared {
    policy: Arc<Mutex<Value>>,
    rv: Arc<Mutex<u64>>,
    events: Arc<Mutex<Option<broadcast::Sender<String>>>>,
    nds: Arc<Mutex<std::collections::BTreeMap<String, Value>>>,
    writes: Arc<Mutex<Vec<Write>>>,
    refuse_writes: Arc<Mutex<bool>>,
    posted_events: Arc<Mutex<Vec<Value>>>,
    slices: Arc<Mutex<std::collections::BTreeMap<String, Value>>>,
    /// ResourceSlice watch events as (resourceVersion, line); sent while
    /// `slice_log` is held.
    slice_events: broadcast::Sender<(u64, String)>,
    /// The last resourceVersion and every event so far: a watch from a
    /// resourceVersion gets what happened after it, as from a real API
    /// server (a deletion between a client's list and its watch is not lost).
    slice_log: Arc<Mutex<EventLog>>,
    claims: Arc<Mutex<std::collections::BTreeMap<String, Value>>>,
    claim_reads: Arc<Mutex<u64>>,
}

/// The last resourceVersion, and every event as (resourceVersion, line).
type EventLog = (u64, Vec<(u64, String)>);

fn not_found() -> Response {
    json_response(
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
    )
}

/// `resource.k8s.io/v1` ResourceSlices: list, apply (whole object), delete.
async fn slices(
    State(s): State<Shared>,
    method: axum::http::Method,
    uri: Uri,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().to_string();
    let rest = path
        .trim_start_matches("/apis/resource.k8s.io/v1/resourceslices")
        .trim_start_matches('/');
    let watch = uri
        .query()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    if watch && method == axum::http::Method::GET {
        let since: u64 = uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let live = s.slice_events.subscribe();
        let (replay, last) = {
            let log = s.slice_log.lock().unwrap();
            let replay: Vec<String> = log
                .1
                .iter()
                .filter(|(rv, _)| *rv > since)
                .map(|(_, l)| l.clone())
                .collect();
            (replay, log.0.max(since))
        };
        let stream = futures::stream::iter(replay)
            .chain(
                BroadcastStream::new(live)
                    .filter_map(|e| e.ok())
                    .filter(move |(rv, _)| *rv > last)
                    .map(|(_, l)| l),
            )
            .map(|line| Ok::<_, Infallible>(format!("{line}\n")));
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let mut store = s.slices.lock().unwrap();
    match (method.as_str(), rest.is_empty()) {
        ("GET", true) => json_response(
            200,
            &json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
                    "metadata": {"resourceVersion": s.slice_log.lock().unwrap().0.to_string()},
                    "items": store.values().cloned().collect::<Vec<_>>()}),
        ),
        ("GET", false) => store
            .get(rest)
            .map_or_else(not_found, |o| json_response(200, o)),
        ("PATCH", false) => {
            let mut o: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            o["metadata"]["resourceVersion"] = json!("1");
            s.writes.lock().unwrap().push(Write {
                method: "PATCH".into(),
                path: path.clone(),
                query: uri.query().unwrap_or("").to_string(),
                at: std::time::Instant::now(),
                body: o.clone(),
                bytes: body.len(),
            });
            store.insert(rest.to_string(), o.clone());
            json_response(200, &o)
        }
        ("DELETE", false) => match store.remove(rest) {
            Some(_) => json_response(200, &json!({"kind": "Status", "status": "Success"})),
            None => not_found(),
        },
        _ => json_response(405, &json!({"kind": "Status", "code": 405})),
    }
}

/// `resource.k8s.io/v1` ResourceClaims, read only.
async fn claims(State(s): State<Shared>, uri: Uri) -> Response {
    *s.claim_reads.lock().unwrap() += 1;
    let key = uri
        .path()
        .trim_start_matches("/apis/resource.k8s.io/v1/namespaces/")
        .replace("/resourceclaims/", "/");
    s.claims
        .lock()
        .unwrap()
        .get(&key)
        .map_or_else(not_found, |o| json_response(200, o))
}

/// `events.k8s.io/v1` Events: created ones are kept for the test to read.
async fn events(
    State(s): State<Shared>,
    method: axum::http::Method,
    body: axum::body::Bytes,
) -> Response {
    let mut ev: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if method != axum::http::Method::POST || ev.is_null() {
        return json_response(405, &json!({"kind": "Status", "code": 405}));
    }
    let mut list = s.posted_events.lock().unwrap();
    ev["metadata"]["name"] = json!(format!("ev-{}", list.len()));
    ev["metadata"]["resourceVersion"] = json!("1");
    list.push(ev.clone());
    json_response(201, &ev)
}

fn json_response(code: u16, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// Server-side apply of NodeDeviceStatus objects and their status: merges
/// `status.resources` entries by resourceName, as the list-map does.
async fn nds(
    State(s): State<Shared>,
    method: axum::http::Method,
    uri: Uri,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().to_string();
    let body_v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if method == axum::http::Method::PATCH {
        s.writes.lock().unwrap().push(Write {
            method: method.to_string(),
            path: path.clone(),
            query: uri.query().unwrap_or("").to_string(),
            at: std::time::Instant::now(),
            body: body_v.clone(),
            bytes: body.len(),
        });
        if *s.refuse_writes.lock().unwrap() {
            return json_response(
                503,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "reason": "ServiceUnavailable", "message": "down for the test"}),
            );
        }
    }
    let rest = path.trim_start_matches("/apis/devplug.io/v1alpha1/nodedevicestatuses/");
    let (name, is_status) = match rest.strip_suffix("/status") {
        Some(n) => (n.to_string(), true),
        None => (rest.to_string(), false),
    };
    let mut store = s.nds.lock().unwrap();
    match (method.as_str(), is_status) {
        ("GET", _) => match store.get(&name) {
            Some(o) => json_response(200, o),
            None => json_response(
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
            ),
        },
        ("PATCH", false) => {
            let o = store.entry(name.clone()).or_insert_with(|| {
                json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus", "metadata": {"name": name, "uid": "nds-uid"}, "spec": body_v["spec"].clone()})
            });
            json_response(200, o)
        }
        ("PATCH", true) => {
            let Some(o) = store.get_mut(&name) else {
                return json_response(
                    404,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
                );
            };
            let mut entries: Vec<Value> = o["status"]["resources"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for e in body_v["status"]["resources"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                entries.retain(|x| x["resourceName"] != e["resourceName"]);
                entries.push(e);
            }
            o["status"]["resources"] = Value::Array(entries);
            json_response(200, o)
        }
        _ => json_response(405, &json!({"kind": "Status", "code": 405})),
    }
}

/// The fake API server.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

async fn policies(State(s): State<Shared>, uri: Uri) -> Response {
    let watch = uri
        .query()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    if watch {
        let rx = match s.events.lock().unwrap().as_ref() {
            Some(tx) => tx.subscribe(),
            None => return Response::builder().status(503).body(Body::empty()).unwrap(),
        };
        let stream = BroadcastStream::new(rx)
            .filter_map(|e| e.ok())
            .map(|line| Ok::<_, Infallible>(format!("{line}\n")));
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let rv = *s.rv.lock().unwrap();
    let list = json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicyList",
        "metadata": {"resourceVersion": rv.to_string()},
        "items": [s.policy.lock().unwrap().clone()],
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(list.to_string()))
        .unwrap()
}

impl ApiServer {
    /// Serves `policy` on a loopback port.
    pub async fn start(mut policy: Value) -> Self {
        policy["metadata"]["resourceVersion"] = json!("1");
        let (tx, _) = broadcast::channel(16);
        let shared = Shared {
            policy: Arc::new(Mutex::new(policy)),
            rv: Arc::new(Mutex::new(1)),
            events: Arc::new(Mutex::new(Some(tx))),
            nds: Arc::default(),
            writes: Arc::default(),
            refuse_writes: Arc::default(),
            posted_events: Arc::default(),
            slices: Arc::default(),
            slice_events: broadcast::channel(64).0,
            slice_log: Arc::new(Mutex::new((1, Vec::new()))),
            claims: Arc::default(),
            claim_reads: Arc::default(),
        };
        let app = Router::new()
            .route(
                "/apis/devplug.io/v1alpha1/devicepluginpolicies",
                get(policies),
            )
            .route(
                "/apis/devplug.io/v1alpha1/nodedevicestatuses/{*rest}",
                axum::routing::any(nds),
            )
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/events",
                axum::routing::any(events),
            )
            .route(
                "/apis/resource.k8s.io/v1/resourceslices",
                axum::routing::any(slices),
            )
            .route(
                "/apis/resource.k8s.io/v1/resourceslices/{name}",
                axum::routing::any(slices),
            )
            .route(
                "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims/{name}",
                get(claims),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.posted_events.lock().unwrap().clone()
    }

    /// Changes the policy and sends a MODIFIED watch event.
    pub fn update(&self, f: impl FnOnce(&mut Value)) {
        let mut rv = self.shared.rv.lock().unwrap();
        *rv += 1;
        let mut p = self.shared.policy.lock().unwrap();
        f(&mut p);
        p["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = json!({"type": "MODIFIED", "object": p.clone()}).to_string();
        if let Some(tx) = self.shared.events.lock().unwrap().as_ref() {
            let _ = tx.send(ev);
        }
    }

    /// Every PATCH received so far.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.writes.lock().unwrap().clone()
    }

    /// The stored NodeDeviceStatus of a node.
    pub fn nds(&self, node: &str) -> Option<Value> {
        self.shared.nds.lock().unwrap().get(node).cloned()
    }

    /// ResourceSlices stored, by name.
    pub fn slices(&self) -> std::collections::BTreeMap<String, Value> {
        self.shared.slices.lock().unwrap().clone()
    }

    /// Deletes a ResourceSlice as someone else would, telling watchers.
    pub fn delete_slice(&self, name: &str) {
        if let Some(mut o) = self.shared.slices.lock().unwrap().remove(name) {
            let mut log = self.shared.slice_log.lock().unwrap();
            log.0 += 1;
            let rv = log.0;
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            let line = json!({"type": "DELETED", "object": o}).to_string();
            log.1.push((rv, line.clone()));
            let _ = self.shared.slice_events.send((rv, line));
        }
    }

    /// Stores (or with `None` removes) a ResourceClaim.
    pub fn set_claim(&self, namespace: &str, name: &str, claim: Option<Value>) {
        let key = format!("{namespace}/{name}");
        let mut c = self.shared.claims.lock().unwrap();
        match claim {
            Some(v) => {
                c.insert(key, v);
            }
            None => {
                c.remove(&key);
            }
        }
    }

    /// ResourceClaim reads so far.
    pub fn claim_reads(&self) -> u64 {
        *self.shared.claim_reads.lock().unwrap()
    }

    /// Answers writes with 503 while `down`.
    pub fn refuse_writes(&self, down: bool) {
        *self.shared.refuse_writes.lock().unwrap() = down;
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Goes away: open watches end and new connections are refused.
    pub fn stop(&self) {
        self.shared.events.lock().unwrap().take();
        self.task.abort();
    }
}
