//! Keyset paging as both adapters do it: a page asks for one row more than it returns (to
//! know whether another follows), and its cursor is the key of its last item.

use crate::StoreError;
use crate::error::not_found;
use crate::port::{Page, PageRequest};

/// The lower bound of a keyset page. Every id and name is non-empty and compares greater
/// than "" bytewise (collation "C" on PostgreSQL, BINARY on SQLite), so the first page needs
/// no separate query.
pub(crate) fn cursor(page: &PageRequest) -> &str {
    page.after.as_deref().unwrap_or("")
}

/// How many rows to fetch for a page of `limit`: one more, to know whether another follows.
pub(crate) fn fetch_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// Builds a page from `limit + 1` fetched rows: the extra row only says another page follows.
pub(crate) fn into_page<T>(mut items: Vec<T>, limit: u32, key: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next_cursor }
}

/// The attempt number a page of attempts starts after (0 for the first page). A cursor that
/// is not an attempt number is `NotFound` "page token".
pub(crate) fn attempt_cursor(page: &PageRequest) -> Result<i32, StoreError> {
    match page.after.as_deref() {
        None => Ok(0),
        Some(cursor) => cursor
            .parse::<u32>()
            .ok()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| not_found("page token", cursor)),
    }
}
