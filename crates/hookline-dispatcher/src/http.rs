//! The HTTP side of an attempt: one shared client, one POST, and what came of it.
//!
//! Every attempt ends in an [`Exchange`]: the status code and a bounded excerpt of the
//! body when the receiver answered, or an [`ErrorClass`] and a message when it did not.
//! Transport errors are classified by walking the error's `source()` chain, because
//! reqwest reports DNS and TLS failures as connect errors with the cause further down.
//!
//! Each POST is an `http.attempt` client span with OpenTelemetry's HTTP attributes
//! (`http.request.method`, `url.full` with credentials dropped and query values redacted,
//! `server.*`, `http.response.status_code`, `error.type`). It is a `DEBUG` span: unless an
//! exporter or a debug log filter wants it, it is disabled at its call site and free.
//! No trace context is sent to the receiver: its endpoint is outside the system, and
//! Hookline's trace ids are none of its business.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookline_core::model::{ErrorClass, RESPONSE_EXCERPT_LIMIT};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use tracing::Instrument as _;
use tracing::field::Empty;

/// Longest error message an attempt keeps.
const ERROR_MESSAGE_LIMIT: usize = 1024;

/// The one client of a dispatcher: pooled keep-alive connections (HTTP/2 where the
/// receiver offers it), a total timeout per request, redirects not followed.
pub(crate) fn build_client(request_timeout: Duration) -> Result<Client, reqwest::Error> {
    // reqwest is built without a bundled crypto provider; the binary installs ring. Install
    // it here too if nobody has, so that building a client can never panic.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(request_timeout)
        .connect_timeout(request_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
}

/// What one attempt came to.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// Whether a request was sent at all.
    pub(crate) sent: bool,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) duration: Duration,
    /// The receiver's status, if it answered.
    pub(crate) status: Option<StatusCode>,
    /// The raw `Retry-After` header of the answer.
    pub(crate) retry_after: Option<String>,
    /// At most [`RESPONSE_EXCERPT_LIMIT`] bytes of the answer's body.
    pub(crate) excerpt: Vec<u8>,
    /// Why the attempt failed; `None` for a 2xx answer.
    pub(crate) error: Option<(ErrorClass, String)>,
}

impl Exchange {
    /// An attempt refused before any request was sent (bad URL, no signing key).
    pub(crate) fn refused(started_at: DateTime<Utc>, message: String) -> Self {
        Self {
            sent: false,
            started_at,
            duration: Duration::ZERO,
            status: None,
            retry_after: None,
            excerpt: Vec::new(),
            error: Some((ErrorClass::Invalid, truncate(message))),
        }
    }
}

/// POSTs `body` to `url` and reads at most [`RESPONSE_EXCERPT_LIMIT`] bytes of the answer,
/// in an `http.attempt` span.
pub(crate) async fn post(
    client: &Client,
    url: Url,
    headers: HeaderMap,
    body: Vec<u8>,
    started_at: DateTime<Utc>,
) -> Exchange {
    let span = tracing::debug_span!(
        "http.attempt",
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = "POST",
        url.full = Empty,
        server.address = Empty,
        server.port = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
    );
    if !span.is_disabled() {
        span.record("url.full", traced_url(&url).as_str());
        if let Some(host) = url.host_str() {
            span.record("server.address", host);
        }
        if let Some(port) = url.port_or_known_default() {
            span.record("server.port", port);
        }
    }
    let exchange = exchange(client, url, headers, body, started_at)
        .instrument(span.clone())
        .await;
    if !span.is_disabled() {
        record(&span, &exchange);
    }
    exchange
}

/// What the attempt came to, on its span. A failed attempt's `error.type` is the status
/// code when the receiver answered, or the error class when it did not.
fn record(span: &tracing::Span, exchange: &Exchange) {
    if let Some(status) = exchange.status {
        span.record("http.response.status_code", status.as_u16());
    }
    let Some((class, _)) = &exchange.error else {
        return;
    };
    match exchange.status {
        Some(status) => span.record("error.type", status.as_str()),
        None => span.record("error.type", class.as_str()),
    };
    span.record("otel.status_code", "ERROR");
}

/// The URL as a trace may show it: no user name or password, no fragment, and every query
/// value replaced by `REDACTED` (webhook URLs often carry a token in the query).
fn traced_url(url: &Url) -> String {
    if url.query().is_none()
        && url.username().is_empty()
        && url.password().is_none()
        && url.fragment().is_none()
    {
        return url.to_string();
    }
    let mut shown = url.clone();
    // Fails only for URLs that cannot have credentials, which then have none to drop.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    if url.query().is_some() {
        let keys: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
        shown
            .query_pairs_mut()
            .clear()
            .extend_pairs(keys.iter().map(|k| (k.as_str(), "REDACTED")));
    }
    shown.to_string()
}

async fn exchange(
    client: &Client,
    url: Url,
    headers: HeaderMap,
    body: Vec<u8>,
    started_at: DateTime<Utc>,
) -> Exchange {
    let clock = Instant::now();
    let sent = client.post(url).headers(headers).body(body).send().await;
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => {
            return Exchange {
                sent: true,
                started_at,
                duration: clock.elapsed(),
                status: None,
                retry_after: None,
                excerpt: Vec::new(),
                error: Some((classify(&e), describe(e))),
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    // Read the body chunk by chunk and stop at the limit: a huge answer is never buffered.
    // Dropping the rest closes the connection, which only costs a reconnect.
    let mut excerpt = Vec::new();
    let mut body_error = None;
    while excerpt.len() < RESPONSE_EXCERPT_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_EXCERPT_LIMIT - excerpt.len();
                excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) => break,
            Err(e) => {
                body_error = Some(e);
                break;
            }
        }
    }
    let duration = clock.elapsed();

    // The status decides; a 2xx whose body could not be read is still a success.
    let error = if status.is_success() {
        None
    } else if let Some(e) = body_error {
        let class = if e.is_timeout() {
            ErrorClass::Timeout
        } else {
            ErrorClass::Body
        };
        Some((
            class,
            truncate(format!(
                "HTTP {status}; reading the body failed: {}",
                describe(e)
            )),
        ))
    } else {
        Some((ErrorClass::Status, format!("HTTP {status}")))
    };
    Exchange {
        sent: true,
        started_at,
        duration,
        status: Some(status),
        retry_after,
        excerpt,
        error,
    }
}

/// The class of a transport error.
pub(crate) fn classify(error: &reqwest::Error) -> ErrorClass {
    if error.is_timeout() {
        return ErrorClass::Timeout;
    }
    let causes = chain(error);
    let mentions = |words: &[&str]| {
        causes.iter().any(|(_, text)| {
            let text = text.to_ascii_lowercase();
            words.iter().any(|w| text.contains(w))
        })
    };
    if causes.iter().any(|(is_rustls, _)| *is_rustls)
        || mentions(&["certificate", "tls", "ssl", "handshake"])
    {
        return ErrorClass::Tls;
    }
    if error.is_dns()
        || mentions(&[
            "dns",
            "resolve",
            "lookup address",
            "name or service not known",
        ])
    {
        return ErrorClass::Dns;
    }
    if error.is_connect() {
        return ErrorClass::Connect;
    }
    if error.is_body() || error.is_decode() {
        return ErrorClass::Body;
    }
    if error.is_builder() {
        return ErrorClass::Invalid;
    }
    // Trouble on an established connection (reset, closed before the answer).
    ErrorClass::Connect
}

/// Every cause below `error`: whether it is a rustls error, and its text. An `io::Error`
/// hides what it wraps from `source()` (it returns the wrapped error's own source), and
/// TLS errors come wrapped in two of them, so wrapped errors are visited explicitly.
fn chain(error: &reqwest::Error) -> Vec<(bool, String)> {
    const MAX_CAUSES: usize = 32;
    let mut out = Vec::new();
    let mut pending: Vec<&(dyn StdError + 'static)> = error.source().into_iter().collect();
    while let Some(cause) = pending.pop() {
        if out.len() >= MAX_CAUSES {
            break;
        }
        out.push((cause.is::<rustls::Error>(), cause.to_string()));
        if let Some(next) = cause.source() {
            pending.push(next);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            pending.push(inner);
        }
    }
    out
}

/// The error and its causes on one line, without the URL (it may carry a token).
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    truncate(text)
}

/// At most [`ERROR_MESSAGE_LIMIT`] bytes, cut on a character boundary.
fn truncate(mut text: String) -> String {
    if text.len() > ERROR_MESSAGE_LIMIT {
        let mut end = ERROR_MESSAGE_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A raw TCP server on 127.0.0.1 that reads the request head, then answers with
    /// `reply` and, if `endless`, an endless body; `None` never answers.
    async fn raw_server(reply: Option<&'static [u8]>, endless: bool) -> Url {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let Some(reply) = reply else {
                        std::future::pending::<()>().await;
                        return;
                    };
                    if socket.write_all(reply).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    while endless && socket.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        Url::parse(&format!("http://{addr}/hook")).unwrap()
    }

    fn client(timeout_ms: u64) -> Client {
        build_client(Duration::from_millis(timeout_ms)).unwrap()
    }

    async fn send(client: &Client, url: Url) -> Exchange {
        post(client, url, HeaderMap::new(), b"{}".to_vec(), Utc::now()).await
    }

    #[tokio::test]
    async fn a_huge_body_is_cut_at_the_excerpt_limit() {
        let url = raw_server(
            Some(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: 104857600\r\n\r\n"),
            true,
        )
        .await;
        let exchange = send(&client(5_000), url).await;
        assert_eq!(exchange.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(exchange.excerpt.len(), RESPONSE_EXCERPT_LIMIT);
        assert_eq!(exchange.retry_after.as_deref(), Some("7"));
        assert_eq!(exchange.error.map(|e| e.0), Some(ErrorClass::Status));
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let url = raw_server(
            Some(
                b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n",
            ),
            false,
        )
        .await;
        let exchange = send(&client(5_000), url).await;
        assert_eq!(exchange.status, Some(StatusCode::FOUND));
        assert_eq!(exchange.error.map(|e| e.0), Some(ErrorClass::Status));
    }

    #[tokio::test]
    async fn transport_errors_are_classified() {
        let silent = raw_server(None, false).await;
        let exchange = send(&client(300), silent).await;
        assert_eq!(
            exchange.error.as_ref().map(|e| e.0),
            Some(ErrorClass::Timeout),
            "{exchange:?}"
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let exchange = send(&client(5_000), closed).await;
        assert_eq!(
            exchange.error.as_ref().map(|e| e.0),
            Some(ErrorClass::Connect),
            "{exchange:?}"
        );

        // A server that speaks plain HTTP where TLS is expected: the handshake fails.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = Url::parse(&format!("https://{}/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
                let mut sink = [0u8; 1024];
                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
            }
        });
        let exchange = send(&client(5_000), tls).await;
        assert_eq!(
            exchange.error.as_ref().map(|e| e.0),
            Some(ErrorClass::Tls),
            "{exchange:?}"
        );

        let nowhere = Url::parse("http://hookline-test.invalid/").unwrap();
        let exchange = send(&client(5_000), nowhere).await;
        assert_eq!(
            exchange.error.as_ref().map(|e| e.0),
            Some(ErrorClass::Dns),
            "{exchange:?}"
        );
    }

    #[test]
    fn traced_urls_hide_credentials_and_query_values() {
        let plain = Url::parse("https://example.com:8443/hooks/a").unwrap();
        assert_eq!(traced_url(&plain), "https://example.com:8443/hooks/a");
        let secret = Url::parse("https://u:p@example.com/h?token=abc&x=1#frag").unwrap();
        assert_eq!(
            traced_url(&secret),
            "https://example.com/h?token=REDACTED&x=REDACTED"
        );
    }

    #[test]
    fn truncation_respects_characters() {
        let text = "é".repeat(ERROR_MESSAGE_LIMIT);
        let cut = truncate(text);
        assert!(cut.len() <= ERROR_MESSAGE_LIMIT);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate("short".into()), "short");
    }
}
