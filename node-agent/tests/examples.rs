//! Every policy under examples/ loads and validates as the agent would load it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn example_policies_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("kind: DevicePluginPolicy") {
            continue;
        }
        match devplug_agent::run::load_config(&path) {
            Ok(p) => assert!(!p.is_empty()),
            Err(e) => panic!("{}: {e}", path.display()),
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} example policies found");
}
