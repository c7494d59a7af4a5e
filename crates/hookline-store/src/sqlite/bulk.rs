//! Multi-row inserts on SQLite: a batch of rows goes in with a few `INSERT … VALUES (…), (…)`
//! statements of fixed sizes instead of a statement per row.

use std::sync::OnceLock;

use sqlx::Sqlite;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnection};

/// Largest multi-row INSERT: 2^8 = 256 rows (at most 9 parameters each, far below SQLite's
/// limit of 32766).
const MAX_ROWS_LOG2: usize = 8;

/// A multi-row `INSERT … VALUES (…), (…)` of one table. A batch of any length is cut into
/// chunks of 256 rows and a power-of-two remainder (100 = 64 + 32 + 4), so that each table
/// has at most nine statement texts, which stay prepared in every connection's statement
/// cache.
pub(crate) struct BulkInsert {
    /// `INSERT INTO t (a, b) VALUES `
    head: &'static str,
    /// Placeholders of one row: `(?, ?)`.
    row: &'static str,
    /// What follows the rows (`ON CONFLICT …`), or "".
    tail: &'static str,
    sql: [OnceLock<String>; MAX_ROWS_LOG2 + 1],
}

impl BulkInsert {
    pub(crate) const fn new(head: &'static str, row: &'static str, tail: &'static str) -> Self {
        Self {
            head,
            row,
            tail,
            sql: [const { OnceLock::new() }; MAX_ROWS_LOG2 + 1],
        }
    }

    /// The statement for 2^`log2` rows.
    fn sql(&self, log2: usize) -> &str {
        self.sql[log2].get_or_init(|| {
            let rows = 1usize << log2;
            let mut sql = String::with_capacity(
                self.head.len() + rows * (self.row.len() + 2) + self.tail.len(),
            );
            sql.push_str(self.head);
            for i in 0..rows {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(self.row);
            }
            sql.push_str(self.tail);
            sql
        })
    }

    /// Inserts `rows`, `bind` adding the parameters of one row.
    pub(crate) async fn run<R>(
        &'static self,
        conn: &mut SqliteConnection,
        rows: &[R],
        bind: impl Fn(SqliteQuery, &R) -> SqliteQuery,
    ) -> Result<(), sqlx::Error> {
        let mut rest = rows;
        while !rest.is_empty() {
            let log2 = rest.len().ilog2().min(MAX_ROWS_LOG2 as u32) as usize;
            let (chunk, tail) = rest.split_at(1 << log2);
            let query = chunk.iter().fold(sqlx::query(self.sql(log2)), &bind);
            query.execute(&mut *conn).await?;
            rest = tail;
        }
        Ok(())
    }
}

/// A query on SQLite with its parameters.
pub(crate) type SqliteQuery = Query<'static, Sqlite, SqliteArguments>;
