//! [`RegistryStore`] on PostgreSQL: tenants, subscriptions and their secrets, event types
//! and API keys, the control plane's state.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::client_cert::ClientIdentity;
use hookline_core::model::{
    ApiKey, EventType, Subscription, SubscriptionSecret, SubscriptionState, Tenant,
};
use hookline_core::quota::TenantQuotas;
use sqlx::types::Json;

use super::PgStore;
use super::client_certs;
use super::error::{Violation, map_violation};
use super::ordered;
use super::quotas;
use super::rows::{
    api_key_from_row, event_type_from_row, map_rows, subscription_from_row, tenant_from_row,
};
use super::secrets::insert_secret;
use crate::StoreError;
use crate::codec::{self, SubscriptionLimits};
use crate::error::Db;
use crate::error::{found, not_found, violated};
use crate::paging::{cursor, fetch_limit, into_page};
use crate::port::{NewApiKey, NewSubscription, Page, PageRequest, RegistryStore};

#[async_trait]
impl RegistryStore for PgStore {
    async fn create_tenant(
        &self,
        id: &Id,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "INSERT INTO tenants (id, name, metadata) VALUES ($1, $2, $3) RETURNING ",
            tenant_cols!()
        ))
        .bind(id.as_str())
        .bind(name)
        .bind(Json(metadata))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(violated::tenant_exists(id)),
                Violation::ForeignKey(_) => None,
            })
        })?;
        tenant_from_row(&row).db()
    }

    async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenants WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .db()?;
        tenant_from_row(&found(row, "tenant", id)?).db()
    }

    async fn list_tenants(&self, page: &PageRequest) -> Result<Page<Tenant>, StoreError> {
        let limit = page.effective_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenants WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(cursor(page))
        .bind(fetch_limit(limit))
        .fetch_all(&self.pool)
        .await
        .db()?;
        let items = map_rows(&rows, tenant_from_row)?;
        Ok(into_page(items, limit, |t| t.id.to_string()))
    }

    async fn update_tenant(
        &self,
        id: &Id,
        name: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE tenants SET name = COALESCE($2, name), metadata = COALESCE($3, metadata), \
             updated_at = now() WHERE id = $1 RETURNING ",
            tenant_cols!()
        ))
        .bind(id.as_str())
        .bind(name)
        .bind(metadata.map(Json))
        .fetch_optional(&self.pool)
        .await
        .db()?;
        tenant_from_row(&found(row, "tenant", id)?).db()
    }

    async fn delete_tenant(&self, id: &Id) -> Result<(), StoreError> {
        // Foreign keys cascade to API keys, subscriptions (and their secrets), events and
        // everything downstream of them.
        let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .db()?;
        if done.rows_affected() == 0 {
            return Err(not_found("tenant", id));
        }
        Ok(())
    }

    async fn set_tenant_quotas(
        &self,
        id: &Id,
        quotas: &TenantQuotas,
    ) -> Result<Tenant, StoreError> {
        quotas::set(&self.pool, id, quotas).await
    }

    async fn create_subscription_within(
        &self,
        new: &NewSubscription,
        default_limit: u32,
    ) -> Result<Subscription, StoreError> {
        let limits = SubscriptionLimits::check(
            new.rate_limit_per_second,
            new.max_in_flight,
            new.retry_schedule.as_deref(),
        )?;

        let mut tx = self.pool.begin().await.db()?;
        quotas::check_subscriptions(&mut tx, &new.tenant_id, default_limit).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO subscriptions (id, tenant_id, url, description, event_types, channels, \
             headers, rate_limit_per_second, max_in_flight, retry_schedule_ms, state, \
             disabled_reason, metadata, payload_format, ordering) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             RETURNING ",
            subscription_cols!()
        ))
        .bind(new.id.as_str())
        .bind(new.tenant_id.as_str())
        .bind(&new.url)
        .bind(&new.description)
        .bind(&new.event_types)
        .bind(&new.channels)
        .bind(Json(&new.headers))
        .bind(limits.rate_limit_per_second)
        .bind(limits.max_in_flight)
        .bind(limits.retry_schedule_ms)
        .bind(new.state.as_str())
        // A new subscription has no reason to be disabled yet (`NewSubscription` carries none).
        .bind(None::<&str>)
        .bind(Json(&new.metadata))
        .bind(new.payload_format.as_str())
        .bind(new.ordering.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(violated::subscription_exists(&new.id)),
                Violation::ForeignKey(_) => Some(not_found("tenant", &new.tenant_id)),
            })
        })?;
        let subscription = subscription_from_row(&row).db()?;
        // The secret belongs to the subscription being created, whatever its
        // `subscription_id` field says.
        insert_secret(&mut tx, &new.id, &new.secret).await?;
        client_certs::put(&mut tx, &new.id, new.client_identity.as_ref()).await?;
        tx.commit().await.db()?;
        Ok(subscription)
    }

    async fn get_subscription(&self, id: &Id) -> Result<Subscription, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .db()?;
        subscription_from_row(&found(row, "subscription", id)?).db()
    }

    async fn list_subscriptions(
        &self,
        tenant_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Subscription>, StoreError> {
        let limit = page.effective_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(tenant_id.as_str())
        .bind(cursor(page))
        .bind(fetch_limit(limit))
        .fetch_all(&self.pool)
        .await
        .db()?;
        let items = map_rows(&rows, subscription_from_row)?;
        Ok(into_page(items, limit, |s| s.id.to_string()))
    }

    async fn update_subscription(&self, sub: &Subscription) -> Result<Subscription, StoreError> {
        let limits = SubscriptionLimits::check(
            sub.rate_limit_per_second,
            sub.max_in_flight,
            sub.retry_schedule.as_deref(),
        )?;
        let mut tx = self.pool.begin().await.db()?;
        let row = sqlx::query(concat!(
            "UPDATE subscriptions SET url = $2, description = $3, event_types = $4, \
             channels = $5, headers = $6, rate_limit_per_second = $7, max_in_flight = $8, \
             retry_schedule_ms = $9, state = $10, disabled_reason = $11, metadata = $12, \
             payload_format = $13, ordering = $14, updated_at = now() WHERE id = $1 \
             RETURNING ",
            subscription_cols!()
        ))
        .bind(sub.id.as_str())
        .bind(&sub.url)
        .bind(&sub.description)
        .bind(&sub.event_types)
        .bind(&sub.channels)
        .bind(Json(&sub.headers))
        .bind(limits.rate_limit_per_second)
        .bind(limits.max_in_flight)
        .bind(limits.retry_schedule_ms)
        .bind(sub.state.as_str())
        .bind(sub.disabled_reason.as_deref())
        .bind(Json(&sub.metadata))
        .bind(sub.payload_format.as_str())
        .bind(sub.ordering.as_str())
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let updated = subscription_from_row(&found(row, "subscription", &sub.id)?).db()?;
        if crate::ordered::releases(&updated) {
            ordered::release(&mut tx, &sub.id).await?;
        }
        tx.commit().await.db()?;
        Ok(updated)
    }

    async fn delete_subscription(&self, id: &Id) -> Result<(), StoreError> {
        // Cascades to its secrets and deliveries (and their attempts and schedule).
        let done = sqlx::query("DELETE FROM subscriptions WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .db()?;
        if done.rows_affected() == 0 {
            return Err(not_found("subscription", id));
        }
        Ok(())
    }

    async fn set_subscription_state(
        &self,
        id: &Id,
        state: SubscriptionState,
        reason: Option<&str>,
    ) -> Result<Subscription, StoreError> {
        let reason = codec::disabled_reason(state, reason);
        let mut tx = self.pool.begin().await.db()?;
        let row = sqlx::query(concat!(
            "UPDATE subscriptions SET state = $2, disabled_reason = $3, updated_at = now() \
             WHERE id = $1 RETURNING ",
            subscription_cols!()
        ))
        .bind(id.as_str())
        .bind(state.as_str())
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let updated = subscription_from_row(&found(row, "subscription", id)?).db()?;
        if crate::ordered::releases(&updated) {
            ordered::release(&mut tx, id).await?;
        }
        tx.commit().await.db()?;
        Ok(updated)
    }

    async fn enabled_subscriptions(&self, tenant_id: &Id) -> Result<Vec<Subscription>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE tenant_id = $1 AND state = 'enabled' ORDER BY id"
        ))
        .bind(tenant_id.as_str())
        .fetch_all(&self.pool)
        .await
        .db()?;
        map_rows(&rows, subscription_from_row)
    }

    async fn live_secrets(
        &self,
        subscription_id: &Id,
        now: DateTime<Utc>,
    ) -> Result<Vec<SubscriptionSecret>, StoreError> {
        self.live_secrets_of(subscription_id, now).await
    }

    async fn rotate_secret(
        &self,
        new: &SubscriptionSecret,
        old_expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.rotate_secret_to(new, old_expires_at).await
    }

    async fn create_event_type(
        &self,
        name: &str,
        description: &str,
        schema: Option<&str>,
    ) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "INSERT INTO event_types (name, description, schema) VALUES ($1, $2, $3::jsonb) \
             RETURNING ",
            event_type_cols!()
        ))
        .bind(name)
        .bind(description)
        .bind(schema)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(violated::event_type_exists(name)),
                Violation::ForeignKey(_) => None,
            })
        })?;
        event_type_from_row(&row).db()
    }

    async fn get_event_type(&self, name: &str) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_type_cols!(),
            " FROM event_types WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        event_type_from_row(&found(row, "event type", name)?).db()
    }

    async fn list_event_types(
        &self,
        include_archived: bool,
        page: &PageRequest,
    ) -> Result<Page<EventType>, StoreError> {
        let limit = page.effective_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_type_cols!(),
            " FROM event_types WHERE name > $1 AND ($2 OR NOT archived) ORDER BY name LIMIT $3"
        ))
        .bind(cursor(page))
        .bind(include_archived)
        .bind(fetch_limit(limit))
        .fetch_all(&self.pool)
        .await
        .db()?;
        let items = map_rows(&rows, event_type_from_row)?;
        Ok(into_page(items, limit, |t| t.name.clone()))
    }

    async fn update_event_type(
        &self,
        name: &str,
        description: Option<&str>,
        schema: Option<Option<&str>>,
        archived: Option<bool>,
    ) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE event_types SET description = COALESCE($2, description), \
             schema = CASE WHEN $3 THEN $4::jsonb ELSE schema END, \
             archived = COALESCE($5, archived), updated_at = now() \
             WHERE name = $1 RETURNING ",
            event_type_cols!()
        ))
        .bind(name)
        .bind(description)
        .bind(schema.is_some())
        .bind(schema.flatten())
        .bind(archived)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        event_type_from_row(&found(row, "event type", name)?).db()
    }

    async fn delete_event_type(&self, name: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM event_types WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .db()?;
        if done.rows_affected() == 0 {
            return Err(not_found("event type", name));
        }
        Ok(())
    }

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(concat!(
            "INSERT INTO api_keys (id, name, tenant_id, token_prefix, token_hash) \
             VALUES ($1, $2, $3, $4, $5) RETURNING ",
            api_key_cols!()
        ))
        .bind(new.id.as_str())
        .bind(&new.name)
        .bind(new.tenant_id.as_ref().map(Id::as_str))
        .bind(&new.token_prefix)
        .bind(&new.token_hash[..])
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique("api_keys_token_hash_key") => {
                    Some(violated::api_key_token_taken())
                }
                Violation::Unique(_) => Some(violated::api_key_exists(&new.id)),
                Violation::ForeignKey(_) => new
                    .tenant_id
                    .as_ref()
                    .map(|tenant| not_found("tenant", tenant)),
            })
        })?;
        api_key_from_row(&row).db()
    }

    async fn find_api_key_by_hash(&self, token_hash: &[u8; 32]) -> Result<ApiKey, StoreError> {
        // Also records when the key was last used, at most once a minute per key so that a
        // busy key does not turn every authentication into a write.
        let row = sqlx::query(concat!(
            "WITH key AS (SELECT ",
            api_key_cols!(),
            ", last_used_at FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL), \
             touched AS (UPDATE api_keys SET last_used_at = now() \
               WHERE id = (SELECT id FROM key) \
               AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')) \
             SELECT ",
            api_key_cols!(),
            " FROM key"
        ))
        .bind(&token_hash[..])
        .fetch_optional(&self.pool)
        .await
        .db()?;
        api_key_from_row(&found(row, "API key", "for the presented token")?).db()
    }

    async fn list_api_keys(
        &self,
        tenant_id: Option<&Id>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let limit = page.effective_limit();
        // Two statements rather than `IS NOT DISTINCT FROM`, which no index can serve.
        let query = match tenant_id {
            Some(tenant) => sqlx::query(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
            ))
            .bind(tenant.as_str()),
            None => sqlx::query(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id IS NULL AND id > $1 ORDER BY id LIMIT $2"
            )),
        };
        let rows = query
            .bind(cursor(page))
            .bind(fetch_limit(limit))
            .fetch_all(&self.pool)
            .await
            .db()?;
        let items = map_rows(&rows, api_key_from_row)?;
        Ok(into_page(items, limit, |k| k.id.to_string()))
    }

    async fn get_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            api_key_cols!(),
            " FROM api_keys WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .db()?;
        api_key_from_row(&found(row, "API key", id)?).db()
    }

    async fn revoke_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        // Revoking twice keeps the first revocation time.
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 \
             RETURNING ",
            api_key_cols!()
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .db()?;
        api_key_from_row(&found(row, "API key", id)?).db()
    }

    async fn set_circuit_open_until(
        &self,
        id: &Id,
        until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        // Runtime state, not configuration: `updated_at` stays.
        sqlx::query("UPDATE subscriptions SET circuit_open_until = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(until)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(())
    }

    async fn circuit_open_until(&self, id: &Id) -> Result<Option<DateTime<Utc>>, StoreError> {
        let until: Option<Option<DateTime<Utc>>> =
            sqlx::query_scalar("SELECT circuit_open_until FROM subscriptions WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .db()?;
        Ok(until.flatten())
    }

    async fn set_client_identity(
        &self,
        id: &Id,
        identity: Option<&ClientIdentity>,
    ) -> Result<(), StoreError> {
        client_certs::set(&self.pool, id, identity).await
    }

    async fn client_identities(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, ClientIdentity>, StoreError> {
        client_certs::load(&self.pool, ids).await
    }

    async fn current_secrets(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, SubscriptionSecret>, StoreError> {
        self.current_secrets_of(ids).await
    }
}
