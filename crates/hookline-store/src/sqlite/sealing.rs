//! The sealed columns on SQLite: paging through them and compare-and-set writes (a page per transaction), for
//! the walk in `crate::sealing` (sealing plaintext rows, key rotation), with the
//! statements `crate::sealing::statements` writes.

use async_trait::async_trait;
use sqlx::Row;

use super::SqliteStore;
use crate::StoreError;
use crate::error::Db;
use crate::sealing::{SealedColumn, SealedRows, Swap, statements};

#[async_trait]
impl SealedRows for SqliteStore {
    async fn page(
        &self,
        col: &SealedColumn,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let (sql, _) = statements(col, false);
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .db()?;
        rows.iter()
            .map(|r| Ok((r.try_get("k").db()?, r.try_get("v").db()?)))
            .collect()
    }

    async fn swap(&self, col: &SealedColumn, rows: &[Swap]) -> Result<usize, StoreError> {
        let (_, sql) = statements(col, false);
        // A write: `BEGIN IMMEDIATE` on the writer, as every write here (see sqlite.rs).
        let (mut tx, _) = self.write().await?;
        let mut written = 0;
        for (key, old, new) in rows {
            let done = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(new)
                .bind(key)
                .bind(old)
                .execute(&mut *tx)
                .await
                .db()?;
            written += usize::from(done.rows_affected() == 1);
        }
        tx.commit().await.db()?;
        Ok(written)
    }
}
