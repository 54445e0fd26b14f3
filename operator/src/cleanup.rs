//! `devplug-operator cleanup`: what the chart's pre-delete hook runs when
//! `helm uninstall` starts, while the operator still runs. It deletes every
//! DevicePluginPolicy and waits, within a deadline, until the operator has
//! released them all (its finalizer: agents gone, NodeDeviceStatus entries
//! and node labels removed, ResourceSlices and DeviceClasses deleted). Then
//! helm removes the operator, and nothing it made is left behind.
//!
//! Without it, `helm uninstall` before the policies left the finalizers with
//! nobody to serve them: deleting the policies or the CRDs hung, agent
//! DaemonSets kept running and ResourceSlices stayed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use devplug_api::{DevicePluginPolicy, ResourceExt};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};

/// How often progress is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the policies are listed again while waiting.
const POLL: Duration = Duration::from_millis(500);

/// Why the cleanup did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// No API access.
    #[error("cannot reach the API server: {0}")]
    Client(#[source] kube::Error),
    /// An API call failed.
    #[error("{what}: {}", crate::error::describe(source))]
    Api {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The deadline passed with policies left.
    #[error(
        "after {0:?}, {1} policy(ies) are not cleaned up yet: {2}. Is the operator running (kubectl -n <namespace> get pods)? \
         To uninstall anyway: helm uninstall --no-hooks, then remove the finalizers: \
         kubectl patch dpp NAME --type=merge -p '{{\"metadata\":{{\"finalizers\":[]}}}}'"
    )]
    Timeout(Duration, usize, String),
}

/// What each remaining policy waits for, in words.
fn waiting_for(items: &[DevicePluginPolicy]) -> String {
    let mut by: BTreeMap<String, String> = BTreeMap::new();
    for p in items {
        let why = p
            .status
            .as_ref()
            .and_then(|s| {
                devplug_api::conditions::get(&s.conditions, devplug_api::conditions::types::READY)
            })
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_default();
        let fins = p.finalizers().join(",");
        by.insert(
            p.name_any(),
            format!(
                "finalizers [{fins}]{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(", {why}")
                }
            ),
        );
    }
    by.into_iter()
        .map(|(n, w)| format!("{n} ({w})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Deletes every policy and waits until all are gone, at most `timeout`.
pub async fn run(timeout: Duration) -> Result<(), CleanupError> {
    let client = Client::try_default().await.map_err(CleanupError::Client)?;
    run_with(client, timeout).await
}

/// [`run`] with a given client (tests).
pub async fn run_with(client: Client, timeout: Duration) -> Result<(), CleanupError> {
    let start = Instant::now();
    let api: Api<DevicePluginPolicy> = Api::all(client);
    let list = |what: &'static str| {
        let api = api.clone();
        async move {
            match api.list(&ListParams::default()).await {
                Ok(l) => Ok(Some(l.items)),
                // The CRDs were deleted first: no policy can exist.
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                Err(source) => Err(CleanupError::Api {
                    what: what.into(),
                    source,
                }),
            }
        }
    };
    let Some(items) = list("listing DevicePluginPolicies").await? else {
        println!("no DevicePluginPolicy resource (the CRDs are gone): nothing to clean up");
        return Ok(());
    };
    let total = items.len();
    if total == 0 {
        println!("no DevicePluginPolicy: nothing to clean up");
        return Ok(());
    }
    for p in &items {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = p.name_any();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => println!("deleting DevicePluginPolicy {name}"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(CleanupError::Api {
                    what: format!("deleting DevicePluginPolicy {name}"),
                    source,
                });
            }
        }
    }
    let mut told = Instant::now();
    loop {
        let left = list("listing DevicePluginPolicies")
            .await?
            .unwrap_or_default();
        if left.is_empty() {
            println!(
                "all {total} DevicePluginPolicy(ies) cleaned up in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(CleanupError::Timeout(
                timeout,
                left.len(),
                waiting_for(&left),
            ));
        }
        if told.elapsed() >= PROGRESS_EVERY {
            println!(
                "{:.0} s: waiting for {} of {total}: {}",
                start.elapsed().as_secs_f64(),
                left.len(),
                waiting_for(&left)
            );
            told = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}
