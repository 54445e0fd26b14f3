//! The kubelet's gRPC contracts, compiled from `proto/` at build time.
//!
//! - [`deviceplugin::v1beta1`]: `Registration` (served by the kubelet) and
//!   `DevicePlugin` (served by us).
//! - [`podresources::v1`]: `PodResourcesLister` (served by the kubelet).
//! - [`pluginregistration`]: `Registration` of the kubelet's plugin watcher
//!   (served by us, for DRA).
//! - [`dra::v1`], [`dra::v1beta1`]: `DRAPlugin` (served by us; the kubelet
//!   picks the newest version both sides speak).
//! - [`drahealth::v1alpha1`]: `DRAResourceHealth` (served by us).
//!
//! prost derives Rust names from the proto field names, which upstream spells
//! inconsistently (`devices_ids`, `deviceIDs`, `NUMANode`). The small helper
//! constructors at the bottom of this file give the rest of the code names a
//! reader expects; the wire format is untouched.

pub mod deviceplugin {
    pub mod v1beta1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("v1beta1");

        /// API version string the kubelet expects in `RegisterRequest.version`.
        pub const VERSION: &str = "v1beta1";
        /// Health value the kubelet counts as allocatable.
        pub const HEALTHY: &str = "Healthy";
        /// Health value the kubelet removes from allocatable.
        pub const UNHEALTHY: &str = "Unhealthy";
        /// The kubelet's registration socket, inside the plugin directory.
        pub const KUBELET_SOCKET: &str = "kubelet.sock";
        /// Default plugin directory of a stock kubelet.
        pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
    }
}

pub mod podresources {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("v1");

        /// Default pod-resources socket of a stock kubelet.
        pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
    }
}

/// The plugin watcher's registration API (upstream package
/// `pluginregistration`, version v1).
pub mod pluginregistration {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("pluginregistration");

    /// `PluginInfo.type` of a DRA driver.
    pub const DRA_PLUGIN: &str = "DRAPlugin";
    /// The plugin watcher's directory under the kubelet root.
    pub const REGISTRY_DIR: &str = "plugins_registry";
}

/// The DRA kubelet plugin API.
pub mod dra {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");

        /// How a registration names this service in `supported_versions`.
        pub const SERVICE: &str = "v1.DRAPlugin";
    }
    pub mod v1beta1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");

        /// How a registration names this service in `supported_versions`.
        pub const SERVICE: &str = "v1beta1.DRAPlugin";
    }
}

/// The DRA device health API.
pub mod drahealth {
    pub mod v1alpha1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("v1alpha1");

        /// How a registration names this service in `supported_versions`.
        pub const SERVICE: &str = "v1alpha1.DRAResourceHealth";
    }
}

use deviceplugin::v1beta1 as dp;

impl dp::ContainerAllocateRequest {
    /// The requested device IDs (`devices_ids` on the wire).
    pub fn device_ids(&self) -> &[String] {
        &self.devices_ids
    }
}

impl dp::PreStartContainerRequest {
    /// The device IDs of the container about to start.
    pub fn device_ids(&self) -> &[String] {
        &self.devices_ids
    }
}

impl dp::ContainerPreferredAllocationRequest {
    /// IDs the kubelet may choose from.
    pub fn available(&self) -> &[String] {
        &self.available_device_i_ds
    }
    /// IDs the answer must contain.
    pub fn must_include(&self) -> &[String] {
        &self.must_include_device_i_ds
    }
}

impl dp::ContainerPreferredAllocationResponse {
    /// Builds a response from the chosen IDs.
    pub fn with_ids(ids: Vec<String>) -> Self {
        Self { device_i_ds: ids }
    }
    /// The chosen IDs.
    pub fn device_ids(&self) -> &[String] {
        &self.device_i_ds
    }
}

impl dp::TopologyInfo {
    /// Topology naming a single NUMA node.
    pub fn numa(node: i64) -> Self {
        Self {
            nodes: vec![dp::NumaNode { id: node }],
        }
    }
}

#[cfg(test)]
mod tests {
    //! Golden-byte tests: they pin field numbers and wire types, so an edit to
    //! a `.proto` that would break the real kubelet fails here.
    use super::deviceplugin::v1beta1 as dp;
    use super::podresources::v1 as pr;
    use prost::Message;

    #[test]
    fn register_request_wire_format() {
        let req = dp::RegisterRequest {
            version: "v1beta1".into(),
            endpoint: "a.sock".into(),
            resource_name: "x/y".into(),
            options: Some(dp::DevicePluginOptions {
                pre_start_required: true,
                get_preferred_allocation_available: true,
            }),
        };
        let mut want = vec![0x0a, 7];
        want.extend_from_slice(b"v1beta1");
        want.extend_from_slice(&[0x12, 6]);
        want.extend_from_slice(b"a.sock");
        want.extend_from_slice(&[0x1a, 3]);
        want.extend_from_slice(b"x/y");
        // options = field 4, length 4: {1: true, 2: true}
        want.extend_from_slice(&[0x22, 4, 0x08, 1, 0x10, 1]);
        assert_eq!(req.encode_to_vec(), want);
    }

    #[test]
    fn device_with_topology_wire_format() {
        let d = dp::Device {
            id: "d0".into(),
            health: "Healthy".into(),
            topology: Some(dp::TopologyInfo::numa(1)),
        };
        let mut want = vec![0x0a, 2];
        want.extend_from_slice(b"d0");
        want.extend_from_slice(&[0x12, 7]);
        want.extend_from_slice(b"Healthy");
        // topology = field 3 { nodes = field 1 { ID = field 1 varint 1 } }
        want.extend_from_slice(&[0x1a, 4, 0x0a, 2, 0x08, 1]);
        assert_eq!(d.encode_to_vec(), want);
    }

    #[test]
    fn container_allocate_response_field_numbers() {
        let r = dp::ContainerAllocateResponse {
            envs: [("K".to_string(), "V".to_string())].into(),
            mounts: vec![dp::Mount {
                container_path: "c".into(),
                host_path: "h".into(),
                read_only: true,
            }],
            devices: vec![dp::DeviceSpec {
                container_path: "c".into(),
                host_path: "h".into(),
                permissions: "rw".into(),
            }],
            annotations: [("a".to_string(), "b".to_string())].into(),
            cdi_devices: vec![dp::CdiDevice {
                name: "v/c=n".into(),
            }],
        };
        let bytes = r.encode_to_vec();
        let tags: Vec<u8> = walk_top_level_tags(&bytes);
        // envs=1, mounts=2, devices=3, annotations=4, cdi_devices=5, all length-delimited
        assert_eq!(tags, vec![0x0a, 0x12, 0x1a, 0x22, 0x2a]);
        let back = dp::ContainerAllocateResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn preferred_allocation_request_field_numbers() {
        let r = dp::ContainerPreferredAllocationRequest {
            available_device_i_ds: vec!["a".into()],
            must_include_device_i_ds: vec!["b".into()],
            allocation_size: 2,
        };
        assert_eq!(
            r.encode_to_vec(),
            vec![0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 2]
        );
    }

    #[test]
    fn pod_resources_wire_format() {
        let p = pr::ContainerDevices {
            resource_name: "r".into(),
            device_ids: vec!["d".into()],
            topology: Some(pr::TopologyInfo {
                nodes: vec![pr::NumaNode { id: 0 }],
            }),
        };
        assert_eq!(
            p.encode_to_vec(),
            vec![0x0a, 1, b'r', 0x12, 1, b'd', 0x1a, 2, 0x0a, 0]
        );
        let dr = pr::DynamicResource {
            claim_name: "c".into(),
            claim_namespace: "n".into(),
            claim_resources: vec![],
        };
        // claim_name is field 2: field 1 is reserved upstream.
        assert_eq!(dr.encode_to_vec(), vec![0x12, 1, b'c', 0x1a, 1, b'n']);
        let g = pr::GetPodResourcesRequest {
            pod_name: "p".into(),
            pod_namespace: "ns".into(),
        };
        assert_eq!(g.encode_to_vec(), vec![0x0a, 1, b'p', 0x12, 2, b'n', b's']);
    }

    #[test]
    fn grpc_paths_match_upstream_packages() {
        use super::deviceplugin::v1beta1::{
            device_plugin_server::DevicePluginServer, registration_server::RegistrationServer,
        };
        use super::podresources::v1::pod_resources_lister_server::PodResourcesListerServer;
        use tonic::server::NamedService;
        assert_eq!(
            <RegistrationServer<()> as NamedService>::NAME,
            "v1beta1.Registration"
        );
        assert_eq!(
            <DevicePluginServer<()> as NamedService>::NAME,
            "v1beta1.DevicePlugin"
        );
        assert_eq!(
            <PodResourcesListerServer<()> as NamedService>::NAME,
            "v1.PodResourcesLister"
        );
    }

    #[test]
    fn dra_wire_format() {
        use super::dra::{v1, v1beta1};
        let d = v1::Device {
            request_names: vec!["r".into()],
            pool_name: "p".into(),
            device_name: "d".into(),
            cdi_device_ids: vec!["c".into()],
        };
        let golden = vec![0x0a, 1, b'r', 0x12, 1, b'p', 0x1a, 1, b'd', 0x22, 1, b'c'];
        assert_eq!(d.encode_to_vec(), golden);
        let d1b = v1beta1::Device {
            request_names: vec!["r".into()],
            pool_name: "p".into(),
            device_name: "d".into(),
            cdi_device_ids: vec!["c".into()],
        };
        assert_eq!(d1b.encode_to_vec(), golden);
        let c = v1::Claim {
            namespace: "n".into(),
            uid: "u".into(),
            name: "c".into(),
        };
        assert_eq!(
            c.encode_to_vec(),
            vec![0x0a, 1, b'n', 0x12, 1, b'u', 0x1a, 1, b'c']
        );
        let r = v1::NodePrepareResourceResponse {
            devices: vec![],
            error: "e".into(),
        };
        assert_eq!(r.encode_to_vec(), vec![0x12, 1, b'e']);
        // The answer is a map keyed by claim UID: field 1, entries of
        // (key=1, value=2).
        let mut resp = v1::NodePrepareResourcesResponse::default();
        resp.claims.insert("u".into(), r);
        assert_eq!(
            resp.encode_to_vec(),
            vec![0x0a, 8, 0x0a, 1, b'u', 0x12, 3, 0x12, 1, b'e']
        );
        let u = v1::NodeUnprepareResourceResponse { error: "e".into() };
        assert_eq!(u.encode_to_vec(), vec![0x0a, 1, b'e']);
    }

    #[test]
    fn plugin_registration_wire_format() {
        use super::pluginregistration as reg;
        let i = reg::PluginInfo {
            r#type: "t".into(),
            name: "n".into(),
            endpoint: "e".into(),
            supported_versions: vec!["v".into()],
        };
        assert_eq!(
            i.encode_to_vec(),
            vec![0x0a, 1, b't', 0x12, 1, b'n', 0x1a, 1, b'e', 0x22, 1, b'v']
        );
        let s = reg::RegistrationStatus {
            plugin_registered: true,
            error: "x".into(),
        };
        assert_eq!(s.encode_to_vec(), vec![0x08, 1, 0x12, 1, b'x']);
    }

    #[test]
    fn dra_health_wire_format() {
        use super::drahealth::v1alpha1 as h;
        let d = h::DeviceHealth {
            device: Some(h::DeviceIdentifier {
                pool_name: "p".into(),
                device_name: "d".into(),
            }),
            health: h::HealthStatus::Unhealthy as i32,
            last_updated_time: 5,
            health_check_timeout_seconds: 7,
            message: "m".into(),
        };
        assert_eq!(
            d.encode_to_vec(),
            vec![
                0x0a, 6, 0x0a, 1, b'p', 0x12, 1, b'd', 0x10, 2, 0x18, 5, 0x20, 7, 0x2a, 1, b'm'
            ]
        );
        assert_eq!(h::HealthStatus::Unknown as i32, 0);
        assert_eq!(h::HealthStatus::Healthy as i32, 1);
    }

    #[test]
    fn dra_grpc_paths_match_upstream_packages() {
        use super::dra::{v1, v1beta1};
        use super::drahealth::v1alpha1;
        use super::pluginregistration::registration_server::RegistrationServer;
        use tonic::server::NamedService;
        assert_eq!(
            <RegistrationServer<()> as NamedService>::NAME,
            "pluginregistration.Registration"
        );
        assert_eq!(
            <v1::dra_plugin_server::DraPluginServer<()> as NamedService>::NAME,
            "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
        );
        assert_eq!(
            <v1beta1::dra_plugin_server::DraPluginServer<()> as NamedService>::NAME,
            "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
        );
        assert_eq!(
            <v1alpha1::dra_resource_health_server::DraResourceHealthServer<()> as NamedService>::NAME,
            "v1alpha1.DRAResourceHealth"
        );
    }

    /// Returns the tag byte of each top-level field (all fields here are
    /// length-delimited with single-byte lengths and tags).
    fn walk_top_level_tags(mut b: &[u8]) -> Vec<u8> {
        let mut tags = Vec::new();
        while !b.is_empty() {
            tags.push(b[0]);
            let len = b[1] as usize;
            b = &b[2 + len..];
        }
        tags
    }
}
