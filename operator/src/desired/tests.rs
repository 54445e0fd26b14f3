use super::*;
use devplug_api::policies_from_yaml;

fn policy(spec: &str) -> DevicePluginPolicy {
    let yaml = format!(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {{name: foo, uid: u-1}}\nspec:\n  resourceName: example.com/foo\n{spec}"
    );
    policies_from_yaml(&yaml).unwrap().remove(0)
}

fn d() -> AgentDefaults {
    AgentDefaults {
        namespace: "devplug-system".into(),
        release: "devplug".into(),
        image: "agent:1".into(),
        kubelet_root: "/var/lib/k0s/kubelet".into(),
        device_plugin_dir: "/var/lib/kubelet/device-plugins".into(),
        ..Default::default()
    }
}

fn container(ds: &DaemonSet) -> &Container {
    &ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

fn pod(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn mounts(ds: &DaemonSet) -> Vec<(String, String, bool)> {
    container(ds)
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.name.clone(),
                m.mount_path.clone(),
                m.read_only.unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn simulated_agent_is_unprivileged_and_mounts_only_kubelet_dirs() {
    let ds = daemonset(&policy("  source: {simulated: {count: 2}}\n"), &d()).unwrap();
    assert_eq!(ds.metadata.name.as_deref(), Some("devplug-agent-foo"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("devplug-system"));
    let owner = &ds.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("DevicePluginPolicy", "u-1", Some(true))
    );
    assert_eq!(
        mounts(&ds),
        vec![
            // The kubelet fixes the device-plugin directory whatever its
            // root; only pod-resources follows the root (k0s here).
            (
                "device-plugins".into(),
                "/var/lib/kubelet/device-plugins".into(),
                false
            ),
            (
                "pod-resources".into(),
                "/var/lib/k0s/kubelet/pod-resources".into(),
                true
            ),
            ("run".into(), "/run/devplug".into(), false),
        ]
    );
    let sc = container(&ds).security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, None);
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop,
        Some(vec!["ALL".to_string()])
    );
    let args = container(&ds).args.clone().unwrap();
    assert_eq!(
        &args[..6],
        [
            "--policy",
            "foo",
            "--kubelet-root",
            "/var/lib/k0s/kubelet",
            "--plugin-dir",
            "/var/lib/kubelet/device-plugins"
        ]
    );
    assert!(!args.contains(&"--dev-root".to_string()));
    assert_eq!(container(&ds).image.as_deref(), Some("agent:1"));
    let ready = container(&ds)
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    assert_eq!(
        pod(&ds).priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod(&ds).node_selector.as_ref().unwrap()["kubernetes.io/os"],
        "linux"
    );
}

#[test]
fn a_cdi_policy_mounts_the_runtime_cdi_directory_writable() {
    let ds = daemonset(
        &policy("  source: {simulated: {count: 2}}\n  allocate: {cdi: {enabled: true}}\n"),
        &d(),
    )
    .unwrap();
    assert!(mounts(&ds).contains(&("cdi".into(), "/var/run/cdi".into(), false)));
    let args = container(&ds).args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--cdi-dir", "/var/run/cdi"]));
    // NVIDIA: the toolkit's spec; no CDI directory for the agent.
    let ds = daemonset(
        &policy("  source: {nvidia: {}}\n  allocate: {cdi: {enabled: true}}\n"),
        &d(),
    )
    .unwrap();
    assert!(!mounts(&ds).iter().any(|m| m.0 == "cdi"));
}

#[test]
fn host_sources_mount_dev_and_sys_read_only() {
    let ds = daemonset(&policy("  source: {pci: {vendor: '10de'}}\n"), &d()).unwrap();
    let m = mounts(&ds);
    assert!(m.contains(&("host-dev".into(), "/host/dev".into(), true)));
    assert!(m.contains(&("host-sys".into(), "/host/sys".into(), true)));
    let args = container(&ds).args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--dev-root", "/host/dev"]));
    assert!(args.windows(2).any(|w| w == ["--sys-root", "/host/sys"]));
    let paths = daemonset(&policy("  source: {paths: {globs: [/dev/fuse]}}\n"), &d()).unwrap();
    let m = mounts(&paths);
    assert!(m.iter().any(|x| x.0 == "host-dev") && !m.iter().any(|x| x.0 == "host-sys"));
}

#[test]
fn nvidia_agents_get_nvml_from_the_container_toolkit() {
    let ds = daemonset(&policy("  source: {nvidia: {}}\n"), &d()).unwrap();
    let env: Vec<_> = container(&ds)
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.as_ref().map(|v| (e.name.as_str(), v.as_str())))
        .collect();
    assert!(env.contains(&("NVIDIA_VISIBLE_DEVICES", "all")));
    assert!(env.contains(&("NVIDIA_DRIVER_CAPABILITIES", "utility")));
    let m = mounts(&ds);
    assert!(m.iter().any(|x| x.0 == "host-dev") && m.iter().any(|x| x.0 == "host-sys"));
    assert_eq!(
        container(&ds).security_context.as_ref().unwrap().privileged,
        None
    );
}

#[test]
fn mig_partitions_make_the_agent_privileged_with_the_mig_minors_table() {
    let ds = daemonset(
        &policy("  kubeletApi: DRA\n  source: {nvidia: {migPartitions: true}}\n"),
        &d(),
    )
    .unwrap();
    let c = container(&ds);
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let args = c.args.clone().unwrap_or_default();
    let at = args.iter().position(|a| a == "--mig-minors").unwrap();
    assert_eq!(args[at + 1], "/host/proc/driver/nvidia-caps/mig-minors");
    assert!(mounts(&ds).contains(&("host-proc-driver".into(), "/host/proc/driver".into(), true)));
    let env: Vec<_> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.as_ref().map(|v| (e.name.as_str(), v.as_str())))
        .collect();
    assert!(env.contains(&("NVIDIA_MIG_CONFIG_DEVICES", "all")));
    // Without it: none of that.
    let plain = daemonset(&policy("  kubeletApi: DRA\n  source: {nvidia: {}}\n"), &d()).unwrap();
    assert!(
        !container(&plain)
            .args
            .iter()
            .flatten()
            .any(|a| a == "--mig-minors")
    );
    assert_eq!(
        container(&plain)
            .security_context
            .as_ref()
            .unwrap()
            .privileged,
        None
    );
}

#[test]
fn prestart_makes_the_agent_privileged() {
    let ds = daemonset(
        &policy("  source: {simulated: {count: 1}}\n  preStart: {command: [/bin/reset]}\n"),
        &d(),
    )
    .unwrap();
    let sc = container(&ds).security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(true));
    assert_eq!(
        sc.allow_privilege_escalation, None,
        "privileged with no-escalation is invalid"
    );
}

#[test]
fn placement_update_strategy_and_overrides() {
    let p = policy(
        "  source: {simulated: {count: 1}}\n  nodeSelector: {gpu: 'yes'}\n  tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]\n  priorityClassName: high\n  agent: {image: custom:2, updateStrategy: OnDelete}\n",
    );
    let ds = daemonset(&p, &d()).unwrap();
    assert_eq!(pod(&ds).node_selector.as_ref().unwrap()["gpu"], "yes");
    assert_eq!(
        pod(&ds).tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("gpu")
    );
    assert_eq!(pod(&ds).priority_class_name.as_deref(), Some("high"));
    assert_eq!(container(&ds).image.as_deref(), Some("custom:2"));
    let us = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
    assert_eq!(us.type_.as_deref(), Some("OnDelete"));

    let rolling = daemonset(&policy("  source: {simulated: {count: 1}}\n"), &d()).unwrap();
    let ru = rolling
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        ru.max_surge,
        Some(IntOrString::Int(0)),
        "never two agents for one resource on a node"
    );
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
}

#[test]
fn pod_config_hash_ignores_what_agents_hot_reload() {
    let base = policy("  source: {simulated: {count: 1}}\n");
    let h = pod_config_hash(&base, &d()).unwrap();
    for same in [
        "  source: {simulated: {count: 7}}\n",
        "  source: {simulated: {count: 1}}\n  allocate: {env: {A: b}}\n",
        "  source: {simulated: {count: 1}}\n  sharing: {strategy: TimeSlicing, replicas: 4}\n",
        "  source: {simulated: {count: 1}}\n  health: {settleSeconds: 30}\n",
    ] {
        assert_eq!(pod_config_hash(&policy(same), &d()).unwrap(), h, "{same}");
    }
    for differs in [
        "  source: {simulated: {count: 1}}\n  agent: {image: other:1}\n",
        "  source: {simulated: {count: 1}}\n  preStart: {command: [/bin/x]}\n",
        "  source: {paths: {globs: [/dev/x]}}\n",
    ] {
        assert_ne!(
            pod_config_hash(&policy(differs), &d()).unwrap(),
            h,
            "{differs}"
        );
    }
}

#[test]
fn rbac_is_scoped_to_the_policy() {
    let p = policy("  source: {simulated: {count: 1}}\n");
    let cr = cluster_role(&p);
    let rules = cr.rules.unwrap();
    assert_eq!(rules.len(), 4);
    assert_eq!(rules[0].resource_names, Some(vec!["foo".to_string()]));
    assert_eq!(rules[0].verbs, vec!["get", "list", "watch"]);
    assert_eq!(
        rules[1].resources,
        Some(vec!["nodedevicestatuses".to_string()])
    );
    assert_eq!(
        rules[1].verbs,
        vec!["get", "list", "watch", "create", "patch"],
        "list/watch: the agent watches its own node's object to repair its entry"
    );
    assert!(
        rules[..3]
            .iter()
            .all(|r| r.api_groups == Some(vec!["devplug.io".to_string()])),
        "nothing outside devplug.io but Events"
    );
    // Events about its policy (orphaned device IDs); the operator holds the
    // same verbs, so the API server lets it grant them.
    assert_eq!(rules[3].api_groups, Some(vec!["events.k8s.io".to_string()]));
    assert_eq!(rules[3].resources, Some(vec!["events".to_string()]));
    assert_eq!(rules[3].verbs, vec!["create", "patch"]);
    assert_eq!(rules[3].resource_names, None);
    let crb = cluster_role_binding(&p, &d());
    let s = &crb.subjects.unwrap()[0];
    assert_eq!(
        (s.name.as_str(), s.namespace.as_deref()),
        ("devplug-agent-foo", Some("devplug-system"))
    );
}

#[test]
fn long_names_make_valid_labels_and_hashes_are_stable() {
    let long = "a".repeat(100);
    let v = label_value(&long);
    assert!(v.len() <= 63, "{v}");
    assert_eq!(label_value(&long), v);
    assert_ne!(label_value(&"b".repeat(100)), v);
    assert_eq!(stable_hash(b"devplug"), stable_hash(b"devplug"));
    assert_eq!(stable_hash(b""), "cbf29ce484222325", "FNV-1a offset basis");
}

#[test]
fn stamp_records_the_content_hash() {
    let p = policy("  source: {simulated: {count: 1}}\n");
    let a = stamp(service_account(&p, &d())).unwrap();
    let b = stamp(service_account(&p, &d())).unwrap();
    assert!(applied_hash(&a).is_some());
    assert_eq!(applied_hash(&a), applied_hash(&b));
}

#[test]
fn agent_pods_are_pulled_like_the_operator() {
    let d = AgentDefaults {
        image_pull_policy: Some("Always".into()),
        image_pull_secrets: vec!["regcred".into()],
        ..d()
    };
    let ds = daemonset(&policy("  source: {simulated: {count: 1}}\n"), &d).unwrap();
    assert_eq!(container(&ds).image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        pod(&ds).image_pull_secrets.as_ref().unwrap()[0].name,
        "regcred"
    );
    let ds = daemonset(&policy("  source: {simulated: {count: 1}}\n"), &self::d()).unwrap();
    assert!(pod(&ds).image_pull_secrets.is_none());
}

#[test]
fn allocate_mounts_must_stay_inside_the_allowed_host_paths() {
    let d = AgentDefaults {
        allowed_host_paths: Some(vec![
            "/dev:ro".parse().unwrap(),
            "/opt/tools".parse().unwrap(),
        ]),
        ..d()
    };
    let with = |m: &str| {
        policy(&format!(
            "  source: {{simulated: {{count: 1}}}}\n  allocate: {{mounts: [{m}]}}\n"
        ))
    };
    assert!(host_path_violation(&with("{hostPath: /dev/shm, containerPath: /x}"), &d).is_none());
    assert!(
        host_path_violation(
            &with("{hostPath: /opt/tools/bin, containerPath: /x, readOnly: false}"),
            &d
        )
        .is_none()
    );
    let e = host_path_violation(&with("{hostPath: /etc, containerPath: /x}"), &d).unwrap();
    assert!(
        e.contains("spec.allocate.mounts[0].hostPath \"/etc\""),
        "{e}"
    );
    let e = host_path_violation(
        &with("{hostPath: /dev/sda, containerPath: /x, readOnly: false}"),
        &d,
    )
    .unwrap();
    assert!(e.contains("read-write"), "{e}");
    assert!(host_path_violation(&with("{hostPath: /dev/../etc, containerPath: /x}"), &d).is_some());
    assert!(host_path_violation(&with("{hostPath: /devices, containerPath: /x}"), &d).is_some());
    // No allow-list configured (the library default): anything goes.
    assert!(
        host_path_violation(&with("{hostPath: /etc, containerPath: /x}"), &self::d()).is_none()
    );
    assert!("relative:ro".parse::<AllowedHostPath>().is_err());
}

#[test]
fn agent_images_and_device_nodes_outside_the_allow_lists_are_refused() {
    let d = AgentDefaults {
        allowed_agent_images: Some(vec!["example.com/tools:1".into()]),
        allowed_device_nodes: vec!["/dev/sdb".into()],
        allowed_host_paths: Some(vec!["/dev:ro".parse().unwrap()]),
        ..d()
    };
    let img = |i: &str| {
        policy(&format!(
            "  source: {{simulated: {{count: 1}}}}\n  agent: {{image: {i}}}\n"
        ))
    };
    assert!(refusal(&img("example.com/tools:1"), &d).is_none());
    assert!(
        refusal(&img(&d.image), &d).is_none(),
        "the chart's own image"
    );
    let e = refusal(&img("evil.example/root:1"), &d).unwrap();
    assert!(
        e.contains("spec.agent.image") && e.contains("allowedAgentImages"),
        "{e}"
    );
    // No list (the library default): any image.
    assert!(refusal(&img("evil.example/root:1"), &self::d()).is_none());

    let glob = |g: &str| policy(&format!("  source: {{paths: {{globs: [\"{g}\"]}}}}\n"));
    let e = refusal(&glob("/dev/mem"), &d).unwrap();
    assert!(
        e.contains("spec.source.paths.globs[0]") && e.contains("/dev/mem"),
        "{e}"
    );
    assert!(refusal(&glob("/dev/port"), &d).is_some());
    assert!(refusal(&glob("/dev/sdb"), &d).is_none(), "listed");
    // A glob is judged on what it finds, by the agent.
    assert!(refusal(&glob("/dev/*"), &d).is_none());

    // The agents get the lists they check again.
    let ds = daemonset(&glob("/dev/fuse"), &d).unwrap();
    let args = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.contains(&"--allowed-host-paths=/dev:ro".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--allowed-device-nodes=/dev/sdb".to_string()),
        "{args:?}"
    );
}
