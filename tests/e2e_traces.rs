//! Traces end to end: the real `hookline serve` exporting over OTLP/gRPC to an in-process
//! collector (a tonic server implementing the OTLP trace service), a publish that carries
//! the caller's W3C `traceparent` in its gRPC metadata, and a real local receiver.
//!
//! One publish must come out as one trace, the caller's, whose spans chain ingest →
//! queue → dispatcher → HTTP attempt; a retry must be a trace of its own that links back
//! to the publish. Waits are on deadlines (the collector and the receiver notify), never
//! on sleeps.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, Server, authed};
use tokio::sync::Notify;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

/// The caller's trace, sent in the publish's gRPC metadata.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

// ---------------------------------------------------------------------------------------------
// An in-process OTLP collector
// ---------------------------------------------------------------------------------------------

/// One exported span, flattened for assertions; ids in lower-case hex.
#[derive(Debug, Clone)]
struct Collected {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
    attributes: BTreeMap<String, String>,
}

impl Collected {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map(String::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct Collector {
    spans: Mutex<Vec<Collected>>,
    notify: Notify,
}

#[derive(Clone)]
struct CollectorService(Arc<Collector>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

#[tonic::async_trait]
impl TraceService for CollectorService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Collected {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    attributes: attributes(&span.attributes),
                });
            }
        }
        self.0.spans.lock().unwrap().extend(got);
        self.0.notify.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the collector on 127.0.0.1:0; returns it and its endpoint URL.
    async fn start() -> (Arc<Collector>, String) {
        let collector = Arc::new(Collector::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().expect("collector address");
        let service = TraceServiceServer::new(CollectorService(collector.clone()));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (collector, format!("http://{addr}"))
    }

    /// Waits until `find` finds what it looks for in the spans collected so far, or panics
    /// after [`WAIT`] naming `what` and listing what did arrive.
    async fn wait_for<T>(&self, what: &str, find: impl Fn(&[Collected]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            let spans = self.spans.lock().unwrap().clone();
            if let Some(found) = find(&spans) {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let names: Vec<String> = spans
                    .iter()
                    .map(|s| format!("{} ({}/{})", s.name, s.trace_id, s.span_id))
                    .collect();
                panic!("timed out after {WAIT:?} waiting for {what}; spans: {names:#?}");
            }
        }
    }
}

/// The span named `name` in trace `trace_id` for which `also` holds.
fn find<'a>(
    spans: &'a [Collected],
    name: &str,
    trace_id: &str,
    also: impl Fn(&Collected) -> bool,
) -> Option<&'a Collected> {
    spans
        .iter()
        .find(|s| s.name == name && s.trace_id == trace_id && also(s))
}

/// The names of the spans from `span` up to its trace's root (or a parent not collected).
fn ancestry(spans: &[Collected], span: &Collected) -> Vec<String> {
    let mut names = vec![span.name.clone()];
    let mut parent = span.parent_span_id.clone();
    while let Some(p) = spans
        .iter()
        .find(|s| s.span_id == parent && s.trace_id == span.trace_id)
    {
        names.push(p.name.clone());
        parent = p.parent_span_id.clone();
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The pipeline under test
// ---------------------------------------------------------------------------------------------

struct Traced {
    env: Env,
    server: Server,
    collector: Arc<Collector>,
    receiver: Receiver,
    admin: String,
    tenant: String,
    registry: RegistryServiceClient<Channel>,
    ingest: IngestServiceClient<Channel>,
}

impl Traced {
    /// Exporting every 100 ms.
    async fn start(backend: Backend) -> Traced {
        Self::start_with(backend, "100").await
    }

    /// Exporting every `schedule_delay_ms`.
    async fn start_with(backend: Backend, schedule_delay_ms: &str) -> Traced {
        let (collector, endpoint) = Collector::start().await;
        let env = Env::with(backend).await;
        let admin = env.admin_key().await;
        let server = env
            .serve_with(
                "all",
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                    ("OTEL_BSP_SCHEDULE_DELAY", schedule_delay_ms),
                    ("HOOKLINE_RETRY_POLL_INTERVAL_MS", "50"),
                    ("HOOKLINE_REQUEST_TIMEOUT_MS", "5000"),
                ],
            )
            .await;
        let channel = Channel::from_shared(server.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut registry = RegistryServiceClient::new(channel.clone());
        let tenant = registry
            .create_tenant(authed(
                pb::CreateTenantRequest {
                    name: "acme".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .id;
        Traced {
            env,
            server,
            collector,
            receiver: Receiver::start().await,
            admin,
            tenant,
            registry,
            ingest: IngestServiceClient::new(channel),
        }
    }

    /// A subscription to receiver endpoint `name` retrying after 100 ms; returns its URL.
    async fn subscribe(&mut self, name: &str, behavior: Behavior) -> String {
        let url = self.receiver.endpoint(name, behavior);
        let created = self
            .registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: self.tenant.clone(),
                        url: url.clone(),
                        retry_policy: Some(pb::RetryPolicy {
                            schedule: vec![prost_types::Duration {
                                seconds: 0,
                                nanos: 100_000_000,
                            }],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        self.receiver.set_secret(name, &created.secret);
        url
    }

    /// Publishes one `invoice.paid` event as a caller in trace [`TRACE_ID`] would.
    async fn publish(&mut self) -> pb::PublishResponse {
        let mut req = authed(
            pb::PublishRequest {
                tenant_id: self.tenant.clone(),
                event_type: "invoice.paid".into(),
                payload: br#"{"amount":1299}"#.to_vec(),
                ..Default::default()
            },
            &self.admin,
        );
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
                .parse()
                .expect("ascii traceparent"),
        );
        self.ingest.publish(req).await.unwrap().into_inner()
    }

    async fn finish(self) {
        let status = self.server.terminate().await;
        assert!(status.success(), "hookline exited with {status}");
        self.env.finish().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// One publish is one trace, the caller's: ingest.publish (child of the caller's span) →
/// queue.publish → dispatcher.deliver → http.attempt, with the attributes a trace viewer
/// shows.
async fn one_publish_is_one_trace_from_ingest_to_the_receivers_answer(backend: Backend) {
    let mut t = Traced::start(backend).await;
    let url = t.subscribe("traced", Behavior::Ok).await;
    let published = t.publish().await;
    assert_eq!(published.deliveries_created, 1);
    t.receiver
        .wait_for("traced", WAIT, "the delivery", |r| !r.is_empty())
        .await;

    let (publish, deliver, attempt, spans) = t
        .collector
        .wait_for(
            "ingest, dispatcher and HTTP attempt spans in the caller's trace",
            |spans| {
                let publish = find(spans, "ingest.publish", TRACE_ID, |_| true)?;
                // The delivery span ends once its outcome is recorded: then it has one.
                let deliver = find(spans, "dispatcher.deliver", TRACE_ID, |s| {
                    !s.attr("outcome").is_empty()
                })?;
                let attempt = find(spans, "http.attempt", TRACE_ID, |_| true)?;
                Some((
                    publish.clone(),
                    deliver.clone(),
                    attempt.clone(),
                    spans.to_vec(),
                ))
            },
        )
        .await;

    // Every span of the publish is in the caller's trace, from Hookline.
    assert_eq!(publish.parent_span_id, CALLER_SPAN_ID, "{publish:#?}");
    for span in [&publish, &deliver, &attempt] {
        assert_eq!(span.service, "hookline", "{span:#?}");
    }
    assert_eq!(attempt.parent_span_id, deliver.span_id, "{attempt:#?}");
    assert_eq!(
        ancestry(&spans, &attempt),
        [
            "http.attempt",
            "dispatcher.deliver",
            "queue.publish",
            "ingest.publish"
        ],
        "{spans:#?}"
    );

    // What each says.
    assert_eq!(publish.attr("tenant_id"), t.tenant);
    assert_eq!(publish.attr("event_type"), "invoice.paid");
    assert_eq!(publish.attr("events"), "1");
    assert_eq!(publish.attr("deliveries_created"), "1");
    assert_eq!(publish.attr("rpc.method"), "Publish");
    assert_eq!(deliver.attr("attempt"), "1");
    assert_eq!(deliver.attr("outcome"), "succeeded");
    assert_eq!(deliver.attr("event_id"), published.event_id);
    assert_eq!(attempt.attr("http.request.method"), "POST");
    assert_eq!(attempt.attr("url.full"), url);
    assert_eq!(attempt.attr("http.response.status_code"), "200");
    assert_eq!(attempt.attr("error.type"), "");
    t.finish().await;
}

/// A receiver that fails once: the first attempt is in the publish's trace with its
/// error, and the retry is a trace of its own whose delivery span links to the publish.
async fn a_retry_is_a_trace_of_its_own_linked_to_the_publish(backend: Backend) {
    let mut t = Traced::start(backend).await;
    t.subscribe("flaky", Behavior::FailTimes(1, 500)).await;
    t.publish().await;
    t.receiver
        .wait_for("flaky", WAIT, "the retry", |r| r.len() >= 2)
        .await;

    let (publish, first, retry, retry_attempt) = t
        .collector
        .wait_for("the first attempt and the retry", |spans| {
            let publish = find(spans, "ingest.publish", TRACE_ID, |_| true)?;
            let first = find(spans, "dispatcher.deliver", TRACE_ID, |s| {
                s.attr("attempt") == "1" && !s.attr("outcome").is_empty()
            })?;
            let retry = spans.iter().find(|s| {
                s.name == "dispatcher.deliver"
                    && s.attr("attempt") == "2"
                    && !s.attr("outcome").is_empty()
            })?;
            let retry_attempt = spans
                .iter()
                .find(|s| s.name == "http.attempt" && s.parent_span_id == retry.span_id)?;
            Some((
                publish.clone(),
                first.clone(),
                retry.clone(),
                retry_attempt.clone(),
            ))
        })
        .await;

    assert_eq!(first.attr("outcome"), "retry");
    let failed_attempt = t
        .collector
        .wait_for("the failed attempt", |spans| {
            find(spans, "http.attempt", TRACE_ID, |s| {
                s.parent_span_id == first.span_id
            })
            .cloned()
        })
        .await;
    assert_eq!(failed_attempt.attr("http.response.status_code"), "500");
    assert_eq!(failed_attempt.attr("error.type"), "500");

    assert_ne!(
        retry.trace_id, TRACE_ID,
        "the retry must not grow the publish's trace"
    );
    assert_eq!(
        retry.parent_span_id, "",
        "the retry starts a trace: {retry:#?}"
    );
    assert!(
        retry
            .links
            .contains(&(TRACE_ID.to_string(), publish.span_id.clone())),
        "the retry links to the publish: {retry:#?}"
    );
    assert_eq!(retry.attr("outcome"), "succeeded");
    assert_eq!(retry_attempt.trace_id, retry.trace_id);
    assert_eq!(retry_attempt.attr("http.response.status_code"), "200");
    t.finish().await;
}

/// Spans still buffered when the process is told to stop are exported before it exits:
/// with a schedule delay of ten minutes, only the shutdown flush can send them.
async fn buffered_spans_are_exported_at_shutdown(backend: Backend) {
    let mut t = Traced::start_with(backend, "600000").await;
    t.subscribe("late", Behavior::Ok).await;
    t.publish().await;
    t.receiver
        .wait_for("late", WAIT, "the delivery", |r| !r.is_empty())
        .await;
    assert!(t.collector.spans.lock().unwrap().is_empty());
    let collector = t.collector.clone();
    // The delivery's span ends once its outcome is written, shortly after the receiver
    // answered; SIGTERM lets in-flight work finish first either way.
    t.finish().await;
    collector
        .wait_for("the publish's spans after shutdown", |spans| {
            find(spans, "ingest.publish", TRACE_ID, |_| true)?;
            find(spans, "http.attempt", TRACE_ID, |_| true).map(|_| ())
        })
        .await;
}

on_both_backends!(
    one_publish_is_one_trace_from_ingest_to_the_receivers_answer,
    a_retry_is_a_trace_of_its_own_linked_to_the_publish,
    buffered_spans_are_exported_at_shutdown,
);
