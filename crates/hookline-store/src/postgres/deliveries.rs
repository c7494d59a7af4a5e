//! [`DeliveryStore`] on PostgreSQL: attempts, the retry schedule, manual retries, listings.
//!
//! Locking rule: every writer locks a delivery row (`FOR NO KEY UPDATE`, which does not
//! block the foreign-key checks of rows referencing it) before it touches that delivery's
//! retry-schedule or outbox row, and locks several deliveries in id order. With one order
//! everywhere, dispatchers recording outcomes, schedulers promoting retries and manual
//! retries cannot deadlock one another; schedulers skip locked deliveries instead of
//! waiting for them.
//!
//! Round trips do not grow with the batch: `record_outcomes` is BEGIN, lock, read, one write
//! statement (`UNNEST` arrays into data-modifying CTEs), COMMIT; `promote_due_retries` is a
//! single statement.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{Attempt, Delivery, DeliveryStatus, ErrorClass, RESPONSE_EXCERPT_LIMIT};
use hookline_core::{Id, IdKind};
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{QueryBuilder, Row};

use super::events::{get_count, job_from_row};
use super::{
    PgStore, decode_error, effective_limit, found, get_id, into_page, map_rows, not_found,
};
use crate::StoreError;
use crate::port::{AttemptOutcome, DeliveryFilter, DeliveryStore, NextStep, Page, PageRequest};

// ---------------------------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------------------------

fn get_status_code(row: &PgRow, column: &str) -> Result<Option<u16>, sqlx::Error> {
    let raw: Option<i32> = row.try_get(column)?;
    raw.map(|v| {
        u16::try_from(v).map_err(|_| decode_error(column, format!("status code {v} out of range")))
    })
    .transpose()
}

fn get_status(row: &PgRow) -> Result<DeliveryStatus, sqlx::Error> {
    let raw: String = row.try_get("status")?;
    DeliveryStatus::parse(&raw)
        .ok_or_else(|| decode_error("status", format!("unknown delivery status {raw:?}")))
}

fn delivery_from_row(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: get_id(row, "id", IdKind::Delivery)?,
        event_id: get_id(row, "event_id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        event_type: row.try_get("event_type")?,
        status: get_status(row)?,
        attempt_count: get_count(row, "attempt_count")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        last_status_code: get_status_code(row, "last_status_code")?,
        last_error: row.try_get("last_error")?,
        deferred_reason: row.try_get("deferred_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn attempt_from_row(row: &PgRow) -> Result<Attempt, sqlx::Error> {
    let error_class = row
        .try_get::<Option<String>, _>("error_class")?
        .map(|raw| {
            ErrorClass::parse(&raw)
                .ok_or_else(|| decode_error("error_class", format!("unknown error class {raw:?}")))
        })
        .transpose()?;
    let duration: i32 = row.try_get("duration_ms")?;
    Ok(Attempt {
        id: get_id(row, "id", IdKind::Attempt)?,
        delivery_id: get_id(row, "delivery_id", IdKind::Delivery)?,
        attempt_number: get_count(row, "attempt_number")?,
        started_at: row.try_get("started_at")?,
        duration_ms: u32::try_from(duration)
            .map_err(|_| decode_error("duration_ms", format!("negative duration {duration}")))?,
        status_code: get_status_code(row, "status_code")?,
        error_class,
        error_message: row.try_get("error_message")?,
        response_excerpt: row.try_get("response_excerpt")?,
    })
}

/// Appends the conditions of `filter` (the query already has a `WHERE`).
fn push_filter(q: &mut QueryBuilder<Postgres>, filter: &DeliveryFilter) {
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
        q.push(" AND created_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        q.push(" AND created_at < ").push_bind(until);
    }
}

fn limit_param(limit: u32) -> i64 {
    i64::from(limit)
}

// ---------------------------------------------------------------------------------------------
// record_outcomes
// ---------------------------------------------------------------------------------------------

/// Locks the deliveries of a batch, in id order; returns those that exist.
const LOCK_DELIVERIES: &str =
    "SELECT id FROM deliveries WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// What a batch of outcomes builds on, read after the locks are held (so this statement's
/// snapshot includes every outcome committed before): each delivery's state, its highest
/// attempt number, and which of the batch's attempt ids it already has.
const READ_DELIVERIES: &str = "\
SELECT d.id, d.status, d.attempt_count, d.next_attempt_at, d.last_attempt_at,
       d.last_status_code, d.last_error, d.deferred_reason,
       COALESCE((SELECT max(a.attempt_number) FROM attempts a WHERE a.delivery_id = d.id), 0)
           AS last_number,
       ARRAY(SELECT a.id FROM attempts a WHERE a.delivery_id = d.id AND a.id = ANY($2))
           AS known_attempts
FROM deliveries d
WHERE d.id = ANY($1)";

/// The whole batch in one statement: attempts, delivery state, schedule rows.
const WRITE_OUTCOMES: &str = "\
WITH new_attempts AS (
    INSERT INTO attempts (id, delivery_id, attempt_number, started_at, duration_ms, status_code,
                          error_class, error_message, response_excerpt)
    SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::timestamptz[], $5::int4[],
                         $6::int4[], $7::text[], $8::text[], $9::bytea[])
),
changed AS (
    UPDATE deliveries d
    SET status = u.status, attempt_count = u.attempt_count, next_attempt_at = u.next_attempt_at,
        last_attempt_at = u.last_attempt_at, last_status_code = u.last_status_code,
        last_error = u.last_error, deferred_reason = u.deferred_reason, updated_at = now()
    FROM unnest($10::text[], $11::text[], $12::int4[], $13::timestamptz[], $14::timestamptz[],
                $15::int4[], $16::text[], $21::text[])
        AS u(id, status, attempt_count, next_attempt_at, last_attempt_at, last_status_code,
             last_error, deferred_reason)
    WHERE d.id = u.id
),
scheduled AS (
    INSERT INTO retry_schedule (delivery_id, due_at, attempt_number)
    SELECT * FROM unnest($17::text[], $18::timestamptz[], $19::int4[])
    ON CONFLICT (delivery_id)
        DO UPDATE SET due_at = EXCLUDED.due_at, attempt_number = EXCLUDED.attempt_number
),
unscheduled AS (
    DELETE FROM retry_schedule WHERE delivery_id = ANY($20::text[])
)
SELECT 1";

/// A delivery's state while the outcomes of a batch are applied to it, in order.
struct Tally {
    status: DeliveryStatus,
    attempt_count: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    last_attempt_at: Option<DateTime<Utc>>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    deferred_reason: Option<String>,
    last_number: i32,
    known_attempts: HashSet<String>,
    changed: bool,
}

impl Tally {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Tally {
            status: get_status(row)?,
            attempt_count: row.try_get("attempt_count")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            last_attempt_at: row.try_get("last_attempt_at")?,
            last_status_code: row.try_get("last_status_code")?,
            last_error: row.try_get("last_error")?,
            deferred_reason: row.try_get("deferred_reason")?,
            last_number: row.try_get("last_number")?,
            known_attempts: row
                .try_get::<Vec<String>, _>("known_attempts")?
                .into_iter()
                .collect(),
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

/// The `attempts` rows of a batch, as parallel arrays.
#[derive(Default)]
struct AttemptRows<'a> {
    ids: Vec<&'a str>,
    deliveries: Vec<&'a str>,
    numbers: Vec<i32>,
    started: Vec<DateTime<Utc>>,
    durations: Vec<i32>,
    codes: Vec<Option<i32>>,
    classes: Vec<Option<&'static str>>,
    messages: Vec<Option<&'a str>>,
    excerpts: Vec<&'a [u8]>,
}

impl<'a> AttemptRows<'a> {
    fn push(&mut self, delivery_id: &'a Id, number: i32, a: &'a Attempt) {
        self.ids.push(a.id.as_str());
        // The outcome names the delivery; the attempt's own field is not trusted over it.
        self.deliveries.push(delivery_id.as_str());
        self.numbers.push(number);
        self.started.push(a.started_at);
        // A measurement, not an input to refuse: clamp what an integer cannot hold.
        self.durations
            .push(i32::try_from(a.duration_ms).unwrap_or(i32::MAX));
        self.codes.push(a.status_code.map(i32::from));
        self.classes.push(a.error_class.map(ErrorClass::as_str));
        self.messages.push(a.error_message.as_deref());
        let excerpt = &a.response_excerpt;
        self.excerpts
            .push(&excerpt[..excerpt.len().min(RESPONSE_EXCERPT_LIMIT)]);
    }
}

// ---------------------------------------------------------------------------------------------
// Moving deliveries to the outbox
// ---------------------------------------------------------------------------------------------

/// Takes up to `$2` schedule rows due at `$1`, skipping deliveries another transaction holds,
/// and moves them to the outbox. Only rows this statement deleted are returned, so a row
/// that another promoter (or an outcome) took since the statement began is not. The picked
/// ids go to the DELETE as an array so that it looks them up by key instead of joining
/// every due row (a backlog can be large).
const PROMOTE: &str = concat!(
    "WITH picked AS ( \
        SELECT d.id FROM retry_schedule r JOIN deliveries d ON d.id = r.delivery_id \
        WHERE r.due_at <= $1 \
        ORDER BY r.due_at \
        LIMIT $2 \
        FOR NO KEY UPDATE OF d SKIP LOCKED), \
     taken AS ( \
        DELETE FROM retry_schedule r \
        WHERE r.delivery_id = ANY(ARRAY(SELECT id FROM picked)) AND r.due_at <= $1 \
        RETURNING r.delivery_id, r.due_at), \
     promoted AS ( \
        UPDATE deliveries d \
        SET status = 'pending', next_attempt_at = NULL, deferred_reason = NULL, \
            updated_at = now() \
        FROM taken t WHERE d.id = t.delivery_id \
        RETURNING ",
    job_cols!(),
    ", t.due_at), \
     queued AS ( \
        INSERT INTO delivery_outbox (delivery_id) SELECT id FROM promoted \
        ON CONFLICT (delivery_id) DO NOTHING) \
     SELECT p.*, e.payload FROM promoted p JOIN events e ON e.id = p.event_id \
     ORDER BY p.due_at, p.id"
);

/// Requeues `$1` (already locked by the caller): drops their schedule rows, marks them
/// pending and puts them in the outbox.
const REQUEUE: &str = concat!(
    "WITH unscheduled AS ( \
        DELETE FROM retry_schedule WHERE delivery_id = ANY($1)), \
     requeued AS ( \
        UPDATE deliveries d \
        SET status = 'pending', next_attempt_at = NULL, deferred_reason = NULL, \
            updated_at = now() \
        WHERE d.id = ANY($1) \
        RETURNING ",
    job_cols!(),
    "), \
     queued AS ( \
        INSERT INTO delivery_outbox (delivery_id) SELECT id FROM requeued \
        ON CONFLICT (delivery_id) DO NOTHING) \
     SELECT r.*, e.payload FROM requeued r JOIN events e ON e.id = r.event_id"
);

#[async_trait]
impl DeliveryStore for PgStore {
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

        let mut tx = self.pool.begin().await?;
        let existing: Vec<String> = sqlx::query_scalar(LOCK_DELIVERIES)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        if existing.is_empty() {
            // Every delivery is gone (its subscription or tenant was deleted).
            tx.commit().await?;
            return Ok(());
        }
        let rows = sqlx::query(READ_DELIVERIES)
            .bind(&existing)
            .bind(&attempt_ids)
            .fetch_all(&mut *tx)
            .await?;
        let mut tallies: HashMap<String, Tally> = HashMap::with_capacity(rows.len());
        for row in &rows {
            tallies.insert(row.try_get("id")?, Tally::from_row(row)?);
        }

        // Apply the outcomes in the order given.
        let mut attempts = AttemptRows::default();
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
                attempts.push(&outcome.delivery_id, t.last_number, a);
                t.last_attempt_at = Some(a.started_at);
                t.last_status_code = a.status_code.map(i32::from);
                t.last_error = attempt_error(a);
            }
            match &outcome.next {
                NextStep::Succeeded => {
                    t.status = DeliveryStatus::Succeeded;
                    t.next_attempt_at = None;
                }
                NextStep::RetryAt(at) => {
                    t.status = DeliveryStatus::Retrying;
                    t.next_attempt_at = Some(*at);
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

        let changed: Vec<(&String, &Tally)> = tallies.iter().filter(|(_, t)| t.changed).collect();
        if changed.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        let n = changed.len();
        let (mut d_ids, mut d_status, mut d_count) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut d_next, mut d_last_at, mut d_code, mut d_error) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut d_deferred = Vec::with_capacity(n);
        let (mut s_ids, mut s_due, mut s_number, mut unscheduled) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, t) in changed {
            d_ids.push(id.as_str());
            d_status.push(t.status.as_str());
            d_count.push(t.attempt_count);
            d_next.push(t.next_attempt_at);
            d_last_at.push(t.last_attempt_at);
            d_code.push(t.last_status_code);
            d_error.push(t.last_error.as_deref());
            d_deferred.push(t.deferred_reason.as_deref());
            match (t.status, t.next_attempt_at) {
                (DeliveryStatus::Retrying, Some(due)) => {
                    s_ids.push(id.as_str());
                    s_due.push(due);
                    s_number.push(t.attempt_count.saturating_add(1));
                }
                _ => unscheduled.push(id.as_str()),
            }
        }

        sqlx::query(WRITE_OUTCOMES)
            .bind(&attempts.ids)
            .bind(&attempts.deliveries)
            .bind(&attempts.numbers)
            .bind(&attempts.started)
            .bind(&attempts.durations)
            .bind(&attempts.codes)
            .bind(&attempts.classes)
            .bind(&attempts.messages)
            .bind(&attempts.excerpts)
            .bind(&d_ids)
            .bind(&d_status)
            .bind(&d_count)
            .bind(&d_next)
            .bind(&d_last_at)
            .bind(&d_code)
            .bind(&d_error)
            .bind(&s_ids)
            .bind(&s_due)
            .bind(&s_number)
            .bind(&unscheduled)
            .bind(&d_deferred)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                super::map_violation(e, |v| match v {
                    super::Violation::Unique("attempts_pkey") => Some(StoreError::Conflict(
                        "an attempt id of the batch belongs to another delivery; \
                         record it with a new attempt id"
                            .to_string(),
                    )),
                    _ => None,
                })
            })?;
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
        let rows = sqlx::query(PROMOTE)
            .bind(now)
            .bind(limit_param(limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, job_from_row)
    }

    async fn requeue_deliveries(&self, ids: &[Id]) -> Result<Vec<DeliveryJob>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sorted: Vec<&str> = ids.iter().map(Id::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();

        let mut tx = self.pool.begin().await?;
        let existing: HashSet<String> = sqlx::query_scalar::<_, String>(LOCK_DELIVERIES)
            .bind(&sorted)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        if let Some(missing) = ids.iter().find(|id| !existing.contains(id.as_str())) {
            // Dropping the transaction rolls it back: nothing changes.
            return Err(not_found("delivery", missing));
        }
        let rows = sqlx::query(REQUEUE)
            .bind(&sorted)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;

        let mut jobs: HashMap<Id, DeliveryJob> = map_rows(&rows, job_from_row)?
            .into_iter()
            .map(|j| (j.delivery_id.clone(), j))
            .collect();
        // In the order asked for, each once.
        Ok(ids.iter().filter_map(|id| jobs.remove(id)).collect())
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
             WHERE subscription_id = $1 AND status = 'failed' \
               AND created_at >= $2 AND ($3::timestamptz IS NULL OR created_at < $3) \
             ORDER BY id LIMIT $4",
        )
        .bind(subscription_id.as_str())
        .bind(since)
        .bind(until)
        .bind(limit_param(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| get_id(r, "id", IdKind::Delivery).map_err(StoreError::from))
            .collect()
    }

    async fn get_delivery(&self, id: &Id) -> Result<Delivery, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
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
        let mut q = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE true"
        ));
        push_filter(&mut q, filter);
        if let Some(after) = &page.after {
            q.push(" AND id < ").push_bind(after.as_str());
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit) + 1);
        let rows = q.build().fetch_all(&self.pool).await?;
        let items = map_rows(&rows, delivery_from_row)?;
        Ok(into_page(items, limit, |d| d.id.to_string()))
    }

    async fn list_attempts(
        &self,
        delivery_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Attempt>, StoreError> {
        let limit = effective_limit(page);
        let after: i32 = match page.after.as_deref() {
            None => 0,
            Some(cursor) => cursor
                .parse::<u32>()
                .ok()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| not_found("page token", cursor))?,
        };
        let rows = sqlx::query(concat!(
            "SELECT ",
            attempt_cols!(),
            " FROM attempts WHERE delivery_id = $1 AND attempt_number > $2 \
             ORDER BY attempt_number LIMIT $3"
        ))
        .bind(delivery_id.as_str())
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
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
        let mut q = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE updated_at > "
        ));
        q.push_bind(after);
        push_filter(&mut q, filter);
        q.push(" ORDER BY updated_at, id LIMIT ")
            .push_bind(limit_param(limit));
        let rows = q.build().fetch_all(&self.pool).await?;
        map_rows(&rows, delivery_from_row)
    }
}
