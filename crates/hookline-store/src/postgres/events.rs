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

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::IdKind;
use hookline_core::job::DeliveryJob;
use hookline_core::model::Event;
use sqlx::QueryBuilder;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow, Postgres};
use sqlx::types::Json;

use super::PgStore;
use super::error::{Violation, map_violation, violating_value};
use super::rows::{get_id, get_u32, map_rows};
use crate::StoreError;
use crate::codec::count_u32;
use crate::error::Db;
use crate::error::{found, violated};
use crate::insert_plan::{self, Plan, Stored};
use crate::paging::{fetch_limit, into_page};
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

/// A job from a row of [`job_cols!`] plus `payload`: the next attempt of the delivery.
pub(super) fn job_from_row(row: &PgRow) -> Result<DeliveryJob, sqlx::Error> {
    Ok(DeliveryJob {
        delivery_id: get_id(row, "id", IdKind::Delivery)?,
        event_id: get_id(row, "event_id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        event_type: row.try_get("event_type")?,
        attempt_number: get_u32(row, "attempt_count")?.saturating_add(1),
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
/// inserted delivery ids, `held` when it waits behind its ordered subscription's head.
///
/// Deliveries of ordered subscriptions take a `seq` in batch order (`$14`, the position of
/// their event in the batch) and upsert their subscription's head row (see `ordered`): the
/// one that becomes the head gets an outbox row, the others wait without one.
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
ordered_seqs AS (
    SELECT o.id, nextval('deliveries_seq') AS seq
    FROM (SELECT v.id FROM unnest($8::text[], $11::text[], $14::int4[]) AS v(id, sub, pos)
          WHERE v.sub IN (SELECT id FROM subscriptions
                          WHERE id = ANY($11) AND ordering = 'ordered')
          ORDER BY v.pos) o
),
inserted_deliveries AS (
    INSERT INTO deliveries (id, event_id, tenant_id, subscription_id, event_type, traceparent,
                            seq)
    SELECT v.id, v.event_id, v.tenant_id, v.subscription_id, v.event_type, v.traceparent, q.seq
    FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
            AS v(id, event_id, tenant_id, subscription_id, event_type, traceparent)
        JOIN inserted_events e ON e.id = v.event_id
        JOIN subscriptions s ON s.id = v.subscription_id
        LEFT JOIN ordered_seqs q ON q.id = v.id
    FOR KEY SHARE OF s
    RETURNING id, subscription_id, seq
),
heads AS (
    INSERT INTO ordered_heads (subscription_id, delivery_id)
    SELECT DISTINCT ON (subscription_id) subscription_id, id FROM inserted_deliveries
    WHERE seq IS NOT NULL
    ORDER BY subscription_id, seq
    ON CONFLICT (subscription_id) DO UPDATE SET delivery_id = ordered_heads.delivery_id
        WHERE false
    RETURNING delivery_id
),
outbox AS (
    INSERT INTO delivery_outbox (delivery_id)
    SELECT id FROM inserted_deliveries WHERE seq IS NULL
    UNION ALL
    SELECT delivery_id FROM heads
)
SELECT true AS is_event, id, false AS held FROM inserted_events
UNION ALL
SELECT false AS is_event, id,
       seq IS NOT NULL AND id NOT IN (SELECT delivery_id FROM heads) AS held
FROM inserted_deliveries";

/// The stored events of the given (tenant, idempotency key) pairs and how many deliveries
/// each has.
const FIND_BY_KEYS: &str = "\
SELECT e.tenant_id, e.idempotency_key, e.id,
       (SELECT count(*) FROM deliveries d WHERE d.event_id = e.id) AS deliveries
FROM events e
    JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, idempotency_key)
        ON e.tenant_id = k.tenant_id AND e.idempotency_key = k.idempotency_key";

/// The batch as the parallel arrays [`INSERT_EVENTS`] takes: keyed events in key order (see
/// the module docs), the others after them; repeats within the batch are left out.
#[derive(Default)]
struct Arrays<'a> {
    ids: Vec<&'a str>,
    tenants: Vec<&'a str>,
    types: Vec<&'a str>,
    payloads: Vec<&'a [u8]>,
    channels: Vec<Json<&'a [String]>>,
    keys: Vec<Option<&'a str>>,
    created: Vec<DateTime<Utc>>,
    d_ids: Vec<&'a str>,
    d_events: Vec<&'a str>,
    d_tenants: Vec<&'a str>,
    d_subs: Vec<&'a str>,
    d_types: Vec<&'a str>,
    d_traces: Vec<Option<&'a str>>,
    d_pos: Vec<i32>,
}

impl<'a> Arrays<'a> {
    fn new(events: &'a [NewEvent], plans: &'a [Plan]) -> Self {
        let mut order: Vec<usize> = (0..events.len())
            .filter(|&i| matches!(plans[i], Plan::Insert(_)))
            .collect();
        order.sort_by_key(|&i| {
            let e = &events[i].event;
            (
                e.idempotency_key.is_none(),
                e.tenant_id.as_str(),
                e.idempotency_key.as_deref(),
            )
        });
        let mut arrays = Self::default();
        for i in order {
            if let Plan::Insert(deliveries) = &plans[i] {
                arrays.push(&events[i], deliveries, i32::try_from(i).unwrap_or(i32::MAX));
            }
        }
        arrays
    }

    fn push(&mut self, new: &'a NewEvent, deliveries: &'a [(Id, Id)], pos: i32) {
        let e = &new.event;
        self.ids.push(e.id.as_str());
        self.tenants.push(e.tenant_id.as_str());
        self.types.push(e.event_type.as_str());
        self.payloads.push(e.payload.as_slice());
        self.channels.push(Json(e.channels.as_slice()));
        self.keys.push(e.idempotency_key.as_deref());
        self.created.push(e.created_at);
        for (d, s) in deliveries {
            self.d_ids.push(d.as_str());
            self.d_events.push(e.id.as_str());
            self.d_tenants.push(e.tenant_id.as_str());
            self.d_subs.push(s.as_str());
            self.d_types.push(e.event_type.as_str());
            self.d_traces.push(new.traceparent.as_deref());
            self.d_pos.push(pos);
        }
    }

    /// Runs [`INSERT_EVENTS`]: which events and deliveries went in.
    async fn insert(&self, pool: &PgPool, events: &[NewEvent]) -> Result<Stored, StoreError> {
        let rows = sqlx::query(INSERT_EVENTS)
            .bind(&self.ids)
            .bind(&self.tenants)
            .bind(&self.types)
            .bind(&self.payloads)
            .bind(&self.channels)
            .bind(&self.keys)
            .bind(&self.created)
            .bind(&self.d_ids)
            .bind(&self.d_events)
            .bind(&self.d_tenants)
            .bind(&self.d_subs)
            .bind(&self.d_types)
            .bind(&self.d_traces)
            .bind(&self.d_pos)
            .fetch_all(pool)
            .await
            .map_err(|e| insert_error(e, events))?;
        let mut stored = Stored::default();
        for row in &rows {
            let id: String = row.try_get("id").db()?;
            if row.try_get("is_event").db()? {
                stored.events.insert(id);
            } else {
                if row.try_get("held").db()? {
                    stored.held.insert(id.clone());
                }
                stored.deliveries.insert(id);
            }
        }
        Ok(stored)
    }

    /// Keyed events that were not inserted repeat a key stored before: finds the originals.
    async fn find_originals(&self, pool: &PgPool, stored: &mut Stored) -> Result<(), StoreError> {
        let (mut k_tenants, mut k_keys) = (Vec::new(), Vec::new());
        for ((id, tenant), key) in self.ids.iter().zip(&self.tenants).zip(&self.keys) {
            if let Some(key) = key
                && !stored.events.contains(*id)
            {
                k_tenants.push(*tenant);
                k_keys.push(*key);
            }
        }
        if k_keys.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(FIND_BY_KEYS)
            .persistent(false)
            .bind(&k_tenants)
            .bind(&k_keys)
            .fetch_all(pool)
            .await
            .db()?;
        for row in &rows {
            let original = (
                get_id(row, "id", IdKind::Event).db()?,
                count_u32(row.try_get("deliveries").db()?),
            );
            let key = (
                row.try_get("tenant_id").db()?,
                row.try_get("idempotency_key").db()?,
            );
            stored.originals.insert(key, original);
        }
        Ok(())
    }
}

fn insert_error(err: sqlx::Error, events: &[NewEvent]) -> StoreError {
    let value = violating_value(&err);
    let first_tenant = || events.first().map(|e| e.event.tenant_id.to_string());
    map_violation(err, |v| match v {
        Violation::Unique("events_pkey") => {
            Some(violated::event_exists(&value.unwrap_or_default()))
        }
        Violation::Unique(_) => Some(violated::delivery_id_taken()),
        Violation::ForeignKey("events_tenant_fkey") => {
            Some(violated::no_tenant(value.or_else(first_tenant)?))
        }
        Violation::ForeignKey("deliveries_subscription_fkey") => {
            Some(crate::error::not_found("subscription", value?))
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
        let plans = insert_plan::plan(events);
        let arrays = Arrays::new(events, &plans);
        let mut stored = arrays.insert(&self.pool, events).await?;
        arrays.find_originals(&self.pool, &mut stored).await?;
        insert_plan::assemble(events, &plans, &stored)
    }

    async fn confirm_published(&self, delivery_ids: &[Id]) -> Result<(), StoreError> {
        if delivery_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = delivery_ids.iter().map(Id::as_str).collect();
        sqlx::query("DELETE FROM delivery_outbox WHERE delivery_id = ANY($1)")
            .bind(&ids)
            .execute(&self.pool)
            .await
            .db()?;
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
        .persistent(false)
        .bind(older_than)
        .bind(i64::from(limit))
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await
        .db()?;
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
        .await
        .db()?;
        event_from_row(&found(row, "event", id)?).db()
    }

    async fn list_events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, StoreError> {
        let limit = page.effective_limit();
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
            .push_bind(fetch_limit(limit));
        let rows = q.build().fetch_all(&self.pool).await.db()?;
        let items = map_rows(&rows, event_from_row)?;
        Ok(into_page(items, limit, |e| e.id.to_string()))
    }
}
