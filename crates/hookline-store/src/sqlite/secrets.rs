//! Signing secrets of a subscription on SQLite: the live ones, rotation, and the insert
//! that both creating a subscription and rotating use.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::model::SubscriptionSecret;
use sqlx::types::Json;
use sqlx::{Sqlite, Transaction};

use super::SqliteStore;
use super::error::{Violation, map_violation};
use super::rows::{map_rows, micros, secret_from_row};
use crate::StoreError;
use crate::error::{Db, not_found, violated};

impl SqliteStore {
    pub(super) async fn current_secrets_of(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, SubscriptionSecret>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted: Vec<&str> = ids.iter().map(Id::as_str).collect();
        let rows = sqlx::query(concat!(
            "SELECT ",
            secret_cols!(),
            " FROM subscription_secrets \
             WHERE subscription_id IN (SELECT value FROM json_each(?1)) AND expires_at IS NULL"
        ))
        .bind(Json(&wanted))
        .fetch_all(&self.reader)
        .await
        .db()?;
        Ok(crate::codec::by_subscription(map_rows(
            &rows,
            secret_from_row,
        )?))
    }

    pub(super) async fn live_secrets_of(
        &self,
        subscription_id: &Id,
        now: DateTime<Utc>,
    ) -> Result<Vec<SubscriptionSecret>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            secret_cols!(),
            " FROM subscription_secrets \
             WHERE subscription_id = ?1 AND (expires_at IS NULL OR expires_at > ?2) \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(subscription_id.as_str())
        .bind(micros(now))
        .fetch_all(&self.reader)
        .await
        .db()?;
        if rows.is_empty() {
            // A subscription always has a current secret, so nothing live means no
            // subscription; check, to tell the caller which.
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE id = ?1)")
                    .bind(subscription_id.as_str())
                    .fetch_one(&self.reader)
                    .await
                    .db()?;
            if !exists {
                return Err(not_found("subscription", subscription_id));
            }
        }
        map_rows(&rows, secret_from_row)
    }

    pub(super) async fn rotate_secret_to(
        &self,
        new: &SubscriptionSecret,
        old_expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sub_id = new.subscription_id.as_str();
        let (mut tx, now) = self.write().await?;
        // Touching the subscription row checks it exists; the write transaction already
        // serialises concurrent rotations.
        let touched = sqlx::query("UPDATE subscriptions SET updated_at = ?2 WHERE id = ?1")
            .bind(sub_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .db()?;
        if touched.rows_affected() == 0 {
            return Err(not_found("subscription", &new.subscription_id));
        }
        // Secrets already past their expiry are of no use to anyone.
        sqlx::query(
            "DELETE FROM subscription_secrets \
             WHERE subscription_id = ?1 AND expires_at IS NOT NULL AND expires_at <= ?2",
        )
        .bind(sub_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .db()?;
        sqlx::query(
            "UPDATE subscription_secrets SET expires_at = ?2 \
             WHERE subscription_id = ?1 AND expires_at IS NULL",
        )
        .bind(sub_id)
        .bind(micros(old_expires_at))
        .execute(&mut *tx)
        .await
        .db()?;
        insert_secret(&mut tx, &new.subscription_id, new).await?;
        tx.commit().await.db()?;
        Ok(())
    }
}

/// Inserts `secret` as a secret of `subscription_id` inside `tx`.
pub(super) async fn insert_secret(
    tx: &mut Transaction<'_, Sqlite>,
    subscription_id: &Id,
    secret: &SubscriptionSecret,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO subscription_secrets (id, subscription_id, secret, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(secret.id.as_str())
    .bind(subscription_id.as_str())
    .bind(&secret.secret)
    .bind(micros(secret.created_at))
    .bind(secret.expires_at.map(micros))
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        map_violation(e, |v| match v {
            Violation::Unique("subscription_secrets.id") => {
                Some(violated::secret_exists(&secret.id))
            }
            Violation::Unique(_) => Some(violated::current_secret_exists(subscription_id)),
            Violation::ForeignKey => Some(not_found("subscription", subscription_id)),
        })
    })?;
    Ok(())
}
