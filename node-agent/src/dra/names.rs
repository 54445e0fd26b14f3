//! Names DRA needs: device names (DNS labels), ResourceSlice names, the
//! sockets of the driver.

use std::path::{Path, PathBuf};

use devplug_api::fnv1a;

/// Whether `s` is a DNS label (RFC 1123): what a DRA device name must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The DRA device name of an advertised device ID: the ID itself when it is
/// already a DNS label, else a DNS label made from it plus a hash of the
/// whole ID (so `GPU-ABC` and `gpu-abc` stay distinct). The original ID is
/// published as the device's `id` attribute.
pub fn device_name(id: &str) -> String {
    if is_dns_label(id) {
        return id.to_string();
    }
    let lowered: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let keep: String = lowered.trim_matches('-').chars().take(54).collect();
    let keep = keep.trim_end_matches('-');
    let h = fnv1a(id) as u32;
    if keep.is_empty() {
        format!("d-{h:08x}")
    } else {
        format!("{keep}-{h:08x}")
    }
}

/// Name of the `i`-th ResourceSlice of a node's pool:
/// `<node>.<driver>-<hash>-<i>`. The hash is of the node and the driver
/// apart, so two pairs that read alike once joined (node `a.b` with driver
/// `c.devplug.io`, node `a` with driver `b.c.devplug.io`) still get
/// different names; the readable part says whose slice it is.
pub fn slice_name(node: &str, driver: &str, i: usize) -> String {
    let h = fnv1a(&format!("{node}\n{driver}"));
    let base = if node.len() + driver.len() + 26 <= 253 {
        format!("{node}.{driver}")
    } else {
        driver.to_string()
    };
    format!("{base}-{h:016x}-{i}")
}

/// The name of a claim's CDI device for one physical device of one request:
/// `<device>-<request>-<claim uid>`, so the pod's allocatedResourcesStatus
/// (which shows CDI names) names the device.
pub fn cdi_device(claim_uid: &str, request: &str, physical: &str) -> String {
    format!("{}-{request}-{claim_uid}", device_name(physical))
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The CDI spec file of a claim prepared by `driver`: named by both,
/// because one claim may hold devices of several drivers (two policies
/// serving two requests of it), and each driver's prepare and unprepare
/// must touch only its own file.
pub fn cdi_file(driver: &str, claim_uid: &str) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
            .collect()
    };
    format!("devplug-claim-{}-{}.json", safe(driver), safe(claim_uid))
}

/// Where the driver's sockets and checkpoint live under the kubelet root.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `<root>/plugins_registry/<driver>-reg.sock`, found by the kubelet's
    /// plugin watcher.
    pub registration: PathBuf,
    /// `<root>/plugins/<driver>/`.
    pub dir: PathBuf,
    /// `<root>/plugins/<driver>/dra.sock`: the DRAPlugin and health services.
    pub endpoint: PathBuf,
    /// `<root>/plugins/<driver>/claims.json`: prepared claims.
    pub checkpoint: PathBuf,
}

impl Paths {
    /// The paths of `driver` under `kubelet_root`.
    pub fn new(kubelet_root: &Path, driver: &str) -> Self {
        let dir = kubelet_root.join("plugins").join(driver);
        Self {
            registration: kubelet_root
                .join(devplug_proto::pluginregistration::REGISTRY_DIR)
                .join(format!("{driver}-reg.sock")),
            endpoint: dir.join("dra.sock"),
            checkpoint: dir.join("claims.json"),
            dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_dns_labels_and_distinct() {
        assert_eq!(device_name("dev-0"), "dev-0");
        let ids = [
            "GPU-3f2a",
            "gpu-3f2a",
            "0000:3b:00.0",
            "usb::1",
            "sn_ABC",
            "sim-0::3",
            &"x".repeat(63),
            &"X".repeat(63),
            "::",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for id in ids {
            let n = device_name(id);
            assert!(is_dns_label(&n), "{id:?} -> {n:?}");
            assert!(seen.insert(n.clone()), "{id:?} collides as {n:?}");
            assert_eq!(device_name(id), n, "stable");
        }
    }

    #[test]
    fn slice_names_fit_253() {
        let node = "n".repeat(253);
        let s = slice_name(&node, &"d".repeat(63), 9);
        assert!(s.len() <= 253, "{}", s.len());
        assert!(slice_name(&"m".repeat(253), &"d".repeat(63), 9) != s);
        let n = slice_name("node1", "foo.devplug.io", 0);
        assert!(n.starts_with("node1.foo.devplug.io-"), "{n}");
        assert!(n.ends_with("-0"), "{n}");
    }

    /// Node `a.b` with policy `c` and node `a` with policy `b.c` joined to
    /// the same name once.
    #[test]
    fn slice_names_of_different_pools_never_meet() {
        let one = slice_name("a.b", "c.devplug.io", 0);
        let two = slice_name("a", "b.c.devplug.io", 0);
        assert_ne!(one, two);
    }
}
