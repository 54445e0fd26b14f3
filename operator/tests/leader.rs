//! Leader election against the fake API server (which refuses a replace
//! carrying a stale resourceVersion, as the real one does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use devplug_operator::leader::LeaseLock;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use support::FakeApi;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/devplug-system/leases/devplug-operator";

#[tokio::test]
async fn one_holder_at_a_time_and_takeover_after_expiry() {
    let (client, api) = FakeApi::start();
    let leases: Api<Lease> = Api::namespaced(client, "devplug-system");
    let a = LeaseLock::new(
        leases.clone(),
        "devplug-operator",
        "a",
        Duration::from_secs(15),
    );
    let b = LeaseLock::new(
        leases.clone(),
        "devplug-operator",
        "b",
        Duration::from_secs(15),
    );

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a creates the lease"
    );
    assert!(!b.try_acquire_or_renew().await.unwrap(), "b must wait");
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    assert_eq!(api.get(PATH).unwrap()["spec"]["holderIdentity"], "a");

    // a stops renewing; its lease expires.
    let mut lease = api.get(PATH).unwrap();
    lease["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    api.put(PATH, lease);
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "b takes over an expired lease"
    );
    let lease = api.get(PATH).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(!a.try_acquire_or_renew().await.unwrap(), "a lost it");
}

#[tokio::test]
async fn a_concurrent_writer_wins_and_the_other_backs_off() {
    let (client, api) = FakeApi::start();
    let leases: Api<Lease> = Api::namespaced(client, "devplug-system");
    let a = LeaseLock::new(
        leases.clone(),
        "devplug-operator",
        "a",
        Duration::from_secs(15),
    );
    assert!(a.try_acquire_or_renew().await.unwrap());
    // Someone else replaced the lease after a read it: a's replace is refused.
    api.fail(http::Method::PUT, "/leases/", 409);
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "a conflict means not leading this round"
    );
    api.heal();
    api.fail(http::Method::GET, "/leases/", 500);
    assert!(
        a.try_acquire_or_renew().await.is_err(),
        "API errors surface to the caller"
    );
}
