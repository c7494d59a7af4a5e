//! Console sessions: a login with a pasted API key, or a portal link, makes a session
//! kept in this process's memory; the browser holds only its random id, in an
//! `HttpOnly`, `SameSite=Strict` cookie (`Secure` over TLS and on localhost), never in
//! script-readable storage. Each session has its own random CSRF token, required on every
//! form. A key session re-checks its key with the gate's [`Authenticator`] on every
//! request (a revoked key ends it); a portal session ends when its link expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, FromRequestParts};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hookline_core::Id;
use hookline_grpc::Principal;
use http::header::{COOKIE, SET_COOKIE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue};
use maud::html;
use rand::RngCore;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::calls::Clients;
use crate::view::{self, PageError};
use crate::{Console, State};

const SESSION_COOKIE: &str = "hookline_console";
const LOGIN_CSRF_COOKIE: &str = "hookline_console_login";
/// Most sessions held at once; beyond it, expired ones are dropped and then a new login
/// is refused until some expire.
const MAX_SESSIONS: usize = 10_000;
/// Longest API key accepted in the login form (a real one is 46 characters).
const MAX_KEY_LEN: usize = 200;

/// Who a session acts as.
#[derive(Clone)]
enum Credential {
    /// A pasted API key, checked again on every request.
    Key(String),
    /// A portal link: one tenant, no key. `key_id` names the session in per-key limits.
    Portal { tenant_id: Id, key_id: Id },
}

#[derive(Clone)]
struct Session {
    credential: Credential,
    csrf: String,
    expires: Instant,
}

/// The open sessions of this process.
#[derive(Default, Clone)]
pub struct Sessions {
    map: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sessions {
    fn insert(&self, credential: Credential, ttl: Duration) -> Result<String, PageError> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| PageError::internal("session lock"))?;
        if map.len() >= MAX_SESSIONS {
            let now = Instant::now();
            map.retain(|_, s| s.expires > now);
        }
        if map.len() >= MAX_SESSIONS {
            return Err(PageError::unavailable(format!(
                "the console holds {MAX_SESSIONS} sessions, its limit; try again when some expire"
            )));
        }
        let id = random_token();
        let session = Session {
            credential,
            csrf: random_token(),
            expires: Instant::now() + ttl,
        };
        map.insert(id.clone(), session);
        Ok(id)
    }

    fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().ok()?;
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }
}

/// 32 random bytes, base64url.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The signed-in caller of a console request.
pub(crate) struct Ctx {
    pub principal: Principal,
    pub csrf: String,
    /// Opened from a portal link (no key; one tenant).
    pub portal: bool,
    pub clients: Clients,
}

impl Ctx {
    /// The tenant a tenant key or portal session is bound to; `None` for an admin.
    pub fn own_tenant(&self) -> Option<&Id> {
        self.principal.tenant()
    }

    /// The form's CSRF token must be this session's.
    pub fn check_csrf(&self, token: &str) -> Result<(), PageError> {
        if bool::from(token.as_bytes().ct_eq(self.csrf.as_bytes())) {
            Ok(())
        } else {
            Err(PageError::forbidden(
                "the form's CSRF token does not match this session; reload the page and submit again",
            ))
        }
    }
}

impl FromRequestParts<Arc<Console>> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Response> {
        let to_login = || Redirect::to("/console/login").into_response();
        let Some(id) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login());
        };
        let Some(session) = console.sessions.get(&id) else {
            return Err(to_login());
        };
        let (principal, portal) = match &session.credential {
            // The key again, and its rate: a revoked key ends the session.
            Credential::Key(key) => match admit(console, key).await {
                Ok(p) => (p, false),
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    console.sessions.remove(&id);
                    return Err(to_login());
                }
                Err(s) => return Err(PageError::from(s).into_response()),
            },
            Credential::Portal { tenant_id, key_id } => {
                let p = Principal::Portal {
                    session_id: key_id.clone(),
                    tenant_id: tenant_id.clone(),
                };
                // The same per-key rate, per portal session.
                console
                    .auth
                    .limits()
                    .check_rate(&p)
                    .map_err(|s| PageError::from(s).into_response())?;
                (p, true)
            }
        };
        Ok(Ctx {
            clients: console.services.as_principal(principal.clone()),
            principal,
            csrf: session.csrf,
            portal,
        })
    }
}

/// The principal of `key`, admitted by the gate's own check (key and rate).
async fn admit(console: &Console, key: &str) -> Result<Principal, tonic::Status> {
    let header = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| tonic::Status::unauthenticated("the API key has characters no key has"))?;
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, header);
    console.auth.admit(&headers).await
}

/// The value of cookie `name`.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the browser reached the console over TLS (directly or through a proxy that
/// says so) or on localhost, where browsers keep `Secure` cookies over plain HTTP.
fn secure_origin(headers: &HeaderMap) -> bool {
    let forwarded_tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    forwarded_tls || matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

/// A `Set-Cookie` value for the console's path.
fn set_cookie(
    headers: &HeaderMap,
    name: &str,
    value: &str,
    max_age: Option<u64>,
    cross_site: bool,
) -> HeaderValue {
    let mut c = format!("{name}={value}; Path=/console; HttpOnly");
    if cross_site {
        // Sent inside the operator's iframe: third-party context, partitioned per top site.
        c.push_str("; SameSite=None; Secure; Partitioned");
    } else {
        c.push_str("; SameSite=Strict");
        if secure_origin(headers) {
            c.push_str("; Secure");
        }
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Starts a portal session for `tenant_id` until `ttl` from now; the answer sets its cookie.
pub(crate) fn start_portal(
    console: &Console,
    headers: &HeaderMap,
    tenant_id: Id,
    ttl: Duration,
) -> Result<Response, PageError> {
    let credential = Credential::Portal {
        tenant_id,
        key_id: Id::new(hookline_core::IdKind::ApiKey),
    };
    let id = console.sessions.insert(credential, ttl)?;
    let embeddable = console.config.frame_ancestors.trim() != "'none'";
    let cookie = set_cookie(
        headers,
        SESSION_COOKIE,
        &id,
        Some(ttl.as_secs()),
        embeddable,
    );
    Ok(([(SET_COOKIE, cookie)], Redirect::to("/console/")).into_response())
}

pub(crate) async fn login_page(headers: HeaderMap) -> Response {
    let token = random_token();
    let cookie = set_cookie(&headers, LOGIN_CSRF_COOKIE, &token, Some(3600), false);
    let body = html! {
        h1 { "Sign in to the Hookline console" }
        form method="post" action="/console/login" class="card" {
            input type="hidden" name="csrf" value=(token);
            label for="api_key" { "API key" }
            input type="password" id="api_key" name="api_key" autocomplete="off" required placeholder="hl_…";
            p class="hint" { "An admin key sees every tenant; a tenant key sees its own tenant only. The key stays on the server; the browser keeps a session cookie." }
            button type="submit" id="login" { "Sign in" }
        }
    };
    ([(SET_COOKIE, cookie)], view::bare("Sign in", body)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    csrf: String,
    api_key: String,
}

pub(crate) async fn login(
    state: State,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, PageError> {
    let console = state.0;
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(form.csrf.as_bytes())) {
        return Err(PageError::forbidden(
            "the login form's CSRF token does not match; open /console/login again and sign in",
        ));
    }
    let key = form.api_key.trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(PageError::bad_request(format!(
            "paste an API key (hl_ followed by 43 characters); got {} characters",
            key.len()
        )));
    }
    admit(&console, key).await.map_err(PageError::from)?;
    let ttl = console.config.session_ttl;
    let id = console
        .sessions
        .insert(Credential::Key(key.to_string()), ttl)?;
    let session = set_cookie(&headers, SESSION_COOKIE, &id, Some(ttl.as_secs()), false);
    let clear = set_cookie(&headers, LOGIN_CSRF_COOKIE, "", Some(0), false);
    Ok((
        AppendHeaders([(SET_COOKIE, session), (SET_COOKIE, clear)]),
        Redirect::to("/console/"),
    )
        .into_response())
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    pub csrf: String,
}

pub(crate) async fn logout(
    state: State,
    headers: HeaderMap,
    ctx: Ctx,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&form.csrf)?;
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state.0.sessions.remove(&id);
    }
    let clear = set_cookie(&headers, SESSION_COOKIE, "", Some(0), false);
    Ok(([(SET_COOKIE, clear)], Redirect::to("/console/login")).into_response())
}
