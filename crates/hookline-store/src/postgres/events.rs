//! [`EventStore`] on PostgreSQL: the write path of ingest and the outbox.
//!
//! `insert_events` is the hottest statement of the system, so a batch is one statement (one
//! round trip, one implicit transaction, whatever its size): the events, their deliveries
//! and their outbox rows go in through `UNNEST` arrays in data-modifying CTEs. Only a batch
//! that repeats an idempotency key already stored costs a second, read-only round trip to
//! report the original event.
//!
//! Idempotency rests on the partial unique index `(tenant_id, idempotency_key)`: a publish
//! racing another with the same key waits for it on the index, then `DO NOTHING`s, so the
//! tenant ends with exactly one event. Keyed rows are inserted in key order, so two batches
//! that share keys take those index entries in the same order and cannot deadlock.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::Event;
use hookline_core::{Id, IdKind};
use sqlx::QueryBuilder;
use sqlx::Row;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::types::Json;

use super::{
    PgStore, Violation, decode_error, effective_limit, found, get_id, into_page, map_rows,
    map_violation, not_found, violating_value,
};
use crate::StoreError;
use crate::port::{EventFilter, EventStore, InsertOutcome, NewEvent, Page, PageRequest};

// ---------------------------------------------------------------------------------------------
// Row mapping, shared with `deliveries`
// ---------------------------------------------------------------------------------------------

pub(super) fn event_from_row(row: &PgRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: get_id(row, "id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        channels: row.try_get("channels")?,
        idempotency_key: row.try_get("idempotency_key")?,
        created_at: row.try_get("created_at")?,
    })
}

/// `attempt_count` of a delivery row as a `u32`.
pub(super) fn get_count(row: &PgRow, column: &str) -> Result<u32, sqlx::Error> {
    let raw: i32 = row.try_get(column)?;
    u32::try_from(raw).map_err(|_| decode_error(column, format!("negative count {raw}")))
}

/// A job from a row of [`job_cols!`] plus `payload`: the next attempt of the delivery.
pub(super) fn job_from_row(row: &PgRow) -> Result<DeliveryJob, sqlx::Error> {
    Ok(DeliveryJob {
        delivery_id: get_id(row, "id", IdKind::Delivery)?,
        event_id: get_id(row, "event_id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        event_type: row.try_get("event_type")?,
        attempt_number: get_count(row, "attempt_count")?.saturating_add(1),
        payload: row.try_get("payload")?,
        traceparent: row.try_get("traceparent")?,
    })
}

// ---------------------------------------------------------------------------------------------
// insert_events
// ---------------------------------------------------------------------------------------------

/// Events, their deliveries and outbox rows, in one statement. Deliveries are created only
/// for events that were inserted (not for a repeated idempotency key) and only for
/// subscriptions that still exist: the subscription row is share-locked, so one being
/// deleted concurrently is either waited for and skipped, or deleted after this commits
/// (taking these deliveries with it). The result lists inserted event ids (`is_event`) and
/// inserted delivery ids.
const INSERT_EVENTS: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[],
                         $6::text[], $7::timestamptz[])
        WITH ORDINALITY AS u(id, tenant_id, event_type, payload, channels, idempotency_key,
                             created_at, ord)
),
inserted_events AS (
    INSERT INTO events (id, tenant_id, event_type, payload, channels, idempotency_key,
                        created_at)
    SELECT id, tenant_id, event_type, payload,
           ARRAY(SELECT jsonb_array_elements_text(channels)), idempotency_key, created_at
    FROM input
    ORDER BY ord
    ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
),
inserted_deliveries AS (
    INSERT INTO deliveries (id, event_id, tenant_id, subscription_id, event_type, traceparent)
    SELECT v.id, v.event_id, v.tenant_id, v.subscription_id, v.event_type, v.traceparent
    FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
            AS v(id, event_id, tenant_id, subscription_id, event_type, traceparent)
        JOIN inserted_events e ON e.id = v.event_id
        JOIN subscriptions s ON s.id = v.subscription_id
    FOR KEY SHARE OF s
    RETURNING id
),
outbox AS (
    INSERT INTO delivery_outbox (delivery_id) SELECT id FROM inserted_deliveries
)
SELECT true AS is_event, id FROM inserted_events
UNION ALL
SELECT false AS is_event, id FROM inserted_deliveries";

/// The stored events of the given (tenant, idempotency key) pairs and how many deliveries
/// each has.
const FIND_BY_KEYS: &str = "\
SELECT e.tenant_id, e.idempotency_key, e.id,
       (SELECT count(*) FROM deliveries d WHERE d.event_id = e.id) AS deliveries
FROM events e
    JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, idempotency_key)
        ON e.tenant_id = k.tenant_id AND e.idempotency_key = k.idempotency_key";

/// What the batch asks of one event, worked out before the database is asked.
enum Plan {
    /// Insert it, with these (delivery id, subscription id) pairs.
    Insert(Vec<(Id, Id)>),
    /// An earlier event of the batch (this index) has the same tenant and idempotency key.
    RepeatOf(usize),
}

fn plan(events: &[NewEvent]) -> Vec<Plan> {
    let mut first_with_key: HashMap<(&str, &str), usize> = HashMap::new();
    events
        .iter()
        .enumerate()
        .map(|(i, new)| {
            if let Some(key) = new.event.idempotency_key.as_deref() {
                let first = *first_with_key
                    .entry((new.event.tenant_id.as_str(), key))
                    .or_insert(i);
                if first != i {
                    return Plan::RepeatOf(first);
                }
            }
            // One delivery per subscription, even if a caller named one twice.
            let mut seen = HashSet::new();
            let deliveries = new
                .subscription_ids
                .iter()
                .filter(|s| seen.insert(*s))
                .map(|s| (Id::new(IdKind::Delivery), s.clone()))
                .collect();
            Plan::Insert(deliveries)
        })
        .collect()
}

fn insert_error(err: sqlx::Error, events: &[NewEvent]) -> StoreError {
    let value = violating_value(&err);
    let first_tenant = || events.first().map(|e| e.event.tenant_id.to_string());
    map_violation(err, |v| match v {
        Violation::Unique("events_pkey") => Some(StoreError::Conflict(format!(
            "event {} already exists; publish with a new event id",
            value.unwrap_or_default()
        ))),
        Violation::Unique(_) => Some(StoreError::Conflict(
            "a generated delivery id is already taken; publish again".to_string(),
        )),
        Violation::ForeignKey("events_tenant_fkey") => {
            Some(not_found("tenant", value.or_else(first_tenant)?))
        }
        Violation::ForeignKey("deliveries_subscription_fkey") => {
            Some(not_found("subscription", value?))
        }
        Violation::ForeignKey(_) => None,
    })
}

#[async_trait]
impl EventStore for PgStore {
    async fn insert_events(&self, events: &[NewEvent]) -> Result<Vec<InsertOutcome>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let plans = plan(events);

        // Keyed events in key order (see the module docs), the others after them.
        let mut order: Vec<usize> = plans
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Plan::Insert(_)))
            .map(|(i, _)| i)
            .collect();
        order.sort_by_key(|&i| {
            let e = &events[i].event;
            (
                e.idempotency_key.is_none(),
                e.tenant_id.as_str(),
                e.idempotency_key.as_deref(),
            )
        });

        let n = order.len();
        let mut ids = Vec::with_capacity(n);
        let mut tenants = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut channels = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut d_ids = Vec::new();
        let mut d_events = Vec::new();
        let mut d_tenants = Vec::new();
        let mut d_subs = Vec::new();
        let mut d_types = Vec::new();
        let mut d_traces = Vec::new();
        for &i in &order {
            let e = &events[i].event;
            let traceparent = events[i].traceparent.as_deref();
            ids.push(e.id.as_str());
            tenants.push(e.tenant_id.as_str());
            types.push(e.event_type.as_str());
            payloads.push(e.payload.as_slice());
            channels.push(Json(e.channels.as_slice()));
            keys.push(e.idempotency_key.as_deref());
            created.push(e.created_at);
            if let Plan::Insert(deliveries) = &plans[i] {
                for (d, s) in deliveries {
                    d_ids.push(d.as_str());
                    d_events.push(e.id.as_str());
                    d_tenants.push(e.tenant_id.as_str());
                    d_subs.push(s.as_str());
                    d_types.push(e.event_type.as_str());
                    d_traces.push(traceparent);
                }
            }
        }

        let rows = sqlx::query(INSERT_EVENTS)
            .bind(&ids)
            .bind(&tenants)
            .bind(&types)
            .bind(&payloads)
            .bind(&channels)
            .bind(&keys)
            .bind(&created)
            .bind(&d_ids)
            .bind(&d_events)
            .bind(&d_tenants)
            .bind(&d_subs)
            .bind(&d_types)
            .bind(&d_traces)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| insert_error(e, events))?;
        let mut inserted_events = HashSet::new();
        let mut inserted_deliveries = HashSet::new();
        for row in &rows {
            let id: String = row.try_get("id")?;
            if row.try_get("is_event")? {
                inserted_events.insert(id);
            } else {
                inserted_deliveries.insert(id);
            }
        }

        // Keyed events that were not inserted repeat a key stored before: find the originals.
        let (mut k_tenants, mut k_keys) = (Vec::new(), Vec::new());
        for &i in &order {
            let e = &events[i].event;
            if let Some(key) = e.idempotency_key.as_deref()
                && !inserted_events.contains(e.id.as_str())
            {
                k_tenants.push(e.tenant_id.as_str());
                k_keys.push(key);
            }
        }
        let mut originals: HashMap<(String, String), (Id, u32)> = HashMap::new();
        if !k_keys.is_empty() {
            let rows = sqlx::query(FIND_BY_KEYS)
                .bind(&k_tenants)
                .bind(&k_keys)
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                let count: i64 = row.try_get("deliveries")?;
                originals.insert(
                    (row.try_get("tenant_id")?, row.try_get("idempotency_key")?),
                    (
                        get_id(row, "id", IdKind::Event)?,
                        u32::try_from(count).unwrap_or(u32::MAX),
                    ),
                );
            }
        }

        let mut outcomes: Vec<InsertOutcome> = Vec::with_capacity(events.len());
        for (new, plan) in events.iter().zip(&plans) {
            let e = &new.event;
            let outcome = match plan {
                Plan::RepeatOf(first) => {
                    let (event_id, deliveries) = match &outcomes[*first] {
                        InsertOutcome::Created { event_id, jobs } => (
                            event_id.clone(),
                            u32::try_from(jobs.len()).unwrap_or(u32::MAX),
                        ),
                        InsertOutcome::Duplicate {
                            event_id,
                            deliveries,
                        } => (event_id.clone(), *deliveries),
                    };
                    InsertOutcome::Duplicate {
                        event_id,
                        deliveries,
                    }
                }
                Plan::Insert(deliveries) if inserted_events.contains(e.id.as_str()) => {
                    InsertOutcome::Created {
                        event_id: e.id.clone(),
                        jobs: deliveries
                            .iter()
                            .filter(|(d, _)| inserted_deliveries.contains(d.as_str()))
                            .map(|(d, s)| DeliveryJob {
                                delivery_id: d.clone(),
                                event_id: e.id.clone(),
                                tenant_id: e.tenant_id.clone(),
                                subscription_id: s.clone(),
                                event_type: e.event_type.clone(),
                                attempt_number: 1,
                                payload: e.payload.clone(),
                                traceparent: new.traceparent.clone(),
                            })
                            .collect(),
                    }
                }
                Plan::Insert(_) => {
                    let key = e.idempotency_key.clone().unwrap_or_default();
                    let (event_id, deliveries) = originals
                        .get(&(e.tenant_id.to_string(), key.clone()))
                        .cloned()
                        .ok_or_else(|| {
                            // The event holding the key was deleted (with its tenant) between
                            // the insert and the look-up.
                            StoreError::Conflict(format!(
                                "idempotency key {key:?} of tenant {} was in use by an event \
                                 that was just deleted; publish again",
                                e.tenant_id
                            ))
                        })?;
                    InsertOutcome::Duplicate {
                        event_id,
                        deliveries,
                    }
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn confirm_published(&self, delivery_ids: &[Id]) -> Result<(), StoreError> {
        if delivery_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = delivery_ids.iter().map(Id::as_str).collect();
        sqlx::query("DELETE FROM delivery_outbox WHERE delivery_id = ANY($1)")
            .bind(&ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn lease_unpublished(
        &self,
        older_than: DateTime<Utc>,
        limit: u32,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // SKIP LOCKED passes over rows another relay is leasing right now; the recheck of the
        // WHERE clause on the locked row passes over rows leased since this statement began.
        // The chosen ids reach the UPDATE as an array, so it looks them up by key instead of
        // joining the whole outbox (which grows while the broker is away).
        let rows = sqlx::query(concat!(
            "WITH leased AS ( \
                UPDATE delivery_outbox o SET leased_until = $3 \
                WHERE o.delivery_id = ANY(ARRAY( \
                    SELECT delivery_id FROM delivery_outbox \
                    WHERE created_at < $1 AND (leased_until IS NULL OR leased_until < now()) \
                    ORDER BY created_at LIMIT $2 \
                    FOR UPDATE SKIP LOCKED)) \
                RETURNING o.delivery_id, o.created_at) \
             SELECT ",
            job_cols!(),
            ", e.payload FROM leased l \
                JOIN deliveries d ON d.id = l.delivery_id \
                JOIN events e ON e.id = d.event_id \
             ORDER BY l.created_at, d.id"
        ))
        .bind(older_than)
        .bind(i64::from(limit))
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await?;
        map_rows(&rows, job_from_row)
    }

    async fn get_event(&self, id: &Id) -> Result<Event, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM events WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(event_from_row(&found(row, "event", id)?)?)
    }

    async fn list_events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, StoreError> {
        let limit = effective_limit(page);
        // Only the filters given become conditions, so every combination gets a plan of its
        // own (a generic plan of `$2 IS NULL OR …` would serve none of them well).
        let mut q = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            event_cols!(),
            " FROM events WHERE tenant_id = "
        ));
        q.push_bind(filter.tenant_id.as_str());
        if let Some(event_type) = &filter.event_type {
            q.push(" AND event_type = ").push_bind(event_type.as_str());
        }
        if let Some(since) = filter.since {
            q.push(" AND created_at >= ").push_bind(since);
        }
        if let Some(until) = filter.until {
            q.push(" AND created_at < ").push_bind(until);
        }
        if let Some(after) = &page.after {
            q.push(" AND id < ").push_bind(after.as_str());
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit) + 1);
        let rows = q.build().fetch_all(&self.pool).await?;
        let items = map_rows(&rows, event_from_row)?;
        Ok(into_page(items, limit, |e| e.id.to_string()))
    }
}
