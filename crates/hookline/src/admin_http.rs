//! The admin HTTP port every process opens: `/healthz` (the process is alive),
//! `/readyz` (its database and broker answer), `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use hookline_broker::Broker;
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
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let db = state.store.ping().await;
    let broker = state.broker.ping().await;
    let line = |name: &str, r: Result<(), String>| match r {
        Ok(()) => format!("{name}: ok\n"),
        Err(e) => format!("{name}: {e}\n"),
    };
    let ok = db.is_ok() && broker.is_ok();
    let body = line("database", db.map_err(|e| e.to_string()))
        + &line("broker", broker.map_err(|e| e.to_string()));
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
