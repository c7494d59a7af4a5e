//! What only the SQLite adapter has to prove: the file's settings, that committed work
//! survives a process that dies without closing anything (dropped pools, SIGKILL), and that
//! writes stay correct when another writer shares the file (the embedded queue) or when one
//! pool serves reads and writes alike (`SqliteStore::from_pool`).
//!
//! Everything the port promises is tested on both adapters in `registry.rs` and `pipeline.rs`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, TimeDelta, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{Attempt, DeliveryStatus, Event, SubscriptionSecret, SubscriptionState};
use hookline_core::{Id, IdKind};
use hookline_store::sqlite::Durability;
use hookline_store::{
    AttemptOutcome, DeliveryStore, EventStore, InsertOutcome, NewEvent, NewSubscription, NextStep,
    RegistryStore, SqliteStore, StoreError, StoreHealth,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use support::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn open(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path).await.expect("open");
    store.migrate().await.expect("migrate");
    store
}

async fn tenant(store: &SqliteStore) -> Id {
    let id = Id::new(IdKind::Tenant);
    store
        .create_tenant(&id, "t", &BTreeMap::new())
        .await
        .expect("create tenant");
    id
}

async fn subscription(store: &SqliteStore, tenant_id: &Id) -> Id {
    let id = Id::new(IdKind::Subscription);
    store
        .create_subscription(&NewSubscription {
            ordering: Default::default(),
            client_identity: None,
            payload_format: Default::default(),
            secret: SubscriptionSecret {
                id: Id::new(IdKind::Secret),
                subscription_id: id.clone(),
                secret: "whsec_c2VjcmV0LW9uZS1zZWNyZXQtb25lLXNlY3JldA==".to_string(),
                created_at: Utc::now(),
                expires_at: None,
            },
            id: id.clone(),
            tenant_id: tenant_id.clone(),
            url: "https://receiver.example/hooks".to_string(),
            description: String::new(),
            event_types: vec![],
            channels: vec![],
            headers: BTreeMap::new(),
            rate_limit_per_second: None,
            max_in_flight: None,
            retry_schedule: None,
            state: SubscriptionState::Enabled,
            metadata: BTreeMap::new(),
        })
        .await
        .expect("create subscription");
    id
}

fn new_event(tenant_id: &Id, key: Option<&str>, subs: &[&Id]) -> NewEvent {
    NewEvent {
        event: Event {
            id: Id::new(IdKind::Event),
            tenant_id: tenant_id.clone(),
            event_type: "invoice.paid".to_string(),
            payload: br#"{"type":"invoice.paid","amount":1299}"#.to_vec(),
            channels: vec!["eu".to_string()],
            idempotency_key: key.map(str::to_string),
            created_at: Utc::now(),
        },
        subscription_ids: subs.iter().map(|s| (*s).clone()).collect(),
        traceparent: None,
    }
}

fn jobs_of(outcome: &InsertOutcome) -> &[DeliveryJob] {
    match outcome {
        InsertOutcome::Created { jobs, .. } => jobs,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn failed_attempt(delivery_id: &Id) -> Attempt {
    Attempt {
        id: Id::new(IdKind::Attempt),
        delivery_id: delivery_id.clone(),
        attempt_number: 1,
        started_at: Utc::now(),
        duration_ms: 12,
        status_code: Some(503),
        error_class: None,
        error_message: None,
        response_excerpt: b"unavailable".to_vec(),
    }
}

/// What [`write_acknowledged_work`] committed, to check after the process is gone.
struct Acknowledged {
    event: Event,
    key: String,
    retrying: Id,
    succeeded: Id,
    unpublished: Id,
}

/// The work of a running system, each step committed (acknowledged) before the next: an
/// event published with an idempotency key, one delivery that failed and has a retry
/// scheduled in an hour, one that succeeded, one whose queue publish was never confirmed.
async fn write_acknowledged_work(store: &SqliteStore) -> Acknowledged {
    let t = tenant(store).await;
    let (s1, s2, s3) = (
        subscription(store, &t).await,
        subscription(store, &t).await,
        subscription(store, &t).await,
    );
    let key = format!("order-{}", Id::new(IdKind::Event));
    let new = new_event(&t, Some(&key), &[&s1, &s2, &s3]);
    let outcomes = store
        .insert_events(std::slice::from_ref(&new))
        .await
        .expect("insert");
    let jobs = jobs_of(&outcomes[0]).to_vec();
    let (retrying, succeeded, unpublished) = (
        jobs[0].delivery_id.clone(),
        jobs[1].delivery_id.clone(),
        jobs[2].delivery_id.clone(),
    );
    store
        .confirm_published(&[retrying.clone(), succeeded.clone()])
        .await
        .expect("confirm");
    store
        .record_outcomes(&[
            AttemptOutcome {
                delivery_id: retrying.clone(),
                attempt: Some(failed_attempt(&retrying)),
                next: NextStep::RetryAt(Utc::now() + TimeDelta::hours(1)),
                deferred_reason: None,
            },
            AttemptOutcome {
                delivery_id: succeeded.clone(),
                attempt: None,
                next: NextStep::Succeeded,
                deferred_reason: None,
            },
        ])
        .await
        .expect("record");
    let mut event = new.event;
    // Stored to the microsecond.
    event.created_at = event.created_at.trunc_subsecs(6);
    Acknowledged {
        event,
        key,
        retrying,
        succeeded,
        unpublished,
    }
}

/// Checks, on a store reopened after the writer died, that everything
/// [`write_acknowledged_work`] committed is there and still behaves.
async fn assert_nothing_lost(store: &SqliteStore, acked: &Acknowledged) {
    let event = &acked.event;
    assert_eq!(store.get_event(&event.id).await.expect("event"), *event);

    let retrying = store.get_delivery(&acked.retrying).await.expect("delivery");
    assert_eq!(retrying.status, DeliveryStatus::Retrying);
    assert_eq!(retrying.attempt_count, 1);
    let succeeded = store
        .get_delivery(&acked.succeeded)
        .await
        .expect("delivery");
    assert_eq!(succeeded.status, DeliveryStatus::Succeeded);
    let unpublished = store
        .get_delivery(&acked.unpublished)
        .await
        .expect("delivery");
    assert_eq!(unpublished.status, DeliveryStatus::Pending);

    // The unconfirmed publish is still in the outbox for the relay.
    let leased = store
        .lease_unpublished(
            Utc::now() + TimeDelta::seconds(1),
            10,
            Utc::now() + TimeDelta::minutes(1),
        )
        .await
        .expect("lease");
    assert_eq!(
        leased
            .iter()
            .map(|j| j.delivery_id.clone())
            .collect::<Vec<_>>(),
        vec![acked.unpublished.clone()]
    );
    // The scheduled retry is still scheduled, for attempt 2.
    assert!(
        store
            .promote_due_retries(Utc::now(), 10)
            .await
            .expect("promote")
            .is_empty(),
        "not due yet"
    );
    let due = store
        .promote_due_retries(Utc::now() + TimeDelta::hours(2), 10)
        .await
        .expect("promote");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].delivery_id, acked.retrying);
    assert_eq!(due[0].attempt_number, 2);
    assert_eq!(due[0].payload, event.payload);
    // The idempotency key still names the event.
    let again = store
        .insert_events(&[new_event(&event.tenant_id, Some(&acked.key), &[])])
        .await
        .expect("insert again");
    assert_eq!(
        again,
        vec![InsertOutcome::Duplicate {
            event_id: event.id.clone(),
            deliveries: 3
        }]
    );
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_file_is_created_in_wal_mode_with_foreign_keys_and_a_busy_timeout() {
    let dir = TempDir::new();
    let path = dir.db_path();
    assert!(!path.exists());
    let store = open(&path).await;
    assert!(path.exists(), "open creates the file");
    store.ping().await.expect("ping");

    // Every connection of the pool other adapters get has the settings.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(store.pool().acquire().await.expect("acquire"));
    }
    for conn in &mut conns {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut **conn)
            .await
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut **conn)
            .await
            .expect("foreign_keys");
        assert_eq!(fk, 1);
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut **conn)
            .await
            .expect("synchronous");
        assert_eq!(sync, 1, "NORMAL");
        let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&mut **conn)
            .await
            .expect("busy_timeout");
        assert_eq!(timeout, 10_000);
    }
    drop(conns);

    // The embedded queue's names are its own.
    let taken: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE name LIKE 'broker%'")
            .fetch_all(store.pool())
            .await
            .expect("schema");
    assert!(taken.is_empty(), "{taken:?}");
    store.close().await;

    // Power-loss durability asks for FULL.
    let full = SqliteStore::open_with(&path, Durability::PowerLoss)
        .await
        .expect("open");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(full.pool())
        .await
        .expect("synchronous");
    assert_eq!(sync, 2, "FULL");
    full.close().await;

    // Missing directories are created.
    let nested = dir.path().join("a").join("b").join("hookline.db");
    SqliteStore::open(&nested)
        .await
        .expect("open")
        .close()
        .await;
    assert!(nested.exists());
    // A path that cannot be created is an error, not a panic.
    let err = SqliteStore::open(&path.join("under-a-file.db"))
        .await
        .expect_err("a file is no directory");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn committed_work_survives_dropping_the_store_without_closing_it() {
    let dir = TempDir::new();
    let store = open(&dir.db_path()).await;
    let acked = write_acknowledged_work(&store).await;
    drop(store);

    let store = open(&dir.db_path()).await;
    assert_nothing_lost(&store, &acked).await;
    store.close().await;
}

/// Set in the child process of [`a_killed_process_loses_nothing_it_committed`]: the file.
const CHILD_DB: &str = "HOOKLINE_STORE_TEST_KILLED_CHILD_DB";

/// The child of [`a_killed_process_loses_nothing_it_committed`]: writes, says so, and waits
/// to be killed. Does nothing when run on its own.
#[tokio::test]
#[ignore = "the child process of a_killed_process_loses_nothing_it_committed"]
async fn killed_child() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let store = SqliteStore::open(Path::new(&path)).await.expect("open");
    let acked = write_acknowledged_work(&store).await;
    println!(
        "committed {} {} {} {} {}",
        acked.event.id, acked.key, acked.retrying, acked.succeeded, acked.unpublished
    );
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_killed_process_loses_nothing_it_committed() {
    let dir = TempDir::new();
    let path = dir.db_path();
    open(&path).await.close().await;

    // This test binary again, running only `killed_child`.
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new(exe)
        .args(["killed_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_DB, &path)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let committed = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(rest) = line.strip_prefix("committed ") {
                return rest.to_string();
            }
        }
        panic!("the child exited without committing");
    })
    .await
    .expect("the child committed in time");
    // SIGKILL: no destructor, no close, no checkpoint.
    child.kill().await.expect("kill");
    let wal = path.with_extension("db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(
        wal_len > 0,
        "the commits are in the write-ahead log, not yet checkpointed"
    );

    let ids: Vec<&str> = committed.split(' ').collect();
    let [event_id, key, retrying, succeeded, unpublished] = ids[..] else {
        panic!("unexpected child output {committed:?}");
    };
    let store = open(&path).await;
    let event = store
        .get_event(&Id::parse(IdKind::Event, "event", event_id).expect("id"))
        .await
        .expect("the acknowledged event is there");
    let delivery = |raw: &str| Id::parse(IdKind::Delivery, "delivery", raw).expect("id");
    let acked = Acknowledged {
        event,
        key: key.to_string(),
        retrying: delivery(retrying),
        succeeded: delivery(succeeded),
        unpublished: delivery(unpublished),
    };
    assert_eq!(
        acked.event.payload,
        br#"{"type":"invoice.paid","amount":1299}"#.to_vec()
    );
    assert_nothing_lost(&store, &acked).await;
    store.close().await;
}

// ---------------------------------------------------------------------------------------------
// Other writers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_writes_wait_for_another_writer_of_the_file_instead_of_failing() {
    let dir = TempDir::new();
    let store = Arc::new(open(&dir.db_path()).await);
    sqlx::query("CREATE TABLE probe_writes (n INTEGER NOT NULL) STRICT")
        .execute(store.pool())
        .await
        .expect("create");
    let t = tenant(&store).await;
    let s = subscription(&store, &t).await;

    // Like the embedded queue: BEGIN IMMEDIATE transactions on the shared pool, each
    // holding the write lock for a while.
    let other = {
        let pool = store.pool().clone();
        tokio::spawn(async move {
            for n in 0..40_i64 {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                sqlx::query("INSERT INTO probe_writes (n) VALUES (?1)")
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                tokio::time::sleep(Duration::from_millis(3)).await;
                tx.commit().await.expect("commit");
            }
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (store, t, s) = (store.clone(), t.clone(), s.clone());
            tokio::spawn(async move {
                for _ in 0..10 {
                    let outcomes = store
                        .insert_events(&[new_event(&t, None, &[&s])])
                        .await
                        .expect("insert while another writer holds the lock");
                    let d = jobs_of(&outcomes[0])[0].delivery_id.clone();
                    store
                        .record_outcomes(&[AttemptOutcome {
                            delivery_id: d.clone(),
                            attempt: Some(failed_attempt(&d)),
                            next: NextStep::RetryAt(Utc::now()),
                            deferred_reason: None,
                        }])
                        .await
                        .expect("record while another writer holds the lock");
                }
            })
        })
        .collect();
    other.await.expect("other writer");
    for w in writers {
        w.await.expect("writer");
    }
    let probes: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_writes")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(probes, 40);
    let due = store
        .promote_due_retries(Utc::now() + TimeDelta::seconds(1), 1000)
        .await
        .expect("promote");
    assert_eq!(due.len(), 40);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_pool_serialises_racing_writes_too() {
    let dir = TempDir::new();
    let options = SqliteConnectOptions::new()
        .filename(dir.db_path())
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .expect("pool");
    let store = Arc::new(SqliteStore::from_pool(pool));
    store.migrate().await.expect("migrate");
    let t = tenant(&store).await;
    let s = subscription(&store, &t).await;

    // Racing publishes of one key on eight connections: one event.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            let batch = vec![new_event(&t, Some("race"), &[&s])];
            tokio::spawn(async move {
                barrier.wait().await;
                store.insert_events(&batch).await.expect("insert")
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut named = std::collections::HashSet::new();
    for task in tasks {
        match task.await.expect("task").remove(0) {
            InsertOutcome::Created { event_id, jobs, .. } => {
                named.insert(event_id);
                created.extend(jobs);
            }
            InsertOutcome::Duplicate { event_id, .. } => {
                named.insert(event_id);
            }
        }
    }
    assert_eq!(created.len(), 1, "one publish created the event");
    assert_eq!(named.len(), 1, "every publish names it");

    // Racing outcomes of one delivery: every attempt gets its own number.
    let d = created[0].delivery_id.clone();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, d) = (store.clone(), d.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    store
                        .record_outcomes(&[AttemptOutcome {
                            delivery_id: d.clone(),
                            attempt: Some(failed_attempt(&d)),
                            next: NextStep::RetryAt(Utc::now()),
                            deferred_reason: None,
                        }])
                        .await
                        .expect("record");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let numbers: Vec<u32> = store
        .list_attempts(&d, &Default::default())
        .await
        .expect("attempts")
        .items
        .iter()
        .map(|a| a.attempt_number)
        .collect();
    assert_eq!(numbers, (1..=20).collect::<Vec<_>>());
    store.close().await;
}
