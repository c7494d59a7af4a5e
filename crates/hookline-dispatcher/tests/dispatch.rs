//! The dispatcher end to end: real PostgreSQL (`PgStore`), real RabbitMQ (`RabbitBroker`)
//! and a real local HTTP receiver that checks every request with the `standardwebhooks`
//! crate. Each test has its own database and queue prefix, so tests run in parallel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use hookline_broker::{
    Broker, ChangeNotice, OutgoingMessage, QueueName, RabbitBroker, RabbitConfig,
};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{
    Attempt, Delivery, DeliveryStatus, ErrorClass, Event, RegistryChange, Subscription,
    SubscriptionSecret, SubscriptionState,
};
use hookline_core::signing::generate_secret;
use hookline_core::{Id, IdKind};
use hookline_dispatcher::{Dispatcher, DispatcherConfig, DispatcherError};
use hookline_store::PgStore;
use hookline_store::port::{
    DeliveryStore, EventStore, InsertOutcome, NewEvent, NewSubscription, PageRequest, RegistryStore,
};
use hookline_testkit::TestDb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest any condition is waited for.
const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------

/// How the receiver answers.
#[derive(Debug, Clone)]
enum Behaviour {
    /// This status, with this body.
    Status(u16, &'static str),
    /// This status with a `Retry-After` header.
    RetryAfter(u16, &'static str),
    /// Never answers.
    Hang,
}

/// One request as received.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Whether `standardwebhooks` accepts the request with this secret.
    fn verifies_with(&self, secret: &str) -> bool {
        standardwebhooks::Webhook::new(secret)
            .expect("a valid secret")
            .verify(&self.body, &self.headers)
            .is_ok()
    }
}

struct ReceiverState {
    behaviour: Behaviour,
    received: Mutex<Vec<Received>>,
}

struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    server: JoinHandle<()>,
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        let state = Arc::new(ReceiverState {
            behaviour,
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(answer).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
            server,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Waits until at least `n` requests have arrived and returns them all.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually(&format!("{n} requests at the receiver"), || async {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.received.lock().expect("lock").push(Received {
        headers,
        body: body.to_vec(),
    });
    let code = |c: u16| StatusCode::from_u16(c).expect("a status code");
    match &state.behaviour {
        Behaviour::Status(c, body) => (code(*c), *body).into_response(),
        Behaviour::RetryAfter(c, after) => {
            (code(*c), [(header::RETRY_AFTER, *after)], "slow down").into_response()
        }
        Behaviour::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
    }
}

/// A URL on which nothing listens.
async fn refusing_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}/hook")
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// Polls `check` until it yields a value, failing the test after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let polled = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    match polled {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

struct Harness {
    db: TestDb,
    store: Arc<PgStore>,
    broker: Arc<RabbitBroker>,
    shutdown: CancellationToken,
    run: JoinHandle<Result<(), DispatcherError>>,
    tenant: Id,
    user_agent: String,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(DispatcherConfig::default()).await
    }

    async fn start_with(cfg: DispatcherConfig) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let db = TestDb::create().await;
        let store = Arc::new(PgStore::connect(db.url(), 4).await.expect("connect"));
        store.migrate().await.expect("migrate");
        let broker = Arc::new(
            RabbitBroker::connect(RabbitConfig::new(
                hookline_testkit::amqp_url(),
                hookline_testkit::unique_name("test_disp_"),
            ))
            .await
            .expect("connect to RabbitMQ"),
        );
        let tenant = store
            .create_tenant(&Id::new(IdKind::Tenant), "acme", &BTreeMap::new())
            .await
            .expect("create tenant")
            .id;
        let user_agent = cfg.user_agent.clone();
        let dispatcher = Dispatcher::new(cfg, store.clone(), store.clone(), broker.clone())
            .expect("a dispatcher");
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(dispatcher.run(shutdown.clone()));
        Harness {
            db,
            store,
            broker,
            shutdown,
            run,
            tenant,
            user_agent,
        }
    }

    /// A subscription to `url` with this retry schedule; returns it and its secret.
    async fn subscribe(
        &self,
        url: &str,
        schedule: Option<Vec<Duration>>,
    ) -> (Subscription, String) {
        let id = Id::new(IdKind::Subscription);
        let secret = generate_secret();
        let sub = self
            .store
            .create_subscription(&NewSubscription {
                id: id.clone(),
                tenant_id: self.tenant.clone(),
                url: url.to_owned(),
                description: "test".into(),
                event_types: vec![],
                channels: vec![],
                headers: BTreeMap::from([("x-team".to_owned(), "billing".to_owned())]),
                rate_limit_per_second: None,
                max_in_flight: None,
                retry_schedule: schedule,
                state: SubscriptionState::Enabled,
                metadata: BTreeMap::new(),
                secret: SubscriptionSecret {
                    id: Id::new(IdKind::Secret),
                    subscription_id: id,
                    secret: secret.clone(),
                    created_at: Utc::now(),
                    expires_at: None,
                },
            })
            .await
            .expect("create subscription");
        (sub, secret)
    }

    /// Stores an event for the subscription and queues its delivery, as ingest does.
    async fn publish(&self, sub: &Id, payload: &[u8]) -> DeliveryJob {
        let outcome = self
            .store
            .insert_events(&[NewEvent {
                event: Event {
                    id: Id::new(IdKind::Event),
                    tenant_id: self.tenant.clone(),
                    event_type: "invoice.paid".into(),
                    payload: payload.to_vec(),
                    channels: vec![],
                    idempotency_key: None,
                    created_at: Utc::now(),
                },
                subscription_ids: vec![sub.clone()],
            }])
            .await
            .expect("insert event");
        let job = match outcome.into_iter().next() {
            Some(InsertOutcome::Created { mut jobs, .. }) if jobs.len() == 1 => jobs.remove(0),
            other => panic!("expected one created delivery, got {other:?}"),
        };
        self.queue(QueueName::Deliveries, &job).await;
        job
    }

    async fn queue(&self, queue: QueueName, job: &DeliveryJob) {
        self.broker
            .publish(
                queue,
                vec![OutgoingMessage {
                    body: job.payload.clone(),
                    headers: job.headers(),
                }],
            )
            .await
            .expect("publish");
    }

    /// Waits until the delivery reaches `status`.
    async fn wait_status(&self, id: &Id, status: DeliveryStatus) -> Delivery {
        eventually(
            &format!("delivery {id} to be {}", status.as_str()),
            || async {
                let d = self.store.get_delivery(id).await.expect("get delivery");
                (d.status == status).then_some(d)
            },
        )
        .await
    }

    async fn attempts(&self, id: &Id) -> Vec<Attempt> {
        self.store
            .list_attempts(
                id,
                &PageRequest {
                    after: None,
                    limit: 100,
                },
            )
            .await
            .expect("list attempts")
            .items
    }

    /// Stops the dispatcher (which must end cleanly) and removes everything the test made.
    async fn finish(self) {
        self.shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(30), self.run)
            .await
            .expect("the dispatcher stops within its grace period")
            .expect("the dispatcher task does not panic");
        assert!(ended.is_ok(), "the dispatcher ended with {ended:?}");
        self.broker
            .delete_topology()
            .await
            .expect("delete topology");
        self.broker.close().await;
        self.store.close().await;
        self.db.drop_db().await;
    }
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn delivers_the_exact_bytes_signed_and_records_success() {
    let h = Harness::start().await;
    let receiver = Receiver::start(Behaviour::Status(200, "thanks")).await;
    let (sub, secret) = h.subscribe(&receiver.url, None).await;
    // Odd spacing, key order and a non-ASCII character: re-serialising would change them.
    let payload = r#"{"b": 1,  "a":[1, 2.50],"u":"caf\u00e9 é"}"#.as_bytes();
    let job = h.publish(&sub.id, payload).await;

    let got = receiver.wait_for(1).await;
    let req = &got[0];
    assert_eq!(req.body, payload);
    assert!(
        req.verifies_with(&secret),
        "standardwebhooks rejects {req:?}"
    );
    assert_eq!(req.header("webhook-id"), job.event_id.to_string());
    let ts: i64 = req.header("webhook-timestamp").parse().expect("a number");
    assert!((Utc::now().timestamp() - ts).abs() < 60);
    assert_eq!(req.header("webhook-signature").matches("v1,").count(), 1);
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(req.header("user-agent"), h.user_agent);
    assert_eq!(req.header("x-team"), "billing");

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
        .await;
    assert_eq!(d.attempt_count, 1);
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status_code, Some(200));
    assert_eq!(attempts[0].error_class, None);
    assert_eq!(attempts[0].response_excerpt, b"thanks");
    h.finish().await;
}

#[tokio::test]
async fn a_server_error_is_retried_per_schedule_until_the_schedule_is_spent() {
    let h = Harness::start().await;
    // Retry-After is honoured on 429 and 503 only: this one must be ignored.
    let receiver = Receiver::start(Behaviour::RetryAfter(500, "30")).await;
    let (sub, _) = h
        .subscribe(&receiver.url, Some(vec![Duration::from_millis(100)]))
        .await;
    let job = h.publish(&sub.id, br#"{"n":1}"#).await;

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    let first = &attempts[0];
    assert_eq!(first.status_code, Some(500));
    assert_eq!(first.error_class, Some(ErrorClass::Status));
    assert_eq!(first.response_excerpt, b"slow down");
    let next = d.next_attempt_at.expect("a next attempt time");
    // 100 ms ± 20% after the attempt, not 30 s.
    assert!(
        next >= first.started_at + chrono::Duration::milliseconds(80),
        "{next} vs {}",
        first.started_at
    );
    assert!(
        next < first.started_at + chrono::Duration::seconds(10),
        "{next} vs {}",
        first.started_at
    );

    // Act as the retry service: take the due retry and queue it on `retries`.
    let retry = eventually("the retry to come due", || async {
        let jobs = h
            .store
            .promote_due_retries(Utc::now(), 10)
            .await
            .expect("promote due retries");
        jobs.into_iter().next()
    })
    .await;
    assert_eq!(retry.delivery_id, job.delivery_id);
    assert_eq!(retry.attempt_number, 2);
    h.queue(QueueName::Retries, &retry).await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Failed)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].status_code, Some(500));
    let got = receiver.wait_for(2).await;
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    h.finish().await;
}

#[tokio::test]
async fn a_hanging_receiver_times_out() {
    let h = Harness::start_with(DispatcherConfig {
        request_timeout: Duration::from_millis(500),
        ..DispatcherConfig::default()
    })
    .await;
    let receiver = Receiver::start(Behaviour::Hang).await;
    let (sub, _) = h.subscribe(&receiver.url, None).await;
    let job = h.publish(&sub.id, b"{}").await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].error_class,
        Some(ErrorClass::Timeout),
        "{:?}",
        attempts[0]
    );
    assert_eq!(attempts[0].status_code, None);
    assert!(attempts[0].duration_ms >= 400, "{:?}", attempts[0]);
    h.finish().await;
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let h = Harness::start().await;
    let (sub, _) = h.subscribe(&refusing_url().await, None).await;
    let job = h.publish(&sub.id, b"{}").await;

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    assert!(d.next_attempt_at.is_some());
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].error_class,
        Some(ErrorClass::Connect),
        "{:?}",
        attempts[0]
    );
    assert!(attempts[0].error_message.is_some());
    h.finish().await;
}

#[tokio::test]
async fn gone_disables_the_subscription_and_later_deliveries_fail_without_a_request() {
    let h = Harness::start().await;
    let mut changes = h.broker.changes().await.expect("follow changes");
    let receiver = Receiver::start(Behaviour::Status(410, "gone")).await;
    let (sub, _) = h.subscribe(&receiver.url, None).await;
    let job = h.publish(&sub.id, b"{}").await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Failed)
        .await;
    let stored = h
        .store
        .get_subscription(&sub.id)
        .await
        .expect("subscription");
    assert_eq!(stored.state, SubscriptionState::Disabled);
    assert_eq!(
        stored.disabled_reason.as_deref(),
        Some("endpoint answered 410 Gone")
    );
    let expected = RegistryChange::Subscription {
        tenant_id: sub.tenant_id.clone(),
        subscription_id: sub.id.clone(),
    };
    let announced = tokio::time::timeout(DEADLINE, async {
        while let Some(notice) = changes.next().await {
            if let ChangeNotice::Change(body) = notice
                && serde_json::from_slice::<RegistryChange>(&body).ok() == Some(expected.clone())
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(announced, Ok(true), "the disabling is announced");

    let second = h.publish(&sub.id, b"{}").await;
    let d = h
        .wait_status(&second.delivery_id, DeliveryStatus::Failed)
        .await;
    assert_eq!(d.last_error.as_deref(), Some("subscription is disabled"));
    assert!(h.attempts(&second.delivery_id).await.is_empty());
    assert_eq!(receiver.received().len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let h = Harness::start().await;
    let receiver = Receiver::start(Behaviour::RetryAfter(429, "3")).await;
    let (sub, _) = h
        .subscribe(&receiver.url, Some(vec![Duration::from_millis(100)]))
        .await;
    let job = h.publish(&sub.id, b"{}").await;

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts[0].status_code, Some(429));
    let next = d.next_attempt_at.expect("a next attempt time");
    assert!(
        next >= attempts[0].started_at + chrono::Duration::seconds(3),
        "next attempt {next} is sooner than Retry-After allows (attempt at {})",
        attempts[0].started_at
    );
    h.finish().await;
}

#[tokio::test]
async fn every_live_secret_signs_until_it_expires() {
    let h = Harness::start().await;
    let receiver = Receiver::start(Behaviour::Status(204, "")).await;
    let (sub, old) = h.subscribe(&receiver.url, None).await;
    let new = generate_secret();
    let old_expires_at = Utc::now() + chrono::Duration::seconds(3);
    h.store
        .rotate_secret(
            &SubscriptionSecret {
                id: Id::new(IdKind::Secret),
                subscription_id: sub.id.clone(),
                secret: new.clone(),
                created_at: Utc::now(),
                expires_at: None,
            },
            old_expires_at,
        )
        .await
        .expect("rotate");

    let first = h.publish(&sub.id, br#"{"rotation":1}"#).await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].header("webhook-signature").matches("v1,").count(), 2);
    assert!(got[0].verifies_with(&old), "the old secret verifies");
    assert!(got[0].verifies_with(&new), "the new secret verifies");
    h.wait_status(&first.delivery_id, DeliveryStatus::Succeeded)
        .await;

    // The cached subscription still holds the old secret; past its expiry it must not sign.
    let wait = (old_expires_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let second = h.publish(&sub.id, br#"{"rotation":2}"#).await;
    let got = receiver.wait_for(2).await;
    assert_eq!(got[1].header("webhook-signature").matches("v1,").count(), 1);
    assert!(got[1].verifies_with(&new));
    assert!(!got[1].verifies_with(&old));
    h.wait_status(&second.delivery_id, DeliveryStatus::Succeeded)
        .await;
    h.finish().await;
}

#[tokio::test]
async fn an_announced_change_refreshes_the_cached_subscription() {
    let h = Harness::start().await;
    let before = Receiver::start(Behaviour::Status(200, "")).await;
    let after = Receiver::start(Behaviour::Status(200, "")).await;
    let (sub, _) = h.subscribe(&before.url, None).await;
    let job = h.publish(&sub.id, b"{}").await;
    h.wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
        .await;

    let mut moved = sub.clone();
    moved.url = after.url.clone();
    h.store.update_subscription(&moved).await.expect("update");
    let change = RegistryChange::Subscription {
        tenant_id: sub.tenant_id.clone(),
        subscription_id: sub.id.clone(),
    };
    h.broker
        .announce(serde_json::to_vec(&change).expect("json"))
        .await
        .expect("announce");

    // The announcement reaches the dispatcher asynchronously: deliver until one lands at
    // the new URL (well before the cache's own expiry).
    eventually("a delivery at the new URL", || async {
        let job = h.publish(&sub.id, b"{}").await;
        h.wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
            .await;
        (!after.received().is_empty()).then_some(())
    })
    .await;
    h.finish().await;
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered() {
    let h = Harness::start().await;
    h.broker
        .publish(
            QueueName::Deliveries,
            vec![OutgoingMessage::new(b"not a job".to_vec())],
        )
        .await
        .expect("publish");
    eventually("the message in the dead-letter queue", || async {
        let depth = h.broker.dead_letter_depth().await.expect("depth");
        (depth >= 1).then_some(())
    })
    .await;
    h.finish().await;
}
