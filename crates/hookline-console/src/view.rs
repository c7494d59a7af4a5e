//! How pages look: the shared layout and navigation, the embedded assets, the security
//! headers of every answer (CSP with the configured `frame-ancestors`), errors as pages,
//! and the display of timestamps, statuses and error classes.

use axum::extract::{Path, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hookline_proto::v1 as pb;
use http::{HeaderValue, StatusCode, header};
use maud::{DOCTYPE, Markup, html};

const CSS: &str = include_str!("../assets/console.css");
const LIVE_JS: &str = include_str!("../assets/live.js");

/// `GET /console/assets/{name}`: the embedded stylesheet and script.
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "live.js" => (LIVE_JS, "text/javascript; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Adds the headers every console answer carries.
pub(crate) async fn security_headers(
    frame_ancestors: String,
    req: Request,
    next: Next,
) -> Response {
    let mut res = next.run(req).await;
    let csp = format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors {frame_ancestors}"
    );
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Portal links carry their token in the URL: never send it on.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

/// A page without navigation (sign-in, errors).
pub(crate) fn bare(title: &str, body: Markup) -> Markup {
    document(title, html! { main { (body) } })
}

pub(crate) fn document(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Hookline" }
                link rel="stylesheet" href="/console/assets/console.css";
            }
            body { (body) }
        }
    }
}

/// A timestamp as `2026-01-02 03:04:05Z`, or a dash.
pub(crate) fn ts(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "—".into())
}

pub(crate) fn delivery_status(value: i32) -> &'static str {
    match pb::DeliveryStatus::try_from(value) {
        Ok(pb::DeliveryStatus::Pending) => "pending",
        Ok(pb::DeliveryStatus::Retrying) => "retrying",
        Ok(pb::DeliveryStatus::Succeeded) => "succeeded",
        Ok(pb::DeliveryStatus::Failed) => "failed",
        _ => "unknown",
    }
}

pub(crate) fn error_class(value: i32) -> &'static str {
    match pb::ErrorClass::try_from(value) {
        Ok(pb::ErrorClass::Timeout) => "timeout",
        Ok(pb::ErrorClass::Connect) => "connect",
        Ok(pb::ErrorClass::Dns) => "dns",
        Ok(pb::ErrorClass::Tls) => "tls",
        Ok(pb::ErrorClass::Body) => "body",
        Ok(pb::ErrorClass::Status) => "status",
        Ok(pb::ErrorClass::Invalid) => "invalid",
        Ok(pb::ErrorClass::Egress) => "egress",
        _ => "—",
    }
}

pub(crate) fn subscription_state(value: i32) -> &'static str {
    match pb::SubscriptionState::try_from(value) {
        Ok(pb::SubscriptionState::Enabled) => "enabled",
        Ok(pb::SubscriptionState::Disabled) => "disabled",
        _ => "unknown",
    }
}

/// Bytes shown as text: UTF-8 (lossy), cut at `max` characters.
pub(crate) fn excerpt(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.into_owned(),
    }
}

/// A failed console request, shown as a page saying what was wrong.
#[derive(Debug)]
pub(crate) struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, m)
    }
    pub fn internal(what: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {what}"),
        )
    }
}

impl From<tonic::Status> for PageError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, s.message().to_string())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = html! {
            h1 { "Error " (self.status.as_u16()) }
            p class="error" id="error" { (self.message) }
            p { a href="/console/" { "Back to the console" } }
        };
        (self.status, bare("Error", body)).into_response()
    }
}
