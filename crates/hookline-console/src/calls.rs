//! Calls to this process's gRPC services, in process, as a principal the console has
//! admitted (a pasted key, by the gate's own `Authenticator::admit`, or a verified
//! portal link). The request carries the principal in its extensions, the gate's trusted
//! in-process path, so the gate's message limits and every handler's tenant checks and
//! rules apply; the console never decides what a principal may see.

use std::convert::Infallible;
use std::task::{Context, Poll};

use hookline_grpc::Principal;
use hookline_proto::v1 as pb;
use tonic::body::Body;
use tonic::service::Routes;

/// Rows shown per list page.
pub(crate) const PAGE_SIZE: u32 = 100;

/// This process's gRPC services (each behind its gate), called in process.
#[derive(Clone)]
pub(crate) struct Services {
    routes: Routes,
}

impl Services {
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }

    pub(crate) fn as_principal(&self, principal: Principal) -> Clients {
        let transport = AsPrincipal {
            routes: self.routes.clone(),
            principal,
        };
        Clients {
            registry: pb::registry_service_client::RegistryServiceClient::new(transport.clone())
                .max_decoding_message_size(usize::MAX),
            ingest: pb::ingest_service_client::IngestServiceClient::new(transport.clone())
                .max_decoding_message_size(usize::MAX),
            delivery: pb::delivery_service_client::DeliveryServiceClient::new(transport)
                .max_decoding_message_size(usize::MAX),
        }
    }
}

/// The three service clients, calling as one principal.
pub(crate) struct Clients {
    pub registry: pb::registry_service_client::RegistryServiceClient<AsPrincipal>,
    pub ingest: pb::ingest_service_client::IngestServiceClient<AsPrincipal>,
    pub delivery: pb::delivery_service_client::DeliveryServiceClient<AsPrincipal>,
}

impl Clients {
    /// The first page of tenants the caller may list.
    pub async fn tenants(&mut self) -> Result<Vec<pb::Tenant>, tonic::Status> {
        let req = pb::ListTenantsRequest {
            page_size: PAGE_SIZE,
            page_token: String::new(),
        };
        Ok(self.registry.list_tenants(req).await?.into_inner().tenants)
    }

    pub async fn tenant(&mut self, id: &str) -> Result<pb::Tenant, tonic::Status> {
        let req = pb::GetTenantRequest {
            tenant_id: id.to_string(),
        };
        Ok(self.registry.get_tenant(req).await?.into_inner())
    }

    pub async fn subscription(&mut self, id: &str) -> Result<pb::Subscription, tonic::Status> {
        let req = pb::GetSubscriptionRequest {
            subscription_id: id.to_string(),
        };
        Ok(self.registry.get_subscription(req).await?.into_inner())
    }
}

/// A transport that hands each request to the services with `principal` attached.
#[derive(Clone)]
pub(crate) struct AsPrincipal {
    routes: Routes,
    principal: Principal,
}

impl tower_service::Service<http::Request<Body>> for AsPrincipal {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = <Routes as tower_service::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower_service::Service::<http::Request<Body>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        req.extensions_mut().insert(self.principal.clone());
        self.routes.call(req)
    }
}
