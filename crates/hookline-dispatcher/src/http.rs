//! The HTTP side of an attempt: one shared client, one POST, and what came of it.
//!
//! Every attempt ends in an [`Exchange`]: the status code and a bounded excerpt of the
//! body when the receiver answered, or an [`ErrorClass`] and a message when it did not
//! (named in `failure`).
//!
//! The client connects only where the egress policy allows: its resolver drops refused
//! addresses, and a literal address (which reqwest never resolves) is checked before the
//! request. A refused attempt has the class `egress` and a message naming the policy.
//!
//! Each POST is an `http.attempt` client span with OpenTelemetry's HTTP attributes
//! (`http.request.method`, `url.full` with credentials dropped and query values redacted,
//! `server.*`, `http.response.status_code`, `error.type`). It is a `DEBUG` span: unless an
//! exporter or a debug log filter wants it, it is disabled at its call site and free.
//! No trace context is sent to the receiver: its endpoint is outside the system, and
//! Hookline's trace ids are none of its business.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookline_core::model::{ErrorClass, RESPONSE_EXCERPT_LIMIT};
use hookline_egress::{Egress, EgressRefused};

use crate::config::DispatcherConfig;
use crate::failure::{classify, describe, egress_refusal, truncate};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Certificate, Client, Identity, StatusCode, Url};
use tracing::Instrument as _;
use tracing::field::Empty;

/// A client of a dispatcher and the egress policy it connects under.
#[derive(Debug, Clone)]
pub(crate) struct HttpClient {
    client: Client,
    egress: Egress,
}

/// Builds a client of a dispatcher (see `clients`): pooled keep-alive connections (HTTP/2
/// where the receiver offers it), a total timeout per request, redirects not followed,
/// names resolved through the egress policy, no proxy but the configured one (never one
/// from the environment, which would resolve names where the policy cannot see them),
/// `roots` trusted beside the platform's, and `identity` presented when a receiver asks
/// for a client certificate.
pub(crate) fn build_client(
    cfg: &DispatcherConfig,
    roots: &[Certificate],
    identity: Option<Identity>,
) -> Result<HttpClient, reqwest::Error> {
    let request_timeout = cfg.request_timeout;
    let egress = cfg.egress.clone();
    let proxy = cfg.egress_proxy.as_ref();
    // reqwest is built without a bundled crypto provider; the binary installs ring. Install
    // it here too if nobody has, so that building a client can never panic.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    // The operator's proxy is trusted: its own address is not subject to the policy.
    let proxy_host = proxy.and_then(|p| p.host_str()).map(str::to_owned);
    let mut builder = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(request_timeout)
        .connect_timeout(request_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .dns_resolver(egress.resolver(proxy_host))
        .no_proxy()
        .tls_certs_merge(roots.iter().cloned());
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    if let Some(proxy) = proxy {
        builder = builder.proxy(reqwest::Proxy::all(proxy.clone())?);
    }
    Ok(HttpClient {
        client: builder.build()?,
        egress,
    })
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

    /// An attempt the egress policy refused: no connection was made.
    fn egress(started_at: DateTime<Utc>, duration: Duration, refused: &EgressRefused) -> Self {
        Self {
            sent: false,
            started_at,
            duration,
            status: None,
            retry_after: None,
            excerpt: Vec::new(),
            error: Some((
                ErrorClass::Egress,
                truncate(format!("refused by the egress policy: {refused}")),
            )),
        }
    }
}

/// POSTs `body` to `url` and reads at most [`RESPONSE_EXCERPT_LIMIT`] bytes of the answer,
/// in an `http.attempt` span.
pub(crate) async fn post(
    client: &HttpClient,
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
    client: &HttpClient,
    url: Url,
    headers: HeaderMap,
    body: Vec<u8>,
    started_at: DateTime<Utc>,
) -> Exchange {
    let clock = Instant::now();
    if let Err(refused) = client.egress.check_literal(&url) {
        return Exchange::egress(started_at, clock.elapsed(), &refused);
    }
    let sent = client
        .client
        .post(url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => {
            if let Some(refused) = egress_refusal(&e) {
                return Exchange::egress(started_at, clock.elapsed(), &refused);
            }
            let class = classify(&e);
            return Exchange {
                sent: true,
                started_at,
                duration: clock.elapsed(),
                status: None,
                retry_after: None,
                excerpt: Vec::new(),
                error: Some((class, describe(class, &e))),
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    let (excerpt, body_error) = read_excerpt(&mut response).await;
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
            format!(
                "HTTP {status}; reading the body failed: {}",
                describe(class, &e)
            ),
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

/// At most [`RESPONSE_EXCERPT_LIMIT`] bytes of the answer's body, read chunk by chunk so a
/// huge answer is never buffered (dropping the rest closes the connection, which only
/// costs a reconnect), and the error that cut it short, if any.
async fn read_excerpt(response: &mut reqwest::Response) -> (Vec<u8>, Option<reqwest::Error>) {
    let mut excerpt = Vec::new();
    while excerpt.len() < RESPONSE_EXCERPT_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_EXCERPT_LIMIT - excerpt.len();
                excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) => break,
            Err(e) => return (excerpt, Some(e)),
        }
    }
    (excerpt, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use hookline_egress::{EgressPolicy, ScriptedLookup, parse_range};
    use hookline_testkit::CountingListener;
    use tokio::net::{TcpListener, TcpStream};

    /// Reads a request head; `None` if the client went away first.
    async fn read_head(socket: &mut TcpStream) -> Option<Vec<u8>> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        Some(head)
    }

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
                    if read_head(&mut socket).await.is_none() {
                        return;
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

    /// Loopback receivers are allowed by name: the tests' own servers.
    fn loopback() -> Egress {
        let allow = vec![parse_range("127.0.0.1").unwrap()];
        Egress::system(EgressPolicy::new(allow, vec![]))
    }

    fn client(timeout_ms: u64) -> HttpClient {
        client_with(Duration::from_millis(timeout_ms), loopback(), None)
    }

    /// A client with no extra roots and no client certificate.
    fn client_with(timeout: Duration, egress: Egress, proxy: Option<&Url>) -> HttpClient {
        let cfg = DispatcherConfig {
            request_timeout: timeout,
            egress,
            egress_proxy: proxy.cloned(),
            ..DispatcherConfig::default()
        };
        build_client(&cfg, &[], None).unwrap()
    }

    async fn send(client: &HttpClient, url: Url) -> Exchange {
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

    #[tokio::test]
    async fn a_refused_literal_address_gets_no_connection() {
        let listener = CountingListener::bind("127.0.0.1:0").await;
        let addr = listener.addr;
        let default = client_with(Duration::from_secs(5), Egress::default(), None);
        for text in [
            format!("http://{addr}/"),
            format!("http://[::ffff:127.0.0.1]:{}/", addr.port()),
            format!("http://2130706433:{}/", addr.port()),
        ] {
            let exchange = send(&default, Url::parse(&text).unwrap()).await;
            let (class, message) = exchange.error.clone().unwrap();
            assert_eq!(class, ErrorClass::Egress, "{text}: {exchange:?}");
            assert!(!exchange.sent);
            assert!(
                message.starts_with("refused by the egress policy"),
                "{message}"
            );
            assert!(
                message.contains("HOOKLINE_EGRESS_ALLOW=127.0.0.1/32"),
                "{message}"
            );
        }
        assert_eq!(listener.connections(), 0);
    }

    #[tokio::test]
    async fn a_name_is_connected_to_only_on_allowed_addresses() {
        let listener = CountingListener::bind("127.0.0.2:0").await;
        let addr = listener.addr;
        let lookup = Arc::new(ScriptedLookup::default());
        let allow = vec![parse_range("127.0.0.1").unwrap()];
        let egress = Egress::new(EgressPolicy::new(allow, vec![]), lookup.clone());
        let client = client_with(Duration::from_secs(5), egress, None);
        let url = Url::parse(&format!("http://rebind.test:{}/", addr.port())).unwrap();
        lookup.set("rebind.test", &["127.0.0.2".parse().unwrap()]);
        let exchange = send(&client, url.clone()).await;
        assert_eq!(
            exchange.error.as_ref().map(|e| e.0),
            Some(ErrorClass::Egress)
        );
        let message = &exchange.error.as_ref().unwrap().1;
        assert!(message.contains("rebind.test resolves to"), "{message}");
        // A refused address next to an allowed one is dropped, not tried.
        lookup.set(
            "rebind.test",
            &[
                "127.0.0.2".parse().unwrap(),
                "169.254.169.254".parse().unwrap(),
            ],
        );
        let exchange = send(&client, url).await;
        assert_eq!(
            exchange.error.as_ref().map(|e| e.0),
            Some(ErrorClass::Egress)
        );
        assert_eq!(listener.connections(), 0);
    }

    #[tokio::test]
    async fn a_redirect_to_a_refused_address_is_not_followed() {
        let listener = CountingListener::bind("127.0.0.2:0").await;
        let refused = listener.addr;
        let reply = format!(
            "HTTP/1.1 302 Found\r\nlocation: http://{refused}/\r\ncontent-length: 0\r\n\r\n"
        );
        let url = raw_server(Some(reply.leak().as_bytes()), false).await;
        let exchange = send(&client(5_000), url).await;
        assert_eq!(exchange.status, Some(StatusCode::FOUND));
        assert_eq!(listener.connections(), 0);
    }

    #[tokio::test]
    async fn requests_go_through_the_egress_proxy_and_literals_are_still_checked() {
        // A stand-in proxy on loopback: records request lines, answers 200.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = lines.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut socket).await else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&head);
                    let first = text.lines().next().unwrap_or_default().to_string();
                    seen.lock().unwrap().push(first);
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        // The default policy refuses loopback, but the operator's proxy is exempt.
        let proxy = Url::parse(&format!("http://localhost:{port}")).unwrap();
        let client = client_with(Duration::from_secs(5), Egress::default(), Some(&proxy));
        let exchange = send(&client, Url::parse("http://hooks.example/hook").unwrap()).await;
        assert_eq!(exchange.status, Some(StatusCode::OK), "{exchange:?}");
        let refused = send(&client, Url::parse("http://10.0.0.1/hook").unwrap()).await;
        assert_eq!(refused.error.map(|e| e.0), Some(ErrorClass::Egress));
        assert_eq!(
            *lines.lock().unwrap(),
            ["POST http://hooks.example/hook HTTP/1.1"]
        );
    }

    #[tokio::test]
    async fn connection_failures_read_the_same_whatever_answered() {
        // Nothing listening.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nothing = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        // Something that closes without answering, and something that is not HTTP.
        let closes = raw_server(Some(b""), false).await;
        let garbage = raw_server(Some(b"SSH-2.0-OpenSSH_9.6\r\n"), false).await;
        let mut messages = Vec::new();
        for url in [nothing, closes, garbage] {
            let exchange = send(&client(5_000), url).await;
            let (class, message) = exchange.error.unwrap();
            assert_eq!(class, ErrorClass::Connect);
            messages.push(message);
        }
        assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");
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
}
