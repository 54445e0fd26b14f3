use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

type Sink = Box<dyn Fn(GpuEvent) + Send + Sync>;

#[derive(Default)]
struct FakeGpus {
    gpus: Mutex<Vec<Gpu>>,
    sink: Mutex<Option<Sink>>,
    stop: Mutex<Option<Arc<AtomicBool>>>,
    /// MIG instances per GPU, as NVML would hold them.
    mig: Mutex<BTreeMap<String, Vec<mig::MigInstance>>>,
    next_instance: AtomicUsize,
}

impl FakeGpus {
    fn fire(&self, ev: GpuEvent) {
        if let Some(s) = self.sink.lock().unwrap().as_ref() {
            s(ev);
        }
    }
}

impl GpuLibrary for FakeGpus {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        Ok(self.gpus.lock().unwrap().clone())
    }
    fn watch(&self, sink: Sink, stop: Arc<AtomicBool>) -> Result<(), String> {
        *self.sink.lock().unwrap() = Some(sink);
        *self.stop.lock().unwrap() = Some(stop);
        Ok(())
    }
    fn mig_instances(&self, gpu: &str) -> Result<Vec<mig::MigInstance>, String> {
        Ok(self
            .mig
            .lock()
            .unwrap()
            .get(gpu)
            .cloned()
            .unwrap_or_default())
    }
    /// Refuses what NVML refuses: an unknown profile or placement, or one
    /// overlapping an instance already there.
    fn create_mig(&self, gpu: &str, profile: u32, start: u32) -> Result<mig::MigInstance, String> {
        let gpus = self.gpus.lock().unwrap();
        let layout = gpus
            .iter()
            .find(|g| g.uuid == gpu)
            .and_then(|g| g.mig.clone())
            .ok_or("not in MIG mode")?;
        let size_of = |profile: u32, start: u32| {
            layout
                .profiles
                .iter()
                .find(|p| p.id == profile)
                .and_then(|p| p.placements.iter().find(|(s, _)| *s == start))
                .map(|(_, n)| *n)
        };
        let size = size_of(profile, start).ok_or("NVML: invalid placement")?;
        let mut all = self.mig.lock().unwrap();
        let there = all.entry(gpu.to_string()).or_default();
        for i in there.iter() {
            let n = size_of(i.profile, i.start).unwrap();
            if start < i.start + n && i.start < start + size {
                return Err("NVML: insufficient resources (placement in use)".into());
            }
        }
        let id = self.next_instance.fetch_add(1, Ordering::SeqCst) as u32 + 1;
        let inst = mig::MigInstance {
            profile,
            start,
            instance: id,
            compute: 0,
            uuid: format!("MIG-{gpu}-{id}"),
        };
        there.push(inst.clone());
        Ok(inst)
    }
    fn destroy_mig(&self, gpu: &str, instance: u32, compute: u32) -> Result<(), String> {
        let mut all = self.mig.lock().unwrap();
        if let Some(v) = all.get_mut(gpu) {
            v.retain(|i| !(i.instance == instance && i.compute == compute));
        }
        Ok(())
    }
}

fn gpu(uuid: &str, minor: u32, bus: &str, peers: &[&str]) -> Gpu {
    Gpu {
        uuid: uuid.into(),
        minor,
        bus_id: bus.into(),
        nvlink_peers: peers.iter().map(|s| s.to_string()).collect(),
        memory_bytes: (minor == 0).then_some(80 * 1024 * 1024 * 1024 + 5 * 1024 * 1024 + 17),
        mig: None,
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    lib: Arc<FakeGpus>,
    src: Nvidia,
}

fn fixture(spec: NvidiaSource) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let roots = Roots {
        dev: tmp.path().join("dev"),
        sys: tmp.path().join("sys"),
    };
    std::fs::create_dir_all(&roots.dev).unwrap();
    for n in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"] {
        std::fs::write(roots.dev.join(n), "").unwrap();
    }
    let pci = roots.sys.join("bus/pci/devices/0000:3b:00.0");
    std::fs::create_dir_all(&pci).unwrap();
    std::fs::write(pci.join("numa_node"), "1\n").unwrap();
    // The second GPU's entry links into /sys/devices as on a real host
    // (and has no numa_node file).
    std::fs::create_dir_all(
        roots
            .sys
            .join("devices/pci0000:85/0000:85:00.0/0000:86:00.0"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "../../../devices/pci0000:85/0000:85:00.0/0000:86:00.0",
        roots.sys.join("bus/pci/devices/0000:86:00.0"),
    )
    .unwrap();
    let lib = Arc::new(FakeGpus::default());
    *lib.gpus.lock().unwrap() = vec![
        gpu("GPU-aaaa", 0, "00000000:3B:00.0", &["00000000:86:00.0"]),
        gpu(
            "GPU-bbbb",
            1,
            "00000000:86:00.0",
            &["00000000:3B:00.0", "00000000:FF:00.0"],
        ),
    ];
    let l = lib.clone();
    let src = Nvidia::with_loader(
        &spec,
        roots,
        Box::new(move || Ok(l.clone() as Arc<dyn GpuLibrary>)),
    );
    Fixture {
        _tmp: tmp,
        lib,
        src,
    }
}

#[test]
fn discovers_gpus_with_uuid_numa_nodes_and_nvlinks() {
    let f = fixture(NvidiaSource::default());
    let d = f.src.discover().unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].id, "GPU-aaaa");
    assert_eq!(d[0].numa_node, Some(1), "from sysfs via the PCI bus id");
    assert_eq!(d[1].numa_node, None, "no numa_node in sysfs");
    // The standard topology attributes: the address in Linux's form, and
    // the root complex where sysfs links the device under one.
    let attr = |i: usize, k: &str| d[i].attributes.get(k).map(String::as_str);
    assert_eq!(
        attr(0, topology::PCI_BUS_ID_ATTRIBUTE),
        Some("0000:3b:00.0")
    );
    assert_eq!(
        attr(0, topology::PCIE_ROOT_ATTRIBUTE),
        None,
        "a plain directory names no root"
    );
    assert_eq!(
        attr(1, topology::PCI_BUS_ID_ATTRIBUTE),
        Some("0000:86:00.0")
    );
    assert_eq!(attr(1, topology::PCIE_ROOT_ATTRIBUTE), Some("pci0000:85"));
    // GPU memory, where NVML reports it, in whole MiB.
    assert_eq!(
        d[0].capacity.get("memory").map(String::as_str),
        Some("81925Mi")
    );
    assert!(d[1].capacity.is_empty(), "no memory reported");
    let nodes: Vec<_> = d[0].nodes.iter().map(|n| n.host_path.as_str()).collect();
    assert_eq!(
        nodes,
        vec!["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"],
        "uvm-tools absent on this node"
    );
    assert_eq!(d[0].links, vec!["GPU-bbbb"]);
    assert_eq!(
        d[1].links,
        vec!["GPU-aaaa"],
        "a peer that is not a GPU we know is dropped"
    );
    assert!(d.iter().all(|g| g.health.is_healthy()));
}

#[test]
fn critical_xids_and_ecc_make_a_gpu_unhealthy_application_xids_do_not() {
    let f = fixture(NvidiaSource::default());
    f.src.discover().unwrap();
    let woken = Arc::new(AtomicUsize::new(0));
    let wake = f.src.wake().unwrap();
    let w = woken.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let waiter = tokio::spawn(async move {
            wake.notified().await;
            w.fetch_add(1, Ordering::SeqCst);
        });
        f.lib.fire(GpuEvent::Xid {
            uuid: "GPU-aaaa".into(),
            xid: 13,
        });
        f.lib.fire(GpuEvent::Xid {
            uuid: "GPU-aaaa".into(),
            xid: 43,
        });
        assert!(
            f.src
                .discover()
                .unwrap()
                .iter()
                .all(|g| g.health.is_healthy()),
            "application XIDs ignored"
        );
        f.lib.fire(GpuEvent::Xid {
            uuid: "GPU-aaaa".into(),
            xid: 79,
        });
        waiter.await.unwrap();
    });
    assert_eq!(woken.load(Ordering::SeqCst), 1, "discovery is woken");
    f.lib.fire(GpuEvent::DoubleBitEcc {
        uuid: "GPU-bbbb".into(),
    });
    let d = f.src.discover().unwrap();
    assert_eq!(d[0].health, Health::Unhealthy("XID 79 (critical)".into()));
    assert_eq!(
        d[1].health,
        Health::Unhealthy("double-bit ECC error".into())
    );
}

#[test]
fn ignored_xids_are_configurable() {
    let f = fixture(NvidiaSource {
        ignored_xids: Some(vec![79]),
        ..Default::default()
    });
    f.src.discover().unwrap();
    f.lib.fire(GpuEvent::Xid {
        uuid: "GPU-aaaa".into(),
        xid: 79,
    });
    f.lib.fire(GpuEvent::Xid {
        uuid: "GPU-bbbb".into(),
        xid: 13,
    });
    let d = f.src.discover().unwrap();
    assert!(d[0].health.is_healthy());
    assert!(
        !d[1].health.is_healthy(),
        "13 is no longer ignored once the list is overridden"
    );
}

/// Before: a GPU that fell off the bus silently left the list, so its pods
/// vanished from the status too, and a GPU that came back kept the health
/// it had before it left.
#[test]
fn a_gpu_that_falls_off_the_bus_is_reported_lost_and_starts_afresh_on_return() {
    let f = fixture(NvidiaSource::default());
    assert_eq!(f.src.discover().unwrap().len(), 2);
    f.lib.fire(GpuEvent::Xid {
        uuid: "GPU-bbbb".into(),
        xid: 79,
    });
    let gone = f.lib.gpus.lock().unwrap().remove(1);
    let d = f.src.discover().unwrap();
    assert_eq!(d.len(), 2, "a lost GPU stays listed");
    assert_eq!(d[1].id, "GPU-bbbb");
    assert_eq!(d[1].health, Health::Unhealthy(GPU_LOST.into()));
    assert!(d[1].nodes.is_empty());
    assert!(d[0].links.is_empty(), "its NVLink peer is gone");
    assert!(d[0].health.is_healthy());
    // Back on the bus: healthy again, the old XID forgotten.
    f.lib.gpus.lock().unwrap().push(gone);
    let d = f.src.discover().unwrap();
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(|g| g.health.is_healthy()), "{d:?}");
    assert_eq!(d[0].links, vec!["GPU-bbbb"]);
}

/// Before: every spec change built a new source whose NVML event thread
/// (and NVML handle) lived on forever.
#[test]
fn the_event_thread_is_told_to_stop_when_the_source_goes() {
    let f = fixture(NvidiaSource::default());
    f.src.discover().unwrap();
    let stop = f.lib.stop.lock().unwrap().clone().expect("watching");
    assert!(!stop.load(Ordering::SeqCst));
    drop(f.src);
    assert!(stop.load(Ordering::SeqCst), "the event thread must stop");
}

#[test]
fn no_nvml_is_a_clear_reason_and_is_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let roots = Roots {
        dev: tmp.path().to_path_buf(),
        sys: tmp.path().to_path_buf(),
    };
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let lib = Arc::new(FakeGpus::default());
    let l = lib.clone();
    let src = Nvidia::with_loader(
        &NvidiaSource::default(),
        roots,
        Box::new(move || {
            if a.fetch_add(1, Ordering::SeqCst) == 0 {
                Err("NVML is not available on this node (libnvidia-ml.so.1: cannot open shared object file)".into())
            } else {
                Ok(l.clone() as Arc<dyn GpuLibrary>)
            }
        }),
    );
    let e = src.discover().unwrap_err();
    assert!(matches!(e, SourceError::Unavailable(_)));
    assert!(e.to_string().contains("libnvidia-ml.so.1"), "{e}");
    assert!(
        src.discover().unwrap().is_empty(),
        "the driver appeared: loaded on the next discovery"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert!(src.discover().is_ok());
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "loaded once, kept");
}

#[test]
fn a_missing_device_node_is_unhealthy() {
    let f = fixture(NvidiaSource::default());
    f.lib
        .gpus
        .lock()
        .unwrap()
        .push(gpu("GPU-cccc", 7, "00000000:AF:00.0", &[]));
    let d = f.src.discover().unwrap();
    let c = d.iter().find(|g| g.id == "GPU-cccc").unwrap();
    assert_eq!(
        c.health,
        Health::Unhealthy("/dev/nvidia7 is missing".into())
    );
}

#[test]
fn bus_ids_map_to_sysfs_names() {
    assert_eq!(
        sysfs_bus_id("00000000:3B:00.0").as_deref(),
        Some("0000:3b:00.0")
    );
    assert_eq!(
        sysfs_bus_id("0001:AF:00.1").as_deref(),
        Some("0001:af:00.1")
    );
    assert_eq!(sysfs_bus_id("garbage"), None);
}

#[test]
fn the_real_nvml_loads_or_says_why() {
    // On a machine without the driver this must be a clear error, not a
    // panic; on a GPU machine it lists the GPUs.
    match real::load() {
        Ok(lib) => {
            let gpus = lib.gpus().unwrap();
            eprintln!("NVML present: {} GPU(s): {gpus:?}", gpus.len());
        }
        Err(e) => assert!(e.contains("NVML"), "{e}"),
    }
}

/// An H100's layout, cut short: 8 memory slices; 1g.10gb at 7 places,
/// 3g.40gb at 2, 7g.80gb over all.
fn h100() -> mig::MigLayout {
    let gib = 1024 * 1024 * 1024;
    mig::MigLayout {
        slots: 8,
        profiles: vec![
            mig::MigProfile {
                id: 19,
                name: "1g.10gb".into(),
                memory_bytes: 10 * gib,
                multiprocessors: 16,
                placements: (0..7).map(|s| (s, 1)).collect(),
            },
            mig::MigProfile {
                id: 9,
                name: "3g.40gb".into(),
                memory_bytes: 40 * gib,
                multiprocessors: 60,
                // The last one reaches past the GPU: left out.
                placements: vec![(0, 4), (4, 4), (6, 4)],
            },
            mig::MigProfile {
                id: 0,
                name: "7g.80gb".into(),
                memory_bytes: 80 * gib,
                multiprocessors: 132,
                placements: vec![(0, 8)],
            },
        ],
    }
}

fn mig_fixture() -> Fixture {
    let f = fixture(NvidiaSource {
        mig_partitions: true,
        ..Default::default()
    });
    f.lib.gpus.lock().unwrap()[0].mig = Some(h100());
    f
}

const MINORS: &str = "config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\ngpu0/gi2/access 21\ngpu0/gi2/ci0/access 22\ngpu1/gi1/access 147\n";

#[test]
fn a_gpu_in_mig_mode_is_a_counter_set_and_its_placements_are_partitions() {
    let f = mig_fixture();
    let d = f.src.discover().unwrap();
    let by_id: BTreeMap<&str, &Device> = d.iter().map(|d| (d.id.as_str(), d)).collect();
    // 7 + 2 + 1 partitions of GPU-aaaa, GPU-aaaa itself, GPU-bbbb whole.
    assert_eq!(d.len(), 12, "{:?}", by_id.keys().collect::<Vec<_>>());
    let parent = by_id["GPU-aaaa"];
    let crate::devices::device::Partitioning::Divided { counters } = &parent.partitioning else {
        panic!("GPU-aaaa is not divided: {:?}", parent.partitioning);
    };
    assert_eq!(counters.len(), 8);
    assert_eq!(counters["memory-slice-7"], "1");
    assert_eq!(
        by_id["GPU-bbbb"].partitioning,
        crate::devices::device::Partitioning::Whole
    );
    let p = by_id["GPU-aaaa-mig-3g.40gb-4"];
    let crate::devices::device::Partitioning::Partition(part) = &p.partitioning else {
        panic!("not a partition: {:?}", p.partitioning);
    };
    assert_eq!((part.profile, part.start, part.size), (9, 4, 4));
    assert_eq!(
        part.counters.keys().collect::<Vec<_>>(),
        [
            "memory-slice-4",
            "memory-slice-5",
            "memory-slice-6",
            "memory-slice-7"
        ]
    );
    assert_eq!(p.attributes["parentUUID"], "GPU-aaaa");
    assert_eq!(p.attributes["profile"], "3g.40gb");
    assert!(!p.attributes.contains_key("uuid"));
    assert_eq!(p.capacity["memory"], "40960Mi");
    assert_eq!(p.numa_node, Some(1));
    assert!(!by_id.contains_key("GPU-aaaa-mig-3g.40gb-6"));
    // The whole GPU's placement covers every slice.
    let whole = by_id["GPU-aaaa-mig-7g.80gb-0"];
    let crate::devices::device::Partitioning::Partition(w) = &whole.partitioning else {
        panic!()
    };
    assert_eq!(w.counters.len(), 8);
    // A GPU error reaches its partitions.
    f.lib.fire(GpuEvent::Xid {
        uuid: "GPU-aaaa".into(),
        xid: 79,
    });
    let d = f.src.discover().unwrap();
    let sick: Vec<&str> = d
        .iter()
        .filter(|d| !d.health.is_healthy())
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(sick.len(), 11, "{sick:?}");
    assert!(!sick.contains(&"GPU-bbbb"));
}

#[test]
fn without_mig_partitions_a_gpu_in_mig_mode_stays_whole() {
    let f = fixture(NvidiaSource::default());
    f.lib.gpus.lock().unwrap()[0].mig = Some(h100());
    let d = f.src.discover().unwrap();
    assert_eq!(d.len(), 2);
    assert!(
        d.iter()
            .all(|d| d.partitioning == crate::devices::device::Partitioning::Whole)
    );
    assert!(f.src.partitioner().is_none());
}

fn partition_of(d: &[Device], id: &str) -> crate::devices::device::Partition {
    match &d.iter().find(|d| d.id == id).unwrap().partitioning {
        crate::devices::device::Partitioning::Partition(p) => p.clone(),
        other => panic!("{id} is {other:?}"),
    }
}

#[test]
fn a_partition_is_made_adopted_when_repeated_and_removed() {
    let f = mig_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let minors = tmp.path().join("mig-minors");
    std::fs::write(&minors, MINORS).unwrap();
    let src = f.src.mig_minors(minors);
    let d = src.discover().unwrap();
    let parts = src.partitioner().unwrap();
    let p = partition_of(&d, "GPU-aaaa-mig-3g.40gb-0");
    let made = parts.create(&p).unwrap();
    assert_eq!(made.id, "GPU-aaaa-mig-3g.40gb-0");
    assert_eq!(made.parent, "GPU-aaaa");
    assert_eq!(made.uuid, "MIG-GPU-aaaa-1");
    assert_eq!(
        made.nodes,
        [
            "/dev/nvidia-caps/nvidia-cap12",
            "/dev/nvidia-caps/nvidia-cap13"
        ]
    );
    // The kubelet repeats a prepare the agent died in: the same instance.
    assert_eq!(parts.create(&p).unwrap(), made);
    assert_eq!(f.lib.mig_instances("GPU-aaaa").unwrap().len(), 1);
    // An overlapping one is refused by NVML (the scheduler's counters keep
    // it from being asked for); one beside it is made.
    let overlapping = partition_of(&d, "GPU-aaaa-mig-1g.10gb-3");
    let e = parts.create(&overlapping).unwrap_err();
    assert!(e.contains("in use"), "{e}");
    let beside = parts
        .create(&partition_of(&d, "GPU-aaaa-mig-1g.10gb-4"))
        .unwrap();
    assert_eq!(
        beside.nodes,
        [
            "/dev/nvidia-caps/nvidia-cap21",
            "/dev/nvidia-caps/nvidia-cap22"
        ]
    );
    let mut there: Vec<String> = parts
        .existing()
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    there.sort();
    assert_eq!(there, ["GPU-aaaa-mig-1g.10gb-4", "GPU-aaaa-mig-3g.40gb-0"]);
    parts.destroy(&made).unwrap();
    // Removing it again (an unprepare repeated) is fine.
    parts.destroy(&made).unwrap();
    parts.destroy(&beside).unwrap();
    assert!(f.lib.mig_instances("GPU-aaaa").unwrap().is_empty());
}

#[test]
fn a_partition_whose_capability_nodes_are_unknown_is_not_left_behind() {
    let f = mig_fixture();
    let src = f.src.mig_minors("/nonexistent/mig-minors".into());
    let d = src.discover().unwrap();
    let parts = src.partitioner().unwrap();
    let e = parts
        .create(&partition_of(&d, "GPU-aaaa-mig-1g.10gb-0"))
        .unwrap_err();
    assert!(e.contains("/nonexistent/mig-minors"), "{e}");
    assert!(f.lib.mig_instances("GPU-aaaa").unwrap().is_empty());
}

#[test]
fn capability_nodes_come_from_the_drivers_minor_table() {
    assert_eq!(
        mig::cap_nodes(MINORS, 0, 2, 0).unwrap(),
        [
            "/dev/nvidia-caps/nvidia-cap21",
            "/dev/nvidia-caps/nvidia-cap22"
        ]
    );
    let e = mig::cap_nodes(MINORS, 1, 1, 0).unwrap_err();
    assert!(e.contains("gpu1/gi1/ci0/access"), "{e}");
    assert!(mig::cap_nodes("", 0, 1, 0).is_err());
}
