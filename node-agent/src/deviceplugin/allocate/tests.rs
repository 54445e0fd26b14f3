use std::time::{Duration, Instant};

use super::*;
use crate::devices::device::{Device, DeviceNode};
use crate::devices::inventory::Inventory;

fn cfg(extra: &str) -> PluginConfig {
    let yaml = format!(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {{name: foo}}\n\
         spec:\n  resourceName: example.com/foo\n  source: {{simulated: {{count: 1}}}}\n{extra}"
    );
    let p = devplug_api::policies_from_yaml(&yaml).unwrap().remove(0);
    PluginConfig::from_policy(&p)
}

fn node(p: &str) -> DeviceNode {
    DeviceNode {
        host_path: p.into(),
        container_path: p.into(),
        permissions: "rw".into(),
    }
}

/// Devices d0..d3 on NUMA 0,0,1,1 (d3 unhealthy unless `all_healthy`), each
/// with its own node plus a shared control node.
fn snap(replicas: u32, all_healthy: bool) -> Snapshot {
    let mut inv = Inventory::new(Duration::from_secs(1), replicas);
    let devs = (0..4)
        .map(|i| Device {
            capacity: Default::default(),
            partitioning: Default::default(),
            id: format!("d{i}"),
            numa_node: Some(i / 2),
            nodes: vec![node(&format!("/dev/d{i}")), node("/dev/ctl")],
            health: if i == 3 && !all_healthy {
                Health::Unhealthy("broken".into())
            } else {
                Health::Healthy
            },
            links: vec![],
            attributes: Default::default(),
        })
        .collect();
    inv.apply(Ok(devs), Instant::now());
    inv.snapshot()
}

fn req(ids: &[&[&str]]) -> dp::AllocateRequest {
    dp::AllocateRequest {
        container_requests: ids
            .iter()
            .map(|c| dp::ContainerAllocateRequest {
                devices_ids: c.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
    }
}

#[test]
fn allocate_happy_path() {
    let c = cfg(
        "  allocate:\n    env: {A: b}\n    annotations: {x.io/y: z}\n    mounts: [{hostPath: /opt/lib, containerPath: /lib/x}]\n",
    );
    let r = allocate(&c, &snap(1, false), &req(&[&["d1", "d0"], &["d2"]])).unwrap();
    assert_eq!(r.container_responses.len(), 2);
    let c0 = &r.container_responses[0];
    assert_eq!(c0.envs["DEVPLUG_EXAMPLE_COM_FOO"], "d1,d0");
    assert_eq!(c0.envs["A"], "b");
    assert_eq!(c0.annotations["x.io/y"], "z");
    assert_eq!(c0.mounts[0].host_path, "/opt/lib");
    assert!(c0.mounts[0].read_only);
    let paths: Vec<_> = c0.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert_eq!(
        paths,
        vec!["/dev/d1", "/dev/ctl", "/dev/d0"],
        "shared node once"
    );
    assert!(c0.cdi_devices.is_empty());
}

#[test]
fn allocate_cdi_names() {
    let c = cfg("  allocate:\n    cdi: {enabled: true}\n");
    let r = allocate(&c, &snap(1, false), &req(&[&["d0"]])).unwrap();
    let c0 = &r.container_responses[0];
    assert_eq!(c0.cdi_devices[0].name, "example.com/foo=d0");
    assert!(c0.devices.is_empty());
    let c = cfg("  allocate:\n    cdi: {enabled: true, kind: vendor.com/gpu}\n");
    let r = allocate(&c, &snap(1, false), &req(&[&["d0"]])).unwrap();
    assert_eq!(
        r.container_responses[0].cdi_devices[0].name,
        "vendor.com/gpu=d0"
    );
}

#[test]
fn allocate_bad_inputs_name_the_id() {
    let c = cfg("");
    let s = snap(1, false);
    let cases: Vec<(&[&[&str]], &str)> = vec![
        (&[&[]], "lists no device IDs"),
        (&[&["d0", "d0"]], "\"d0\" is requested twice"),
        (&[&["nope"]], "unknown device ID \"nope\""),
        (&[&["d3"]], "\"d3\" is not healthy: Unhealthy (broken)"),
        (&[&["d0"], &["d9"]], "\"d9\""),
    ];
    for (ids, want) in cases {
        let e = allocate(&c, &s, &req(ids)).unwrap_err().to_string();
        assert!(e.contains(want), "{ids:?}: {e}");
    }
}

#[test]
fn time_slicing_maps_replicas_and_limits() {
    let c = cfg("  sharing: {strategy: TimeSlicing, replicas: 4}\n");
    let s = snap(4, false);
    let r = allocate(&c, &s, &req(&[&["d0::1", "d0::3", "d1::0"]])).unwrap();
    assert_eq!(
        r.container_responses[0].envs["DEVPLUG_EXAMPLE_COM_FOO"],
        "d0,d1"
    );
    let e = allocate(&c, &s, &req(&[&["d0::4"]])).unwrap_err();
    assert!(matches!(e, RequestError::Unknown { .. }), "{e}");
    let e = allocate(&c, &s, &req(&[&["d0"]])).unwrap_err();
    assert!(
        matches!(e, RequestError::Unknown { .. }),
        "bare physical ID is not advertised"
    );
    let e = allocate(&c, &s, &req(&[&["d3::0"]])).unwrap_err();
    assert!(
        matches!(e, RequestError::Unhealthy { .. }),
        "replica of unhealthy device"
    );

    let strict =
        cfg("  sharing: {strategy: TimeSlicing, replicas: 4, failRequestsGreaterThanOne: true}\n");
    assert!(allocate(&strict, &s, &req(&[&["d0::1"]])).is_ok());
    let e = allocate(&strict, &s, &req(&[&["d0::1", "d1::1"]]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 replicas") && e.contains("d0::1,d1::1"), "{e}");
}

fn pref(avail: &[&str], must: &[&str], size: i32) -> dp::ContainerPreferredAllocationRequest {
    dp::ContainerPreferredAllocationRequest {
        available_device_i_ds: avail.iter().map(|s| s.to_string()).collect(),
        must_include_device_i_ds: must.iter().map(|s| s.to_string()).collect(),
        allocation_size: size,
    }
}

#[test]
fn preferred_keeps_one_numa_node() {
    let c = cfg("");
    let s = snap(1, true);
    // 2 devices fit on either node: lowest node wins the tie.
    assert_eq!(
        preferred(&c, &s, &pref(&["d3", "d2", "d1", "d0"], &[], 2)),
        vec!["d0", "d1"]
    );
    // Best fit: node 1 has exactly one left, node 0 two.
    assert_eq!(
        preferred(&c, &s, &pref(&["d0", "d1", "d3"], &[], 1)),
        vec!["d3"]
    );
    // must-include on node 1 pulls the rest there.
    assert_eq!(
        preferred(&c, &s, &pref(&["d0", "d1", "d2", "d3"], &["d3"], 2)),
        vec!["d3", "d2"]
    );
    // 3 cannot fit one node: span as few as possible, starting with the must node.
    let got = preferred(&c, &s, &pref(&["d0", "d1", "d2", "d3"], &["d2"], 3));
    assert_eq!(got, vec!["d2", "d3", "d0"]);
    // Deterministic.
    for _ in 0..10 {
        assert_eq!(
            preferred(&c, &s, &pref(&["d0", "d1", "d2", "d3"], &["d2"], 3)),
            got
        );
    }
}

#[test]
fn preferred_spreads_replicas_over_devices() {
    let c = cfg("  sharing: {strategy: TimeSlicing, replicas: 4}\n");
    let s = snap(4, true);
    let avail: Vec<String> = s.list.devices.iter().map(|d| d.id.clone()).collect();
    let avail: Vec<&str> = avail.iter().map(String::as_str).collect();
    let got = preferred(&c, &s, &pref(&avail, &[], 2));
    assert_eq!(
        got,
        vec!["d0::0", "d1::0"],
        "two distinct devices on NUMA 0"
    );
    // d0 has only one free replica left, d1 all four: prefer d1 first.
    let avail2 = ["d0::3", "d1::0", "d1::1", "d1::2", "d1::3"];
    assert_eq!(preferred(&c, &s, &pref(&avail2, &[], 1)), vec!["d1::0"]);
    // must-include d0::1 then another device, not d0 again.
    assert_eq!(
        preferred(&c, &s, &pref(&avail, &["d0::1"], 2)),
        vec!["d0::1", "d1::0"]
    );
}

/// The kubelet fails pod admission on any error from
/// GetPreferredAllocation: odd requests get a best-effort answer instead
/// (it fills a short one from the available IDs itself).
#[test]
fn preferred_is_best_effort_and_never_fails() {
    let c = cfg("");
    let s = snap(1, false);
    let cases: [(dp::ContainerPreferredAllocationRequest, Vec<&str>); 6] = [
        (pref(&["d0"], &[], 0), vec![]),
        (pref(&["d0", "d1"], &[], 3), vec!["d0", "d1"]),
        (pref(&["d0", "d3"], &[], 2), vec!["d0"]),
        // A must-include ID the kubelet does not offer is ignored.
        (pref(&["d0"], &["d1"], 1), vec!["d0"]),
        (pref(&["d0", "d1"], &["d0", "d1"], 1), vec!["d0"]),
        // Unknown IDs (a device that just left, a spec change in flight).
        (pref(&["zz", "d1", "yy"], &["zz"], 1), vec!["d1"]),
    ];
    for (r, want) in cases {
        assert_eq!(preferred(&c, &s, &r), want, "{r:?}");
    }
}

#[test]
fn prestart_maps_replicas_to_physical() {
    let c = cfg("  sharing: {strategy: TimeSlicing, replicas: 2}\n");
    let s = snap(2, false);
    let ids = prestart_ids(&c, &s, &["d0::0".into(), "d0::1".into(), "d2::1".into()]).unwrap();
    assert_eq!(ids, vec!["d0", "d2"]);
    assert!(prestart_ids(&c, &s, &["x".into()]).is_err());
}

#[test]
fn preferred_keeps_nvlinked_gpus_together() {
    // g0..g3 on one NUMA node; g1-g3 and g0-g2 are NVLinked.
    let mut inv = Inventory::new(Duration::from_secs(1), 1);
    let link = |id: &str, peers: &[&str]| Device {
        capacity: Default::default(),
        partitioning: Default::default(),
        id: id.into(),
        numa_node: Some(0),
        nodes: vec![],
        health: Health::Healthy,
        links: peers.iter().map(|s| s.to_string()).collect(),
        attributes: Default::default(),
    };
    inv.apply(
        Ok(vec![
            link("g0", &["g2"]),
            link("g1", &["g3"]),
            link("g2", &["g0"]),
            link("g3", &["g1"]),
        ]),
        Instant::now(),
    );
    let s = inv.snapshot();
    let c = cfg("");
    assert_eq!(
        preferred(&c, &s, &pref(&["g0", "g1", "g2", "g3"], &["g1"], 2)),
        vec!["g1", "g3"]
    );
    assert_eq!(
        preferred(&c, &s, &pref(&["g0", "g1", "g2", "g3"], &["g2"], 2)),
        vec!["g2", "g0"]
    );
    // Without a must-include, the first pick is by ID, then its NVLink peer.
    assert_eq!(
        preferred(&c, &s, &pref(&["g0", "g1", "g2", "g3"], &[], 2)),
        vec!["g0", "g2"]
    );
}
