//! The claim reader (`devplug_agent::http2`) against the real
//! kube-apiserver: once warm (as the agent warms it at start), fifty reads
//! at once share its one connection, where `kube`'s default client opens a
//! connection for each read in flight.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use devplug_testenv::env;

/// Established TCP connections from this machine to `port` (the client
/// side: remote port `port`), from `/proc/net/tcp` and `tcp6`.
fn connections_to(port: u16) -> usize {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[2].ends_with(&want) && cols[3] == "01"
        })
        .count()
}

async fn fifty_reads_at_once(client: &kube::Client) {
    let reads = (0..50).map(|_| {
        let c = client.clone();
        async move { c.apiserver_version().await.unwrap() }
    });
    futures::future::join_all(reads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reads_at_once_share_one_http2_connection() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let token = env.operator_token().await;
    let path = env.kubeconfig(dir.path(), &token, None);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let port = config.cluster_url.port_u16().unwrap();
    let before = connections_to(port);

    let reader = devplug_agent::http2::client(&config).unwrap();
    devplug_agent::http2::warm(&reader).await;
    fifty_reads_at_once(&reader).await;
    let with_reader = connections_to(port) - before;
    assert!(
        (1..=2).contains(&with_reader),
        "50 reads at once over HTTP/2 opened {with_reader} connections"
    );

    // What the default client does with the same reads: the check can fail.
    let default = kube::Client::try_from(config).unwrap();
    let before = connections_to(port);
    fifty_reads_at_once(&default).await;
    let with_default = connections_to(port) - before;
    assert!(
        with_default > 2,
        "kube's default client opened only {with_default} connections for 50 reads at once"
    );
    println!(
        "50 reads at once: {with_reader} connection(s) with the reader, {with_default} with kube's default client"
    );
}
