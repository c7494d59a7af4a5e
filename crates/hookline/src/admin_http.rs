//! The admin HTTP port every process opens: `/healthz` (the process is alive),
//! `/readyz` (its database and broker answer), `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use hookline_broker::Broker;
use hookline_grpc::tls::{Listener, TlsServer, serve_http};
use hookline_store::port::StoreHealth;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn StoreHealth>,
    pub broker: Arc<dyn Broker>,
    pub metrics: PrometheusHandle,
}

pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsServer>,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let tls = tls.as_ref().map(|t| (t, Listener::Admin));
    serve_http(listener, tls, app, shutdown.cancelled_owned()).await
}

/// How long `/readyz` waits for each dependency. A database that is down makes a pool
/// wait for its acquire timeout (10 s); a probe (Kubernetes' default timeout is 1 s) must
/// get a quick "not ready" instead of no answer.
const READY_CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// Runs one readiness check within [`READY_CHECK_TIMEOUT`].
async fn check<E: std::fmt::Display>(
    probe: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(READY_CHECK_TIMEOUT, probe).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {READY_CHECK_TIMEOUT:?}")),
    }
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let (db, broker) = tokio::join!(check(state.store.ping()), check(state.broker.ping()));
    let line = |name: &str, r: Result<(), String>| match r {
        Ok(()) => format!("{name}: ok\n"),
        Err(e) => format!("{name}: {e}\n"),
    };
    let ok = db.is_ok() && broker.is_ok();
    let body = line("database", db) + &line("broker", broker);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn metrics(State(state): State<AdminState>) -> String {
    state.metrics.render()
}
