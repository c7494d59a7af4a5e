//! What the dispatcher's integration tests share: a real local HTTP receiver that records
//! (and can hold) every request, and a harness with its own PostgreSQL database
//! (`PgStore`), its own RabbitMQ queue prefix (`RabbitBroker`) and a running dispatcher.
//! Each test has its own database and queue prefix, so tests run in parallel.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use hookline_broker::{Broker, OutgoingMessage, QueueName, RabbitBroker, RabbitConfig};
use hookline_core::job::DeliveryJob;
use hookline_core::model::{
    Attempt, Delivery, DeliveryStatus, Event, Subscription, SubscriptionSecret, SubscriptionState,
};
use hookline_core::signing::generate_secret;
use hookline_core::{Id, IdKind};
use hookline_dispatcher::{Dispatcher, DispatcherConfig, DispatcherError};
use hookline_egress::{Egress, EgressPolicy, Lookup, SystemLookup, parse_range};
use hookline_store::PgStore;
use hookline_store::port::{
    DeliveryStore, EventStore, InsertOutcome, NewEvent, NewSubscription, PageRequest, RegistryStore,
};
use hookline_testkit::TestDb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest any condition is waited for.
pub const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------

/// How the receiver answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// This status, with this body.
    Status(u16, &'static str),
    /// This status with a `Retry-After` header.
    RetryAfter(u16, &'static str),
    /// Answers nothing until [`Receiver::release`], then 200.
    Hang,
    /// 200 after this long.
    Slow(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Whether `standardwebhooks` accepts the request with this secret.
    pub fn verifies_with(&self, secret: &str) -> bool {
        standardwebhooks::Webhook::new(secret)
            .expect("a valid secret")
            .verify(&self.body, &self.headers)
            .is_ok()
    }
}

struct ReceiverState {
    behaviour: Behaviour,
    received: Mutex<Vec<Received>>,
    /// Requests open now (received, not yet answered or abandoned by the client).
    open: AtomicUsize,
    /// The most requests ever open at once.
    max_open: AtomicUsize,
    release: CancellationToken,
}

pub struct Receiver {
    pub url: String,
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    server: JoinHandle<()>,
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Receiver {
        Self::start_at("127.0.0.1:0".parse().expect("an address"), behaviour).await
    }

    /// A receiver on `addr` (say, the port of an endpoint that refused connections until
    /// now).
    pub async fn start_at(addr: SocketAddr, behaviour: Behaviour) -> Receiver {
        let state = Arc::new(ReceiverState {
            behaviour,
            received: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            release: CancellationToken::new(),
        });
        let app = Router::new().fallback(answer).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            addr,
            state,
            server,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Requests open at this moment.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// The most requests that were ever open at once.
    pub fn max_open(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    /// Lets every held request (and every later one) of a `Hang` receiver answer 200.
    pub fn release(&self) {
        self.state.release.cancel();
    }

    /// Waits until at least `n` requests have arrived and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually(&format!("{n} requests at the receiver"), || async {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.state.release.cancel();
        self.server.abort();
    }
}

/// Counts a request as open while alive; the client abandoning the request drops the
/// handler, and with it this.
struct OpenRequest(Arc<ReceiverState>);

impl OpenRequest {
    fn enter(state: &Arc<ReceiverState>) -> Self {
        let now = state.open.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_open.fetch_max(now, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _open = OpenRequest::enter(&state);
    state.received.lock().expect("lock").push(Received {
        headers,
        body: body.to_vec(),
        at: Instant::now(),
    });
    let code = |c: u16| StatusCode::from_u16(c).expect("a status code");
    match &state.behaviour {
        Behaviour::Status(c, body) => (code(*c), *body).into_response(),
        Behaviour::RetryAfter(c, after) => {
            (code(*c), [(header::RETRY_AFTER, *after)], "slow down").into_response()
        }
        Behaviour::Hang => {
            state.release.cancelled().await;
            StatusCode::OK.into_response()
        }
        Behaviour::Slow(after) => {
            tokio::time::sleep(*after).await;
            StatusCode::OK.into_response()
        }
    }
}

/// An address on which nothing listens, and its URL.
pub async fn refusing_endpoint() -> (SocketAddr, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    (addr, format!("http://{addr}/hook"))
}

/// A URL on which nothing listens.
pub async fn refusing_url() -> String {
    refusing_endpoint().await.1
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// Polls `check` until it yields a value, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// Polls `check` until it yields a value, failing the test after `deadline`.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let polled = tokio::time::timeout(deadline, async {
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
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// What a test subscription asks for beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct SubOptions {
    pub schedule: Option<Vec<Duration>>,
    pub max_in_flight: Option<u32>,
    pub rate_limit_per_second: Option<u32>,
}

pub struct Harness {
    pub db: TestDb,
    pub store: Arc<PgStore>,
    pub broker: Arc<RabbitBroker>,
    pub shutdown: CancellationToken,
    pub run: JoinHandle<Result<(), DispatcherError>>,
    pub tenant: Id,
    pub user_agent: String,
    promoter: Option<Promoter>,
}

/// The tests' dispatcher settings: the defaults, with the tests' receivers on 127.0.0.1
/// allowed by the egress policy (which refuses loopback by default).
pub fn test_config() -> DispatcherConfig {
    DispatcherConfig {
        egress: loopback_egress(Arc::new(SystemLookup)),
        ..DispatcherConfig::default()
    }
}

/// The default egress policy with 127.0.0.1 allowed, resolving names with `lookup`.
pub fn loopback_egress(lookup: Arc<dyn Lookup>) -> Egress {
    let allow = vec![parse_range("127.0.0.1").expect("a range")];
    Egress::new(EgressPolicy::new(allow, vec![]), lookup)
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(cfg: DispatcherConfig) -> Harness {
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
            promoter: None,
        }
    }

    /// A subscription to `url` with this retry schedule; returns it and its secret.
    pub async fn subscribe(
        &self,
        url: &str,
        schedule: Option<Vec<Duration>>,
    ) -> (Subscription, String) {
        self.subscribe_with(
            url,
            SubOptions {
                schedule,
                ..SubOptions::default()
            },
        )
        .await
    }

    /// A subscription to `url` with these limits; returns it and its secret.
    pub async fn subscribe_with(&self, url: &str, options: SubOptions) -> (Subscription, String) {
        let id = Id::new(IdKind::Subscription);
        let secret = generate_secret();
        let sub = self
            .store
            .create_subscription(&NewSubscription {
                ordering: Default::default(),
                id: id.clone(),
                tenant_id: self.tenant.clone(),
                url: url.to_owned(),
                description: "test".into(),
                event_types: vec![],
                channels: vec![],
                headers: BTreeMap::from([("x-team".to_owned(), "billing".to_owned())]),
                rate_limit_per_second: options.rate_limit_per_second,
                max_in_flight: options.max_in_flight,
                retry_schedule: options.schedule,
                state: SubscriptionState::Enabled,
                metadata: BTreeMap::new(),
                client_identity: None,
                payload_format: Default::default(),
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
    pub async fn publish(&self, sub: &Id, payload: &[u8]) -> DeliveryJob {
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
                traceparent: None,
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

    /// `n` deliveries to the subscription, each with its number as payload.
    pub async fn publish_many(&self, sub: &Id, n: usize) -> Vec<DeliveryJob> {
        let mut jobs = Vec::with_capacity(n);
        for i in 0..n {
            jobs.push(self.publish(sub, format!("{{\"n\":{i}}}").as_bytes()).await);
        }
        jobs
    }

    /// `n` deliveries to the subscription stored in one transaction and queued in one
    /// publish, so they reach the dispatcher as one burst.
    pub async fn publish_burst(&self, sub: &Id, n: usize) -> Vec<DeliveryJob> {
        self.publish_burst_across(std::slice::from_ref(sub), n)
            .await
    }

    /// `n` deliveries, to the subscriptions in turn, as one burst.
    pub async fn publish_burst_across(&self, subs: &[Id], n: usize) -> Vec<DeliveryJob> {
        let events: Vec<NewEvent> = (0..n)
            .map(|i| NewEvent {
                event: Event {
                    id: Id::new(IdKind::Event),
                    tenant_id: self.tenant.clone(),
                    event_type: "invoice.paid".into(),
                    payload: format!("{{\"n\":{i}}}").into_bytes(),
                    channels: vec![],
                    idempotency_key: None,
                    created_at: Utc::now(),
                },
                subscription_ids: vec![subs[i % subs.len()].clone()],
                traceparent: None,
            })
            .collect();
        let outcomes = self
            .store
            .insert_events(&events)
            .await
            .expect("insert events");
        let jobs: Vec<DeliveryJob> = outcomes
            .into_iter()
            .flat_map(|o| match o {
                InsertOutcome::Created { jobs, .. } => jobs,
                other => panic!("expected created deliveries, got {other:?}"),
            })
            .collect();
        let messages = jobs
            .iter()
            .map(|job| OutgoingMessage {
                body: job.payload.clone(),
                headers: job.headers(),
            })
            .collect();
        self.broker
            .publish(QueueName::Deliveries, messages)
            .await
            .expect("publish");
        jobs
    }

    pub async fn queue(&self, queue: QueueName, job: &DeliveryJob) {
        queue_job(self.broker.as_ref(), queue, job).await;
    }

    pub async fn delivery(&self, id: &Id) -> Delivery {
        self.store.get_delivery(id).await.expect("get delivery")
    }

    /// Waits until the delivery reaches `status`.
    pub async fn wait_status(&self, id: &Id, status: DeliveryStatus) -> Delivery {
        eventually(
            &format!("delivery {id} to be {}", status.as_str()),
            || async {
                let d = self.delivery(id).await;
                (d.status == status).then_some(d)
            },
        )
        .await
    }

    /// Waits until every delivery reaches `status`.
    pub async fn wait_all(&self, jobs: &[DeliveryJob], status: DeliveryStatus) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.wait_status(&job.delivery_id, status).await);
        }
        out
    }

    pub async fn attempts(&self, id: &Id) -> Vec<Attempt> {
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

    /// Attempts of all these deliveries together.
    pub async fn total_attempts(&self, jobs: &[DeliveryJob]) -> usize {
        let mut n = 0;
        for job in jobs {
            n += self.attempts(&job.delivery_id).await.len();
        }
        n
    }

    /// Plays the retry service: queues due retries on `retries` every 50 ms until the
    /// harness finishes. Returns how many it has queued so far, shared.
    pub fn start_promoter(&mut self) -> Arc<AtomicUsize> {
        let promoter = Promoter::start(self.store.clone(), self.broker.clone());
        let queued = promoter.queued.clone();
        self.promoter = Some(promoter);
        queued
    }

    /// Stops the dispatcher (which must end cleanly) and removes everything the test made.
    pub async fn finish(mut self) {
        if let Some(mut p) = self.promoter.take() {
            p.task.abort();
            let _ = (&mut p.task).await;
        }
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

async fn queue_job(broker: &RabbitBroker, queue: QueueName, job: &DeliveryJob) {
    broker
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

/// The retry service's part, reduced to what the tests need.
struct Promoter {
    task: JoinHandle<()>,
    queued: Arc<AtomicUsize>,
}

impl Promoter {
    fn start(store: Arc<PgStore>, broker: Arc<RabbitBroker>) -> Self {
        let queued = Arc::new(AtomicUsize::new(0));
        let count = queued.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(jobs) = store.promote_due_retries(Utc::now(), 100).await {
                    for job in &jobs {
                        queue_job(broker.as_ref(), QueueName::Retries, job).await;
                    }
                    let ids: Vec<Id> = jobs.iter().map(|j| j.delivery_id.clone()).collect();
                    let _ = store.confirm_published(&ids).await;
                    count.fetch_add(jobs.len(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { task, queued }
    }
}

impl Drop for Promoter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
