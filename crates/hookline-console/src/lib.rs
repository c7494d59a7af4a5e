//! Hookline's web console and tenant portal, served by the `hookline` binary on its own
//! port (`console_addr`). Pages are rendered on the server (maud) from the answers of
//! this process's own gRPC services, called in process with the session's principal
//! (`calls`), so the services — not the console — decide what a key may see and change.
//! A session comes from a pasted API key or from a signed, short-lived portal link
//! (`session`, `portal`); every form carries the session's CSRF token. JavaScript runs
//! only on the live view, which reads WatchDeliveries as server-sent events (`live`).

mod calls;
mod deliveries;
mod layout;
mod live;
mod pages;
pub mod portal;
mod session;
mod subscriptions;
mod view;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hookline_broker::Broker;
use hookline_grpc::Authenticator;

pub use session::Sessions;

use crate::calls::Services;

/// Settings of the console.
#[derive(Clone)]
pub struct ConsoleConfig {
    /// The `frame-ancestors` of the Content-Security-Policy: `'none'` (default) forbids
    /// embedding; the operator lists the origins of their own product to embed the portal.
    pub frame_ancestors: String,
    /// Signs portal links. Replicas that should honour each other's links share it.
    pub portal_secret: Vec<u8>,
    /// Longest lifetime a portal link may be given.
    pub portal_max_ttl: Duration,
    /// How long a session from a pasted key lasts.
    pub session_ttl: Duration,
}

impl ConsoleConfig {
    /// Defaults with `secret` signing portal links.
    pub fn new(portal_secret: Vec<u8>) -> Self {
        Self {
            frame_ancestors: "'none'".into(),
            portal_secret,
            portal_max_ttl: Duration::from_secs(24 * 3600),
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// What every handler reaches.
pub(crate) struct Console {
    pub config: ConsoleConfig,
    pub services: Services,
    pub auth: Authenticator,
    pub sessions: Sessions,
    /// Read for the queue depths shown to admins.
    pub broker: Arc<dyn Broker>,
}

pub(crate) type State = axum::extract::State<Arc<Console>>;

/// The console's routes, all under `/console`.
pub fn router(
    config: ConsoleConfig,
    services: tonic::service::Routes,
    auth: Authenticator,
    broker: Arc<dyn Broker>,
) -> Router {
    let console = Arc::new(Console {
        config,
        services: Services::new(services),
        auth,
        sessions: Sessions::default(),
        broker,
    });
    let frame_ancestors = console.config.frame_ancestors.clone();
    Router::new()
        .route("/console", get(pages::overview))
        .route("/console/", get(pages::overview))
        .route(
            "/console/login",
            get(session::login_page).post(session::login),
        )
        .route("/console/logout", post(session::logout))
        .route("/console/assets/{name}", get(view::asset))
        .route(
            "/console/tenants",
            get(pages::tenants).post(pages::create_tenant),
        )
        .route("/console/tenants/{id}", get(pages::tenant))
        .route(
            "/console/event-types",
            get(pages::event_types).post(pages::create_event_type),
        )
        .route("/console/events", get(pages::events))
        .route("/console/events/{id}", get(pages::event))
        .route("/console/subscriptions", post(subscriptions::create))
        .route(
            "/console/subscriptions/{id}",
            get(subscriptions::show).post(subscriptions::edit),
        )
        .route(
            "/console/subscriptions/{id}/state",
            post(subscriptions::set_state),
        )
        .route(
            "/console/subscriptions/{id}/rotate",
            post(subscriptions::rotate),
        )
        .route(
            "/console/subscriptions/{id}/test",
            post(subscriptions::send_test),
        )
        .route(
            "/console/subscriptions/{id}/replay",
            post(subscriptions::replay),
        )
        .route("/console/deliveries", get(deliveries::list))
        .route("/console/deliveries/{id}", get(deliveries::show))
        .route("/console/deliveries/{id}/retry", post(deliveries::retry))
        .route("/console/live", get(live::page))
        .route("/console/live/events", get(live::stream))
        .route("/console/portal", get(portal::open))
        .route("/console/portal-links", post(portal::create_from_form))
        .route("/console/api/portal-links", post(portal::create_from_api))
        .layer(axum::middleware::from_fn(move |req, next| {
            view::security_headers(frame_ancestors.clone(), req, next)
        }))
        .with_state(console)
}
