//! The `v1beta1.DevicePlugin` gRPC service of one policy.

use std::pin::Pin;
use std::sync::Arc;

use devplug_proto::deviceplugin::v1beta1 as dp;
use devplug_proto::deviceplugin::v1beta1::device_plugin_server::DevicePlugin;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::config::PluginConfig;
use crate::deviceplugin::allocate::{self, RequestError};
use crate::deviceplugin::prestart;
use crate::plugin::PluginState;

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct PluginService(pub Arc<PluginState>);

fn invalid(e: RequestError) -> Status {
    Status::invalid_argument(e.to_string())
}

type ListStream = Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    type ListAndWatchStream = ListStream;

    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(options(&self.0.cfg())))
    }

    async fn list_and_watch(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let guard = self.0.streams.open();
        let policy = self.0.cfg().name.clone();
        info!(%policy, active = self.0.streams.active(), "ListAndWatch stream opened");
        // One forwarding task per stream: it sends the current list, then
        // every new one, and ends when the client goes away (the receiver is
        // dropped) or on shutdown.
        let (tx, rx) = mpsc::channel(1);
        let mut snapshots = self.0.snapshots.clone();
        let mut shutdown = self.0.shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let list = snapshots.borrow_and_update().list.clone();
                if tx.send(Ok(list)).await.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = crate::stopped(&mut shutdown) => break,
                    changed = snapshots.changed() => if changed.is_err() { break },
                }
            }
            debug!(%policy, "ListAndWatch stream ended");
        });
        let stream = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let snap = self.0.snapshots.borrow().clone();
        let cfg = self.0.cfg();
        let mut out = Vec::new();
        for c in &req.get_ref().container_requests {
            let ids = allocate::preferred(&cfg, &snap, c);
            out.push(dp::ContainerPreferredAllocationResponse::with_ids(ids));
        }
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses: out,
        }))
    }

    async fn allocate(
        &self,
        req: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let start = std::time::Instant::now();
        let snap = self.0.snapshots.borrow().clone();
        let cfg = self.0.cfg();
        let result = allocate::allocate(&cfg, &snap, req.get_ref());
        self.0
            .metrics
            .allocated(&cfg.resource_name, result.is_ok(), start.elapsed());
        match result {
            Ok(r) => {
                debug!(policy = %cfg.name, containers = r.container_responses.len(), "allocated");
                // A new allocation will show in PodResources shortly.
                self.0.kick.notify_one();
                Ok(Response::new(r))
            }
            Err(e) => {
                warn!(policy = %cfg.name, error = %e, "Allocate refused");
                Err(invalid(e))
            }
        }
    }

    async fn pre_start_container(
        &self,
        req: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        let cfg = self.0.cfg();
        let Some((command, timeout)) = &cfg.pre_start else {
            return Ok(Response::new(dp::PreStartContainerResponse {}));
        };
        let snap = self.0.snapshots.borrow().clone();
        let ids =
            allocate::prestart_ids(&cfg, &snap, req.get_ref().device_ids()).map_err(invalid)?;
        prestart::run(command, &ids, *timeout).await.map_err(|e| {
            warn!(policy = %cfg.name, error = %e, "preStart failed");
            Status::internal(e.to_string())
        })?;
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

/// The options we register with and answer GetDevicePluginOptions with.
pub fn options(cfg: &PluginConfig) -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: cfg.pre_start.is_some(),
        get_preferred_allocation_available: true,
    }
}
