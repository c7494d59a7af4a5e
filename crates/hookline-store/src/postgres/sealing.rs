//! The sealed columns on PostgreSQL: paging through them and compare-and-set writes, for
//! the walk in `crate::sealing` (sealing plaintext rows, key rotation).

use async_trait::async_trait;
use sqlx::Row;

use super::PgStore;
use crate::StoreError;
use crate::sealing::{SealedColumn, SealedRows, Shape};

/// How a column is read as text and compared with text read earlier.
fn cast(col: &SealedColumn) -> (&'static str, &'static str) {
    match col.shape {
        Shape::Text => ("", ""),
        Shape::JsonObject => ("::text", "::jsonb"),
    }
}

#[async_trait]
impl SealedRows for PgStore {
    async fn page(
        &self,
        col: &SealedColumn,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let SealedColumn {
            table, key, column, ..
        } = col;
        let (read, _) = cast(col);
        // Identifiers come from the constant `SEALED_COLUMNS`, never from input.
        let sql = format!(
            "SELECT {key} AS k, {column}{read} AS v FROM {table} \
             WHERE {key} COLLATE \"C\" > $1 AND {column} IS NOT NULL ORDER BY {key} COLLATE \"C\" LIMIT $2"
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
        let (_, write) = cast(col);
        let sql = format!(
            "UPDATE {table} SET {column} = $1{write} WHERE {key} = $2 AND {column} = $3{write}"
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(new)
            .bind(key_value)
            .bind(old)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
