//! The agent's layout rules, checked on its sources: the DRA front, the
//! admin server and the metrics never reach into the device plugin front
//! (what they share lives in `plugin/`), and `run.rs` only wires.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn sources(under: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![under.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn dra_admin_and_metrics_do_not_import_the_device_plugin_front() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = sources(&src.join("dra"));
    files.push(src.join("admin.rs"));
    files.push(src.join("metrics.rs"));
    files.extend(sources(&src.join("status")));
    files.extend(
        sources(&src.join("plugin"))
            .into_iter()
            .filter(|p| p.ends_with("state.rs")),
    );
    assert!(files.len() >= 10, "{files:?}");
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .contains("crate::deviceplugin")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "import the device plugin front: {offenders:?}"
    );
}

#[test]
fn run_rs_only_wires() {
    let run =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/run.rs")).unwrap();
    // No plugin lifecycle, kubelet front or policy watch of its own.
    for what in [
        "fn serve(",
        "fn update(",
        "fn discover(",
        "watcher(",
        "registration::run",
        "dra::serve",
    ] {
        assert!(!run.contains(what), "run.rs has {what}");
    }
    assert!(
        run.lines().count() < 250,
        "run.rs grew to {} lines",
        run.lines().count()
    );
}
