//! A real Kubernetes control plane under the integration tests.
//!
//! [`env()`] starts one etcd and one kube-apiserver per test binary (the
//! cluster kit's v1.36 binary, etcd from Debian), applies `crds/` and the
//! chart's RBAC and ValidatingAdmissionPolicies as `helm template` renders
//! them, and hands out clients that act as the operator's ServiceAccount and
//! as an agent's ServiceAccount on a given node. The agent's token is a real
//! bound token of a pod on that node, so it carries the node claim the
//! API server's RBAC and admission judge, exactly as on a cluster.
//!
//! The processes end with the test binary: each runs under a small shell
//! that waits on a pipe from this process and stops the daemon when it
//! closes, however the test process ended.
//!
//! Faults a real server cannot show on demand (errors, an unreachable
//! server) come from [`Recorder`] (a client-side layer that records every
//! request and can answer some with an error instead of sending them) and
//! [`Proxy`] (a TCP relay in front of the server that can be cut). Neither
//! re-implements any of the API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod proxy;
mod recorder;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use devplug_api::DevicePluginPolicy;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::AuthInfo;
use kube::{Client, Config};
use serde_json::{Value, json};

pub use proxy::Proxy;
pub use recorder::{Call, Recorder};

/// The chart's release namespace in every test (the operator's and the
/// agents' ServiceAccounts live here).
pub const RELEASE_NS: &str = "devplug-system";
/// The operator's ServiceAccount, as the chart names it.
pub const OPERATOR_SA: &str = "devplug-operator";
const MANAGER: &str = "devplug-testenv";

/// One request of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audited {
    /// The API verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    pub path: String,
    pub query: String,
    pub code: u16,
}

impl Audited {
    /// Anything but a read.
    pub fn is_write(&self) -> bool {
        !matches!(self.verb.as_str(), "get" | "list" | "watch")
    }
}

/// The running control plane of this test binary.
pub struct Env {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The API server's CA certificate (PEM).
    pub ca: PathBuf,
    dir: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    /// From the first process start to the last setup step.
    pub startup: Duration,
    operator_token: Mutex<Option<String>>,
    _daemons: Vec<Daemon>,
}

/// A daemon under a watchdog shell; the pipe closes when this process exits.
struct Daemon {
    _child: Child,
    _stdin: Option<ChildStdin>,
}

static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// The control plane of this test binary, started on first use.
pub fn env() -> &'static Env {
    match ENV.get_or_init(start) {
        Ok(env) => env,
        Err(e) => panic!("the test API server did not start: {e}"),
    }
}

/// A name no other test of this run uses: `prefix-<pid>-<n>`, kept within
/// the 63 characters of a label value.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let mut s = format!("{prefix}-{}-{n}", std::process::id() % 100_000);
    s.truncate(63);
    s
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testenv lives in the workspace")
        .to_path_buf()
}

fn shared() -> PathBuf {
    std::env::var_os("DEVPLUG_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared"))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// etcd from PATH (Debian's etcd-server, as the cluster kit installs it).
fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DEVPLUG_ETCD") {
        return Ok(PathBuf::from(p));
    }
    which("etcd").ok_or_else(|| {
        "etcd is not installed: `apt-get install etcd-server` (Debian; stop the etcd \
         service it starts), or run ../shared/cluster/up.sh once, which installs it"
            .to_string()
    })
}

/// The kit's kube-apiserver, unpacked once into `target/testenv/`
/// (re-unpacked when the kit's archive is newer).
fn apiserver_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DEVPLUG_KUBE_APISERVER") {
        return Ok(PathBuf::from(p));
    }
    let xz = shared().join("cluster/bin/kube-apiserver.xz");
    let out_dir = workspace().join("target/testenv");
    let out = out_dir.join("kube-apiserver");
    let archive_time = std::fs::metadata(&xz)
        .and_then(|m| m.modified())
        .map_err(|e| {
            format!(
                "{} is missing ({e}): the cluster kit belongs beside this checkout as ../shared \
                 (or set DEVPLUG_SHARED, or DEVPLUG_KUBE_APISERVER to a v1.36 kube-apiserver)",
                xz.display()
            )
        })?;
    let fresh = std::fs::metadata(&out)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= archive_time);
    if fresh {
        return Ok(out);
    }
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let tmp = out_dir.join(format!(".kube-apiserver.{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let st = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .stdout(file)
        .status()
        .map_err(|e| format!("xz (apt-get install xz-utils): {e}"))?;
    if !st.success() {
        return Err(format!("xz -dc {} failed: {st}", xz.display()));
    }
    let mut perms = std::fs::metadata(&tmp)
        .map_err(|e| e.to_string())?
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&tmp, perms).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// helm, as `hack/tools.sh` installs it, or from PATH.
pub fn helm_binary() -> Result<PathBuf, String> {
    let local = workspace().join(".tools/bin/helm");
    if local.is_file() {
        return Ok(local);
    }
    which("helm").ok_or_else(|| "helm is not installed: run ./hack/tools.sh".to_string())
}

fn sh(script: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A CA, a serving certificate for 127.0.0.1, a system:masters client
/// certificate and the ServiceAccount signing key (openssl: ~0.3 s).
fn make_pki(dir: &Path) -> Result<(), String> {
    which("openssl").ok_or("openssl is not installed: apt-get install openssl")?;
    sh(
        r#"
ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=devplug-testenv-ca 2>/dev/null
ec server /CN=kube-apiserver
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 30 -extfile server.ext 2>/dev/null
ec admin "/CN=devplug-testenv-admin/O=system:masters"
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 30 -extfile client.ext 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
"#,
        dir,
    )
}

/// Runs `program args` under `sh`, which stops it (and removes `cleanup`)
/// once this process's end of its stdin closes.
fn spawn_daemon(
    program: &Path,
    args: &[String],
    log: &Path,
    cleanup: &Path,
) -> Result<Daemon, String> {
    let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let script = r#"prog=$1; log=$2; cleanup=$3; shift 3
"$prog" "$@" </dev/null >>"$log" 2>&1 &
pid=$!
read -r _ || true
kill "$pid" 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$cleanup""#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("devplug-testenv")
        .arg(program)
        .arg(log)
        .arg(cleanup)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let stdin = child.stdin.take();
    Ok(Daemon {
        _child: child,
        _stdin: stdin,
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn start() -> Result<Env, String> {
    let began = Instant::now();
    let etcd = etcd_binary()?;
    let apiserver = apiserver_binary()?;
    helm_binary()?;
    // Under /dev/shm where there is one: etcd's writes are the slow part.
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("devplug-testenv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    make_pki(&dir)?;

    let (client_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let etcd_args: Vec<String> = vec![
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ];
    let etcd_log = dir.join("etcd.log");
    let d1 = spawn_daemon(&etcd, &etcd_args, &etcd_log, &dir.join("etcd"))?;
    let p = |f: &str| dir.join(f).display().to_string();
    let mut api_args: Vec<String> = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={api_port}"),
        format!("--cert-dir={}", p("certs")),
        format!("--tls-cert-file={}", p("server.crt")),
        format!("--tls-private-key-file={}", p("server.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        "--service-cluster-ip-range=10.96.0.0/16".into(),
        // As the cluster kit runs it.
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        // No controller-manager runs here to create the pods' token
        // volumes' sources; the tests create pods only to bind tokens.
        "--disable-admission-plugins=ServiceAccount".into(),
        "--allow-privileged=true".into(),
        "--endpoint-reconciler-type=none".into(),
    ];
    // What ServiceAccounts (the code under test) ask, for tests that count
    // an agent process's requests: the API server's own audit log.
    std::fs::write(
        dir.join("audit-policy.yaml"),
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  \
         - level: Metadata\n    userGroups: [\"system:serviceaccounts\"]\n  - level: None\n",
    )
    .map_err(|e| e.to_string())?;
    api_args.push(format!("--audit-policy-file={}", p("audit-policy.yaml")));
    api_args.push(format!("--audit-log-path={}", p("audit.log")));
    api_args.push("--audit-log-format=json".into());
    api_args.push("--audit-log-mode=blocking".into());
    let api_log = dir.join("kube-apiserver.log");
    let d2 = spawn_daemon(&apiserver, &api_args, &api_log, &dir)?;

    let url = format!("https://127.0.0.1:{api_port}");
    let env = Env {
        url,
        ca: dir.join("ca.crt"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        dir: dir.clone(),
        startup: Duration::ZERO,
        operator_token: Mutex::new(None),
        _daemons: vec![d1, d2],
    };
    // The setup is async; it runs on a runtime of its own, on a thread of
    // its own, because the caller may be inside any test's runtime.
    let setup = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(setup(&env))
        })
        .join()
        .unwrap_or_else(|_| Err("setup panicked".into()))
    });
    if let Err(e) = setup {
        return Err(format!(
            "{e}\n--- kube-apiserver.log (last lines) ---\n{}\n--- etcd.log ---\n{}",
            tail(&api_log, 30),
            tail(&etcd_log, 10)
        ));
    }
    let env = Env {
        startup: began.elapsed(),
        ..env
    };
    eprintln!(
        "devplug-testenv: etcd + kube-apiserver {} ready with CRDs, RBAC and admission in {:.2} s ({})",
        env.url,
        env.startup.as_secs_f64(),
        env.dir.display()
    );
    Ok(env)
}

async fn setup(env: &Env) -> Result<(), String> {
    let admin = env.admin();
    // Ready: /readyz answers ok (the RBAC bootstrap is one of its checks).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
        match admin.request_text(req).await {
            Ok(t) if t.trim() == "ok" => break,
            r if Instant::now() > deadline => {
                return Err(format!("/readyz not ok after 60 s: {r:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let ns: Api<Namespace> = Api::all(admin.clone());
    ns.patch(
        RELEASE_NS,
        &PatchParams::apply(MANAGER),
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NS}}),
        ),
    )
    .await
    .map_err(|e| format!("namespace {RELEASE_NS}: {e}"))?;
    apply_crds(&admin).await?;
    apply_chart(&admin).await?;
    wait_admission_policy(env).await
}

/// Every CRD in `crds/`, applied and waited on until Established.
async fn apply_crds(admin: &Client) -> Result<(), String> {
    let dir = workspace().join("crds");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let mut names = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| format!("CRD {name}: {e}"))?;
            names.push(name);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let crd = crds
                .get(&name)
                .await
                .map_err(|e| format!("CRD {name}: {e}"))?;
            let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("CRD {name} not Established after 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// What the tests take from the chart: who may do what, and the admission
/// policies. The operator Deployment, Services and monitors are not needed.
const CHART_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "FlowSchema",
];

/// `helm template` of the chart as a user installs it into [`RELEASE_NS`].
pub fn render_chart(extra: &[&str]) -> Result<Vec<Value>, String> {
    let helm = helm_binary()?;
    let out = Command::new(helm)
        .args(["template", "devplug"])
        .arg(workspace().join("charts/devplug"))
        .args(["--namespace", RELEASE_NS])
        // What `helm install` finds on a 1.36 cluster.
        .args(["--kube-version", "1.36.2"])
        .args([
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
        ])
        .args(extra)
        .output()
        .map_err(|e| format!("helm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value =
            serde::Deserialize::deserialize(doc).map_err(|e| format!("helm output: {e}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

async fn apply_chart(admin: &Client) -> Result<(), String> {
    for doc in render_chart(&[])? {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if CHART_KINDS.contains(&kind) {
            apply_value(admin, &doc).await?;
        }
    }
    Ok(())
}

/// Server-side apply of any object given as JSON, as the admin.
pub async fn apply_value(client: &Client, obj: &Value) -> Result<(), String> {
    let obj: DynamicObject = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let types = obj.types.clone().ok_or("object without apiVersion/kind")?;
    let gvk = kube::api::GroupVersionKind::try_from(&types).map_err(|e| e.to_string())?;
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("{}: {e}", types.kind))?;
    let name = obj.metadata.name.clone().unwrap_or_default();
    let api: Api<DynamicObject> = match (&caps.scope, &obj.metadata.namespace) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        (kube::discovery::Scope::Namespaced, None) => {
            Api::namespaced_with(client.clone(), RELEASE_NS, &ar)
        }
        _ => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map_err(|e| format!("{} {name}: {e}", types.kind))?;
    Ok(())
}

/// A ValidatingAdmissionPolicy takes effect a moment after it is created;
/// the tests must not start before it judges. A probe agent (a real bound
/// token on node `envtest-probe`) asks, in a dry run, to write another
/// node's NodeDeviceStatus until the policy refuses it.
async fn wait_admission_policy(env: &Env) -> Result<(), String> {
    let admin = env.admin();
    let sa = "devplug-agent-envtest-probe";
    let user = format!("system:serviceaccount:{RELEASE_NS}:{sa}");
    apply_value(
        &admin,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "devplug-testenv-probe"},
                "rules": [{"apiGroups": ["devplug.io"], "resources": ["nodedevicestatuses"], "verbs": ["create"]}]}),
    )
    .await?;
    apply_value(
        &admin,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "devplug-testenv-probe"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "devplug-testenv-probe"},
                "subjects": [{"kind": "User", "name": user}]}),
    )
    .await?;
    apply_value(
        &admin,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": RELEASE_NS}}),
    )
    .await?;
    let token = env.node_token(sa, "envtest-probe").await?;
    let probe = env.client_with_token(&token);
    let nds: Api<DynamicObject> = Api::all_with(
        probe,
        &kube::core::ApiResource::erase::<devplug_api::NodeDeviceStatus>(&()),
    );
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
        "metadata": {"name": "envtest-not-the-probe"}, "spec": {"nodeName": "envtest-not-the-probe"}
    }))
    .map_err(|e| e.to_string())?;
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match nds.create(&pp, &obj).await {
            Err(kube::Error::Api(s)) if s.message.contains("devplug-agent-own-node") => {
                return Ok(());
            }
            r if Instant::now() > deadline => {
                return Err(format!(
                    "the chart's ValidatingAdmissionPolicy did not judge within 30 s: {r:?}"
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Env {
    fn config(&self, auth: AuthInfo) -> Config {
        let mut c = Config::new(self.url.parse().expect("a URL of our own"));
        c.root_cert_file = Some(self.ca.clone());
        c.auth_info = auth;
        c.read_timeout = Some(Duration::from_secs(60));
        c
    }

    /// A client with system:masters rights: for setting up and reading
    /// what the code under test did, never for the code under test itself.
    pub fn admin(&self) -> Client {
        let auth = AuthInfo {
            client_certificate: Some(self.admin_cert.display().to_string()),
            client_key: Some(self.admin_key.display().to_string()),
            ..Default::default()
        };
        Client::try_from(self.config(auth)).expect("admin client")
    }

    /// A client presenting `token`.
    pub fn client_with_token(&self, token: &str) -> Client {
        Client::try_from(self.token_config(token)).expect("token client")
    }

    fn token_config(&self, token: &str) -> Config {
        let auth = AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        };
        self.config(auth)
    }

    /// The operator's ServiceAccount (the chart's `devplug-operator` in
    /// [`RELEASE_NS`]), judged by the chart's RBAC.
    pub async fn operator(&self) -> Client {
        self.client_with_token(&self.operator_token().await)
    }

    /// The operator's client with a [`Recorder`] in front.
    pub async fn operator_recorded(&self) -> (Client, Recorder) {
        let rec = Recorder::default();
        let client =
            kube::client::ClientBuilder::try_from(self.token_config(&self.operator_token().await))
                .expect("client")
                .with_layer(&rec.clone())
                .build();
        (client, rec)
    }

    /// A client presenting `token` with a [`Recorder`] in front.
    pub fn recorded_client(&self, token: &str) -> (Client, Recorder) {
        let rec = Recorder::default();
        let client = kube::client::ClientBuilder::try_from(self.token_config(token))
            .expect("client")
            .with_layer(&rec.clone())
            .build();
        (client, rec)
    }

    /// A token of the operator's ServiceAccount (one per test binary).
    pub async fn operator_token(&self) -> String {
        if let Some(t) = self.operator_token.lock().unwrap().clone() {
            return t;
        }
        let t = token_request(
            &self.admin(),
            OPERATOR_SA,
            json!({"expirationSeconds": 86400}),
        )
        .await
        .expect("operator token");
        *self.operator_token.lock().unwrap() = Some(t.clone());
        t
    }

    /// The agent of `policy` on `node`: its ServiceAccount, ClusterRole and
    /// binding as the operator makes them, the Node, a pod of that
    /// ServiceAccount bound to the node, and a token bound to that pod (so
    /// it carries the node claim, as an agent's projected token does).
    pub async fn agent_token(&self, policy: &DevicePluginPolicy, node: &str) -> String {
        let admin = self.admin();
        let d = devplug_operator::desired::AgentDefaults {
            namespace: RELEASE_NS.into(),
            ..Default::default()
        };
        let sa = devplug_operator::desired::service_account(policy, &d);
        let sa_name = sa.metadata.name.clone().unwrap();
        for obj in [
            serde_json::to_value(&sa).unwrap(),
            serde_json::to_value(devplug_operator::desired::cluster_role(policy)).unwrap(),
            serde_json::to_value(devplug_operator::desired::cluster_role_binding(policy, &d))
                .unwrap(),
        ] {
            apply_value(&admin, &obj).await.expect("agent RBAC");
        }
        self.node_token(&sa_name, node).await.expect("agent token")
    }

    /// A token of `sa` (in [`RELEASE_NS`]) bound to nothing: no node claim,
    /// as a legacy Secret token.
    pub async fn unbound_token(&self, sa: &str) -> Result<String, String> {
        token_request(&self.admin(), sa, json!({"expirationSeconds": 3600})).await
    }

    /// A token of `sa` (in [`RELEASE_NS`]) bound to a pod on `node`.
    pub async fn node_token(&self, sa: &str, node: &str) -> Result<String, String> {
        let admin = self.admin();
        self.ensure_node(node).await?;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), RELEASE_NS);
        let mut name = format!("tok-{sa}-{node}");
        if name.len() > 63 {
            name = format!(
                "tok-{}",
                devplug_operator::desired::stable_hash(name.as_bytes())
            );
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": RELEASE_NS},
            "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": false,
                     "containers": [{"name": "agent", "image": "devplug-testenv/none:0"}]}
        }))
        .map_err(|e| e.to_string())?;
        let pod = match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => p,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                pods.get(&name).await.map_err(|e| e.to_string())?
            }
            Err(e) => return Err(format!("pod {name}: {e}")),
        };
        token_request(
            &admin,
            sa,
            json!({"expirationSeconds": 86400,
                   "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name,
                                      "uid": pod.metadata.uid}}),
        )
        .await
    }

    /// Creates Node `name` if it does not exist.
    pub async fn ensure_node(&self, name: &str) -> Result<(), String> {
        let nodes: Api<Node> = Api::all(self.admin());
        let node: Node = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        )
        .map_err(|e| e.to_string())?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(format!("node {name}: {e}")),
        }
    }

    /// A kubeconfig file for a process (an agent binary) presenting
    /// `token` to `server` (the API server, or a [`Proxy`] in front of it).
    pub fn kubeconfig(&self, dir: &Path, token: &str, server: Option<&str>) -> PathBuf {
        let path = dir.join("kubeconfig");
        let doc = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": server.unwrap_or(&self.url),
                                                  "certificate-authority": self.ca}}],
            "users": [{"name": "t", "user": {"token": token}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        });
        std::fs::write(&path, serde_yaml::to_string(&doc).unwrap()).unwrap();
        path
    }

    /// The requests `user` made so far, as the API server's audit log has
    /// them (ServiceAccounts only; written when each answer completes).
    pub fn audit(&self, user: &str) -> Vec<Audited> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["user"]["username"] == user && e["stage"] == "ResponseComplete")
            .map(|e| {
                let uri = e["requestURI"].as_str().unwrap_or_default();
                let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
                Audited {
                    verb: e["verb"].as_str().unwrap_or_default().to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                }
            })
            .collect()
    }

    /// Where the daemons' logs and certificates are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

async fn token_request(admin: &Client, sa: &str, spec: Value) -> Result<String, String> {
    let body =
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
    let req = http::Request::post(format!(
        "/api/v1/namespaces/{RELEASE_NS}/serviceaccounts/{sa}/token"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&body).map_err(|e| e.to_string())?)
    .map_err(|e| e.to_string())?;
    let resp: Value = admin
        .request(req)
        .await
        .map_err(|e| format!("token for {sa}: {e}"))?;
    resp["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("token for {sa}: no token in {resp}"))
}

/// Reads any object as JSON by its API path, `None` when it does not exist.
pub async fn get_json(client: &Client, path: &str) -> Option<Value> {
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    match client.request::<Value>(req).await {
        Ok(v) => Some(v),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => panic!("GET {path}: {e}"),
    }
}
