//! What the real kube-apiserver (v1.36, with the chart's RBAC and admission
//! policies) accepts from an agent: the agent's ResourceSlice layout at
//! real pool sizes, and the limits of an agent's identity.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::SystemTime;

use devplug_agent::config::PluginConfig;
use devplug_agent::devices::device::Device;
use devplug_agent::devices::health::Health;
use devplug_agent::devices::inventory::{DeviceState, Snapshot};
use devplug_agent::dra::slices;
use devplug_api::DevicePluginPolicy;
use devplug_testenv::{env, unique};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn dra_policy(name: &str) -> DevicePluginPolicy {
    dra_policy_serving(name, &format!("example.com/{name}"))
}

fn dra_policy_serving(name: &str, resource: &str) -> DevicePluginPolicy {
    let yaml = format!(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata:\n  name: {name}\nspec:\n  resourceName: {resource}\n  kubeletApi: DRA\n  source:\n    simulated:\n      count: 300\n"
    );
    devplug_api::policies_from_yaml(&yaml).unwrap().remove(0)
}

fn device_plugin_policy(name: &str) -> DevicePluginPolicy {
    let yaml = format!(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata:\n  name: {name}\nspec:\n  resourceName: example.com/{name}\n  source:\n    simulated:\n      count: 2\n"
    );
    devplug_api::policies_from_yaml(&yaml).unwrap().remove(0)
}

/// `n` devices, those in `unhealthy` tainted; each with what a GPU source
/// publishes (memory capacity, the standard PCI topology attributes), so
/// every slice these tests write is judged by the API server with them.
fn snapshot(n: usize, unhealthy: &[usize]) -> Snapshot {
    let mut s = Snapshot {
        replicas: 1,
        version: 1,
        ..Snapshot::default()
    };
    for i in 0..n {
        let id = format!("sim-{i}");
        s.devices.insert(
            id.clone(),
            DeviceState {
                device: Device {
                    capacity: [("memory".to_string(), "81559Mi".to_string())].into(),
                    partitioning: Default::default(),
                    id,
                    numa_node: Some(0),
                    nodes: vec![],
                    health: Health::Healthy,
                    links: vec![],
                    attributes: [
                        (
                            devplug_api::topology::PCIE_ROOT_ATTRIBUTE.to_string(),
                            format!("pci0000:{:02x}", i / 64),
                        ),
                        (
                            devplug_api::topology::PCI_BUS_ID_ATTRIBUTE.to_string(),
                            format!("0000:{:02x}:{:02x}.0", i / 32, i % 32),
                        ),
                    ]
                    .into(),
                },
                health: if unhealthy.contains(&i) {
                    Health::Unhealthy("fell off the bus".into())
                } else {
                    Health::Healthy
                },
                last_transition: SystemTime::UNIX_EPOCH,
            },
        );
    }
    s
}

fn slice_api(client: kube::Client) -> Api<DynamicObject> {
    Api::all_with(
        client,
        &kube::core::ApiResource::erase::<k8s_openapi::api::resource::v1::ResourceSlice>(&()),
    )
}

/// The agent's slice layout, as the JSON it sends.
fn layout(
    node: &str,
    cfg: &PluginConfig,
    generation: i64,
    devs: &[k8s_openapi::api::resource::v1::Device],
) -> Vec<(String, Value)> {
    slices::slices(node, cfg, generation, devs)
        .into_iter()
        .map(|(n, b)| (n, serde_json::to_value(b).unwrap()))
        .collect()
}

fn forbidden(r: Result<impl std::fmt::Debug, kube::Error>, what: &str) -> String {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => s.message,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// A pool of 300 devices, one of them unhealthy, laid out as the agent
/// lays it out: the real API server must take every slice (a slice with a
/// tainted device may hold at most 64 devices; the agent used to publish
/// 128/128/44 and every publish was refused).
#[tokio::test]
async fn the_real_api_server_takes_a_300_device_pool_with_a_tainted_device() {
    let env = env();
    let node = unique("pool-node");
    let policy = dra_policy(&unique("pool"));
    let agent = env.client_with_token(&env.agent_token(&policy, &node).await);
    let cfg = PluginConfig::from_policy(&policy);
    let api = slice_api(agent);
    let pp = PatchParams::apply(&devplug_api::agent_manager(&cfg.name)).force();
    for unhealthy in [&[][..], &[0], &[5, 150, 299]] {
        let devs = slices::devices(&snapshot(300, unhealthy));
        let layout = layout(&node, &cfg, 1 + unhealthy.len() as i64, &devs);
        let total: usize = layout
            .iter()
            .map(|(_, b)| b["spec"]["devices"].as_array().unwrap().len())
            .sum();
        assert_eq!(total, 300);
        for (name, body) in &layout {
            if let Err(e) = api.patch(name, &pp, &Patch::Apply(body)).await {
                panic!(
                    "the API server refused slice {name} ({} devices, {} unhealthy in the pool): {e}",
                    body["spec"]["devices"].as_array().unwrap().len(),
                    unhealthy.len()
                );
            }
        }
    }
    // A health change moves no device to another slice.
    let before = layout(&node, &cfg, 1, &slices::devices(&snapshot(300, &[])));
    let after = layout(&node, &cfg, 2, &slices::devices(&snapshot(300, &[7])));
    let where_is = |layout: &[(String, Value)]| -> BTreeMap<String, String> {
        layout
            .iter()
            .flat_map(|(slice, b)| {
                b["spec"]["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| (d["name"].as_str().unwrap().to_string(), slice.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(where_is(&before), where_is(&after));
}

/// An 8-GPU H100 node in MIG mode, every profile at every placement (18
/// partitions a GPU), one GPU unhealthy: the real API server must take the
/// counter-set slices and the partition slices as the agent lays them out.
fn mig_snapshot(unhealthy_gpu: Option<usize>) -> Snapshot {
    use devplug_agent::devices::sources::nvidia::{
        Gpu,
        mig::{self, MigLayout, MigProfile},
    };
    let gib = 1024 * 1024 * 1024;
    let profile =
        |id: u32, name: &str, mem: u64, sms: u32, placements: Vec<(u32, u32)>| MigProfile {
            id,
            name: name.into(),
            memory_bytes: mem * gib,
            multiprocessors: sms,
            placements,
        };
    let layout = MigLayout {
        slots: 8,
        profiles: vec![
            profile(19, "1g.10gb", 10, 16, (0..7).map(|s| (s, 1)).collect()),
            profile(15, "1g.20gb", 20, 26, vec![(0, 2), (2, 2), (4, 2), (6, 2)]),
            profile(14, "2g.20gb", 20, 32, vec![(0, 2), (2, 2), (4, 2)]),
            profile(9, "3g.40gb", 40, 60, vec![(0, 4), (4, 4)]),
            profile(5, "4g.40gb", 40, 64, vec![(0, 4)]),
            profile(0, "7g.80gb", 80, 132, vec![(0, 8)]),
        ],
    };
    let mut s = Snapshot {
        replicas: 1,
        version: 1,
        ..Snapshot::default()
    };
    for g in 0..8 {
        let gpu = Gpu {
            uuid: format!("GPU-{g:08x}-aaaa-bbbb-cccc-0123456789ab"),
            minor: g as u32,
            bus_id: format!("00000000:{:02X}:00.0", 0x18 + g * 0x10),
            nvlink_peers: vec![],
            memory_bytes: Some(80 * gib),
            mig: Some(layout.clone()),
        };
        let health = if unhealthy_gpu == Some(g) {
            Health::Unhealthy("XID 79 (critical)".into())
        } else {
            Health::Healthy
        };
        let mut parent = Device {
            capacity: [("memory".to_string(), "81559Mi".to_string())].into(),
            partitioning: Default::default(),
            id: gpu.uuid.clone(),
            numa_node: Some(g as i64 / 4),
            nodes: vec![],
            health: health.clone(),
            links: vec![],
            attributes: [
                ("uuid".to_string(), gpu.uuid.clone()),
                (
                    devplug_api::topology::PCIE_ROOT_ATTRIBUTE.to_string(),
                    format!("pci0000:{:02x}", g * 0x10),
                ),
            ]
            .into(),
        };
        let parts = mig::partitions(&gpu, &layout, &parent);
        parent.partitioning = devplug_agent::devices::device::Partitioning::Divided {
            counters: mig::counters(&layout),
        };
        for d in parts.into_iter().chain([parent]) {
            s.devices.insert(
                d.id.clone(),
                DeviceState {
                    device: d,
                    health: health.clone(),
                    last_transition: SystemTime::UNIX_EPOCH,
                },
            );
        }
    }
    s
}

#[tokio::test]
async fn the_real_api_server_takes_a_mig_node_as_counter_sets_and_partitions() {
    let env = env();
    let node = unique("mig-node");
    let policy = dra_policy(&unique("mig"));
    let agent = env.client_with_token(&env.agent_token(&policy, &node).await);
    let cfg = PluginConfig::from_policy(&policy);
    let api = slice_api(agent);
    let pp = PatchParams::apply(&devplug_api::agent_manager(&cfg.name)).force();
    for (generation, unhealthy) in [(1, None), (2, Some(3))] {
        let pool = slices::Pool::of(
            &mig_snapshot(unhealthy),
            devplug_api::TaintEffect::NoSchedule,
        );
        assert_eq!(pool.devices.len(), 8 * 18);
        assert_eq!(pool.counter_sets.len(), 8);
        let layout = slices::pool_slices(&node, &cfg, generation, &pool);
        // 8 counter sets in one slice, 144 partitions in three.
        assert_eq!(layout.len(), 4);
        for (name, body) in &layout {
            let body = serde_json::to_value(body).unwrap();
            if let Err(e) = api.patch(name, &pp, &Patch::Apply(&body)).await {
                panic!(
                    "the API server refused slice {name} (generation {generation}): {e}\n{body}"
                );
            }
        }
        let stored = api.get(&layout[1].0).await.unwrap();
        let devs = stored.data["spec"]["devices"].as_array().unwrap();
        let consumes = &devs[0]["consumesCounters"][0];
        assert!(
            consumes["counterSet"]
                .as_str()
                .unwrap()
                .starts_with("gpu-00000000"),
            "{consumes}"
        );
        let sets = api.get(&layout[0].0).await.unwrap();
        assert_eq!(
            sets.data["spec"]["sharedCounters"]
                .as_array()
                .unwrap()
                .len(),
            8,
            "{:?}",
            sets.data
        );
    }
}

/// An agent's token (bound to a pod on its node) may write its own node's
/// NodeDeviceStatus and ResourceSlices, and nothing of another node's:
/// create, update and delete are all refused.
#[tokio::test]
async fn an_agent_cannot_touch_another_nodes_status_or_slices() {
    let env = env();
    let admin = env.admin();
    let mine = unique("node-mine");
    let other = unique("node-other");
    env.ensure_node(&other).await.unwrap();
    let policy = dra_policy(&unique("ident"));
    let agent = env.client_with_token(&env.agent_token(&policy, &mine).await);
    let cfg = PluginConfig::from_policy(&policy);
    let manager = devplug_api::agent_manager(&cfg.name);
    let pp = PatchParams::apply(&manager).force();

    // NodeDeviceStatus: its own is fine, another node's is not.
    let nds_res = kube::core::ApiResource::erase::<devplug_api::NodeDeviceStatus>(&());
    let as_agent: Api<DynamicObject> = Api::all_with(agent.clone(), &nds_res);
    let as_admin: Api<DynamicObject> = Api::all_with(admin.clone(), &nds_res);
    let nds = |name: &str| -> DynamicObject {
        serde_json::from_value(
            json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                                      "metadata": {"name": name}, "spec": {"nodeName": name}}),
        )
        .unwrap()
    };
    as_agent
        .create(&PostParams::default(), &nds(&mine))
        .await
        .expect("an agent creates its own node's NodeDeviceStatus");
    forbidden(
        as_agent.create(&PostParams::default(), &nds(&other)).await,
        "create another node's NodeDeviceStatus",
    );
    as_admin
        .create(&PostParams::default(), &nds(&other))
        .await
        .unwrap();
    forbidden(
        as_agent
            .patch(
                &other,
                &PatchParams::apply(&manager).force(),
                &Patch::Apply(
                    json!({"apiVersion": "devplug.io/v1alpha1", "kind": "NodeDeviceStatus",
                                     "metadata": {"name": other}, "status": {"resources": []}}),
                ),
            )
            .await,
        "apply another node's NodeDeviceStatus",
    );

    // ResourceSlices: its own node's, yes; another node's, never.
    let slices_agent = slice_api(agent);
    let slices_admin = slice_api(admin);
    let devs = slices::devices(&snapshot(2, &[]));
    let (own_name, own) = layout(&mine, &cfg, 1, &devs).remove(0);
    slices_agent
        .patch(&own_name, &pp, &Patch::Apply(&own))
        .await
        .expect("an agent publishes its own node's slice");
    let (other_name, other_slice) = layout(&other, &cfg, 1, &devs).remove(0);
    forbidden(
        slices_agent
            .patch(&other_name, &pp, &Patch::Apply(&other_slice))
            .await,
        "publish a slice of another node",
    );
    // A slice of the other node exists (its own agent published it): the
    // agent may neither rewrite nor delete it.
    slices_admin
        .patch(&other_name, &pp, &Patch::Apply(&other_slice))
        .await
        .unwrap();
    let mut moved = other_slice.clone();
    moved["spec"]["devices"] = json!([]);
    forbidden(
        slices_agent
            .patch(&other_name, &pp, &Patch::Apply(&moved))
            .await,
        "rewrite another node's slice",
    );
    forbidden(
        slices_agent
            .delete(&other_name, &DeleteParams::default())
            .await,
        "delete another node's slice",
    );
    assert!(
        slices_admin.get_opt(&other_name).await.unwrap().is_some(),
        "the other node's slice is still there"
    );
    // Its own slice it may delete (a pool shrinking).
    slices_agent
        .delete(&own_name, &DeleteParams::default())
        .await
        .expect("an agent deletes its own node's slice");
}

/// A device-plugin policy's agent has no business with ResourceSlices at all.
#[tokio::test]
async fn a_device_plugin_agent_may_not_publish_slices() {
    let env = env();
    let node = unique("dp-node");
    let policy = device_plugin_policy(&unique("dp"));
    let agent = env.client_with_token(&env.agent_token(&policy, &node).await);
    let cfg = PluginConfig::from_policy(&policy);
    let (name, body) = layout(&node, &cfg, 1, &slices::devices(&snapshot(1, &[]))).remove(0);
    let msg = forbidden(
        slice_api(agent)
            .patch(
                &name,
                &PatchParams::apply("x").force(),
                &Patch::Apply(&body),
            )
            .await,
        "a device-plugin agent publishing a slice",
    );
    assert!(msg.contains("forbidden"), "{msg}");
}

/// A token of the agent's ServiceAccount that names no node (a legacy
/// Secret token, or one not bound to a pod) writes nothing, not even a
/// node's status: the admission policy fails closed.
#[tokio::test]
async fn a_token_without_the_node_claim_writes_nothing() {
    let env = env();
    let node = unique("claimless");
    let policy = dra_policy(&unique("claimless"));
    // The agent's RBAC exists, as the operator makes it.
    env.agent_token(&policy, &node).await;
    let sa = format!("devplug-agent-{}", policy.metadata.name.as_deref().unwrap());
    let token = env.unbound_token(&sa).await.unwrap();
    let agent = env.client_with_token(&token);
    let nds: Api<DynamicObject> = Api::all_with(
        agent.clone(),
        &kube::core::ApiResource::erase::<devplug_api::NodeDeviceStatus>(&()),
    );
    let obj: DynamicObject = serde_json::from_value(json!({"apiVersion": "devplug.io/v1alpha1",
        "kind": "NodeDeviceStatus", "metadata": {"name": node}, "spec": {"nodeName": node}}))
    .unwrap();
    let msg = forbidden(
        nds.create(&PostParams::default(), &obj).await,
        "a claimless token writing a NodeDeviceStatus",
    );
    assert!(msg.contains("projected token"), "{msg}");
    let cfg = PluginConfig::from_policy(&policy);
    let (name, body) = layout(&node, &cfg, 1, &slices::devices(&snapshot(1, &[]))).remove(0);
    forbidden(
        slice_api(agent)
            .patch(
                &name,
                &PatchParams::apply("x").force(),
                &Patch::Apply(&body),
            )
            .await,
        "a claimless token publishing a slice",
    );
}

/// The pool of `node` as the server holds it: (generation, slice count the
/// slices say, slices present at that generation, slices at other
/// generations, tainted devices).
async fn pool_state(admin: &kube::Client, node: &str) -> (i64, i64, usize, usize, usize) {
    let list = devplug_testenv::get_json(
        admin,
        &format!("/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3D{node}"),
    )
    .await
    .unwrap();
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let generation = items
        .iter()
        .filter_map(|s| s["spec"]["pool"]["generation"].as_i64())
        .max()
        .unwrap_or(0);
    let current: Vec<&Value> = items
        .iter()
        .filter(|s| s["spec"]["pool"]["generation"] == generation)
        .collect();
    let count = current
        .first()
        .and_then(|s| s["spec"]["pool"]["resourceSliceCount"].as_i64())
        .unwrap_or(0);
    let tainted = current
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter(|d| d.get("taints").is_some())
        .count();
    (
        generation,
        count,
        current.len(),
        items.len() - current.len(),
        tainted,
    )
}

/// A publish the API server refuses part-way (here: a test's admission
/// policy refusing any slice of this node with a tainted device, so the
/// first slice of the new generation goes through and the second does not)
/// leaves the pool whole: the last published pool is put back at a newer
/// generation, and the new one is published once the server takes it.
/// Before, the pool stayed split across two generations, which the
/// scheduler treats as incomplete: nothing could be allocated from it.
#[tokio::test]
async fn a_publish_refused_part_way_leaves_the_pool_whole() {
    let env = env();
    let admin = env.admin();
    let node = unique("split-node");
    let policy = dra_policy(&unique("split"));
    let agent = env.client_with_token(&env.agent_token(&policy, &node).await);
    let cfg = std::sync::Arc::new(PluginConfig::from_policy(&policy));
    let (_cfg_tx, cfgs) = tokio::sync::watch::channel(cfg);
    let snap = |unhealthy: &[usize], version: u64| {
        let mut s = snapshot(100, unhealthy);
        s.version = version;
        std::sync::Arc::new(s)
    };
    let (snap_tx, snaps) = tokio::sync::watch::channel(snap(&[], 1));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (problems_tx, mut problems) = tokio::sync::watch::channel(None);
    let publisher = tokio::spawn(slices::publish(
        agent,
        node.clone(),
        cfgs,
        snaps,
        problems_tx,
        stop,
    ));

    let wait_pool = async |what: &str, want: &dyn Fn((i64, i64, usize, usize, usize)) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let st = pool_state(&admin, &node).await;
            if want(st) {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: pool (generation, sliceCount, at generation, others, tainted) = {st:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let (g1, ..) = wait_pool("first publish", &|(_, c, n, o, _)| {
        c == 2 && n == 2 && o == 0
    })
    .await;

    // The server starts refusing slices of this node that hold a taint.
    let vap = unique("refuse-taints");
    devplug_testenv::apply_value(
        &admin,
        &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": vap},
            "spec": {"failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": ["resource.k8s.io"], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["resourceslices"]}]},
                "matchConditions": [{"name": "this-node", "expression": format!("object.spec.nodeName == '{node}'")}],
                "validations": [{"expression": "!object.spec.devices.exists(d, has(d.taints))",
                                 "message": "refused by the test: a tainted device"}]}}),
    )
    .await
    .unwrap();
    devplug_testenv::apply_value(
        &admin,
        &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": vap}, "spec": {"policyName": vap, "validationActions": ["Deny"]}}),
    )
    .await
    .unwrap();
    // In force once a dry run of such a slice is refused.
    let probe_devs = slices::devices(&snapshot(1, &[0]));
    let (probe_name, probe) =
        layout(&node, &PluginConfig::from_policy(&policy), 99, &probe_devs).remove(0);
    let pp = PatchParams {
        dry_run: true,
        ..PatchParams::apply("probe").force()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while slice_api(admin.clone())
        .patch(&probe_name, &pp, &Patch::Apply(&probe))
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the test's policy never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Device 70 (the second slice) fails: the first slice of the new
    // generation is taken, the second refused.
    snap_tx.send_replace(snap(&[70], 2));
    let (g, ..) = wait_pool("the pool back whole after the refusal", &|(
        g,
        c,
        n,
        o,
        t,
    )| {
        g > g1 + 1 && c == 2 && n == 2 && o == 0 && t == 0
    })
    .await;
    assert!(g > g1 + 1, "restored at a newer generation");
    // The refusal is reported (NodeDeviceStatus, and from there the
    // policy's Degraded condition), in the API server's words.
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        problems.wait_for(|p| p.is_some()),
    )
    .await
    .expect("the refusal reported within 30 s")
    .unwrap()
    .clone()
    .unwrap();
    assert!(
        refused.contains("refused by the test: a tainted device"),
        "{refused}"
    );

    // The server takes it again: the taint is published, whole.
    for kind in [
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicies",
    ] {
        let _ = admin
            .request::<Value>(
                http::Request::delete(format!(
                    "/apis/admissionregistration.k8s.io/v1/{kind}/{vap}"
                ))
                .body(Vec::new())
                .unwrap(),
            )
            .await;
    }
    wait_pool("the taint published once the server takes it", &|(
        _,
        c,
        n,
        o,
        t,
    )| {
        c == 2 && n == 2 && o == 0 && t == 1
    })
    .await;
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        problems.wait_for(|p| p.is_none()),
    )
    .await
    .expect("the problem cleared once the publish went through")
    .unwrap();
    stop_tx.send_replace(true);
    publisher.await.unwrap();
}

/// Two DRA policies on one node: each agent publishes its own driver's
/// slices and may neither write nor delete the other's.
#[tokio::test]
async fn an_agent_cannot_touch_another_policys_slices_on_its_node() {
    let env = env();
    let node = unique("two-drivers");
    let a = dra_policy(&unique("drv-a"));
    let b = dra_policy(&unique("drv-b"));
    let agent_a = env.client_with_token(&env.agent_token(&a, &node).await);
    let agent_b = env.client_with_token(&env.agent_token(&b, &node).await);
    let devs = slices::devices(&snapshot(2, &[]));
    let (a_name, a_slice) = layout(&node, &PluginConfig::from_policy(&a), 1, &devs).remove(0);
    let (b_name, b_slice) = layout(&node, &PluginConfig::from_policy(&b), 1, &devs).remove(0);
    let pp = PatchParams::apply("test").force();
    slice_api(agent_a.clone())
        .patch(&a_name, &pp, &Patch::Apply(&a_slice))
        .await
        .expect("a publishes its own driver's slice");
    let msg = forbidden(
        slice_api(agent_a.clone())
            .patch(&b_name, &pp, &Patch::Apply(&b_slice))
            .await,
        "a publishing b's driver's slice",
    );
    assert!(msg.contains("own policy's driver"), "{msg}");
    slice_api(agent_b.clone())
        .patch(&b_name, &pp, &Patch::Apply(&b_slice))
        .await
        .expect("b publishes its own driver's slice");
    forbidden(
        slice_api(agent_a.clone())
            .delete(&b_name, &DeleteParams::default())
            .await,
        "a deleting b's slice",
    );
    // A long policy name (its driver cut and hashed) still publishes.
    // (Its resource name stays short: a resource's name part is at most
    // 63 characters, a policy's name up to 253.)
    let long = dra_policy_serving(
        &format!("{}-{}", unique("long"), "x".repeat(60)),
        "example.com/long",
    );
    let agent_long = env.client_with_token(&env.agent_token(&long, &node).await);
    let (l_name, l_slice) = layout(&node, &PluginConfig::from_policy(&long), 1, &devs).remove(0);
    slice_api(agent_long)
        .patch(&l_name, &pp, &Patch::Apply(&l_slice))
        .await
        .expect("a long-named policy's agent publishes its own slice");
}
