//! The REST/JSON API against the real binary with a plain HTTP client: tenant, API key,
//! subscription, publish, the webhook at a real receiver, deliveries listed page by page
//! and read back; errors as JSON with their gRPC code (400 naming the field, 401, 404,
//! 405, 429); the OpenAPI document served without a key.

#[macro_use]
mod support;

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

on_both_backends!(rest_api_drives_the_whole_flow);

/// A REST client with an optional Bearer key.
struct Rest {
    base: String,
    http: reqwest::Client,
}

impl Rest {
    fn of(server: &Server) -> Self {
        // reqwest is built without a crypto provider of its own (plain HTTP here).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Rest {
            base: server
                .rest
                .clone()
                .expect("the server printed its REST address"),
            http: reqwest::Client::new(),
        }
    }

    /// `method path` with `body` as JSON; the status and the JSON answer.
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.expect("REST request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, value)
    }

    async fn ok(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, Some(key), body).await;
        assert_eq!(status, 200, "{method} {path}: {value}");
        value
    }
}

fn rest_settings() -> [(&'static str, &'static str); 1] {
    [("HOOKLINE_REST_ADDR", "127.0.0.1:0")]
}

async fn rest_api_drives_the_whole_flow(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let server = env.serve_with("all", &rest_settings()).await;
    let rest = Rest::of(&server);
    let receiver = Receiver::start().await;

    let tenant = rest
        .ok(
            "POST",
            "/v1/tenants",
            &admin,
            Some(json!({ "name": "acme" })),
        )
        .await;
    let tenant_id = tenant["id"].as_str().unwrap().to_string();
    let got = rest
        .ok("GET", &format!("/v1/tenants/{tenant_id}"), &admin, None)
        .await;
    assert_eq!(got["name"], "acme");

    // The tenant's own key (snake_case field names are accepted as well as camelCase).
    let key = rest
        .ok(
            "POST",
            "/v1/api-keys",
            &admin,
            Some(json!({ "name": "app", "tenant_id": tenant_id })),
        )
        .await;
    let token = key["token"].as_str().unwrap().to_string();
    assert_eq!(key["apiKey"]["tenantId"], tenant_id.as_str());

    let url = receiver.endpoint("shop", Behavior::Ok);
    let created = rest
        .ok(
            "POST",
            &format!("/v1/tenants/{tenant_id}/subscriptions"),
            &token,
            Some(json!({ "subscription": { "url": url, "eventTypes": ["order.*"] } })),
        )
        .await;
    let subscription_id = created["subscription"]["id"].as_str().unwrap().to_string();
    assert!(
        created["secret"].as_str().unwrap().starts_with("whsec_"),
        "{created}"
    );
    receiver.set_secret("shop", created["secret"].as_str().unwrap());

    // Follow the tenant's deliveries (a server stream, one JSON object per line).
    let mut watch = rest
        .http
        .get(format!(
            "{}/v1/deliveries:watch?tenantId={tenant_id}",
            rest.base
        ))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    assert_eq!(watch.headers()["content-type"], "application/x-ndjson");

    for n in 0..3 {
        let payload = base64::engine::general_purpose::STANDARD.encode(format!("{{\"n\":{n}}}"));
        let published = rest
            .ok(
                "POST",
                &format!("/v1/tenants/{tenant_id}/events"),
                &token,
                Some(json!({ "eventType": "order.paid", "payload": payload })),
            )
            .await;
        assert_eq!(published["deliveriesCreated"], 1, "{published}");
    }
    let got = receiver
        .wait_for("shop", Duration::from_secs(30), "3 webhooks", |r| {
            r.len() >= 3
        })
        .await;
    assert!(got.iter().all(|r| r.verified), "signatures verify");

    let mut seen = String::new();
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        while !seen
            .lines()
            .any(|l| l.contains("DELIVERY_STATUS_SUCCEEDED"))
        {
            let chunk = watch
                .chunk()
                .await
                .unwrap()
                .expect("the watch stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(
        watched.is_ok(),
        "a succeeded delivery on the watch stream: {seen}"
    );
    let line = seen.lines().next().unwrap();
    let first: Value = serde_json::from_str(line).unwrap();
    assert_eq!(first["tenantId"], tenant_id.as_str(), "{line}");
    drop(watch);

    // Deliveries, two per page, then the last page without a token.
    let first = rest
        .ok(
            "GET",
            &format!("/v1/deliveries?tenantId={tenant_id}&pageSize=2"),
            &token,
            None,
        )
        .await;
    assert_eq!(first["deliveries"].as_array().unwrap().len(), 2, "{first}");
    let next = first["nextPageToken"]
        .as_str()
        .expect("a next page token")
        .to_string();
    let second = rest
        .ok(
            "GET",
            &format!("/v1/deliveries?tenant_id={tenant_id}&page_size=2&page_token={next}"),
            &token,
            None,
        )
        .await;
    assert_eq!(
        second["deliveries"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    assert!(second.get("nextPageToken").is_none(), "{second}");
    let delivery_id = second["deliveries"][0]["id"].as_str().unwrap().to_string();
    let one = rest
        .ok(
            "GET",
            &format!("/v1/deliveries/{delivery_id}"),
            &token,
            None,
        )
        .await;
    assert_eq!(one["delivery"]["subscriptionId"], subscription_id.as_str());

    check_errors(&rest, &token, &tenant_id, &delivery_id).await;
    check_openapi(&rest).await;

    server.terminate().await;
    env.finish().await;
}

/// 400 naming the field, 401, 404 (a record and a route), 405.
async fn check_errors(rest: &Rest, token: &str, tenant_id: &str, delivery_id: &str) {
    let (status, body) = rest
        .call(
            "POST",
            &format!("/v1/tenants/{tenant_id}/subscriptions"),
            Some(token),
            Some(json!({ "subscription": { "url": "ftp://example.com/x" } })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT", "{body}");
    assert_eq!(body["error"]["code"], 3, "{body}");
    assert!(
        body["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .ends_with("url"),
        "{body}"
    );

    let (status, body) = rest
        .call(
            "POST",
            "/v1/tenants",
            Some(token),
            Some(json!({ "name": 5 })),
        )
        .await;
    assert_eq!(status, 400, "a mistyped field: {body}");

    let (status, body) = rest
        .call("GET", "/v1/deliveries?status=BOGUS", Some(token), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["field"], "status",
        "a query parameter: {body}"
    );

    let (status, body) = rest.call("GET", "/v1/tenants", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED", "{body}");

    // A well-formed id that names nothing.
    let last = delivery_id.chars().last().unwrap();
    let other = format!(
        "{}{}",
        &delivery_id[..delivery_id.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let (status, body) = rest
        .call("GET", &format!("/v1/deliveries/{other}"), Some(token), None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["status"], "NOT_FOUND", "{body}");

    let (status, _) = rest
        .call("GET", "/v1/no-such-thing", Some(token), None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = rest.call("PUT", "/v1/tenants", Some(token), None).await;
    assert_eq!(status, 405);
}

/// The OpenAPI document is served without a key and lists the routes.
async fn check_openapi(rest: &Rest) {
    let (status, doc) = rest.call("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/tenants/{tenant_id}/events",
        "/v1/deliveries",
        "/v1/deliveries/{delivery_id}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
}

/// Calls with `key` until an answer is not 200 (or 20 s pass); that answer.
async fn spend_the_rate(rest: &Rest, key: &str) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = rest.call("GET", "/v1/tenants", Some(key), None).await;
        if status != 200 || tokio::time::Instant::now() > deadline {
            return (status, body);
        }
    }
}

/// A key over its request rate is answered 429 with the gRPC code, like over gRPC.
#[tokio::test]
async fn rest_rate_limit_is_429() {
    let env = Env::with(Backend::Embedded).await;
    let admin = env.admin_key().await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_REST_ADDR", "127.0.0.1:0"),
                ("HOOKLINE_KEY_REQUESTS_PER_SECOND", "2"),
            ],
        )
        .await;
    let rest = Rest::of(&server);
    let (status, body) = spend_the_rate(&rest, &admin).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED", "{body}");
    server.terminate().await;
    env.finish().await;
}

/// Beyond `rest_max_connections` a new connection is closed at once; once one closes,
/// the next is served.
#[tokio::test]
async fn rest_connections_are_capped() {
    let env = Env::with(Backend::Embedded).await;
    env.admin_key().await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_REST_ADDR", "127.0.0.1:0"),
                ("HOOKLINE_REST_MAX_CONNECTIONS", "1"),
            ],
        )
        .await;
    let rest = Rest::of(&server);
    let addr = rest.base.trim_start_matches("http://").to_string();
    // One keep-alive connection, answered once, so the server surely holds it.
    let mut held = tokio::net::TcpStream::connect(&addr).await.unwrap();
    held.write_all(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    held.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let url = format!("{}/v1/openapi.json", rest.base);
    let refused = rest.http.get(&url).send().await;
    assert!(
        refused.is_err(),
        "a second connection is closed: {refused:?}"
    );
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let served = rest.http.get(&url).send().await;
        if served.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "served once the held connection closed"
        );
        // Polls the condition (the server noticing the close) until the deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.terminate().await;
    env.finish().await;
}

/// A request without a valid key is answered from its headers: its body (here 300 MiB
/// announced, none sent) is never read, so it costs the server no memory.
#[tokio::test]
async fn a_request_without_a_key_is_refused_before_its_body_is_read() {
    let env = Env::with(Backend::Embedded).await;
    env.admin_key().await;
    let server = env.serve_with("all", &rest_settings()).await;
    let rest = Rest::of(&server);
    let addr = rest.base.trim_start_matches("http://").to_string();
    for auth in ["", "authorization: Bearer hl_not-a-key\r\n"] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/tenants HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
             {auth}content-length: {}\r\n\r\n",
            300 * 1024 * 1024
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut status = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut status))
            .await
            .expect("answered without the body")
            .unwrap();
        assert_eq!(&status, b"HTTP/1.1 401", "with {auth:?}");
    }
    server.terminate().await;
    env.finish().await;
}

/// A key over its request rate is refused from the headers too: the REST API admits the
/// caller (key and rate) once, before reading the body, so an over-rate key's body
/// (here 300 MiB announced, none sent) is never read.
#[tokio::test]
async fn an_over_rate_key_is_refused_before_its_body_is_read() {
    let env = Env::with(Backend::Embedded).await;
    let admin = env.admin_key().await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_REST_ADDR", "127.0.0.1:0"),
                ("HOOKLINE_KEY_REQUESTS_PER_SECOND", "1"),
            ],
        )
        .await;
    let rest = Rest::of(&server);
    let addr = rest.base.trim_start_matches("http://").to_string();
    // Spend the key's one-request burst; the next cell is a second away.
    let (status, body) = spend_the_rate(&rest, &admin).await;
    assert_eq!(status, 429, "{body}");
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
         authorization: Bearer {admin}\r\ncontent-length: {}\r\n\r\n",
        300 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut status = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut status))
        .await
        .expect("answered without the body")
        .unwrap();
    assert_eq!(&status, b"HTTP/1.1 429");
    server.terminate().await;
    env.finish().await;
}
