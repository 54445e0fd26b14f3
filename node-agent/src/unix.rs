//! gRPC clients on Unix sockets (the kubelet's Registration and PodResources
//! services), and one-line error chains for their failures.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Dials a gRPC server on a Unix socket. The URI is required by the API but
/// unused: the connector dials the socket.
pub async fn dial(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://kubelet.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
}

/// An error and its causes on one line ("transport error: No such file…"),
/// without the repeats hyper and tonic add when they wrap the same error.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if parts.last() != Some(&m) {
            parts.push(m);
        }
        cur = c.source();
    }
    parts.join(": ")
}
