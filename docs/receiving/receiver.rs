// A Hookline receiver in Rust: an axum route that verifies each request with the
// `standardwebhooks` crate, skips ids it has already handled, and answers 204.
// Cargo.toml: axum, serde_json, standardwebhooks.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Router, routing::post};
use standardwebhooks::Webhook;

type Handler = dyn Fn(&str, serde_json::Value) + Send + Sync;

#[derive(Clone)]
struct Receiver {
    webhook: Arc<Webhook>,
    seen: Arc<Mutex<HashSet<String>>>, // webhook-id values handled; keep them in your database
    handle: Arc<Handler>,              // your code: (event type, event)
}

/// `POST /webhook`, verified with `secret` (the subscription's `whsec_...`).
pub fn router(
    secret: &str,
    handle: impl Fn(&str, serde_json::Value) + Send + Sync + 'static,
) -> Result<Router, standardwebhooks::WebhookError> {
    let receiver = Receiver {
        webhook: Arc::new(Webhook::new(secret)?),
        seen: Arc::default(),
        handle: Arc::new(handle),
    };
    Ok(Router::new()
        .route("/webhook", post(receive))
        .with_state(receiver))
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    // Checks the signature over the exact body bytes and the timestamp (5 minutes).
    if r.webhook.verify(&body, &headers).is_err() {
        return StatusCode::BAD_REQUEST;
    }
    let Ok(event) = serde_json::from_slice(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if r.seen
        .lock()
        .unwrap()
        .insert(header("webhook-id").to_owned())
    {
        (r.handle)(header("webhook-event-type"), event);
    } // else a retry of a handled message: answer 2xx, do nothing
    StatusCode::NO_CONTENT
}
