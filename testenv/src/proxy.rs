//! A TCP relay in front of the API server that a test can cut and restore:
//! "the API server went away" for a process (an agent) that holds a
//! kubeconfig pointing at the relay. TLS passes through untouched.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The relay; dropping it cuts every connection.
pub struct Proxy {
    /// `https://127.0.0.1:<port>`, for a kubeconfig.
    pub url: String,
    up: Arc<watch::Sender<bool>>,
}

impl Proxy {
    /// Relays 127.0.0.1:<new port> to `target` (`https://host:port`).
    pub async fn start(target: &str) -> Proxy {
        let target = target.trim_start_matches("https://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (tx, _) = watch::channel(true);
        let up = Arc::new(tx);
        let weak = Arc::downgrade(&up);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let Some(up) = weak.upgrade() else { return };
                if !*up.borrow() {
                    continue; // cut: refuse by closing at once
                }
                let mut cut = up.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    // Without it, a request with a body waits out the
                    // peer's delayed ACK (about 40 ms) on this hop.
                    let _ = conn.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut a, mut b) = (conn, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { url, up }
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Relays again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
