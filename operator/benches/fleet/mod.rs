//! The simulated fleet's shape, shared by the scale and aggregate benches:
//! names, and the entry an agent writes for one node and policy.

use devplug_api::{Allocation, DeviceHealth, DeviceStatus, ResourceStatus};

/// Policies in the fleet.
pub const POLICIES: usize = 4;
/// Devices per node and policy.
pub const DEVICES: usize = 64;
/// Devices held by a pod, per node and policy.
pub const HELD: usize = 8;

pub fn node_name(i: usize) -> String {
    format!("bench-node-{i:05}")
}

pub fn policy_name(k: usize) -> String {
    format!("bench-p{k}")
}

pub fn resource(k: usize) -> String {
    format!("bench.example/r{k}")
}

/// The entry an agent of policy `k` writes for node `i`; with `unhealthy`,
/// its first device is Unhealthy.
pub fn entry(k: usize, i: usize, unhealthy: bool) -> ResourceStatus {
    let devices: Vec<DeviceStatus> = (0..DEVICES)
        .map(|d| DeviceStatus {
            id: format!("dev-{d:02}"),
            health: if unhealthy && d == 0 {
                DeviceHealth::Unhealthy
            } else {
                DeviceHealth::Healthy
            },
            reason: (unhealthy && d == 0).then(|| "XID 79 (critical)".to_string()),
            last_transition_time: None,
            numa_nodes: vec![(d / 32) as i64],
            allocations: if d < HELD {
                vec![Allocation {
                    namespace: "ml".into(),
                    pod: format!("job-{i}-{d}"),
                    container: "main".into(),
                }]
            } else {
                Vec::new()
            },
        })
        .collect();
    let healthy = devices
        .iter()
        .filter(|d| d.health == DeviceHealth::Healthy)
        .count() as i64;
    ResourceStatus {
        resource_name: resource(k),
        policy: policy_name(k),
        state: "Serving".into(),
        reason: None,
        healthy,
        total: DEVICES as i64,
        allocated: HELD as i64,
        devices,
        orphaned: Vec::new(),
    }
}
