//! Leader election against the real API server (which refuses a replace
//! carrying a stale resourceVersion). Every test uses a lease of its own
//! name: the tests of this binary share one API server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use devplug_operator::leader::LeaseLock;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use support::{TestApi, paths, unique};

fn lease_path(name: &str) -> String {
    format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{name}",
        paths::NS
    )
}

/// The tests that run the whole operator take turns: it watches, and while
/// it leads reconciles, every policy on the API server the tests share, so
/// one test's leader would write what another test asserts a standby
/// leaves alone.
static OPERATOR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn calls(api: &TestApi) -> Vec<String> {
    api.log()
        .iter()
        .map(|c| format!("{} {}?{} -> {}", c.method, c.path, c.query, c.code))
        .collect()
}

#[tokio::test]
async fn one_holder_at_a_time_and_takeover_after_expiry() {
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    let leases: Api<Lease> = Api::namespaced(client, paths::NS);
    let a = LeaseLock::new(leases.clone(), lease, "a", Duration::from_secs(15));
    let b = LeaseLock::new(leases.clone(), lease, "b", Duration::from_secs(15));

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a creates the lease"
    );
    assert!(!b.try_acquire_or_renew().await.unwrap(), "b must wait");
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    assert_eq!(api.get(&path).await.unwrap()["spec"]["holderIdentity"], "a");

    // a stops renewing. Its renewTime says 2020 (a clock far behind), but
    // b judges on its own clock: the lease expires only once b has seen it
    // unchanged for its duration (1 s here).
    let mut l = api.get(&path).await.unwrap();
    l["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    l["spec"]["leaseDurationSeconds"] = json!(1);
    api.put(&path, l).await;
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "an old renewTime alone is no expiry (clock skew)"
    );
    // The lease's duration passing is what is tested, not a wait for a
    // condition.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "b takes over a lease unchanged for its duration"
    );
    let l = api.get(&path).await.unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "b");
    assert_eq!(l["spec"]["leaseTransitions"], 1);
    assert!(!a.try_acquire_or_renew().await.unwrap(), "a lost it");
    assert_eq!(
        api.get(&path).await.unwrap()["spec"]["holderIdentity"],
        "b",
        "a did not take it back"
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
}

#[tokio::test]
async fn a_concurrent_writer_wins_and_the_other_backs_off() {
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let (client, api) = support::start().await;
    let leases: Api<Lease> = Api::namespaced(client, paths::NS);
    let a = LeaseLock::new(leases.clone(), lease, "a", Duration::from_secs(15));
    assert!(a.try_acquire_or_renew().await.unwrap());
    // Someone else replaced the lease after a read it: a's replace is refused.
    api.fail(http::Method::PUT, &format!("/leases/{lease}"), 409);
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "a conflict means not leading this round"
    );
    api.heal();
    api.fail(http::Method::GET, &format!("/leases/{lease}"), 500);
    assert!(
        a.try_acquire_or_renew().await.is_err(),
        "API errors surface to the caller"
    );
}

/// The holder renews with one request (the replace of what it wrote last);
/// a lease someone else changed meanwhile is refused by its
/// resourceVersion, read again, and not taken back.
#[tokio::test]
async fn a_renewal_is_one_request_and_a_changed_lease_is_read_again() {
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    let leases: Api<Lease> = Api::namespaced(client, paths::NS);
    let a = LeaseLock::new(leases.clone(), lease, "a", Duration::from_secs(15));
    assert!(a.try_acquire_or_renew().await.unwrap());
    api.clear_log();
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    let methods: Vec<_> = api.log().into_iter().map(|c| (c.method, c.code)).collect();
    assert_eq!(methods, [(http::Method::PUT, 200)], "one replace, no read");

    // Another candidate took the lease (the server gives it a new
    // resourceVersion).
    let mut l = api.get(&path).await.unwrap();
    let renewed = l["metadata"]["resourceVersion"].clone();
    l["spec"]["holderIdentity"] = json!("b");
    api.put(&path, l).await;
    assert_ne!(
        api.get(&path).await.unwrap()["metadata"]["resourceVersion"],
        renewed
    );
    api.clear_log();
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "a does not renew over b"
    );
    assert_eq!(api.get(&path).await.unwrap()["spec"]["holderIdentity"], "b");
    let methods: Vec<_> = api.log().into_iter().map(|c| (c.method, c.code)).collect();
    assert_eq!(
        methods,
        [(http::Method::PUT, 409), (http::Method::GET, 200)],
        "refused, then read"
    );
}

/// Two real candidates race for a free lease, again and again: each time
/// exactly one wins (the API server's optimistic concurrency decides, not an
/// injected error), and the loser keeps standing by while the winner renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_candidates_racing_never_both_lead() {
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    let leases: Api<Lease> = Api::namespaced(client, paths::NS);
    let lock = |id: &str| LeaseLock::new(leases.clone(), lease, id, Duration::from_secs(15));
    for round in 0..40 {
        let (a, b) = (lock("a"), lock("b"));
        if round % 2 == 0 {
            api.delete_object(&path).await; // free: both try to create it
            assert!(api.get(&path).await.is_none());
        } else if let Some(mut l) = api.get(&path).await {
            l["spec"]["holderIdentity"] = json!(""); // released: both try to take it
            api.put(&path, l).await;
        }
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { (a.try_acquire_or_renew().await.unwrap(), a) }),
            tokio::spawn(async move { (b.try_acquire_or_renew().await.unwrap(), b) }),
        );
        let ((wa, a), (wb, b)) = (ra.unwrap(), rb.unwrap());
        assert!(
            wa ^ wb,
            "round {round}: a={wa} b={wb}, exactly one must lead"
        );
        let (winner, loser, id) = if wa { (a, b, "a") } else { (b, a, "b") };
        assert_eq!(
            api.get(&path).await.unwrap()["spec"]["holderIdentity"],
            id,
            "round {round}"
        );
        assert!(
            winner.try_acquire_or_renew().await.unwrap(),
            "the winner renews"
        );
        assert!(
            !loser.try_acquire_or_renew().await.unwrap(),
            "the loser stands by"
        );
    }
    assert!(api.denied().is_empty(), "{:?}", api.denied());
}

fn args(lease: &str) -> devplug_operator::args::Args {
    use clap::Parser;
    devplug_operator::args::Args::parse_from([
        "devplug-operator",
        "--metrics-addr",
        "127.0.0.1:0",
        "--lease-name",
        lease,
    ])
}

/// Seen on the real cluster: a replica deleted while it stood by (or just
/// after it started) ignored SIGTERM, because the handler was installed only
/// once it led, and ran on for the whole grace period. A standby stops at
/// once and leaves the lease alone.
#[tokio::test]
async fn a_standby_stops_at_once_when_told() {
    let _turn = OPERATOR.lock().await;
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    // A MicroTime, as the API server parses a renewTime.
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    api.put(
        &path,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": lease, "namespace": paths::NS},
               "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 15,
                        "renewTime": now}}),
    )
    .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(devplug_operator::run_with(
        client,
        args(lease),
        Default::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Standing by: it has read the lease at least once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !api.log().iter().any(|c| c.path == path && c.code == 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "never tried the lease: {:?}",
            calls(&api)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let told = std::time::Instant::now();
    stop_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), run)
        .await
        .expect("a standby must stop within 2 s of being told");
    assert!(r.unwrap().is_ok());
    assert!(told.elapsed() < Duration::from_secs(2));
    assert_eq!(
        api.get(&path).await.unwrap()["spec"]["holderIdentity"],
        "someone-else"
    );
    assert!(
        !api.writes().iter().any(|c| c.path == path),
        "a standby leaves the lease alone: {:?}",
        calls(&api)
    );
}

/// A leader told to stop releases the lease before it returns, so a standby
/// takes over at its next try instead of after the lease expires.
#[tokio::test]
async fn a_leader_told_to_stop_releases_the_lease() {
    let _turn = OPERATOR.lock().await;
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The operator's namespace exists (it runs in it), without the label
    // the operator puts on it.
    let ns = format!("/api/v1/namespaces/{}", paths::NS);
    let mut n = api.get(&ns).await.expect("the operator's namespace");
    let label = devplug_operator::POD_SECURITY_ENFORCE;
    if let Some(labels) = n["metadata"]["labels"].as_object_mut()
        && labels.remove(label).is_some()
    {
        n.as_object_mut().unwrap().remove("status");
        api.put(&ns, n).await;
    }
    assert!(api.get(&ns).await.unwrap()["metadata"]["labels"][label].is_null());
    let mut args = args(lease);
    args.namespace_pod_security = "privileged".into();
    let run = tokio::spawn(devplug_operator::run_with(
        client,
        args,
        Default::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let holder = api
            .get(&path)
            .await
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string));
        if holder.is_some_and(|h| !h.is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never led: {:?}",
            calls(&api)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Leading, it labels its namespace for the Pod Security agents need
    // (under the chart's RBAC, which the API server enforces).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api
        .get(&ns)
        .await
        .map(|n| n["metadata"]["labels"][label].clone())
        != Some(json!("privileged"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "namespace never labelled: {:?}; denied {:?}",
            api.get(&ns).await,
            api.denied()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("a leader must stop promptly");
    assert!(r.unwrap().is_ok());
    let l = api.get(&path).await.unwrap();
    assert!(
        l["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "lease still held after stopping: {l}"
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
}

/// A local address nothing listens on, for the admin server.
fn free_addr() -> std::net::SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// `GET path` over plain HTTP/1.0: (status code, content type, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    Some((code, ctype, body.to_string()))
}

/// A replica is ready only once its stores have listed the cluster (so
/// the CRDs exist): a readiness probe must not pass while it cannot see
/// the policies, leading or not. `/metrics` answers with the content type of what it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_stores_and_metrics_say_their_format() {
    let _turn = OPERATOR.lock().await;
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    // The policies cannot be listed (as when the CRD is missing).
    api.fail(http::Method::GET, "/devicepluginpolicies", 404);
    let addr = free_addr();
    let mut a = args(lease);
    a.metrics_addr = addr;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(devplug_operator::run_with(
        client,
        a,
        Default::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Leading, but blind: not ready, and it stays so.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.get(&path).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "never led: {:?}",
            calls(&api)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        let got = http_get(addr, "/readyz").await.map(|r| r.0);
        assert_eq!(got, Some(503), "ready while its stores are empty");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        api.log()
            .iter()
            .any(|c| c.path.ends_with("/devicepluginpolicies") && c.code == 404),
        "the policies were asked for and refused: {:?}",
        calls(&api)
    );
    api.heal();
    // The policy watch retries on kube's backoff (up to 30 s between tries).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if http_get(addr, "/readyz").await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready once the stores listed: denied {:?}; calls {:?}",
            api.denied(),
            calls(&api)
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, ctype, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    stop_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("a leader must stop promptly");
    assert!(r.unwrap().is_ok());
}

/// Seen in CI and in bench-scale: on a saturated API server no renewal
/// answered for 10 s, the leader exited, and the restarted container did the
/// same again (CrashLoopBackOff, no operator for minutes). A leader that
/// cannot renew now stops its controllers before the lease can expire and
/// stands by again in the same process; once the API server answers it
/// leads again.
#[tokio::test]
async fn a_leader_that_cannot_renew_stands_by_again_instead_of_exiting() {
    let _turn = OPERATOR.lock().await;
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let (client, api) = support::start().await;
    let metrics = std::sync::Arc::new(devplug_operator::metrics::Metrics::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Short, yet with room for a real API server on a loaded machine: a
    // renewal answered late there must not end leadership before the
    // failures below do.
    let renewal = devplug_operator::leader::Renewal {
        every: Duration::from_millis(100),
        retry: Duration::from_millis(50),
        attempt: Duration::from_millis(1000),
        deadline: Duration::from_millis(2000),
    };
    let run = tokio::spawn(devplug_operator::run_with_renewal(
        client,
        args(lease),
        metrics.clone(),
        async move {
            let _ = stop_rx.await;
        },
        renewal,
    ));
    let wait_for = |want: bool, what: &'static str| {
        let metrics = metrics.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while metrics.leading() != want {
                assert!(std::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(true, "never led").await;

    api.fail(http::Method::PUT, &format!("/leases/{lease}"), 500);
    api.fail(http::Method::GET, &format!("/leases/{lease}"), 500);
    wait_for(false, "still leading without a renewal").await;
    assert!(!run.is_finished(), "the process must not exit");
    assert!(
        metrics
            .render()
            .contains("devplug_operator_leadership_lost_total 1"),
        "{}",
        metrics.render()
    );

    api.heal();
    wait_for(true, "did not lead again once the API server answered").await;
    stop_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("a leader must stop promptly");
    assert!(r.unwrap().is_ok());
}

/// Measured in bench-scale: a standby that took over listed every
/// NodeDeviceStatus again before its first correct status (24 s at 2,000
/// nodes). A standby now keeps its watches (and stores) from the start, and
/// on taking over reconciles what its stores hold without listing again.
/// The API server holds watches open with nothing to report, so a new
/// leader that relied on a fresh listing would have to list, and one that
/// followed only new events would never reconcile the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_keeps_its_stores_and_leads_without_listing_again() {
    let _turn = OPERATOR.lock().await;
    let warm_name = unique("warm");
    let warm = warm_name.as_str();
    let lease_name = unique("devplug-operator");
    let lease = lease_name.as_str();
    let path = lease_path(lease);
    let (client, api) = support::start().await;
    support::seed(
        &api,
        &[support::policy_json(
            warm,
            &format!("example.com/{warm}"),
            json!({}),
        )],
    )
    .await;
    // A MicroTime, as the API server parses a renewTime.
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    api.put(
        &path,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": lease, "namespace": paths::NS},
               "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 15,
                        "renewTime": now}}),
    )
    .await;
    let metrics = std::sync::Arc::new(devplug_operator::metrics::Metrics::default());
    let addr = free_addr();
    let mut a = args(lease);
    a.metrics_addr = addr;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(devplug_operator::run_with(
        client,
        a,
        metrics.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Standing by, it lists and then watches each kind the controllers read.
    let kinds = [
        "/devicepluginpolicies",
        "/nodedevicestatuses",
        "/daemonsets",
        "/pods",
        "/nodes",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = api.log();
        let watching = |k: &str| {
            log.iter()
                .any(|c| c.path.ends_with(k) && c.query.contains("watch=true"))
        };
        if kinds.iter().all(|k| watching(k)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a standby must watch every kind; calls {:?}, denied {:?}",
            calls(&api),
            api.denied()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!metrics.leading());
    // Warm, the standby is ready (a rollout may now stop the old leader).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/readyz").await.map(|r| r.0) != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "a warm standby must be ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        api.writes().is_empty(),
        "a standby must not write: {:?}",
        api.writes()
    );
    assert!(
        api.get(&support::paths::policy(warm)).await.unwrap()["metadata"]["finalizers"].is_null(),
        "a standby must not write"
    );

    // The holder releases the lease: the standby takes over.
    api.clear_log();
    let mut l = api.get(&path).await.unwrap();
    l["spec"]["holderIdentity"] = json!("");
    api.put(&path, l).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics.leading() {
        assert!(std::time::Instant::now() < deadline, "never led");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It reconciles the policy it already holds: the status is written.
    let status = format!("{}/status", support::paths::policy(warm));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = api.get(&support::paths::policy(warm)).await.unwrap();
        let wrote = api
            .writes()
            .iter()
            .any(|c| c.path == status && c.code == 200);
        if wrote && !p["status"]["observedGeneration"].is_null() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new leader never reconciled the policy its store held: {p}; calls {:?}",
            calls(&api)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The collections the watches list (a reconcile's own one-off reads,
    // such as the cluster's Failed pods, are not the watches').
    let watched = [
        "/apis/devplug.io/v1alpha1/devicepluginpolicies",
        "/apis/devplug.io/v1alpha1/nodedevicestatuses",
        "/apis/apps/v1/namespaces/devplug-system/daemonsets",
        "/api/v1/namespaces/devplug-system/pods",
        "/api/v1/nodes",
    ];
    let relisted: Vec<String> = api
        .log()
        .iter()
        .filter(|c| {
            c.method == http::Method::GET
                && watched.contains(&c.path.as_str())
                && !c.query.contains("watch=true")
        })
        .map(|c| format!("{}?{}", c.path, c.query))
        .collect();
    assert!(
        relisted.is_empty(),
        "the new leader listed again: {relisted:?}"
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    stop_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("a leader must stop promptly");
    assert!(r.unwrap().is_ok());
}
