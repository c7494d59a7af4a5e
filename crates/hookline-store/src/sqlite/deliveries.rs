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
use hookline_core::model::{Attempt, Delivery, DeliveryStatus, ErrorClass, RESPONSE_EXCERPT_LIMIT};
use hookline_core::{Id, IdKind};
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::events::{QUEUE_IDS, jobs_in_order};
use super::{
    BulkInsert, SqliteStore, Violation, decode_error, effective_limit, found, get_id, get_opt_time,
    get_time, get_u32, id_array, into_page, map_rows, map_violation, micros, not_found,
};
use crate::StoreError;
use crate::port::{AttemptOutcome, DeliveryFilter, DeliveryStore, NextStep, Page, PageRequest};

// ---------------------------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------------------------

fn get_status_code(row: &SqliteRow, column: &str) -> Result<Option<u16>, sqlx::Error> {
    let raw: Option<i64> = row.try_get(column)?;
    raw.map(|v| {
        u16::try_from(v).map_err(|_| decode_error(column, format!("status code {v} out of range")))
    })
    .transpose()
}

fn get_status(row: &SqliteRow) -> Result<DeliveryStatus, sqlx::Error> {
    let raw: String = row.try_get("status")?;
    DeliveryStatus::parse(&raw)
        .ok_or_else(|| decode_error("status", format!("unknown delivery status {raw:?}")))
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
    let error_class = row
        .try_get::<Option<String>, _>("error_class")?
        .map(|raw| {
            ErrorClass::parse(&raw)
                .ok_or_else(|| decode_error("error_class", format!("unknown error class {raw:?}")))
        })
        .transpose()?;
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
       d.last_status_code, d.last_error, d.deferred_reason,
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

/// A delivery's state while the outcomes of a batch are applied to it, in order.
struct Tally {
    status: DeliveryStatus,
    attempt_count: i64,
    next_attempt_at: Option<i64>,
    last_attempt_at: Option<i64>,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    deferred_reason: Option<String>,
    last_number: i64,
    known_attempts: HashSet<String>,
    changed: bool,
}

impl Tally {
    fn from_row(row: &SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(Tally {
            status: get_status(row)?,
            attempt_count: row.try_get("attempt_count")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            last_attempt_at: row.try_get("last_attempt_at")?,
            last_status_code: row.try_get("last_status_code")?,
            last_error: row.try_get("last_error")?,
            deferred_reason: row.try_get("deferred_reason")?,
            last_number: row.try_get("last_number")?,
            known_attempts: HashSet::new(),
            changed: false,
        })
    }
}

/// What `last_error` says after an attempt: its error, else a non-2xx status.
fn attempt_error(attempt: &Attempt) -> Option<String> {
    attempt.error_message.clone().or_else(|| {
        attempt
            .status_code
            .filter(|code| !(200..300).contains(code))
            .map(|code| format!("HTTP {code}"))
    })
}

/// An `attempts` row to insert.
struct AttemptRow<'a> {
    delivery_id: &'a str,
    number: i64,
    attempt: &'a Attempt,
}

/// A `deliveries` row's new state, as the JSON array [`WRITE_DELIVERIES`] takes apart.
type DeliveryState<'a> = (
    &'a str,
    &'static str,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<&'a str>,
    Option<&'a str>,
);

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn record_outcomes(&self, outcomes: &[AttemptOutcome]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<&str> = outcomes.iter().map(|o| o.delivery_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let attempt_ids: Vec<&str> = outcomes
            .iter()
            .filter_map(|o| o.attempt.as_ref())
            .map(|a| a.id.as_str())
            .collect();

        let (mut tx, now) = self.write().await?;
        let rows = sqlx::query(READ_DELIVERIES)
            .bind(id_array(ids.iter().copied()))
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            // Every delivery is gone (its subscription or tenant was deleted).
            tx.commit().await?;
            return Ok(());
        }
        let mut tallies: HashMap<String, Tally> = HashMap::with_capacity(rows.len());
        for row in &rows {
            tallies.insert(row.try_get("id")?, Tally::from_row(row)?);
        }
        if !attempt_ids.is_empty() {
            let known = sqlx::query(KNOWN_ATTEMPTS)
                .bind(id_array(attempt_ids.iter().copied()))
                .fetch_all(&mut *tx)
                .await?;
            for row in &known {
                let delivery: String = row.try_get("delivery_id")?;
                if let Some(t) = tallies.get_mut(&delivery) {
                    t.known_attempts.insert(row.try_get("id")?);
                }
            }
        }

        // Apply the outcomes in the order given.
        let mut attempts: Vec<AttemptRow<'_>> = Vec::new();
        for outcome in outcomes {
            let Some(t) = tallies.get_mut(outcome.delivery_id.as_str()) else {
                continue; // the delivery no longer exists
            };
            if let Some(a) = &outcome.attempt {
                if !t.known_attempts.insert(a.id.to_string()) {
                    // This very attempt is recorded already: a write being retried.
                    continue;
                }
                t.last_number = t.last_number.saturating_add(1);
                t.attempt_count = t.attempt_count.saturating_add(1);
                attempts.push(AttemptRow {
                    // The outcome names the delivery; the attempt's own field is not trusted
                    // over it.
                    delivery_id: outcome.delivery_id.as_str(),
                    number: t.last_number,
                    attempt: a,
                });
                t.last_attempt_at = Some(micros(a.started_at));
                t.last_status_code = a.status_code.map(i64::from);
                t.last_error = attempt_error(a);
            }
            match &outcome.next {
                NextStep::Succeeded => {
                    t.status = DeliveryStatus::Succeeded;
                    t.next_attempt_at = None;
                }
                NextStep::RetryAt(at) => {
                    t.status = DeliveryStatus::Retrying;
                    t.next_attempt_at = Some(micros(*at));
                }
                NextStep::Failed { reason } => {
                    t.status = DeliveryStatus::Failed;
                    t.next_attempt_at = None;
                    // Say why it stopped, and keep what the last attempt got.
                    t.last_error = Some(match (&outcome.attempt, &t.last_error) {
                        (Some(_), Some(last)) => format!("{reason} (last attempt: {last})"),
                        _ => reason.clone(),
                    });
                }
            }
            t.deferred_reason = outcome.deferral();
            t.changed = true;
        }

        let mut states: Vec<DeliveryState<'_>> = Vec::new();
        let mut scheduled: Vec<(&str, i64, i64)> = Vec::new();
        let mut unscheduled: Vec<&str> = Vec::new();
        for (id, t) in tallies.iter().filter(|(_, t)| t.changed) {
            states.push((
                id.as_str(),
                t.status.as_str(),
                t.attempt_count,
                t.next_attempt_at,
                t.last_attempt_at,
                t.last_status_code,
                t.last_error.as_deref(),
                t.deferred_reason.as_deref(),
            ));
            match (t.status, t.next_attempt_at) {
                (DeliveryStatus::Retrying, Some(due)) => {
                    scheduled.push((id.as_str(), due, t.attempt_count.saturating_add(1)));
                }
                _ => unscheduled.push(id.as_str()),
            }
        }
        if states.is_empty() {
            tx.commit().await?;
            return Ok(());
        }

        INSERT_ATTEMPTS
            .run(&mut tx, &attempts, |q, r| {
                let a = r.attempt;
                let excerpt = &a.response_excerpt;
                q.bind(a.id.as_str())
                    .bind(r.delivery_id)
                    .bind(r.number)
                    .bind(micros(a.started_at))
                    // A measurement, not an input to refuse: clamp what PostgreSQL's integer
                    // column could not hold, so both adapters store the same.
                    .bind(i64::from(i32::try_from(a.duration_ms).unwrap_or(i32::MAX)))
                    .bind(a.status_code.map(i64::from))
                    .bind(a.error_class.map(ErrorClass::as_str))
                    .bind(a.error_message.as_deref())
                    .bind(&excerpt[..excerpt.len().min(RESPONSE_EXCERPT_LIMIT)])
            })
            .await
            .map_err(|e| {
                map_violation(e, |v| match v {
                    Violation::Unique("attempts.id") => Some(StoreError::Conflict(
                        "an attempt id of the batch belongs to another delivery; \
                         record it with a new attempt id"
                            .to_string(),
                    )),
                    _ => None,
                })
            })?;
        sqlx::query(WRITE_DELIVERIES)
            .bind(Json(&states))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        SCHEDULE
            .run(&mut tx, &scheduled, |q, (id, due, number)| {
                q.bind(*id).bind(*due).bind(*number)
            })
            .await?;
        if !unscheduled.is_empty() {
            sqlx::query(UNSCHEDULE)
                .bind(id_array(unscheduled.iter().copied()))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
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
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        // Most due first (RETURNING promises no order).
        let mut taken: Vec<(i64, String)> = rows
            .iter()
            .map(|r| Ok((r.try_get("due_at")?, r.try_get("delivery_id")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        taken.sort_unstable();
        let ids: Vec<&str> = taken.iter().map(|(_, id)| id.as_str()).collect();
        sqlx::query(MARK_PENDING)
            .bind(id_array(ids.iter().copied()))
            .bind(stamp)
            .execute(&mut *tx)
            .await?;
        sqlx::query(QUEUE_IDS)
            .bind(id_array(ids.iter().copied()))
            .bind(stamp)
            .execute(&mut *tx)
            .await?;
        let jobs = jobs_in_order(&mut tx, &ids).await?;
        tx.commit().await?;
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
        .await?
        .into_iter()
        .collect();
        if let Some(missing) = asked.iter().find(|id| !existing.contains(**id)) {
            // Dropping the transaction rolls it back: nothing changes.
            return Err(not_found("delivery", missing));
        }
        sqlx::query(UNSCHEDULE)
            .bind(id_array(asked.iter().copied()))
            .execute(&mut *tx)
            .await?;
        sqlx::query(MARK_PENDING)
            .bind(id_array(asked.iter().copied()))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(QUEUE_IDS)
            .bind(id_array(asked.iter().copied()))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let jobs = jobs_in_order(&mut tx, &asked).await?;
        tx.commit().await?;
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
        .await?;
        rows.iter()
            .map(|r| get_id(r, "id", IdKind::Delivery).map_err(StoreError::from))
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
        .await?;
        Ok(delivery_from_row(&found(row, "delivery", id)?)?)
    }

    async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Delivery>, StoreError> {
        let limit = effective_limit(page);
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
            .push_bind(i64::from(limit) + 1);
        let rows = q.build().fetch_all(&self.reader).await?;
        let items = map_rows(&rows, delivery_from_row)?;
        Ok(into_page(items, limit, |d| d.id.to_string()))
    }

    async fn list_attempts(
        &self,
        delivery_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Attempt>, StoreError> {
        let limit = effective_limit(page);
        let after: i64 = match page.after.as_deref() {
            None => 0,
            Some(cursor) => cursor
                .parse::<u32>()
                .ok()
                .and_then(|n| i32::try_from(n).ok())
                .map(i64::from)
                .ok_or_else(|| not_found("page token", cursor))?,
        };
        let rows = sqlx::query(concat!(
            "SELECT ",
            attempt_cols!(),
            " FROM attempts WHERE delivery_id = ?1 AND attempt_number > ?2 \
             ORDER BY attempt_number LIMIT ?3"
        ))
        .bind(delivery_id.as_str())
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await?;
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
        let rows = q.build().fetch_all(&self.reader).await?;
        map_rows(&rows, delivery_from_row)
    }
}
