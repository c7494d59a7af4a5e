//! The bench's webhook receiver: a small HTTP/1.1 keep-alive server (hyper) on a local
//! port that answers like a healthy endpoint and counts what it gets.
//!
//! Each subscription posts to `/s/<index>`, so the path says which subscription a request
//! is for. A request to a healthy subscription is answered 200 (or, for `--fail-rate` of
//! them, 500, which Hookline retries), after `--receiver-latency-ms`. A request to a
//! hanging subscription is never answered until the run ends ([`Receiver::release_hangs`]),
//! when it gets 503. For each 2xx answer the `webhook-id` header (the event id) goes to
//! the [`EventTable`], which counts distinct and duplicate deliveries per subscription and
//! measures publish → arrival latency.
//!
//! The hot path allocates nothing of its own: the path and headers are read in place, the
//! body is drained frame by frame (kept only with `--verify`), answers have empty bodies
//! and counters are atomics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hookline_core::signing::{self, SigningKey};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::BenchError;
use crate::events::{Arrival, EventTable, event_key};
use crate::scenario::Layout;

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
pub struct ReceiverConfig {
    pub latency: Duration,
    pub fail_rate: f64,
    pub verify: bool,
}

/// What the receiver knows about one subscription.
#[derive(Debug, Clone)]
pub struct SubInfo {
    /// False for a subscription not created in this run.
    exists: bool,
    bit: u32,
    hanging: bool,
    key: Option<SigningKey>,
}

impl SubInfo {
    /// Subscription `sub` of `layout`; `secret` when signatures are checked.
    pub fn new(layout: &Layout, sub: usize, secret: Option<&str>) -> Result<SubInfo, BenchError> {
        let key = match secret {
            Some(s) => Some(SigningKey::from_secret(s).map_err(|e| {
                BenchError::Server(format!("subscription {sub}: the server's secret: {e}"))
            })?),
            None => None,
        };
        Ok(SubInfo {
            exists: true,
            bit: layout.bit_of_sub(sub),
            hanging: layout.is_hanging(sub),
            key,
        })
    }

    /// A slot for a subscription that does not exist in this run.
    pub fn absent() -> SubInfo {
        SubInfo {
            exists: false,
            bit: 0,
            hanging: false,
            key: None,
        }
    }
}

/// What the receiver counted. Every field only grows.
#[derive(Debug, Default)]
pub struct Counters {
    /// Every request, whatever the answer.
    pub requests: AtomicU64,
    /// Distinct (event, subscription) pairs answered 2xx.
    pub delivered: AtomicU64,
    /// 2xx answers for a pair answered 2xx before.
    pub duplicates: AtomicU64,
    /// 500 answers given on purpose (`--fail-rate`).
    pub injected_failures: AtomicU64,
    /// Requests to hanging subscriptions.
    pub hanging_requests: AtomicU64,
    /// Requests for no known subscription (bad path, or before setup finished).
    pub unexpected: AtomicU64,
    /// Requests without a readable `webhook-id` (answered 400).
    pub bad_webhook_id: AtomicU64,
    /// Requests whose signature did not verify (`--verify`; still answered 2xx).
    pub verify_failures: AtomicU64,
    /// Requests whose body could not be read.
    pub body_errors: AtomicU64,
    /// Latest first-delivery arrival, ns since the run's epoch.
    pub last_delivery_ns: AtomicU64,
}

struct State {
    cfg: ReceiverConfig,
    events: Arc<EventTable>,
    subs: OnceLock<Box<[SubInfo]>>,
    counters: Counters,
    /// Cancelled when hanging requests may end.
    release: CancellationToken,
}

/// A running receiver; clones share it.
#[derive(Clone)]
pub struct Receiver {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Receiver {
    /// Binds `addr` and serves until [`shutdown`](Self::shutdown).
    pub async fn start(
        addr: SocketAddr,
        cfg: ReceiverConfig,
        events: Arc<EventTable>,
    ) -> Result<Receiver, BenchError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| BenchError::io(format!("binding the receiver to {addr}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::io("reading the receiver's address", e))?;
        let state = Arc::new(State {
            cfg,
            events,
            subs: OnceLock::new(),
            counters: Counters::default(),
            release: CancellationToken::new(),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, state.clone(), shutdown.clone()));
        Ok(Receiver {
            state,
            addr,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Installs the subscriptions once setup has created them (index = path number).
    pub fn set_subscriptions(&self, subs: Vec<SubInfo>) {
        let _ = self.state.subs.set(subs.into_boxed_slice());
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    /// Ends every hanging request (answered 503) and every later one at once.
    pub fn release_hangs(&self) {
        self.state.release.cancel();
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.state.release.cancel();
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn answer(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut res = Response::new(Empty::new());
    *res.status_mut() = status;
    res
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Empty<Bytes>> {
    let arrival_ns = state.events.now_ns();
    let c = &state.counters;
    c.requests.fetch_add(1, Ordering::Relaxed);
    let sub = state.subs.get().and_then(|subs| {
        req.uri()
            .path()
            .strip_prefix("/s/")
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|i| subs.get(i))
            .filter(|s| s.exists)
    });
    let Some(sub) = sub else {
        c.unexpected.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::NOT_FOUND);
    };
    if sub.hanging {
        c.hanging_requests.fetch_add(1, Ordering::Relaxed);
        state.release.cancelled().await;
        return answer(StatusCode::SERVICE_UNAVAILABLE);
    }
    let (parts, mut body) = req.into_parts();
    // Read the whole body (so the connection can be reused); keep it only to verify.
    let mut kept: Option<Vec<u8>> = sub.key.as_ref().map(|_| Vec::new());
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let (Some(buf), Some(data)) = (kept.as_mut(), frame.data_ref()) {
                    buf.extend_from_slice(data);
                }
            }
            Err(_) => {
                c.body_errors.fetch_add(1, Ordering::Relaxed);
                return answer(StatusCode::BAD_REQUEST);
            }
        }
    }
    if state.cfg.fail_rate > 0.0 && rand::random::<f64>() < state.cfg.fail_rate {
        c.injected_failures.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let Some((id, key)) = header("webhook-id").and_then(|id| Some((id, event_key(id)?))) else {
        c.bad_webhook_id.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::BAD_REQUEST);
    };
    if let (Some(signing_key), Some(body)) = (sub.key.as_ref(), kept.as_deref()) {
        let ok = header("webhook-timestamp")
            .and_then(|t| t.parse::<i64>().ok())
            .zip(header("webhook-signature"))
            .is_some_and(|(ts, sig)| {
                signing::verify(
                    signing_key,
                    id,
                    ts,
                    body,
                    sig,
                    unix_now(),
                    signing::DEFAULT_TOLERANCE_SECS,
                )
                .is_ok()
            });
        if !ok {
            c.verify_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    if !state.cfg.latency.is_zero() {
        tokio::time::sleep(state.cfg.latency).await;
    }
    match state.events.delivered(key, sub.bit, arrival_ns) {
        Arrival::First => {
            c.delivered.fetch_add(1, Ordering::Relaxed);
            c.last_delivery_ns.fetch_max(arrival_ns, Ordering::Relaxed);
        }
        Arrival::Duplicate => {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    answer(StatusCode::OK)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
