//! A real local HTTP receiver for end-to-end tests: each endpoint has a behaviour
//! (answer 200, fail some times, hang, 410, 429 with Retry-After) and checks every
//! request it gets with the `standardwebhooks` crate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Notify;

/// How an endpoint answers.
#[derive(Debug, Clone)]
pub enum Behavior {
    Ok,
    /// Answers `status` this many times, then 200.
    FailTimes(u32, u16),
    /// Always answers this status.
    Always(u16),
    /// Hangs this many times (longer than any test timeout), then 200.
    HangTimes(u32),
    /// 429 with `Retry-After: secs` this many times, then 200.
    TooManyTimes(u32, u64),
    /// Answers `status` to the first request of every `n`-th new `webhook-id`, 200
    /// otherwise.
    FailFirstOfEvery(u32, u16),
    /// Answers 200 after this many milliseconds.
    Slow(u64),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub endpoint: String,
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Whether the `standardwebhooks` crate accepted the signature.
    pub verified: bool,
    /// The status the endpoint answers (for a hanging request, the one it would send).
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Default)]
struct Endpoint {
    behavior: Option<Behavior>,
    secret: Option<String>,
    calls: u32,
    seen_events: std::collections::HashSet<String>,
}

#[derive(Default)]
struct Inner {
    endpoints: Mutex<HashMap<String, Endpoint>>,
    received: Mutex<Vec<Received>>,
    notify: Notify,
}

#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
    base: String,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/hook/{name}", post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            inner,
            base: format!("http://{addr}"),
        }
    }

    /// The URL of endpoint `name`, which answers as `behavior`.
    pub fn endpoint(&self, name: &str, behavior: Behavior) -> String {
        self.set_behavior(name, behavior);
        format!("{}/hook/{name}", self.base)
    }

    pub fn set_behavior(&self, name: &str, behavior: Behavior) {
        let mut eps = self.inner.endpoints.lock().unwrap();
        let ep = eps.entry(name.to_string()).or_default();
        ep.behavior = Some(behavior);
        ep.calls = 0;
    }

    /// The secret requests to `name` must be signed with.
    pub fn set_secret(&self, name: &str, secret: &str) {
        let mut eps = self.inner.endpoints.lock().unwrap();
        eps.entry(name.to_string()).or_default().secret = Some(secret.to_string());
    }

    pub fn received(&self, name: &str) -> Vec<Received> {
        self.inner
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.endpoint == name)
            .cloned()
            .collect()
    }

    /// Waits until `cond` holds for the requests to `name`, or panics after `within`.
    pub async fn wait_for(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        cond: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.inner.notify.notified();
            let got = self.received(name);
            if cond(&got) {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out after {within:?} waiting for {what} at {name}; got {} requests",
                    got.len()
                );
            }
        }
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (behavior, secret, call, first_of_event) = {
        let mut eps = inner.endpoints.lock().unwrap();
        let ep = eps.entry(name.clone()).or_default();
        ep.calls += 1;
        let first = ep.seen_events.insert(webhook_id)
            && u32::try_from(ep.seen_events.len()).unwrap_or(0) % fail_every(&ep.behavior) == 0;
        (
            ep.behavior.clone().unwrap_or(Behavior::Ok),
            ep.secret.clone(),
            ep.calls,
            first,
        )
    };
    let verified = secret.is_some_and(|s| {
        standardwebhooks::Webhook::new(&s)
            .and_then(|wh| wh.verify(&body, &headers))
            .is_ok()
    });
    let answer = Answer::of(behavior, call, first_of_event);
    inner.received.lock().unwrap().push(Received {
        endpoint: name,
        at: Instant::now(),
        headers,
        body: body.to_vec(),
        verified,
        status: answer.status,
    });
    inner.notify.notify_waiters();
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    match (answer.status, answer.retry_after) {
        (200, _) => (StatusCode::OK, "ok").into_response(),
        (status, Some(secs)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        (status, None) => status_response(status),
    }
}

/// How an endpoint answers one request: decided (and recorded) before any delay.
struct Answer {
    status: u16,
    delay: Duration,
    retry_after: Option<u64>,
}

impl Answer {
    fn of(behavior: Behavior, call: u32, first_of_event: bool) -> Answer {
        let plain = |status| Answer {
            status,
            delay: Duration::ZERO,
            retry_after: None,
        };
        match behavior {
            Behavior::Ok => plain(200),
            Behavior::FailTimes(n, status) if call <= n => plain(status),
            Behavior::FailTimes(..) => plain(200),
            Behavior::Always(status) => plain(status),
            Behavior::HangTimes(n) if call <= n => Answer {
                delay: Duration::from_secs(3600),
                ..plain(200)
            },
            Behavior::HangTimes(_) => plain(200),
            Behavior::TooManyTimes(n, secs) if call <= n => Answer {
                retry_after: Some(secs),
                ..plain(429)
            },
            Behavior::TooManyTimes(..) => plain(200),
            Behavior::FailFirstOfEvery(_, status) if first_of_event => plain(status),
            Behavior::FailFirstOfEvery(..) => plain(200),
            Behavior::Slow(ms) => Answer {
                delay: Duration::from_millis(ms),
                ..plain(200)
            },
        }
    }
}

fn fail_every(behavior: &Option<Behavior>) -> u32 {
    match behavior {
        Some(Behavior::FailFirstOfEvery(n, _)) => (*n).max(1),
        _ => 1,
    }
}

fn status_response(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, format!("receiver says {status}")).into_response()
}
