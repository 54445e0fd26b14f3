//! Serving one plugin on its Unix socket.
//!
//! The socket can vanish under us (the kubelet deletes every socket in the
//! plugin directory when it restarts), so the listener is owned by a small
//! acceptor task that can re-bind on request, while one tonic server keeps
//! running and reads accepted connections from a channel.

use std::io;
use std::path::{Path, PathBuf};

use devplug_proto::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, error, info};

use crate::deviceplugin::plugin::PluginService;

/// Handle to ask the acceptor to re-create the socket.
#[derive(Clone)]
pub struct Rebind {
    tx: mpsc::Sender<oneshot::Sender<io::Result<()>>>,
    path: PathBuf,
}

impl Rebind {
    /// Re-creates the socket file and listens on it again.
    pub async fn rebind(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| io::Error::other("acceptor stopped"))?;
        rx.await.map_err(|_| io::Error::other("acceptor stopped"))?
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes a stale socket file and binds a fresh listener.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Binds `path` and serves `svc` on it until `shutdown`; the socket file is
/// removed on the way out. Binding errors at start are returned at once.
pub fn serve(
    path: PathBuf,
    svc: PluginService,
    shutdown: watch::Receiver<bool>,
) -> io::Result<(Rebind, tokio::task::JoinHandle<()>)> {
    let listener = bind(&path)?;
    let (conn_tx, conn_rx) = mpsc::channel::<io::Result<UnixStream>>(16);
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<oneshot::Sender<io::Result<()>>>(4);

    let acceptor_path = path.clone();
    let mut acceptor_shutdown = shutdown.clone();
    let acceptor = tokio::spawn(async move {
        let mut listener = Some(listener);
        loop {
            tokio::select! {
                _ = crate::stopped(&mut acceptor_shutdown) => break,
                cmd = cmd_rx.recv() => {
                    let Some(reply) = cmd else { break };
                    listener = None;
                    let result = bind(&acceptor_path).map(|l| { listener = Some(l); });
                    match &result {
                        Ok(()) => info!(socket = %acceptor_path.display(), "socket re-created"),
                        Err(e) => error!(socket = %acceptor_path.display(), error = %e, "cannot re-create socket"),
                    }
                    let _ = reply.send(result);
                }
                conn = async {
                    match listener.as_ref() {
                        Some(l) => l.accept().await.map(|(s, _)| s),
                        None => std::future::pending().await,
                    }
                } => {
                    if conn_tx.send(conn).await.is_err() {
                        break;
                    }
                }
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&acceptor_path);
    });

    let mut server_shutdown = shutdown;
    let server = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(svc))
            .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                crate::stopped(&mut server_shutdown).await;
            })
            .await;
        if let Err(e) = result {
            error!(error = %e, "device plugin server failed");
        }
        let _ = acceptor.await;
    });
    Ok((Rebind { tx: cmd_tx, path }, server))
}
