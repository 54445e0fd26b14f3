//! The allow-lists a cluster admin sets (chart values) on what a policy may
//! hand to workloads. The operator checks them before it approves a spec;
//! the agent checks them again before it serves one (it is given the same
//! lists through its DaemonSet), so neither a policy edit the operator has
//! not judged nor a hand-made agent pod serves past them.

/// A host path prefix policies may mount from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHostPath {
    /// Absolute prefix, e.g. `/dev`.
    pub prefix: String,
    /// Mounts under it must be read-only.
    pub read_only: bool,
}

impl std::str::FromStr for AllowedHostPath {
    type Err = String;

    /// `/dev:ro` (read-only) or `/opt/tools` (read-write allowed).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (prefix, ro) = match s.strip_suffix(":ro") {
            Some(p) => (p, true),
            None => (s.strip_suffix(":rw").unwrap_or(s), false),
        };
        if !prefix.starts_with('/') {
            return Err(format!(
                "{s:?}: an allowed host path is absolute, e.g. /dev:ro"
            ));
        }
        Ok(Self {
            prefix: prefix.trim_end_matches('/').to_string(),
            read_only: ro,
        })
    }
}

impl std::fmt::Display for AllowedHostPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}",
            if self.prefix.is_empty() {
                "/"
            } else {
                &self.prefix
            },
            if self.read_only { ":ro" } else { "" }
        )
    }
}

/// Why `spec.allocate.mounts` breaks `allowed`, if it does.
pub fn host_path_violation(
    spec: &crate::DevicePluginPolicySpec,
    allowed: &[AllowedHostPath],
) -> Option<String> {
    let under = |path: &str, prefix: &str| {
        let path = path.trim_end_matches('/');
        prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"))
    };
    let mut bad = Vec::new();
    for (i, m) in spec.allocate.mounts.iter().enumerate() {
        let ok = !m.host_path.split('/').any(|c| c == "..")
            && allowed
                .iter()
                .any(|a| under(&m.host_path, &a.prefix) && (m.read_only || !a.read_only));
        if !ok {
            bad.push(format!(
                "spec.allocate.mounts[{i}].hostPath {:?}{}",
                m.host_path,
                if m.read_only { "" } else { " (read-write)" }
            ));
        }
    }
    if bad.is_empty() {
        return None;
    }
    let list: Vec<String> = allowed
        .iter()
        .map(|a| {
            format!(
                "{}{}",
                a.prefix,
                if a.read_only { " (read-only)" } else { "" }
            )
        })
        .collect();
    Some(format!(
        "{} outside the host paths this operator allows: {} (chart value allowedHostPaths)",
        bad.join(", "),
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    ))
}

/// Device nodes no policy hands out unless the admin lists them (chart
/// value `allowedDeviceNodes`): raw memory and I/O ports, which give any
/// container the whole host. Block devices (disks) are refused the same
/// way, found by their file type at discovery.
pub const DANGEROUS_DEVICE_NODES: &[&str] = &["/dev/mem", "/dev/kmem", "/dev/port"];

/// Why the host device node `path` (a block device when `block`) may not be
/// handed out under `allowed`, if it may not.
pub fn device_node_refusal(path: &str, block: bool, allowed: &[String]) -> Option<String> {
    if allowed.iter().any(|a| a == path) {
        return None;
    }
    if DANGEROUS_DEVICE_NODES.contains(&path) {
        return Some(format!(
            "{path} gives a container the host's memory or I/O ports; list it in the chart value allowedDeviceNodes to hand it out"
        ));
    }
    if block {
        return Some(format!(
            "{path} is a block device (a disk); list it in the chart value allowedDeviceNodes to hand it out"
        ));
    }
    None
}

/// Why the spec names a refused device node outright (a path, not a glob:
/// globs are checked on what they find), if it does.
pub fn device_node_violation(
    spec: &crate::DevicePluginPolicySpec,
    allowed: &[String],
) -> Option<String> {
    let paths = spec.source.paths.as_ref()?;
    let bad: Vec<String> = paths
        .globs
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.contains(['*', '?', '[']))
        .filter_map(|(i, g)| {
            device_node_refusal(g, false, allowed)
                .map(|why| format!("spec.source.paths.globs[{i}]: {why}"))
        })
        .collect();
    (!bad.is_empty()).then(|| bad.join("; "))
}

/// Why `spec.agent.image` is refused under `allowed` (the chart's own
/// image is always allowed and not listed here), if it is. `None` for
/// `allowed` allows any image.
pub fn agent_image_violation(
    spec: &crate::DevicePluginPolicySpec,
    default_image: &str,
    allowed: Option<&[String]>,
) -> Option<String> {
    let allowed = allowed?;
    let image = spec.agent.image.as_deref()?;
    if image == default_image || allowed.iter().any(|a| a == image) {
        return None;
    }
    Some(format!(
        "spec.agent.image {image:?} is not the chart's agent image and not in the chart value allowedAgentImages ({}): agents run privileged on every selected node",
        if allowed.is_empty() {
            "empty".to_string()
        } else {
            allowed.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_nodes_and_disks_need_listing() {
        assert!(device_node_refusal("/dev/mem", false, &[]).is_some());
        assert!(device_node_refusal("/dev/port", false, &[]).is_some());
        assert!(device_node_refusal("/dev/sda", true, &[]).is_some());
        assert!(device_node_refusal("/dev/sda", true, &["/dev/sda".into()]).is_none());
        assert!(device_node_refusal("/dev/mem", false, &["/dev/mem".into()]).is_none());
        assert!(device_node_refusal("/dev/fuse", false, &[]).is_none());
    }
}
