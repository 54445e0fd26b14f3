//! `devplug-operator crds`: applies the CRDs this operator version was built
//! with (embedded from `crds/`). The chart runs it as a pre-upgrade hook,
//! because helm installs the CRDs of `crds/` once and never upgrades them:
//! without it, `helm upgrade` to a version with a new field left the old
//! schema in place, and the API server pruned the field from every write.

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};

/// The CRDs of this version, as `make crds` writes them.
pub const CRDS: &[(&str, &str)] = &[
    (
        "devicepluginpolicies.devplug.io",
        include_str!("../../crds/devplug.io_devicepluginpolicies.yaml"),
    ),
    (
        "nodedevicestatuses.devplug.io",
        include_str!("../../crds/devplug.io_nodedevicestatuses.yaml"),
    ),
];

/// Field manager of the applied CRDs.
pub const MANAGER: &str = "devplug-crds";

/// Why the CRDs could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// No API access.
    #[error("cannot reach the API server: {0}")]
    Client(#[source] kube::Error),
    /// An embedded CRD does not parse (a build defect).
    #[error("the embedded CRD {0} does not parse: {1}")]
    Parse(&'static str, #[source] serde_yaml::Error),
    /// The API server refused one.
    #[error("applying CRD {name}: {}", crate::error::describe(source))]
    Apply {
        /// The CRD.
        name: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

fn crd_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    )
}

/// Applies every embedded CRD (server-side apply, forced: the chart's own
/// install and `kubectl apply -f crds/` wrote the same fields).
pub async fn apply(client: Client) -> Result<(), CrdError> {
    let api: Api<DynamicObject> = Api::all_with(client, &crd_resource());
    let pp = PatchParams::apply(MANAGER).force();
    for (name, yaml) in CRDS {
        let obj: serde_json::Value =
            serde_yaml::from_str(yaml).map_err(|e| CrdError::Parse(name, e))?;
        api.patch(name, &pp, &Patch::Apply(&obj))
            .await
            .map_err(|source| CrdError::Apply { name, source })?;
        println!("applied CRD {name}");
    }
    Ok(())
}

/// [`apply`] with the in-cluster or KUBECONFIG client.
pub async fn run() -> Result<(), CrdError> {
    apply(Client::try_default().await.map_err(CrdError::Client)?).await
}
