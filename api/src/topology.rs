//! The standard DRA topology attributes (`resource.kubernetes.io/…`) and
//! the PCI names they carry. Pure functions: the agent's sources find the
//! facts, this module names and checks them.

/// Attribute naming the PCIe root complex a device hangs off, as Linux
/// names it under `/sys/devices` (`pci0000:00`). Two devices with the same
/// value share a root: a claim can ask for that with `matchAttribute`.
pub const PCIE_ROOT_ATTRIBUTE: &str = "resource.kubernetes.io/pcieRoot";
/// Attribute holding a device's PCI address (`0000:3b:00.0`).
pub const PCI_BUS_ID_ATTRIBUTE: &str = "resource.kubernetes.io/pciBusID";

fn hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` is a PCIe root name: `pci` + 4 hex digits (domain) + `:` +
/// 2 hex digits (bus), lower case.
pub fn is_pcie_root(s: &str) -> bool {
    s.strip_prefix("pci")
        .and_then(|r| r.split_once(':'))
        .is_some_and(|(d, b)| hex(d, 4) && hex(b, 2))
}

/// Whether `s` is a PCI address `dddd:bb:dd.f`, lower case.
pub fn is_pci_bus_id(s: &str) -> bool {
    let mut parts = s.split(':');
    let (Some(d), Some(b), Some(rest), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((dev, func)) = rest.split_once('.') else {
        return false;
    };
    hex(d, 4)
        && hex(b, 2)
        && hex(dev, 2)
        && func.len() == 1
        && matches!(func.as_bytes()[0], b'0'..=b'7')
}

/// A PCI address as the standard attribute wants it, from the forms tools
/// print: NVML's `00000000:3B:00.0` (8-digit domain, upper case) or a
/// bare `3b:00.0` (domain 0). `None` when it is no PCI address.
pub fn normalize_pci_bus_id(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let full = match s.matches(':').count() {
        1 => format!("0000:{s}"),
        2 => {
            let (domain, rest) = s.split_once(':')?;
            // NVML pads the domain to 8 digits; Linux uses the low 4.
            let low = domain.get(domain.len().saturating_sub(4)..)?;
            if domain.len() > 4 && domain[..domain.len() - 4].bytes().any(|b| b != b'0') {
                return None;
            }
            format!("{low:0>4}:{rest}")
        }
        _ => return None,
    };
    is_pci_bus_id(&full).then_some(full)
}

/// The PCIe root in a sysfs device path (the target of
/// `/sys/bus/pci/devices/<address>`, such as
/// `../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0`): its first
/// component that is a root name.
pub fn pcie_root_of(path: &std::path::Path) -> Option<String> {
    path.components()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| is_pcie_root(c))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_names_are_checked_and_normalized() {
        assert!(is_pcie_root("pci0000:00"));
        assert!(is_pcie_root("pci0001:3a"));
        for bad in [
            "pci0000:0",
            "pci0000:000",
            "PCI0000:00",
            "pci0000:0G",
            "pci000:00",
            "0000:00",
        ] {
            assert!(!is_pcie_root(bad), "{bad}");
        }
        assert!(is_pci_bus_id("0000:3b:00.0"));
        for bad in [
            "0000:3b:00.8",
            "0000:3B:00.0",
            "3b:00.0",
            "0000:3b:00",
            "0000:3b:00.0:1",
            "00000000:3b:00.0",
        ] {
            assert!(!is_pci_bus_id(bad), "{bad}");
        }
        assert_eq!(
            normalize_pci_bus_id("00000000:3B:00.0").as_deref(),
            Some("0000:3b:00.0")
        );
        assert_eq!(
            normalize_pci_bus_id("3b:00.1").as_deref(),
            Some("0000:3b:00.1")
        );
        assert_eq!(
            normalize_pci_bus_id("0001:3b:00.0").as_deref(),
            Some("0001:3b:00.0")
        );
        // A domain that does not fit Linux's 4 digits, and garbage.
        assert_eq!(normalize_pci_bus_id("00010000:3b:00.0"), None);
        assert_eq!(normalize_pci_bus_id("GPU-1234"), None);
        assert_eq!(normalize_pci_bus_id(""), None);
    }

    #[test]
    fn the_root_is_found_in_a_sysfs_device_path() {
        let p = std::path::Path::new("../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0");
        assert_eq!(pcie_root_of(p).as_deref(), Some("pci0000:00"));
        let abs = std::path::Path::new("/sys/devices/pci0000:40/0000:40:03.1/0000:41:00.0");
        assert_eq!(pcie_root_of(abs).as_deref(), Some("pci0000:40"));
        assert_eq!(
            pcie_root_of(std::path::Path::new("/sys/devices/platform/x")),
            None
        );
    }
}
