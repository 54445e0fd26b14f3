//! The Helm chart, rendered by the real helm binary (`make tools` installs
//! it into .tools/bin; `DEVPLUG_HELM` overrides): lint, several value sets,
//! bad values refused with a clear message, and the rendered objects
//! checked (kinds, RBAC verbs the operator needs, securityContext).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("charts/devplug")
}

fn helm() -> PathBuf {
    if let Ok(p) = std::env::var("DEVPLUG_HELM") {
        return PathBuf::from(p);
    }
    let local = root().join(".tools/bin/helm");
    if local.exists() {
        return local;
    }
    panic!("helm not found: run `make tools` (installs it into .tools/bin) or set DEVPLUG_HELM");
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(helm()).args(args).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const VAP: &str = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy";

fn template(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "devplug",
        chart.to_str().unwrap(),
        "--namespace",
        "devplug-system",
        "--api-versions",
        VAP,
    ];
    args.extend_from_slice(extra);
    let (ok, out) = run(&args);
    assert!(ok, "helm template {extra:?} failed:\n{out}");
    serde_yaml::Deserializer::from_str(&out)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn allows(rules: &Value, group: &str, resource: &str, verb: &str) -> bool {
    rules.as_array().unwrap().iter().any(|r| {
        r["apiGroups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == group)
            && r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resource)
            && r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == verb || v == "*")
    })
}

#[test]
fn chart_crds_are_the_generated_crds() {
    for e in std::fs::read_dir(root().join("crds")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        let in_chart = std::fs::read_to_string(chart().join("crds").join(name)).unwrap_or_default();
        assert!(
            in_chart == std::fs::read_to_string(&p).unwrap(),
            "charts/devplug/crds/{name:?} differs from crds/: run `make crds`"
        );
    }
}

#[test]
fn lint_is_strict_clean_with_every_value_set() {
    let chart = chart();
    let c = chart.to_str().unwrap();
    for set in [
        vec![],
        vec!["--set", "operator.replicas=2"],
        vec![
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "samplePolicy.enabled=true",
        ],
        vec![
            "--set",
            "agentNodeRestriction.enabled=false",
            "--set",
            "kubeletRoot=/var/lib/k0s/kubelet",
        ],
        vec![
            "--set",
            "allowedDeviceNodes={/dev/sdb,/dev/mem}",
            "--set",
            "allowedAgentImages={example.com/tools:1}",
        ],
    ] {
        let mut args = vec!["lint", "--strict", c];
        args.extend_from_slice(&set);
        let (ok, out) = run(&args);
        assert!(ok, "helm lint --strict {set:?}:\n{out}");
    }
}

#[test]
fn rendered_objects_rbac_and_security() {
    let docs = template(&[]);
    // The release's objects (hooks apart: see below).
    let mut kinds: Vec<String> = docs
        .iter()
        .filter(|d| d["metadata"]["annotations"]["helm.sh/hook"].is_null())
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.sort();
    kinds.dedup();
    // The hooks: uninstall cleanup and CRD upgrade, as restricted Jobs.
    for (job, hook) in [
        ("devplug-cleanup", "pre-delete"),
        ("devplug-crds", "pre-upgrade"),
    ] {
        let j = find(&docs, "Job", job);
        assert_eq!(j["metadata"]["annotations"]["helm.sh/hook"], hook);
        let pod = &j["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
            true
        );
        for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
            assert_eq!(
                find(&docs, kind, job)["metadata"]["annotations"]["helm.sh/hook"],
                hook,
                "{kind} {job}"
            );
        }
    }
    assert_eq!(
        kinds,
        vec![
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "FlowSchema",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );

    // The lease renewals go to the leader-election priority level, for the
    // operator's own service account and namespace only.
    let fs = &find(&docs, "FlowSchema", "devplug-operator-leader-election")["spec"];
    assert_eq!(fs["priorityLevelConfiguration"]["name"], "leader-election");
    let rule = &fs["rules"][0];
    assert_eq!(
        rule["subjects"][0]["serviceAccount"],
        json!({"name": "devplug-operator", "namespace": "devplug-system"})
    );
    assert_eq!(rule["resourceRules"][0]["resources"], json!(["leases"]));
    assert_eq!(
        rule["resourceRules"][0]["apiGroups"],
        json!(["coordination.k8s.io"])
    );

    // Every call the operator makes is allowed, and nothing broader.
    let cr = &find(&docs, "ClusterRole", "devplug-operator")["rules"];
    for (g, r, v) in [
        ("devplug.io", "devicepluginpolicies", "watch"),
        ("devplug.io", "devicepluginpolicies/status", "patch"),
        ("devplug.io", "nodedevicestatuses", "watch"),
        ("devplug.io", "nodedevicestatuses", "patch"),
        ("devplug.io", "nodedevicestatuses", "delete"),
        ("devplug.io", "nodedevicestatuses/status", "patch"),
        ("", "nodes", "get"),
        ("", "nodes", "patch"),
        ("", "pods", "watch"),
        ("rbac.authorization.k8s.io", "clusterroles", "patch"),
        ("rbac.authorization.k8s.io", "clusterrolebindings", "patch"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(allows(cr, g, r, v), "ClusterRole misses {v} {g}/{r}");
    }
    // The API server refuses a ClusterRole granting what its creator does
    // not hold (no escalate here): the operator holds all it grants agents.
    for api in ["DevicePlugin", "DRA"] {
        let p: devplug_api::DevicePluginPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "devplug.io/v1alpha1", "kind": "DevicePluginPolicy",
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"resourceName": "example.com/x", "kubeletApi": api,
                     "source": {"simulated": {"count": 1}}}}))
        .unwrap();
        let granted = devplug_operator::desired::cluster_role(&p);
        for rule in granted.rules.unwrap() {
            for g in rule.api_groups.unwrap_or_default() {
                for r in rule.resources.clone().unwrap_or_default() {
                    for v in &rule.verbs {
                        assert!(
                            allows(cr, &g, &r, v),
                            "{api} agents are granted {v} {g}/{r}, which the operator lacks"
                        );
                    }
                }
            }
        }
    }
    assert!(allows(cr, "resource.k8s.io", "deviceclasses", "patch"));
    assert!(allows(cr, "resource.k8s.io", "deviceclasses", "delete"));
    assert!(!allows(cr, "", "nodes", "delete"));
    assert!(!allows(cr, "", "secrets", "get"));
    assert!(!allows(
        cr,
        "rbac.authorization.k8s.io",
        "clusterroles",
        "bind"
    ));
    assert!(!allows(
        cr,
        "rbac.authorization.k8s.io",
        "clusterroles",
        "escalate"
    ));
    let role = &find(&docs, "Role", "devplug-operator")["rules"];
    for (g, r, v) in [
        ("apps", "daemonsets", "patch"),
        ("apps", "daemonsets", "delete"),
        ("apps", "daemonsets", "watch"),
        ("", "serviceaccounts", "patch"),
        ("coordination.k8s.io", "leases", "update"),
        // A standby follows the lease, so a release wakes it at once.
        ("coordination.k8s.io", "leases", "watch"),
        // FailedCreate Events are watched, not listed by a reconcile.
        ("", "events", "watch"),
    ] {
        assert!(allows(role, g, r, v), "Role misses {v} {g}/{r}");
    }
    assert_eq!(
        find(&docs, "Role", "devplug-operator")["metadata"]["namespace"],
        "devplug-system"
    );

    // Pod Security "restricted" for the operator.
    let dep = find(&docs, "Deployment", "devplug-operator");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(
        pod.get("hostNetwork").is_none()
            && pod.get("hostPID").is_none()
            && pod.get("volumes").is_none()
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc.get("privileged").is_none());
    assert!(
        c.get("volumeMounts").is_none(),
        "the operator mounts nothing"
    );
    assert_eq!(c["image"], "ghcr.io/devplug/devplug-operator:0.1.0");
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        env("DEVPLUG_AGENT_IMAGE")["value"],
        "ghcr.io/devplug/devplug-agent:0.1.0"
    );
    assert_eq!(
        env("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert!(
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--leader-elect=true")
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");

    let vap = find(&docs, "ValidatingAdmissionPolicy", "devplug-agent-own-node");
    let cond = vap["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert!(
        cond.contains("system:serviceaccount:devplug-system:devplug-agent-"),
        "{cond}"
    );
}

#[test]
fn value_sets_change_what_they_should() {
    let docs = template(&[
        "--set",
        "operator.replicas=2",
        "--set",
        "image.registry=registry.local:5000",
        "--set",
        "image.tag=dev",
        "--set",
        "kubeletRoot=/var/lib/k0s/kubelet",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "samplePolicy.enabled=true",
        "--set",
        "agentNodeRestriction.enabled=false",
        "--set",
        "image.pullPolicy=Always",
        "--set",
        "imagePullSecrets[0].name=regcred",
        "--set",
        "imagePullSecrets[1].name=other",
        "--set",
        "allowedDeviceNodes={/dev/sdb}",
        "--set",
        "allowedAgentImages={example.com/tools:1,example.com/other:2}",
    ]);
    let dep = find(&docs, "Deployment", "devplug-operator");
    // The agents are pulled like the operator.
    let env_of = |name: &str| {
        dep["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        env_of("DEVPLUG_AGENT_IMAGE_PULL_POLICY"),
        Some("Always".into())
    );
    assert_eq!(
        env_of("DEVPLUG_AGENT_IMAGE_PULL_SECRETS"),
        Some("regcred,other".into())
    );
    // The allow-lists reach the operator (and through it the agents).
    assert_eq!(
        env_of("DEVPLUG_ALLOWED_DEVICE_NODES"),
        Some("/dev/sdb".into())
    );
    assert_eq!(
        env_of("DEVPLUG_ALLOWED_AGENT_IMAGES"),
        Some("example.com/tools:1,example.com/other:2".into())
    );
    assert_eq!(dep["spec"]["replicas"], 2);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.local:5000/devplug-operator:dev");
    let envs = c["env"].as_array().unwrap();
    assert!(envs.iter().any(|e| e["name"] == "DEVPLUG_AGENT_IMAGE"
        && e["value"] == "registry.local:5000/devplug-agent:dev"));
    assert!(
        envs.iter()
            .any(|e| e["name"] == "DEVPLUG_KUBELET_ROOT" && e["value"] == "/var/lib/k0s/kubelet")
            && c["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "DEVPLUG_DEVICE_PLUGIN_DIR"
                    && e["value"] == "/var/lib/kubelet/device-plugins")
    );
    find(&docs, "ServiceMonitor", "devplug-operator");
    find(&docs, "PodMonitor", "devplug-agents");
    let sample = find(&docs, "DevicePluginPolicy", "simulated-foo");
    assert_eq!(
        sample["spec"]["resourceName"],
        "hardware-vendor.example/foo"
    );
    // agentNodeRestriction.enabled=false: no agent restriction (the
    // policy allow-lists keep theirs).
    assert!(
        !docs.iter().any(|d| d["kind"] == "ValidatingAdmissionPolicy"
            && d["metadata"]["name"] == "devplug-agent-own-node")
    );
    // The allow-lists reach admission.
    let vap = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "devplug-policy-allow-lists",
    );
    let rules = serde_json::to_string(&vap["spec"]["validations"]).unwrap();
    assert!(
        rules.contains("example.com/other:2") && rules.contains("/dev/sdb"),
        "{rules}"
    );
}

#[test]
fn bad_values_fail_at_install_with_a_clear_message() {
    let chart = chart();
    let c = chart.to_str().unwrap();
    for (set, needle) in [
        ("operator.replicas=0", "replicas"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("kubeletRoot=relative/path", "kubeletRoot"),
        ("metrics.port=70000", "port"),
        ("operatr.replicas=2", "operatr"),
    ] {
        let (ok, out) = run(&["template", "devplug", c, "--set", set]);
        assert!(!ok, "{set} was accepted");
        assert!(
            out.contains(needle),
            "{set}: message does not name {needle}:\n{out}"
        );
    }
    let (ok, out) = run(&[
        "template",
        "devplug",
        c,
        "--set",
        "operator.replicas=3",
        "--set",
        "operator.leaderElection=false",
    ]);
    assert!(!ok);
    assert!(out.contains("needs operator.leaderElection: true"), "{out}");
}

/// When the release namespace is deleted first, helm's record of the
/// release goes with it and the operator removes the chart's
/// cluster-scoped objects itself: its list must hold every one the chart
/// renders (hooks aside, which helm deletes), and its role must allow it.
#[test]
fn the_operator_can_remove_every_cluster_scoped_object_of_the_chart() {
    let docs = template(&[]);
    let op = find(&docs, "ClusterRole", "devplug-operator");
    let mut seen = 0;
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let name = d["metadata"]["name"].as_str().unwrap();
        let cluster_scoped = matches!(
            kind,
            "ClusterRole"
                | "ClusterRoleBinding"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding"
                | "FlowSchema"
        );
        if !cluster_scoped || !d["metadata"]["annotations"]["helm.sh/hook"].is_null() {
            continue;
        }
        seen += 1;
        let entry = devplug_operator::CHART_CLUSTER_OBJECTS
            .iter()
            .find(|(_, k, _, n)| *k == kind && *n == name)
            .unwrap_or_else(|| panic!("{kind} {name} is not in CHART_CLUSTER_OBJECTS"));
        let group = entry.0.split_once('/').map_or("", |(g, _)| g);
        assert!(
            allows(&op["rules"], group, entry.2, "delete"),
            "the operator may not delete {kind} {name}"
        );
    }
    assert!(seen >= 6, "{seen} cluster-scoped objects");
}

/// The chart's alert rules pass `promtool check rules`, and
/// `promtool test rules` fires and resolves each alert as
/// tests/prometheus/alerts_test.yaml expects (promtool: Debian's
/// prometheus package, installed by `make testenv-deps`).
#[test]
fn the_alert_rules_pass_promtool_check_and_test() {
    let docs = template(&[
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.agentFor=10m",
        "--set",
        "metrics.prometheusRule.unhealthyFor=5m",
    ]);
    let rule = find(&docs, "PrometheusRule", "devplug");
    let groups = json!({"groups": rule["spec"]["groups"]});
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&groups).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("tests/prometheus/alerts_test.yaml"),
        dir.path().join("alerts_test.yaml"),
    )
    .unwrap();
    let promtool = |args: &[&str]| -> (bool, String) {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool not found ({e}): run `make testenv-deps` (Debian's prometheus package)")
            });
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"]);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("5 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(ok, "promtool test rules:\n{out}");
}

/// The Grafana dashboard is valid JSON in a ConfigMap the sidecar finds,
/// and every metric it queries is one devplug exposes.
#[test]
fn the_dashboard_is_a_configmap_of_queries_on_our_metrics() {
    let docs = template(&["--set", "metrics.grafanaDashboard.enabled=true"]);
    let cm = find(&docs, "ConfigMap", "devplug-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dash: Value = serde_json::from_str(cm["data"]["devplug.json"].as_str().unwrap()).unwrap();
    assert_eq!(dash["uid"], "devplug");
    let known = [
        "devplug_device_health",
        "devplug_kubelet_ready",
        "devplug_registrations_total",
        "devplug_allocate_duration_seconds_bucket",
        "devplug_allocate_requests_total",
        "devplug_dra_request_duration_seconds_bucket",
        "devplug_dra_requests_total",
        "devplug_status_writes_total",
        "devplug_operator_leader",
        "devplug_operator_policy_degraded",
        "devplug_operator_policy_nodes",
        "devplug_operator_reconciles_total",
        "devplug_operator_reconcile_errors_total",
        "devplug_operator_api_requests_total",
        "process_resident_memory_bytes",
    ];
    let mut queries = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            queries += 1;
            let named: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("devplug_") || w.starts_with("process_"))
                .collect();
            assert!(!named.is_empty(), "{expr}");
            for m in named {
                assert!(
                    known.contains(&m),
                    "the dashboard queries {m}, which nothing exposes: {expr}"
                );
            }
        }
    }
    assert!(queries >= 15, "{queries} queries");
}
