//! The client prepare reads claims and pods with: the API server's
//! HTTP/2 where it offers it (ALPN), so the reads of many claims prepared
//! at once share one connection as streams, instead of one HTTP/1.1
//! connection (and TLS handshake) each, which `kube`'s own client speaks.
//!
//! Only for those short GETs; the agent's watches and writes keep `kube`'s
//! default client and its read timeouts. The same layers as `kube`'s stack
//! (base URI, authentication with token refresh); HTTP/2 keepalive pings
//! find a dead connection. A server that answers HTTP/1.1 only is spoken
//! to in HTTP/1.1.
//!
//! Which protocol a connection speaks is known only once it is made, so
//! reads that all start before the first connection exists each open one
//! (the extra ones close once HTTP/2 is known). [`warm`] makes that first
//! connection when the agent starts, and it is kept open while idle (pings
//! keep it honest), so a burst of prepares finds it there.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder};

/// How often an idle HTTP/2 connection is pinged, and how long the answer
/// may take before the connection counts as dead.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

/// A client for `config` that prefers HTTP/2.
pub fn client(config: &kube::Config) -> Result<kube::Client, kube::Error> {
    // The connector offers h2 and http/1.1 by ALPN itself.
    let tls = config.rustls_client_config()?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEPALIVE.0)
        .http2_keep_alive_timeout(KEEPALIVE.1)
        .http2_keep_alive_while_idle(true)
        .pool_idle_timeout(None)
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

/// Makes the reader's connection now (see the module docs); a failure
/// only means the first burst opens its own connections.
pub async fn warm(reader: &kube::Client) {
    if let Err(e) = reader.apiserver_version().await {
        tracing::debug!(error = %e, "the claim reader's first connection failed; made on first use");
    }
}
