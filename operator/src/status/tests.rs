use super::*;
use devplug_api::conditions::{get, is_true};
use k8s_openapi::api::apps::v1::DaemonSetStatus;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn p() -> DevicePluginPolicy {
    let mut p = devplug_api::policies_from_yaml(
        "apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {name: foo, generation: 4}\nspec:\n  resourceName: example.com/foo\n  source: {simulated: {count: 1}}\n",
    )
    .unwrap()
    .remove(0);
    p.metadata.generation = Some(4);
    p
}

fn ds(generation: i64, observed: i64, desired: i32, ready: i32, updated: i32) -> DaemonSet {
    DaemonSet {
        metadata: ObjectMeta {
            generation: Some(generation),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(DaemonSetStatus {
            desired_number_scheduled: desired,
            number_ready: ready,
            updated_number_scheduled: Some(updated),
            observed_generation: Some(observed),
            ..DaemonSetStatus::default()
        }),
    }
}

fn now() -> Timestamp {
    Timestamp::from_second(100).unwrap()
}

#[test]
fn ready_only_when_all_nodes_ready_and_updated() {
    let seen = |d| Observed {
        daemonset: Some(d),
        ..Observed::default()
    };
    let s = compute(&p(), &seen(ds(2, 2, 3, 3, 3)), now());
    assert!(is_true(&s.conditions, types::READY));
    assert!(!is_true(&s.conditions, types::PROGRESSING));
    assert_eq!(s.observed_generation, Some(4));
    assert_eq!(s.nodes_ready.as_deref(), Some("3/3"));
    let s = compute(&p(), &seen(ds(2, 2, 3, 3, 2)), now());
    assert!(!is_true(&s.conditions, types::READY));
    assert!(is_true(&s.conditions, types::PROGRESSING));
    let s = compute(&p(), &seen(ds(3, 2, 3, 3, 3)), now());
    assert!(
        is_true(&s.conditions, types::PROGRESSING),
        "DaemonSet controller has not seen the new spec"
    );
    let s = compute(&p(), &seen(ds(1, 1, 0, 0, 0)), now());
    assert_eq!(
        get(&s.conditions, types::READY).unwrap().reason,
        "NoMatchingNodes"
    );
}

#[test]
fn conflict_and_invalid_override_everything() {
    let s = compute(
        &p(),
        &Observed {
            conflict_with: Some("older".into()),
            ..Observed::default()
        },
        now(),
    );
    assert!(is_true(&s.conditions, types::CONFLICT));
    assert_eq!(get(&s.conditions, types::READY).unwrap().reason, "Conflict");
    let s = compute(
        &p(),
        &Observed {
            invalid: Some("spec.x: bad".into()),
            ..Observed::default()
        },
        now(),
    );
    assert_eq!(
        get(&s.conditions, types::DEGRADED).unwrap().reason,
        "InvalidSpec"
    );
}

fn pod(name: &str, waiting: Option<&str>, unschedulable: bool) -> AgentPod {
    AgentPod::from(Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: (!unschedulable).then(|| "n1".to_string()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            conditions: unschedulable.then(|| {
                vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some("0/3 nodes are available: insufficient memory".into()),
                    ..PodCondition::default()
                }]
            }),
            container_statuses: waiting.map(|w| {
                vec![ContainerStatus {
                    name: "agent".into(),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(w.into()),
                            message: None,
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]
            }),
            ..PodStatus::default()
        }),
    })
}

#[test]
fn stuck_pods_are_named_with_their_reason() {
    let pods = vec![
        pod("a", Some("CrashLoopBackOff"), false),
        pod("b", Some("ContainerCreating"), false),
        pod("c", None, true),
        pod("d", Some("ImagePullBackOff"), false),
    ];
    let lines = pod_problems(&pods);
    assert_eq!(
        lines,
        vec![
            "a on n1: CrashLoopBackOff",
            "c: unschedulable: 0/3 nodes are available: insufficient memory",
            "d on n1: ImagePullBackOff",
        ]
    );
    let s = compute(
        &p(),
        &Observed {
            daemonset: Some(ds(1, 1, 3, 1, 3)),
            pod_problems: lines,
            ..Observed::default()
        },
        now(),
    );
    let c = get(&s.conditions, types::DEGRADED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "AgentsFailing")
    );
    let only_unsched = compute(
        &p(),
        &Observed {
            daemonset: Some(ds(1, 1, 1, 0, 1)),
            pod_problems: pod_problems(&[pod("c", None, true)]),
            ..Observed::default()
        },
        now(),
    );
    assert_eq!(
        get(&only_unsched.conditions, types::DEGRADED)
            .unwrap()
            .reason,
        "AgentsUnschedulable"
    );
}

#[test]
fn recomputing_the_same_state_changes_nothing() {
    let seen = Observed {
        daemonset: Some(ds(1, 1, 2, 2, 2)),
        ..Observed::default()
    };
    let mut pol = p();
    pol.status = Some(compute(&pol, &seen, now()));
    let again = compute(&pol, &seen, Timestamp::from_second(999).unwrap());
    assert_eq!(
        pol.status.as_ref(),
        Some(&again),
        "no write when nothing changed"
    );
}
