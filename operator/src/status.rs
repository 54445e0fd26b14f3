//! The policy status as a pure function of what the operator observed.

use crate::agent_pod::AgentPod;
use devplug_api::conditions::{self, Desired, types};
use devplug_api::{DevicePluginPolicy, DevicePluginPolicyStatus, NodeCounts};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::jiff::Timestamp;

/// Everything the status is computed from.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// The agent DaemonSet, as the API server returned it.
    pub daemonset: Option<DaemonSet>,
    /// Agent pods that are stuck, as "pod on node: reason" lines.
    pub pod_problems: Vec<String>,
    /// The older policy that holds this policy's resource, if any.
    pub conflict_with: Option<String>,
    /// Why the spec cannot be served, if it cannot.
    pub invalid: Option<String>,
    /// The spec approved now (valid and within the allow-lists): what
    /// `status.approvedSpec` becomes.
    pub approved: Option<serde_json::Value>,
    /// An invalid spec's policy still serves its last approved spec (the
    /// generation approved), and the rest of `Observed` describes it.
    pub serving_approved: Option<i64>,
    /// The last API error while applying agents, if any.
    pub apply_error: Option<String>,
    /// Why the DaemonSet controller cannot create agent pods (its latest
    /// `FailedCreate` event), while it has fewer pods than nodes.
    pub create_failure: Option<String>,
    /// Device counts, unhealthy devices and node problems over all nodes.
    pub devices: Option<crate::devices::Aggregate>,
}

const STUCK_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The Degraded message for agent pods the DaemonSet controller cannot
/// create, with the fix for the common cause.
pub fn create_failure_message(daemonset: &str, namespace: &str, event: &str) -> String {
    let mut m = format!("DaemonSet {daemonset} cannot create agent pods: {event}");
    if event.contains("PodSecurity") {
        m.push_str(&format!(
            "; agents need host paths and root: label namespace {namespace} \
             pod-security.kubernetes.io/enforce=privileged (the chart's podSecurity.enforce does)"
        ));
    }
    m.chars().take(1024).collect()
}

/// Agent pods that cannot run, in words.
pub fn pod_problems<P: std::borrow::Borrow<AgentPod>>(pods: &[P]) -> Vec<String> {
    let mut out = Vec::new();
    for pod in pods {
        let pod: &AgentPod = pod.borrow();
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let node = pod.node.as_deref().unwrap_or("no node");
        if let Some(message) = &pod.unschedulable {
            let message = if message.is_empty() {
                "no message"
            } else {
                message
            };
            out.push(format!("{name}: unschedulable: {message}"));
            continue;
        }
        for reason in &pod.waiting {
            if STUCK_REASONS.contains(&reason.as_str()) {
                out.push(format!("{name} on {node}: {reason}"));
            }
        }
    }
    out.sort();
    out
}

fn summary(lines: &[String]) -> String {
    let mut s = lines.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
    if lines.len() > 3 {
        s.push_str(&format!("; and {} more", lines.len() - 3));
    }
    s
}

/// The status to write, starting from the current one (device counts and
/// condition timestamps carry over).
pub fn compute(
    p: &DevicePluginPolicy,
    seen: &Observed,
    now: Timestamp,
) -> DevicePluginPolicyStatus {
    let mut st = p.status.clone().unwrap_or_default();
    let generation = p.metadata.generation;
    st.observed_generation = generation;
    if let Some(spec) = &seen.approved {
        st.approved_spec = Some(spec.clone());
        st.approved_generation = generation;
    }
    let mut set = |type_, status, reason, message: String| {
        conditions::set(
            &mut st.conditions,
            Desired {
                type_,
                status,
                reason,
                message,
            },
            generation,
            now,
        );
    };

    if let (Some(why), Some(approved)) = (&seen.invalid, seen.serving_approved) {
        // The last approved spec keeps serving: counts as usual, but the
        // policy is not Ready (its spec is not what runs) until fixed.
        let mut ok = seen.clone();
        ok.invalid = None;
        ok.serving_approved = None;
        ok.approved = None;
        let mut q = p.clone();
        q.status = Some(st);
        let mut st = compute(&q, &ok, now);
        let msg = format!(
            "{why}; the spec of generation {approved} (status.approvedSpec) keeps serving until this is fixed"
        );
        for (type_, status) in [
            (types::READY, false),
            (types::PROGRESSING, false),
            (types::DEGRADED, true),
        ] {
            conditions::set(
                &mut st.conditions,
                Desired {
                    type_,
                    status,
                    reason: "InvalidSpec",
                    message: msg.clone(),
                },
                generation,
                now,
            );
        }
        return st;
    }
    if let Some(why) = &seen.invalid {
        set(types::READY, false, "InvalidSpec", why.clone());
        set(
            types::PROGRESSING,
            false,
            "InvalidSpec",
            "no agents for an invalid spec".into(),
        );
        set(types::DEGRADED, true, "InvalidSpec", why.clone());
        set(types::CONFLICT, false, "NoConflict", String::new());
        st.nodes = NodeCounts::default();
    } else if let Some(winner) = &seen.conflict_with {
        let msg = format!(
            "resource {} is already served by the older policy {winner} on nodes this policy also selects; \
             this policy gets no agents until one of them changes its resourceName or nodeSelector",
            p.spec.resource_name
        );
        set(types::CONFLICT, true, "ResourceClaimed", msg.clone());
        set(types::READY, false, "Conflict", msg);
        set(types::PROGRESSING, false, "Conflict", String::new());
        set(types::DEGRADED, false, "Conflict", String::new());
        st.nodes = NodeCounts::default();
    } else {
        set(types::CONFLICT, false, "NoConflict", String::new());
        let ds = seen.daemonset.as_ref();
        let dss = ds.and_then(|d| d.status.as_ref());
        let nodes = NodeCounts {
            desired: dss.map_or(0, |s| s.desired_number_scheduled),
            ready: dss.map_or(0, |s| s.number_ready),
            updated: dss.and_then(|s| s.updated_number_scheduled).unwrap_or(0),
        };
        let ds_current = match (
            ds.and_then(|d| d.metadata.generation),
            dss.and_then(|s| s.observed_generation),
        ) {
            (Some(g), Some(o)) => o >= g,
            _ => false,
        };
        let rolling = !ds_current || nodes.updated < nodes.desired;
        if rolling {
            set(
                types::PROGRESSING,
                true,
                "RollingOut",
                format!(
                    "{}/{} nodes run the current agent",
                    nodes.updated, nodes.desired
                ),
            );
        } else {
            set(types::PROGRESSING, false, "RolloutComplete", String::new());
        }
        let unhealthy = seen.devices.as_ref().map_or(0, |a| a.counts.unhealthy);
        let node_reasons = seen
            .devices
            .as_ref()
            .map(|a| a.node_reasons.clone())
            .unwrap_or_default();
        if let Some(err) = &seen.apply_error {
            set(types::DEGRADED, true, "ApplyFailed", err.clone());
        } else if let Some(why) = &seen.create_failure {
            set(types::DEGRADED, true, "AgentsNotCreated", why.clone());
        } else if !seen.pod_problems.is_empty() {
            let reason = if seen
                .pod_problems
                .iter()
                .all(|l| l.contains("unschedulable"))
            {
                "AgentsUnschedulable"
            } else {
                "AgentsFailing"
            };
            set(types::DEGRADED, true, reason, summary(&seen.pod_problems));
        } else if unhealthy > 0 {
            let lines: Vec<String> = seen
                .devices
                .iter()
                .flat_map(|a| &a.unhealthy)
                .map(|d| {
                    let mut l = format!("{}/{} {}", d.node, d.device, d.health);
                    if let Some(r) = &d.reason {
                        l.push_str(&format!(" ({r})"));
                    }
                    if !d.pods.is_empty() {
                        l.push_str(&format!(", affects {}", d.pods.join(" ")));
                    }
                    l
                })
                .collect();
            set(
                types::DEGRADED,
                true,
                "DevicesUnhealthy",
                format!("{unhealthy} device(s) not healthy: {}", summary(&lines)),
            );
        } else if !node_reasons.is_empty() {
            set(
                types::DEGRADED,
                true,
                "NodesReportProblems",
                summary(&node_reasons),
            );
        } else {
            set(types::DEGRADED, false, "AgentsHealthy", String::new());
        }
        if nodes.desired == 0 && ds_current {
            set(
                types::READY,
                false,
                "NoMatchingNodes",
                "no node matches the policy's nodeSelector".into(),
            );
        } else if ds_current
            && nodes.desired > 0
            && nodes.ready == nodes.desired
            && nodes.updated == nodes.desired
        {
            set(
                types::READY,
                true,
                "AgentsReady",
                format!("the kubelet has the agent on all {} nodes", nodes.desired),
            );
        } else {
            set(
                types::READY,
                false,
                "AgentsNotReady",
                format!(
                    "{}/{} agents registered with their kubelet",
                    nodes.ready, nodes.desired
                ),
            );
        }
        st.nodes = nodes;
    }
    if let Some(a) = &seen.devices {
        st.devices = a.counts.clone();
        st.unhealthy_devices = a.unhealthy.clone();
    }
    st.nodes_ready = Some(format!("{}/{}", st.nodes.ready, st.nodes.desired));
    st.devices_healthy = Some(format!("{}/{}", st.devices.healthy, st.devices.total));
    st
}

#[cfg(test)]
mod tests;
