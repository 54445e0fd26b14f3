//! Host device nodes matched by glob. Each match is one device, identified
//! by its path under `/dev` (`/dev/foo0` → `foo0`, `/dev/dri/card0` →
//! `dri_card0`), which is stable across restarts.

use std::collections::BTreeSet;
use std::path::PathBuf;

use devplug_api::PathsSource;

use super::{Source, SourceError};
use crate::devices::device::{Device, DeviceNode, Roots};
use crate::devices::health::Health;

/// The paths source.
pub struct Paths {
    spec: PathsSource,
    roots: Roots,
}

impl Paths {
    /// A source for the spec over the given roots.
    pub fn new(spec: &PathsSource, roots: Roots) -> Self {
        Self {
            spec: spec.clone(),
            roots,
        }
    }

    fn node(&self, host_path: &str) -> DeviceNode {
        let container_path = match &self.spec.container_path_prefix {
            Some(prefix) => format!(
                "{}/{}",
                prefix.trim_end_matches('/'),
                host_path.trim_start_matches("/dev/")
            ),
            None => host_path.to_string(),
        };
        DeviceNode {
            host_path: host_path.to_string(),
            container_path,
            permissions: self.spec.permissions.clone().unwrap_or_else(|| "rw".into()),
        }
    }
}

/// The device ID of a host path under `/dev`.
pub fn id_of(host_path: &str) -> String {
    host_path.trim_start_matches("/dev/").replace('/', "_")
}

impl Source for Paths {
    fn kind(&self) -> &'static str {
        "paths"
    }

    fn discover(&self) -> Result<Vec<Device>, SourceError> {
        let root = glob::Pattern::escape(&self.roots.dev.to_string_lossy());
        let mut matched = BTreeSet::new();
        for g in &self.spec.globs {
            let rel = g.trim_start_matches("/dev/");
            let pattern = format!("{}/{rel}", root.trim_end_matches('/'));
            let entries = glob::glob(&pattern)
                .map_err(|e| SourceError::Config(format!("glob {g:?}: {e}")))?;
            for entry in entries {
                let local = entry.map_err(|e| {
                    let p = e.path().to_path_buf();
                    SourceError::io(p, e.into())
                })?;
                if local.is_dir() {
                    continue;
                }
                if let Some(host) = self.roots.dev_host(&local) {
                    matched.insert(host);
                }
            }
        }
        let mut out = Vec::with_capacity(matched.len());
        for host in matched {
            let name = host.rsplit('/').next().unwrap_or(&host).to_string();
            let mut nodes = vec![self.node(&host)];
            let mut health = Health::Healthy;
            for t in &self.spec.companions {
                let companion = t.replace("{path}", &host).replace("{name}", &name);
                if self.roots.dev_local(&companion).exists() {
                    nodes.push(self.node(&companion));
                } else if health.is_healthy() {
                    health = Health::Unhealthy(format!("companion {companion} is missing"));
                }
            }
            out.push(Device {
                capacity: Default::default(),
                partitioning: Default::default(),
                id: id_of(&host),
                numa_node: None,
                attributes: [("path".to_string(), host.clone())].into(),
                nodes,
                health,
                links: Vec::new(),
            });
        }
        Ok(out)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = BTreeSet::new();
        for g in self.spec.globs.iter().chain(&self.spec.companions) {
            let g = g.replace("{path}", "/dev/x");
            // The directory part before the first wildcard.
            let fixed: String = g
                .chars()
                .take_while(|c| !matches!(c, '*' | '?' | '['))
                .collect();
            let dir = match fixed.rfind('/') {
                Some(i) => &fixed[..i],
                None => "/dev",
            };
            dirs.insert(self.roots.dev_local(dir));
        }
        dirs.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &std::path::Path) -> Roots {
        Roots {
            dev: dir.join("dev"),
            sys: dir.join("sys"),
        }
    }

    #[test]
    fn globs_companions_and_container_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let r = roots(tmp.path());
        std::fs::create_dir_all(r.dev.join("sub")).unwrap();
        for f in ["foo0", "foo0-ctl", "foo1", "bar", "sub/foo9"] {
            std::fs::write(r.dev.join(f), "").unwrap();
        }
        let src = Paths::new(
            &PathsSource {
                globs: vec!["/dev/foo[0-9]".into(), "/dev/sub/foo*".into()],
                companions: vec!["{path}-ctl".into()],
                permissions: Some("r".into()),
                container_path_prefix: Some("/devices".into()),
            },
            r.clone(),
        );
        let d = src.discover().unwrap();
        let ids: Vec<_> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["foo0", "foo1", "sub_foo9"]);
        assert!(d[0].health.is_healthy());
        assert_eq!(d[0].nodes.len(), 2);
        assert_eq!(d[0].nodes[1].host_path, "/dev/foo0-ctl");
        assert_eq!(d[0].nodes[0].container_path, "/devices/foo0");
        assert_eq!(d[0].nodes[0].permissions, "r");
        assert!(matches!(&d[1].health, Health::Unhealthy(r) if r.contains("/dev/foo1-ctl")));
        let dirs = src.watch_dirs();
        assert_eq!(dirs, vec![r.dev.clone(), r.dev.join("sub")]);
    }

    #[test]
    fn no_match_is_an_empty_list() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Paths::new(
            &PathsSource {
                globs: vec!["/dev/nothing*".into()],
                ..Default::default()
            },
            roots(tmp.path()),
        );
        assert!(src.discover().unwrap().is_empty());
    }
}
