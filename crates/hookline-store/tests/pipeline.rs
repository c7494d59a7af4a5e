//! The data plane of the storage port (`EventStore`, `DeliveryStore`), run against both
//! adapters: each case is one body, tested on a PostgreSQL database of its own
//! (`case::postgres`) and on a SQLite file of its own (`case::sqlite`). Races run on both:
//! PostgreSQL settles them with row locks, SQLite with its single writer, and either way
//! an idempotency key yields one event and a due retry is promoted once.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{
    Attempt, DeliveryStatus, ErrorClass, Event, SubscriptionSecret, SubscriptionState,
};
use hookline_core::{Id, IdKind};
use hookline_store::{
    AttemptOutcome, DeliveryFilter, EventFilter, InsertOutcome, NewEvent, NewSubscription,
    NextStep, PageRequest, StoreError,
};
use support::{Backend, Fixture, Store, tenant};

on_both_backends! {
    current_thread insert_events_stores_events_deliveries_and_outbox_and_returns_jobs(3);
    current_thread idempotency_keys_report_the_original_event_sequentially_and_within_a_batch(3);
    multi_thread racing_publishes_with_one_key_store_one_event(8);
    current_thread the_outbox_is_confirmed_and_leased_exclusively(3);
    current_thread outcomes_number_attempts_and_move_deliveries_through_their_states(3);
    current_thread a_batch_of_outcomes_applies_in_order_and_skips_deliveries_that_are_gone(3);
    multi_thread concurrent_writers_never_give_two_attempts_one_number(6);
    current_thread due_retries_are_promoted_to_the_outbox_once(3);
    multi_thread concurrent_promoters_never_return_the_same_delivery(6);
    current_thread failed_deliveries_are_found_and_requeued(3);
    current_thread events_are_listed_newest_first_with_filters_and_pages(3);
    current_thread deliveries_are_listed_with_filters_and_followed_by_update_time(3);
    current_thread deleting_subscriptions_and_tenants_cascades_through_the_pipeline(3);
    current_thread subscriptions_are_disabled_with_a_reason_and_enabled_again(2);
    current_thread the_traceparent_of_a_publish_comes_back_with_every_job_of_its_deliveries(2);
    current_thread deferrals_and_open_circuits_are_recorded_and_cleared(2);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn subscription(store: &dyn Store, tenant_id: &Id) -> Id {
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

fn event(tenant_id: &Id, event_type: &str, key: Option<&str>) -> Event {
    Event {
        id: Id::new(IdKind::Event),
        tenant_id: tenant_id.clone(),
        event_type: event_type.to_string(),
        payload: format!(r#"{{"type":"{event_type}","n":1}}"#).into_bytes(),
        channels: vec![],
        idempotency_key: key.map(str::to_string),
        created_at: Utc::now(),
    }
}

fn new_event(tenant_id: &Id, key: Option<&str>, subs: &[&Id]) -> NewEvent {
    NewEvent {
        event: event(tenant_id, "invoice.paid", key),
        subscription_ids: subs.iter().map(|s| (*s).clone()).collect(),
        traceparent: None,
    }
}

/// Inserts one event and returns its jobs.
async fn publish(store: &dyn Store, tenant_id: &Id, subs: &[&Id]) -> Vec<DeliveryJob> {
    let outcomes = store
        .insert_events(&[new_event(tenant_id, None, subs)])
        .await
        .expect("insert");
    match outcomes.into_iter().next() {
        Some(InsertOutcome::Created { jobs, .. }) => jobs,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn attempt(delivery_id: &Id, status: Option<u16>, error: Option<&str>) -> Attempt {
    Attempt {
        id: Id::new(IdKind::Attempt),
        delivery_id: delivery_id.clone(),
        attempt_number: 1,
        started_at: Utc::now(),
        duration_ms: 12,
        status_code: status,
        error_class: match (status, error) {
            (_, Some(_)) => Some(ErrorClass::Timeout),
            (Some(200..=299), None) => None,
            (Some(_), None) => Some(ErrorClass::Status),
            (None, None) => None,
        },
        error_message: error.map(str::to_string),
        response_excerpt: b"nope".to_vec(),
    }
}

fn outcome(delivery_id: &Id, attempt: Option<Attempt>, next: NextStep) -> AttemptOutcome {
    AttemptOutcome {
        delivery_id: delivery_id.clone(),
        attempt,
        next,
        deferred_reason: None,
    }
}

fn page(after: Option<String>, limit: u32) -> PageRequest {
    PageRequest { after, limit }
}

/// Both adapters keep microseconds.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn ids(jobs: &[DeliveryJob]) -> Vec<Id> {
    jobs.iter().map(|j| j.delivery_id.clone()).collect()
}

/// Ids in id order. Ids made within one millisecond are not in creation order, so tests
/// that list by id compare against this.
fn sorted(mut ids: Vec<Id>) -> Vec<Id> {
    ids.sort();
    ids
}

/// Ids newest first (descending id order).
fn desc(ids: Vec<Id>) -> Vec<Id> {
    let mut ids = sorted(ids);
    ids.reverse();
    ids
}

// ---------------------------------------------------------------------------------------------
// Events and the outbox
// ---------------------------------------------------------------------------------------------

async fn insert_events_stores_events_deliveries_and_outbox_and_returns_jobs(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let gone = Id::new(IdKind::Subscription);

    let mut first = new_event(&t, None, &[&s1, &s2, &s1]);
    first.event.channels = vec!["eu".to_string(), "b\"q".to_string()];
    let second = new_event(&t, Some("k-1"), &[&gone, &s2]);
    let third = new_event(&t, None, &[]);
    let batch = vec![first.clone(), second.clone(), third.clone()];
    let outcomes = store.insert_events(&batch).await.expect("insert");
    assert_eq!(outcomes.len(), 3);

    let InsertOutcome::Created { event_id, jobs, .. } = &outcomes[0] else {
        panic!("{:?}", outcomes[0]);
    };
    assert_eq!(event_id, &first.event.id);
    // Parallel to the subscriptions given, each subscription once.
    assert_eq!(
        jobs.iter().map(|j| &j.subscription_id).collect::<Vec<_>>(),
        vec![&s1, &s2]
    );
    for job in jobs {
        assert!(job.delivery_id.as_str().starts_with("dlv_"));
        assert_eq!(job.event_id, first.event.id);
        assert_eq!(job.tenant_id, t);
        assert_eq!(job.event_type, "invoice.paid");
        assert_eq!(job.attempt_number, 1);
        assert_eq!(job.payload, first.event.payload);
    }
    // A subscription deleted since it was matched gets no delivery.
    let InsertOutcome::Created { jobs: jobs2, .. } = &outcomes[1] else {
        panic!("{:?}", outcomes[1]);
    };
    assert_eq!(
        jobs2.iter().map(|j| &j.subscription_id).collect::<Vec<_>>(),
        vec![&s2]
    );
    assert!(matches!(&outcomes[2], InsertOutcome::Created { jobs, .. } if jobs.is_empty()));

    assert_eq!(fx.count("events").await, 3);
    assert_eq!(fx.count("deliveries").await, 3);
    let all_jobs: Vec<Id> = jobs
        .iter()
        .chain(jobs2)
        .map(|j| j.delivery_id.clone())
        .collect();
    let expected: HashSet<String> = all_jobs.iter().map(|i| i.to_string()).collect();
    assert_eq!(fx.outbox().await, expected);

    // The event reads back byte for byte.
    let stored = store.get_event(&first.event.id).await.expect("get event");
    let mut want = first.event.clone();
    want.created_at = micros(want.created_at);
    assert_eq!(stored, want);
    let stored = store.get_event(&second.event.id).await.expect("get event");
    assert_eq!(stored.idempotency_key.as_deref(), Some("k-1"));

    // Deliveries start pending with no attempt.
    let d = store
        .get_delivery(&jobs[0].delivery_id)
        .await
        .expect("delivery");
    assert_eq!(d.status, DeliveryStatus::Pending);
    assert_eq!(d.attempt_count, 0);
    assert_eq!(d.event_id, first.event.id);
    assert_eq!(d.subscription_id, s1);
    assert_eq!(d.tenant_id, t);
    assert_eq!(d.event_type, "invoice.paid");
    assert_eq!(
        (
            d.next_attempt_at,
            d.last_attempt_at,
            d.last_status_code,
            d.last_error
        ),
        (None, None, None, None)
    );

    // An unknown tenant is reported, and nothing of the batch is stored.
    let stranger = Id::new(IdKind::Tenant);
    let err = store
        .insert_events(&[new_event(&t, None, &[&s1]), new_event(&stranger, None, &[])])
        .await
        .expect_err("unknown tenant");
    assert!(
        matches!(&err, StoreError::NotFound { entity: "tenant", id } if id == stranger.as_str()),
        "{err}"
    );
    assert_eq!(fx.count("events").await, 3);
    assert_eq!(fx.count("deliveries").await, 3);
    // So is an event id used twice.
    let err = store
        .insert_events(&[first.clone()])
        .await
        .expect_err("same event id");
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains(first.event.id.as_str())),
        "{err}"
    );
    assert!(store.insert_events(&[]).await.expect("empty").is_empty());

    let err = store
        .get_event(&Id::new(IdKind::Event))
        .await
        .expect_err("missing");
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "event",
                ..
            }
        ),
        "{err}"
    );
}

async fn idempotency_keys_report_the_original_event_sequentially_and_within_a_batch(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let other = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let s3 = subscription(store, &other).await;

    let original = new_event(&t, Some("order-1"), &[&s1, &s2]);
    let outcomes = store
        .insert_events(std::slice::from_ref(&original))
        .await
        .expect("insert");
    assert!(matches!(&outcomes[0], InsertOutcome::Created { jobs, .. } if jobs.len() == 2));

    // Sequential repeat: nothing stored, the original reported with its deliveries.
    let repeat = new_event(&t, Some("order-1"), &[&s1]);
    let outcomes = store.insert_events(&[repeat]).await.expect("repeat");
    assert_eq!(
        outcomes,
        vec![InsertOutcome::Duplicate {
            event_id: original.event.id.clone(),
            deliveries: 2
        }]
    );

    // Within one batch: the second use of a new key repeats the first; a repeat of a stored
    // key repeats the stored event; another tenant's same key is its own.
    let a = new_event(&t, Some("order-2"), &[&s1]);
    let b = new_event(&t, Some("order-2"), &[&s1, &s2]);
    let c = new_event(&t, Some("order-1"), &[&s2]);
    let d = new_event(&other, Some("order-2"), &[&s3]);
    let e = new_event(&t, Some("order-1"), &[]);
    let f = new_event(&t, None, &[&s2]);
    let outcomes = store
        .insert_events(&[a.clone(), b, c, d.clone(), e, f.clone()])
        .await
        .expect("batch");
    assert!(
        matches!(&outcomes[0], InsertOutcome::Created { event_id, jobs, .. } if event_id == &a.event.id && jobs.len() == 1)
    );
    assert_eq!(
        outcomes[1],
        InsertOutcome::Duplicate {
            event_id: a.event.id.clone(),
            deliveries: 1
        }
    );
    for i in [2, 4] {
        assert_eq!(
            outcomes[i],
            InsertOutcome::Duplicate {
                event_id: original.event.id.clone(),
                deliveries: 2
            }
        );
    }
    assert!(
        matches!(&outcomes[3], InsertOutcome::Created { event_id, jobs, .. } if event_id == &d.event.id && jobs.len() == 1)
    );
    assert!(
        matches!(&outcomes[5], InsertOutcome::Created { event_id, .. } if event_id == &f.event.id)
    );
    assert_eq!(fx.count("events").await, 4);
    assert_eq!(fx.count("deliveries").await, 2 + 1 + 1 + 1);
    assert_eq!(fx.count("delivery_outbox").await, 5);
}

async fn racing_publishes_with_one_key_store_one_event(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let store = fx.shared();

    for round in 0..5 {
        let key = format!("race-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let main = new_event(&t, Some(&key), &[&s1, &s2]);
                // Another shared key, before or after: batches overlap in two keys.
                let side = new_event(&t, Some(&format!("{key}-side")), &[&s1]);
                let (batch, main_at) = if i % 2 == 0 {
                    (vec![main, side], 0)
                } else {
                    (vec![side, main], 1)
                };
                tokio::spawn(async move {
                    barrier.wait().await;
                    (store.insert_events(&batch).await, main_at)
                })
            })
            .collect();
        let mut created = 0;
        let mut reported = HashSet::new();
        for task in tasks {
            let (outcomes, main_at) = task.await.expect("task");
            let outcomes = outcomes.expect("insert");
            match &outcomes[main_at] {
                InsertOutcome::Created { event_id, jobs, .. } => {
                    created += 1;
                    assert_eq!(jobs.len(), 2);
                    reported.insert(event_id.clone());
                }
                InsertOutcome::Duplicate {
                    event_id,
                    deliveries,
                } => {
                    assert_eq!(*deliveries, 2);
                    reported.insert(event_id.clone());
                }
            }
        }
        assert_eq!(created, 1, "round {round}");
        assert_eq!(reported.len(), 1, "every publish names the same event");
    }
    assert_eq!(fx.count("events").await, 10);
    assert_eq!(fx.count("deliveries").await, 5 * 3);
    drop(store);
}

async fn the_outbox_is_confirmed_and_leased_exclusively(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let jobs: Vec<DeliveryJob> = {
        let mut all = Vec::new();
        for _ in 0..4 {
            all.extend(publish(store, &t, &[&s]).await);
        }
        all
    };
    assert_eq!(fx.count("delivery_outbox").await, 4);

    // Confirmed entries leave the outbox; unknown ids are no error.
    store
        .confirm_published(&[jobs[0].delivery_id.clone(), Id::new(IdKind::Delivery)])
        .await
        .expect("confirm");
    store.confirm_published(&[]).await.expect("confirm none");
    assert_eq!(fx.count("delivery_outbox").await, 3);

    // Too young for the relay.
    let now = Utc::now();
    let later = now + TimeDelta::hours(1);
    let leased = store
        .lease_unpublished(now - TimeDelta::hours(1), 10, later)
        .await
        .expect("lease");
    assert!(leased.is_empty());

    // Oldest first, at most `limit`, and each entry to one lease holder only.
    let cutoff = Utc::now() + TimeDelta::seconds(1);
    let first = store
        .lease_unpublished(cutoff, 2, later)
        .await
        .expect("lease");
    assert_eq!(ids(&first), ids(&jobs[1..3]));
    assert_eq!(first, jobs[1..3].to_vec(), "the same jobs as at insert");
    let second = store
        .lease_unpublished(cutoff, 10, later)
        .await
        .expect("lease");
    assert_eq!(ids(&second), ids(&jobs[3..4]));
    assert!(
        store
            .lease_unpublished(cutoff, 10, later)
            .await
            .expect("lease")
            .is_empty(),
        "everything is leased"
    );

    // An expired lease makes the entry leasable again.
    fx.execute(
        "UPDATE delivery_outbox SET leased_until = now() - interval '1 second'",
        "UPDATE delivery_outbox \
         SET leased_until = CAST(unixepoch('subsec') * 1000000 AS INTEGER) - 1000000",
        &[],
    )
    .await;
    let again = store
        .lease_unpublished(cutoff, 10, later)
        .await
        .expect("lease");
    assert_eq!(ids(&again), ids(&jobs[1..4]));

    // A job leased after an attempt carries the next attempt number.
    store
        .record_outcomes(&[outcome(
            &jobs[1].delivery_id,
            Some(attempt(&jobs[1].delivery_id, Some(500), None)),
            NextStep::RetryAt(Utc::now()),
        )])
        .await
        .expect("record");
    let expired = Utc::now() - TimeDelta::seconds(1);
    let leased = store
        .lease_unpublished(cutoff, 10, expired)
        .await
        .expect("lease");
    assert!(leased.is_empty(), "still leased until `later`");
    let clear = "UPDATE delivery_outbox SET leased_until = NULL";
    fx.execute(clear, clear, &[]).await;
    let leased = store
        .lease_unpublished(cutoff, 1, expired)
        .await
        .expect("lease");
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].delivery_id, jobs[1].delivery_id);
    assert_eq!(leased[0].attempt_number, 2);

    store
        .confirm_published(&ids(&jobs))
        .await
        .expect("confirm all");
    assert_eq!(fx.count("delivery_outbox").await, 0);
}

// ---------------------------------------------------------------------------------------------
// Outcomes and the retry schedule
// ---------------------------------------------------------------------------------------------

async fn outcomes_number_attempts_and_move_deliveries_through_their_states(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let jobs = publish(store, &t, &[&s]).await;
    let d = &jobs[0].delivery_id;

    // 1: HTTP 500, retry later.
    let due1 = micros(Utc::now() + TimeDelta::minutes(5));
    let a1 = attempt(d, Some(500), None);
    store
        .record_outcomes(&[outcome(d, Some(a1.clone()), NextStep::RetryAt(due1))])
        .await
        .expect("record 1");
    let got = store.get_delivery(d).await.expect("get");
    assert_eq!(got.status, DeliveryStatus::Retrying);
    assert_eq!(got.attempt_count, 1);
    assert_eq!(got.next_attempt_at, Some(due1));
    assert_eq!(got.last_attempt_at, Some(micros(a1.started_at)));
    assert_eq!(got.last_status_code, Some(500));
    assert_eq!(got.last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(fx.schedule(d).await, Some((due1, 2)));

    // 2: a timeout, retry later again: the schedule row moves.
    let due2 = micros(Utc::now() + TimeDelta::minutes(30));
    let a2 = attempt(d, None, Some("timed out after 15 s"));
    store
        .record_outcomes(&[outcome(d, Some(a2.clone()), NextStep::RetryAt(due2))])
        .await
        .expect("record 2");
    let got = store.get_delivery(d).await.expect("get");
    assert_eq!(got.attempt_count, 2);
    assert_eq!(got.last_status_code, None);
    assert_eq!(got.last_error.as_deref(), Some("timed out after 15 s"));
    assert_eq!(fx.schedule(d).await, Some((due2, 3)));

    // The same write again (a retried batch): recorded once.
    store
        .record_outcomes(&[outcome(d, Some(a2.clone()), NextStep::RetryAt(due2))])
        .await
        .expect("record 2 again");
    assert_eq!(store.get_delivery(d).await.expect("get").attempt_count, 2);

    // 3: a redelivered job reports attempt 2 again: it is recorded as 3. Failed.
    let mut a3 = attempt(d, Some(503), None);
    a3.attempt_number = 2;
    store
        .record_outcomes(&[outcome(
            d,
            Some(a3.clone()),
            NextStep::Failed {
                reason: "retry schedule spent".to_string(),
            },
        )])
        .await
        .expect("record 3");
    let got = store.get_delivery(d).await.expect("get");
    assert_eq!(got.status, DeliveryStatus::Failed);
    assert_eq!(got.attempt_count, 3);
    assert_eq!(got.next_attempt_at, None);
    assert_eq!(
        got.last_error.as_deref(),
        Some("retry schedule spent (last attempt: HTTP 503)")
    );
    assert_eq!(fx.schedule(d).await, None);
    assert!(got.updated_at >= got.created_at);

    let attempts = store
        .list_attempts(d, &page(None, 0))
        .await
        .expect("attempts");
    assert_eq!(
        attempts
            .items
            .iter()
            .map(|a| (a.attempt_number, a.id.clone()))
            .collect::<Vec<_>>(),
        vec![(1, a1.id.clone()), (2, a2.id.clone()), (3, a3.id.clone())]
    );
    let mut want = a2.clone();
    want.attempt_number = 2;
    want.started_at = micros(want.started_at);
    assert_eq!(attempts.items[1], want);
    assert_eq!(attempts.next_cursor, None);

    // Pages of attempts: the cursor is the last number.
    let p1 = store.list_attempts(d, &page(None, 2)).await.expect("p1");
    assert_eq!(p1.items.len(), 2);
    assert_eq!(p1.next_cursor.as_deref(), Some("2"));
    let p2 = store
        .list_attempts(d, &page(p1.next_cursor, 2))
        .await
        .expect("p2");
    assert_eq!(p2.items.len(), 1);
    assert_eq!(p2.items[0].attempt_number, 3);
    assert_eq!(p2.next_cursor, None);
    let err = store
        .list_attempts(d, &page(Some("x".to_string()), 2))
        .await
        .expect_err("bad cursor");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

async fn a_batch_of_outcomes_applies_in_order_and_skips_deliveries_that_are_gone(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let jobs = publish(store, &t, &[&s1, &s2]).await;
    let more = publish(store, &t, &[&s1]).await;
    let (ok, twice, disabled) = (
        &jobs[0].delivery_id,
        &jobs[1].delivery_id,
        &more[0].delivery_id,
    );
    let ghost = Id::new(IdKind::Delivery);

    let soon = micros(Utc::now() + TimeDelta::seconds(5));
    store
        .record_outcomes(&[
            outcome(ok, Some(attempt(ok, Some(204), None)), NextStep::Succeeded),
            outcome(
                twice,
                Some(attempt(twice, None, Some("connection refused"))),
                NextStep::RetryAt(soon),
            ),
            outcome(
                &ghost,
                Some(attempt(&ghost, Some(200), None)),
                NextStep::Succeeded,
            ),
            outcome(
                twice,
                Some(attempt(twice, Some(200), None)),
                NextStep::Succeeded,
            ),
            outcome(
                disabled,
                None,
                NextStep::Failed {
                    reason: "subscription disabled".to_string(),
                },
            ),
        ])
        .await
        .expect("record");

    let got = store.get_delivery(ok).await.expect("get");
    assert_eq!(got.status, DeliveryStatus::Succeeded);
    assert_eq!(got.attempt_count, 1);
    assert_eq!(got.last_status_code, Some(204));
    assert_eq!(got.last_error, None);
    assert_eq!(fx.schedule(ok).await, None);

    let got = store.get_delivery(twice).await.expect("get");
    assert_eq!(
        got.status,
        DeliveryStatus::Succeeded,
        "the last outcome wins"
    );
    assert_eq!(got.attempt_count, 2);
    assert_eq!(got.next_attempt_at, None);
    assert_eq!(got.last_status_code, Some(200));
    assert_eq!(got.last_error, None);
    assert_eq!(fx.schedule(twice).await, None);
    let numbers: Vec<u32> = store
        .list_attempts(twice, &page(None, 0))
        .await
        .expect("attempts")
        .items
        .iter()
        .map(|a| a.attempt_number)
        .collect();
    assert_eq!(numbers, vec![1, 2]);

    // No attempt was made: no attempt counted, the reason recorded.
    let got = store.get_delivery(disabled).await.expect("get");
    assert_eq!(got.status, DeliveryStatus::Failed);
    assert_eq!(got.attempt_count, 0);
    assert_eq!(got.last_attempt_at, None);
    assert_eq!(got.last_error.as_deref(), Some("subscription disabled"));
    assert_eq!(fx.count("attempts").await, 3);

    // A batch of nothing but deliveries that are gone is no error.
    store
        .record_outcomes(&[outcome(&ghost, None, NextStep::Succeeded)])
        .await
        .expect("all gone");
    store.record_outcomes(&[]).await.expect("empty");
}

async fn concurrent_writers_never_give_two_attempts_one_number(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let jobs = publish(store, &t, &[&s]).await;
    let d = jobs[0].delivery_id.clone();
    let other = publish(store, &t, &[&s]).await[0].delivery_id.clone();
    let store = fx.shared();

    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (store, d, other) = (store.clone(), d.clone(), other.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    // Batches that share deliveries, in either order.
                    let (x, y) = if i % 2 == 0 {
                        (&d, &other)
                    } else {
                        (&other, &d)
                    };
                    store
                        .record_outcomes(&[
                            outcome(
                                x,
                                Some(attempt(x, Some(500), None)),
                                NextStep::RetryAt(Utc::now()),
                            ),
                            outcome(
                                y,
                                Some(attempt(y, Some(500), None)),
                                NextStep::RetryAt(Utc::now()),
                            ),
                        ])
                        .await
                        .expect("record");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    for id in [&d, &other] {
        let numbers: Vec<u32> = store
            .list_attempts(id, &page(None, 100))
            .await
            .expect("attempts")
            .items
            .iter()
            .map(|a| a.attempt_number)
            .collect();
        assert_eq!(numbers, (1..=30).collect::<Vec<_>>());
        assert_eq!(store.get_delivery(id).await.expect("get").attempt_count, 30);
        assert_eq!(fx.schedule(id).await.map(|(_, n)| n), Some(31));
    }
    drop(store);
}

async fn due_retries_are_promoted_to_the_outbox_once(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let jobs = publish(store, &t, &[&s]).await;
    let more = publish(store, &t, &[&s]).await;
    let future = publish(store, &t, &[&s]).await;
    store.confirm_published(&ids(&jobs)).await.expect("confirm");
    store.confirm_published(&ids(&more)).await.expect("confirm");
    store
        .confirm_published(&ids(&future))
        .await
        .expect("confirm");
    let now = Utc::now();
    let (early, late) = (&jobs[0].delivery_id, &more[0].delivery_id);
    store
        .record_outcomes(&[
            outcome(
                late,
                Some(attempt(late, Some(500), None)),
                NextStep::RetryAt(now - TimeDelta::seconds(1)),
            ),
            outcome(
                early,
                Some(attempt(early, Some(500), None)),
                NextStep::RetryAt(now - TimeDelta::seconds(10)),
            ),
            outcome(
                &future[0].delivery_id,
                Some(attempt(&future[0].delivery_id, Some(500), None)),
                NextStep::RetryAt(now + TimeDelta::hours(1)),
            ),
        ])
        .await
        .expect("record");
    assert_eq!(fx.count("retry_schedule").await, 3);

    // Most due first, at most `limit`.
    let first = store.promote_due_retries(now, 1).await.expect("promote");
    assert_eq!(ids(&first), vec![early.clone()]);
    let job = &first[0];
    assert_eq!(job.attempt_number, 2);
    assert_eq!(job.payload, jobs[0].payload);
    assert_eq!(job.event_id, jobs[0].event_id);
    assert_eq!(job.subscription_id, s);
    let rest = store.promote_due_retries(now, 10).await.expect("promote");
    assert_eq!(ids(&rest), vec![late.clone()]);
    assert!(
        store
            .promote_due_retries(now, 10)
            .await
            .expect("promote")
            .is_empty(),
        "not due yet"
    );
    assert!(
        store
            .promote_due_retries(now, 0)
            .await
            .expect("zero")
            .is_empty()
    );

    for id in [early, late] {
        let got = store.get_delivery(id).await.expect("get");
        assert_eq!(got.status, DeliveryStatus::Pending);
        assert_eq!(got.next_attempt_at, None);
        assert_eq!(got.attempt_count, 1);
        assert_eq!(fx.schedule(id).await, None);
    }
    assert_eq!(
        fx.outbox().await,
        HashSet::from([early.to_string(), late.to_string()])
    );
    assert!(fx.schedule(&future[0].delivery_id).await.is_some());
}

async fn concurrent_promoters_never_return_the_same_delivery(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let batch: Vec<NewEvent> = (0..200).map(|_| new_event(&t, None, &[&s])).collect();
    let mut all = Vec::new();
    for outcome in store.insert_events(&batch).await.expect("insert") {
        match outcome {
            InsertOutcome::Created { jobs, .. } => all.extend(ids(&jobs)),
            other => panic!("{other:?}"),
        }
    }
    store.confirm_published(&all).await.expect("confirm");
    let due = Utc::now() - TimeDelta::seconds(1);
    let outcomes: Vec<AttemptOutcome> = all
        .iter()
        .map(|d| outcome(d, Some(attempt(d, Some(500), None)), NextStep::RetryAt(due)))
        .collect();
    store.record_outcomes(&outcomes).await.expect("record");
    assert_eq!(fx.count("retry_schedule").await, 200);

    let store = fx.shared();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = fx.shared();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let jobs = store
                        .promote_due_retries(Utc::now(), 7)
                        .await
                        .expect("promote");
                    if jobs.is_empty() {
                        return mine;
                    }
                    mine.extend(ids(&jobs));
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut total = 0;
    for task in tasks {
        for id in task.await.expect("task") {
            total += 1;
            assert!(seen.insert(id.clone()), "{id} promoted twice");
        }
    }
    // A promoter may stop early when the others hold every remaining row; sweep up.
    for id in ids(&store
        .promote_due_retries(Utc::now(), 1000)
        .await
        .expect("sweep"))
    {
        total += 1;
        assert!(seen.insert(id.clone()), "{id} promoted twice");
    }
    assert_eq!(total, 200);
    assert_eq!(fx.count("retry_schedule").await, 0);
    assert_eq!(fx.count("delivery_outbox").await, 200);
    drop(store);
}

async fn failed_deliveries_are_found_and_requeued(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let (s, other_sub) = (subscription(store, &t).await, subscription(store, &t).await);
    let start = Utc::now() - TimeDelta::seconds(1);
    let mut failed = Vec::new();
    for _ in 0..3 {
        let jobs = publish(store, &t, &[&s, &other_sub]).await;
        for job in &jobs {
            store
                .record_outcomes(&[outcome(
                    &job.delivery_id,
                    Some(attempt(&job.delivery_id, Some(500), None)),
                    NextStep::Failed {
                        reason: "retry schedule spent".to_string(),
                    },
                )])
                .await
                .expect("fail");
        }
        failed.push(jobs[0].delivery_id.clone());
        store.confirm_published(&ids(&jobs)).await.expect("confirm");
    }
    let retrying = publish(store, &t, &[&s]).await[0].delivery_id.clone();
    store
        .confirm_published(std::slice::from_ref(&retrying))
        .await
        .expect("confirm");
    store
        .record_outcomes(&[outcome(
            &retrying,
            Some(attempt(&retrying, Some(500), None)),
            NextStep::RetryAt(Utc::now() + TimeDelta::hours(1)),
        )])
        .await
        .expect("retrying");

    // Oldest (id) first, only this subscription's, only failed ones, within the window.
    let found = store
        .failed_deliveries(&s, start, None, 10)
        .await
        .expect("failed");
    assert_eq!(found, sorted(failed.clone()));
    let found = store
        .failed_deliveries(&s, start, None, 2)
        .await
        .expect("failed");
    assert_eq!(found, sorted(failed.clone())[..2].to_vec());
    let created = store
        .get_delivery(&failed[1])
        .await
        .expect("get")
        .created_at;
    let found = store
        .failed_deliveries(&s, created, None, 10)
        .await
        .expect("since");
    assert_eq!(found, sorted(failed[1..].to_vec()));
    let found = store
        .failed_deliveries(&s, start, Some(created), 10)
        .await
        .expect("until");
    assert_eq!(found, failed[..1].to_vec());
    assert!(
        store
            .failed_deliveries(&s, Utc::now() + TimeDelta::hours(1), None, 10)
            .await
            .expect("future")
            .is_empty()
    );

    // An unknown id among them: nothing changes.
    let ghost = Id::new(IdKind::Delivery);
    let err = store
        .requeue_deliveries(&[failed[0].clone(), ghost.clone(), Id::new(IdKind::Delivery)])
        .await
        .expect_err("unknown");
    assert!(
        matches!(&err, StoreError::NotFound { entity: "delivery", id } if id == ghost.as_str()),
        "{err}"
    );
    assert_eq!(
        store.get_delivery(&failed[0]).await.expect("get").status,
        DeliveryStatus::Failed
    );
    assert_eq!(fx.count("delivery_outbox").await, 0);

    // A manual retry: back to pending, into the outbox, any schedule dropped.
    let asked = vec![failed[1].clone(), retrying.clone(), failed[1].clone()];
    let jobs = store.requeue_deliveries(&asked).await.expect("requeue");
    assert_eq!(ids(&jobs), vec![failed[1].clone(), retrying.clone()]);
    assert!(jobs.iter().all(|j| j.attempt_number == 2));
    for id in [&failed[1], &retrying] {
        let got = store.get_delivery(id).await.expect("get");
        assert_eq!(got.status, DeliveryStatus::Pending);
        assert_eq!(got.next_attempt_at, None);
        assert_eq!(fx.schedule(id).await, None);
    }
    assert_eq!(
        fx.outbox().await,
        HashSet::from([failed[1].to_string(), retrying.to_string()])
    );
    // Requeued deliveries are no longer failed.
    let found = store
        .failed_deliveries(&s, start, None, 10)
        .await
        .expect("failed");
    assert_eq!(found, sorted(vec![failed[0].clone(), failed[2].clone()]));
    assert!(
        store
            .requeue_deliveries(&[])
            .await
            .expect("none")
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Listings
// ---------------------------------------------------------------------------------------------

async fn events_are_listed_newest_first_with_filters_and_pages(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let other = tenant(store).await;
    let base = Utc::now() - TimeDelta::hours(1);
    let mut batch = Vec::new();
    for i in 0..5 {
        let mut e = event(
            &t,
            if i % 2 == 0 {
                "invoice.paid"
            } else {
                "user.created"
            },
            None,
        );
        e.created_at = base + TimeDelta::minutes(i);
        batch.push(NewEvent {
            event: e,
            subscription_ids: vec![],
            traceparent: None,
        });
    }
    batch.push(NewEvent {
        event: event(&other, "invoice.paid", None),
        subscription_ids: vec![],
        traceparent: None,
    });
    store.insert_events(&batch).await.expect("insert");
    let mine: Vec<Id> = batch[..5].iter().map(|e| e.event.id.clone()).collect();
    let filter = EventFilter {
        tenant_id: t.clone(),
        event_type: None,
        since: None,
        until: None,
    };

    let all = store
        .list_events(&filter, &page(None, 0))
        .await
        .expect("list");
    let newest_first = desc(mine.clone());
    assert_eq!(
        all.items.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        newest_first
    );
    assert_eq!(all.next_cursor, None);

    // Pages of two.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = store
            .list_events(&filter, &page(cursor, 2))
            .await
            .expect("page");
        assert!(p.items.len() <= 2);
        seen.extend(p.items.iter().map(|e| e.id.clone()));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);

    // By type, and by time.
    let by_type = EventFilter {
        event_type: Some("user.created".to_string()),
        ..filter.clone()
    };
    let got = store
        .list_events(&by_type, &page(None, 0))
        .await
        .expect("type");
    assert_eq!(
        got.items.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        desc(vec![mine[3].clone(), mine[1].clone()])
    );
    let window = EventFilter {
        since: Some(base + TimeDelta::minutes(1)),
        until: Some(base + TimeDelta::minutes(3)),
        ..filter.clone()
    };
    let got = store
        .list_events(&window, &page(None, 0))
        .await
        .expect("window");
    assert_eq!(
        got.items.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        desc(vec![mine[2].clone(), mine[1].clone()])
    );
}

async fn deliveries_are_listed_with_filters_and_followed_by_update_time(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let other = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let s3 = subscription(store, &other).await;
    let a = publish(store, &t, &[&s1, &s2]).await;
    let b = publish(store, &t, &[&s1]).await;
    let c = publish(store, &other, &[&s3]).await;
    let all_t: Vec<Id> = a.iter().chain(&b).map(|j| j.delivery_id.clone()).collect();

    let newest_first = desc(all_t.clone());
    let list = |f: DeliveryFilter| {
        let store = &store;
        async move {
            store
                .list_deliveries(&f, &page(None, 0))
                .await
                .expect("list")
                .items
                .into_iter()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        }
    };
    let of_tenant = DeliveryFilter {
        tenant_id: Some(t.clone()),
        ..Default::default()
    };
    assert_eq!(list(of_tenant.clone()).await, newest_first);
    assert_eq!(
        list(DeliveryFilter::default()).await.len(),
        4,
        "no filter: every tenant"
    );
    let want = desc(vec![a[0].delivery_id.clone(), b[0].delivery_id.clone()]);
    assert_eq!(
        list(DeliveryFilter {
            subscription_id: Some(s1.clone()),
            ..Default::default()
        })
        .await,
        want
    );
    let want = desc(ids(&a));
    assert_eq!(
        list(DeliveryFilter {
            event_id: Some(a[0].event_id.clone()),
            ..Default::default()
        })
        .await,
        want
    );
    assert_eq!(
        list(DeliveryFilter {
            tenant_id: Some(other.clone()),
            ..Default::default()
        })
        .await,
        ids(&c)
    );

    // Pages of one.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = store
            .list_deliveries(&of_tenant, &page(cursor, 1))
            .await
            .expect("page");
        seen.extend(p.items.iter().map(|d| d.id.clone()));
        match p.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);

    // Changes after a time, oldest change first.
    let before = store
        .get_delivery(&b[0].delivery_id)
        .await
        .expect("get")
        .updated_at;
    let changed = store
        .deliveries_updated_after(&of_tenant, before, 100)
        .await
        .expect("changes");
    assert!(changed.is_empty(), "{changed:?}");
    for d in [&b[0].delivery_id, &a[1].delivery_id] {
        store
            .record_outcomes(&[outcome(
                d,
                Some(attempt(d, Some(200), None)),
                NextStep::Succeeded,
            )])
            .await
            .expect("record");
    }
    let changed = store
        .deliveries_updated_after(&of_tenant, before, 100)
        .await
        .expect("changes");
    assert_eq!(
        changed.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        vec![b[0].delivery_id.clone(), a[1].delivery_id.clone()]
    );
    assert!(changed[0].updated_at <= changed[1].updated_at);
    let changed = store
        .deliveries_updated_after(&of_tenant, before, 1)
        .await
        .expect("limited");
    assert_eq!(changed.len(), 1);
    let changed = store
        .deliveries_updated_after(
            &DeliveryFilter {
                tenant_id: Some(other.clone()),
                ..Default::default()
            },
            before,
            100,
        )
        .await
        .expect("other tenant");
    assert_eq!(
        changed.into_iter().map(|d| d.id).collect::<Vec<_>>(),
        ids(&c),
        "published after `before`, untouched since"
    );

    // By status.
    let want = desc(vec![b[0].delivery_id.clone(), a[1].delivery_id.clone()]);
    assert_eq!(
        list(DeliveryFilter {
            tenant_id: Some(t.clone()),
            status: Some(DeliveryStatus::Succeeded),
            ..Default::default()
        })
        .await,
        want
    );
    assert_eq!(
        list(DeliveryFilter {
            tenant_id: Some(t.clone()),
            status: Some(DeliveryStatus::Pending),
            ..Default::default()
        })
        .await,
        vec![a[0].delivery_id.clone()]
    );
    // By creation time.
    let future = Utc::now() + TimeDelta::hours(1);
    assert!(
        list(DeliveryFilter {
            since: Some(future),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        list(DeliveryFilter {
            tenant_id: Some(t.clone()),
            until: Some(future),
            ..Default::default()
        })
        .await
        .len(),
        3
    );

    let err = store
        .get_delivery(&Id::new(IdKind::Delivery))
        .await
        .expect_err("missing");
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "delivery",
                ..
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The registry's side
// ---------------------------------------------------------------------------------------------

async fn deleting_subscriptions_and_tenants_cascades_through_the_pipeline(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let jobs = publish(store, &t, &[&s1, &s2]).await;
    let outcomes: Vec<AttemptOutcome> = jobs
        .iter()
        .map(|j| {
            outcome(
                &j.delivery_id,
                Some(attempt(&j.delivery_id, Some(500), None)),
                NextStep::RetryAt(Utc::now() + TimeDelta::hours(1)),
            )
        })
        .collect();
    store.record_outcomes(&outcomes).await.expect("record");
    for table in [
        "deliveries",
        "delivery_outbox",
        "attempts",
        "retry_schedule",
    ] {
        assert_eq!(fx.count(table).await, 2, "{table}");
    }

    // A subscription takes its deliveries (and everything of theirs); the event stays.
    store.delete_subscription(&s1).await.expect("delete");
    for table in [
        "deliveries",
        "delivery_outbox",
        "attempts",
        "retry_schedule",
    ] {
        assert_eq!(fx.count(table).await, 1, "{table}");
    }
    assert_eq!(fx.count("events").await, 1);
    // Its outcomes arriving late are skipped; the other one's is recorded already.
    store
        .record_outcomes(&outcomes)
        .await
        .expect("record after delete");
    assert_eq!(fx.count("attempts").await, 1);

    // A tenant takes everything.
    store.delete_tenant(&t).await.expect("delete tenant");
    for table in [
        "events",
        "deliveries",
        "delivery_outbox",
        "attempts",
        "retry_schedule",
    ] {
        assert_eq!(fx.count(table).await, 0, "{table}");
    }
}

async fn subscriptions_are_disabled_with_a_reason_and_enabled_again(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let before = store.get_subscription(&s).await.expect("get");

    let disabled = store
        .set_subscription_state(&s, SubscriptionState::Disabled, Some("410 Gone"))
        .await
        .expect("disable");
    assert_eq!(disabled.state, SubscriptionState::Disabled);
    assert_eq!(disabled.disabled_reason.as_deref(), Some("410 Gone"));
    assert!(disabled.updated_at >= before.updated_at);
    assert_eq!(disabled.url, before.url);
    assert!(
        store
            .enabled_subscriptions(&t)
            .await
            .expect("enabled")
            .is_empty()
    );
    assert_eq!(store.get_subscription(&s).await.expect("get"), disabled);

    let enabled = store
        .set_subscription_state(&s, SubscriptionState::Enabled, Some("ignored"))
        .await
        .expect("enable");
    assert_eq!(enabled.state, SubscriptionState::Enabled);
    assert_eq!(enabled.disabled_reason, None);

    let missing = Id::new(IdKind::Subscription);
    let err = store
        .set_subscription_state(&missing, SubscriptionState::Disabled, None)
        .await
        .expect_err("missing");
    assert!(
        matches!(&err, StoreError::NotFound { entity: "subscription", id } if id == missing.as_str()),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Deferral and circuit state
// ---------------------------------------------------------------------------------------------

/// A deferral (no attempt, a `RetryAt`) keeps its reason next to `next_attempt_at` and the
/// last attempt's error; the next attempt, or queueing again, clears it. A circuit's
/// open-until time is set, read and cleared; a missing subscription is no error.
async fn deferrals_and_open_circuits_are_recorded_and_cleared(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let s = subscription(store, &t).await;
    let d = publish(store, &t, &[&s]).await[0].delivery_id.clone();
    let failed = attempt(&d, Some(500), None);
    let soon = micros(Utc::now() + TimeDelta::seconds(1));
    store
        .record_outcomes(&[outcome(&d, Some(failed), NextStep::RetryAt(soon))])
        .await
        .expect("attempt");
    let later = micros(Utc::now() + TimeDelta::seconds(30));
    let mut deferral = outcome(&d, None, NextStep::RetryAt(later));
    deferral.deferred_reason = Some("circuit_open".to_string());
    store.record_outcomes(&[deferral]).await.expect("defer");
    let got = store.get_delivery(&d).await.expect("get");
    assert_eq!(got.deferred_reason.as_deref(), Some("circuit_open"));
    assert_eq!(got.next_attempt_at, Some(later));
    assert_eq!(got.last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(got.attempt_count, 1, "a deferral is no attempt");

    // A reason on an outcome with an attempt is not kept.
    let mut next = outcome(
        &d,
        Some(attempt(&d, Some(503), None)),
        NextStep::RetryAt(soon),
    );
    next.deferred_reason = Some("circuit_open".to_string());
    store.record_outcomes(&[next]).await.expect("attempt");
    assert_eq!(
        store.get_delivery(&d).await.expect("get").deferred_reason,
        None
    );

    let mut again = outcome(&d, None, NextStep::RetryAt(later));
    again.deferred_reason = Some("rate_limit".to_string());
    store.record_outcomes(&[again]).await.expect("defer");
    store
        .requeue_deliveries(std::slice::from_ref(&d))
        .await
        .expect("requeue");
    let requeued = store.get_delivery(&d).await.expect("get");
    assert_eq!(requeued.status, DeliveryStatus::Pending);
    assert_eq!(
        requeued.deferred_reason, None,
        "queued again: no longer deferred"
    );

    assert_eq!(store.circuit_open_until(&s).await.expect("read"), None);
    store
        .set_circuit_open_until(&s, Some(later))
        .await
        .expect("open");
    assert_eq!(
        store.circuit_open_until(&s).await.expect("read"),
        Some(later)
    );
    store.set_circuit_open_until(&s, None).await.expect("close");
    assert_eq!(store.circuit_open_until(&s).await.expect("read"), None);
    let missing = Id::new(IdKind::Subscription);
    store
        .set_circuit_open_until(&missing, Some(later))
        .await
        .expect("a missing subscription is no error");
    assert_eq!(
        store.circuit_open_until(&missing).await.expect("read"),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Trace context
// ---------------------------------------------------------------------------------------------

/// The `traceparent` stored with a publish's deliveries is on their first jobs and on every
/// job rebuilt from the database later: relayed, promoted from the retry schedule, requeued
/// by hand. A publish without one gives jobs without one.
async fn the_traceparent_of_a_publish_comes_back_with_every_job_of_its_deliveries(fx: &Fixture) {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let store = fx.store();
    let t = tenant(store).await;
    let (s1, s2) = (subscription(store, &t).await, subscription(store, &t).await);
    let traced = NewEvent {
        traceparent: Some(TRACEPARENT.to_string()),
        ..new_event(&t, None, &[&s1, &s2])
    };
    let plain = new_event(&t, None, &[&s1]);
    let outcomes = store.insert_events(&[traced, plain]).await.expect("insert");
    let jobs_of = |o: &InsertOutcome| match o {
        InsertOutcome::Created { jobs, .. } => jobs.clone(),
        other => panic!("expected Created, got {other:?}"),
    };
    let (traced_jobs, plain_jobs) = (jobs_of(&outcomes[0]), jobs_of(&outcomes[1]));
    assert_eq!(traced_jobs.len(), 2);
    for job in &traced_jobs {
        assert_eq!(job.traceparent.as_deref(), Some(TRACEPARENT));
    }
    assert_eq!(plain_jobs[0].traceparent, None);

    // Relayed: what the outbox still holds, rebuilt from the rows.
    let now = Utc::now();
    let leased = store
        .lease_unpublished(now + TimeDelta::seconds(1), 10, now + TimeDelta::hours(1))
        .await
        .expect("lease");
    assert_eq!(leased.len(), 3);
    for job in &leased {
        let want = traced_jobs
            .iter()
            .any(|j| j.delivery_id == job.delivery_id)
            .then_some(TRACEPARENT);
        assert_eq!(job.traceparent.as_deref(), want, "{job:?}");
    }
    let all: Vec<Id> = leased.iter().map(|j| j.delivery_id.clone()).collect();
    store.confirm_published(&all).await.expect("confirm");

    // Promoted from the retry schedule after a failed attempt.
    let first = &traced_jobs[0].delivery_id;
    store
        .record_outcomes(&[outcome(
            first,
            Some(attempt(first, Some(500), None)),
            NextStep::RetryAt(now - TimeDelta::seconds(1)),
        )])
        .await
        .expect("record");
    let promoted = store
        .promote_due_retries(Utc::now(), 10)
        .await
        .expect("promote");
    assert_eq!(promoted.len(), 1);
    assert_eq!(promoted[0].attempt_number, 2);
    assert_eq!(promoted[0].traceparent.as_deref(), Some(TRACEPARENT));

    // Requeued by hand, with and without one.
    let requeued = store
        .requeue_deliveries(&[
            traced_jobs[1].delivery_id.clone(),
            plain_jobs[0].delivery_id.clone(),
        ])
        .await
        .expect("requeue");
    assert_eq!(requeued.len(), 2);
    assert_eq!(requeued[0].traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(requeued[1].traceparent, None);
}
