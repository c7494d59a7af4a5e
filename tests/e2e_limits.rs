//! Limits before authentication and on every connection, against the real binary: a
//! 300 MiB call without a key is refused unread (the server's RSS barely moves), method
//! size limits with exact byte counts, malformed protobuf, the first-request deadline,
//! the connection cap, HTTP/2 stream cap, the per-key request rate, the per-key cap on
//! open streams, and streams that end when their key is revoked or tenant deleted.

#[macro_use]
mod support;

use std::future::{Future, poll_fn};
use std::time::Duration;

use bytes::Bytes;
use hookline_proto::v1 as pb;
use hookline_proto::v1::delivery_service_client::DeliveryServiceClient;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::{Backend, Env, Server, authed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic_types::StatusExt;

const MIB: usize = 1024 * 1024;
/// How long a test waits for what it expects before failing.
const PATIENCE: Duration = Duration::from_secs(30);

fn addr(server: &Server) -> String {
    server.grpc.trim_start_matches("http://").to_string()
}

/// A line of /proc/<pid>/status in bytes: `VmRSS` (resident now) or `VmHWM` (peak).
fn proc_status_bytes(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib * 1024
}

/// Resets the peak (`VmHWM`) to the current resident size.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
}

/// An HTTP/2 connection speaking raw gRPC frames.
async fn h2_connect(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.expect("h2 ready")
}

fn grpc_request(addr: &str, path: &str, token: Option<&str>) -> http::Request<()> {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(()).expect("request")
}

/// The `grpc-status` and `grpc-message` of a response (trailers-only or with trailers).
async fn grpc_outcome(response: h2::client::ResponseFuture) -> (String, String) {
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("an answer in time")
        .expect("a response");
    let pick = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|s| {
            let message = h
                .get("grpc-message")
                .map(|m| percent_decoded(m.to_str().unwrap_or_default()))
                .unwrap_or_default();
            (s.to_str().unwrap_or_default().to_string(), message)
        })
    };
    if let Some(outcome) = pick(response.headers()) {
        return outcome;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").expect("some");
    pick(&trailers).expect("grpc-status in the trailers")
}

/// `grpc-message` is percent-encoded on the wire.
fn percent_decoded(raw: &str) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
        } else {
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One call whose body is `message`, framed as gRPC.
async fn raw_call(addr: &str, path: &str, token: &str, message: &[u8]) -> (String, String) {
    let mut client = h2_connect(addr).await;
    let (response, mut stream) = client
        .send_request(grpc_request(addr, path, Some(token)), false)
        .expect("send");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    stream.send_data(frame.into(), true).expect("send body");
    grpc_outcome(response).await
}

/// Whether the server closes `tcp` (EOF or reset) before `PATIENCE` runs out.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // the server's SETTINGS and the like
            }
        }
    })
    .await
    .is_ok()
}

/// Sends a `PublishBatch` of 300 MiB (flow control permitting) and returns its status,
/// message, and how far the server's peak RSS rose above its RSS before the call.
async fn publish_300_mib(addr: &str, pid: u32, token: Option<&str>) -> (String, String, usize) {
    reset_peak(pid);
    let before = proc_status_bytes(pid, "VmRSS");
    let mut client = h2_connect(addr).await;
    let (response, mut stream) = client
        .send_request(
            grpc_request(addr, "/hookline.v1.IngestService/PublishBatch", token),
            false,
        )
        .expect("send");
    let total = 300 * MIB;
    let mut sender = tokio::spawn(async move {
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(total as u32).to_be_bytes());
        if stream.send_data(prefix.into(), false).is_err() {
            return 0;
        }
        let chunk = Bytes::from(vec![0x0au8; 64 * 1024]);
        let mut sent = 0;
        while sent < total {
            stream.reserve_capacity(chunk.len());
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {
                    if stream.send_data(chunk.slice(..n), false).is_err() {
                        break;
                    }
                    sent += n;
                }
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
        sent
    });
    let (code, message) = grpc_outcome(response).await;
    let grown = proc_status_bytes(pid, "VmHWM").saturating_sub(before);
    let sent = match tokio::time::timeout(PATIENCE, &mut sender).await {
        Ok(sent) => sent.unwrap_or_default(),
        Err(_) => {
            sender.abort();
            0
        }
    };
    eprintln!("peak RSS grew by {grown} bytes; the client got {sent} bytes of 300 MiB out");
    (code, message, grown)
}

#[tokio::test]
async fn a_300_mib_call_is_refused_unread() {
    let env = Env::with(Backend::Embedded).await;
    let admin = env.admin_key().await;
    let server = env.serve("all").await;
    let pid = server.child.id().expect("pid");
    let addr = addr(&server);
    // Warm up: one refused call, so first-use allocations are in the baseline.
    let (code, _) = raw_call(&addr, "/hookline.v1.IngestService/PublishBatch", "x", b"").await;
    assert_eq!(code, "16");

    let (code, message, grown) = publish_300_mib(&addr, pid, None).await;
    assert!(
        grown < 20 * MIB,
        "the server's peak RSS grew by {grown} bytes refusing a 300 MiB call without a key"
    );
    assert_eq!(code, "16", "UNAUTHENTICATED expected, got {message}");
    assert!(message.contains("authorization"), "{message}");

    // With a key, the length prefix is over PublishBatch's limit: refused unread too.
    let (code, message, grown) = publish_300_mib(&addr, pid, Some(&admin)).await;
    assert!(
        grown < 20 * MIB,
        "the server's peak RSS grew by {grown} bytes refusing a 300 MiB call with a key"
    );
    assert_eq!(code, "3", "INVALID_ARGUMENT expected, got {message}");
    assert_eq!(
        message,
        "the PublishBatch request message is 314,572,800 bytes; the limit is 16,777,216 bytes \
         (setting publish_batch_max_bytes)"
    );
    server.terminate().await;
    env.finish().await;
}

#[tokio::test]
async fn each_method_has_its_message_limit_and_bad_protobuf_is_invalid_argument() {
    let env = Env::with(Backend::Embedded).await;
    let admin = env.admin_key().await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_MAX_PAYLOAD_BYTES", "1024"),
                ("HOOKLINE_PUBLISH_BATCH_MAX_BYTES", "100000"),
            ],
        )
        .await;
    let addr = addr(&server);
    let mut ingest = IngestServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let big_event = |bytes: usize| pb::PublishRequest {
        tenant_id: "ten_x".into(),
        event_type: "a.b".into(),
        payload: format!("\"{}\"", "x".repeat(bytes)).into_bytes(),
        ..Default::default()
    };

    let err = ingest
        .publish(authed(big_event(70 * 1024), &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("the limit is 66,560 bytes (setting max_payload_bytes)"),
        "{}",
        err.message()
    );

    let batch = pb::PublishBatchRequest {
        events: (0..3).map(|_| big_event(40_000)).collect(),
    };
    let err = ingest
        .publish_batch(authed(batch, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("the limit is 100,000 bytes (setting publish_batch_max_bytes)"),
        "{}",
        err.message()
    );

    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let name = "n".repeat(MIB);
    let err = registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        "the request message is 1,048,580 bytes; the limit is 1,048,576 bytes"
    );

    // A field tag of 0 is never valid protobuf.
    let (code, message) = raw_call(
        &addr,
        "/hookline.v1.RegistryService/CreateTenant",
        &admin,
        &[0x00, 0x01, 0xff],
    )
    .await;
    assert_eq!(code, "3", "INVALID_ARGUMENT expected, got {message}");
    assert!(
        message.contains("message is not a valid CreateTenantRequest"),
        "{message}"
    );
    server.terminate().await;
    env.finish().await;
}

#[tokio::test]
async fn connections_without_a_complete_request_are_closed_after_the_deadline() {
    let env = Env::with(Backend::Embedded).await;
    let admin = env.admin_key().await;
    let server = env
        .serve_with("all", &[("HOOKLINE_GRPC_FIRST_REQUEST_TIMEOUT_MS", "1000")])
        .await;
    let addr = addr(&server);

    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut preface_only = TcpStream::connect(&addr).await.unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // Headers with a valid key, and a body that never comes.
    let headers_only = TcpStream::connect(&addr).await.unwrap();
    let (client, connection) = h2::client::handshake(headers_only).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (_response, _stream) = client
        .send_request(
            grpc_request(
                &addr,
                "/hookline.v1.RegistryService/ListTenants",
                Some(&admin),
            ),
            false,
        )
        .unwrap();

    assert!(closed_by_server(&mut silent).await, "silent connection");
    assert!(closed_by_server(&mut preface_only).await, "preface only");
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(ended.is_ok(), "headers without a body");

    // A connection that completes a request keeps working past the deadline.
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let list = || authed(pb::ListTenantsRequest::default(), &admin);
    registry.list_tenants(list()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await; // outlive the deadline
    registry.list_tenants(list()).await.unwrap();
    server.terminate().await;
    env.finish().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_streams_per_connection_capped() {
    let env = Env::with(Backend::Embedded).await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_GRPC_MAX_CONNECTIONS", "3"),
                ("HOOKLINE_GRPC_MAX_CONCURRENT_STREAMS", "7"),
            ],
        )
        .await;
    let addr = addr(&server);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    // Accepted by the kernel, then closed by Hookline at once.
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    assert!(closed_by_server(&mut fourth).await, "the fourth connection");

    // Once one closes, a new connection is served, and it announces the stream cap.
    held.pop();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let max_streams = loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut client = h2_connect(&addr).await;
            let (response, _stream) = client
                .send_request(
                    grpc_request(&addr, "/grpc.health.v1.Health/Check", None),
                    true,
                )
                .ok()?;
            let answered = response.await.ok()?;
            answered
                .status()
                .is_success()
                .then(|| client.current_max_send_streams())
        })
        .await;
        if let Ok(Some(n)) = attempt {
            break n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection served"
        );
    };
    assert_eq!(max_streams, 7);
    drop(held);
    server.terminate().await;
    env.finish().await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    let env = Env::with(Backend::Embedded).await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_GRPC_KEEPALIVE_INTERVAL_MS", "200"),
                ("HOOKLINE_GRPC_KEEPALIVE_TIMEOUT_MS", "200"),
            ],
        )
        .await;
    let addr = addr(&server);
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // One complete call (which lifts the first-request deadline), driving the connection.
    // A clone makes the call; `client` stays, or dropping it would close the connection.
    let call = async {
        let mut client = client.clone().ready().await.unwrap();
        let (response, mut body) = client
            .send_request(
                grpc_request(&addr, "/grpc.health.v1.Health/Check", None),
                false,
            )
            .unwrap();
        // An empty HealthCheckRequest: a zero-length message.
        body.send_data(Bytes::from_static(&[0; 5]), true).unwrap();
        grpc_outcome(response).await
    };
    tokio::select! {
        (code, message) = call => assert_eq!(code, "0", "{message}"),
        ended = &mut connection => panic!("connection ended during the call: {ended:?}"),
    }
    // Now the client stops reading, so the server's pings go unanswered...
    tokio::time::sleep(Duration::from_secs(2)).await;
    // ...and once it reads again it finds the connection closed.
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(
        ended.is_ok(),
        "the server kept a silent peer's connection open"
    );
    drop(client);
    server.terminate().await;
    env.finish().await;
}

#[tokio::test]
async fn each_key_has_a_request_rate() {
    let env = Env::with(Backend::Embedded).await;
    let admin = env.admin_key().await;
    let other = env.admin_key().await;
    let server = env
        .serve_with("all", &[("HOOKLINE_KEY_REQUESTS_PER_SECOND", "5")])
        .await;
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let list = |key: &str| authed(pb::ListTenantsRequest::default(), key);
    let mut refused = None;
    for _ in 0..50 {
        if let Err(status) = registry.list_tenants(list(&admin)).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the 5/s rate refuses within 50 calls");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("key_requests_per_second"),
        "{}",
        status.message()
    );
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    let wait = retry.retry_delay.expect("a delay");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // Another key is not affected.
    registry.list_tenants(list(&other)).await.unwrap();
    server.terminate().await;
    env.finish().await;
}

/// A tenant and a key for it, made with the admin key.
async fn tenant_with_key(
    registry: &mut RegistryServiceClient<tonic::transport::Channel>,
    admin: &str,
) -> (String, String, String) {
    let tenant = registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let key = registry
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                name: "watcher".into(),
                tenant_id: tenant.id.clone(),
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let key_id = key.api_key.expect("api key").id;
    (tenant.id, key_id, key.token)
}

fn watch(tenant: &str, token: &str) -> tonic::Request<pb::WatchDeliveriesRequest> {
    authed(
        pb::WatchDeliveriesRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        },
        token,
    )
}

/// The next item of a watch, waited for with patience.
async fn next_of(
    stream: &mut tonic::Streaming<pb::Delivery>,
) -> Result<Option<pb::Delivery>, tonic::Status> {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream ends in time")
}

async fn open_streams_per_key_are_capped(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let server = env
        .serve_with("all", &[("HOOKLINE_KEY_MAX_WATCH_STREAMS", "2")])
        .await;
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let (tenant, _, token) = tenant_with_key(&mut registry, &admin).await;
    let mut deliveries = DeliveryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let first = deliveries
        .watch_deliveries(watch(&tenant, &token))
        .await
        .unwrap();
    let second = deliveries
        .watch_deliveries(watch(&tenant, &token))
        .await
        .unwrap();
    let err = deliveries
        .watch_deliveries(watch(&tenant, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("key_max_watch_streams"),
        "{}",
        err.message()
    );
    // The admin key has streams of its own.
    deliveries
        .watch_deliveries(watch(&tenant, &admin))
        .await
        .unwrap();
    // Closing one frees its slot (the server notices asynchronously).
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(err) = deliveries.watch_deliveries(watch(&tenant, &token)).await {
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(second);
    server.terminate().await;
    env.finish().await;
}

/// The clients of one test: the registry and the delivery API (maybe on two processes).
struct Clients {
    admin: String,
    registry: RegistryServiceClient<tonic::transport::Channel>,
    deliveries: DeliveryServiceClient<tonic::transport::Channel>,
}

impl Clients {
    async fn connect(admin: String, registry: &Server, deliveries: &Server) -> Self {
        Self {
            admin,
            registry: RegistryServiceClient::connect(registry.grpc.clone())
                .await
                .unwrap(),
            deliveries: DeliveryServiceClient::connect(deliveries.grpc.clone())
                .await
                .unwrap(),
        }
    }

    /// Opens a watch with a new tenant key, does `end` with the tenant and key ids, and
    /// returns how the watch ended.
    async fn watch_until<F, Fut>(&mut self, end: F) -> tonic::Status
    where
        F: FnOnce(RegistryServiceClient<tonic::transport::Channel>, String, String, String) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (tenant, key_id, token) = tenant_with_key(&mut self.registry, &self.admin).await;
        let mut stream = self
            .deliveries
            .watch_deliveries(watch(&tenant, &token))
            .await
            .unwrap()
            .into_inner();
        end(self.registry.clone(), self.admin.clone(), tenant, key_id).await;
        let ended = next_of(&mut stream).await.unwrap_err();
        assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
        ended
    }
}

async fn revoke(
    mut registry: RegistryServiceClient<tonic::transport::Channel>,
    admin: String,
    _tenant: String,
    api_key_id: String,
) {
    registry
        .revoke_api_key(authed(pb::RevokeApiKeyRequest { api_key_id }, &admin))
        .await
        .unwrap();
}

async fn delete_tenant(
    mut registry: RegistryServiceClient<tonic::transport::Channel>,
    admin: String,
    tenant_id: String,
    _key: String,
) {
    registry
        .delete_tenant(authed(pb::DeleteTenantRequest { tenant_id }, &admin))
        .await
        .unwrap();
}

async fn streams_end_when_their_key_is_revoked_or_tenant_deleted(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let server = env.serve("all").await;
    let mut clients = Clients::connect(admin, &server, &server).await;
    let ended = clients.watch_until(revoke).await;
    assert!(ended.message().contains("revoked"), "{}", ended.message());
    clients.watch_until(delete_tenant).await;
    server.terminate().await;
    env.finish().await;
}

/// The registry and the delivery API in separate processes: the revocation reaches the
/// stream through the change stream (RabbitMQ), not through a shared cache.
#[tokio::test]
async fn a_stream_ends_when_its_key_is_revoked_in_another_process() {
    let env = Env::with(Backend::Distributed).await;
    let admin = env.admin_key().await;
    let registry_server = env.serve("registry").await;
    let delivery_server = env.serve("retry").await;
    let mut clients = Clients::connect(admin, &registry_server, &delivery_server).await;
    clients.watch_until(revoke).await;
    clients.watch_until(delete_tenant).await;
    registry_server.terminate().await;
    delivery_server.terminate().await;
    env.finish().await;
}

on_both_backends!(
    open_streams_per_key_are_capped,
    streams_end_when_their_key_is_revoked_or_tenant_deleted,
);
