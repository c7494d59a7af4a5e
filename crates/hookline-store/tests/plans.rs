//! The outcome path's statements keep using the primary key once `deliveries` grows.
//!
//! A prepared statement's generic plan is kept until the next ANALYZE. Planned while the
//! table was small (a new database, the first minute of a benchmark), the lookups of a
//! batch's deliveries by an array of ids were sequential scans, and each batch then read
//! every row of the table: the cost of an outcome grew with the table (docs/BENCHMARKS.md,
//! pass 4). PostgreSQL only: SQLite has no plan cache of this kind.
//!
//! The test warms the statements on a tiny table over one connection (so the same session
//! holds whatever plan was cached), grows the table by thousands of deliveries, records
//! one more outcome and reads how many rows of `deliveries` were read by sequential scans
//! meanwhile (the session's statistics are flushed before the reading).

mod support;

use chrono::Utc;
use hookline_core::job::DeliveryJob;
use hookline_core::model::{Attempt, Event};
use hookline_core::{Id, IdKind};
use hookline_store::port::{AttemptOutcome, InsertOutcome, NewEvent, NextStep};
use sqlx::PgPool;
use support::{Backend, Fixture, new_subscription, tenant};

fn new_event(tenant_id: &Id, subscription: &Id) -> NewEvent {
    NewEvent {
        event: Event {
            id: Id::new(IdKind::Event),
            tenant_id: tenant_id.clone(),
            event_type: "invoice.paid".into(),
            payload: br#"{"n":1}"#.to_vec(),
            channels: vec![],
            idempotency_key: None,
            created_at: Utc::now(),
        },
        subscription_ids: vec![subscription.clone()],
        traceparent: None,
    }
}

fn jobs(outcomes: Vec<InsertOutcome>) -> Vec<DeliveryJob> {
    outcomes
        .into_iter()
        .flat_map(|o| match o {
            InsertOutcome::Created { jobs, .. } => jobs,
            other => panic!("expected Created, got {other:?}"),
        })
        .collect()
}

fn succeeded(job: &DeliveryJob) -> AttemptOutcome {
    AttemptOutcome {
        delivery_id: job.delivery_id.clone(),
        attempt: Some(Attempt {
            id: Id::new(IdKind::Attempt),
            delivery_id: job.delivery_id.clone(),
            attempt_number: 1,
            started_at: Utc::now(),
            duration_ms: 3,
            status_code: Some(204),
            error_class: None,
            error_message: None,
            response_excerpt: Vec::new(),
        }),
        next: NextStep::Succeeded,
        deferred_reason: None,
    }
}

/// Rows of `deliveries` read by sequential scans so far, as the statistics say once this
/// session's pending counts are flushed (the pool has one connection: the store's).
async fn seq_rows_read(pool: &PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .expect("force flush");
    // The flush happens when the session goes idle after a statement: one more statement.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(pool)
        .await
        .expect("clear snapshot");
    sqlx::query_scalar(
        "SELECT COALESCE(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'deliveries'",
    )
    .fetch_one(pool)
    .await
    .expect("read statistics")
}

#[tokio::test(flavor = "current_thread")]
async fn outcomes_do_not_scan_deliveries_after_the_table_grew() {
    let fx = Fixture::new(Backend::Postgres, 1).await;
    let store = fx.store();
    let pool = fx.pg_pool().expect("a PostgreSQL fixture").clone();
    let tenant_id = tenant(store).await;
    let sub = new_subscription(&tenant_id);
    store.create_subscription(&sub).await.expect("subscription");

    // Warm: more executions than PostgreSQL needs before it settles on a generic plan.
    for _ in 0..8 {
        let created = jobs(
            store
                .insert_events(&[new_event(&tenant_id, &sub.id)])
                .await
                .expect("insert"),
        );
        store
            .record_outcomes(&[succeeded(&created[0])])
            .await
            .expect("record");
    }
    // Grow the table well past what a sequential scan costs nothing for.
    const GROWN: usize = 6_000;
    for _ in 0..GROWN / 500 {
        let batch: Vec<NewEvent> = (0..500).map(|_| new_event(&tenant_id, &sub.id)).collect();
        store.insert_events(&batch).await.expect("grow");
    }
    let last = jobs(
        store
            .insert_events(&[new_event(&tenant_id, &sub.id)])
            .await
            .expect("insert"),
    );

    let before = seq_rows_read(&pool).await;
    store
        .record_outcomes(&[succeeded(&last[0])])
        .await
        .expect("record");
    let read = seq_rows_read(&pool).await - before;
    assert!(
        read < (GROWN / 10) as i64,
        "recording one outcome read {read} rows of deliveries by sequential scan (table of {GROWN}+ rows)"
    );
    fx.teardown().await;
}
