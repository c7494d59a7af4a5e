//! The gate in front of every Hookline service, and the one place a call is
//! authenticated: before a byte of its body is read it admits the caller
//! ([`Authenticator::admit`]: a valid key, within its request rate; otherwise answered at
//! once), puts the [`Principal`] into the request's extensions for the handler (which
//! reads it with [`crate::principal`]), and holds each method's request messages to
//! their size limit as the body streams in. Health and reflection are mounted without it
//! and stay open.
//!
//! **The trusted in-process path.** A request that already carries a [`Principal`] in its
//! extensions is let through as that principal without a second check. Extensions never
//! come from the network (hyper starts each request with none but the connection's), so
//! only code in this process can put one there: the REST API (which admitted the caller
//! itself, key and rate, before reading the body) and the web console call the services
//! this way. Such a caller is responsible for having authenticated the principal.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;

use crate::auth::{Authenticator, Principal};
use crate::body::{CheckedBody, MessageLimit};

/// Largest request message of a method that sets no limit of its own.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The request message limit of each method of one service.
#[derive(Debug, Clone, Default)]
pub struct MessageLimits {
    /// By method name (the last part of the path, e.g. `PublishBatch`).
    by_method: HashMap<&'static str, MessageLimit>,
}

impl MessageLimits {
    /// Sets `method`'s limit to `max_bytes`, raised with `setting`.
    pub fn with(mut self, method: &'static str, max_bytes: usize, setting: &'static str) -> Self {
        self.by_method.insert(
            method,
            MessageLimit {
                method: Some(method),
                max_bytes,
                setting: Some(setting),
            },
        );
        self
    }

    /// The largest limit of any method: what the service's own decoder is set to.
    pub fn largest(&self) -> usize {
        self.by_method
            .values()
            .map(|l| l.max_bytes)
            .fold(DEFAULT_MAX_MESSAGE_BYTES, usize::max)
    }

    fn for_path(&self, path: &str) -> MessageLimit {
        let method = path.rsplit('/').next().unwrap_or_default();
        self.by_method.get(method).copied().unwrap_or(MessageLimit {
            method: None,
            max_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            setting: None,
        })
    }
}

/// A service behind the gate; see the module comment.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    auth: Authenticator,
    limits: Arc<MessageLimits>,
}

impl<S> Gate<S> {
    pub fn new(inner: S, auth: Authenticator, limits: MessageLimits) -> Self {
        Self {
            inner,
            auth,
            limits: Arc::new(limits),
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

type GateFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for Gate<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = GateFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is called on a clone once the key is checked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> GateFuture {
        let mut inner = self.inner.clone();
        let auth = self.auth.clone();
        let limits = self.limits.clone();
        Box::pin(async move {
            if req.extensions().get::<Principal>().is_none() {
                let principal = match auth.admit(req.headers()).await {
                    Ok(p) => p,
                    // Answered without reading the body; dropping it resets the stream.
                    Err(status) => return Ok(status.into_http()),
                };
                req.extensions_mut().insert(principal);
            }
            let limit = limits.for_path(req.uri().path());
            let req = req.map(|body| Body::new(CheckedBody::new(body, Some(limit), None)));
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(req).await
        })
    }
}
