//! Test and benchmark support: a kubelet simulator and a handle on the real
//! agent binary running in standalone mode over temp directories.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplug_proto::deviceplugin::v1beta1 as dp;
use dp::device_plugin_client::DevicePluginClient;
use dp::registration_server::{Registration, RegistrationServer};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

pub mod cluster;
pub mod podresources;

/// Dials a Unix socket as a tonic channel.
pub async fn dial(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let p = path.to_path_buf();
    Endpoint::from_static("http://sim.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move { UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
}

/// One Register call the simulator received.
#[derive(Clone, Debug)]
pub struct Registered {
    pub req: dp::RegisterRequest,
    pub at: Instant,
    /// Whether the plugin socket existed and answered GetDevicePluginOptions
    /// when the simulator dialled back (the plugin must serve before it registers).
    pub options: Option<dp::DevicePluginOptions>,
}

/// Latest ListAndWatch message per resource, with its arrival time.
type Lists = HashMap<String, watch::Sender<Option<(Vec<dp::Device>, Instant)>>>;

#[derive(Default)]
struct Shared {
    registrations: Mutex<Vec<Registered>>,
    reg_tx: Mutex<Option<watch::Sender<usize>>>,
    lists: Mutex<Lists>,
    streams: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    refuse: Mutex<usize>,
    /// Per resource: how often a plugin-side stream end made the kubelet
    /// disconnect the resource (PluginDisconnected: every device Unhealthy).
    disconnects: Mutex<HashMap<String, usize>>,
    /// Every stream task, current or replaced, so a kubelet stop ends them all.
    all_streams: Mutex<Vec<tokio::task::AbortHandle>>,
}

#[derive(Clone)]
struct RegistrationSvc {
    dir: PathBuf,
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Registration for RegistrationSvc {
    async fn register(
        &self,
        req: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let req = req.into_inner();
        {
            let mut refuse = self.shared.refuse.lock().unwrap();
            if *refuse > 0 {
                *refuse -= 1;
                return Err(Status::failed_precondition("simulated refusal"));
            }
        }
        // The kubelet's own checks.
        if req.version != dp::VERSION {
            return Err(Status::invalid_argument(format!(
                "unsupported version {}",
                req.version
            )));
        }
        let Some((domain, _)) = req.resource_name.split_once('/') else {
            return Err(Status::invalid_argument(
                "resource name is not an extended resource",
            ));
        };
        if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
            return Err(Status::invalid_argument("resource name in kubernetes.io"));
        }
        if req.endpoint.contains('/') {
            return Err(Status::invalid_argument("endpoint must be a file name"));
        }
        let at = Instant::now();
        // Dial back as the kubelet does, before answering the plugin's call
        // returns from its point of view is irrelevant: the plugin must
        // already be serving.
        let socket = self.dir.join(&req.endpoint);
        let mut options = None;
        // The kubelet connects to the plugin inside Register and answers
        // with an error when it cannot.
        let ch = dial(&socket).await.map_err(|e| {
            Status::unknown(format!(
                "failed to dial device plugin {}: {e}",
                socket.display()
            ))
        })?;
        {
            let mut client = DevicePluginClient::new(ch);
            if let Ok(o) = client.get_device_plugin_options(dp::Empty {}).await {
                options = Some(o.into_inner());
            }
            if let Ok(resp) = client.list_and_watch(dp::Empty {}).await {
                let mut stream = resp.into_inner();
                let tx = {
                    let mut lists = self.shared.lists.lock().unwrap();
                    lists
                        .entry(req.resource_name.clone())
                        .or_insert_with(|| watch::channel(None).0)
                        .clone()
                };
                let shared = self.shared.clone();
                let resource = req.resource_name.clone();
                let task = tokio::spawn(async move {
                    while let Ok(Some(msg)) = stream.message().await {
                        tx.send_replace(Some((msg.devices, Instant::now())));
                    }
                    // The plugin ended this stream. The kubelet (1.36,
                    // plugin/v1beta1 runClient) then disconnects whichever
                    // client is registered for the resource *now*, even a
                    // newer one, and marks every device Unhealthy.
                    if let Some(current) = shared.streams.lock().unwrap().remove(&resource) {
                        current.abort();
                    }
                    *shared
                        .disconnects
                        .lock()
                        .unwrap()
                        .entry(resource)
                        .or_default() += 1;
                    tx.send_modify(|l| {
                        if let Some((devices, at)) = l {
                            for d in devices.iter_mut() {
                                d.health = "Unhealthy".into();
                            }
                            *at = Instant::now();
                        }
                    });
                });
                // A new registration replaces the old endpoint in the map,
                // as in the kubelet, which does not close the old one: its
                // stream runs until the plugin ends it (see above).
                self.shared
                    .all_streams
                    .lock()
                    .unwrap()
                    .push(task.abort_handle());
                let _ = self
                    .shared
                    .streams
                    .lock()
                    .unwrap()
                    .insert(req.resource_name.clone(), task);
            }
        }
        self.shared
            .registrations
            .lock()
            .unwrap()
            .push(Registered { req, at, options });
        let n = self.shared.registrations.lock().unwrap().len();
        // Concurrent registrations read their counts in any order: never
        // let a stale count overwrite a newer one (a waiter for the newest
        // would then time out with the registration already there).
        if let Some(tx) = self.shared.reg_tx.lock().unwrap().as_ref() {
            tx.send_if_modified(|c| {
                let newer = n > *c;
                if newer {
                    *c = n;
                }
                newer
            });
        }
        Ok(Response::new(dp::Empty {}))
    }
}

/// A kubelet's device manager, as far as a device plugin can tell.
pub struct KubeletSim {
    pub dir: PathBuf,
    shared: Arc<Shared>,
    reg_rx: watch::Receiver<usize>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl KubeletSim {
    /// Starts serving `<dir>/kubelet.sock`.
    pub fn start(dir: &Path) -> Self {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = watch::channel(0);
        *shared.reg_tx.lock().unwrap() = Some(tx);
        let mut sim = Self {
            dir: dir.to_path_buf(),
            shared,
            reg_rx: rx,
            server: None,
        };
        sim.serve();
        sim
    }

    fn serve(&mut self) {
        self.serve_after(Duration::ZERO);
    }

    /// Binds kubelet.sock now but listens only after `delay`, as the real
    /// kubelet does (the file exists, a dial is refused, then it answers).
    fn serve_after(&mut self, delay: Duration) {
        let sock = self.dir.join(dp::KUBELET_SOCKET);
        let _ = std::fs::remove_file(&sock);
        let raw = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        raw.bind(&socket2::SockAddr::unix(&sock).unwrap()).unwrap();
        let svc = RegistrationSvc {
            dir: self.dir.clone(),
            shared: self.shared.clone(),
        };
        self.server = Some(tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            raw.listen(128).unwrap();
            raw.set_nonblocking(true).unwrap();
            let std_listener: std::os::unix::net::UnixListener = raw.into();
            let listener = UnixListener::from_std(std_listener).unwrap();
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(svc))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        }));
    }

    /// A kubelet restart as the real one does it: stop, delete every socket,
    /// bind kubelet.sock, and listen only `delay` later. Returns when the
    /// socket file exists again.
    pub fn restart_bind_then_listen(&mut self, delay: Duration) -> Instant {
        self.stop();
        self.wipe_sockets();
        self.serve_after(delay);
        Instant::now()
    }

    /// ListAndWatch streams the simulator holds open now, replaced ones
    /// included (the kubelet does not close those itself).
    pub fn open_streams(&self) -> usize {
        self.shared
            .all_streams
            .lock()
            .unwrap()
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// How often the resource was disconnected by a stream the plugin ended.
    pub fn disconnects(&self, resource: &str) -> usize {
        self.shared
            .disconnects
            .lock()
            .unwrap()
            .get(resource)
            .copied()
            .unwrap_or(0)
    }

    /// Stops the kubelet: drops every plugin stream and its own socket.
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        for (_, t) in self.shared.streams.lock().unwrap().drain() {
            t.abort();
        }
        for t in self.shared.all_streams.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// What a kubelet restart does: stop, delete every socket in the plugin
    /// directory, then create kubelet.sock again. Returns when kubelet.sock
    /// exists again.
    pub fn restart(&mut self) -> Instant {
        self.stop();
        self.wipe_sockets();
        self.serve();
        Instant::now()
    }

    /// Deletes every file in the plugin directory.
    pub fn wipe_sockets(&self) {
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }

    /// Drops the ListAndWatch stream of a resource without registering anything.
    pub fn drop_stream(&self, resource: &str) {
        if let Some(t) = self.shared.streams.lock().unwrap().remove(resource) {
            t.abort();
        }
    }

    /// Refuses the next `n` Register calls, as a kubelet that is not ready would.
    pub fn refuse_next(&self, n: usize) {
        *self.shared.refuse.lock().unwrap() = n;
    }

    /// All registrations so far.
    pub fn registrations(&self) -> Vec<Registered> {
        self.shared.registrations.lock().unwrap().clone()
    }

    /// Waits until at least `n` registrations arrived; returns the n-th.
    pub async fn wait_registrations(&mut self, n: usize, timeout: Duration) -> Registered {
        let ok = tokio::time::timeout(timeout, self.reg_rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        assert!(
            ok,
            "no registration #{n} within {timeout:?}; got {:?}",
            self.registrations().len()
        );
        self.registrations()[n - 1].clone()
    }

    /// Waits for a registration that arrived after `since`.
    pub async fn wait_registration_after(
        &mut self,
        since: Instant,
        timeout: Duration,
    ) -> Registered {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.registrations().into_iter().find(|r| r.at >= since) {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no registration after the restart within {timeout:?}"
            );
            let _ = tokio::time::timeout(left, self.reg_rx.changed()).await;
        }
    }

    fn list_rx(&self, resource: &str) -> watch::Receiver<Option<(Vec<dp::Device>, Instant)>> {
        let mut lists = self.shared.lists.lock().unwrap();
        lists
            .entry(resource.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Waits until the latest list of `resource` satisfies `pred`.
    pub async fn wait_list<F>(
        &self,
        resource: &str,
        timeout: Duration,
        pred: F,
    ) -> (Vec<dp::Device>, Instant)
    where
        F: Fn(&[dp::Device]) -> bool,
    {
        let mut rx = self.list_rx(resource);
        let res = tokio::time::timeout(
            timeout,
            rx.wait_for(|v| v.as_ref().is_some_and(|(d, _)| pred(d))),
        )
        .await
        .ok()
        .and_then(|r| r.ok().map(|v| v.clone()));
        match res {
            Some(v) => v.unwrap(),
            None => panic!(
                "list of {resource} did not reach the expected state within {timeout:?}; last: {:?}",
                rx.borrow().as_ref().map(|(d, _)| d.clone())
            ),
        }
    }

    /// Latest list of a resource.
    pub fn list(&self, resource: &str) -> Option<Vec<dp::Device>> {
        self.list_rx(resource)
            .borrow()
            .as_ref()
            .map(|(d, _)| d.clone())
    }

    /// A client on a plugin socket, as the kubelet's Allocate path uses.
    pub async fn client(&self, endpoint: &str) -> DevicePluginClient<Channel> {
        DevicePluginClient::new(dial(&self.dir.join(endpoint)).await.unwrap())
    }
}

impl Drop for KubeletSim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Temp directories standing in for a node: plugin dir, /dev, /sys, sim control.
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub plugins: PathBuf,
    pub dev: PathBuf,
    pub sys: PathBuf,
    pub sim: PathBuf,
    /// The node's name (unique to the test: the tests of a binary share one
    /// API server).
    pub name: String,
}

impl Node {
    /// The CDI spec directory the agents of this node write to.
    pub fn cdi(&self) -> PathBuf {
        self.tmp.path().join("cdi")
    }

    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |n: &str| {
            let p = tmp.path().join(n);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        Self {
            plugins: mk("device-plugins"),
            dev: mk("dev"),
            sys: mk("sys"),
            sim: mk("sim"),
            name: devplug_testenv::unique("test-node"),
            tmp,
        }
    }

    /// Where the fake PodResources server listens.
    pub fn pod_resources_socket(&self) -> PathBuf {
        self.tmp.path().join("pod-resources.sock")
    }

    /// Sets a simulated device's state the way a user would, with the CLI.
    pub fn sim_set(&self, policy: &str, device: &str, state: &str) {
        let st = Command::new(env!("CARGO_BIN_EXE_devplug-agent"))
            .args(["sim", "--control-dir"])
            .arg(&self.sim)
            .args([policy, device, state, "test flip"])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Same, without spawning a process (for latency measurements).
    pub fn sim_write(&self, policy: &str, device: &str, content: &str) {
        let dir = self.sim.join(policy);
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".{device}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, dir.join(device)).unwrap();
    }
}

/// The real agent binary, in standalone mode.
pub struct Agent {
    pub child: Child,
    pub admin: Option<String>,
}

impl Agent {
    /// Writes `yaml` as the config and starts the agent over `node`.
    pub fn spawn(node: &Node, yaml: &str) -> Self {
        Self::spawn_with(node, yaml, &[])
    }

    pub fn spawn_with(node: &Node, yaml: &str, extra: &[&str]) -> Self {
        let cfg = node
            .tmp
            .path()
            .join(format!("policy-{}.yaml", std::process::id()));
        std::fs::write(&cfg, yaml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_devplug-agent"));
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--plugin-dir")
            .arg(&node.plugins)
            .arg("--dev-root")
            .arg(&node.dev)
            .arg("--sys-root")
            .arg(&node.sys)
            .arg("--sim-control-dir")
            .arg(&node.sim)
            .arg("--cdi-dir")
            .arg(node.cdi())
            .arg("--node-name")
            .arg(&node.name)
            .arg("--pod-resources-socket")
            .arg(node.pod_resources_socket())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .env(
                "DEVPLUG_LOG",
                std::env::var("DEVPLUG_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let admin = extra
            .windows(2)
            .find(|w| w[0] == "--admin-addr")
            .map(|w| w[1].to_string());
        if !extra.contains(&"--admin-addr") {
            cmd.args(["--admin-addr", "off"]);
        }
        let child = cmd.spawn().unwrap();
        Self { child, admin }
    }

    /// Starts the agent in cluster mode for `policy`, with `kubeconfig`.
    pub fn spawn_cluster(node: &Node, policy: &str, kubeconfig: &Path) -> Self {
        Self::spawn_cluster_with(node, policy, kubeconfig, &["--admin-addr", "off"])
    }

    /// Same, with extra flags.
    pub fn spawn_cluster_with(
        node: &Node,
        policy: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Self {
        Self::spawn_cluster_env(node, policy, kubeconfig, extra, &[])
    }

    /// Same, with extra environment variables.
    pub fn spawn_cluster_env(
        node: &Node,
        policy: &str,
        kubeconfig: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_devplug-agent"))
            .envs(envs.iter().copied())
            .args(["--policy", policy, "--node-name", &node.name])
            .args(extra)
            .arg("--pod-resources-socket")
            .arg(node.pod_resources_socket())
            .arg("--plugin-dir")
            .arg(&node.plugins)
            .arg("--sim-control-dir")
            .arg(&node.sim)
            .arg("--cdi-dir")
            .arg(node.cdi())
            .env("KUBECONFIG", kubeconfig)
            .env(
                "DEVPLUG_LOG",
                std::env::var("DEVPLUG_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, admin: None }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 10 s) for the process to end by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A policy document.
pub fn policy(name: &str, resource: &str, body: &str) -> String {
    format!(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata:\n  name: {name}\nspec:\n  resourceName: {resource}\n{body}"
    )
}

/// A free loopback TCP address.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A plain HTTP GET returning (status, body).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}
