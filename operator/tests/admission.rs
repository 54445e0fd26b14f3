//! What the API server itself refuses in a policy (the CRD's schema and CEL
//! rules, as `crds/` ships them), judged by a real kube-apiserver with
//! server-side dry run: nothing is stored.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": name}, "spec": spec,
    })
}

/// The API server's answer to creating `p` (dry run): `Ok` or its message.
async fn create(p: &Value) -> Result<(), String> {
    let env = devplug_testenv::env();
    let r = env
        .admin()
        .request::<Value>(
            http::Request::post("/apis/devplug.io/v1alpha1/devicepluginpolicies?dryRun=All")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(p).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?,
        )
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(s.message),
        Err(e) => panic!("no answer from the API server: {e}"),
    }
}

#[tokio::test]
async fn cdi_kinds_the_container_runtime_refuses_are_refused_at_admission() {
    let sim = json!({"simulated": {"count": 2}});
    // DRA always hands devices out by CDI, with the resource name as the
    // kind unless allocate.cdi.kind says otherwise.
    for (resource, why) in [
        ("example.com/gpu.v2", "class with a '.'"),
        ("1example.com/gpu", "vendor starting with a digit"),
        ("example.com/9gpu", "class starting with a digit"),
    ] {
        let p = policy(
            &devplug_testenv::unique("cdi"),
            json!({"resourceName": resource, "kubeletApi": "DRA", "source": sim}),
        );
        let msg = create(&p).await.expect_err(&format!(
            "DRA policy with resource name {resource} ({why}) was taken"
        ));
        assert!(
            msg.contains("spec.resourceName") && msg.contains("CDI kind"),
            "{resource}: {msg}"
        );
        // The same name as a device plugin resource without CDI is fine:
        // no CDI name is ever made from it.
        let p = policy(
            &devplug_testenv::unique("cdi"),
            json!({"resourceName": resource, "source": sim}),
        );
        create(&p)
            .await
            .unwrap_or_else(|m| panic!("{resource} without CDI was refused: {m}"));
        // With CDI on, the device plugin path needs a valid kind too.
        let p = policy(
            &devplug_testenv::unique("cdi"),
            json!({"resourceName": resource, "source": sim, "allocate": {"cdi": {"enabled": true}}}),
        );
        create(&p)
            .await
            .expect_err(&format!("{resource} as a CDI kind was taken"));
        // An explicit valid kind makes the resource name irrelevant.
        let p = policy(
            &devplug_testenv::unique("cdi"),
            json!({"resourceName": resource, "kubeletApi": "DRA", "source": sim,
                   "allocate": {"cdi": {"kind": "example.com/gpu"}}}),
        );
        create(&p)
            .await
            .unwrap_or_else(|m| panic!("{resource} with kind example.com/gpu was refused: {m}"));
    }
    for kind in ["example.com/gpu.v2", "9vendor.com/gpu", "example.com/-gpu"] {
        let p = policy(
            &devplug_testenv::unique("cdi"),
            json!({"resourceName": "example.com/gpu", "source": sim,
                   "allocate": {"cdi": {"enabled": true, "kind": kind}}}),
        );
        let msg = create(&p)
            .await
            .expect_err(&format!("CDI kind {kind} was taken"));
        assert!(msg.contains("spec.allocate.cdi.kind"), "{kind}: {msg}");
    }
    // And the agent's own check, which a standalone config file gets, says
    // the same.
    for (resource, dra, ok) in [
        ("example.com/gpu.v2", true, false),
        ("example.com/gpu.v2", false, true),
        ("example.com/gpu", true, true),
        ("example.com/Gpu_x-1", true, true),
    ] {
        let mut spec = json!({"resourceName": resource, "source": sim});
        if dra {
            spec["kubeletApi"] = json!("DRA");
        }
        let p: devplug_api::DevicePluginPolicy =
            serde_json::from_value(policy("x", spec)).expect("a policy");
        assert_eq!(p.spec.validate().is_ok(), ok, "{resource} dra={dra}");
        assert_eq!(
            create(&policy(
                &devplug_testenv::unique("cdi"),
                serde_json::to_value(&p).expect("json")["spec"].clone()
            ))
            .await
            .is_ok(),
            ok,
            "API server on {resource} dra={dra}"
        );
    }
}

/// The chart's allow-lists whose rule is static are checked at admission
/// (the chart's ValidatingAdmissionPolicy, default values: no extra agent
/// image, no extra device node): `kubectl apply` says at once what the
/// operator would refuse.
#[tokio::test]
async fn the_chart_refuses_agent_images_and_device_nodes_outside_its_allow_lists() {
    let sim = json!({"simulated": {"count": 1}});
    let image = policy(
        &devplug_testenv::unique("img"),
        json!({"resourceName": "example.com/img", "source": sim,
               "agent": {"image": "evil.example/root:1"}}),
    );
    // The admission policy takes effect within moments of being applied.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let msg = loop {
        match create(&image).await {
            Err(m) => break m,
            Ok(()) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "an agent image outside allowedAgentImages was taken"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    assert!(msg.contains("allowedAgentImages"), "{msg}");
    for (glob, ok) in [
        ("/dev/mem", false),
        ("/dev/port", false),
        ("/dev/fuse", true),
        ("/dev/*", true),
    ] {
        let p = policy(
            &devplug_testenv::unique("dev"),
            json!({"resourceName": "example.com/dev", "source": {"paths": {"globs": [glob]}}}),
        );
        match create(&p).await {
            Ok(()) => assert!(ok, "{glob} was taken"),
            Err(m) => {
                assert!(!ok, "{glob} was refused: {m}");
                assert!(m.contains("allowedDeviceNodes"), "{m}");
            }
        }
    }
    // No image named: the chart's own.
    create(&policy(
        &devplug_testenv::unique("img"),
        json!({"resourceName": "example.com/img", "source": sim}),
    ))
    .await
    .unwrap();
}
