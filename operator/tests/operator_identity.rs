//! The operator binary, as the chart's ServiceAccount, against a real
//! kube-apiserver that starts empty but for what the chart installs: every
//! request its reconciles need is allowed by the chart's RBAC, from the
//! first policy to the release of a deleted one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplug_testenv::{RELEASE_NS, env, get_json, unique};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

struct Operator {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Operator {
    /// Runs the binary as the chart's Deployment runs it: its arguments and
    /// environment as `helm template` renders them, but for the metrics
    /// port (a free one) and the lease (one per test).
    fn start(kubeconfig: &std::path::Path, lease: &str) -> Operator {
        let docs = devplug_testenv::render_chart(&[]).unwrap();
        let dep = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "devplug-operator")
            .expect("the chart's operator Deployment");
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_devplug-operator"));
        for a in c["args"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            if !a.starts_with("--metrics-addr") {
                cmd.arg(a);
            }
        }
        for e in c["env"].as_array().unwrap() {
            if let Some(v) = e["value"].as_str() {
                cmd.env(e["name"].as_str().unwrap(), v);
            }
        }
        let mut child = cmd
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", lease)
            .env("POD_NAMESPACE", RELEASE_NS)
            .args(["--lease-name", lease])
            .args(["--metrics-addr", &metrics.to_string()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        Operator { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for<F, Fut>(what: &str, op: &Operator, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + T;
    loop {
        let last = check().await;
        if last.is_ok() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what} not within {T:?}: {}\n--- operator log ---\n{}",
                last.unwrap_err(),
                op.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn policy(name: &str, dra: bool) -> Value {
    let mut p = json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": name},
        "spec": {"resourceName": format!("example.com/{name}"), "source": {"simulated": {"count": 2}}},
    });
    if dra {
        p["spec"]["kubeletApi"] = json!("DRA");
    }
    p
}

/// From an empty cluster: two policies (one per kubelet path) get their
/// agents' objects, status and Events, a node reporting devices gets its
/// labels and summary, and deleting the policies releases them; the
/// operator's log shows no refused request at any point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_identity_can_do_all_its_reconciles_need() {
    let env = env();
    let admin = env.admin();
    let dir = std::env::temp_dir().join(unique("operator-identity"));
    std::fs::create_dir_all(&dir).unwrap();
    let token = env.operator_token().await;
    let kubeconfig = env.kubeconfig(&dir, &token, None);
    let node = unique("op-node");
    env.ensure_node(&node).await.unwrap();
    let op = Operator::start(&kubeconfig, &unique("lease"));

    let dp = unique("op-dp");
    let dra = unique("op-dra");
    let policies: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &kube::core::ApiResource::erase::<devplug_api::DevicePluginPolicy>(&()),
    );
    for (name, is_dra) in [(&dp, false), (&dra, true)] {
        policies
            .patch(
                name,
                &PatchParams::apply("test"),
                &Patch::Apply(policy(name, is_dra)),
            )
            .await
            .unwrap();
    }

    // What the operator applies for each policy.
    for name in [&dp, &dra] {
        let agent = format!("devplug-agent-{name}");
        let paths = [
            format!("/apis/apps/v1/namespaces/{RELEASE_NS}/daemonsets/{agent}"),
            format!("/api/v1/namespaces/{RELEASE_NS}/serviceaccounts/{agent}"),
            format!("/apis/rbac.authorization.k8s.io/v1/clusterroles/{agent}"),
            format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{agent}"),
        ];
        for path in paths {
            wait_for(&format!("{path} applied"), &op, || {
                let admin = admin.clone();
                let path = path.clone();
                async move {
                    get_json(&admin, &path)
                        .await
                        .map(|_| ())
                        .ok_or_else(|| "absent".to_string())
                }
            })
            .await;
        }
        wait_for(&format!("{name}: status for its generation"), &op, || {
            let admin = admin.clone();
            let path = format!("/apis/devplug.io/v1alpha1/devicepluginpolicies/{name}");
            async move {
                let p = get_json(&admin, &path).await.ok_or("policy gone")?;
                let conds = p["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let ready = conds.iter().any(|c| c["type"] == "Ready");
                if p["status"]["observedGeneration"] == p["metadata"]["generation"] && ready {
                    Ok(())
                } else {
                    Err(format!("status {}", p["status"]))
                }
            }
        })
        .await;
    }
    let class = devplug_api::dra_device_class_name(&dra);
    wait_for("the DRA policy's DeviceClass", &op, || {
        let admin = admin.clone();
        let path = format!("/apis/resource.k8s.io/v1/deviceclasses/{class}");
        async move {
            get_json(&admin, &path)
                .await
                .map(|_| ())
                .ok_or_else(|| "absent".to_string())
        }
    })
    .await;

    // An agent runs on the node (the DaemonSet controller's pod, made here
    // from the operator's template: no controller-manager runs under the
    // tests) and reports its node's devices: the operator labels the node
    // and writes the node's summary.
    let ds = get_json(
        &admin,
        &format!("/apis/apps/v1/namespaces/{RELEASE_NS}/daemonsets/devplug-agent-{dp}"),
    )
    .await
    .unwrap();
    let pod_name = unique("agent-pod");
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": RELEASE_NS,
                     "labels": ds["spec"]["template"]["metadata"]["labels"]},
        "spec": ds["spec"]["template"]["spec"]});
    pod["spec"]["nodeName"] = json!(node);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), RELEASE_NS);
    pods.create(&Default::default(), &serde_json::from_value(pod).unwrap())
        .await
        .unwrap();
    let now = "2026-01-01T00:00:00Z";
    pods.patch_status(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}})),
    )
    .await
    .unwrap();
    let nds: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &kube::core::ApiResource::erase::<devplug_api::NodeDeviceStatus>(&()),
    );
    let manager = devplug_api::agent_manager(&dp);
    nds.patch(
        &node,
        &PatchParams::apply(&manager).force(),
        &Patch::Apply(
            json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                             "metadata": {"name": node}, "spec": {"nodeName": node}}),
        ),
    )
    .await
    .unwrap();
    nds.patch_status(
        &node,
        &PatchParams::apply(&manager).force(),
        &Patch::Apply(json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
            "metadata": {"name": node},
            "status": {"resources": [{"resourceName": format!("example.com/{dp}"), "policy": dp,
                "state": "Serving", "healthy": 2, "total": 2, "allocated": 0,
                "devices": [{"id": "sim-0", "health": "Healthy"}, {"id": "sim-1", "health": "Healthy"}]}]}})),
    )
    .await
    .unwrap();
    wait_for("the node labelled for the policy", &op, || {
        let admin = admin.clone();
        let path = format!("/api/v1/nodes/{node}");
        let dp = dp.clone();
        async move {
            let n = get_json(&admin, &path).await.ok_or("node gone")?;
            let labels = n["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if labels.keys().any(|k| k.contains(&dp)) {
                Ok(())
            } else {
                Err(format!("labels {labels:?}"))
            }
        }
    })
    .await;

    // The chart asks the operator to label its namespace for Pod Security.
    wait_for(
        "the release namespace labelled for Pod Security",
        &op,
        || {
            let admin = admin.clone();
            async move {
                let ns = get_json(&admin, &format!("/api/v1/namespaces/{RELEASE_NS}"))
                    .await
                    .ok_or("no namespace")?;
                let l = &ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"];
                if l == "privileged" {
                    Ok(())
                } else {
                    Err(format!("labels {}", ns["metadata"]["labels"]))
                }
            }
        },
    )
    .await;

    // Deleting the policies: the operator releases them (its finalizer)
    // and removes what it made cluster-wide.
    for name in [&dp, &dra] {
        policies
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    // The operator deletes the DaemonSet; the garbage collector (not
    // running here) would then delete its pods.
    wait_for("the DaemonSet deleted", &op, || {
        let admin = admin.clone();
        let path = format!("/apis/apps/v1/namespaces/{RELEASE_NS}/daemonsets/devplug-agent-{dp}");
        async move {
            match get_json(&admin, &path).await {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        }
    })
    .await;
    pods.delete(&pod_name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    for name in [&dp, &dra] {
        wait_for(&format!("{name} released"), &op, || {
            let admin = admin.clone();
            let path = format!("/apis/devplug.io/v1alpha1/devicepluginpolicies/{name}");
            async move {
                match get_json(&admin, &path).await {
                    None => Ok(()),
                    Some(p) => Err(format!("still there: {}", p["metadata"])),
                }
            }
        })
        .await;
    }

    let log = op.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| {
            // "403" as a word of its own: a log timestamp's microseconds
            // (".045403Z") once matched a plain substring test.
            let l = l.to_ascii_lowercase();
            l.contains("forbidden")
                || l.split(|c: char| !c.is_ascii_alphanumeric())
                    .any(|word| word == "403")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused the operator:\n{}",
        refused.join("\n")
    );
}
