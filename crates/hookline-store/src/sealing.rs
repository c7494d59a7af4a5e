//! Which stored columns hold sealed values, and the walk over them that seals plaintext
//! rows (at start), re-seals rows under the current key (`rotate-encryption-key`) or
//! surveys them (a start without a key).
//!
//! Both adapters only page through a column and swap one value for another when it is
//! still the one read (compare-and-set), so a concurrent write is never overwritten and
//! no lock is held across the walk; the walk repeats until a pass sees no such race.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use hookline_seal::{Keyring, SealError, Standing};

use crate::StoreError;

/// How a column holds its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The whole text value is one sealed value (NULL rows are skipped).
    Text,
    /// A JSON object of strings whose every value is sealed (the names stay readable).
    JsonObject,
}

/// A column that holds sealed values, keyed by a unique text column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedColumn {
    pub table: &'static str,
    pub key: &'static str,
    pub column: &'static str,
    pub shape: Shape,
}

/// Every sealed column. A new secret column is one more line here, plus one line in
/// [`crate::sealed`] where its rows are read and written.
pub const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        table: "subscription_secrets",
        key: "id",
        column: "secret",
        shape: Shape::Text,
    },
    SealedColumn {
        table: "subscriptions",
        key: "id",
        column: "headers",
        shape: Shape::JsonObject,
    },
];

/// The statements of the walk on `col`: (page, swap). Parameters are `$1`… in both
/// dialects (sqlx binds SQLite's `$N` by number). Page: `$1` the key to start after,
/// `$2` the limit. Swap: `$1` new value, `$2` key, `$3` old value. PostgreSQL compares
/// keys in the "C" collation (byte order, as SQLite does) and reads JSON as text.
pub fn statements(col: &SealedColumn, postgres: bool) -> (String, String) {
    let SealedColumn {
        table,
        key,
        column,
        shape,
    } = col;
    let (read, write) = match (postgres, shape) {
        (true, Shape::JsonObject) => ("::text", "::jsonb"),
        _ => ("", ""),
    };
    let collate = if postgres { " COLLATE \"C\"" } else { "" };
    // Identifiers come from the constant `SEALED_COLUMNS`, never from input.
    let page = format!(
        "SELECT {key} AS k, {column}{read} AS v FROM {table} \
         WHERE {key}{collate} > $1 AND {column} IS NOT NULL ORDER BY {key}{collate} LIMIT $2"
    );
    let swap = format!(
        "UPDATE {table} SET {column} = $1{write} WHERE {key} = $2 AND {column} = $3{write}"
    );
    (page, swap)
}

/// A compare-and-set write of one row: key, the value read, the value to write.
pub type Swap = (String, String, String);

/// What an adapter offers the walk.
#[async_trait]
pub trait SealedRows: Send + Sync {
    /// Up to `limit` `(key, value)` rows of `col` with a key after `after`, in key order;
    /// a JSON column's value as JSON text.
    async fn page(
        &self,
        col: &SealedColumn,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError>;
    /// One transaction: writes each `(key, old, new)`'s `new` into row `key` if it still
    /// holds `old`; how many rows it wrote.
    async fn swap(&self, col: &SealedColumn, rows: &[Swap]) -> Result<usize, StoreError>;
}

/// What a walk does to each stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Seal plaintext under the current key; leave sealed values alone.
    SealPlain,
    /// Seal plaintext and re-seal values of other keys under the current key.
    Rotate,
}

/// What a walk found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Rows read (all passes).
    pub rows: u64,
    /// Rows written: plaintext sealed or values re-sealed.
    pub rewritten: u64,
    /// Key ids of the values seen, before rewriting (`plaintext` for unsealed ones).
    pub seen: BTreeSet<String>,
}

/// Why a walk stopped.
#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{table}.{column} of row {key}: {source}")]
    Seal {
        table: &'static str,
        column: &'static str,
        key: String,
        source: SealError,
    },
    #[error("{table}.{column} of row {key} is not a JSON object of strings")]
    NotJson {
        table: &'static str,
        column: &'static str,
        key: String,
    },
}

const PAGE: u32 = 500;
const MAX_PASSES: usize = 10;

/// Walks every sealed column; values sealed under a key the keyring lacks stop it with
/// [`SealError::UnknownKey`] before anything of that row is written.
pub async fn walk(
    rows: &dyn SealedRows,
    keyring: &Keyring,
    how: Walk,
) -> Result<SealReport, SealingError> {
    let mut report = SealReport::default();
    for _ in 0..MAX_PASSES {
        let mut raced = false;
        for col in SEALED_COLUMNS {
            raced |= walk_column(rows, keyring, how, col, &mut report).await?;
        }
        if !raced {
            break;
        }
    }
    Ok(report)
}

async fn walk_column(
    rows: &dyn SealedRows,
    keyring: &Keyring,
    how: Walk,
    col: &SealedColumn,
    report: &mut SealReport,
) -> Result<bool, SealingError> {
    let mut after = String::new();
    let mut raced = false;
    loop {
        let page = rows.page(col, &after, PAGE).await?;
        let Some((last, _)) = page.last() else {
            return Ok(raced);
        };
        after = last.clone();
        let mut swaps = Vec::new();
        for (key, value) in &page {
            report.rows += 1;
            let fail = |source| SealingError::Seal {
                table: col.table,
                column: col.column,
                key: key.clone(),
                source,
            };
            let rewritten = rewrite(col, key, value, |v| {
                let standing = keyring.standing(v);
                report.seen.insert(standing_name(&standing, v));
                match (standing, how) {
                    (Standing::Unknown(id), _) => Err(fail(SealError::UnknownKey(id))),
                    (Standing::Plain, _) => Ok(Some(keyring.seal(v))),
                    // Opened, not only matched by id: a different key under a known id
                    // is found here rather than at the first delivery.
                    (Standing::Current, _) | (Standing::Old(_), Walk::SealPlain) => {
                        keyring.open(v).map(|_| None).map_err(fail)
                    }
                    (Standing::Old(_), Walk::Rotate) => {
                        Ok(Some(keyring.seal(&keyring.open(v).map_err(fail)?)))
                    }
                }
            })?;
            if let Some(new) = rewritten {
                swaps.push((key.clone(), value.clone(), new));
            }
        }
        if !swaps.is_empty() {
            let written = rows.swap(col, &swaps).await?;
            report.rewritten += written as u64;
            raced |= written < swaps.len();
        }
    }
}

/// Key ids of the sealed values in every sealed column, `plaintext` for others, with
/// no keyring (a start without a key checks nothing sealed exists).
pub async fn survey(rows: &dyn SealedRows) -> Result<BTreeSet<String>, SealingError> {
    let mut seen = BTreeSet::new();
    for col in SEALED_COLUMNS {
        let mut after = String::new();
        loop {
            let page = rows.page(col, &after, PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (key, value) in &page {
                rewrite(col, key, value, |v| {
                    seen.insert(
                        hookline_seal::sealed_key_id(v)
                            .unwrap_or("plaintext")
                            .into(),
                    );
                    Ok(None)
                })?;
            }
        }
    }
    Ok(seen)
}

fn standing_name(standing: &Standing, v: &str) -> String {
    match standing {
        Standing::Plain => "plaintext".into(),
        _ => hookline_seal::sealed_key_id(v).unwrap_or_default().into(),
    }
}

/// Applies `f` to each secret of a stored value; the new stored value if any changed.
fn rewrite(
    col: &SealedColumn,
    key: &str,
    value: &str,
    mut f: impl FnMut(&str) -> Result<Option<String>, SealingError>,
) -> Result<Option<String>, SealingError> {
    match col.shape {
        Shape::Text => f(value),
        Shape::JsonObject => {
            let not_json = || SealingError::NotJson {
                table: col.table,
                column: col.column,
                key: key.to_string(),
            };
            let mut map: BTreeMap<String, String> =
                serde_json::from_str(value).map_err(|_| not_json())?;
            let mut changed = false;
            for v in map.values_mut() {
                if let Some(new) = f(v)? {
                    *v = new;
                    changed = true;
                }
            }
            Ok(changed.then(|| serde_json::to_string(&map).expect("a map of strings")))
        }
    }
}
