//! What PostgreSQL spent per delivery, statement by statement (issue #12: profile before
//! optimising), from the `pg_stat_statements` extension of the server a spawned run's
//! fresh database lives on.
//!
//! The extension must be preloaded (`shared_preload_libraries = 'pg_stat_statements'`);
//! without it the report says so in a note and carries no statements. Counters are reset
//! when the load starts and read after the drain, for the run's database only. Execution
//! time excludes parsing, planning and the WAL flush of each commit, so the sum is less
//! than PostgreSQL's CPU in the process table.

use serde::Serialize;
use sqlx::{Connection, PgConnection, Row};

/// How many statements the report lists (by total execution time).
const TOP: i64 = 8;

/// One statement's cost over a run.
#[derive(Debug, Clone, Serialize)]
pub struct StatementCost {
    /// The normalised statement, shortened to one line.
    pub query: String,
    pub calls: i64,
    /// Rows returned or changed per call.
    pub rows_per_call: f64,
    /// Execution time per delivery, µs.
    pub exec_us_per_delivery: f64,
    /// Calls per 1,000 deliveries.
    pub calls_per_1k_deliveries: f64,
}

/// Where the counters live: the maintenance database of the run's server, and the run's
/// own database whose statements are reported.
pub struct Statements {
    admin_url: String,
    database: String,
}

impl Statements {
    pub fn new(admin_url: &str, database: &str) -> Self {
        Self {
            admin_url: admin_url.to_string(),
            database: database.to_string(),
        }
    }

    /// Makes sure the extension's view exists and resets the counters of the run's
    /// database; an error says why they cannot be read.
    pub async fn reset(&self) -> Result<(), String> {
        let mut conn = self.connect().await?;
        let result = self.create_and_reset(&mut conn).await;
        let _ = conn.close().await;
        result.map_err(|e| e.to_string())
    }

    async fn create_and_reset(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = $1), 0)",
        )
        .bind(&self.database)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The costliest statements of the run's database since a successful
    /// [`reset`](Self::reset).
    pub async fn read(&self, deliveries: u64) -> Result<Vec<StatementCost>, String> {
        let mut conn = self.connect().await?;
        let rows = sqlx::query(
            "SELECT s.query, s.calls, s.rows, s.total_exec_time
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
             WHERE d.datname = $1
             ORDER BY s.total_exec_time DESC LIMIT $2",
        )
        .bind(&self.database)
        .bind(TOP)
        .fetch_all(&mut conn)
        .await;
        let _ = conn.close().await;
        let per = (deliveries.max(1)) as f64;
        rows.map_err(|e| e.to_string())?
            .iter()
            .map(|r| {
                let query: String = r.try_get("query").map_err(|e| e.to_string())?;
                let calls: i64 = r.try_get("calls").map_err(|e| e.to_string())?;
                let rows: i64 = r.try_get("rows").map_err(|e| e.to_string())?;
                let ms: f64 = r.try_get("total_exec_time").map_err(|e| e.to_string())?;
                Ok(StatementCost {
                    query: one_line(&query),
                    calls,
                    rows_per_call: rows as f64 / calls.max(1) as f64,
                    exec_us_per_delivery: ms * 1000.0 / per,
                    calls_per_1k_deliveries: calls as f64 * 1000.0 / per,
                })
            })
            .collect()
    }

    async fn connect(&self) -> Result<PgConnection, String> {
        PgConnection::connect(&self.admin_url)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The statement on one line, whitespace collapsed, at most 100 characters.
fn one_line(query: &str) -> String {
    let flat = query.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn one_line_collapses_whitespace_and_shortens() {
        assert_eq!(one_line("SELECT  1\n FROM\tx"), "SELECT 1 FROM x");
        let long = "x ".repeat(80);
        let short = one_line(&long);
        assert_eq!(short.chars().count(), 101);
        assert!(short.ends_with('…'));
    }
}
