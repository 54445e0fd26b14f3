//! Two policies for one resource name on overlapping nodes would have two
//! agents fight over one kubelet registration. The older policy wins,
//! deterministically (creation time, then name); the newer gets no agents and
//! a `Conflict` condition until the overlap is resolved. Only policies that
//! actually serve take nodes: an invalid policy, one the operator refuses
//! (host mounts outside the allow-list), one being deleted, or one that
//! itself lost a conflict makes nobody lose.

use std::collections::BTreeMap;

use devplug_api::{DevicePluginPolicy, ResourceExt};

use crate::desired::{AgentDefaults, refusal};

/// Whether two node selectors can select a common node. Selectors that
/// require different values for one label key are disjoint; anything else
/// may overlap (the operator does not wait for nodes to exist to decide).
pub fn may_overlap(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}

fn age_key(p: &DevicePluginPolicy) -> (Option<i64>, String) {
    (
        p.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_nanosecond() as i64),
        p.name_any(),
    )
}

/// The oldest older policy that serves `p`'s resource on nodes `p` may also
/// select, if any. Which older policies serve is decided in age order: a
/// valid, live policy serves unless an older serving one overlaps it.
pub fn older_claimant<'a, I>(
    p: &DevicePluginPolicy,
    all: I,
    defaults: &AgentDefaults,
) -> Option<&'a DevicePluginPolicy>
where
    I: IntoIterator<Item = &'a DevicePluginPolicy>,
{
    let me = age_key(p);
    let mut older: Vec<&DevicePluginPolicy> = all
        .into_iter()
        .filter(|o| o.name_any() != p.name_any())
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| o.spec.resource_name == p.spec.resource_name)
        .filter(|o| age_key(o) < me)
        .filter(|o| refusal(o, defaults).is_none())
        .collect();
    older.sort_by_key(|o| age_key(o));
    let mut serving: Vec<&DevicePluginPolicy> = Vec::new();
    for o in older {
        if !serving
            .iter()
            .any(|s| may_overlap(&s.spec.node_selector, &o.spec.node_selector))
        {
            serving.push(o);
        }
    }
    serving
        .into_iter()
        .find(|s| may_overlap(&s.spec.node_selector, &p.spec.node_selector))
}

/// How the conflict condition names the policy that won: its name, and
/// when it serves the resource through the other kubelet API, that too.
pub fn describe_winner(loser: &DevicePluginPolicy, winner: &DevicePluginPolicy) -> String {
    let name = winner.metadata.name.clone().unwrap_or_default();
    if loser.spec.kubelet_api == winner.spec.kubelet_api {
        return name;
    }
    let api = |a: devplug_api::KubeletApi| match a {
        devplug_api::KubeletApi::DevicePlugin => "the device plugin API",
        devplug_api::KubeletApi::Dra => "DRA",
    };
    format!(
        "{name} (through {}; a node never serves one resource name both through the device plugin API and DRA, the kubelet forbids it)",
        api(winner.spec.kubelet_api)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplug_api::{DevicePluginPolicySpec, SimulatedSource, SourceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn pol(name: &str, res: &str, created: i64, sel: &[(&str, &str)]) -> DevicePluginPolicy {
        let mut p = DevicePluginPolicy::new(
            name,
            DevicePluginPolicySpec {
                resource_name: res.into(),
                node_selector: sel
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                tolerations: vec![],
                priority_class_name: None,
                source: SourceSpec {
                    simulated: Some(SimulatedSource {
                        count: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                sharing: Default::default(),
                allocate: Default::default(),
                pre_start: None,
                kubelet_api: Default::default(),
                health: Default::default(),
                agent: Default::default(),
            },
        );
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        p
    }

    #[test]
    fn older_policy_wins_on_overlap() {
        let a = pol("a", "x.io/r", 10, &[]);
        let b = pol("b", "x.io/r", 20, &[("gpu", "yes")]);
        let all = [a.clone(), b.clone()];
        assert_eq!(
            older_claimant(&b, &all, &AgentDefaults::default()).map(|p| p.name_any()),
            Some("a".into())
        );
        assert!(
            older_claimant(&a, &all, &AgentDefaults::default()).is_none(),
            "the older one keeps its agents"
        );
    }

    #[test]
    fn disjoint_selectors_or_other_resources_do_not_conflict() {
        let a = pol("a", "x.io/r", 10, &[("zone", "a")]);
        let b = pol("b", "x.io/r", 20, &[("zone", "b")]);
        let c = pol("c", "x.io/other", 5, &[]);
        let all = [a.clone(), b.clone(), c];
        assert!(older_claimant(&b, &all, &AgentDefaults::default()).is_none());
    }

    #[test]
    fn ties_break_by_name_and_deleted_policies_do_not_count() {
        let a = pol("a", "x.io/r", 10, &[]);
        let b = pol("b", "x.io/r", 10, &[]);
        let all = [a.clone(), b.clone()];
        assert_eq!(
            older_claimant(&b, &all, &AgentDefaults::default()).map(|p| p.name_any()),
            Some("a".into())
        );
        assert!(older_claimant(&a, &all, &AgentDefaults::default()).is_none());
        let mut gone = a.clone();
        gone.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(30).unwrap()));
        assert!(older_claimant(&b, &[gone, b.clone()], &AgentDefaults::default()).is_none());
    }

    /// A (zone=a), B (every node, newer), C (zone=b, newest): B loses to A,
    /// so B serves nothing and cannot make C lose; zone b is served by C.
    #[test]
    fn only_policies_that_serve_take_nodes() {
        let a = pol("a", "x.io/r", 10, &[("zone", "a")]);
        let b = pol("b", "x.io/r", 20, &[]);
        let c = pol("c", "x.io/r", 30, &[("zone", "b")]);
        let all = [a.clone(), b.clone(), c.clone()];
        assert_eq!(
            older_claimant(&b, &all, &AgentDefaults::default()).map(|p| p.name_any()),
            Some("a".into())
        );
        assert!(
            older_claimant(&c, &all, &AgentDefaults::default()).is_none(),
            "B lost, so C serves zone b"
        );
        // An invalid older policy serves nothing either.
        let mut bad = pol("bad", "x.io/r", 5, &[]);
        bad.spec.source.simulated = None;
        assert!(older_claimant(&c, &[bad, c.clone()], &AgentDefaults::default()).is_none());
    }

    /// Before: an older policy the operator refuses for its host mounts
    /// (outside the allow-list) still made a newer one lose, so nobody
    /// served the resource.
    #[test]
    fn a_policy_refused_for_its_host_mounts_takes_no_node() {
        let mut old = pol("old", "x.io/r", 10, &[]);
        old.spec.allocate.mounts = vec![devplug_api::MountSpec {
            host_path: "/etc".into(),
            container_path: "/host-etc".into(),
            read_only: true,
        }];
        let new = pol("new", "x.io/r", 20, &[]);
        let all = [old.clone(), new.clone()];
        let strict = AgentDefaults {
            allowed_host_paths: Some(vec!["/dev:ro".parse().unwrap()]),
            ..AgentDefaults::default()
        };
        assert!(older_claimant(&new, &all, &strict).is_none());
        // Without an allow-list the older policy serves, and wins.
        assert_eq!(
            older_claimant(&new, &all, &AgentDefaults::default()).map(|p| p.name_any()),
            Some("old".into())
        );
    }

    #[test]
    fn selector_overlap() {
        let m = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(may_overlap(&m(&[]), &m(&[("a", "1")])));
        assert!(may_overlap(&m(&[("a", "1")]), &m(&[("b", "2")])));
        assert!(!may_overlap(&m(&[("a", "1")]), &m(&[("a", "2")])));
    }

    #[test]
    fn a_conflict_across_kubelet_apis_says_so() {
        let a = pol("a", "example.com/x", 1, &[]);
        let mut b = pol("b", "example.com/x", 2, &[]);
        assert_eq!(describe_winner(&b, &a), "a");
        b.spec.kubelet_api = devplug_api::KubeletApi::Dra;
        let d = describe_winner(&b, &a);
        assert!(d.starts_with("a (through the device plugin API;"), "{d}");
        assert!(
            d.contains("both through the device plugin API and DRA"),
            "{d}"
        );
    }
}
