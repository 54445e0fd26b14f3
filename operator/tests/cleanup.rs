//! `devplug-operator cleanup`, the chart's pre-delete hook, against a real
//! API server: it deletes every policy and waits for the operator to
//! release each, within its deadline, and says what is left when the
//! deadline passes. (One test: the command deletes every policy of the
//! API server this binary starts.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use devplug_api::DevicePluginPolicy;
use devplug_operator::cleanup::{self, CleanupError};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn policy(name: &str) -> DevicePluginPolicy {
    serde_json::from_value(json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": name, "finalizers": [devplug_operator::controller::FINALIZER]},
        "spec": {"resourceName": "example.com/cleanup", "source": {"simulated": {"count": 1}}},
    }))
    .unwrap()
}

#[tokio::test]
async fn cleanup_deletes_every_policy_waits_for_the_operator_and_names_what_is_left() {
    let env = devplug_testenv::env();
    let admin = env.admin();
    let api: Api<DevicePluginPolicy> = Api::all(admin.clone());
    // Nothing to do is fine.
    cleanup::run_with(admin.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    for n in ["cleanup-a", "cleanup-b"] {
        api.create(&PostParams::default(), &policy(n))
            .await
            .unwrap();
    }

    // No operator serves the finalizer: the deadline passes, and the error
    // names each policy and the way on.
    let err = cleanup::run_with(admin.clone(), Duration::from_secs(2))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CleanupError::Timeout(_, 2, _)), "{msg}");
    assert!(
        msg.contains("cleanup-a") && msg.contains("cleanup-b") && msg.contains("--no-hooks"),
        "{msg}"
    );
    let left = api.list(&Default::default()).await.unwrap();
    assert!(
        left.items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some()),
        "both were deleted"
    );

    // An operator releases them (here: after a while, one by one).
    let releaser = {
        let api = api.clone();
        tokio::spawn(async move {
            for n in ["cleanup-a", "cleanup-b"] {
                tokio::time::sleep(Duration::from_millis(700)).await;
                api.patch(
                    n,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await
                .unwrap();
            }
        })
    };
    cleanup::run_with(admin.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    releaser.await.unwrap();
    assert!(
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
