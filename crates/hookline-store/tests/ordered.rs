//! Ordered delivery in the store (issue #11, part 2), one body per case on both adapters:
//! only an ordered subscription's head is queued, a final outcome of the head promotes the
//! next in publish order, a retry or a deferral holds the queue, duplicates are refused by
//! `may_attempt`, and making the subscription unordered or disabling it releases the queue.

mod support;

use std::collections::VecDeque;

use chrono::{TimeDelta, Utc};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{Attempt, DeliveryStatus, Event, Ordering, SubscriptionState};
use hookline_core::{Id, IdKind};
use hookline_store::{AttemptOutcome, InsertOutcome, NewEvent, NextStep};
use support::{Backend, Fixture, Store, tenant};

on_both_backends! {
    current_thread only_the_head_is_queued_and_its_end_promotes_the_next(3);
    current_thread a_retry_or_a_deferral_holds_the_queue_until_the_head_is_final(3);
    current_thread unordering_or_disabling_releases_the_queue(3);
    current_thread a_batch_keeps_its_order_whatever_its_idempotency_keys(3);
    current_thread a_manual_retry_of_a_finished_delivery_goes_outside_the_order(3);
    multi_thread publishes_racing_the_end_of_heads_keep_publish_order(6);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn subscription(store: &dyn Store, tenant_id: &Id, ordering: Ordering) -> Id {
    let mut new = support::new_subscription(tenant_id);
    new.ordering = ordering;
    let sub = store.create_subscription(&new).await.expect("create");
    assert_eq!(sub.ordering, ordering);
    sub.id
}

fn new_event(tenant_id: &Id, n: usize, subs: &[&Id]) -> NewEvent {
    NewEvent {
        event: Event {
            id: Id::new(IdKind::Event),
            tenant_id: tenant_id.clone(),
            event_type: "invoice.paid".to_string(),
            payload: format!(r#"{{"n":{n}}}"#).into_bytes(),
            channels: vec![],
            idempotency_key: None,
            created_at: Utc::now(),
        },
        subscription_ids: subs.iter().map(|s| (*s).clone()).collect(),
        traceparent: None,
    }
}

/// Publishes `count` events in one batch to `subs`; returns the jobs queued per event.
async fn publish(
    store: &dyn Store,
    tenant_id: &Id,
    from: usize,
    count: usize,
    subs: &[&Id],
) -> Vec<Vec<DeliveryJob>> {
    let batch: Vec<NewEvent> = (from..from + count)
        .map(|n| new_event(tenant_id, n, subs))
        .collect();
    store
        .insert_events(&batch)
        .await
        .expect("insert")
        .into_iter()
        .map(|o| match o {
            InsertOutcome::Created { jobs, held, .. } => {
                // Every delivery created is counted: queued now (a job) or held.
                assert_eq!(jobs.len() + held as usize, subs.len());
                jobs
            }
            other => panic!("expected Created, got {other:?}"),
        })
        .collect()
}

fn of(jobs: &[DeliveryJob], sub: &Id) -> Vec<DeliveryJob> {
    jobs.iter()
        .filter(|j| &j.subscription_id == sub)
        .cloned()
        .collect()
}

fn number(job: &DeliveryJob) -> usize {
    let payload: serde_json::Value = serde_json::from_slice(&job.payload).expect("json");
    usize::try_from(payload["n"].as_u64().expect("n")).expect("usize")
}

fn outcome(job: &DeliveryJob, code: Option<u16>, next: NextStep) -> AttemptOutcome {
    AttemptOutcome {
        delivery_id: job.delivery_id.clone(),
        attempt: code.map(|code| Attempt {
            id: Id::new(IdKind::Attempt),
            delivery_id: job.delivery_id.clone(),
            attempt_number: 0,
            started_at: Utc::now(),
            duration_ms: 3,
            status_code: Some(code),
            error_class: None,
            error_message: None,
            response_excerpt: Vec::new(),
        }),
        next,
        deferred_reason: None,
    }
}

fn succeeded(job: &DeliveryJob) -> AttemptOutcome {
    outcome(job, Some(200), NextStep::Succeeded)
}

fn failed(job: &DeliveryJob) -> AttemptOutcome {
    let reason = "the retry schedule is spent".to_string();
    outcome(job, Some(500), NextStep::Failed { reason })
}

async fn may(store: &dyn Store, job: &DeliveryJob) -> bool {
    store
        .may_attempt(&job.delivery_id)
        .await
        .expect("may attempt")
}

/// The ids of the deliveries of `sub` in the store, in publish order.
async fn deliveries_of(store: &dyn Store, event_ids: &[Id], sub: &Id) -> Vec<Id> {
    let mut ids = Vec::new();
    for e in event_ids {
        let filter = hookline_store::DeliveryFilter {
            event_id: Some(e.clone()),
            subscription_id: Some(sub.clone()),
            ..Default::default()
        };
        let page = store
            .list_deliveries(&filter, &hookline_store::PageRequest::default())
            .await
            .expect("list");
        ids.extend(page.items.into_iter().map(|d| d.id));
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

async fn only_the_head_is_queued_and_its_end_promotes_the_next(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let ordered = subscription(store, &t, Ordering::Ordered).await;
    let unordered = subscription(store, &t, Ordering::Unordered).await;

    let per_event = publish(store, &t, 0, 3, &[&ordered, &unordered]).await;
    let jobs: Vec<DeliveryJob> = per_event.concat();
    assert_eq!(
        of(&jobs, &unordered).len(),
        3,
        "unordered: every delivery is queued"
    );
    let heads = of(&jobs, &ordered);
    assert_eq!(heads.len(), 1, "ordered: only the head is queued");
    assert_eq!(number(&heads[0]), 0, "the head is the first of the batch");
    assert_eq!(
        fx.count("deliveries").await,
        6,
        "the waiting ones are stored"
    );
    assert_eq!(fx.outbox().await.len(), 4, "…but not in the outbox");
    // A later publish waits behind the head too.
    let later = publish(store, &t, 3, 1, &[&ordered]).await.concat();
    assert!(later.is_empty(), "{later:?}");

    let mut head = heads[0].clone();
    assert!(may(store, &head).await);
    let unordered_jobs = of(&jobs, &unordered);
    assert!(may(store, &unordered_jobs[0]).await);
    // Unordered outcomes promote nothing.
    let promoted = store
        .record_outcomes(&[succeeded(&unordered_jobs[0])])
        .await
        .expect("record");
    assert!(promoted.is_empty());

    for n in 1..4 {
        let promoted = store
            .record_outcomes(&[succeeded(&head)])
            .await
            .expect("record");
        assert_eq!(promoted.len(), 1, "the end of head {} promotes one", n - 1);
        assert_eq!(number(&promoted[0]), n, "in publish order");
        assert_eq!(promoted[0].attempt_number, 1);
        assert!(fx.outbox().await.contains(promoted[0].delivery_id.as_str()));
        // The finished head's job, redelivered, is a duplicate.
        assert!(
            !may(store, &head).await,
            "a finished head is not attempted again"
        );
        // A repeat of the same outcome promotes nothing more.
        let again = store
            .record_outcomes(&[succeeded(&head)])
            .await
            .expect("again");
        assert!(again.is_empty(), "{again:?}");
        head = promoted[0].clone();
        assert!(may(store, &head).await);
    }
    let last = store
        .record_outcomes(&[failed(&head)])
        .await
        .expect("record");
    assert!(last.is_empty(), "nothing waits any more");
    assert_eq!(fx.count("ordered_heads").await, 0);
    // With no head, the next publish is the head at once.
    let next = publish(store, &t, 4, 1, &[&ordered]).await.concat();
    assert_eq!(next.len(), 1);
}

async fn a_retry_or_a_deferral_holds_the_queue_until_the_head_is_final(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let ordered = subscription(store, &t, Ordering::Ordered).await;
    let per_event = publish(store, &t, 0, 3, &[&ordered]).await;
    assert_eq!(per_event.concat().len(), 1, "one head");
    let head = per_event[0][0].clone();

    let soon = Utc::now() - TimeDelta::seconds(1);
    let promoted = store
        .record_outcomes(&[outcome(&head, Some(500), NextStep::RetryAt(soon))])
        .await
        .expect("retry");
    assert!(promoted.is_empty(), "a retry holds the queue");
    let retried = store
        .promote_due_retries(Utc::now(), 10)
        .await
        .expect("due");
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].delivery_id, head.delivery_id);
    assert_eq!(retried[0].attempt_number, 2);
    assert!(
        may(store, &retried[0]).await,
        "the retried head is still the head"
    );

    let mut deferral = outcome(&retried[0], None, NextStep::RetryAt(soon));
    deferral.deferred_reason = Some("in_flight".to_string());
    let promoted = store.record_outcomes(&[deferral]).await.expect("defer");
    assert!(promoted.is_empty(), "a deferral holds the queue");
    let again = store
        .promote_due_retries(Utc::now(), 10)
        .await
        .expect("due");
    assert_eq!(again.len(), 1);

    let promoted = store
        .record_outcomes(&[failed(&again[0])])
        .await
        .expect("fail");
    assert_eq!(promoted.len(), 1, "a spent schedule lets the next go");
    assert_eq!(number(&promoted[0]), 1);
    let status = store
        .get_delivery(&head.delivery_id)
        .await
        .expect("get")
        .status;
    assert_eq!(status, DeliveryStatus::Failed);
}

async fn unordering_or_disabling_releases_the_queue(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    for release in ["unorder", "disable"] {
        let ordered = subscription(store, &t, Ordering::Ordered).await;
        let per_event = publish(store, &t, 0, 4, &[&ordered]).await;
        assert_eq!(per_event.concat().len(), 1, "{release}: one head");
        let before = fx.outbox().await.len();
        let mut sub = store.get_subscription(&ordered).await.expect("get");
        match release {
            "unorder" => {
                sub.ordering = Ordering::Unordered;
                store.update_subscription(&sub).await.expect("update");
            }
            _ => {
                store
                    .set_subscription_state(&ordered, SubscriptionState::Disabled, Some("test"))
                    .await
                    .expect("disable");
            }
        }
        assert_eq!(
            fx.outbox().await.len(),
            before + 3,
            "{release}: the three waiting ones are queued"
        );
        assert_eq!(fx.count("ordered_heads").await, 0, "{release}");
        // The head's job and the released ones may all be attempted now.
        assert!(
            may(store, &per_event[0][0]).await,
            "{release}: the old head"
        );
        let promoted = store
            .record_outcomes(&[succeeded(&per_event[0][0])])
            .await
            .expect("record");
        assert!(
            promoted.is_empty(),
            "{release}: nothing is promoted any more"
        );
    }
}

async fn a_manual_retry_of_a_finished_delivery_goes_outside_the_order(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let ordered = subscription(store, &t, Ordering::Ordered).await;
    let first = publish(store, &t, 0, 2, &[&ordered]).await.concat();
    let promoted = store
        .record_outcomes(&[failed(&first[0])])
        .await
        .expect("fail");
    assert_eq!(promoted.len(), 1);
    let second = promoted[0].clone();

    // Retrying the failed first by hand queues it now, beside the head.
    let requeued = store
        .requeue_deliveries(std::slice::from_ref(&first[0].delivery_id))
        .await
        .expect("requeue");
    assert_eq!(requeued.len(), 1);
    assert!(
        may(store, &requeued[0]).await,
        "a manual retry is attempted"
    );
    assert!(may(store, &second).await, "the head stays the head");
    let after = store
        .record_outcomes(&[succeeded(&requeued[0])])
        .await
        .expect("ok");
    assert!(after.is_empty(), "a manual retry promotes nothing");
    assert!(may(store, &second).await);
}

async fn a_batch_keeps_its_order_whatever_its_idempotency_keys(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store).await;
    let ordered = subscription(store, &t, Ordering::Ordered).await;
    // Keyed events are written first, in key order (PostgreSQL); the order is the batch's.
    let mut batch: Vec<NewEvent> = (0..5).map(|n| new_event(&t, n, &[&ordered])).collect();
    batch[1].event.idempotency_key = Some("z".to_string());
    batch[3].event.idempotency_key = Some("a".to_string());
    let mut jobs: Vec<DeliveryJob> = store
        .insert_events(&batch)
        .await
        .expect("insert")
        .into_iter()
        .flat_map(|o| match o {
            InsertOutcome::Created { jobs, .. } => jobs,
            other => panic!("expected Created, got {other:?}"),
        })
        .collect();
    let mut seen = Vec::new();
    while let Some(job) = jobs.pop() {
        seen.push(number(&job));
        jobs.extend(
            store
                .record_outcomes(&[succeeded(&job)])
                .await
                .expect("record"),
        );
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
}

/// A publisher acknowledged one event at a time while a consumer ends each head as soon as
/// it is queued: every delivery comes once, in publish order (PostgreSQL: the head row's
/// lock orders a publish and the end of a head; SQLite: its one writer).
async fn publishes_racing_the_end_of_heads_keep_publish_order(fx: &Fixture) {
    const EVENTS: usize = 60;
    let store = fx.shared();
    let t = tenant(store.as_ref()).await;
    let ordered = subscription(store.as_ref(), &t, Ordering::Ordered).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = {
        let (store, t, ordered) = (store.clone(), t.clone(), ordered.clone());
        tokio::spawn(async move {
            let mut event_ids = Vec::new();
            for n in 0..EVENTS {
                let jobs = publish(store.as_ref(), &t, n, 1, &[&ordered])
                    .await
                    .concat();
                event_ids.push(new_event_id(&store, &t, n).await);
                for j in jobs {
                    tx.send(j).expect("send");
                }
            }
            event_ids
        })
    };
    let mut seen = Vec::new();
    let mut queue: VecDeque<DeliveryJob> = VecDeque::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < EVENTS {
        let job = match queue.pop_front() {
            Some(job) => job,
            None => tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("stuck after {} of {EVENTS}: {seen:?}", seen.len()))
                .expect("a job"),
        };
        assert!(
            may(store.as_ref(), &job).await,
            "a queued head may be attempted"
        );
        seen.push(number(&job));
        queue.extend(
            store
                .record_outcomes(&[succeeded(&job)])
                .await
                .expect("record"),
        );
    }
    let event_ids = publisher.await.expect("publisher");
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "publish order");
    assert!(queue.is_empty() && rx.try_recv().is_err(), "each once");
    let ids = deliveries_of(store.as_ref(), &event_ids, &ordered).await;
    assert_eq!(ids.len(), EVENTS);
    assert_eq!(fx.count("ordered_heads").await, 0);
}

/// The id of the tenant's event numbered `n` (its payload), newest first.
async fn new_event_id(store: &std::sync::Arc<dyn Store>, t: &Id, n: usize) -> Id {
    let filter = hookline_store::EventFilter {
        tenant_id: t.clone(),
        event_type: None,
        since: None,
        until: None,
    };
    let page = store
        .list_events(&filter, &hookline_store::PageRequest::default())
        .await
        .expect("events");
    page.items
        .into_iter()
        .find(|e| e.payload == format!(r#"{{"n":{n}}}"#).into_bytes())
        .expect("published")
        .id
}
