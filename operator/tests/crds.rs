//! `devplug-operator crds`, the chart's pre-upgrade hook, against a real
//! API server and as the hook's own ServiceAccount (the chart's RBAC):
//! a CRD older than this version is brought up to date.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

const POLICIES: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/devicepluginpolicies.devplug.io";

async fn columns(admin: &kube::Client) -> usize {
    devplug_testenv::get_json(admin, POLICIES).await.unwrap()["spec"]["versions"][0]
        ["additionalPrinterColumns"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test]
async fn the_upgrade_hook_brings_an_old_crd_up_to_date_with_its_own_rbac() {
    let env = devplug_testenv::env();
    let admin = env.admin();
    let want = columns(&admin).await;
    assert!(want > 1);
    // An older CRD: a printer column fewer (as after an upgrade that helm
    // did not carry to the CRDs).
    admin
        .request::<Value>(
            http::Request::patch(POLICIES)
                .header("content-type", "application/json-patch+json")
                .body(
                    serde_json::to_vec(&json!([
                        {"op": "remove", "path": "/spec/versions/0/additionalPrinterColumns/0"}
                    ]))
                    .unwrap(),
                )
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(columns(&admin).await, want - 1);

    let token = env
        .unbound_token("devplug-crds")
        .await
        .expect("the chart's hook ServiceAccount");
    devplug_operator::crds::apply(env.client_with_token(&token))
        .await
        .unwrap();
    assert_eq!(columns(&admin).await, want, "the column is back");
    // Idempotent.
    devplug_operator::crds::apply(env.client_with_token(&token))
        .await
        .unwrap();
}
