//! USB devices from sysfs (`/sys/bus/usb/devices/*/idVendor`...). The ID is
//! the serial number when the device has one, else `usb-<port path>` (the
//! physical port, stable across reboots); the container gets
//! `/dev/bus/usb/<bus>/<dev>`. Serials are not unique in practice (many
//! CP210x adapters ship with `0001`): devices whose serials collide get
//! `<serial>-usb-<port path>`, unique and stable per port while the twin is
//! plugged in, so no device is ever hidden behind another.

use std::path::{Path, PathBuf};

use devplug_api::UsbSource;

use super::{Source, SourceError, bus_entries, read_attr};
use crate::devices::device::{Device, DeviceNode, Roots};
use crate::devices::health::Health;

/// The USB source.
pub struct Usb {
    spec: UsbSource,
    roots: Roots,
}

impl Usb {
    /// A source for the spec over the given roots.
    pub fn new(spec: &UsbSource, roots: Roots) -> Self {
        Self {
            spec: spec.clone(),
            roots,
        }
    }

    fn matches(&self, vendor: &str, product: &str) -> bool {
        self.spec.devices.iter().any(|m| {
            m.vendor.eq_ignore_ascii_case(vendor)
                && m.product
                    .as_deref()
                    .is_none_or(|p| p.eq_ignore_ascii_case(product))
        })
    }
}

/// Keeps the characters a device ID may hold.
pub(crate) fn sanitize_id(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(63);
    out
}

/// NUMA node of a sysfs device: the first `numa_node` found walking up from
/// the device towards the sysfs root (USB devices inherit their host
/// controller's).
pub(crate) fn numa_of(dev_dir: &Path, sys_root: &Path) -> Option<i64> {
    let real = dev_dir.canonicalize().ok()?;
    let root = sys_root.canonicalize().ok()?;
    for dir in real.ancestors() {
        if !dir.starts_with(&root) {
            break;
        }
        if let Ok(v) = std::fs::read_to_string(dir.join("numa_node")) {
            return v.trim().parse::<i64>().ok().filter(|n| *n >= 0);
        }
    }
    None
}

impl Source for Usb {
    fn kind(&self) -> &'static str {
        "usb"
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        let base = self.roots.sys.join("bus/usb/devices");
        let mut out = Vec::new();
        // The port of each device in `out`, in the same order.
        let mut ports: Vec<String> = Vec::new();
        for entry in bus_entries(&base)? {
            let dir = entry.path();
            // Interfaces (1-1:1.0) have no idVendor; skip them.
            let Ok(vendor) = read_attr(&dir.join("idVendor")) else {
                continue;
            };
            let product = read_attr(&dir.join("idProduct")).unwrap_or_default();
            if !self.matches(&vendor, &product) {
                continue;
            }
            let port = entry.file_name().to_string_lossy().into_owned();
            let bus_text = match read_attr(&dir.join("busnum")) {
                Ok(t) => t,
                Err(e) if e.is_vanished() => continue, // unplugged mid-scan
                Err(e) => return Err(e),
            };
            let bus: u32 = bus_text.parse().map_err(|_| {
                SourceError::Config(format!("{}: busnum is not a number", dir.display()))
            })?;
            let devnum_text = match read_attr(&dir.join("devnum")) {
                Ok(t) => t,
                Err(e) if e.is_vanished() => continue, // unplugged mid-scan
                Err(e) => return Err(e),
            };
            let devnum: u32 = devnum_text.parse().map_err(|_| {
                SourceError::Config(format!("{}: devnum is not a number", dir.display()))
            })?;
            let id = match read_attr(&dir.join("serial")) {
                Ok(s) if !s.is_empty() => sanitize_id(&s),
                _ => sanitize_id(&format!("usb-{port}")),
            };
            ports.push(port.clone());
            let host_path = format!("/dev/bus/usb/{bus:03}/{devnum:03}");
            let health = if self.roots.dev_local(&host_path).exists() {
                Health::Healthy
            } else {
                Health::Unhealthy(format!("device node {host_path} is missing"))
            };
            out.push(Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                id,
                numa_node: numa_of(&dir, &self.roots.sys),
                nodes: vec![DeviceNode {
                    container_path: host_path.clone(),
                    host_path,
                    permissions: "rw".into(),
                }],
                health,
                links: Vec::new(),
                attributes: [
                    ("usbVendorID".to_string(), vendor),
                    ("usbProductID".to_string(), product),
                    ("usbPort".to_string(), port),
                ]
                .into(),
            });
        }
        // Colliding IDs (equal serials): qualify each by its port.
        let mut count: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for d in &out {
            *count.entry(d.id.clone()).or_default() += 1;
        }
        for (d, port) in out.iter_mut().zip(&ports) {
            if count.get(&d.id).copied().unwrap_or(0) > 1 {
                // Keep the port whole: it is what tells the twins apart.
                let suffix = sanitize_id(&format!("-usb-{port}"));
                let keep: String =
                    d.id.chars()
                        .take(63usize.saturating_sub(suffix.len()))
                        .collect();
                d.id = sanitize_id(&format!("{keep}{suffix}"));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        Ok(out)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        // sysfs sends no inotify events; /dev/bus/usb (devtmpfs) does, and
        // every USB plug or unplug creates or removes a node there.
        let usb_dev = self.roots.dev.join("bus/usb");
        let mut dirs = vec![usb_dev.clone()];
        if let Ok(entries) = std::fs::read_dir(&usb_dev) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        dirs.push(self.roots.sys.join("bus/usb/devices"));
        dirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplug_api::UsbMatch;

    fn usb_dev(
        sys: &Path,
        port: &str,
        vendor: &str,
        product: &str,
        bus: u32,
        dev: u32,
        serial: Option<&str>,
    ) {
        let d = sys.join("bus/usb/devices").join(port);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("idVendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(d.join("idProduct"), format!("{product}\n")).unwrap();
        std::fs::write(d.join("busnum"), format!("{bus}\n")).unwrap();
        std::fs::write(d.join("devnum"), format!("{dev}\n")).unwrap();
        if let Some(s) = serial {
            std::fs::write(d.join("serial"), format!("{s}\n")).unwrap();
        }
    }

    #[test]
    fn matches_vendor_product_and_builds_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: tmp.path().join("dev"),
            sys: tmp.path().join("sys"),
        };
        usb_dev(&roots.sys, "1-1", "046d", "c52b", 1, 2, Some("ABC 123"));
        usb_dev(&roots.sys, "1-2", "046d", "0001", 1, 3, None);
        usb_dev(&roots.sys, "2-1", "1234", "c52b", 2, 4, None);
        std::fs::create_dir_all(roots.sys.join("bus/usb/devices/1-1:1.0")).unwrap();
        std::fs::create_dir_all(roots.dev.join("bus/usb/001")).unwrap();
        std::fs::write(roots.dev.join("bus/usb/001/002"), "").unwrap();
        let src = Usb::new(
            &UsbSource {
                devices: vec![UsbMatch {
                    vendor: "046D".into(),
                    product: None,
                }],
            },
            roots,
        );
        let d = src.discover().unwrap();
        let ids: Vec<_> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["ABC_123", "usb-1-2"]);
        assert_eq!(d[0].nodes[0].host_path, "/dev/bus/usb/001/002");
        assert!(d[0].health.is_healthy());
        assert!(!d[1].health.is_healthy(), "node 001/003 does not exist");
    }

    /// Two adapters with the same serial (CP210x ship with `0001`) are two
    /// devices, each with an ID of its own.
    #[test]
    fn equal_serials_are_told_apart_by_port() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: tmp.path().join("dev"),
            sys: tmp.path().join("sys"),
        };
        usb_dev(&roots.sys, "1-1", "10c4", "ea60", 1, 2, Some("0001"));
        usb_dev(&roots.sys, "1-2", "10c4", "ea60", 1, 3, Some("0001"));
        usb_dev(&roots.sys, "1-3", "10c4", "ea60", 1, 4, Some("XYZ"));
        let src = Usb::new(
            &UsbSource {
                devices: vec![UsbMatch {
                    vendor: "10c4".into(),
                    product: Some("ea60".into()),
                }],
            },
            roots,
        );
        let d = src.discover().unwrap();
        let ids: Vec<_> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["0001-usb-1-1", "0001-usb-1-2", "XYZ"]);
        assert_eq!(d[1].nodes[0].host_path, "/dev/bus/usb/001/003");
    }

    #[test]
    fn no_usb_bus_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Usb::new(
            &UsbSource { devices: vec![] },
            Roots {
                dev: tmp.path().into(),
                sys: tmp.path().into(),
            },
        );
        assert!(src.discover().unwrap().is_empty());
    }
}
