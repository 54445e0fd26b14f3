use super::*;

const GOOD: &str = r#"
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata:
  name: foo
spec:
  resourceName: hardware-vendor.example/foo
  source:
    simulated:
      count: 2
"#;

fn spec_with(f: impl FnOnce(&mut DevicePluginPolicySpec)) -> DevicePluginPolicySpec {
    let mut p = policies_from_yaml(GOOD).unwrap().remove(0).spec;
    f(&mut p);
    p
}

fn fields(spec: &DevicePluginPolicySpec) -> Vec<String> {
    match spec.validate() {
        Ok(()) => vec![],
        Err(e) => e.0.into_iter().map(|f| f.field).collect(),
    }
}

#[test]
fn good_policy_loads_with_defaults() {
    let p = policies_from_yaml(GOOD).unwrap();
    assert_eq!(p.len(), 1);
    let s = &p[0].spec;
    assert_eq!(s.sharing.strategy, SharingStrategy::Exclusive);
    assert_eq!(s.sharing.effective_replicas(), 1);
    assert_eq!(s.health.settle_seconds(), DEFAULT_SETTLE_SECONDS);
    assert!(!s.allocate.cdi.enabled);
}

#[test]
fn resource_name_rules() {
    assert!(validate_resource_name("example.com/foo").is_ok());
    assert!(validate_resource_name("hardware-vendor.example/foo").is_ok());
    for bad in [
        "foo",
        "/foo",
        "example.com/",
        "kubernetes.io/foo",
        "k8s.io/foo",
        "x.kubernetes.io/foo",
        "Example.com/foo",
        "localhost/foo",
        "example.com/-foo",
        "example.com/a/b",
        // What the kubelet's extended-resource check refuses too.
        "requests.example.com/foo",
        "acme-kubernetes.io/x",
        "a.acme-kubernetes.io/x",
    ] {
        assert!(validate_resource_name(bad).is_err(), "{bad} accepted");
    }
    let e = validate_resource_name("kubernetes.io/gpu").unwrap_err();
    assert!(e.contains("reserved"), "{e}");
    // The kubelet checks `requests.<name>` as a qualified name: the domain
    // may have 244 characters, not 253.
    let label = format!("{}.", "a".repeat(60));
    let at_limit = format!("{}abcdefgh/x", label.repeat(4));
    assert_eq!(at_limit.split_once('/').unwrap().0.len(), 252);
    let e = validate_resource_name(&at_limit).unwrap_err();
    assert!(e.contains("at most 244"), "{e}");
    let ok = format!("{}{}.ex/x", label.repeat(3), "b".repeat(58));
    assert_eq!(ok.split_once('/').unwrap().0.len(), 244);
    assert!(validate_resource_name(&ok).is_ok(), "{ok}");
}

#[test]
fn advertised_ids_are_bounded_by_the_kubelet_message_limit() {
    let spec = spec_with(|s| {
        s.source.simulated = Some(devplug_api_sim(4096));
        s.sharing.strategy = crate::SharingStrategy::TimeSlicing;
        s.sharing.replicas = Some(8);
    });
    assert_eq!(fields(&spec), vec!["spec.source.simulated"]);
    let spec = spec_with(|s| {
        s.source.simulated = Some(devplug_api_sim(2048));
        s.sharing.strategy = crate::SharingStrategy::TimeSlicing;
        s.sharing.replicas = Some(8);
    });
    assert!(spec.validate().is_ok());
}

fn devplug_api_sim(count: u32) -> crate::SimulatedSource {
    crate::SimulatedSource {
        count,
        ..Default::default()
    }
}

#[test]
fn exactly_one_source() {
    let none = spec_with(|s| s.source = SourceSpec::default());
    assert_eq!(fields(&none), vec!["spec.source"]);
    let two = spec_with(|s| {
        s.source.paths = Some(PathsSource {
            globs: vec!["/dev/foo*".into()],
            ..Default::default()
        })
    });
    let err = two.validate().unwrap_err().to_string();
    assert!(err.contains("simulated, paths"), "{err}");
}

#[test]
fn sharing_rules() {
    let excl_with_replicas = spec_with(|s| s.sharing.replicas = Some(4));
    assert_eq!(fields(&excl_with_replicas), vec!["spec.sharing.replicas"]);
    let ts_zero = spec_with(|s| {
        s.sharing.strategy = SharingStrategy::TimeSlicing;
        s.sharing.replicas = Some(0);
    });
    assert_eq!(fields(&ts_zero), vec!["spec.sharing.replicas"]);
    let ts_missing = spec_with(|s| s.sharing.strategy = SharingStrategy::TimeSlicing);
    assert_eq!(fields(&ts_missing), vec!["spec.sharing.replicas"]);
    let ts_ok = spec_with(|s| {
        s.sharing.strategy = SharingStrategy::TimeSlicing;
        s.sharing.replicas = Some(8);
    });
    assert!(ts_ok.validate().is_ok());
    assert_eq!(ts_ok.sharing.effective_replicas(), 8);
}

#[test]
fn source_field_rules() {
    let bad_glob = spec_with(|s| {
        s.source = SourceSpec {
            paths: Some(PathsSource {
                globs: vec!["/dev/foo[0-9".into(), "/etc/passwd".into()],
                permissions: Some("rwx".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    });
    assert_eq!(
        fields(&bad_glob),
        vec![
            "spec.source.paths.globs[0]",
            "spec.source.paths.globs[1]",
            "spec.source.paths.permissions"
        ]
    );
    let bad_usb = spec_with(|s| {
        s.source = SourceSpec {
            usb: Some(UsbSource {
                devices: vec![UsbMatch {
                    vendor: "46d".into(),
                    product: Some("zzzz".into()),
                }],
            }),
            ..Default::default()
        }
    });
    assert_eq!(
        fields(&bad_usb),
        vec![
            "spec.source.usb.devices[0].vendor",
            "spec.source.usb.devices[0].product"
        ]
    );
    let empty_pci = spec_with(|s| {
        s.source = SourceSpec {
            pci: Some(PciSource::default()),
            ..Default::default()
        }
    });
    assert_eq!(fields(&empty_pci), vec!["spec.source.pci"]);
    let dup_ids = spec_with(|s| {
        s.source.simulated = Some(SimulatedSource {
            devices: vec![
                SimulatedDevice {
                    id: "a".into(),
                    numa_node: None,
                    pcie_root: Some("pci0000:00".into()),
                    pci_bus_id: Some("0000:01:00.0".into()),
                },
                SimulatedDevice {
                    id: "a".into(),
                    numa_node: Some(-1),
                    pcie_root: Some("pci0:00".into()),
                    pci_bus_id: Some("0000:01:00.9".into()),
                },
                SimulatedDevice {
                    id: "bad id".into(),
                    numa_node: None,
                    pcie_root: None,
                    pci_bus_id: None,
                },
            ],
            ..Default::default()
        })
    });
    assert_eq!(
        fields(&dup_ids),
        vec![
            "spec.source.simulated.devices[1].id",
            "spec.source.simulated.devices[1].numaNode",
            "spec.source.simulated.devices[1].pcieRoot",
            "spec.source.simulated.devices[1].pciBusID",
            "spec.source.simulated.devices[2].id"
        ]
    );
}

#[test]
fn unknown_and_misplaced_fields_are_rejected() {
    let misplaced = GOOD.replace("      count: 2", "      count: 2\n  replicas: 4");
    let e = policies_from_yaml(&misplaced).unwrap_err().to_string();
    assert!(e.contains("unknown field `replicas`"), "{e}");
    let typo = GOOD.replace("count: 2", "cuont: 2");
    let e = policies_from_yaml(&typo).unwrap_err().to_string();
    assert!(e.contains("cuont"), "{e}");
}

/// What the API server sends is read leniently: a CRD newer than the
/// running agent or operator (a field it does not know) must not break its
/// watch; strictness belongs to admission and to files a person wrote.
#[test]
fn objects_from_the_api_server_may_carry_fields_this_version_does_not_know() {
    let json = serde_json::json!({
        "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
        "metadata": {"name": "foo"},
        "spec": {"resourceName": "example.com/foo", "kubeletApi": "DRA",
                 "source": {"simulated": {"count": 2, "futureKnob": true}},
                 "sharing": {"strategy": "Exclusive", "newSetting": 1}},
        "status": {"newCounter": 3}
    });
    let p: DevicePluginPolicy = serde_json::from_value(json).unwrap();
    assert_eq!(p.spec.source.simulated.unwrap().count, 2);
}

#[test]
fn multi_document_and_duplicates() {
    let two = format!(
        "{GOOD}---\n{}",
        GOOD.replace("name: foo", "name: bar")
            .replace("/foo", "/bar")
    );
    assert_eq!(policies_from_yaml(&two).unwrap().len(), 2);
    let dup = format!("{GOOD}---\n{}", GOOD.replace("name: foo", "name: bar"));
    let e = policies_from_yaml(&dup).unwrap_err();
    assert!(matches!(e, LoadError::Duplicate { .. }), "{e}");
    assert!(matches!(policies_from_yaml("---\n"), Err(LoadError::Empty)));
    let wrong = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
    assert!(matches!(
        policies_from_yaml(wrong),
        Err(LoadError::WrongKind { .. })
    ));
    let garbage = "spec: [unclosed";
    assert!(matches!(
        policies_from_yaml(garbage),
        Err(LoadError::Parse { .. })
    ));
}

#[test]
fn ids_env_name() {
    assert_eq!(
        default_ids_env("hardware-vendor.example/foo"),
        "DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO"
    );
}

#[test]
fn prestart_ends_before_the_kubelet_gives_up() {
    let spec = spec_with(|s| {
        s.pre_start = Some(crate::PreStartSpec {
            command: vec!["/bin/true".into()],
            timeout_seconds: Some(60),
        })
    });
    assert_eq!(fields(&spec), vec!["spec.preStart.timeoutSeconds"]);
    let spec = spec_with(|s| {
        s.pre_start = Some(crate::PreStartSpec {
            command: vec!["/bin/true".into()],
            timeout_seconds: Some(25),
        })
    });
    assert!(spec.validate().is_ok());
}

#[test]
fn cdi_kinds_follow_the_cdi_parser() {
    for ok in ["example.com/gpu", "Vendor.io/Gpu_x-1", "a/b"] {
        assert_eq!(validate_cdi_kind(ok), Ok(()), "{ok}");
    }
    for bad in [
        "example.com/gpu.v2",
        "1example.com/gpu",
        "example.com/9gpu",
        "example.com/gpu-",
        "example.com-/gpu",
        "nogpu",
        "/gpu",
        "example.com/",
    ] {
        assert!(validate_cdi_kind(bad).is_err(), "{bad}");
    }
    // DRA makes CDI names from the resource name unless a kind is set.
    let dra = |name: &str, kind: Option<&str>| {
        fields(&spec_with(|s| {
            s.resource_name = name.into();
            s.kubelet_api = KubeletApi::Dra;
            s.allocate.cdi.kind = kind.map(str::to_string);
        }))
    };
    assert_eq!(dra("example.com/gpu.v2", None), vec!["spec.resourceName"]);
    assert!(dra("example.com/gpu.v2", Some("example.com/gpu")).is_empty());
    assert_eq!(
        dra("example.com/gpu", Some("example.com/a.b")),
        vec!["spec.allocate.cdi.kind"]
    );
    // The device plugin path without CDI never makes a CDI name.
    assert!(fields(&spec_with(|s| s.resource_name = "example.com/gpu.v2".into())).is_empty());
}

#[test]
fn mig_partitions_need_dra_and_exclusive_sharing() {
    let mig = |p: &mut DevicePluginPolicySpec| {
        p.source.simulated = None;
        p.source.nvidia = Some(NvidiaSource {
            mig_partitions: true,
            ..Default::default()
        });
    };
    assert_eq!(
        fields(&spec_with(mig)),
        ["spec.source.nvidia.migPartitions"]
    );
    let dra = spec_with(|p| {
        mig(p);
        p.kubelet_api = KubeletApi::Dra;
    });
    assert!(dra.validate().is_ok(), "{:?}", dra.validate());
    let shared = spec_with(|p| {
        mig(p);
        p.kubelet_api = KubeletApi::Dra;
        p.sharing.strategy = SharingStrategy::TimeSlicing;
        p.sharing.replicas = Some(2);
    });
    assert!(fields(&shared).contains(&"spec.source.nvidia.migPartitions".to_string()));
}
