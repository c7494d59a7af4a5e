//! API keys: how tokens are made, hashed and checked on every call.
//!
//! A token is `hl_` + base64url of 32 random bytes; only its SHA-256 is stored. Callers
//! send `authorization: Bearer <token>`. Lookups are cached for a short time (a bounded
//! [`ChangeCache`]) so the hot path (ingest) does not read the database per call; a key
//! or tenant change heard on the registry change stream ([`Authenticator::follow`])
//! clears the cache at once.
//!
//! The [`crate::gate`] authenticates every call from its metadata before the body is read
//! and puts the [`Principal`] into the request's extensions; handlers take it from there
//! with [`principal`]. Every invalidation also bumps a generation that open streams watch
//! ([`guard_stream`]), so a stream ends when its key is revoked or its tenant deleted.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::{Stream, StreamExt};
use hookline_changes::{ChangeCache, RegistryChanges, RegistryNotice};
use hookline_core::model::RegistryChange;
use hookline_store::StoreError;
use hookline_store::port::RegistryStore;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::keys::{KeyLimits, KeyLimitsConfig, StreamPermit};
pub use crate::principal::Principal;

const TOKEN_PREFIX: &str = "hl_";
/// Characters of a token kept in clear to tell keys apart.
pub const SHOWN_PREFIX_LEN: usize = 10;
const CACHE_TTL: Duration = Duration::from_secs(30);
const CACHE_MAX_ENTRIES: u64 = 10_000;

/// A freshly generated token, its shown prefix and its hash.
pub struct NewToken {
    pub token: String,
    pub prefix: String,
    pub hash: [u8; 32],
}

pub fn generate_token() -> NewToken {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    NewToken {
        prefix: token[..SHOWN_PREFIX_LEN].to_string(),
        hash: hash_token(&token),
        token,
    }
}

/// Base64url characters after the prefix: 32 random bytes, unpadded.
const TOKEN_BODY_LEN: usize = 43;

/// Whether `token` has the shape of a token [`generate_token`] makes.
fn is_token_shaped(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|body| {
        body.len() == TOKEN_BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The caller of a request, as the [`crate::gate`] put it into the request's extensions.
/// Every handler reads its caller here and nowhere else. A request without one is
/// refused with `UNAUTHENTICATED` (there is no anonymous caller): that happens only if a
/// service was mounted without the gate.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("this call was not authenticated"))
}

/// Checks bearer tokens against the store, with a short-lived cache, and holds the
/// per-key limits (request rate, open streams).
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn RegistryStore>,
    /// Token hash → who it is.
    cache: ChangeCache<[u8; 32], Principal>,
    /// Bumped on every invalidation; open streams re-check their key when it moves.
    generation: Arc<watch::Sender<u64>>,
    limits: Arc<KeyLimits>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn RegistryStore>) -> Self {
        Self::with_limits(store, KeyLimitsConfig::default())
    }

    pub fn with_limits(store: Arc<dyn RegistryStore>, limits: KeyLimitsConfig) -> Self {
        Self {
            store,
            cache: ChangeCache::new(CACHE_MAX_ENTRIES, CACHE_TTL),
            generation: Arc::new(watch::Sender::new(0)),
            limits: Arc::new(KeyLimits::new(limits)),
        }
    }

    /// The per-key limits.
    pub fn limits(&self) -> &KeyLimits {
        &self.limits
    }

    /// The one admission check, before a body is read: who is calling (from the
    /// `authorization` header; `UNAUTHENTICATED` saying what is missing or wrong) and
    /// whether their key is within its request rate (`RESOURCE_EXHAUSTED`). The gRPC
    /// [`crate::gate`] and the REST API both call this, once per request.
    pub async fn admit(&self, headers: &http::HeaderMap) -> Result<Principal, Status> {
        let principal = self
            .authenticate_header(headers.get(http::header::AUTHORIZATION))
            .await?;
        self.limits.check_rate(&principal)?;
        Ok(principal)
    }

    /// The caller named by the raw `authorization` header, or `UNAUTHENTICATED`.
    async fn authenticate_header(
        &self,
        header: Option<&http::HeaderValue>,
    ) -> Result<Principal, Status> {
        let header = header
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing `authorization` metadata; send `authorization: Bearer <api key>`",
                )
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("`authorization` metadata is not ASCII"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("`authorization` must be `Bearer <api key>`"))?;
        // What no key can be costs no database lookup.
        if !is_token_shaped(token) {
            return Err(Status::unauthenticated(format!(
                "not a Hookline API key: a key is `{TOKEN_PREFIX}` followed by {TOKEN_BODY_LEN} base64url characters"
            )));
        }
        let hash = hash_token(token);
        self.cache.get_or_load(&hash, self.look_up(hash)).await
    }

    /// The principal of the key whose token hashes to `hash`, from the store.
    async fn look_up(&self, hash: [u8; 32]) -> Result<Principal, Status> {
        let key = match self.store.find_api_key_by_hash(&hash).await {
            Ok(key) => key,
            Err(StoreError::NotFound { .. }) => {
                return Err(Status::unauthenticated("unknown or revoked API key"));
            }
            Err(e) => return Err(crate::status::from_store(e)),
        };
        Ok(match key.tenant_id {
            None => Principal::Admin { key_id: key.id },
            Some(tenant_id) => Principal::Tenant {
                key_id: key.id,
                tenant_id,
            },
        })
    }

    /// Drops every cached lookup (a key was revoked, or changes may have been missed),
    /// and tells open streams to check their key again.
    pub fn invalidate(&self) {
        self.cache.invalidate_all();
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Invalidates on every key or tenant change (and `Resync`) heard on `changes`,
    /// until `shutdown`.
    pub fn follow(
        &self,
        changes: &RegistryChanges,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let auth = self.clone();
        changes.spawn_follower(shutdown, move |notice| {
            if affects_keys(&notice) {
                auth.invalidate();
            }
            std::future::ready(())
        })
    }

    /// Changes whenever [`Self::invalidate`] runs.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether the key behind `principal` still exists, unrevoked (for a portal session:
    /// whether its tenant still exists), read from the store
    /// (not the cache). A store error counts as valid: the next change checks again.
    pub async fn still_valid(&self, principal: &Principal) -> bool {
        let found = match principal {
            // No stored key behind a portal session: it lasts while its tenant does.
            Principal::Portal { tenant_id, .. } => {
                self.store.get_tenant(tenant_id).await.map(|_| true)
            }
            _ => self
                .store
                .get_api_key(principal.key_id())
                .await
                .map(|key| key.revoked_at.is_none()),
        };
        match found {
            Ok(valid) => valid,
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check an API key; keeping its stream open");
                true
            }
        }
    }
}

/// Whether `notice` may change who a token is: a key revoked, a tenant deleted, or
/// changes missed. Subscriptions and event types never do.
fn affects_keys(notice: &RegistryNotice) -> bool {
    !matches!(
        notice,
        RegistryNotice::Change(
            RegistryChange::Subscription { .. } | RegistryChange::EventType { .. }
        )
    )
}

/// A server stream that holds `permit` while open and ends with `UNAUTHENTICATED` once
/// the key of `principal` is revoked or its tenant deleted (checked whenever the
/// registry announces a change).
pub fn guard_stream<T: Send + 'static>(
    auth: &Authenticator,
    principal: Principal,
    permit: StreamPermit,
    inner: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    let state = Guarded {
        inner: Box::pin(inner),
        generation: auth.generation(),
        auth: auth.clone(),
        principal,
        _permit: permit,
    };
    Box::pin(futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            tokio::select! {
                item = state.inner.next() => return item.map(|item| (item, Some(state))),
                changed = state.generation.changed() => {
                    if changed.is_err() {
                        // The authenticator is gone: nothing more will be announced.
                        let item = state.inner.next().await?;
                        return Some((item, Some(state)));
                    }
                    if !state.auth.still_valid(&state.principal).await {
                        let ended = Status::unauthenticated(format!(
                            "API key {} was revoked or its tenant deleted; the stream ends",
                            state.principal.key_id()
                        ));
                        return Some((Err(ended), None));
                    }
                }
            }
        }
    }))
}

struct Guarded<T> {
    inner: Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>,
    generation: tokio::sync::watch::Receiver<u64>,
    auth: Authenticator,
    principal: Principal,
    _permit: StreamPermit,
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_core::Id;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a.token, b.token);
        assert!(a.token.starts_with("hl_"));
        assert_eq!(a.token.len(), 3 + 43);
        assert!(is_token_shaped(&a.token));
        assert!(!is_token_shaped("hl_short"));
        assert!(!is_token_shaped(&a.token.replace("hl_", "xx_")));
        assert!(!is_token_shaped(&format!(
            "{}=",
            &a.token[..a.token.len() - 1]
        )));
        assert_eq!(hash_token(&a.token), a.hash);
        assert!(a.token.starts_with(&a.prefix));
    }

    #[test]
    fn tenant_keys_see_only_their_tenant() {
        let t1 = Id::new(hookline_core::IdKind::Tenant);
        let t2 = Id::new(hookline_core::IdKind::Tenant);
        let p = Principal::Tenant {
            key_id: Id::new(hookline_core::IdKind::ApiKey),
            tenant_id: t1.clone(),
        };
        assert!(p.may_access(&t1));
        assert!(!p.may_access(&t2));
        assert_eq!(
            p.check_tenant(&t2, "tenant", t2.as_str())
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );
        assert!(p.require_admin("creating tenants").is_err());
    }
}
