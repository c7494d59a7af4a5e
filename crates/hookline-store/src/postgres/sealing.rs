//! The sealed columns on PostgreSQL: paging through them and compare-and-set writes, for
//! the walk in `crate::sealing` (sealing plaintext rows, key rotation), with the
//! statements `crate::sealing::statements` writes.

use async_trait::async_trait;
use sqlx::Row;

use super::PgStore;
use crate::StoreError;
use crate::sealing::{SealedColumn, SealedRows, statements};

#[async_trait]
impl SealedRows for PgStore {
    async fn page(
        &self,
        col: &SealedColumn,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let (sql, _) = statements(col, true);
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
        key: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let (_, sql) = statements(col, true);
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(new)
            .bind(key)
            .bind(old)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
