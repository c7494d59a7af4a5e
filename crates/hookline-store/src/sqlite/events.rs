//! [`EventStore`] on SQLite: the write path of ingest and the outbox.
//!
//! `insert_events` runs in one `BEGIN IMMEDIATE` transaction, which on SQLite is exclusive:
//! no other write can slip between its checks and its inserts. So where the PostgreSQL
//! adapter leans on `ON CONFLICT DO NOTHING` and constraint names, this one looks first and
//! then writes what is left. One read ([`LOOK_UP`]) says which of the batch's tenants and
//! subscriptions exist and which of its idempotency keys are taken; an unknown tenant is
//! reported by id (SQLite would not say which foreign key failed), events repeating a taken
//! key are reported as duplicates, the rest go in with multi-row statements, and deliveries
//! only to subscriptions that still exist. Racing publishes of one key queue for the
//! writer, and the later ones find the first's event: the tenant ends with exactly one.
//!
//! A single publish is BEGIN, that read, three inserts (events, deliveries, outbox) and
//! COMMIT; a batch of any size is the same plus one insert per 256 rows.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::Event;
use hookline_core::{Id, IdKind};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::bulk::BulkInsert;
use super::error::{Violation, map_violation, violation};
use super::heads;
use super::rows::{get_id, get_strings, get_time, get_u32, map_rows, micros};
use super::{SqliteStore, id_array};
use crate::StoreError;
use crate::codec::count_u32;
use crate::error::Db;
use crate::error::{found, violated};
use crate::insert_plan::{self, KeyOf, Plan, Stored};
use crate::paging::{fetch_limit, into_page};
use crate::port::{EventFilter, EventStore, InsertOutcome, NewEvent, Page, PageRequest};

// ---------------------------------------------------------------------------------------------
// Row mapping, shared with `deliveries`
// ---------------------------------------------------------------------------------------------

pub(super) fn event_from_row(row: &SqliteRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: get_id(row, "id", IdKind::Event)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        channels: get_strings(row, "channels")?,
        idempotency_key: row.try_get("idempotency_key")?,
        created_at: get_time(row, "created_at")?,
    })
}

/// A job from a row of [`jobs_of_ids!`]: the next attempt of the delivery.
pub(super) fn job_from_row(row: &SqliteRow) -> Result<DeliveryJob, sqlx::Error> {
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

/// The jobs of the deliveries `ids`, in the order of `ids`, each once; ids that name no
/// delivery are left out.
pub(super) async fn jobs_in_order(
    conn: &mut SqliteConnection,
    ids: &[&str],
) -> Result<Vec<DeliveryJob>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(jobs_of_ids!())
        .bind(id_array(ids.iter().copied()))
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let mut jobs: HashMap<String, DeliveryJob> = map_rows(&rows, job_from_row)?
        .into_iter()
        .map(|j| (j.delivery_id.to_string(), j))
        .collect();
    Ok(ids.iter().filter_map(|id| jobs.remove(*id)).collect())
}

// ---------------------------------------------------------------------------------------------
// insert_events
// ---------------------------------------------------------------------------------------------

/// What a batch builds on, in one statement: which of its tenants (JSON array `?1`) and
/// subscriptions (`?2`) exist (a subscription's row carries its ordering in the
/// `idempotency_key` column), and the stored events holding its idempotency keys
/// (`[[tenant_id, key], …]`, `?3`) with how many deliveries each has.
const LOOK_UP: &str = "\
SELECT 'tenant' AS kind, id, NULL AS idempotency_key, NULL AS event_id, NULL AS deliveries
FROM tenants WHERE id IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT 'subscription', id, ordering, NULL, NULL
FROM subscriptions WHERE id IN (SELECT value FROM json_each(?2))
UNION ALL
SELECT 'key', e.tenant_id, e.idempotency_key, e.id,
       (SELECT count(*) FROM deliveries d WHERE d.event_id = e.id)
FROM json_each(?3) AS k
    CROSS JOIN events AS e
        ON e.tenant_id = k.value ->> 0 AND e.idempotency_key = k.value ->> 1
WHERE e.idempotency_key IS NOT NULL";

static INSERT_EVENTS: BulkInsert = BulkInsert::new(
    "INSERT INTO events (id, tenant_id, event_type, payload, channels, idempotency_key, \
     created_at) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?)",
    "",
);

static INSERT_DELIVERIES: BulkInsert = BulkInsert::new(
    "INSERT INTO deliveries (id, event_id, tenant_id, subscription_id, event_type, created_at, \
     updated_at, traceparent, seq) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "",
);

/// Puts the deliveries of the JSON array `?1` in the outbox at time `?2`; those already
/// there stay as they are.
pub(super) const QUEUE_IDS: &str = "\
INSERT INTO delivery_outbox (delivery_id, created_at)
SELECT value, ?2 FROM json_each(?1) WHERE true
ON CONFLICT (delivery_id) DO NOTHING";

/// A delivery row to insert.
struct DeliveryRow<'a> {
    id: &'a str,
    event: &'a Event,
    subscription_id: &'a str,
    traceparent: Option<&'a str>,
    /// Its place in its ordered subscription's queue; `None` when unordered.
    seq: Option<i64>,
}

/// The id of a batch's event that collides with a stored one (or with another of the batch),
/// for the message of a violated `events` primary key.
async fn colliding_event_id(conn: &mut SqliteConnection, events: &[&Event]) -> String {
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT id FROM events WHERE id IN (SELECT value FROM json_each(?1)) LIMIT 1",
    )
    .bind(id_array(events.iter().map(|e| e.id.as_str())))
    .fetch_optional(&mut *conn)
    .await
    .ok()
    .flatten();
    stored
        .or_else(|| {
            let mut seen = HashSet::new();
            events
                .iter()
                .find(|e| !seen.insert(e.id.as_str()))
                .map(|e| e.id.to_string())
        })
        .unwrap_or_default()
}

/// What [`LOOK_UP`] found of a batch.
#[derive(Default)]
struct Existing {
    tenants: HashSet<String>,
    subscriptions: HashSet<String>,
    /// Those of `subscriptions` that are ordered.
    ordered: HashSet<String>,
    originals: HashMap<KeyOf, (Id, u32)>,
}

impl Existing {
    async fn look_up(
        conn: &mut SqliteConnection,
        events: &[NewEvent],
        plans: &[Plan],
    ) -> Result<Self, StoreError> {
        let tenants: HashSet<&str> = events.iter().map(|e| e.event.tenant_id.as_str()).collect();
        let subscriptions: HashSet<&str> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Insert(ds) => Some(ds.iter().map(|(_, s)| s.as_str())),
                Plan::RepeatOf(_) => None,
            })
            .flatten()
            .collect();
        let keyed: Vec<(&str, &str)> = events
            .iter()
            .zip(plans)
            .filter(|(_, p)| matches!(p, Plan::Insert(_)))
            .filter_map(|(e, _)| {
                Some((
                    e.event.tenant_id.as_str(),
                    e.event.idempotency_key.as_deref()?,
                ))
            })
            .collect();
        let rows = sqlx::query(LOOK_UP)
            .bind(id_array(tenants.iter().copied()))
            .bind(id_array(subscriptions.iter().copied()))
            .bind(Json(&keyed))
            .fetch_all(&mut *conn)
            .await
            .db()?;
        let mut found = Self::default();
        for row in &rows {
            found.add(row).db()?;
        }
        Ok(found)
    }

    fn add(&mut self, row: &SqliteRow) -> Result<(), sqlx::Error> {
        match row.try_get::<&str, _>("kind")? {
            "tenant" => {
                self.tenants.insert(row.try_get("id")?);
            }
            "subscription" => {
                let id: String = row.try_get("id")?;
                if row.try_get::<Option<&str>, _>("idempotency_key")? == Some("ordered") {
                    self.ordered.insert(id.clone());
                }
                self.subscriptions.insert(id);
            }
            _ => {
                let original = (
                    get_id(row, "event_id", IdKind::Event)?,
                    count_u32(row.try_get("deliveries")?),
                );
                let key = (row.try_get("id")?, row.try_get("idempotency_key")?);
                self.originals.insert(key, original);
            }
        }
        Ok(())
    }

    /// Whether the event repeats an idempotency key its tenant used before the batch.
    fn repeats_stored_key(&self, e: &Event) -> bool {
        e.idempotency_key.as_ref().is_some_and(|key| {
            self.originals
                .contains_key(&(e.tenant_id.to_string(), key.clone()))
        })
    }
}

/// Inserts the events (their ids all new, see [`colliding_event_id`]).
async fn insert_event_rows(conn: &mut SqliteConnection, rows: &[&Event]) -> Result<(), StoreError> {
    let done = INSERT_EVENTS
        .run(conn, rows, |q, e| {
            q.bind(e.id.as_str())
                .bind(e.tenant_id.as_str())
                .bind(e.event_type.as_str())
                .bind(e.payload.as_slice())
                .bind(Json(&e.channels))
                .bind(e.idempotency_key.as_deref())
                .bind(micros(e.created_at))
        })
        .await;
    match done {
        Err(err) if matches!(violation(&err), Some(Violation::Unique("events.id"))) => Err(
            violated::event_exists(&colliding_event_id(conn, rows).await),
        ),
        other => other.db(),
    }
}

/// Gives the deliveries of ordered subscriptions their `seq` (batch order after every
/// earlier one) and decides which become their subscription's head; returns the heads
/// (to record once the rows are in) and the ids of those that wait.
async fn place_in_order<'a>(
    conn: &mut SqliteConnection,
    rows: &mut [DeliveryRow<'a>],
    ordered: &HashSet<String>,
) -> Result<(Vec<(&'a str, &'a str)>, HashSet<&'a str>), StoreError> {
    if !rows.iter().any(|d| ordered.contains(d.subscription_id)) {
        return Ok((Vec::new(), HashSet::new()));
    }
    let mut seq = heads::last_seq(conn).await?;
    for d in rows
        .iter_mut()
        .filter(|d| ordered.contains(d.subscription_id))
    {
        seq += 1;
        d.seq = Some(seq);
    }
    let in_order: Vec<(&'a str, &'a str)> = rows
        .iter()
        .filter(|d| d.seq.is_some())
        .map(|d| (d.id, d.subscription_id))
        .collect();
    let subs: Vec<&str> = in_order.iter().map(|(_, s)| *s).collect();
    let with_head = heads::with_head(conn, &subs).await?;
    let heads = crate::ordered::new_heads(in_order.iter().copied(), &with_head);
    let lead: HashSet<&str> = heads.iter().map(|(d, _)| *d).collect();
    let held = in_order
        .iter()
        .map(|(d, _)| *d)
        .filter(|d| !lead.contains(d))
        .collect();
    Ok((heads, held))
}

/// Inserts the deliveries, stamped `now`, and puts them in the outbox, but for those `held`
/// behind their ordered subscription's head.
async fn insert_delivery_rows(
    conn: &mut SqliteConnection,
    rows: &[DeliveryRow<'_>],
    held: &HashSet<&str>,
    now: i64,
) -> Result<(), StoreError> {
    INSERT_DELIVERIES
        .run(conn, rows, |q, d| {
            q.bind(d.id)
                .bind(d.event.id.as_str())
                .bind(d.event.tenant_id.as_str())
                .bind(d.subscription_id)
                .bind(d.event.event_type.as_str())
                .bind(now)
                .bind(now)
                .bind(d.traceparent)
                .bind(d.seq)
        })
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(violated::delivery_id_taken()),
                Violation::ForeignKey => None,
            })
        })?;
    if rows.len() > held.len() {
        sqlx::query(QUEUE_IDS)
            .bind(id_array(
                rows.iter().map(|d| d.id).filter(|d| !held.contains(d)),
            ))
            .bind(now)
            .execute(&mut *conn)
            .await
            .db()?;
    }
    Ok(())
}

/// The events of the batch to insert (not repeating a stored key), and the delivery rows of
/// those to subscriptions that still exist.
fn rows_to_insert<'a>(
    events: &'a [NewEvent],
    plans: &'a [Plan],
    existing: &Existing,
) -> (Vec<&'a Event>, Vec<DeliveryRow<'a>>) {
    let mut event_rows = Vec::new();
    let mut delivery_rows = Vec::new();
    for (new, plan) in events.iter().zip(plans) {
        let Plan::Insert(deliveries) = plan else {
            continue;
        };
        if existing.repeats_stored_key(&new.event) {
            continue;
        }
        event_rows.push(&new.event);
        delivery_rows.extend(
            deliveries
                .iter()
                .filter(|(_, s)| existing.subscriptions.contains(s.as_str()))
                .map(|(d, s)| DeliveryRow {
                    id: d.as_str(),
                    event: &new.event,
                    subscription_id: s.as_str(),
                    traceparent: new.traceparent.as_deref(),
                    seq: None,
                }),
        );
    }
    (event_rows, delivery_rows)
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn insert_events(&self, events: &[NewEvent]) -> Result<Vec<InsertOutcome>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let plans = insert_plan::plan(events);
        let (mut tx, now) = self.write().await?;
        let existing = Existing::look_up(&mut tx, events, &plans).await?;
        // Every tenant must exist; the first event (in batch order) whose tenant does not is
        // reported, and nothing of the batch is stored.
        if let Some(e) = events
            .iter()
            .find(|e| !existing.tenants.contains(e.event.tenant_id.as_str()))
        {
            return Err(violated::no_tenant(&e.event.tenant_id));
        }
        let (event_rows, mut delivery_rows) = rows_to_insert(events, &plans, &existing);
        let (heads, held) = place_in_order(&mut tx, &mut delivery_rows, &existing.ordered).await?;
        insert_event_rows(&mut tx, &event_rows).await?;
        insert_delivery_rows(&mut tx, &delivery_rows, &held, now).await?;
        heads::set_heads(&mut tx, &heads).await?;
        tx.commit().await.db()?;

        let stored = Stored {
            events: event_rows.iter().map(|e| e.id.to_string()).collect(),
            deliveries: delivery_rows.iter().map(|d| d.id.to_string()).collect(),
            held: held.iter().map(|d| d.to_string()).collect(),
            originals: existing.originals,
        };
        insert_plan::assemble(events, &plans, &stored)
    }

    async fn confirm_published(&self, delivery_ids: &[Id]) -> Result<(), StoreError> {
        if delivery_ids.is_empty() {
            return Ok(());
        }
        let (mut tx, _) = self.write().await?;
        sqlx::query(
            "DELETE FROM delivery_outbox WHERE delivery_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_array(delivery_ids.iter().map(Id::as_str)))
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
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
        // The write transaction is exclusive: what this one leases, no other relay can.
        let (mut tx, now) = self.write().await?;
        let rows = sqlx::query(
            "SELECT delivery_id FROM delivery_outbox \
             WHERE created_at < ?1 AND (leased_until IS NULL OR leased_until < ?2) \
             ORDER BY created_at, delivery_id LIMIT ?3",
        )
        .bind(micros(older_than))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .db()?;
        let ids: Vec<String> = rows
            .iter()
            .map(|r| r.try_get("delivery_id"))
            .collect::<Result<_, _>>()
            .db()?;
        if ids.is_empty() {
            tx.commit().await.db()?;
            return Ok(Vec::new());
        }
        sqlx::query(
            "UPDATE delivery_outbox SET leased_until = ?2 \
             WHERE delivery_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_array(ids.iter().map(String::as_str)))
        .bind(micros(lease_until))
        .execute(&mut *tx)
        .await
        .db()?;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let jobs = jobs_in_order(&mut tx, &ids).await?;
        tx.commit().await.db()?;
        Ok(jobs)
    }

    async fn get_event(&self, id: &Id) -> Result<Event, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM events WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.reader)
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
        // Only the filters given become conditions, so that each combination gets a plan of
        // its own.
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            event_cols!(),
            " FROM events WHERE tenant_id = "
        ));
        q.push_bind(filter.tenant_id.as_str());
        if let Some(event_type) = &filter.event_type {
            q.push(" AND event_type = ").push_bind(event_type.as_str());
        }
        if let Some(since) = filter.since {
            q.push(" AND created_at >= ").push_bind(micros(since));
        }
        if let Some(until) = filter.until {
            q.push(" AND created_at < ").push_bind(micros(until));
        }
        if let Some(after) = &page.after {
            q.push(" AND id < ").push_bind(after.as_str());
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(fetch_limit(limit));
        let rows = q.build().fetch_all(&self.reader).await.db()?;
        let items = map_rows(&rows, event_from_row)?;
        Ok(into_page(items, limit, |e| e.id.to_string()))
    }
}
