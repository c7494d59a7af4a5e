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

use super::{
    BulkInsert, SqliteStore, Violation, effective_limit, found, get_id, get_strings, get_time,
    get_u32, id_array, into_page, map_rows, map_violation, micros, not_found, violation,
};
use crate::StoreError;
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
        .await?;
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
/// subscriptions (`?2`) exist, and the stored events holding its idempotency keys
/// (`[[tenant_id, key], …]`, `?3`) with how many deliveries each has.
const LOOK_UP: &str = "\
SELECT 'tenant' AS kind, id, NULL AS idempotency_key, NULL AS event_id, NULL AS deliveries
FROM tenants WHERE id IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT 'subscription', id, NULL, NULL, NULL
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
     updated_at, traceparent) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?)",
    "",
);

/// Puts the deliveries of the JSON array `?1` in the outbox at time `?2`; those already
/// there stay as they are.
pub(super) const QUEUE_IDS: &str = "\
INSERT INTO delivery_outbox (delivery_id, created_at)
SELECT value, ?2 FROM json_each(?1) WHERE true
ON CONFLICT (delivery_id) DO NOTHING";

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

/// A delivery row to insert.
struct DeliveryRow<'a> {
    id: &'a str,
    event: &'a Event,
    subscription_id: &'a str,
    traceparent: Option<&'a str>,
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

#[async_trait]
impl EventStore for SqliteStore {
    async fn insert_events(&self, events: &[NewEvent]) -> Result<Vec<InsertOutcome>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let plans = plan(events);
        let (mut tx, now) = self.write().await?;

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
            .zip(&plans)
            .filter(|(_, p)| matches!(p, Plan::Insert(_)))
            .filter_map(|(e, _)| {
                let key = e.event.idempotency_key.as_deref()?;
                Some((e.event.tenant_id.as_str(), key))
            })
            .collect();
        let rows = sqlx::query(LOOK_UP)
            .bind(id_array(tenants.iter().copied()))
            .bind(id_array(subscriptions.iter().copied()))
            .bind(Json(&keyed))
            .fetch_all(&mut *tx)
            .await?;
        let mut existing_tenants: HashSet<String> = HashSet::new();
        let mut live_subscriptions: HashSet<String> = HashSet::new();
        let mut originals: HashMap<(String, String), (Id, u32)> = HashMap::new();
        for row in &rows {
            let kind: &str = row.try_get("kind")?;
            match kind {
                "tenant" => {
                    existing_tenants.insert(row.try_get("id")?);
                }
                "subscription" => {
                    live_subscriptions.insert(row.try_get("id")?);
                }
                _ => {
                    let count: i64 = row.try_get("deliveries")?;
                    originals.insert(
                        (row.try_get("id")?, row.try_get("idempotency_key")?),
                        (
                            get_id(row, "event_id", IdKind::Event)?,
                            u32::try_from(count).unwrap_or(u32::MAX),
                        ),
                    );
                }
            }
        }

        // Every tenant must exist; the first event (in batch order) whose tenant does not is
        // reported, and nothing of the batch is stored.
        if let Some(e) = events
            .iter()
            .find(|e| !existing_tenants.contains(e.event.tenant_id.as_str()))
        {
            return Err(not_found("tenant", &e.event.tenant_id));
        }
        let repeats_stored_key = |e: &Event| {
            e.idempotency_key
                .as_ref()
                .is_some_and(|key| originals.contains_key(&(e.tenant_id.to_string(), key.clone())))
        };

        // The events to insert (not repeating a stored key), and their deliveries to
        // subscriptions that still exist.
        let inserted: Vec<(&NewEvent, &Vec<(Id, Id)>)> = events
            .iter()
            .zip(&plans)
            .filter_map(|(new, plan)| match plan {
                Plan::Insert(deliveries) if !repeats_stored_key(&new.event) => {
                    Some((new, deliveries))
                }
                _ => None,
            })
            .collect();
        let delivery_rows: Vec<DeliveryRow<'_>> = inserted
            .iter()
            .flat_map(|(new, ds)| {
                ds.iter()
                    .filter(|(_, s)| live_subscriptions.contains(s.as_str()))
                    .map(|(d, s)| DeliveryRow {
                        id: d.as_str(),
                        event: &new.event,
                        subscription_id: s.as_str(),
                        traceparent: new.traceparent.as_deref(),
                    })
            })
            .collect();

        let event_rows: Vec<&Event> = inserted.iter().map(|(new, _)| &new.event).collect();
        if let Err(err) = INSERT_EVENTS
            .run(&mut tx, &event_rows, |q, e| {
                q.bind(e.id.as_str())
                    .bind(e.tenant_id.as_str())
                    .bind(e.event_type.as_str())
                    .bind(e.payload.as_slice())
                    .bind(Json(&e.channels))
                    .bind(e.idempotency_key.as_deref())
                    .bind(micros(e.created_at))
            })
            .await
        {
            if matches!(violation(&err), Some(Violation::Unique("events.id"))) {
                let id = colliding_event_id(&mut tx, &event_rows).await;
                return Err(StoreError::Conflict(format!(
                    "event {id} already exists; publish with a new event id"
                )));
            }
            return Err(err.into());
        }
        INSERT_DELIVERIES
            .run(&mut tx, &delivery_rows, |q, d| {
                q.bind(d.id)
                    .bind(d.event.id.as_str())
                    .bind(d.event.tenant_id.as_str())
                    .bind(d.subscription_id)
                    .bind(d.event.event_type.as_str())
                    .bind(now)
                    .bind(now)
                    .bind(d.traceparent)
            })
            .await
            .map_err(|e| {
                map_violation(e, |v| match v {
                    Violation::Unique(_) => Some(StoreError::Conflict(
                        "a generated delivery id is already taken; publish again".to_string(),
                    )),
                    Violation::ForeignKey => None,
                })
            })?;
        if !delivery_rows.is_empty() {
            sqlx::query(QUEUE_IDS)
                .bind(id_array(delivery_rows.iter().map(|d| d.id)))
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        let inserted_deliveries: HashSet<&str> = delivery_rows.iter().map(|d| d.id).collect();
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
                Plan::Insert(deliveries) if !repeats_stored_key(e) => InsertOutcome::Created {
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
                },
                Plan::Insert(_) => {
                    let key = e.idempotency_key.clone().unwrap_or_default();
                    let (event_id, deliveries) = originals
                        .get(&(e.tenant_id.to_string(), key))
                        .cloned()
                        .ok_or_else(|| {
                            StoreError::Database(sqlx::Error::Protocol(
                                "an idempotency key found stored vanished from the answer"
                                    .to_string(),
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
        let (mut tx, _) = self.write().await?;
        sqlx::query(
            "DELETE FROM delivery_outbox WHERE delivery_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_array(delivery_ids.iter().map(Id::as_str)))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
        .await?;
        let ids: Vec<String> = rows
            .iter()
            .map(|r| r.try_get("delivery_id"))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        sqlx::query(
            "UPDATE delivery_outbox SET leased_until = ?2 \
             WHERE delivery_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_array(ids.iter().map(String::as_str)))
        .bind(micros(lease_until))
        .execute(&mut *tx)
        .await?;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let jobs = jobs_in_order(&mut tx, &ids).await?;
        tx.commit().await?;
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
        .await?;
        Ok(event_from_row(&found(row, "event", id)?)?)
    }

    async fn list_events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, StoreError> {
        let limit = effective_limit(page);
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
            .push_bind(i64::from(limit) + 1);
        let rows = q.build().fetch_all(&self.reader).await?;
        let items = map_rows(&rows, event_from_row)?;
        Ok(into_page(items, limit, |e| e.id.to_string()))
    }
}
