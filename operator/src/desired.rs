//! What the cluster should hold for one policy, as pure functions of the
//! policy and the operator's settings. No client here: these are unit-tested
//! directly, and the controller applies them with server-side apply.

use std::collections::BTreeMap;

use devplug_api::{
    APPLIED_HASH_ANNOTATION, DevicePluginPolicy, OPERATOR_MANAGER, POD_CONFIG_HASH_ANNOTATION,
    POLICY_LABEL, Resource, ResourceExt,
};
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, LocalObjectReference, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SecurityContext, ServiceAccount, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::api::resource::v1::DeviceClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// Operator-wide settings that shape every agent.
#[derive(Debug, Clone, Default)]
pub struct AgentDefaults {
    /// Namespace of the agent DaemonSets and ServiceAccounts.
    pub namespace: String,
    /// The Helm release (`app.kubernetes.io/instance` of agent objects).
    pub release: String,
    /// Agent image when the policy names none.
    pub image: String,
    /// The kubelet's root directory on the nodes.
    pub kubelet_root: String,
    /// The kubelet's device-plugin directory. Fixed by the kubelet at
    /// `/var/lib/kubelet/device-plugins` whatever its `--root-dir` (k0s and
    /// microk8s move the root, not this directory).
    pub device_plugin_dir: String,
    /// Pull policy of the agent image (the chart's `image.pullPolicy`).
    pub image_pull_policy: Option<String>,
    /// Pull secrets of the agent pods (the chart's `imagePullSecrets`).
    pub image_pull_secrets: Vec<String>,
    /// Host paths a policy may mount into workload containers
    /// (`allocate.mounts`): (prefix, read-only required). `None` allows any.
    pub allowed_host_paths: Option<Vec<AllowedHostPath>>,
    /// Device nodes policies may hand out although they give a container
    /// the host (`/dev/mem`, `/dev/kmem`, `/dev/port`, block devices).
    pub allowed_device_nodes: Vec<String>,
    /// Agent images a policy may name besides `image` (`spec.agent.image`):
    /// `None` allows any.
    pub allowed_agent_images: Option<Vec<String>>,
}

pub use devplug_api::allow::AllowedHostPath;

/// Why the operator refuses to serve `p`, if it does: an invalid spec (one
/// that bypassed admission) or host mounts outside the allow-list. A refused
/// policy serves no node, so it takes no node from another in a conflict.
pub fn refusal(p: &DevicePluginPolicy, d: &AgentDefaults) -> Option<String> {
    p.spec
        .validate()
        .err()
        .map(|e| e.to_string())
        .or_else(|| host_path_violation(p, d))
        .or_else(|| devplug_api::allow::device_node_violation(&p.spec, &d.allowed_device_nodes))
        .or_else(|| {
            devplug_api::allow::agent_image_violation(
                &p.spec,
                &d.image,
                d.allowed_agent_images.as_deref(),
            )
        })
}

/// Why a policy's `allocate.mounts` breaks the operator's host-path
/// allow-list, if it does: who may create a policy could otherwise mount
/// any host path into every workload on every selected node.
pub fn host_path_violation(p: &DevicePluginPolicy, d: &AgentDefaults) -> Option<String> {
    devplug_api::allow::host_path_violation(&p.spec, d.allowed_host_paths.as_deref()?)
}

/// Port of the agent's /healthz and /readyz.
pub const AGENT_ADMIN_PORT: i32 = 8080;
pub(crate) const APP_LABEL: &str = "app.kubernetes.io/name";
pub(crate) const APP: &str = "devplug-agent";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// FNV-1a, 64 bit: a hash that is stable across Rust releases and operator
/// versions, so an operator upgrade does not look like a spec change.
pub fn stable_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn hash_of<T: Serialize>(v: &T) -> Result<String, serde_json::Error> {
    Ok(stable_hash(&serde_json::to_vec(v)?))
}

/// A label value for a policy name (label values stop at 63 characters;
/// policy names may be longer).
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        name.to_string()
    } else {
        let mut prefix: String = name.chars().take(46).collect();
        while prefix.ends_with(['-', '.']) {
            prefix.pop();
        }
        format!("{prefix}-{}", stable_hash(name.as_bytes()))
    }
}

/// Name shared by a policy's DaemonSet, ServiceAccount and RBAC objects.
pub fn agent_name(policy: &str) -> String {
    format!("devplug-agent-{}", label_value(policy))
}

/// Labels on everything made for a policy.
pub fn labels(policy: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (APP_LABEL.to_string(), APP.to_string()),
        (POLICY_LABEL.to_string(), label_value(policy)),
        (MANAGED_BY.to_string(), OPERATOR_MANAGER.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "devplug".to_string(),
        ),
        (
            "app.kubernetes.io/version".to_string(),
            label_value(env!("CARGO_PKG_VERSION")),
        ),
    ])
}

/// [`labels`] plus the release and the component, for the agent's own
/// objects (DaemonSet, pods).
fn agent_labels(policy: &str, d: &AgentDefaults) -> BTreeMap<String, String> {
    let mut l = labels(policy);
    l.insert("app.kubernetes.io/component".into(), "agent".into());
    if !d.release.is_empty() {
        l.insert("app.kubernetes.io/instance".into(), label_value(&d.release));
    }
    l
}

/// Whether labels mark an agent pod of `policy` (what [`selector`] selects).
pub fn is_agent_of(labels: &BTreeMap<String, String>, policy: &str) -> bool {
    labels.get(APP_LABEL).map(String::as_str) == Some(APP)
        && labels.get(POLICY_LABEL) == Some(&label_value(policy))
}

/// Label selector of a policy's agent pods.
pub fn selector(policy: &str) -> String {
    format!("{APP_LABEL}={APP},{POLICY_LABEL}={}", label_value(policy))
}

fn owner(p: &DevicePluginPolicy) -> Option<OwnerReference> {
    p.controller_owner_ref(&())
}

fn meta(p: &DevicePluginPolicy, namespace: Option<&str>) -> ObjectMeta {
    let name = p.name_any();
    ObjectMeta {
        name: Some(agent_name(&name)),
        namespace: namespace.map(str::to_string),
        labels: Some(labels(&name)),
        owner_references: owner(p).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Stamps the hash of an object's desired content into its annotations, so
/// the next reconcile can tell "already applied" without a write.
pub fn stamp<T>(mut obj: T) -> Result<T, serde_json::Error>
where
    T: Serialize + Resource,
{
    let h = hash_of(&obj)?;
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH_ANNOTATION.to_string(), h);
    Ok(obj)
}

/// The applied-hash annotation of an object, if any.
pub fn applied_hash<T: Resource>(obj: &T) -> Option<&str> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
        .map(String::as_str)
}

/// The agent's ServiceAccount.
pub fn service_account(p: &DevicePluginPolicy, d: &AgentDefaults) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(p, Some(&d.namespace)),
        ..ServiceAccount::default()
    }
}

/// What one agent may do: read its own policy, apply NodeDeviceStatus
/// objects and record Events, nothing else cluster-wide. (The chart's ValidatingAdmissionPolicy
/// narrows the latter to the agent's own node.)
pub fn cluster_role(p: &DevicePluginPolicy) -> ClusterRole {
    let rule = |resources: &[&str], names: Option<Vec<String>>, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![devplug_api::GROUP.to_string()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        resource_names: names,
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    let mut rules = vec![
        rule(
            &["devicepluginpolicies"],
            Some(vec![p.name_any()]),
            &["get", "list", "watch"],
        ),
        // list/watch: each agent watches its own node's object (field
        // selector) to repair its entry when anyone else changes it.
        rule(
            &["nodedevicestatuses"],
            None,
            &["get", "list", "watch", "create", "patch"],
        ),
        rule(&["nodedevicestatuses/status"], None, &["get", "patch"]),
        // Events about its policy (devices orphaned by a spec change).
        PolicyRule {
            api_groups: Some(vec!["events.k8s.io".into()]),
            resources: Some(vec!["events".into()]),
            verbs: vec!["create".into(), "patch".into()],
            ..PolicyRule::default()
        },
    ];
    if p.spec.kubelet_api == devplug_api::KubeletApi::Dra {
        let dra = |resources: &str, verbs: &[&str]| PolicyRule {
            api_groups: Some(vec!["resource.k8s.io".into()]),
            resources: Some(vec![resources.into()]),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        };
        // Its node's pool (the chart's admission policy keeps each agent to
        // slices of its own node) and the claims the kubelet asks it to
        // prepare (read only).
        rules.push(dra(
            "resourceslices",
            &[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ],
        ));
        rules.push(dra("resourceclaims", &["get"]));
        // The device status of the claims it prepared (status.devices):
        // the status subresource, and the API server's granular check for
        // drivers, only for its own driver's entries and only on claims
        // allocated to the node its token is bound to (associated-node).
        rules.push(dra("resourceclaims/status", &["patch"]));
        rules.push(PolicyRule {
            api_groups: Some(vec!["resource.k8s.io".into()]),
            resources: Some(vec!["resourceclaims/driver".into()]),
            resource_names: Some(vec![devplug_api::dra_driver_name(&p.name_any())]),
            verbs: vec!["associated-node:patch".into()],
            ..PolicyRule::default()
        });
        // The pod a call's claims are reserved for, read when one call
        // carries several claims: which container names which claim, so
        // the policy's variable lists every device a container holds.
        rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".into()]),
            verbs: vec!["get".into()],
            ..PolicyRule::default()
        });
    }
    ClusterRole {
        metadata: meta(p, None),
        rules: Some(rules),
        ..ClusterRole::default()
    }
}

/// Whether an agent DaemonSet runs its agents on the DRA path.
pub fn serves_dra(ds: &DaemonSet) -> bool {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v.name == "plugins-registry"))
}

/// The DeviceClass of a DRA policy: every device of its driver, and the
/// policy's resource name as the class's extended resource, so a pod that
/// asks for `<resourceName>: N` the device-plugin way is served through DRA
/// unchanged.
pub fn device_class(p: &DevicePluginPolicy) -> DeviceClass {
    use k8s_openapi::api::resource::v1::{CELDeviceSelector, DeviceClassSpec, DeviceSelector};
    let name = p.name_any();
    let driver = devplug_api::dra_driver_name(&name);
    DeviceClass {
        metadata: ObjectMeta {
            name: Some(devplug_api::dra_device_class_name(&name)),
            labels: Some(labels(&name)),
            owner_references: owner(p).map(|o| vec![o]),
            ..Default::default()
        },
        spec: DeviceClassSpec {
            selectors: Some(vec![DeviceSelector {
                cel: Some(CELDeviceSelector {
                    expression: format!("device.driver == {driver:?}"),
                }),
            }]),
            extended_resource_name: Some(p.spec.resource_name.clone()),
            ..Default::default()
        },
    }
}

/// Binds the agent's ServiceAccount to its ClusterRole.
pub fn cluster_role_binding(p: &DevicePluginPolicy, d: &AgentDefaults) -> ClusterRoleBinding {
    let name = agent_name(&p.name_any());
    ClusterRoleBinding {
        metadata: meta(p, None),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(d.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// Which host trees a source reads.
fn host_mounts(p: &DevicePluginPolicy) -> (bool, bool) {
    let s = &p.spec.source;
    let dev = s.paths.is_some() || s.usb.is_some() || s.pci.is_some() || s.nvidia.is_some();
    let sys = s.usb.is_some() || s.pci.is_some() || s.nvidia.is_some();
    (dev, sys)
}

fn host_path_volume(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn quantity(s: &str) -> Quantity {
    Quantity(s.to_string())
}

/// The container runtime's CDI spec directory on the nodes.
pub const CDI_DIR: &str = "/var/run/cdi";

/// The agent pod template, without the config-hash annotation.
fn pod_template(p: &DevicePluginPolicy, d: &AgentDefaults) -> PodTemplateSpec {
    let name = p.name_any();
    let root = d.kubelet_root.trim_end_matches('/');
    let plugins = d.device_plugin_dir.trim_end_matches('/').to_string();
    let pod_resources = format!("{root}/pod-resources");
    let (dev, sys) = host_mounts(p);
    // Privileged only when a preStart command must touch host devices, or
    // the agent makes MIG instances (NVML's MIG configuration needs it);
    // otherwise the agent only stats /dev and reads /sys.
    let mig = p
        .spec
        .source
        .nvidia
        .as_ref()
        .is_some_and(|n| n.mig_partitions);
    let privileged = p.spec.pre_start.is_some() || mig;

    let mut args = vec![
        "--policy".to_string(),
        name.clone(),
        "--kubelet-root".into(),
        root.to_string(),
        "--plugin-dir".into(),
        plugins.clone(),
        "--admin-addr".into(),
        format!("0.0.0.0:{AGENT_ADMIN_PORT}"),
    ];
    // The agent checks what it serves against the same allow-lists.
    if let Some(allowed) = &d.allowed_host_paths {
        let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        args.push(format!("--allowed-host-paths={}", list.join(",")));
    }
    if !d.allowed_device_nodes.is_empty() {
        args.push(format!(
            "--allowed-device-nodes={}",
            d.allowed_device_nodes.join(",")
        ));
    }
    let mut volumes = vec![
        host_path_volume("device-plugins", &plugins, "DirectoryOrCreate"),
        host_path_volume("pod-resources", &pod_resources, "DirectoryOrCreate"),
        Volume {
            name: "run".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("device-plugins", &plugins, false),
        mount("pod-resources", &pod_resources, true),
        mount("run", "/run/devplug", false),
    ];
    if dev {
        args.extend(["--dev-root".into(), "/host/dev".into()]);
        volumes.push(host_path_volume("host-dev", "/dev", "Directory"));
        mounts.push(mount("host-dev", "/host/dev", true));
    }
    let dra = p.spec.kubelet_api == devplug_api::KubeletApi::Dra;
    if dra {
        // The plugin watcher's directory (our registration socket) and the
        // driver's own directory (its socket and claim checkpoint), at the
        // same paths as on the host: the kubelet dials what we tell it.
        let registry = format!("{root}/plugins_registry");
        let own = format!("{root}/plugins/{}", devplug_api::dra_driver_name(&name));
        volumes.push(host_path_volume(
            "plugins-registry",
            &registry,
            "DirectoryOrCreate",
        ));
        volumes.push(host_path_volume("dra-plugin", &own, "DirectoryOrCreate"));
        mounts.push(mount("plugins-registry", &registry, false));
        mounts.push(mount("dra-plugin", &own, false));
    }
    // The agent writes the CDI spec of a CDI policy (NVIDIA: the NVIDIA
    // container toolkit's spec is used) and of every DRA claim (NVIDIA too:
    // the policy's env, mounts and idsEnv) into the runtime's directory.
    if (p.spec.allocate.cdi.enabled && p.spec.source.nvidia.is_none()) || dra {
        args.extend(["--cdi-dir".into(), CDI_DIR.into()]);
        volumes.push(host_path_volume("cdi", CDI_DIR, "DirectoryOrCreate"));
        mounts.push(mount("cdi", CDI_DIR, false));
    }
    if mig {
        // The driver's table of MIG capability minors, for the nodes each
        // instance's container needs. /proc/driver is always there; the
        // table appears with the driver.
        args.extend([
            "--mig-minors".into(),
            "/host/proc/driver/nvidia-caps/mig-minors".into(),
        ]);
        volumes.push(host_path_volume(
            "host-proc-driver",
            "/proc/driver",
            "Directory",
        ));
        mounts.push(mount("host-proc-driver", "/host/proc/driver", true));
    }
    if sys {
        args.extend(["--sys-root".into(), "/host/sys".into()]);
        volumes.push(host_path_volume("host-sys", "/sys", "Directory"));
        mounts.push(mount("host-sys", "/host/sys", true));
    }
    let field_env = |env: &str, path: &str| EnvVar {
        name: env.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(AGENT_ADMIN_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let security = if privileged {
        SecurityContext {
            privileged: Some(true),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }
    } else {
        SecurityContext {
            // Root only to create sockets in the kubelet's root-owned
            // directory; no capabilities, no escalation.
            run_as_user: Some(0),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }
    };
    let resources = p
        .spec
        .agent
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity("10m")),
                ("memory".to_string(), quantity("24Mi")),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), quantity("96Mi"))])),
            ..ResourceRequirements::default()
        });
    let mut env = vec![
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    if p.spec.source.nvidia.is_some() {
        // Ask the NVIDIA container toolkit for NVML (utility) and all GPUs.
        for (k, v) in [
            ("NVIDIA_VISIBLE_DEVICES", "all"),
            ("NVIDIA_DRIVER_CAPABILITIES", "utility"),
        ]
        .into_iter()
        .chain(
            // The MIG configuration and monitoring capabilities, to make
            // and list instances.
            mig.then_some([
                ("NVIDIA_MIG_CONFIG_DEVICES", "all"),
                ("NVIDIA_MIG_MONITOR_DEVICES", "all"),
            ])
            .into_iter()
            .flatten(),
        ) {
            env.push(EnvVar {
                name: k.into(),
                value: Some(v.into()),
                ..EnvVar::default()
            });
        }
    }
    let mut node_selector = p.spec.node_selector.clone();
    node_selector.insert("kubernetes.io/os".into(), "linux".into());

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(agent_labels(&name, d)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(agent_name(&name)),
            priority_class_name: Some(
                p.spec
                    .priority_class_name
                    .clone()
                    .unwrap_or_else(|| "system-node-critical".into()),
            ),
            node_selector: Some(node_selector),
            tolerations: (!p.spec.tolerations.is_empty()).then(|| p.spec.tolerations.clone()),
            image_pull_secrets: (!d.image_pull_secrets.is_empty()).then(|| {
                d.image_pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect()
            }),
            termination_grace_period_seconds: Some(10),
            containers: vec![Container {
                name: "agent".into(),
                image: Some(
                    p.spec
                        .agent
                        .image
                        .clone()
                        .unwrap_or_else(|| d.image.clone()),
                ),
                image_pull_policy: d.image_pull_policy.clone(),
                args: Some(args),
                env: Some(env),
                ports: Some(vec![ContainerPort {
                    name: Some("admin".into()),
                    container_port: AGENT_ADMIN_PORT,
                    ..ContainerPort::default()
                }]),
                readiness_probe: Some(probe("/readyz", 5)),
                liveness_probe: Some(probe("/healthz", 10)),
                resources: Some(resources),
                security_context: Some(security),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

/// Hash of exactly what needs a new agent pod (image, privileges, mounts,
/// placement); everything else reaches running agents through their watch.
pub fn pod_config_hash(
    p: &DevicePluginPolicy,
    d: &AgentDefaults,
) -> Result<String, serde_json::Error> {
    hash_of(&pod_template(p, d))
}

/// The agent DaemonSet. Rolling updates replace one node at a time and never
/// run two agents for one resource on a node (`maxSurge: 0`).
pub fn daemonset(
    p: &DevicePluginPolicy,
    d: &AgentDefaults,
) -> Result<DaemonSet, serde_json::Error> {
    let name = p.name_any();
    let mut template = pod_template(p, d);
    let hash = hash_of(&template)?;
    if let Some(m) = template.metadata.as_mut() {
        m.annotations = Some(BTreeMap::from([(
            POD_CONFIG_HASH_ANNOTATION.to_string(),
            hash,
        )]));
    }
    let update_strategy = match p.spec.agent.update_strategy.as_deref() {
        Some("OnDelete") => DaemonSetUpdateStrategy {
            type_: Some("OnDelete".into()),
            rolling_update: None,
        },
        _ => DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_surge: Some(IntOrString::Int(0)),
                max_unavailable: Some(IntOrString::Int(1)),
            }),
        },
    };
    Ok(DaemonSet {
        metadata: ObjectMeta {
            labels: Some(agent_labels(&p.name_any(), d)),
            ..meta(p, Some(&d.namespace))
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (APP_LABEL.to_string(), APP.to_string()),
                    (POLICY_LABEL.to_string(), label_value(&name)),
                ])),
                ..LabelSelector::default()
            },
            template,
            update_strategy: Some(update_strategy),
            ..DaemonSetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests;
