//! Cluster mode: one policy followed through the API server. Only the spec
//! the operator approved is served; a spec that fails to start leaves the
//! last good one serving and is retried with backoff. The kubelet keeps
//! running containers' devices across a restart of the plugin, and if the
//! API server goes away the plugin simply keeps serving the last spec.

use std::time::Duration;

use devplug_api::{DevicePluginPolicy, DevicePluginPolicySpec};
use futures::StreamExt;
use tokio::signal::unix::Signal;
use tracing::{error, info, warn};

use crate::error::AgentError;
use crate::plugin::{Host, Plugin};

/// First and longest wait before serving a spec that failed to start again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The parts of a spec the agent serves from; the rest (placement, agent
/// image) is the operator's business and needs no plugin restart.
fn serving_part_changed(a: &DevicePluginPolicySpec, b: &DevicePluginPolicySpec) -> bool {
    a.resource_name != b.resource_name
        || a.kubelet_api != b.kubelet_api
        || a.source != b.source
        || a.sharing != b.sharing
        || a.allocate != b.allocate
        || a.pre_start != b.pre_start
        || a.health != b.health
}

/// Watches one policy and keeps its plugin in step with the spec, until
/// SIGTERM or SIGINT.
pub(crate) async fn follow_policy(
    node: &Host,
    name: &str,
    allowed_host_paths: Option<&[devplug_api::allow::AllowedHostPath]>,
    running: &mut Vec<Plugin>,
    sigterm: &mut Signal,
    sigint: &mut Signal,
) -> Result<(), AgentError> {
    use kube::runtime::{WatchStreamExt, watcher};
    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::Kube)?;
    let api: kube::Api<DevicePluginPolicy> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut policies = watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    info!(policy = %name, "cluster mode: watching the policy");
    // The newest valid spec not served yet, and when to try it next: a
    // failed start keeps the last good spec serving and is retried.
    let mut wanted: Option<DevicePluginPolicy> = None;
    let mut retry_at = tokio::time::Instant::now();
    let mut backoff = crate::retry::Retry::new(RETRY_MIN, RETRY_MAX);
    loop {
        if let Some(policy) = wanted.take_if(|_| tokio::time::Instant::now() >= retry_at) {
            match node.update(running, &policy).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    error!(policy = %name, error = %e, retry_in = ?wait, serving_last_good = !running.is_empty(), "cannot serve the new spec");
                    retry_at = tokio::time::Instant::now() + wait;
                    wanted = Some(policy);
                }
            }
            continue;
        }
        let next = tokio::select! {
            _ = crate::run::terminated(sigterm, sigint) => return Ok(()),
            next = policies.next() => next,
            _ = tokio::time::sleep_until(retry_at), if wanted.is_some() => continue,
        };
        let policy = match next {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                // The watcher retries with backoff; the plugin keeps serving.
                warn!(policy = %name, error = %e, "policy watch interrupted; serving the last spec");
                continue;
            }
            None => return Ok(()),
        };
        // Only what the operator approved is served (status.approvedSpec):
        // an edit it has not judged, or refused, never reaches a workload.
        let policy = match policy.approved() {
            Ok(p) => p,
            Err(e) => {
                if running.is_empty() {
                    info!(policy = %name, reason = %e, "waiting for the operator to approve the spec");
                } else {
                    warn!(policy = %name, reason = %e, "serving the last approved spec");
                }
                continue;
            }
        };
        if let Err(e) = policy.spec.validate() {
            error!(policy = %name, error = %e, "invalid approved spec ignored; serving the last valid one");
            continue;
        }
        if let Some(why) = allowed_host_paths
            .and_then(|a| devplug_api::allow::host_path_violation(&policy.spec, a))
        {
            error!(policy = %name, error = %why, "approved spec outside this agent's allow-list ignored; serving the last valid one");
            continue;
        }
        if let Some(current) = running.first()
            && !serving_part_changed(&current.spec, &policy.spec)
        {
            // Back to what is served: a pending retry is moot.
            wanted = None;
            continue;
        }
        // A new spec is tried at once, whatever the backoff of the last.
        backoff.reset();
        retry_at = tokio::time::Instant::now();
        wanted = Some(policy);
    }
}
