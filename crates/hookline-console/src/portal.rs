//! Tenant portal links: `/console/portal?token=…` opens the console scoped to one
//! tenant with no key to type. The token is `v1.<tenant id>.<expiry, unix seconds>.<MAC>`
//! with an HMAC-SHA256 over the rest under the console's secret, so the link carries no
//! key and nothing stored outlives it; the session it opens ends when it expires. Links
//! are made by an admin, or by a tenant key for its own tenant: the console first asks
//! the registry for the tenant as the caller, so the service decides who may.

use std::time::Duration;

use axum::Json;
use axum::extract::{Form, Query};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use hookline_core::{Id, IdKind};
use http::HeaderMap;
use maud::html;
use serde::Deserialize;
use sha2::Sha256;

use crate::layout;
use crate::session::{self, Ctx};
use crate::view::PageError;
use crate::{Console, State};

const VERSION: &str = "v1";
/// Longest token accepted before any parsing.
const MAX_TOKEN_LEN: usize = 200;
/// Lifetime of a link when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// Shortest lifetime a link may be given, in seconds.
pub const MIN_TTL_SECS: u64 = 5;

/// Why a portal token is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the portal link is malformed; ask for a new link")]
    Malformed,
    #[error("the portal link's signature does not match; ask for a new link")]
    BadSignature,
    #[error("the portal link expired; ask for a new link")]
    Expired,
}

fn mac(secret: &[u8], tenant: &str, expires: i64) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(format!("hookline-portal:{VERSION}:{tenant}:{expires}").as_bytes());
    mac
}

/// A token for `tenant` valid until `expires` (unix seconds).
pub fn sign(secret: &[u8], tenant: &Id, expires: i64) -> String {
    let tag = mac(secret, tenant.as_str(), expires)
        .finalize()
        .into_bytes();
    format!(
        "{VERSION}.{}.{expires}.{}",
        tenant.as_str(),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

/// The tenant of a valid token and how long it remains valid.
pub fn verify(secret: &[u8], token: &str, now: i64) -> Result<(Id, Duration), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(VERSION), Some(tenant), Some(expires), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    let expires: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    mac(secret, tenant, expires)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let tenant = Id::parse(IdKind::Tenant, "tenant", tenant).map_err(|_| TokenError::Malformed)?;
    if expires <= now {
        return Err(TokenError::Expired);
    }
    Ok((tenant, Duration::from_secs((expires - now) as u64)))
}

#[derive(Deserialize)]
pub(crate) struct OpenQuery {
    #[serde(default)]
    token: String,
}

/// `GET /console/portal?token=…`: a portal session, or a page saying why not.
pub(crate) async fn open(
    state: State,
    headers: HeaderMap,
    Query(q): Query<OpenQuery>,
) -> Result<Response, PageError> {
    let console = state.0;
    let (tenant, left) = verify(
        &console.config.portal_secret,
        &q.token,
        Utc::now().timestamp(),
    )
    .map_err(|e| PageError::forbidden(e.to_string()))?;
    session::start_portal(&console, &headers, tenant, left)
}

#[derive(Deserialize)]
pub(crate) struct LinkRequest {
    #[serde(default)]
    csrf: String,
    tenant_id: String,
    /// Seconds; 0 or absent: 15 minutes.
    #[serde(default)]
    ttl_secs: u64,
}

/// A link for `req.tenant_id` if the caller may see that tenant (the registry decides).
async fn make_link(
    console: &Console,
    clients: &mut crate::calls::Clients,
    headers: &HeaderMap,
    req: &LinkRequest,
) -> Result<(String, chrono::DateTime<Utc>), PageError> {
    let max = console.config.portal_max_ttl.as_secs();
    let ttl = if req.ttl_secs == 0 {
        DEFAULT_TTL.as_secs()
    } else {
        req.ttl_secs
    };
    if !(MIN_TTL_SECS..=max).contains(&ttl) {
        return Err(PageError::bad_request(format!(
            "ttl_secs is {ttl}; allowed: {MIN_TTL_SECS} to {max} (setting console_portal_max_ttl_secs)"
        )));
    }
    let tenant = clients.tenant(&req.tenant_id).await?;
    let tenant = Id::parse(IdKind::Tenant, "tenant_id", &tenant.id)
        .map_err(|e| PageError::bad_request(e.to_string()))?;
    let expires = Utc::now() + chrono::Duration::seconds(ttl as i64);
    let token = sign(&console.config.portal_secret, &tenant, expires.timestamp());
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    Ok((
        format!("{scheme}://{host}/console/portal?token={token}"),
        expires,
    ))
}

/// `POST /console/portal-links` from the console's form.
pub(crate) async fn create_from_form(
    state: State,
    headers: HeaderMap,
    mut ctx: Ctx,
    Form(req): Form<LinkRequest>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&req.csrf)?;
    let (url, expires) = make_link(&state.0, &mut ctx.clients, &headers, &req).await?;
    let body = html! {
        p { "Anyone with this link can act on tenant " code { (req.tenant_id) } " until "
            (expires.format("%Y-%m-%d %H:%M:%SZ")) ". Send it over a private channel." }
        p { a id="portal-link" href=(url) { (url) } }
    };
    Ok(layout::page(&ctx, "Portal link", body).into_response())
}

/// `POST /console/api/portal-links` with `authorization: Bearer <key>` and a JSON body
/// `{"tenant_id": …, "ttl_secs": …}`: for the operator's own backend.
pub(crate) async fn create_from_api(
    state: State,
    headers: HeaderMap,
    Json(req): Json<LinkRequest>,
) -> Result<Response, PageError> {
    let console = state.0;
    let principal = console.auth.admit(&headers).await?;
    let mut clients = console.services.as_principal(principal);
    let (url, expires) = make_link(&console, &mut clients, &headers, &req).await?;
    Ok(Json(serde_json::json!({ "url": url, "expires_at": expires.to_rfc3339() })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_tenant_until_it_expires() {
        let tenant = Id::new(IdKind::Tenant);
        let token = sign(b"secret", &tenant, 1000);
        assert_eq!(
            verify(b"secret", &token, 400),
            Ok((tenant, Duration::from_secs(600)))
        );
        assert_eq!(verify(b"secret", &token, 1000), Err(TokenError::Expired));
        assert_eq!(verify(b"other", &token, 400), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_changed_tenant_or_expiry_breaks_the_signature() {
        let (a, b) = (Id::new(IdKind::Tenant), Id::new(IdKind::Tenant));
        let token = sign(b"k", &a, 1000);
        let swapped = token.replace(a.as_str(), b.as_str());
        assert_eq!(verify(b"k", &swapped, 0), Err(TokenError::BadSignature));
        let later = token.replace(".1000.", ".9999.");
        assert_eq!(verify(b"k", &later, 0), Err(TokenError::BadSignature));
        assert_eq!(verify(b"k", "v1.x", 0), Err(TokenError::Malformed));
        assert_eq!(
            verify(b"k", &"a".repeat(500), 0),
            Err(TokenError::Malformed)
        );
    }
}
