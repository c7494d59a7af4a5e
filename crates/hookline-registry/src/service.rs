//! `hookline.v1.RegistryService`: validation, authorisation and change announcements
//! around the storage port.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hookline_broker::Broker;
use hookline_core::model::{RegistryChange, Subscription, SubscriptionSecret};
use hookline_core::quota::Quotas;
use hookline_core::{Id, IdKind, filter, validate};
use hookline_egress::Egress;
use hookline_grpc::auth::generate_token;
use hookline_grpc::status::{from_id, from_store, from_validation, invalid};
use hookline_grpc::{
    Authenticator, Gate, MessageLimits, Principal, convert, page_request, page_response, principal,
};
use hookline_proto::v1 as pb;
use hookline_proto::v1::registry_service_server::RegistryService;
use hookline_store::StoreError;
use hookline_store::port::{NewApiKey, RegistryStore};
use tonic::{Request, Response, Status};

use crate::fields::{schema_text, secret_or_generate};

mod security;
mod subscriptions;
mod tenants;
use crate::gate::TenantGate;

/// Default and longest grace period of a rotated-out secret.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The registry's gRPC service.
#[derive(Clone)]
pub struct RegistryApi {
    store: Arc<dyn RegistryStore>,
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    /// The quotas of tenants without their own.
    quotas: Quotas,
    /// Turns per tenant for subscription creates (see `gate`).
    creates: Arc<TenantGate>,
    egress: Egress,
}

impl RegistryApi {
    pub fn new(
        store: Arc<dyn RegistryStore>,
        broker: Arc<dyn Broker>,
        auth: Authenticator,
    ) -> Self {
        Self {
            store,
            broker,
            auth,
            quotas: Quotas::default(),
            creates: Arc::default(),
            egress: Egress::default(),
        }
    }

    /// Uses these quotas for tenants without their own (the default: [`Quotas::default`]).
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Checks subscription URLs against `egress` instead of the default policy (which
    /// refuses every address that is not globally routable unicast).
    pub fn with_egress(mut self, egress: Egress) -> Self {
        self.egress = egress;
        self
    }

    /// The egress policy's create-time check of a subscription URL: a literal address,
    /// or what its host name resolves to now (a name that does not resolve passes).
    async fn check_egress(&self, field: &str, url: &url::Url) -> Result<(), Status> {
        self.egress
            .check_url(url)
            .await
            .map_err(|e| invalid(field, e))
    }

    /// The service behind the gate, which authenticates every call before its body is read.
    pub fn into_server(self) -> Gate<pb::registry_service_server::RegistryServiceServer<Self>> {
        let auth = self.auth.clone();
        let server = pb::registry_service_server::RegistryServiceServer::new(self);
        Gate::new(server, auth, MessageLimits::default())
    }

    /// Tells the other services about a committed change. The change stands even if the
    /// announcement fails (the caller must not retry a committed create); caches also
    /// expire on their own, so a lost announcement delays, never loses, the change.
    async fn announce(&self, change: RegistryChange) {
        if let Err(e) = hookline_changes::announce(self.broker.as_ref(), &change).await {
            tracing::warn!(error = %e, ?change, "registry change not announced; caches will catch up when their entries expire");
        }
    }

    /// The subscription with `id`, if the caller may see it; otherwise `NOT_FOUND`.
    async fn visible_subscription(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Subscription, Status> {
        let id = Id::parse(IdKind::Subscription, "subscription_id", id).map_err(from_id)?;
        let sub = self.store.get_subscription(&id).await.map_err(from_store)?;
        principal.check_tenant(&sub.tenant_id, "subscription", id.as_str())?;
        Ok(sub)
    }
}

fn tenant_id(field: &str, value: &str) -> Result<Id, Status> {
    Id::parse(IdKind::Tenant, field, value).map_err(from_id)
}

/// The enabled subscriptions of a tenant that want an event of this type and channels.
pub async fn matching_subscriptions(
    store: &dyn RegistryStore,
    tenant_id: &Id,
    event_type: &str,
    channels: &[String],
) -> Result<Vec<Subscription>, StoreError> {
    let mut subs = store.enabled_subscriptions(tenant_id).await?;
    subs.retain(|s| filter::subscription_wants(&s.event_types, &s.channels, event_type, channels));
    Ok(subs)
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.create_tenant_call(req).await
    }

    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let principal = principal(&req)?;
        let id = tenant_id("tenant_id", &req.get_ref().tenant_id)?;
        principal.require_tenant(&id)?;
        let tenant = self.store.get_tenant(&id).await.map_err(from_store)?;
        Ok(Response::new(convert::tenant(tenant)))
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let page_req = page_request(req.page_size, &req.page_token)?;
        // A tenant key sees exactly its own tenant.
        if let Some(own) = principal.tenant() {
            let tenant = self.store.get_tenant(own).await.map_err(from_store)?;
            return Ok(Response::new(pb::ListTenantsResponse {
                tenants: vec![convert::tenant(tenant)],
                next_page_token: String::new(),
            }));
        }
        let page = self
            .store
            .list_tenants(&page_req)
            .await
            .map_err(from_store)?;
        let (tenants, next_page_token) = page_response(page, convert::tenant);
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        }))
    }

    async fn update_tenant(
        &self,
        req: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.update_tenant_call(req).await
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        principal(&req)?.require_admin("deleting a tenant")?;
        let id = tenant_id("tenant_id", &req.get_ref().tenant_id)?;
        self.store.delete_tenant(&id).await.map_err(from_store)?;
        self.announce(RegistryChange::Tenant { tenant_id: id })
            .await;
        Ok(Response::new(pb::DeleteTenantResponse {}))
    }

    async fn create_subscription(
        &self,
        req: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        self.create_subscription_call(req).await
    }

    async fn get_subscription(
        &self,
        req: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let principal = principal(&req)?;
        let sub = self
            .visible_subscription(&principal, &req.get_ref().subscription_id)
            .await?;
        let open_until = convert::circuit_open_until(self.store.as_ref(), &sub.id).await?;
        let mut shown = [convert::subscription(sub)];
        shown[0].circuit_open_until = open_until;
        security::decorate(self.store.as_ref(), &mut shown).await?;
        let [shown] = shown;
        Ok(Response::new(shown))
    }

    async fn list_subscriptions(
        &self,
        req: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let tenant = tenant_id("tenant_id", &req.tenant_id)?;
        principal.require_tenant(&tenant)?;
        let page_req = page_request(req.page_size, &req.page_token)?;
        self.store.get_tenant(&tenant).await.map_err(from_store)?;
        let page = self
            .store
            .list_subscriptions(&tenant, &page_req)
            .await
            .map_err(from_store)?;
        let (mut subscriptions, next_page_token) = page_response(page, convert::subscription);
        security::decorate(self.store.as_ref(), &mut subscriptions).await?;
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions,
            next_page_token,
        }))
    }

    async fn update_subscription(
        &self,
        req: Request<pb::UpdateSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        self.update_subscription_call(req).await
    }

    async fn delete_subscription(
        &self,
        req: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        let principal = principal(&req)?;
        let sub = self
            .visible_subscription(&principal, &req.get_ref().subscription_id)
            .await?;
        self.store
            .delete_subscription(&sub.id)
            .await
            .map_err(from_store)?;
        self.announce(RegistryChange::Subscription {
            tenant_id: sub.tenant_id,
            subscription_id: sub.id,
        })
        .await;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }

    async fn rotate_secret(
        &self,
        req: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<pb::RotateSecretResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let sub = self
            .visible_subscription(&principal, &req.subscription_id)
            .await?;
        let grace = match &req.grace_period {
            Some(d) => convert::from_duration("grace_period", d)?,
            None => DEFAULT_GRACE,
        };
        if grace > MAX_GRACE {
            return Err(invalid(
                "grace_period",
                "is longer than 7 days, the most allowed",
            ));
        }
        let scheme = security::current_scheme(self.store.as_ref(), &sub.id).await?;
        let secret = secret_or_generate("secret", &req.secret, scheme)?;
        let now = Utc::now();
        let old_expires_at = now
            + chrono::Duration::from_std(grace)
                .map_err(|_| invalid("grace_period", "is too long"))?;
        let new = SubscriptionSecret {
            id: Id::new(IdKind::Secret),
            subscription_id: sub.id.clone(),
            secret: secret.clone(),
            created_at: now,
            expires_at: None,
        };
        self.store
            .rotate_secret(&new, old_expires_at)
            .await
            .map_err(from_store)?;
        self.announce(RegistryChange::Subscription {
            tenant_id: sub.tenant_id,
            subscription_id: sub.id,
        })
        .await;
        Ok(Response::new(pb::RotateSecretResponse {
            secret: security::shown_secret(&secret),
            previous_expires_at: Some(convert::timestamp(old_expires_at)),
        }))
    }

    async fn get_secret(
        &self,
        req: Request<pb::GetSecretRequest>,
    ) -> Result<Response<pb::GetSecretResponse>, Status> {
        let principal = principal(&req)?;
        let sub = self
            .visible_subscription(&principal, &req.get_ref().subscription_id)
            .await?;
        let live = self
            .store
            .live_secrets(&sub.id, Utc::now())
            .await
            .map_err(from_store)?;
        let current = security::current(&live)
            .map(|s| security::shown_secret(&s.secret))
            .unwrap_or_default();
        Ok(Response::new(pb::GetSecretResponse {
            secret: current,
            live_secrets: live
                .into_iter()
                .map(|s| pb::LiveSecret {
                    secret: security::shown_secret(&s.secret),
                    created_at: Some(convert::timestamp(s.created_at)),
                    expires_at: convert::opt_timestamp(s.expires_at),
                })
                .collect(),
        }))
    }

    async fn match_subscriptions(
        &self,
        req: Request<pb::MatchSubscriptionsRequest>,
    ) -> Result<Response<pb::MatchSubscriptionsResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let tenant = tenant_id("tenant_id", &req.tenant_id)?;
        principal.require_tenant(&tenant)?;
        validate::event_type("event_type", &req.event_type).map_err(from_validation)?;
        validate::channels("channels", &req.channels).map_err(from_validation)?;
        let subs =
            matching_subscriptions(self.store.as_ref(), &tenant, &req.event_type, &req.channels)
                .await
                .map_err(from_store)?;
        Ok(Response::new(pb::MatchSubscriptionsResponse {
            subscriptions: subs.into_iter().map(convert::subscription).collect(),
        }))
    }

    async fn create_event_type(
        &self,
        req: Request<pb::CreateEventTypeRequest>,
    ) -> Result<Response<pb::EventType>, Status> {
        principal(&req)?.require_admin("creating an event type")?;
        let req = req.into_inner();
        validate::event_type("name", &req.name).map_err(from_validation)?;
        validate::description("description", &req.description).map_err(from_validation)?;
        let schema = schema_text(&req.schema)?;
        let et = self
            .store
            .create_event_type(&req.name, &req.description, schema)
            .await
            .map_err(from_store)?;
        self.announce(RegistryChange::EventType { name: req.name })
            .await;
        Ok(Response::new(convert::event_type(et)))
    }

    async fn get_event_type(
        &self,
        req: Request<pb::GetEventTypeRequest>,
    ) -> Result<Response<pb::EventType>, Status> {
        principal(&req)?;
        let et = self
            .store
            .get_event_type(&req.get_ref().name)
            .await
            .map_err(from_store)?;
        Ok(Response::new(convert::event_type(et)))
    }

    async fn list_event_types(
        &self,
        req: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let page_req = page_request(req.page_size, &req.page_token)?;
        let page = self
            .store
            .list_event_types(req.include_archived, &page_req)
            .await
            .map_err(from_store)?;
        let (event_types, next_page_token) = page_response(page, convert::event_type);
        Ok(Response::new(pb::ListEventTypesResponse {
            event_types,
            next_page_token,
        }))
    }

    async fn update_event_type(
        &self,
        req: Request<pb::UpdateEventTypeRequest>,
    ) -> Result<Response<pb::EventType>, Status> {
        principal(&req)?.require_admin("changing an event type")?;
        let req = req.into_inner();
        if let Some(d) = &req.description {
            validate::description("description", d).map_err(from_validation)?;
        }
        let schema = match &req.schema {
            Some(s) => Some(schema_text(s)?),
            None => None,
        };
        let et = self
            .store
            .update_event_type(&req.name, req.description.as_deref(), schema, req.archived)
            .await
            .map_err(from_store)?;
        self.announce(RegistryChange::EventType { name: req.name })
            .await;
        Ok(Response::new(convert::event_type(et)))
    }

    async fn delete_event_type(
        &self,
        req: Request<pb::DeleteEventTypeRequest>,
    ) -> Result<Response<pb::DeleteEventTypeResponse>, Status> {
        principal(&req)?.require_admin("deleting an event type")?;
        let name = req.into_inner().name;
        self.store
            .delete_event_type(&name)
            .await
            .map_err(from_store)?;
        self.announce(RegistryChange::EventType { name }).await;
        Ok(Response::new(pb::DeleteEventTypeResponse {}))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        validate::name("name", &req.name).map_err(from_validation)?;
        let tenant = if req.tenant_id.is_empty() {
            principal.require_admin("creating an admin API key")?;
            None
        } else {
            let t = tenant_id("tenant_id", &req.tenant_id)?;
            principal.require_tenant(&t)?;
            self.store.get_tenant(&t).await.map_err(from_store)?;
            Some(t)
        };
        let token = generate_token();
        let key = self
            .store
            .create_api_key(&NewApiKey {
                id: Id::new(IdKind::ApiKey),
                name: req.name,
                tenant_id: tenant,
                token_prefix: token.prefix,
                token_hash: token.hash,
            })
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(convert::api_key(key)),
            token: token.token,
        }))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let page_req = page_request(req.page_size, &req.page_token)?;
        let tenant = if req.tenant_id.is_empty() {
            principal.require_admin("listing admin API keys")?;
            None
        } else {
            let t = tenant_id("tenant_id", &req.tenant_id)?;
            principal.require_tenant(&t)?;
            self.store.get_tenant(&t).await.map_err(from_store)?;
            Some(t)
        };
        let page = self
            .store
            .list_api_keys(tenant.as_ref(), &page_req)
            .await
            .map_err(from_store)?;
        let (api_keys, next_page_token) = page_response(page, convert::api_key);
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys,
            next_page_token,
        }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = principal(&req)?;
        let id =
            Id::parse(IdKind::ApiKey, "api_key_id", &req.get_ref().api_key_id).map_err(from_id)?;
        let key = self.store.get_api_key(&id).await.map_err(from_store)?;
        match &key.tenant_id {
            Some(t) => principal.check_tenant(t, "API key", id.as_str())?,
            None => principal.check_tenant_admin(id.as_str())?,
        }
        let revoked = self.store.revoke_api_key(&id).await.map_err(from_store)?;
        self.auth.invalidate();
        self.announce(RegistryChange::ApiKey { api_key_id: id })
            .await;
        Ok(Response::new(convert::api_key(revoked)))
    }
}
