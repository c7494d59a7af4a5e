//! The subscription calls that take a whole subscription (`CreateSubscription`,
//! `UpdateSubscription`): every field validated together, the URL checked against the
//! egress policy, and the change announced once stored.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use hookline_core::client_cert::ClientIdentity;
use hookline_core::model::{
    Ordering, PayloadFormat, RegistryChange, Subscription, SubscriptionSecret, SubscriptionState,
};
use hookline_core::{Id, IdKind, sensitive, validate};
use hookline_grpc::status::{from_store, from_validation, invalid};
use hookline_grpc::{convert, principal};
use hookline_proto::v1 as pb;
use hookline_store::StoreError;
use hookline_store::port::NewSubscription;
use tonic::{Request, Response, Status};

use super::{RegistryApi, security, tenant_id};
use crate::fields::secret_or_generate;

impl RegistryApi {
    pub(super) async fn create_subscription_call(
        &self,
        req: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let sub = req
            .subscription
            .ok_or_else(|| invalid("subscription", "is required"))?;
        let tenant = tenant_id("subscription.tenant_id", &sub.tenant_id)?;
        principal.require_tenant(&tenant)?;
        let fields = validate_subscription("subscription.", &sub)?;
        self.check_egress("subscription.url", &fields.url).await?;
        let scheme = security::scheme_from("subscription.signature_scheme", sub.signature_scheme)?;
        let secret = secret_or_generate("secret", &req.secret, scheme)?;
        let client_identity = security::given_identity(
            "subscription.client_certificate",
            sub.client_certificate.as_ref(),
        )?;
        match self.store.get_tenant(&tenant).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                return Err(invalid(
                    "subscription.tenant_id",
                    format!("tenant {tenant} does not exist; create it first with CreateTenant"),
                ));
            }
            Err(e) => return Err(from_store(e)),
        }
        let id = Id::new(IdKind::Subscription);
        let new = NewSubscription {
            ordering: fields.ordering,
            id: id.clone(),
            tenant_id: tenant.clone(),
            url: fields.url.into(),
            description: fields.description,
            event_types: fields.event_types,
            channels: fields.channels,
            headers: fields.headers,
            rate_limit_per_second: fields.rate_limit_per_second,
            max_in_flight: fields.max_in_flight,
            retry_schedule: fields.retry_schedule,
            state: if req.start_disabled {
                SubscriptionState::Disabled
            } else {
                SubscriptionState::Enabled
            },
            metadata: fields.metadata,
            payload_format: fields.payload_format,
            client_identity,
            secret: SubscriptionSecret {
                id: Id::new(IdKind::Secret),
                subscription_id: id.clone(),
                secret: secret.clone(),
                created_at: Utc::now(),
                expires_at: None,
            },
        };
        let turn = self.creates.turn(&tenant).await;
        let created = self
            .store
            .create_subscription_within(&new, self.quotas.subscriptions_per_tenant)
            .await
            .map_err(from_store)?;
        drop(turn);
        self.announce(RegistryChange::Subscription {
            tenant_id: tenant,
            subscription_id: id,
        })
        .await;
        let mut shown = [convert::subscription(created)];
        security::decorate(self.store.as_ref(), &mut shown).await?;
        let [shown] = shown;
        Ok(Response::new(pb::CreateSubscriptionResponse {
            subscription: Some(shown),
            secret: security::shown_secret(&secret),
        }))
    }

    pub(super) async fn update_subscription_call(
        &self,
        req: Request<pb::UpdateSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let patch = req
            .subscription
            .ok_or_else(|| invalid("subscription", "is required"))?;
        let mask = req
            .update_mask
            .ok_or_else(|| invalid("update_mask", "is required: name the fields to change"))?;
        if mask.paths.is_empty() {
            return Err(invalid("update_mask", "names no field to change"));
        }
        let mut sub = self.visible_subscription(&principal, &patch.id).await?;
        // Validate the patch as a whole subscription: fields outside the mask are taken
        // from the stored one first, so only the masked fields can fail.
        let mut merged = convert::subscription(sub.clone());
        let mut identity_change = None;
        for path in &mask.paths {
            if path == "client_certificate" {
                identity_change = Some(security::given_identity(
                    "subscription.client_certificate",
                    patch.client_certificate.as_ref(),
                )?);
            } else {
                merge_path(path, &patch, &mut merged, &mut sub)?;
            }
        }
        let mut fields = validate_subscription("subscription.", &merged)?;
        // `merged` came from the masked form: a masked value (also one a client sent back
        // unchanged) keeps what is stored.
        sensitive::unmask_headers(&mut fields.headers, &sub.headers);
        if mask.paths.iter().any(|p| p == "url") {
            self.check_egress("subscription.url", &fields.url).await?;
        }
        set_fields(&mut sub, fields);
        let updated = self.store_update(&sub, identity_change).await?;
        self.announce(RegistryChange::Subscription {
            tenant_id: updated.tenant_id.clone(),
            subscription_id: updated.id.clone(),
        })
        .await;
        let mut shown = [convert::subscription(updated)];
        security::decorate(self.store.as_ref(), &mut shown).await?;
        let [shown] = shown;
        Ok(Response::new(shown))
    }

    /// Stores the updated `sub`, then its client identity when the mask named one; the
    /// subscription as stored afterwards.
    async fn store_update(
        &self,
        sub: &Subscription,
        identity_change: Option<Option<ClientIdentity>>,
    ) -> Result<Subscription, Status> {
        let mut updated = self
            .store
            .update_subscription(sub)
            .await
            .map_err(from_store)?;
        if let Some(identity) = identity_change {
            self.store
                .set_client_identity(&updated.id, identity.as_ref())
                .await
                .map_err(from_store)?;
            updated = self
                .store
                .get_subscription(&updated.id)
                .await
                .map_err(from_store)?;
        }
        Ok(updated)
    }
}

/// One field named by the update mask, from `patch` into `merged` (validated later as a
/// whole subscription), or for `state` straight into `sub`.
fn merge_path(
    path: &str,
    patch: &pb::Subscription,
    merged: &mut pb::Subscription,
    sub: &mut Subscription,
) -> Result<(), Status> {
    match path {
        "url" => merged.url = patch.url.clone(),
        "description" => merged.description = patch.description.clone(),
        "event_types" => merged.event_types = patch.event_types.clone(),
        "channels" => merged.channels = patch.channels.clone(),
        "headers" => merged.headers = patch.headers.clone(),
        "rate_limit_per_second" => merged.rate_limit_per_second = patch.rate_limit_per_second,
        "max_in_flight" => merged.max_in_flight = patch.max_in_flight,
        "retry_policy" => merged.retry_policy = patch.retry_policy.clone(),
        "metadata" => merged.metadata = patch.metadata.clone(),
        "payload_format" => merged.payload_format = patch.payload_format,
        "ordering" => merged.ordering = patch.ordering,
        "state" => {
            sub.state = match pb::SubscriptionState::try_from(patch.state) {
                Ok(pb::SubscriptionState::Enabled) => SubscriptionState::Enabled,
                Ok(pb::SubscriptionState::Disabled) => SubscriptionState::Disabled,
                _ => {
                    return Err(invalid(
                        "subscription.state",
                        "must be SUBSCRIPTION_STATE_ENABLED or SUBSCRIPTION_STATE_DISABLED",
                    ));
                }
            };
            sub.disabled_reason = match sub.state {
                SubscriptionState::Enabled => None,
                SubscriptionState::Disabled => Some("disabled by a person".to_string()),
            };
        }
        other => {
            return Err(invalid(
                "update_mask",
                format!(
                    "{other:?} cannot be changed; allowed: url, description, event_types, \
                     channels, headers, rate_limit_per_second, max_in_flight, \
                     retry_policy, state, metadata, payload_format, ordering, \
                     client_certificate (the signature scheme is chosen at creation)"
                ),
            ));
        }
    }
    Ok(())
}

/// The validated fields into the stored subscription.
fn set_fields(sub: &mut Subscription, fields: SubscriptionFields) {
    sub.url = fields.url.into();
    sub.description = fields.description;
    sub.event_types = fields.event_types;
    sub.channels = fields.channels;
    sub.headers = fields.headers;
    sub.rate_limit_per_second = fields.rate_limit_per_second;
    sub.max_in_flight = fields.max_in_flight;
    sub.retry_schedule = fields.retry_schedule;
    sub.metadata = fields.metadata;
    sub.payload_format = fields.payload_format;
    sub.ordering = fields.ordering;
}

/// Every field of a subscription a caller may set, validated.
struct SubscriptionFields {
    /// Normalised: what is stored, shown and requested is the URL as the parser read it.
    url: url::Url,
    description: String,
    event_types: Vec<String>,
    channels: Vec<String>,
    headers: BTreeMap<String, String>,
    rate_limit_per_second: Option<u32>,
    max_in_flight: Option<u32>,
    retry_schedule: Option<Vec<Duration>>,
    metadata: BTreeMap<String, String>,
    payload_format: PayloadFormat,
    ordering: Ordering,
}

fn validate_subscription(p: &str, s: &pb::Subscription) -> Result<SubscriptionFields, Status> {
    let f = |name: &str| format!("{p}{name}");
    let url = validate::subscription_url(&f("url"), &s.url).map_err(from_validation)?;
    validate::description(&f("description"), &s.description).map_err(from_validation)?;
    validate::event_type_filters(&f("event_types"), &s.event_types).map_err(from_validation)?;
    validate::channels(&f("channels"), &s.channels).map_err(from_validation)?;
    validate::headers(&f("headers"), &s.headers).map_err(from_validation)?;
    validate::metadata(&f("metadata"), &s.metadata).map_err(from_validation)?;
    for (name, value) in [
        ("rate_limit_per_second", s.rate_limit_per_second),
        ("max_in_flight", s.max_in_flight),
    ] {
        validate::stored_u32(&f(name), value, 0, validate::MAX_STORED_U32)
            .map_err(from_validation)?;
    }
    let retry_schedule = match &s.retry_policy {
        Some(policy) => {
            let schedule = convert::retry_schedule(&f("retry_policy"), policy)?;
            validate::retry_schedule(&f("retry_policy.schedule"), &schedule)
                .map_err(from_validation)?;
            Some(schedule)
        }
        None => None,
    };
    let payload_format = convert::payload_format_from(&f("payload_format"), s.payload_format)?;
    let ordering = convert::ordering_from(&f("ordering"), s.ordering)?;
    Ok(SubscriptionFields {
        url,
        description: s.description.clone(),
        event_types: s.event_types.clone(),
        channels: s.channels.clone(),
        headers: s.headers.clone(),
        rate_limit_per_second: (s.rate_limit_per_second > 0).then_some(s.rate_limit_per_second),
        max_in_flight: (s.max_in_flight > 0).then_some(s.max_in_flight),
        retry_schedule,
        metadata: s.metadata.clone(),
        payload_format,
        ordering,
    })
}
