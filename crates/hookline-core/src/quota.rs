//! Per-tenant quotas: the server's defaults, a tenant's overrides, and the refusal a caller
//! sees when it is over one.
//!
//! Tenants are untrusted, so one tenant must not be able to crowd out the others: each
//! quota has a default in the server's configuration and an override per tenant that
//! only an admin can set. The refusal names the quota, its value and how to raise it;
//! the gRPC layer answers it as `RESOURCE_EXHAUSTED`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::fmt::thousands;
use crate::validate::{self, ValidationError};

/// The quotas of the server, used for every tenant without an override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    /// Most subscriptions (enabled or not) one tenant may have.
    pub subscriptions_per_tenant: u32,
    /// Most deliveries one published event may create (subscriptions it matches).
    pub deliveries_per_event: u32,
    /// Most events one tenant may publish per second (per ingest process).
    pub events_per_second: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            subscriptions_per_tenant: 1_000,
            deliveries_per_event: 100,
            events_per_second: 10_000,
        }
    }
}

/// A tenant's own quotas; `None` means the server's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantQuotas {
    pub max_subscriptions: Option<u32>,
    pub max_deliveries_per_event: Option<u32>,
    pub max_events_per_second: Option<u32>,
    /// The tenant's weight in fair delivery (1 to [`MAX_WEIGHT`]; `None`: 1): its
    /// deliveries spread over `2 × weight` shard queues.
    #[serde(default)]
    pub weight: Option<u32>,
}

impl TenantQuotas {
    /// The quotas that apply to the tenant: its overrides, else the server's defaults.
    pub fn effective(&self, defaults: &Quotas) -> Quotas {
        Quotas {
            subscriptions_per_tenant: self
                .max_subscriptions
                .unwrap_or(defaults.subscriptions_per_tenant),
            deliveries_per_event: self
                .max_deliveries_per_event
                .unwrap_or(defaults.deliveries_per_event),
            events_per_second: self
                .max_events_per_second
                .unwrap_or(defaults.events_per_second),
        }
    }
}

/// The largest tenant weight.
pub const MAX_WEIGHT: u32 = 16;

/// A weight from the wire, where 0 means "the default, 1".
pub fn weight_value(field: &str, value: u32) -> Result<Option<u32>, ValidationError> {
    validate::stored_u32(field, value, 0, MAX_WEIGHT)?;
    Ok((value > 0).then_some(value))
}

/// The largest value a quota may take: what an `integer` column holds.
pub const MAX_QUOTA: u32 = i32::MAX as u32;

/// A quota override from the wire, where 0 means "the server's default".
pub fn override_value(field: &str, value: u32) -> Result<Option<u32>, ValidationError> {
    validate::stored_u32(field, value, 0, MAX_QUOTA)?;
    Ok((value > 0).then_some(value))
}

/// Which quota a request is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    SubscriptionsPerTenant,
    DeliveriesPerEvent,
    EventsPerSecond,
}

impl Quota {
    /// The tenant field (`quotas.…` on `CreateTenant`/`UpdateTenant`) that overrides it.
    pub const fn tenant_field(self) -> &'static str {
        match self {
            Quota::SubscriptionsPerTenant => "quotas.max_subscriptions",
            Quota::DeliveriesPerEvent => "quotas.max_deliveries_per_event",
            Quota::EventsPerSecond => "quotas.max_events_per_second",
        }
    }

    /// The server setting that holds its default.
    pub const fn setting(self) -> &'static str {
        match self {
            Quota::SubscriptionsPerTenant => "quota_subscriptions_per_tenant",
            Quota::DeliveriesPerEvent => "quota_deliveries_per_event",
            Quota::EventsPerSecond => "quota_events_per_second",
        }
    }

    const fn what(self) -> &'static str {
        match self {
            Quota::SubscriptionsPerTenant => "subscriptions per tenant",
            Quota::DeliveriesPerEvent => "deliveries per event",
            Quota::EventsPerSecond => "events per second",
        }
    }
}

/// A request over a quota. Nothing of it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct QuotaExceeded {
    pub quota: Quota,
    pub limit: u32,
    pub tenant: String,
    /// What the request would have done (`the tenant has 1,000 subscriptions`).
    pub context: String,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; the quota of {} is {} for tenant {}. Nothing was stored. An admin can raise \
             it for this tenant with UpdateTenant `{}`, or for every tenant with the server \
             setting `{}`",
            self.context,
            self.quota.what(),
            thousands(u64::from(self.limit)),
            self.tenant,
            self.quota.tenant_field(),
            self.quota.setting()
        )
    }
}

/// The subscriptions-per-tenant rule, for the stores: a tenant with `count` subscriptions
/// may create one more only below `limit`.
pub fn check_subscriptions(
    tenant: &impl std::fmt::Display,
    count: i64,
    limit: u32,
) -> Result<(), QuotaExceeded> {
    if count < i64::from(limit) {
        return Ok(());
    }
    Err(QuotaExceeded {
        quota: Quota::SubscriptionsPerTenant,
        limit,
        tenant: tenant.to_string(),
        context: format!(
            "the tenant has {} subscriptions already",
            thousands(u64::try_from(count).unwrap_or(0))
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_0_for_the_default_or_1_to_16() {
        assert_eq!(weight_value("quotas.weight", 0).unwrap(), None);
        assert_eq!(weight_value("quotas.weight", 16).unwrap(), Some(16));
        let e = weight_value("quotas.weight", 17).unwrap_err().to_string();
        assert!(e.contains("quotas.weight"), "{e}");
    }

    #[test]
    fn overrides_win_over_defaults() {
        let defaults = Quotas::default();
        let own = TenantQuotas {
            max_subscriptions: Some(5),
            ..TenantQuotas::default()
        };
        let q = own.effective(&defaults);
        assert_eq!(q.subscriptions_per_tenant, 5);
        assert_eq!(q.deliveries_per_event, 100);
    }

    #[test]
    fn refusal_names_quota_value_and_how_to_raise_it() {
        let e = QuotaExceeded {
            quota: Quota::SubscriptionsPerTenant,
            limit: 1000,
            tenant: "ten_1".into(),
            context: "the tenant has 1,000 subscriptions".into(),
        }
        .to_string();
        assert!(e.contains("subscriptions per tenant is 1,000"), "{e}");
        assert!(e.contains("quotas.max_subscriptions"), "{e}");
        assert!(e.contains("quota_subscriptions_per_tenant"), "{e}");
    }

    #[test]
    fn overrides_are_bounded() {
        assert_eq!(override_value("q", 0).unwrap(), None);
        assert_eq!(override_value("q", 7).unwrap(), Some(7));
        let e = override_value("quotas.max_subscriptions", u32::MAX).unwrap_err();
        assert!(e.to_string().contains("2,147,483,647"), "{e}");
    }
}
