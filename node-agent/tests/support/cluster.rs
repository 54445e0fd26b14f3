//! The agent in cluster mode against the real kube-apiserver of
//! `devplug-testenv`: its policy stored there, a real bound token of its
//! ServiceAccount on its node (so the chart's RBAC and admission policy
//! judge every request), a TCP relay in front that a test can cut ("the
//! API server goes away"), and the API server's audit log to count what
//! the agent asked.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devplug_testenv::{Audited, Proxy, RELEASE_NS, env, get_json, unique};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// One policy's agent identity on one node, and the server behind it.
pub struct Cluster {
    /// The policy's name on the server (unique to this test).
    pub policy: String,
    /// The node the agent's token names.
    pub node: String,
    admin: Client,
    token: String,
    user: String,
    proxy: Proxy,
}

fn policy_path(name: &str) -> String {
    format!("/apis/devplug.io/v1alpha1/devicepluginpolicies/{name}")
}

impl Cluster {
    /// Stores `policy` (renamed to a name unique to this test: see
    /// [`Cluster::policy`]) and makes the agent's identity on `node`.
    pub async fn start(node: &str, mut policy: Value) -> Self {
        let env = env();
        let admin = env.admin();
        let prefix = policy["metadata"]["name"].as_str().unwrap().to_string();
        let name = unique(&prefix);
        let meta = policy["metadata"].as_object_mut().unwrap();
        meta.insert("name".into(), json!(name));
        for k in ["uid", "generation", "resourceVersion"] {
            meta.remove(k);
        }
        let api: Api<DynamicObject> = Api::all_with(
            admin.clone(),
            &kube::core::ApiResource::erase::<devplug_api::DevicePluginPolicy>(&()),
        );
        let obj: DynamicObject = serde_json::from_value(policy).unwrap();
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("policy {name}: {e}"));
        approve(&admin, &name).await;
        let typed: devplug_api::DevicePluginPolicy =
            serde_json::from_value(get_json(&admin, &policy_path(&name)).await.unwrap()).unwrap();
        let token = env.agent_token(&typed, node).await;
        let proxy = Proxy::start(&env.url).await;
        Cluster {
            user: format!("system:serviceaccount:{RELEASE_NS}:devplug-agent-{name}"),
            policy: name,
            node: node.to_string(),
            admin,
            token,
            proxy,
        }
    }

    /// The admin's client, for setting up and checking.
    pub fn admin(&self) -> Client {
        self.admin.clone()
    }

    /// A kubeconfig for the agent: its token, the relay's address.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        env().kubeconfig(dir, &self.token, Some(&self.proxy.url))
    }

    /// A kubeconfig for the agent straight to the API server, without the
    /// relay (so [`Cluster::stop`] cannot cut it off): for measurements,
    /// where the relay's own hop would count.
    pub fn kubeconfig_direct(&self, dir: &Path) -> PathBuf {
        env().kubeconfig(dir, &self.token, None)
    }

    /// A client acting as the agent (its token), straight to the API server.
    pub fn agent_client(&self) -> Client {
        env().client_with_token(&self.token)
    }

    /// Same, behind a [`devplug_testenv::Recorder`] (its requests logged,
    /// chosen ones failed or held).
    pub fn agent_client_recorded(&self) -> (Client, devplug_testenv::Recorder) {
        env().recorded_client(&self.token)
    }

    /// The policy as stored.
    pub async fn policy_json(&self) -> Value {
        get_json(&self.admin, &policy_path(&self.policy))
            .await
            .unwrap()
    }

    /// Changes the policy as `kubectl edit` would, and approves the new
    /// spec as the operator does when it is valid (agents serve only
    /// `status.approvedSpec`); the API server's refusal (schema, CEL) is
    /// the error.
    pub async fn try_update(&self, f: impl FnOnce(&mut Value)) -> Result<(), String> {
        self.try_update_unapproved(f).await?;
        approve(&self.admin, &self.policy).await;
        Ok(())
    }

    /// Changes the policy without the operator's approval: what an agent
    /// sees between an edit and the operator's verdict, or after a refusal.
    pub async fn try_update_unapproved(&self, f: impl FnOnce(&mut Value)) -> Result<(), String> {
        let mut p = self.policy_json().await;
        f(&mut p);
        send(
            &self.admin,
            http::Method::PUT,
            &policy_path(&self.policy),
            &p,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Same, and the API server must take it.
    pub async fn update(&self, f: impl FnOnce(&mut Value)) {
        if let Err(e) = self.try_update(f).await {
            panic!("policy update refused: {e}");
        }
    }

    /// The API server goes away for the agent: its connections close and
    /// new ones are refused.
    pub fn stop(&self) {
        self.proxy.cut();
    }

    /// ...and comes back.
    pub fn restore(&self) {
        self.proxy.restore();
    }

    /// Events (events.k8s.io) about the policy.
    pub async fn events(&self) -> Vec<Value> {
        let list = get_json(&self.admin, "/apis/events.k8s.io/v1/events")
            .await
            .unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["regarding"]["name"] == self.policy.as_str())
            .cloned()
            .collect()
    }

    /// Every request the agent made, from the API server's audit log.
    pub fn requests(&self) -> Vec<Audited> {
        env().audit(&self.user)
    }

    /// Every request the agent made, as the raw events of the API server's
    /// audit log (stage ResponseComplete: with `requestReceivedTimestamp`
    /// and `stageTimestamp`, for timings).
    pub fn audit_events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(env().dir().join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["user"]["username"] == self.user.as_str() && e["stage"] == "ResponseComplete"
            })
            .collect()
    }

    /// The agent's writes.
    pub fn writes(&self) -> Vec<Audited> {
        self.requests()
            .into_iter()
            .filter(Audited::is_write)
            .collect()
    }

    /// The NodeDeviceStatus of a node.
    pub async fn nds(&self, node: &str) -> Option<Value> {
        get_json(
            &self.admin,
            &format!("/apis/devplug.io/v1alpha1/nodedevicestatuses/{node}"),
        )
        .await
    }

    /// This node's ResourceSlices, by name.
    pub async fn slices(&self) -> BTreeMap<String, Value> {
        let list = get_json(
            &self.admin,
            &format!(
                "/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3D{}",
                self.node
            ),
        )
        .await
        .unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metadata"]["name"].as_str().unwrap().to_string(),
                    s.clone(),
                )
            })
            .collect()
    }

    /// Deletes a ResourceSlice, as the kubelet does when it restarts.
    pub async fn delete_slice(&self, name: &str) {
        let api: Api<k8s_openapi::api::resource::v1::ResourceSlice> = Api::all(self.admin.clone());
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }

    /// Creates the ResourceClaim `namespace/name` with `requests` (each
    /// `(request, deviceClassName)`), allocated as the scheduler would:
    /// `results` of `(request, driver, pool, device)`. Returns its uid.
    pub async fn allocated_claim(
        &self,
        namespace: &str,
        name: &str,
        requests: &[(&str, &str)],
        results: &[(&str, &str, &str, &str)],
    ) -> String {
        let results: Vec<Value> = results
            .iter()
            .map(|(r, driver, pool, dev)| json!({"request": r, "driver": driver, "pool": pool, "device": dev}))
            .collect();
        self.allocated_claim_with(namespace, name, requests, results)
            .await
    }

    /// Same, with the allocation results as the API takes them (shares of
    /// a device, for one).
    pub async fn allocated_claim_with(
        &self,
        namespace: &str,
        name: &str,
        requests: &[(&str, &str)],
        results: Vec<Value>,
    ) -> String {
        let mut claim = self.create_claim(namespace, name, requests).await;
        let node = results
            .first()
            .and_then(|r| r["pool"].as_str())
            .unwrap_or_default()
            .to_string();
        // As the scheduler allocates a node-local device: for the node of
        // the first result's pool (our pools are named after their node).
        claim["status"] = json!({"allocation": {
            "devices": {"results": results},
            "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [node]}]}]},
        }});
        let path =
            format!("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}/status");
        send(&self.admin, http::Method::PUT, &path, &claim)
            .await
            .unwrap_or_else(|e| panic!("claim {namespace}/{name} status: {e}"));
        claim["metadata"]["uid"].as_str().unwrap().to_string()
    }

    /// Creates the ResourceClaim `namespace/name` with `requests` (each
    /// `(request, deviceClassName)`) and no allocation: a claim the
    /// scheduler has not allocated (yet). Returns its uid.
    pub async fn unallocated_claim(
        &self,
        namespace: &str,
        name: &str,
        requests: &[(&str, &str)],
    ) -> String {
        let claim = self.create_claim(namespace, name, requests).await;
        claim["metadata"]["uid"].as_str().unwrap().to_string()
    }

    /// The claim as created (in `namespace`, made if missing).
    async fn create_claim(&self, namespace: &str, name: &str, requests: &[(&str, &str)]) -> Value {
        ensure_namespace(&self.admin, namespace).await;
        let reqs: Vec<Value> = requests
            .iter()
            .map(|(r, class)| json!({"name": r, "exactly": {"deviceClassName": class}}))
            .collect();
        let claim = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"devices": {"requests": reqs}}});
        let path = format!("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims");
        send(&self.admin, http::Method::POST, &path, &claim)
            .await
            .unwrap_or_else(|e| panic!("claim {namespace}/{name}: {e}"))
    }

    /// Creates pod `namespace/name` on `node` with `claims` (pod claim
    /// name → ResourceClaim name) and `containers` (each the pod claim names
    /// it lists, in order), and reserves each claim for it, as the
    /// scheduler does. Returns the pod's UID.
    pub async fn pod_with_claims(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        claims: &[(&str, &str)],
        containers: &[&[&str]],
    ) -> String {
        ensure_namespace(&self.admin, namespace).await;
        let resource_claims: Vec<Value> = claims
            .iter()
            .map(|(n, c)| json!({"name": n, "resourceClaimName": c}))
            .collect();
        let ctrs: Vec<Value> = containers
            .iter()
            .enumerate()
            .map(|(i, names)| {
                let cl: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
                json!({"name": format!("c{i}"), "image": "registry.k8s.io/pause:3.10",
                       "resources": {"claims": cl}})
            })
            .collect();
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "resourceClaims": resource_claims, "containers": ctrs}});
        let path = format!("/api/v1/namespaces/{namespace}/pods");
        let pod = send(&self.admin, http::Method::POST, &path, &pod)
            .await
            .unwrap_or_else(|e| panic!("pod {namespace}/{name}: {e}"));
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        for (_, claim) in claims {
            let path =
                format!("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{claim}");
            let mut c = send(&self.admin, http::Method::GET, &path, &Value::Null)
                .await
                .unwrap_or_else(|e| panic!("claim {namespace}/{claim}: {e}"));
            c["status"]["reservedFor"] = json!([{"resource": "pods", "name": name, "uid": uid}]);
            send(
                &self.admin,
                http::Method::PUT,
                &format!("{path}/status"),
                &c,
            )
            .await
            .unwrap_or_else(|e| panic!("reserving claim {namespace}/{claim}: {e}"));
        }
        uid
    }

    /// Deletes a ResourceClaim.
    pub async fn delete_claim(&self, namespace: &str, name: &str) {
        let path = format!("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}");
        let _ = self
            .admin
            .request::<Value>(http::Request::delete(path).body(Vec::new()).unwrap())
            .await;
    }

    /// How many times the agent read a ResourceClaim.
    pub fn claim_reads(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.verb == "get" && r.path.contains("/resourceclaims/"))
            .count()
    }

    /// While `down`, the API server refuses the agent's NodeDeviceStatus
    /// writes: a ValidatingAdmissionPolicy of the test's own denies them,
    /// as an admission webhook or a quota would. Returns once the refusal
    /// (or its end) is in force.
    pub async fn refuse_writes(&self, down: bool) {
        let name = format!("test-refuse-{}", self.policy);
        if down {
            devplug_testenv::apply_value(
                &self.admin,
                &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
                    "metadata": {"name": name},
                    "spec": {"failurePolicy": "Fail",
                        "matchConstraints": {"resourceRules": [{"apiGroups": ["devplug.io"], "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE"], "resources": ["nodedevicestatuses", "nodedevicestatuses/status"]}]},
                        "matchConditions": [{"name": "this-agent", "expression": format!("request.userInfo.username == '{}'", self.user)}],
                        "validations": [{"expression": "false", "message": "refused by the test"}]}}),
            )
            .await
            .unwrap();
            devplug_testenv::apply_value(
                &self.admin,
                &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
                    "metadata": {"name": name},
                    "spec": {"policyName": name, "validationActions": ["Deny"]}}),
            )
            .await
            .unwrap();
        } else {
            for kind in [
                "validatingadmissionpolicybindings",
                "validatingadmissionpolicies",
            ] {
                let path = format!("/apis/admissionregistration.k8s.io/v1/{kind}/{name}");
                let _ = self
                    .admin
                    .request::<Value>(http::Request::delete(path).body(Vec::new()).unwrap())
                    .await;
            }
        }
        // In force when a dry-run write as the agent gets the answer.
        let probe = env().client_with_token(&self.token);
        let api: Api<DynamicObject> = Api::all_with(
            probe,
            &kube::core::ApiResource::erase::<devplug_api::NodeDeviceStatus>(&()),
        );
        let pp = PatchParams {
            dry_run: true,
            ..PatchParams::apply(&devplug_api::agent_manager(&self.policy)).force()
        };
        let obj = json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                         "metadata": {"name": self.node}, "spec": {"nodeName": self.node}});
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let refused = matches!(
                api.patch(&self.node, &pp, &Patch::Apply(&obj)).await,
                Err(kube::Error::Api(ref s)) if s.message.contains("refused by the test")
            );
            if refused == down {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "refuse_writes({down}) not in force after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `method` of `body` as JSON to `path`, as `client`.
/// Approves the policy's spec as the operator does when it is valid:
/// `status.approvedSpec` (what agents serve) and `approvedGeneration`.
async fn approve(admin: &Client, name: &str) {
    let mut p = get_json(admin, &policy_path(name)).await.unwrap();
    let typed: devplug_api::DevicePluginPolicy = serde_json::from_value(p.clone()).unwrap();
    if typed.spec.validate().is_err() {
        return;
    }
    if !p["status"].is_object() {
        p["status"] = json!({});
    }
    p["status"]["approvedSpec"] = p["spec"].clone();
    p["status"]["approvedGeneration"] = p["metadata"]["generation"].clone();
    send(
        admin,
        http::Method::PUT,
        &format!("{}/status", policy_path(name)),
        &p,
    )
    .await
    .unwrap_or_else(|e| panic!("approving policy {name}: {e}"));
}

async fn send(
    client: &Client,
    method: http::Method,
    path: &str,
    body: &Value,
) -> Result<Value, kube::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        })
        .unwrap();
    client.request(req).await
}

async fn ensure_namespace(admin: &Client, ns: &str) {
    // Already there is fine.
    let _ = send(
        admin,
        http::Method::POST,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
}
