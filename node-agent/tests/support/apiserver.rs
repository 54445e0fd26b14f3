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

#[derive(Clone)]
struct Shared {
    policy: Arc<Mutex<Value>>,
    rv: Arc<Mutex<u64>>,
    events: Arc<Mutex<Option<broadcast::Sender<String>>>>,
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
        };
        let app = Router::new()
            .route(
                "/apis/devplug.io/v1alpha1/devicepluginpolicies",
                get(policies),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
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
