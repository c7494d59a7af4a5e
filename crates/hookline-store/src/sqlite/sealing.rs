//! The sealed columns on SQLite: paging through them and compare-and-set writes, for the
//! walk in `crate::sealing` (sealing plaintext rows, key rotation). JSON columns are TEXT
//! here, so one statement serves both shapes.

use async_trait::async_trait;
use sqlx::Row;

use super::SqliteStore;
use crate::StoreError;
use crate::sealing::{SealedColumn, SealedRows};

#[async_trait]
impl SealedRows for SqliteStore {
    async fn page(
        &self,
        col: &SealedColumn,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let SealedColumn {
            table, key, column, ..
        } = col;
        // Identifiers come from the constant `SEALED_COLUMNS`, never from input.
        let sql = format!(
            "SELECT {key} AS k, {column} AS v FROM {table} \
             WHERE {key} > ?1 AND {column} IS NOT NULL ORDER BY {key} LIMIT ?2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("k")?, r.try_get("v")?)))
            .collect()
    }

    async fn swap(
        &self,
        col: &SealedColumn,
        key_value: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let SealedColumn {
            table, key, column, ..
        } = col;
        let sql = format!("UPDATE {table} SET {column} = ?1 WHERE {key} = ?2 AND {column} = ?3");
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(new)
            .bind(key_value)
            .bind(old)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
