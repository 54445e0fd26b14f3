//! Validation of a policy spec. The same rules are enforced at admission by
//! the CRD schema; the agent runs them again on every config it loads so a
//! standalone config file gets the same clear errors.

use std::collections::HashSet;
use std::fmt;

use crate::policy::{DevicePluginPolicySpec, SharingStrategy};

/// One rule a spec breaks, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, for example `spec.sharing.replicas`.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All the rules a spec breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationErrors(pub Vec<FieldError>);

struct Collector(Vec<FieldError>);

impl Collector {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Longest domain of an extended resource name: the kubelet checks
/// `requests.<name>` as a qualified name, whose prefix is a 253-character
/// DNS subdomain.
pub const MAX_DOMAIN: usize = 253 - "requests.".len();

/// Longest preStart time limit: the kubelet gives up on PreStartContainer
/// after 30 s and fails the container; the command must end well before.
pub const MAX_PRESTART_SECONDS: u32 = 25;

/// Most device IDs one policy may advertise on a node (devices x replicas):
/// the kubelet receives ListAndWatch with a 4 MiB message limit.
pub const MAX_ADVERTISED_IDS: u64 = 16384;

/// Checks a resource name: `<domain>/<name>` with a DNS-subdomain domain
/// outside `kubernetes.io` / `k8s.io`, and a qualified-name `<name>`.
pub fn validate_resource_name(name: &str) -> Result<(), String> {
    if name.starts_with("requests.") {
        return Err(format!(
            "{name:?} starts with requests., which is reserved for resource quotas"
        ));
    }
    if name.contains("kubernetes.io/") {
        return Err(format!(
            "{name:?} is reserved: the kubelet treats any name containing kubernetes.io/ as a native resource"
        ));
    }
    let Some((domain, short)) = name.split_once('/') else {
        return Err(format!(
            "{name:?} has no domain; use <domain>/<name>, for example example.com/{name}"
        ));
    };
    if !is_dns_subdomain(domain) || !domain.contains('.') {
        return Err(format!(
            "domain {domain:?} of {name:?} is not a DNS subdomain like example.com"
        ));
    }
    if domain.len() > MAX_DOMAIN {
        return Err(format!(
            "domain of {name:?} has {} characters; the kubelet allows at most {MAX_DOMAIN}",
            domain.len()
        ));
    }
    for reserved in ["kubernetes.io", "k8s.io"] {
        if domain == reserved || domain.ends_with(&format!(".{reserved}")) {
            return Err(format!(
                "domain {domain:?} is reserved by Kubernetes; use your own domain"
            ));
        }
    }
    if !is_qualified_name_part(short) {
        return Err(format!(
            "name {short:?} of {name:?} must be 1-63 characters of [A-Za-z0-9-_.], \
             starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Checks a device ID: 1-63 characters of `[A-Za-z0-9._:-]`. IDs travel in
/// environment variables, CDI names and status, so they stay plain.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!("device ID {id:?} must be 1-63 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(format!(
            "device ID {id:?} may only contain letters, digits and . _ : -"
        ));
    }
    Ok(())
}

/// Checks a CDI kind, `<vendor>/<class>`, by the rules of the CDI parser
/// the container runtimes use: the vendor starts with a letter, ends with a
/// letter or digit and holds letters, digits, `-`, `_` and `.`; the class
/// the same without `.`. A kind they refuse fails every container given
/// one of its devices.
pub fn validate_cdi_kind(kind: &str) -> Result<(), String> {
    let Some((vendor, class)) = kind.split_once('/') else {
        return Err(format!(
            "{kind:?} is not a CDI kind: use <vendor>/<class>, for example example.com/gpu"
        ));
    };
    let part = |s: &str, extra: &[char]| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c))
    };
    if !part(vendor, &['.']) {
        return Err(format!(
            "CDI vendor {vendor:?} of {kind:?} must start with a letter, end with a letter or digit and hold only letters, digits, '-', '_' and '.' (container runtimes refuse it otherwise)"
        ));
    }
    if !part(class, &[]) {
        return Err(format!(
            "CDI class {class:?} of {kind:?} must start with a letter, end with a letter or digit and hold only letters, digits, '-' and '_' (no '.'; container runtimes refuse it otherwise)"
        ));
    }
    Ok(())
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_qualified_name_part(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && s.chars().next().is_some_and(alnum)
        && s.chars().last().is_some_and(alnum)
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn is_hex(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn strip_0x(s: &str) -> &str {
    s.strip_prefix("0x").unwrap_or(s)
}

/// Checks glob syntax: balanced `[...]` classes, no empty class.
fn check_glob(g: &str) -> Result<(), String> {
    let mut chars = g.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '[' => {
                let mut closed = false;
                if chars.peek() == Some(&'!') {
                    chars.next();
                }
                // A ']' right after '[' is a literal member, not the end.
                for (len, c2) in chars.by_ref().enumerate() {
                    if c2 == ']' && len > 0 {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err(format!("glob {g:?} has an unclosed '['"));
                }
            }
            ']' => return Err(format!("glob {g:?} has a ']' without '['")),
            _ => {}
        }
    }
    Ok(())
}

impl DevicePluginPolicySpec {
    /// Checks every rule and returns all violations at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector(Vec::new());
        if let Err(e) = validate_resource_name(&self.resource_name) {
            c.err("spec.resourceName", e);
        }

        let sources = self.source.set_sources();
        match sources.len() {
            0 => c.err(
                "spec.source",
                "set exactly one source: simulated, paths, usb, pci or nvidia",
            ),
            1 => {}
            _ => c.err(
                "spec.source",
                format!(
                    "set exactly one source, found {}: {}",
                    sources.len(),
                    sources.join(", ")
                ),
            ),
        }

        if let Some(sim) = &self.source.simulated {
            let f = "spec.source.simulated";
            if sim.devices.is_empty() && sim.count == 0 {
                c.err(f, "set count >= 1 or list devices");
            }
            if !sim.devices.is_empty() && sim.count != 0 {
                c.err(f, "set either count or devices, not both");
            }
            let ids = u64::from(sim.count) + sim.devices.len() as u64;
            let advertised = ids.saturating_mul(u64::from(self.sharing.effective_replicas()));
            if advertised > MAX_ADVERTISED_IDS {
                c.err(
                    f,
                    format!(
                        "{ids} devices x {} replicas = {advertised} IDs; at most {MAX_ADVERTISED_IDS} fit the kubelet's 4 MiB ListAndWatch message",
                        self.sharing.effective_replicas()
                    ),
                );
            }
            if let Some(p) = &sim.id_prefix
                && let Err(e) = validate_device_id(&format!("{p}-0"))
            {
                c.err(format!("{f}.idPrefix"), e);
            }
            let mut seen = HashSet::new();
            for (i, d) in sim.devices.iter().enumerate() {
                if let Err(e) = validate_device_id(&d.id) {
                    c.err(format!("{f}.devices[{i}].id"), e);
                }
                if !seen.insert(d.id.as_str()) {
                    c.err(
                        format!("{f}.devices[{i}].id"),
                        format!("duplicate ID {:?}", d.id),
                    );
                }
                if d.numa_node.is_some_and(|n| n < 0) {
                    c.err(format!("{f}.devices[{i}].numaNode"), "must be >= 0");
                }
                if let Some(r) = &d.pcie_root
                    && !crate::topology::is_pcie_root(r)
                {
                    c.err(
                        format!("{f}.devices[{i}].pcieRoot"),
                        format!(
                            "{r:?} is not a PCIe root name such as pci0000:00 (lower-case hex)"
                        ),
                    );
                }
                if let Some(b) = &d.pci_bus_id
                    && !crate::topology::is_pci_bus_id(b)
                {
                    c.err(
                        format!("{f}.devices[{i}].pciBusID"),
                        format!("{b:?} is not a PCI address such as 0000:3b:00.0 (lower-case hex)"),
                    );
                }
            }
        }

        if let Some(n) = &self.source.nvidia
            && n.mig_partitions
            && (self.kubelet_api != crate::KubeletApi::Dra
                || self.sharing.strategy != crate::SharingStrategy::Exclusive)
        {
            c.err(
                "spec.source.nvidia.migPartitions",
                "MIG partitions are made per claim, which only DRA can ask for: set kubeletApi DRA and Exclusive sharing",
            );
        }
        if let Some(sim) = &self.source.simulated
            && let Some(n) = sim.partition_slots
        {
            let f = "spec.source.simulated.partitionSlots";
            if self.kubelet_api != crate::KubeletApi::Dra
                || self.sharing.strategy != crate::SharingStrategy::Exclusive
            {
                c.err(
                    f,
                    "partitions are made per claim, which only DRA can ask for: set kubeletApi DRA and Exclusive sharing",
                );
            }
            if !(2..=8).contains(&n) {
                c.err(f, format!("{n} slots: use 2 to 8"));
            }
        }

        if let Some(p) = &self.source.paths {
            let f = "spec.source.paths";
            if p.globs.is_empty() {
                c.err(format!("{f}.globs"), "list at least one glob under /dev/");
            }
            for (i, g) in p.globs.iter().enumerate() {
                if !g.starts_with("/dev/") || g.contains("/../") || g.ends_with("/..") {
                    c.err(
                        format!("{f}.globs[{i}]"),
                        format!("{g:?} must be an absolute path under /dev/"),
                    );
                } else if let Err(e) = check_glob(g) {
                    c.err(format!("{f}.globs[{i}]"), e);
                }
            }
            for (i, t) in p.companions.iter().enumerate() {
                if !(t.starts_with("/dev/") || t.starts_with("{path}")) {
                    c.err(
                        format!("{f}.companions[{i}]"),
                        format!("{t:?} must start with /dev/ or {{path}}"),
                    );
                }
            }
            if let Some(perm) = &p.permissions {
                let mut seen = HashSet::new();
                if perm.is_empty()
                    || !perm
                        .chars()
                        .all(|ch| matches!(ch, 'r' | 'w' | 'm') && seen.insert(ch))
                {
                    c.err(
                        format!("{f}.permissions"),
                        format!("{perm:?} must be a non-empty combination of r, w, m"),
                    );
                }
            }
            if let Some(pre) = &p.container_path_prefix
                && !pre.starts_with('/')
            {
                c.err(
                    format!("{f}.containerPathPrefix"),
                    format!("{pre:?} must be absolute"),
                );
            }
        }

        if let Some(u) = &self.source.usb {
            let f = "spec.source.usb.devices";
            if u.devices.is_empty() {
                c.err(f, "list at least one vendor (and optionally product)");
            }
            for (i, m) in u.devices.iter().enumerate() {
                if !is_hex(&m.vendor, &[4]) {
                    c.err(
                        format!("{f}[{i}].vendor"),
                        format!("{:?} must be 4 hex digits, for example 046d", m.vendor),
                    );
                }
                if let Some(p) = &m.product
                    && !is_hex(p, &[4])
                {
                    c.err(
                        format!("{f}[{i}].product"),
                        format!("{p:?} must be 4 hex digits, for example c52b"),
                    );
                }
            }
        }

        if let Some(p) = &self.source.pci {
            let f = "spec.source.pci";
            if p.vendor.is_none() && p.devices.is_empty() && p.class.is_none() {
                c.err(f, "set at least one of vendor, devices, class");
            }
            if let Some(v) = &p.vendor
                && !is_hex(strip_0x(v), &[4])
            {
                c.err(format!("{f}.vendor"), format!("{v:?} must be 4 hex digits"));
            }
            for (i, d) in p.devices.iter().enumerate() {
                if !is_hex(strip_0x(d), &[4]) {
                    c.err(
                        format!("{f}.devices[{i}]"),
                        format!("{d:?} must be 4 hex digits"),
                    );
                }
            }
            if let Some(cl) = &p.class
                && !is_hex(strip_0x(cl), &[2, 4, 6])
            {
                c.err(
                    format!("{f}.class"),
                    format!("{cl:?} must be 2, 4 or 6 hex digits, for example 0300"),
                );
            }
        }

        let s = &self.sharing;
        match s.strategy {
            SharingStrategy::Exclusive => {
                if s.replicas.is_some() {
                    c.err(
                        "spec.sharing.replicas",
                        "replicas needs strategy TimeSlicing; Exclusive devices are never shared",
                    );
                }
                if s.fail_requests_greater_than_one {
                    c.err(
                        "spec.sharing.failRequestsGreaterThanOne",
                        "only meaningful with strategy TimeSlicing",
                    );
                }
            }
            SharingStrategy::TimeSlicing => match s.replicas {
                None => c.err("spec.sharing.replicas", "TimeSlicing needs replicas >= 1"),
                Some(0) => c.err("spec.sharing.replicas", "must be >= 1"),
                Some(n) if n > 1024 => c.err("spec.sharing.replicas", "must be <= 1024"),
                Some(_) => {}
            },
        }

        let a = &self.allocate;
        for k in a.env.keys() {
            if !is_env_name(k) {
                c.err(
                    "spec.allocate.env",
                    format!("{k:?} is not a valid environment variable name"),
                );
            }
        }
        if let Some(k) = &a.ids_env
            && !is_env_name(k)
        {
            c.err(
                "spec.allocate.idsEnv",
                format!("{k:?} is not a valid environment variable name"),
            );
        }
        for (i, m) in a.mounts.iter().enumerate() {
            if !m.host_path.starts_with('/') {
                c.err(
                    format!("spec.allocate.mounts[{i}].hostPath"),
                    "must be absolute",
                );
            }
            if !m.container_path.starts_with('/') {
                c.err(
                    format!("spec.allocate.mounts[{i}].containerPath"),
                    "must be absolute",
                );
            }
        }
        if let Some(kind) = &a.cdi.kind {
            if let Err(e) = validate_cdi_kind(kind) {
                c.err("spec.allocate.cdi.kind", e);
            }
        } else if (a.cdi.enabled || self.kubelet_api == crate::KubeletApi::Dra)
            && let Err(e) = validate_cdi_kind(&self.resource_name)
        {
            c.err(
                "spec.resourceName",
                format!(
                    "is also the CDI kind (spec.allocate.cdi.kind is not set) and {e}; set spec.allocate.cdi.kind to a valid kind"
                ),
            );
        }

        if self.kubelet_api == crate::KubeletApi::Dra && self.pre_start.is_some() {
            c.err(
                "spec.preStart",
                "DRA has no pre-start hook (PreStartContainer is a device plugin call); remove preStart or use kubeletApi DevicePlugin",
            );
        }
        if let Some(p) = &self.pre_start {
            match p.command.first() {
                None => c.err("spec.preStart.command", "must name a program"),
                Some(prog) if !prog.starts_with('/') => c.err(
                    "spec.preStart.command",
                    format!("program {prog:?} must be an absolute path"),
                ),
                Some(_) => {}
            }
            if let Some(t) = p.timeout_seconds
                && t > MAX_PRESTART_SECONDS
            {
                c.err(
                    "spec.preStart.timeoutSeconds",
                    format!(
                        "{t} s is longer than the kubelet waits for PreStartContainer (30 s); at most {MAX_PRESTART_SECONDS}"
                    ),
                );
            }
            if p.timeout_seconds == Some(0) {
                c.err("spec.preStart.timeoutSeconds", "must be >= 1");
            }
        }

        if let Some(u) = &self.agent.update_strategy
            && u != "RollingUpdate"
            && u != "OnDelete"
        {
            c.err(
                "spec.agent.updateStrategy",
                format!("{u:?} must be RollingUpdate or OnDelete"),
            );
        }

        if c.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(c.0))
        }
    }
}
