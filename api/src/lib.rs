//! devplug's API: the `DevicePluginPolicy` custom resource, the constants
//! both binaries share, and validation. No IO happens in this crate.

pub mod allow;
pub mod conditions;
pub mod crd;
pub mod node_status;
pub mod policy;
pub mod process;
pub mod topology;
pub mod validation;

pub use node_status::*;
pub use policy::*;
pub use validation::{
    FieldError, MAX_ADVERTISED_IDS, MAX_DOMAIN, MAX_PRESTART_SECONDS, ValidationErrors,
    validate_cdi_kind, validate_device_id, validate_resource_name,
};

/// API group of every devplug resource.
pub const GROUP: &str = "devplug.io";
/// API version of every devplug resource.
pub const VERSION: &str = "v1alpha1";

/// Field manager of the operator's server-side applies.
pub const OPERATOR_MANAGER: &str = "devplug-operator";
/// Label on every object the operator creates for a policy: the policy name.
pub const POLICY_LABEL: &str = "devplug.io/policy";
/// Annotation holding the hash of what a managed object was applied from;
/// equal hash means nothing to write.
pub const APPLIED_HASH_ANNOTATION: &str = "devplug.io/applied-hash";
/// Pod-template annotation: hash of the fields that need a new agent pod.
pub const POD_CONFIG_HASH_ANNOTATION: &str = "devplug.io/pod-config-hash";

pub use k8s_openapi;
pub use kube::core::{CustomResourceExt, Resource, ResourceExt};

/// Errors loading policies from YAML text.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The text is not YAML of the expected shape.
    #[error("document {index}: {source}")]
    Parse {
        /// 0-based index of the YAML document.
        index: usize,
        /// Parser error, with line and column.
        #[source]
        source: serde_yaml::Error,
    },
    /// A document is not a devplug.io/v1alpha1 DevicePluginPolicy.
    #[error(
        "document {index}: expected apiVersion devplug.io/v1alpha1 and kind DevicePluginPolicy, found {found}"
    )]
    WrongKind {
        /// 0-based index of the YAML document.
        index: usize,
        /// What the document declared.
        found: String,
    },
    /// A document has fields the API does not know (typos, misplaced keys).
    #[error("document {index}: {}", unknown.iter().map(|p| format!("unknown field `{}` (at {p})", p.rsplit('.').next().unwrap_or(p))).collect::<Vec<_>>().join(", "))]
    Unknown {
        /// 0-based index of the YAML document.
        index: usize,
        /// Paths of the unknown fields, e.g. `spec.replicas`.
        unknown: Vec<String>,
    },
    /// A policy has no metadata.name.
    #[error("document {index}: metadata.name is required")]
    Unnamed {
        /// 0-based index of the YAML document.
        index: usize,
    },
    /// A policy breaks the validation rules.
    #[error("policy {name:?}: {source}")]
    Invalid {
        /// Policy name.
        name: String,
        /// Every rule broken.
        #[source]
        source: ValidationErrors,
    },
    /// Two policies share a name or a resource name.
    #[error("policies {first:?} and {second:?} both claim {what}")]
    Duplicate {
        /// The earlier policy.
        first: String,
        /// The later policy.
        second: String,
        /// What they both claim.
        what: String,
    },
    /// The text held no policy at all.
    #[error("no DevicePluginPolicy documents found")]
    Empty,
}

/// Parses one or more `---`-separated policy documents (the YAML that
/// `kubectl apply` takes), validates each, and refuses duplicates.
pub fn policies_from_yaml(text: &str) -> Result<Vec<DevicePluginPolicy>, LoadError> {
    use serde::Deserialize;
    let mut out: Vec<DevicePluginPolicy> = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| LoadError::Parse { index, source })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if api_version != "devplug.io/v1alpha1" || kind != "DevicePluginPolicy" {
            return Err(LoadError::WrongKind {
                index,
                found: format!("apiVersion {api_version:?}, kind {kind:?}"),
            });
        }
        // The types accept unknown fields (for watches across versions); a
        // file a person wrote refuses them, as the API server does.
        let mut unknown = Vec::new();
        let policy: DevicePluginPolicy =
            serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
                .map_err(|source| LoadError::Parse { index, source })?;
        // apiVersion and kind were checked above; the derived type skips them.
        unknown.retain(|p| p != "apiVersion" && p != "kind");
        if !unknown.is_empty() {
            return Err(LoadError::Unknown { index, unknown });
        }
        let Some(name) = policy.metadata.name.clone() else {
            return Err(LoadError::Unnamed { index });
        };
        policy
            .spec
            .validate()
            .map_err(|source| LoadError::Invalid {
                name: name.clone(),
                source,
            })?;
        for other in &out {
            let other_name = other.metadata.name.clone().unwrap_or_default();
            if other_name == name {
                return Err(LoadError::Duplicate {
                    first: other_name,
                    second: name,
                    what: "the same metadata.name".into(),
                });
            }
            if other.spec.resource_name == policy.spec.resource_name {
                return Err(LoadError::Duplicate {
                    first: other_name,
                    second: name,
                    what: format!("resource {}", policy.spec.resource_name),
                });
            }
        }
        out.push(policy);
    }
    if out.is_empty() {
        return Err(LoadError::Empty);
    }
    Ok(out)
}

/// Default name of the environment variable listing allocated device IDs:
/// `DEVPLUG_` + the resource name upper-cased, non-alphanumerics as `_`.
pub fn default_ids_env(resource_name: &str) -> String {
    let mut s = String::from("DEVPLUG_");
    s.extend(resource_name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

#[cfg(test)]
mod schema_tests;
#[cfg(test)]
mod tests;
