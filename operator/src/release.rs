//! The operator's namespace: the Pod Security label agents need, and what an
//! uninstall that deletes the namespace before the policies leaves behind
//! (every policy released, the chart's cluster-scoped objects removed).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::{controller, error};

/// Puts the Pod Security level agents need on the operator's namespace.
/// Not fatal: without it agents may not be created, which their policies'
/// Degraded condition then says.
pub(crate) async fn label_namespace(client: &Client, namespace: &str, level: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = Namespace {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(namespace.to_string()),
            labels: Some([(POD_SECURITY_ENFORCE.to_string(), level.to_string())].into()),
            ..Default::default()
        },
        ..Namespace::default()
    };
    let params = kube::api::PatchParams::apply(devplug_api::OPERATOR_MANAGER);
    match api
        .patch(namespace, &params, &kube::api::Patch::Apply(&patch))
        .await
    {
        Ok(_) => info!(%namespace, %level, "namespace labelled for Pod Security"),
        Err(e) => {
            warn!(%namespace, error = %error::describe(&e), "cannot label the namespace for Pod Security; agents may be refused")
        }
    }
}

/// Watches the release namespace: once it is being deleted (an uninstall
/// that takes the operator away first), every policy is released and
/// cleaned up at once ([`controller::uninstall`]), before the namespace's
/// deletion reaches this process and its identity.
pub(crate) async fn watch_release_namespace(
    client: Client,
    namespace: String,
    ctx: Arc<controller::Context>,
    all: futures::channel::mpsc::UnboundedSender<()>,
) {
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let mut events = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={namespace}")),
    )
    .default_backoff()
    .applied_objects()
    .boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(ns) if ns.metadata.deletion_timestamp.is_some() => {
                if !ctx
                    .uninstalling
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    tracing::warn!(%namespace, "the release namespace is being deleted: releasing every policy and removing what lives outside the namespace (node labels, ResourceSlices, DeviceClasses, agent ClusterRoles)");
                    let _ = all.unbounded_send(());
                    remove_chart_cluster_objects(&ctx).await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "release namespace watch"),
        }
    }
}

/// The chart's cluster-scoped objects (fixed names). Helm keeps its
/// release record in the release namespace, so when that namespace is
/// deleted first nothing would ever remove these, and a new install would
/// be refused for objects it does not own.
pub const CHART_CLUSTER_OBJECTS: &[(&str, &str, &str, &str)] = &[
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "devplug-policy-allow-lists",
    ),
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "devplug-policy-allow-lists",
    ),
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "devplug-agent-own-node",
    ),
    (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "devplug-agent-own-node",
    ),
    (
        "flowcontrol.apiserver.k8s.io/v1",
        "FlowSchema",
        "flowschemas",
        "devplug-operator-leader-election",
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        "devplug-viewer",
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        "devplug-editor",
    ),
    // The operator's own identity last.
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "devplug-operator",
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        "devplug-operator",
    ),
];

/// Once every policy is released (or after a bounded wait), deletes the
/// chart's cluster-scoped objects ([`CHART_CLUSTER_OBJECTS`]).
async fn remove_chart_cluster_objects(ctx: &controller::Context) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let held = ctx
            .index
            .policies
            .state()
            .iter()
            .filter(|p| {
                kube::ResourceExt::finalizers(p.as_ref())
                    .iter()
                    .any(|f| f == controller::FINALIZER)
            })
            .count();
        if held == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (api_version, kind, plural, name) in CHART_CLUSTER_OBJECTS {
        if *kind == "ClusterRoleBinding" && *name == "devplug-operator" {
            // Deleting the binding would take the right to delete the role
            // with it (the role would be left), and
            // the role first would take the right to delete the binding:
            // the binding is handed to the role, whose deletion the garbage
            // collector carries to it.
            hand_binding_to_role(&ctx.client).await;
            continue;
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk(group, version, kind),
            plural,
        );
        let api: Api<kube::api::DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        match api.delete(name, &Default::default()).await {
            Ok(_) => info!(%kind, %name, "deleted the chart's cluster-scoped object"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                warn!(%kind, %name, error = %e, "cannot delete the chart's cluster-scoped object")
            }
        }
    }
}

/// Makes the ClusterRole `devplug-operator` the owner of the binding of the
/// same name, so deleting the role removes the binding too.
async fn hand_binding_to_role(client: &Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let role = match Api::<ClusterRole>::all(client.clone())
        .get("devplug-operator")
        .await
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the operator's ClusterRole");
            return;
        }
    };
    let Some(uid) = role.metadata.uid else { return };
    let patch = serde_json::json!({"metadata": {"ownerReferences": [{
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "name": "devplug-operator", "uid": uid,
    }]}});
    match Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "devplug-operator",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => info!("the operator's ClusterRoleBinding goes with its ClusterRole"),
        Err(e) => {
            warn!(error = %e, "cannot hand the operator's ClusterRoleBinding to its ClusterRole")
        }
    }
}

/// The Pod Security admission label that sets the enforced level.
pub const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
