//! [`DeliveryStore`] on SQLite: attempts, the retry schedule, manual retries, listings.
//!
//! Every write here is one `BEGIN IMMEDIATE` transaction, exclusive on SQLite, so what the
//! PostgreSQL adapter gets from row locks comes for free: a batch of outcomes reads each
//! delivery's state and writes the next one with nobody in between, and a promotion of due
//! retries takes rows that no other promoter can take too (there is nothing to skip: the
//! others wait for the write lock, then find the rows gone).
//!
//! Statements do not grow with the batch: `record_outcomes` is a read, a multi-row insert of
//! attempts, one `UPDATE … FROM json_each(?)` of the deliveries and the schedule's upserts
//! and deletions; `promote_due_retries` is a `DELETE … RETURNING` of the due rows, an update
//! and an insert over their ids, and a read of their jobs.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{Attempt, Delivery, DeliveryStatus, ErrorClass};
use hookline_core::{Id, IdKind};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::bulk::BulkInsert;
use super::error::{Violation, map_violation};
use super::events::{QUEUE_IDS, jobs_in_order};
use super::ordered;
use super::rows::{get_id, get_opt_time, get_time, get_u32, map_rows, micros};
use super::{SqliteStore, id_array};
use crate::StoreError;
use crate::codec::{self, stored_duration_ms, stored_excerpt};
use crate::error::Db;
use crate::error::{all_found, found, violated};
use crate::outcome::{self, NewAttempt, Tally};
use crate::paging::{attempt_cursor, fetch_limit, into_page};
use crate::port::{AttemptOutcome, DeliveryFilter, DeliveryStore, Page, PageRequest};

// ---------------------------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------------------------

fn get_status_code(row: &SqliteRow, column: &str) -> Result<Option<u16>, sqlx::Error> {
    codec::status_code(column, row.try_get(column)?)
}

fn get_status(row: &SqliteRow) -> Result<DeliveryStatus, sqlx::Error> {
    codec::delivery_status(row.try_get("status")?)
}

fn delivery_from_row(row: &SqliteRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: get_id(row, "id", IdKind::Delivery)?,
        event_id: get_id(row, "event_id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        event_type: row.try_get("event_type")?,
        status: get_status(row)?,
        attempt_count: get_u32(row, "attempt_count")?,
        next_attempt_at: get_opt_time(row, "next_attempt_at")?,
        last_attempt_at: get_opt_time(row, "last_attempt_at")?,
        last_status_code: get_status_code(row, "last_status_code")?,
        last_error: row.try_get("last_error")?,
        deferred_reason: row.try_get("deferred_reason")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

fn attempt_from_row(row: &SqliteRow) -> Result<Attempt, sqlx::Error> {
    let error_class = codec::error_class(row.try_get("error_class")?)?;
    Ok(Attempt {
        id: get_id(row, "id", IdKind::Attempt)?,
        delivery_id: get_id(row, "delivery_id", IdKind::Delivery)?,
        attempt_number: get_u32(row, "attempt_number")?,
        started_at: get_time(row, "started_at")?,
        duration_ms: get_u32(row, "duration_ms")?,
        status_code: get_status_code(row, "status_code")?,
        error_class,
        error_message: row.try_get("error_message")?,
        response_excerpt: row.try_get("response_excerpt")?,
    })
}

/// Appends the conditions of `filter` (the query already has a `WHERE`).
fn push_filter(q: &mut QueryBuilder<Sqlite>, filter: &DeliveryFilter) {
    if let Some(tenant) = &filter.tenant_id {
        q.push(" AND tenant_id = ").push_bind(tenant.as_str());
    }
    if let Some(sub) = &filter.subscription_id {
        q.push(" AND subscription_id = ").push_bind(sub.as_str());
    }
    if let Some(event) = &filter.event_id {
        q.push(" AND event_id = ").push_bind(event.as_str());
    }
    if let Some(status) = filter.status {
        q.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(since) = filter.since {
        q.push(" AND created_at >= ").push_bind(micros(since));
    }
    if let Some(until) = filter.until {
        q.push(" AND created_at < ").push_bind(micros(until));
    }
}

// ---------------------------------------------------------------------------------------------
// record_outcomes
// ---------------------------------------------------------------------------------------------

/// What a batch of outcomes builds on: the state of each delivery of the JSON array `?1` that
/// exists, and its highest attempt number.
const READ_DELIVERIES: &str = "\
SELECT d.id, d.status, d.attempt_count, d.next_attempt_at, d.last_attempt_at,
       d.last_status_code, d.last_error, d.deferred_reason, d.seq IS NOT NULL AS ordered,
       COALESCE((SELECT max(a.attempt_number) FROM attempts a WHERE a.delivery_id = d.id), 0)
           AS last_number
FROM deliveries d
WHERE d.id IN (SELECT value FROM json_each(?1))";

/// Which of the attempt ids of the JSON array `?1` are recorded already, and for which
/// delivery.
const KNOWN_ATTEMPTS: &str =
    "SELECT id, delivery_id FROM attempts WHERE id IN (SELECT value FROM json_each(?1))";

static INSERT_ATTEMPTS: BulkInsert = BulkInsert::new(
    "INSERT INTO attempts (id, delivery_id, attempt_number, started_at, duration_ms, \
     status_code, error_class, error_message, response_excerpt) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "",
);

/// The new state of each delivery of the JSON array `?1` of
/// `[id, status, attempt_count, next_attempt_at, last_attempt_at, last_status_code,
/// last_error, deferred_reason]`, changed at `?2`.
const WRITE_DELIVERIES: &str = "\
UPDATE deliveries
SET status = u.value ->> 1, attempt_count = u.value ->> 2, next_attempt_at = u.value ->> 3,
    last_attempt_at = u.value ->> 4, last_status_code = u.value ->> 5,
    last_error = u.value ->> 6, deferred_reason = u.value ->> 7, updated_at = ?2
FROM json_each(?1) AS u
WHERE deliveries.id = u.value ->> 0";

static SCHEDULE: BulkInsert = BulkInsert::new(
    "INSERT INTO retry_schedule (delivery_id, due_at, attempt_number) VALUES ",
    "(?, ?, ?)",
    " ON CONFLICT (delivery_id) \
     DO UPDATE SET due_at = excluded.due_at, attempt_number = excluded.attempt_number",
);

/// Drops the schedule rows of the deliveries of the JSON array `?1`.
const UNSCHEDULE: &str =
    "DELETE FROM retry_schedule WHERE delivery_id IN (SELECT value FROM json_each(?1))";

/// Marks the deliveries of the JSON array `?1` pending (queued for their next attempt) at `?2`.
const MARK_PENDING: &str = "\
UPDATE deliveries SET status = 'pending', next_attempt_at = NULL, deferred_reason = NULL,
    updated_at = ?2
WHERE id IN (SELECT value FROM json_each(?1))";

/// A manual retry of a finished delivery goes outside its ordered subscription's order
/// (`seq` cleared); one still waiting keeps its place. Run before [`MARK_PENDING`].
const LEAVE_ORDER: &str = "\
UPDATE deliveries SET seq = NULL
WHERE id IN (SELECT value FROM json_each(?1)) AND seq IS NOT NULL
    AND status IN ('succeeded', 'failed')";

/// A delivery's state from a row of [`READ_DELIVERIES`].
fn tally_from_row(row: &SqliteRow) -> Result<Tally, sqlx::Error> {
    Ok(Tally {
        status: get_status(row)?,
        attempt_count: get_u32(row, "attempt_count")?,
        next_attempt_at: get_opt_time(row, "next_attempt_at")?,
        last_attempt_at: get_opt_time(row, "last_attempt_at")?,
        last_status_code: get_status_code(row, "last_status_code")?,
        last_error: row.try_get("last_error")?,
        deferred_reason: row.try_get("deferred_reason")?,
        last_number: get_u32(row, "last_number")?,
        known_attempts: HashSet::new(),
        changed: false,
        ordered: row.try_get("ordered")?,
    })
}

/// The state of the batch's deliveries that exist, with the batch's attempts each has
/// recorded already.
async fn read_tallies(
    conn: &mut SqliteConnection,
    ids: &[&str],
    attempt_ids: &[&str],
) -> Result<HashMap<String, Tally>, StoreError> {
    let rows = sqlx::query(READ_DELIVERIES)
        .bind(id_array(ids.iter().copied()))
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let mut tallies: HashMap<String, Tally> = rows
        .iter()
        .map(|row| Ok((row.try_get("id")?, tally_from_row(row)?)))
        .collect::<Result<_, sqlx::Error>>()
        .db()?;
    if tallies.is_empty() || attempt_ids.is_empty() {
        return Ok(tallies);
    }
    let known = sqlx::query(KNOWN_ATTEMPTS)
        .bind(id_array(attempt_ids.iter().copied()))
        .fetch_all(&mut *conn)
        .await
        .db()?;
    for row in &known {
        let delivery: String = row.try_get("delivery_id").db()?;
        if let Some(t) = tallies.get_mut(&delivery) {
            t.known_attempts.insert(row.try_get("id").db()?);
        }
    }
    Ok(tallies)
}

/// A `deliveries` row's new state, as the JSON array [`WRITE_DELIVERIES`] takes apart.
type DeliveryState<'a> = (
    &'a str,
    &'static str,
    u32,
    Option<i64>,
    Option<i64>,
    Option<u16>,
    Option<&'a str>,
    Option<&'a str>,
);

/// Writes the batch: its attempts, the deliveries' new state (stamped `now`) and their
/// retry-schedule rows.
async fn write_outcomes(
    conn: &mut SqliteConnection,
    attempts: &[NewAttempt<'_>],
    tallies: &HashMap<String, Tally>,
    now: i64,
) -> Result<(), StoreError> {
    let mut states: Vec<DeliveryState<'_>> = Vec::new();
    let mut scheduled: Vec<(&str, i64, u32)> = Vec::new();
    let mut unscheduled: Vec<&str> = Vec::new();
    for (id, t) in tallies.iter().filter(|(_, t)| t.changed) {
        states.push((
            id.as_str(),
            t.status.as_str(),
            t.attempt_count,
            t.next_attempt_at.map(micros),
            t.last_attempt_at.map(micros),
            t.last_status_code,
            t.last_error.as_deref(),
            t.deferred_reason.as_deref(),
        ));
        match t.schedule() {
            Some((due, number)) => scheduled.push((id.as_str(), micros(due), number)),
            None => unscheduled.push(id.as_str()),
        }
    }
    if states.is_empty() {
        return Ok(());
    }
    insert_attempts(conn, attempts).await?;
    sqlx::query(WRITE_DELIVERIES)
        .bind(Json(&states))
        .bind(now)
        .execute(&mut *conn)
        .await
        .db()?;
    SCHEDULE
        .run(conn, &scheduled, |q, (id, due, number)| {
            q.bind(*id).bind(*due).bind(i64::from(*number))
        })
        .await
        .db()?;
    if !unscheduled.is_empty() {
        sqlx::query(UNSCHEDULE)
            .bind(id_array(unscheduled.iter().copied()))
            .execute(&mut *conn)
            .await
            .db()?;
    }
    Ok(())
}

async fn insert_attempts(
    conn: &mut SqliteConnection,
    attempts: &[NewAttempt<'_>],
) -> Result<(), StoreError> {
    INSERT_ATTEMPTS
        .run(conn, attempts, |q, r| {
            let a = r.attempt;
            q.bind(a.id.as_str())
                .bind(r.delivery_id.as_str())
                .bind(i64::from(r.number))
                .bind(micros(a.started_at))
                // Clamped as PostgreSQL's integer column would, so both adapters store the same.
                .bind(stored_duration_ms(a))
                .bind(a.status_code.map(i64::from))
                .bind(a.error_class.map(ErrorClass::as_str))
                .bind(a.error_message.as_deref())
                .bind(stored_excerpt(a))
        })
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique("attempts.id") => Some(violated::attempt_id_elsewhere()),
                _ => None,
            })
        })
}

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn record_outcomes(
        &self,
        outcomes: &[AttemptOutcome],
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, attempt_ids) = outcome::batch_ids(outcomes);
        let (mut tx, now) = self.write().await?;
        let mut tallies = read_tallies(&mut tx, &ids, &attempt_ids).await?;
        let attempts = outcome::apply(&mut tallies, outcomes);
        write_outcomes(&mut tx, &attempts, &tallies, now).await?;
        let promoted = ordered::advance(&mut tx, &crate::ordered::finished(&tallies), now).await?;
        tx.commit().await.db()?;
        Ok(promoted)
    }

    async fn may_attempt(&self, delivery_id: &Id) -> Result<bool, StoreError> {
        ordered::may_attempt(&self.reader, delivery_id).await
    }

    async fn promote_due_retries(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (mut tx, stamp) = self.write().await?;
        let rows = sqlx::query(
            "DELETE FROM retry_schedule WHERE delivery_id IN ( \
                SELECT delivery_id FROM retry_schedule WHERE due_at <= ?1 \
                ORDER BY due_at, delivery_id LIMIT ?2) \
             RETURNING delivery_id, due_at",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .db()?;
        if rows.is_empty() {
            tx.commit().await.db()?;
            return Ok(Vec::new());
        }
        // Most due first (RETURNING promises no order).
        let mut taken: Vec<(i64, String)> = rows
            .iter()
            .map(|r| Ok((r.try_get("due_at")?, r.try_get("delivery_id")?)))
            .collect::<Result<_, sqlx::Error>>()
            .db()?;
        taken.sort_unstable();
        let ids: Vec<&str> = taken.iter().map(|(_, id)| id.as_str()).collect();
        sqlx::query(MARK_PENDING)
            .bind(id_array(ids.iter().copied()))
            .bind(stamp)
            .execute(&mut *tx)
            .await
            .db()?;
        sqlx::query(QUEUE_IDS)
            .bind(id_array(ids.iter().copied()))
            .bind(stamp)
            .execute(&mut *tx)
            .await
            .db()?;
        let jobs = jobs_in_order(&mut tx, &ids).await?;
        tx.commit().await.db()?;
        Ok(jobs)
    }

    async fn requeue_deliveries(&self, ids: &[Id]) -> Result<Vec<DeliveryJob>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // In the order asked for, each once.
        let mut seen = HashSet::new();
        let asked: Vec<&str> = ids
            .iter()
            .map(Id::as_str)
            .filter(|id| seen.insert(*id))
            .collect();

        let (mut tx, now) = self.write().await?;
        let existing: HashSet<String> = sqlx::query_scalar(
            "SELECT id FROM deliveries WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_array(asked.iter().copied()))
        .fetch_all(&mut *tx)
        .await
        .db()?
        .into_iter()
        .collect();
        // On NotFound, dropping the transaction rolls it back: nothing changes.
        all_found("delivery", asked.iter().copied(), &existing)?;
        sqlx::query(UNSCHEDULE)
            .bind(id_array(asked.iter().copied()))
            .execute(&mut *tx)
            .await
            .db()?;
        sqlx::query(LEAVE_ORDER)
            .bind(id_array(asked.iter().copied()))
            .execute(&mut *tx)
            .await
            .db()?;
        sqlx::query(MARK_PENDING)
            .bind(id_array(asked.iter().copied()))
            .bind(now)
            .execute(&mut *tx)
            .await
            .db()?;
        sqlx::query(QUEUE_IDS)
            .bind(id_array(asked.iter().copied()))
            .bind(now)
            .execute(&mut *tx)
            .await
            .db()?;
        let jobs = jobs_in_order(&mut tx, &asked).await?;
        tx.commit().await.db()?;
        Ok(jobs)
    }

    async fn failed_deliveries(
        &self,
        subscription_id: &Id,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<Id>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT id FROM deliveries \
             WHERE subscription_id = ?1 AND status = 'failed' \
               AND created_at >= ?2 AND (?3 IS NULL OR created_at < ?3) \
             ORDER BY id LIMIT ?4",
        )
        .bind(subscription_id.as_str())
        .bind(micros(since))
        .bind(until.map(micros))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .db()?;
        rows.iter()
            .map(|r| get_id(r, "id", IdKind::Delivery).db())
            .collect()
    }

    async fn get_delivery(&self, id: &Id) -> Result<Delivery, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.reader)
        .await
        .db()?;
        delivery_from_row(&found(row, "delivery", id)?).db()
    }

    async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Delivery>, StoreError> {
        let limit = page.effective_limit();
        // Only the filters given become conditions (see `list_events`).
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE 1"
        ));
        push_filter(&mut q, filter);
        if let Some(after) = &page.after {
            q.push(" AND id < ").push_bind(after.as_str());
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(fetch_limit(limit));
        let rows = q.build().fetch_all(&self.reader).await.db()?;
        let items = map_rows(&rows, delivery_from_row)?;
        Ok(into_page(items, limit, |d| d.id.to_string()))
    }

    async fn list_attempts(
        &self,
        delivery_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Attempt>, StoreError> {
        let limit = page.effective_limit();
        let after = attempt_cursor(page)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            attempt_cols!(),
            " FROM attempts WHERE delivery_id = ?1 AND attempt_number > ?2 \
             ORDER BY attempt_number LIMIT ?3"
        ))
        .bind(delivery_id.as_str())
        .bind(after)
        .bind(fetch_limit(limit))
        .fetch_all(&self.reader)
        .await
        .db()?;
        let items = map_rows(&rows, attempt_from_row)?;
        Ok(into_page(items, limit, |a| a.attempt_number.to_string()))
    }

    async fn deliveries_updated_after(
        &self,
        filter: &DeliveryFilter,
        after: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE updated_at > "
        ));
        q.push_bind(micros(after));
        push_filter(&mut q, filter);
        q.push(" ORDER BY updated_at, id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.reader).await.db()?;
        map_rows(&rows, delivery_from_row)
    }
}
