//! PCI devices from sysfs (`/sys/bus/pci/devices/<address>`). The ID is the
//! PCI address; the NUMA node comes from `numa_node`; a device bound to
//! `vfio-pci` gives the container `/dev/vfio/vfio` and its IOMMU group node.
//!
//! sysfs emits no inotify events, so PCI hot-plug is seen through
//! `/dev/vfio` (binding to vfio-pci creates the group node) and through the
//! periodic resync of the discovery task.

use std::path::PathBuf;

use devplug_api::PciSource;
use devplug_api::topology;

use super::{Source, SourceError, bus_entries, read_attr};
use crate::devices::device::{Device, DeviceNode, Roots};
use crate::devices::health::Health;

/// The PCI source.
pub struct Pci {
    vendor: Option<String>,
    devices: Vec<String>,
    class: Option<String>,
    require_vfio: bool,
    roots: Roots,
}

fn norm(s: &str) -> String {
    s.trim().trim_start_matches("0x").to_ascii_lowercase()
}

fn link_name(p: &std::path::Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

impl Pci {
    /// A source for the spec over the given roots.
    pub fn new(spec: &PciSource, roots: Roots) -> Self {
        Self {
            vendor: spec.vendor.as_deref().map(norm),
            devices: spec.devices.iter().map(|d| norm(d)).collect(),
            class: spec.class.as_deref().map(norm),
            require_vfio: spec.require_vfio,
            roots,
        }
    }

    /// Reads one device directory; `None` when it does not match.
    fn probe(&self, dir: &std::path::Path, address: String) -> Result<Option<Device>, SourceError> {
        let vendor = norm(&read_attr(&dir.join("vendor"))?);
        let device = norm(&read_attr(&dir.join("device"))?);
        let class = norm(&read_attr(&dir.join("class"))?);
        if self.vendor.as_ref().is_some_and(|v| *v != vendor)
            || (!self.devices.is_empty() && !self.devices.contains(&device))
            || self
                .class
                .as_ref()
                .is_some_and(|c| !class.starts_with(c.as_str()))
        {
            return Ok(None);
        }
        let driver = link_name(&dir.join("driver"));
        let vfio = driver.as_deref() == Some("vfio-pci");
        if self.require_vfio && !vfio {
            return Ok(None);
        }
        let numa_node = std::fs::read_to_string(dir.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0);
        let mut nodes = Vec::new();
        let mut health = Health::Healthy;
        if vfio {
            match link_name(&dir.join("iommu_group")) {
                Some(group) => {
                    for host in ["/dev/vfio/vfio".to_string(), format!("/dev/vfio/{group}")] {
                        if !self.roots.dev_local(&host).exists() && health.is_healthy() {
                            health = Health::Unhealthy(format!("{host} is missing"));
                        }
                        nodes.push(DeviceNode {
                            container_path: host.clone(),
                            host_path: host,
                            permissions: "rw".into(),
                        });
                    }
                }
                None => {
                    health = Health::Unhealthy(
                        "bound to vfio-pci but has no IOMMU group (is the IOMMU enabled?)".into(),
                    )
                }
            }
        }
        let mut attributes = std::collections::BTreeMap::from([
            ("pciAddress".to_string(), address.clone()),
            ("pciVendorID".to_string(), vendor),
            ("pciDeviceID".to_string(), device),
            ("pciClass".to_string(), class),
        ]);
        if let Some(d) = driver {
            attributes.insert("driver".into(), d);
        }
        // The standard topology attributes: the address, and the root
        // complex named in the bus entry's link into /sys/devices.
        if topology::is_pci_bus_id(&address) {
            attributes.insert(topology::PCI_BUS_ID_ATTRIBUTE.into(), address.clone());
        }
        if let Some(root) = super::pcie_root(dir) {
            attributes.insert(topology::PCIE_ROOT_ATTRIBUTE.into(), root);
        }
        Ok(Some(Device {
            capacity: Default::default(),
            partitioning: Default::default(),
            id: address,
            numa_node,
            nodes,
            health,
            links: Vec::new(),
            attributes,
        }))
    }
}

impl Source for Pci {
    fn kind(&self) -> &'static str {
        "pci"
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        let base = self.roots.sys.join("bus/pci/devices");
        let mut out = Vec::new();
        for entry in bus_entries(&base)? {
            match self.probe(
                &entry.path(),
                entry.file_name().to_string_lossy().into_owned(),
            ) {
                Ok(Some(d)) => out.push(d),
                Ok(None) => {}
                Err(e) if e.is_vanished() => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![
            self.roots.dev.join("vfio"),
            self.roots.sys.join("bus/pci/devices"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn pci_dev(
        sys: &std::path::Path,
        addr: &str,
        vendor: &str,
        device: &str,
        class: &str,
        numa: i64,
    ) -> PathBuf {
        let d = sys.join("bus/pci/devices").join(addr);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vendor"), format!("0x{vendor}\n")).unwrap();
        std::fs::write(d.join("device"), format!("0x{device}\n")).unwrap();
        std::fs::write(d.join("class"), format!("0x{class}\n")).unwrap();
        std::fs::write(d.join("numa_node"), format!("{numa}\n")).unwrap();
        d
    }

    #[test]
    fn matches_and_vfio_groups() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: tmp.path().join("dev"),
            sys: tmp.path().join("sys"),
        };
        let a = pci_dev(&roots.sys, "0000:3b:00.0", "10de", "2330", "030200", 1);
        pci_dev(&roots.sys, "0000:3c:00.0", "10de", "2330", "030200", -1);
        pci_dev(&roots.sys, "0000:00:1f.0", "8086", "a1c1", "060100", 0);
        std::fs::create_dir_all(tmp.path().join("drivers/vfio-pci")).unwrap();
        std::fs::create_dir_all(tmp.path().join("groups/42")).unwrap();
        symlink(tmp.path().join("drivers/vfio-pci"), a.join("driver")).unwrap();
        symlink(tmp.path().join("groups/42"), a.join("iommu_group")).unwrap();
        std::fs::create_dir_all(roots.dev.join("vfio")).unwrap();
        std::fs::write(roots.dev.join("vfio/vfio"), "").unwrap();
        std::fs::write(roots.dev.join("vfio/42"), "").unwrap();

        let all = Pci::new(
            &PciSource {
                vendor: Some("0x10DE".into()),
                class: Some("03".into()),
                ..Default::default()
            },
            roots.clone(),
        )
        .discover()
        .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].id, "0000:3b:00.0");
        assert_eq!(all[0].numa_node, Some(1));
        assert_eq!(all[1].numa_node, None, "-1 means unknown");
        let paths: Vec<_> = all[0].nodes.iter().map(|n| n.host_path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/vfio/vfio", "/dev/vfio/42"]);
        assert!(all[0].health.is_healthy());
        assert!(all[1].nodes.is_empty());

        // A device unplugged mid-scan (its attributes gone) is skipped, not fatal.
        std::fs::create_dir_all(roots.sys.join("bus/pci/devices/0000:99:00.0")).unwrap();
        let again = Pci::new(
            &PciSource {
                vendor: Some("10de".into()),
                ..Default::default()
            },
            roots.clone(),
        )
        .discover()
        .unwrap();
        assert_eq!(again.len(), 2);

        let vfio_only = Pci::new(
            &PciSource {
                vendor: Some("10de".into()),
                require_vfio: true,
                ..Default::default()
            },
            roots,
        )
        .discover()
        .unwrap();
        assert_eq!(vfio_only.len(), 1);
    }

    #[test]
    fn the_standard_topology_attributes_come_from_the_sysfs_link() {
        // As on a real host: the bus entry links into /sys/devices, under
        // the root complex the device hangs off.
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: tmp.path().join("dev"),
            sys: tmp.path().join("sys"),
        };
        let real = roots
            .sys
            .join("devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0");
        std::fs::create_dir_all(&real).unwrap();
        for (f, v) in [
            ("vendor", "0x15b3"),
            ("device", "0x101b"),
            ("class", "0x020000"),
            ("numa_node", "0"),
        ] {
            std::fs::write(real.join(f), format!("{v}\n")).unwrap();
        }
        std::fs::create_dir_all(roots.sys.join("bus/pci/devices")).unwrap();
        symlink(
            "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0",
            roots.sys.join("bus/pci/devices/0000:3b:00.0"),
        )
        .unwrap();
        // A plain directory (no link): no root is made up.
        pci_dev(&roots.sys, "0000:5e:00.0", "15b3", "101b", "020000", 0);
        let all = Pci::new(
            &PciSource {
                vendor: Some("15b3".into()),
                ..Default::default()
            },
            roots,
        )
        .discover()
        .unwrap();
        assert_eq!(all.len(), 2);
        let a = &all[0].attributes;
        assert_eq!(a[topology::PCIE_ROOT_ATTRIBUTE], "pci0000:3a");
        assert_eq!(a[topology::PCI_BUS_ID_ATTRIBUTE], "0000:3b:00.0");
        let b = &all[1].attributes;
        assert!(!b.contains_key(topology::PCIE_ROOT_ATTRIBUTE), "{b:?}");
        assert_eq!(b[topology::PCI_BUS_ID_ATTRIBUTE], "0000:5e:00.0");
    }
}
