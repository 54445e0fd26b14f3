//! A fake of the kubelet's PodResources service on a Unix socket.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devplug_proto::podresources::v1 as pr;
use pr::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
pub struct FakePodResources {
    pods: Arc<Mutex<Vec<pr::PodResources>>>,
    pub calls: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl PodResourcesLister for FakePodResources {
    async fn list(
        &self,
        _: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        *self.calls.lock().unwrap() += 1;
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: self.pods.lock().unwrap().clone(),
        }))
    }
    async fn get_allocatable_resources(
        &self,
        _: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Ok(Response::new(pr::AllocatableResourcesResponse::default()))
    }
    async fn get(
        &self,
        r: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        let r = r.into_inner();
        let pod = self
            .pods
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace)
            .cloned();
        match pod {
            Some(p) => Ok(Response::new(pr::GetPodResourcesResponse {
                pod_resources: Some(p),
            })),
            None => Err(Status::not_found("no such pod")),
        }
    }
}

impl FakePodResources {
    /// Serves on `path` until the returned handle is aborted.
    pub fn start(path: &Path) -> (Self, tokio::task::JoinHandle<()>) {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let svc = FakePodResources::default();
        let s = svc.clone();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(s))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        (svc, task)
    }

    /// A pod whose container holds `ids` of `resource`.
    pub fn hold(&self, ns: &str, pod: &str, container: &str, resource: &str, ids: &[&str]) {
        self.pods.lock().unwrap().push(pr::PodResources {
            name: pod.into(),
            namespace: ns.into(),
            containers: vec![pr::ContainerResources {
                name: container.into(),
                devices: vec![pr::ContainerDevices {
                    resource_name: resource.into(),
                    device_ids: ids.iter().map(|s| s.to_string()).collect(),
                    topology: None,
                }],
                ..Default::default()
            }],
        });
    }

    /// All pods gone.
    pub fn clear(&self) {
        self.pods.lock().unwrap().clear();
    }
}
