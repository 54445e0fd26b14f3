//! Simulated devices, for demos, e2e tests and benchmarks.
//!
//! Health is flipped from outside the process through a control directory,
//! `<sim-control-dir>/<policy-name>/<device-id>`: a missing file or one that
//! starts with `Healthy` means healthy; `Unhealthy: <reason>` and
//! `Unknown: <reason>` mean what they say. A file named `<device-id>.absent`
//! removes the device from the list (simulated hot-unplug). The
//! `devplug-agent sim` subcommand writes these files atomically.

use std::path::{Path, PathBuf};

use devplug_api::SimulatedSource;

use super::{Source, SourceError};
use crate::devices::device::Device;
use crate::devices::health::Health;

/// The simulated source.
pub struct Simulated {
    devices: Vec<(String, Option<i64>)>,
    control: PathBuf,
}

impl Simulated {
    /// Devices from the spec; `control` is this policy's control directory.
    pub fn new(spec: &SimulatedSource, control: PathBuf) -> Self {
        let devices = if spec.devices.is_empty() {
            let prefix = spec.id_prefix.as_deref().unwrap_or("sim");
            let n = spec.count.max(1);
            let block = n.div_ceil(spec.numa_nodes.max(1));
            (0..n)
                .map(|i| {
                    let numa = (spec.numa_nodes > 0).then(|| i64::from(i / block));
                    (format!("{prefix}-{i}"), numa)
                })
                .collect()
        } else {
            spec.devices
                .iter()
                .map(|d| (d.id.clone(), d.numa_node))
                .collect()
        };
        Self { devices, control }
    }
}

/// Parses one control file's content.
pub fn parse_state(text: &str) -> Health {
    let t = text.trim();
    let (state, reason) = match t.split_once(':') {
        Some((s, r)) => (s.trim(), r.trim()),
        None => (t, ""),
    };
    let reason = if reason.is_empty() {
        "set through the simulation control directory".to_string()
    } else {
        reason.to_string()
    };
    match state {
        "" | "Healthy" => Health::Healthy,
        "Unknown" => Health::Unknown(reason),
        "Unhealthy" => Health::Unhealthy(reason),
        other => Health::Unknown(format!("unreadable simulation state {other:?}")),
    }
}

fn read_state(path: &Path) -> Result<Option<String>, SourceError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SourceError::io(path, e)),
    }
}

impl Source for Simulated {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        let mut out = Vec::with_capacity(self.devices.len());
        for (id, numa) in &self.devices {
            if self.control.join(format!("{id}.absent")).exists() {
                continue;
            }
            let health = match read_state(&self.control.join(id)) {
                Ok(None) => Health::Healthy,
                Ok(Some(text)) => parse_state(&text),
                Err(e) => Health::Unknown(e.to_string()),
            };
            out.push(Device {
                id: id.clone(),
                numa_node: *numa,
                nodes: Vec::new(),
                health,
                links: Vec::new(),
                attributes: Default::default(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![self.control.clone()]
    }

    fn watch_contents(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_and_numa_blocks() {
        let s = Simulated::new(
            &SimulatedSource {
                count: 4,
                numa_nodes: 2,
                id_prefix: Some("foo".into()),
                devices: vec![],
            },
            PathBuf::from("/nonexistent"),
        );
        let d = s.discover().unwrap();
        let got: Vec<_> = d.iter().map(|d| (d.id.as_str(), d.numa_node)).collect();
        assert_eq!(
            got,
            vec![
                ("foo-0", Some(0)),
                ("foo-1", Some(0)),
                ("foo-2", Some(1)),
                ("foo-3", Some(1))
            ]
        );
        assert!(d.iter().all(|d| d.health.is_healthy()));
    }

    #[test]
    fn control_files_set_health_and_presence() {
        let dir = tempfile::tempdir().unwrap();
        let s = Simulated::new(
            &SimulatedSource {
                count: 3,
                ..Default::default()
            },
            dir.path().to_path_buf(),
        );
        std::fs::write(dir.path().join("sim-0"), "Unhealthy: fan stopped\n").unwrap();
        std::fs::write(dir.path().join("sim-1"), "Unknown").unwrap();
        std::fs::write(dir.path().join("sim-2.absent"), "").unwrap();
        let d = s.discover().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].health, Health::Unhealthy("fan stopped".into()));
        assert!(matches!(d[1].health, Health::Unknown(_)));
    }

    #[test]
    fn parse_states() {
        assert_eq!(parse_state("Healthy\n"), Health::Healthy);
        assert_eq!(parse_state(""), Health::Healthy);
        assert!(matches!(parse_state("garbage"), Health::Unknown(r) if r.contains("garbage")));
    }
}
