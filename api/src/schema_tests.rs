//! Admission-time rules, tested without an API server: the generated CRD
//! schema is evaluated with kube's client-side CEL validator (the same rule
//! language and defaulting the API server applies), and OpenAPI patterns with
//! the `regex` crate.

use kube::core::cel::{Validator, WarningKind, compile_schema, estimate_rule_cost};
use serde_json::{Value, json};

use crate::crd;

fn schema() -> Value {
    let crd = crd::device_plugin_policy().unwrap();
    let s = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(s).unwrap()
}

fn policy(spec: Value) -> Value {
    json!({
        "apiVersion": "devplug.io/v1alpha1",
        "kind": "DevicePluginPolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    })
}

fn base() -> Value {
    json!({"resourceName": "example.com/foo", "source": {"simulated": {"count": 2}}})
}

fn with(f: impl FnOnce(&mut Value)) -> Value {
    let mut v = base();
    f(&mut v);
    policy(v)
}

/// Every (path, rule) in the schema, with the schema node it sits on.
fn rules(node: &Value, path: &str, out: &mut Vec<(String, String, Value)>) {
    let Some(map) = node.as_object() else { return };
    if let Some(Value::Array(vs)) = map.get("x-kubernetes-validations") {
        for v in vs {
            out.push((
                path.to_string(),
                v["rule"].as_str().unwrap().to_string(),
                node.clone(),
            ));
        }
    }
    if let Some(Value::Object(props)) = map.get("properties") {
        for (k, child) in props {
            rules(child, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = map.get("items") {
        rules(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_rule_compiles_and_fits_the_cost_budget() {
    let mut all = Vec::new();
    rules(&schema(), "", &mut all);
    assert_eq!(all.len(), 18, "the policy has 18 CEL rules");
    for (path, rule, node) in &all {
        let compiled = compile_schema(node);
        assert!(
            !compiled.has_errors(),
            "{path}: {rule}: {:?}",
            compiled.compilation_errors()
        );
        let over: Vec<_> = estimate_rule_cost(rule, &compiled)
            .into_iter()
            .filter(|w| w.kind == WarningKind::CostExceeded)
            .collect();
        assert!(over.is_empty(), "{path}: {rule}: {over:?}");
    }
}

/// What a rule at `node` can reach that the API server's cost estimator
/// would take as unbounded: a string without `maxLength` (or `enum`), a list
/// without `maxItems`, a map without `maxProperties`. Properties count as
/// reached when the rule names them; list items and map values always.
fn unbounded(node: &Value, rule: &str, path: &str, out: &mut Vec<String>) {
    let ty = node.get("type").and_then(Value::as_str);
    match ty {
        Some("string") if node.get("maxLength").is_none() && node.get("enum").is_none() => {
            out.push(format!("{path}: string without maxLength"))
        }
        Some("array") if node.get("maxItems").is_none() => {
            out.push(format!("{path}: list without maxItems"))
        }
        Some("object")
            if node.get("additionalProperties").is_some()
                && node.get("maxProperties").is_none() =>
        {
            out.push(format!("{path}: map without maxProperties"))
        }
        _ => {}
    }
    if let Some(items) = node.get("items") {
        unbounded(items, rule, &format!("{path}[]"), out);
    }
    if let Some(v @ Value::Object(_)) = node.get("additionalProperties") {
        unbounded(v, rule, &format!("{path}{{}}"), out);
    }
    if let Some(Value::Object(props)) = node.get("properties") {
        for (k, child) in props {
            let named = rule.match_indices(k.as_str()).any(|(i, _)| {
                rule[..i].ends_with('.')
                    && !rule[i + k.len()..].starts_with(|c: char| c.is_alphanumeric())
            });
            if named {
                unbounded(child, rule, &format!("{path}.{k}"), out);
            }
        }
    }
}

/// The API server refused the CRD when `globs` (reached by a CEL rule) had
/// no bounds; kube's client-side estimator did not. This guard needs no
/// API server: every value a rule reaches is bounded.
#[test]
fn everything_a_cel_rule_reaches_is_bounded() {
    let mut all = Vec::new();
    rules(&schema(), "", &mut all);
    let mut out = Vec::new();
    for (path, rule, node) in &all {
        unbounded(node, rule, path, &mut out);
    }
    assert!(
        out.is_empty(),
        "unbounded values reached by CEL rules: {out:#?}"
    );
}

#[test]
fn the_bound_guard_sees_an_unbounded_list() {
    let node = json!({"type": "object", "properties": {
        "globs": {"type": "array", "items": {"type": "string"}}}});
    let mut out = Vec::new();
    unbounded(&node, "self.globs.all(g, g != '')", "", &mut out);
    assert_eq!(
        out,
        vec![
            ".globs: list without maxItems",
            ".globs[]: string without maxLength"
        ]
    );
    let mut out = Vec::new();
    unbounded(&node, "has(self.other)", "", &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn no_unsigned_formats_the_api_server_warns_about() {
    let text = serde_json::to_string(&schema()).unwrap();
    assert!(!text.contains("uint32") && !text.contains("uint64"));
}

fn admit(obj: &Value) -> Result<(), String> {
    Validator::new()
        .validate(&schema(), obj, None)
        .map_err(|e| e.to_string())
}

#[test]
fn cel_rules_refuse_bad_specs_with_readable_messages() {
    let cases: Vec<(Value, &str)> = vec![
        (
            with(|s| s["resourceName"] = json!("kubernetes.io/foo")),
            "reserved",
        ),
        (
            with(|s| s["resourceName"] = json!("gpu.k8s.io/foo")),
            "reserved",
        ),
        (with(|s| s["source"] = json!({})), "exactly one source"),
        (
            with(|s| s["source"]["paths"] = json!({"globs": ["/dev/x"]})),
            "exactly one source",
        ),
        (
            with(|s| s["source"]["nvidia"] = json!({})),
            "exactly one source",
        ),
        (
            with(|s| s["source"]["simulated"] = json!({})),
            "count >= 1 or a list",
        ),
        (
            with(|s| s["source"]["simulated"] = json!({"count": 1, "devices": [{"id": "a"}]})),
            "not both",
        ),
        (
            with(|s| s["sharing"] = json!({"strategy": "Exclusive", "replicas": 2})),
            "replicas is required with strategy TimeSlicing and not allowed",
        ),
        (
            with(|s| s["sharing"] = json!({"strategy": "TimeSlicing"})),
            "replicas is required",
        ),
        (
            with(|s| s["sharing"] = json!({"failRequestsGreaterThanOne": true})),
            "only meaningful with strategy TimeSlicing",
        ),
        (
            with(|s| s["source"] = json!({"paths": {"globs": ["/dev/a/../../etc/shadow"]}})),
            "stay under /dev/",
        ),
        (
            with(|s| s["source"] = json!({"pci": {}})),
            "at least one of vendor",
        ),
        (
            with(|s| s["preStart"] = json!({"command": ["reset-gpu"]})),
            "absolute path",
        ),
        (
            with(|s| s["preStart"] = json!({"command": ["/usr/bin/reset-gpu"]})),
            "distroless",
        ),
        (
            with(|s| s["resourceName"] = json!("requests.example.com/foo")),
            "requests. prefix",
        ),
        (
            with(|s| s["resourceName"] = json!("acme-kubernetes.io/x")),
            "reserved",
        ),
        (
            with(|s| {
                s["resourceName"] = json!(format!(
                    "{}ex.com/x",
                    format!("{}.", "a".repeat(60)).repeat(4)
                ))
            }),
            "at most 244",
        ),
        (
            with(|s| s["allocate"] = json!({"env": {"1BAD": "x"}})),
            "environment variable names",
        ),
        (
            with(|s| {
                s["source"] = json!({"simulated": {"count": 4096}});
                s["sharing"] = json!({"strategy": "TimeSlicing", "replicas": 8});
            }),
            "at most 16384",
        ),
        (
            with(|s| {
                s["kubeletApi"] = json!("DRA");
                s["preStart"] = json!({"command": ["/usr/bin/reset-gpu"]});
                s["agent"] = json!({"image": "x/y:1"});
            }),
            "DRA has no pre-start hook",
        ),
        (
            with(|s| s["source"] = json!({"nvidia": {"migPartitions": true}})),
            "MIG partitions are made per claim",
        ),
        (
            with(|s| s["source"] = json!({"simulated": {"count": 1, "partitionSlots": 4}})),
            "partitions are made per claim",
        ),
        (
            with(|s| {
                s["kubeletApi"] = json!("DRA");
                s["source"] = json!({"nvidia": {"migPartitions": true}});
                s["sharing"] = json!({"strategy": "TimeSlicing", "replicas": 2});
            }),
            "MIG partitions are made per claim",
        ),
    ];
    for (obj, want) in &cases {
        match admit(obj) {
            Ok(()) => panic!("admitted: {}", obj["spec"]),
            Err(e) => assert!(e.contains(want), "{}: {e}", obj["spec"]),
        }
    }
}

#[test]
fn good_specs_and_examples_are_admitted() {
    admit(&policy(base())).unwrap();
    admit(&with(|s| {
        s["sharing"] = json!({"strategy": "TimeSlicing", "replicas": 4, "failRequestsGreaterThanOne": true})
    }))
    .unwrap();
    admit(&with(|s| s["source"] = json!({"pci": {"class": "03"}}))).unwrap();
    admit(&with(|s| {
        s["source"] = json!({"nvidia": {"ignoredXids": [13, 48]}})
    }))
    .unwrap();
    admit(&with(|s| s["source"] = json!({"nvidia": {}}))).unwrap();
    admit(&with(|s| {
        s["kubeletApi"] = json!("DRA");
        s["source"] = json!({"nvidia": {"migPartitions": true}});
    }))
    .unwrap();
    admit(&with(|s| {
        s["kubeletApi"] = json!("DRA");
        s["source"] = json!({"simulated": {"count": 1, "partitionSlots": 4}});
    }))
    .unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        if !text.contains("kind: DevicePluginPolicy") {
            continue;
        }
        for p in crate::policies_from_yaml(&text).unwrap() {
            admit(&serde_json::to_value(&p).unwrap())
                .unwrap_or_else(|e| panic!("{:?}: {e}", p.metadata.name));
            n += 1;
        }
    }
    assert!(n >= 5);
}

fn pattern(path: &[&str]) -> regex::Regex {
    let mut node = schema();
    for p in path {
        node = if *p == "[]" {
            node["items"].clone()
        } else {
            node["properties"][*p].clone()
        };
    }
    let pat = node["pattern"]
        .as_str()
        .unwrap_or_else(|| panic!("no pattern at {path:?}"));
    regex::Regex::new(pat).unwrap()
}

#[test]
fn openapi_patterns_and_bounds() {
    let rn = pattern(&["spec", "resourceName"]);
    for ok in [
        "example.com/foo",
        "hardware-vendor.example/foo",
        "a.b/c_d.e",
    ] {
        assert!(rn.is_match(ok), "{ok}");
    }
    for bad in [
        "foo",
        "example.com/",
        "Example.com/foo",
        "localhost/foo",
        "example.com/a/b",
        "example.com/-x",
    ] {
        assert!(!rn.is_match(bad), "{bad}");
    }
    let glob = pattern(&["spec", "source", "paths", "globs", "[]"]);
    assert!(glob.is_match("/dev/foo[0-9]*"));
    assert!(glob.is_match("/dev/fuse"));
    assert!(!glob.is_match("/etc/passwd"));
    assert!(!glob.is_match("/dev/foo[0-9"), "unclosed class");
    let vendor = pattern(&["spec", "source", "usb", "devices", "[]", "vendor"]);
    assert!(vendor.is_match("046d") && !vendor.is_match("46d") && !vendor.is_match("zzzz"));
    let id = pattern(&["spec", "source", "simulated", "devices", "[]", "id"]);
    assert!(id.is_match("gpu-0") && !id.is_match("bad id"));
    let perm = pattern(&["spec", "source", "paths", "permissions"]);
    for ok in ["r", "rw", "mrw", "wm"] {
        assert!(perm.is_match(ok), "{ok}");
    }
    for bad in ["rr", "x", "rwx"] {
        assert!(!perm.is_match(bad), "{bad}");
    }
    let s = schema();
    let sharing = &s["properties"]["spec"]["properties"]["sharing"]["properties"];
    assert_eq!(sharing["replicas"]["minimum"].as_f64(), Some(1.0));
    let count = &s["properties"]["spec"]["properties"]["source"]["properties"]["simulated"]["properties"]
        ["count"];
    assert_eq!(
        count["minimum"].as_f64(),
        Some(0.0),
        "negative counts refused"
    );
    let numa = &s["properties"]["spec"]["properties"]["source"]["properties"]["simulated"]["properties"]
        ["devices"]["items"]["properties"]["numaNode"];
    assert_eq!(numa["minimum"].as_f64(), Some(0.0));
}

#[test]
fn list_maps_make_the_api_server_refuse_duplicates() {
    let s = schema();
    let d = &s["properties"]["spec"]["properties"]["source"]["properties"]["simulated"]["properties"]
        ["devices"];
    assert_eq!(d["x-kubernetes-list-type"], "map");
    assert_eq!(d["x-kubernetes-list-map-keys"], json!(["id"]));
    let c = &s["properties"]["status"]["properties"]["conditions"];
    assert_eq!(c["x-kubernetes-list-type"], "map");
    assert_eq!(c["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn node_device_status_entries_are_list_maps() {
    let crd = crd::node_device_status().unwrap();
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.short_names, Some(vec!["nds".to_string()]));
    let s = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    let r = &s["properties"]["status"]["properties"]["resources"];
    assert_eq!(r["x-kubernetes-list-map-keys"], json!(["resourceName"]));
    // One writer per entry: the devices are one atomic value, so the API
    // server keeps no managed fields per device.
    assert_eq!(
        r["items"]["properties"]["devices"]["x-kubernetes-list-type"],
        "atomic"
    );
    assert!(
        r["items"]["properties"]["devices"]
            .get("x-kubernetes-list-map-keys")
            .is_none()
    );
    assert_eq!(
        r["items"]["properties"]["devices"]["items"]["properties"]["health"]["enum"],
        json!(["Healthy", "Unhealthy", "Unknown"])
    );
    // Default columns, then the wide ones (`-o wide`: priority 1).
    let cols: Vec<_> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.priority.unwrap_or(0)))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("Resources".to_string(), 0),
            ("Healthy/Total".into(), 0),
            ("Allocated".into(), 0),
            ("Age".into(), 0),
            ("Unhealthy".into(), 1),
            ("Not Reporting".into(), 1),
        ]
    );
    assert!(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap()
            .description
            .as_deref()
            .unwrap_or_default()
            .starts_with("NodeDeviceStatus holds"),
        "kubectl explain nds says what the kind is"
    );
}

#[test]
fn no_schema_node_forbids_and_declares_properties() {
    fn walk(v: &Value, path: &str) {
        if let Some(m) = v.as_object() {
            assert!(
                !(m.contains_key("properties")
                    && m.get("additionalProperties") == Some(&Value::Bool(false))),
                "{path} is not structural"
            );
            for (k, c) in m {
                walk(c, &format!("{path}/{k}"));
            }
        }
    }
    walk(&schema(), "");
}

#[test]
fn checked_in_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, crd) in crd::all().unwrap() {
        let want = crd::to_yaml(&crd).unwrap();
        let got = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            got == want,
            "crds/{name} is out of date: run `cargo run -p devplug-api --bin crdgen` and commit the result"
        );
    }
}

#[test]
fn kubectl_explain_and_get_o_wide_say_what_a_policy_is() {
    let crd = crd::device_plugin_policy().unwrap();
    let v = &crd.spec.versions[0];
    let schema = v
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    let about = schema.description.as_deref().unwrap_or_default();
    assert!(
        about.starts_with("DevicePluginPolicy advertises"),
        "{about}"
    );
    assert!(!about.contains("Auto-generated"), "{about}");
    let wide: Vec<(&str, &str)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority == Some(1))
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        wide,
        vec![
            ("Kubelet API", ".spec.kubeletApi"),
            ("Sharing", ".spec.sharing.strategy"),
            ("Replicas", ".spec.sharing.replicas"),
            (
                "Degraded",
                ".status.conditions[?(@.type==\"Degraded\")].reason"
            ),
        ]
    );
}
