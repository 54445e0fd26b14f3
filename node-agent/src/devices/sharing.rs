//! Time-slicing: each physical device is advertised as N replica IDs
//! (`<id>::<n>`). Allocate maps replicas back to the physical device, and a
//! physical device's health is every replica's health.

/// Separator between a physical ID and the replica number.
pub const REPLICA_SEP: &str = "::";

/// The advertised IDs of one physical device.
pub fn replica_ids(physical: &str, replicas: u32) -> Vec<String> {
    if replicas <= 1 {
        return vec![physical.to_string()];
    }
    (0..replicas)
        .map(|n| format!("{physical}{REPLICA_SEP}{n}"))
        .collect()
}

/// The physical ID behind an advertised ID, if the ID is well formed for
/// this replica count. Existence of the physical device is the caller's
/// concern.
pub fn physical_of(advertised: &str, replicas: u32) -> Option<&str> {
    if replicas <= 1 {
        return Some(advertised);
    }
    let (phys, n) = advertised.rsplit_once(REPLICA_SEP)?;
    let n: u32 = n.parse().ok()?;
    (n < replicas && !phys.is_empty()).then_some(phys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_ids_are_physical() {
        assert_eq!(replica_ids("gpu0", 1), vec!["gpu0"]);
        assert_eq!(physical_of("gpu0", 1), Some("gpu0"));
    }

    #[test]
    fn replicas_round_trip() {
        let ids = replica_ids("0000:3b:00.0", 3);
        assert_eq!(
            ids,
            vec!["0000:3b:00.0::0", "0000:3b:00.0::1", "0000:3b:00.0::2"]
        );
        for id in &ids {
            assert_eq!(physical_of(id, 3), Some("0000:3b:00.0"));
        }
    }

    #[test]
    fn malformed_replica_ids_are_refused() {
        for bad in ["gpu0", "gpu0::3", "gpu0::x", "::1", "gpu0::-1"] {
            assert_eq!(physical_of(bad, 3), None, "{bad}");
        }
    }
}
