//! The README's configuration reference matches the code: every flag of
//! `devplug-operator --help` is in its "Operator flags" table, and every
//! value of the chart's values.yaml in its "Chart values" table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

fn readme_section(title: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find(&format!("\n### {title}\n"))
        .unwrap_or_else(|| panic!("README has no section '### {title}'"));
    let rest = &readme[start + 1..];
    let end = rest[4..].find("\n#").map_or(rest.len(), |e| e + 4);
    rest[..end].to_string()
}

/// The long flags a `--help` text lists (`--help` and `--version` aside).
pub fn flags_of(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-h, ")
                .or(l.strip_prefix("-V, "))
                .unwrap_or(l);
            let flag = l.strip_prefix("--")?.split([' ', '=', '<']).next()?;
            (!flag.is_empty() && flag != "help" && flag != "version").then(|| format!("--{flag}"))
        })
        .collect()
}

#[test]
fn every_operator_flag_is_in_the_readme() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_devplug-operator"))
        .arg("--help")
        .output()
        .expect("run devplug-operator --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags = flags_of(&help);
    assert!(flags.len() >= 13, "parsed too few flags: {flags:?}");
    let table = readme_section("Operator flags");
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| !table.contains(&format!("| `{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "flags of devplug-operator missing from the README's 'Operator flags' table: {missing:?}"
    );
    // And nothing documented that the binary does not have.
    for line in table.lines().filter(|l| l.starts_with("| `--")) {
        let flag = line[3..].split('`').next().unwrap_or_default();
        let flag = flag.split(' ').next().unwrap_or_default();
        assert!(
            flags.iter().any(|f| f == flag),
            "the README documents {flag}, which devplug-operator does not have"
        );
    }
}

/// Leaves of a values tree as dotted paths; `operator.resources` (Kubernetes
/// resource requirements) and any `labels` map are one value each, not
/// trees of their own.
fn leaves(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m)
            if !m.is_empty() && prefix != "operator.resources" && !prefix.ends_with(".labels") =>
        {
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&path, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_chart_value_is_in_the_readme() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("charts/devplug/values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let mut all = Vec::new();
    leaves("", &values, &mut all);
    assert!(all.len() >= 30, "parsed too few values: {all:?}");
    let table = readme_section("Chart values");
    let missing: Vec<&String> = all
        .iter()
        .filter(|v| !table.contains(&format!("| `{v}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "chart values missing from the README's 'Chart values' table: {missing:?}"
    );
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let value = line[3..].split('`').next().unwrap_or_default();
        assert!(
            all.iter().any(|v| v == value),
            "the README documents chart value {value}, which values.yaml does not have"
        );
    }
}

/// No reconcile lists the API server: the index answers. The pre-delete
/// cleanup hook (`cleanup.rs`, a separate one-shot command) is the only
/// place that lists.
#[test]
fn no_live_list_outside_the_cleanup_hook() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "rs") || p.ends_with("cleanup.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for (n, l) in text.lines().enumerate() {
            if l.contains(".list(") || l.contains(".list_metadata(") {
                offenders.push(format!("{}:{}: {}", p.display(), n + 1, l.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "live LISTs: {offenders:#?}");
}
