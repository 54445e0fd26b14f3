//! The operator's errors.

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a Kubernetes object failed.
    #[error("{action} {kind} {name}: {}", describe(source))]
    Kube {
        /// get, apply, delete, list.
        action: &'static str,
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// An object could not be serialized (a bug, not bad input).
    #[error("serializing {0}: {1}")]
    Serialize(&'static str, #[source] serde_json::Error),
}

/// What a user reads in a condition or an Event: the API server's own
/// message once (never a debug dump of the Status), and what to do where
/// the cause is known.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let mut msg = s.message.clone();
            if msg.is_empty() {
                msg = format!("{} ({})", s.reason, s.code);
            }
            let hint = match s.code {
                403 => Some(
                    "the operator's RBAC does not allow this: compare the chart's devplug-operator ClusterRole and Role with the verb named above",
                ),
                409 => Some("another writer changed the object; it is retried"),
                422 => Some(
                    "the API server refused the object; check the CRDs match this operator version",
                ),
                _ => None,
            };
            match hint {
                Some(h) => format!("{msg} ({h})"),
                None => msg,
            }
        }
        other => other.to_string(),
    }
}

/// Maps a kube error to [`Error::Kube`] naming what was being done to what.
pub fn kube_err<'a>(
    action: &'static str,
    kind: &'static str,
    name: &'a str,
) -> impl FnOnce(kube::Error) -> Error + 'a {
    move |source| Error::Kube {
        action,
        kind,
        name: name.to_string(),
        source,
    }
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube {
                action: "apply", ..
            } => "apply",
            Error::Kube {
                action: "delete", ..
            } => "delete",
            Error::Kube { .. } => "read",
            Error::Serialize(..) => "serialize",
        }
    }
}

/// Result of the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_as_the_server_said_with_a_hint_and_no_debug_dump() {
        let status = kube::core::Status::failure(
            "serviceaccounts \"devplug-agent-x\" is forbidden: User \"system:serviceaccount:devplug-system:devplug-operator\" cannot create resource \"serviceaccounts\"",
            "Forbidden",
        )
        .with_code(403);
        let e = kube_err("apply", "ServiceAccount", "devplug-agent-x")(kube::Error::Api(Box::new(
            status,
        )));
        let text = e.to_string();
        assert!(
            text.starts_with("apply ServiceAccount devplug-agent-x: serviceaccounts"),
            "{text}"
        );
        assert!(text.contains("cannot create resource"), "{text}");
        assert!(text.contains("RBAC"), "{text}");
        assert!(!text.contains("Status {"), "debug dump in {text}");
        assert!(!text.contains("ListMeta"), "debug dump in {text}");
    }
}
