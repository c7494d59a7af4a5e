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
use hookline_core::model::{Attempt, Delivery, DeliveryStatus, ErrorClass};
use hookline_core::{Id, IdKind};
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{QueryBuilder, Row, Transaction};

use super::PgStore;
use super::error::{Violation, map_violation};
use super::events::job_from_row;
use super::ordered;
use super::rows::{get_id, get_u32, map_rows};
use crate::StoreError;
use crate::codec::{self, stored_duration_ms, stored_excerpt};
use crate::error::Db;
use crate::error::{all_found, found, violated};
use crate::outcome::{self, NewAttempt, Tally, int4};
use crate::paging::{attempt_cursor, fetch_limit, into_page};
use crate::port::{AttemptOutcome, DeliveryFilter, DeliveryStore, Page, PageRequest};

// ---------------------------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------------------------

fn get_status_code(row: &PgRow, column: &str) -> Result<Option<u16>, sqlx::Error> {
    codec::status_code(
        column,
        row.try_get::<Option<i32>, _>(column)?.map(i64::from),
    )
}

fn get_status(row: &PgRow) -> Result<DeliveryStatus, sqlx::Error> {
    codec::delivery_status(row.try_get("status")?)
}

fn delivery_from_row(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: get_id(row, "id", IdKind::Delivery)?,
        event_id: get_id(row, "event_id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        event_type: row.try_get("event_type")?,
        status: get_status(row)?,
        attempt_count: get_u32(row, "attempt_count")?,
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
    Ok(Attempt {
        id: get_id(row, "id", IdKind::Attempt)?,
        delivery_id: get_id(row, "delivery_id", IdKind::Delivery)?,
        attempt_number: get_u32(row, "attempt_number")?,
        started_at: row.try_get("started_at")?,
        duration_ms: get_u32(row, "duration_ms")?,
        status_code: get_status_code(row, "status_code")?,
        error_class: codec::error_class(row.try_get("error_class")?)?,
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
       d.last_status_code, d.last_error, d.deferred_reason, d.seq IS NOT NULL AS ordered,
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

/// A delivery's state from a row of [`READ_DELIVERIES`].
fn tally_from_row(row: &PgRow) -> Result<Tally, sqlx::Error> {
    Ok(Tally {
        status: get_status(row)?,
        attempt_count: get_u32(row, "attempt_count")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        last_status_code: get_status_code(row, "last_status_code")?,
        last_error: row.try_get("last_error")?,
        deferred_reason: row.try_get("deferred_reason")?,
        last_number: get_u32(row, "last_number")?,
        known_attempts: row
            .try_get::<Vec<String>, _>("known_attempts")?
            .into_iter()
            .collect(),
        changed: false,
        ordered: row.try_get("ordered")?,
    })
}

/// Locks the batch's deliveries (in id order) and reads the state of those that exist.
async fn read_tallies(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
    attempt_ids: &[&str],
) -> Result<HashMap<String, Tally>, StoreError> {
    let existing: Vec<String> = sqlx::query_scalar(LOCK_DELIVERIES)
        .persistent(false)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await
        .db()?;
    if existing.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(READ_DELIVERIES)
        .persistent(false)
        .bind(&existing)
        .bind(attempt_ids)
        .fetch_all(&mut **tx)
        .await
        .db()?;
    rows.iter()
        .map(|row| Ok((row.try_get("id")?, tally_from_row(row)?)))
        .collect::<Result<_, sqlx::Error>>()
        .db()
}

/// The rows [`WRITE_OUTCOMES`] writes, as its parallel arrays.
#[derive(Default)]
struct OutcomeArrays<'a> {
    a_ids: Vec<&'a str>,
    a_deliveries: Vec<&'a str>,
    a_numbers: Vec<i32>,
    a_started: Vec<DateTime<Utc>>,
    a_durations: Vec<i32>,
    a_codes: Vec<Option<i32>>,
    a_classes: Vec<Option<&'static str>>,
    a_messages: Vec<Option<&'a str>>,
    a_excerpts: Vec<&'a [u8]>,
    d_ids: Vec<&'a str>,
    d_status: Vec<&'static str>,
    d_count: Vec<i32>,
    d_next: Vec<Option<DateTime<Utc>>>,
    d_last_at: Vec<Option<DateTime<Utc>>>,
    d_code: Vec<Option<i32>>,
    d_error: Vec<Option<&'a str>>,
    d_deferred: Vec<Option<&'a str>>,
    s_ids: Vec<&'a str>,
    s_due: Vec<DateTime<Utc>>,
    s_number: Vec<i32>,
    unscheduled: Vec<&'a str>,
}

impl<'a> OutcomeArrays<'a> {
    fn new(attempts: &[NewAttempt<'a>], tallies: &'a HashMap<String, Tally>) -> Self {
        let mut arrays = Self::default();
        for new in attempts {
            let a = new.attempt;
            arrays.a_ids.push(a.id.as_str());
            arrays.a_deliveries.push(new.delivery_id.as_str());
            arrays.a_numbers.push(int4(new.number));
            arrays.a_started.push(a.started_at);
            arrays.a_durations.push(stored_duration_ms(a));
            arrays.a_codes.push(a.status_code.map(i32::from));
            arrays.a_classes.push(a.error_class.map(ErrorClass::as_str));
            arrays.a_messages.push(a.error_message.as_deref());
            arrays.a_excerpts.push(stored_excerpt(a));
        }
        for (id, t) in tallies.iter().filter(|(_, t)| t.changed) {
            arrays.push_delivery(id, t);
        }
        arrays
    }

    fn push_delivery(&mut self, id: &'a str, t: &'a Tally) {
        self.d_ids.push(id);
        self.d_status.push(t.status.as_str());
        self.d_count.push(int4(t.attempt_count));
        self.d_next.push(t.next_attempt_at);
        self.d_last_at.push(t.last_attempt_at);
        self.d_code.push(t.last_status_code.map(i32::from));
        self.d_error.push(t.last_error.as_deref());
        self.d_deferred.push(t.deferred_reason.as_deref());
        match t.schedule() {
            Some((due, number)) => {
                self.s_ids.push(id);
                self.s_due.push(due);
                self.s_number.push(int4(number));
            }
            None => self.unscheduled.push(id),
        }
    }

    async fn write(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        sqlx::query(WRITE_OUTCOMES)
            .persistent(false)
            .bind(&self.a_ids)
            .bind(&self.a_deliveries)
            .bind(&self.a_numbers)
            .bind(&self.a_started)
            .bind(&self.a_durations)
            .bind(&self.a_codes)
            .bind(&self.a_classes)
            .bind(&self.a_messages)
            .bind(&self.a_excerpts)
            .bind(&self.d_ids)
            .bind(&self.d_status)
            .bind(&self.d_count)
            .bind(&self.d_next)
            .bind(&self.d_last_at)
            .bind(&self.d_code)
            .bind(&self.d_error)
            .bind(&self.s_ids)
            .bind(&self.s_due)
            .bind(&self.s_number)
            .bind(&self.unscheduled)
            .bind(&self.d_deferred)
            .execute(&mut **tx)
            .await
            .map_err(|e| {
                map_violation(e, |v| match v {
                    Violation::Unique("attempts_pkey") => Some(violated::attempt_id_elsewhere()),
                    _ => None,
                })
            })?;
        Ok(())
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
            updated_at = now(), \
            seq = CASE WHEN d.status IN ('succeeded', 'failed') THEN NULL ELSE d.seq END \
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
    async fn record_outcomes(
        &self,
        outcomes: &[AttemptOutcome],
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, attempt_ids) = outcome::batch_ids(outcomes);
        let mut tx = self.pool.begin().await.db()?;
        let mut tallies = read_tallies(&mut tx, &ids, &attempt_ids).await?;
        let attempts = outcome::apply(&mut tallies, outcomes);
        let arrays = OutcomeArrays::new(&attempts, &tallies);
        if !arrays.d_ids.is_empty() {
            arrays.write(&mut tx).await?;
        }
        let promoted = ordered::advance(&mut tx, &crate::ordered::finished(&tallies)).await?;
        tx.commit().await.db()?;
        Ok(promoted)
    }

    async fn may_attempt(&self, delivery_id: &Id) -> Result<bool, StoreError> {
        ordered::may_attempt(&self.pool, delivery_id).await
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
            .persistent(false)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .db()?;
        map_rows(&rows, job_from_row)
    }

    async fn requeue_deliveries(&self, ids: &[Id]) -> Result<Vec<DeliveryJob>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sorted: Vec<&str> = ids.iter().map(Id::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();

        let mut tx = self.pool.begin().await.db()?;
        let existing: HashSet<String> = sqlx::query_scalar::<_, String>(LOCK_DELIVERIES)
            .persistent(false)
            .bind(&sorted)
            .fetch_all(&mut *tx)
            .await
            .db()?
            .into_iter()
            .collect();
        // On NotFound, dropping the transaction rolls it back: nothing changes.
        all_found("delivery", ids.iter().map(Id::as_str), &existing)?;
        let rows = sqlx::query(REQUEUE)
            .persistent(false)
            .bind(&sorted)
            .fetch_all(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;

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
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
            " FROM deliveries WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
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
            .push_bind(fetch_limit(limit));
        let rows = q.build().fetch_all(&self.pool).await.db()?;
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
            " FROM attempts WHERE delivery_id = $1 AND attempt_number > $2 \
             ORDER BY attempt_number LIMIT $3"
        ))
        .bind(delivery_id.as_str())
        .bind(after)
        .bind(fetch_limit(limit))
        .fetch_all(&self.pool)
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
        let mut q = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE updated_at > "
        ));
        q.push_bind(after);
        push_filter(&mut q, filter);
        q.push(" ORDER BY updated_at, id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.pool).await.db()?;
        map_rows(&rows, delivery_from_row)
    }
}
