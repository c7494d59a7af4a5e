//! Client certificates of subscriptions on SQLite (mutual TLS to receivers): written with
//! the subscription or replaced on their own, read for many subscriptions at once.

use std::collections::HashMap;

use hookline_core::Id;
use hookline_core::client_cert::ClientIdentity;
use sqlx::sqlite::SqlitePool;
use sqlx::types::Json;
use sqlx::{Sqlite, Transaction};

use crate::StoreError;
use crate::codec;
use crate::error::{Db, not_found};

/// Sets (or with `None` removes) the client certificate of `id` inside `tx`.
pub(super) async fn put(
    tx: &mut Transaction<'static, Sqlite>,
    id: &Id,
    identity: Option<&ClientIdentity>,
) -> Result<(), StoreError> {
    match identity {
        Some(identity) => {
            sqlx::query(
                "INSERT INTO subscription_client_certs \
                 (subscription_id, certificate_pem, private_key_pem) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (subscription_id) DO UPDATE SET \
                 certificate_pem = excluded.certificate_pem, \
                 private_key_pem = excluded.private_key_pem",
            )
            .bind(id.as_str())
            .bind(&identity.certificate_pem)
            .bind(&identity.private_key_pem)
            .execute(&mut **tx)
            .await
            .db()?;
        }
        None => {
            sqlx::query("DELETE FROM subscription_client_certs WHERE subscription_id = ?1")
                .bind(id.as_str())
                .execute(&mut **tx)
                .await
                .db()?;
        }
    }
    Ok(())
}

/// Replaces the certificate of an existing subscription and stamps its `updated_at`.
pub(super) async fn set(
    mut tx: Transaction<'static, Sqlite>,
    now: i64,
    id: &Id,
    identity: Option<&ClientIdentity>,
) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE subscriptions SET updated_at = ?2 WHERE id = ?1")
        .bind(id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .db()?;
    if updated.rows_affected() == 0 {
        return Err(not_found("subscription", id));
    }
    put(&mut tx, id, identity).await?;
    tx.commit().await.db()?;
    Ok(())
}

/// The client certificates of those of `ids` that have one.
pub(super) async fn load(
    reader: &SqlitePool,
    ids: &[Id],
) -> Result<HashMap<Id, ClientIdentity>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let wanted: Vec<&str> = ids.iter().map(Id::as_str).collect();
    let rows = sqlx::query_as(
        "SELECT subscription_id, certificate_pem, private_key_pem \
         FROM subscription_client_certs WHERE subscription_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(Json(&wanted))
    .fetch_all(reader)
    .await
    .db()?;
    codec::client_identities(rows).db()
}
