//! The tenant calls that carry quotas (`CreateTenant`, `UpdateTenant`): admin only, and
//! the quota overrides are checked and stored with the tenant.

use hookline_core::model::RegistryChange;
use hookline_core::quota::TenantQuotas;
use hookline_core::{Id, IdKind, validate};
use hookline_grpc::status::{from_store, from_validation};
use hookline_grpc::{convert, principal};
use hookline_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{RegistryApi, tenant_id};

/// Quotas given on `CreateTenant`/`UpdateTenant`, checked; `None` when not given.
fn tenant_quotas(given: Option<&pb::TenantQuotas>) -> Result<Option<TenantQuotas>, Status> {
    given
        .map(|q| convert::from_tenant_quotas("quotas", q))
        .transpose()
}

impl RegistryApi {
    pub(super) async fn create_tenant_call(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        principal(&req)?.require_admin("creating a tenant")?;
        let req = req.into_inner();
        validate::name("name", &req.name).map_err(from_validation)?;
        validate::metadata("metadata", &req.metadata).map_err(from_validation)?;
        let quotas = tenant_quotas(req.quotas.as_ref())?;
        let id = Id::new(IdKind::Tenant);
        let mut tenant = self
            .store
            .create_tenant(&id, &req.name, &req.metadata)
            .await
            .map_err(from_store)?;
        if let Some(quotas) = quotas.filter(|q| *q != TenantQuotas::default()) {
            tenant = match self.store.set_tenant_quotas(&id, &quotas).await {
                Ok(t) => t,
                Err(e) => {
                    // Nothing half-made: the tenant goes again (nobody can know its id yet).
                    if let Err(undo) = self.store.delete_tenant(&id).await {
                        tracing::error!(tenant_id = %id, error = %undo, "cannot remove a tenant whose quotas were not stored");
                    }
                    return Err(from_store(e));
                }
            };
        }
        self.announce(RegistryChange::Tenant { tenant_id: id })
            .await;
        Ok(Response::new(convert::tenant(tenant)))
    }

    pub(super) async fn update_tenant_call(
        &self,
        req: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        principal(&req)?.require_admin("changing a tenant")?;
        let req = req.into_inner();
        let id = tenant_id("tenant_id", &req.tenant_id)?;
        if let Some(name) = &req.name {
            validate::name("name", name).map_err(from_validation)?;
        }
        validate::metadata("metadata", &req.metadata).map_err(from_validation)?;
        let quotas = tenant_quotas(req.quotas.as_ref())?;
        let metadata = req.replace_metadata.then_some(&req.metadata);
        let mut tenant = self
            .store
            .update_tenant(&id, req.name.as_deref(), metadata)
            .await
            .map_err(from_store)?;
        if let Some(quotas) = quotas {
            tenant = self
                .store
                .set_tenant_quotas(&id, &quotas)
                .await
                .map_err(from_store)?;
        }
        self.announce(RegistryChange::Tenant { tenant_id: id })
            .await;
        Ok(Response::new(convert::tenant(tenant)))
    }
}
