//! The README's "Agent flags" table lists every flag of
//! `devplug-agent --help`, and nothing the binary does not have.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn every_agent_flag_is_in_the_readme() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_devplug-agent"))
        .arg("--help")
        .output()
        .expect("run devplug-agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<String> = help
        .lines()
        .filter_map(|l| {
            let flag = l
                .trim_start()
                .strip_prefix("--")?
                .split([' ', '=', '<'])
                .next()?;
            (!flag.is_empty() && flag != "help" && flag != "version").then(|| format!("--{flag}"))
        })
        .collect();
    assert!(flags.len() >= 13, "parsed too few flags: {flags:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find("\n### Agent flags\n")
        .expect("README has a section '### Agent flags'");
    let rest = &readme[start + 1..];
    let table = &rest[..rest[4..].find("\n#").map_or(rest.len(), |e| e + 4)];
    let documented: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .filter_map(|l| l[3..].split(['`', ' ']).next())
        .collect();
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| !documented.contains(&f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "flags of devplug-agent missing from the README's 'Agent flags' table: {missing:?}"
    );
    for d in &documented {
        assert!(
            flags.iter().any(|f| f == d),
            "the README documents {d}, which devplug-agent does not have"
        );
    }
}
