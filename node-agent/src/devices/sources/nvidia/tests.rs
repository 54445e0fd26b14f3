use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

type Sink = Box<dyn Fn(GpuEvent) + Send + Sync>;

#[derive(Default)]
struct FakeGpus {
    gpus: Mutex<Vec<Gpu>>,
    sink: Mutex<Option<Sink>>,
    stop: Mutex<Option<Arc<AtomicBool>>>,
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
}

fn gpu(uuid: &str, minor: u32, bus: &str, peers: &[&str]) -> Gpu {
    Gpu {
        uuid: uuid.into(),
        minor,
        bus_id: bus.into(),
        nvlink_peers: peers.iter().map(|s| s.to_string()).collect(),
        memory_bytes: (minor == 0).then_some(80 * 1024 * 1024 * 1024 + 5 * 1024 * 1024 + 17),
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
