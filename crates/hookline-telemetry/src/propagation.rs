//! W3C trace context in and out of the places where Hookline's work changes hands.
//!
//! A trace starts (or continues a caller's) in ingest from the gRPC metadata of `Publish`
//! ([`extract_grpc`]), crosses the queue in the message headers that the outbox writes
//! ([`inject_current`]) and the dispatcher reads ([`extract`]), and, for work queued again
//! later from the database (retries, manual retries, relayed messages), is kept as a
//! stored `traceparent` string ([`traceparent_of`]) and followed as a span link
//! ([`link_to`]) so that a retry does not grow the original trace for days.
//!
//! Every function here is a no-op (an empty map, an empty [`Context`], `None`) unless spans
//! are exported ([`crate::exporting`]): one relaxed atomic load is all a message costs
//! when tracing is off. They use the global propagator, which [`crate::init`] sets to
//! W3C Trace Context.

use std::collections::BTreeMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::exporting;

/// The W3C header (and gRPC metadata key) of the trace and parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header of vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // A value that is not visible ASCII is not a trace context: ignored.
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The headers (`traceparent`, and `tracestate` if any) that carry `cx` to another
/// process; empty when `cx` has no valid span or nothing is exported.
pub fn inject(cx: &Context) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if exporting() && cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(cx, &mut MapInjector(&mut headers));
        });
    }
    headers
}

/// [`inject`] for the current `tracing` span.
pub fn inject_current() -> BTreeMap<String, String> {
    if !exporting() {
        return BTreeMap::new();
    }
    inject(&tracing::Span::current().context())
}

/// The W3C `traceparent` of `span`, to store with work that is queued again later;
/// `None` when nothing is exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    inject(&span.context()).remove(TRACEPARENT)
}

/// The context carried by message headers (as written by [`inject`]); empty when there is
/// none, it is malformed, or nothing is exported.
pub fn extract(headers: &BTreeMap<String, String>) -> Context {
    if !exporting() || !headers.contains_key(TRACEPARENT) {
        return Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.extract_with_context(&Context::new(), &MapExtractor(headers))
    })
}

/// The context a gRPC caller sent in its request metadata (`traceparent`, `tracestate`).
pub fn extract_grpc(metadata: &MetadataMap) -> Context {
    if !exporting() || !metadata.contains_key(TRACEPARENT) {
        return Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.extract_with_context(&Context::new(), &MetadataExtractor(metadata))
    })
}

/// Makes the remote span of `cx` the parent of `span`, which must not have been entered
/// yet. Does nothing if `cx` holds no valid span.
pub fn set_parent(span: &tracing::Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        // Fails only if the span is disabled or not seen by the export layer: then there is
        // nothing to connect.
        let _ = span.set_parent(cx);
    }
}

/// Adds a link from `span` to the remote span of `cx` (a retry to the trace it retries).
/// Does nothing if `cx` holds no valid span.
pub fn link_to(span: &tracing::Span, cx: &Context) {
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Adds a link from `span` to each of `others` (a batch to the work it carries), at most
/// `max` of them; nothing unless spans are exported.
pub fn link_spans<'a>(
    span: &tracing::Span,
    others: impl IntoIterator<Item = &'a tracing::Span>,
    max: usize,
) {
    if !exporting() {
        return;
    }
    for other in others.into_iter().take(max) {
        link_to(span, &other.context());
    }
}

/// Sets an OpenTelemetry attribute on `span` without making it a `tracing` field (so it
/// stays out of the logs); nothing unless spans are exported.
pub fn set_attribute(
    span: &tracing::Span,
    key: &'static str,
    value: impl Into<opentelemetry::Value>,
) {
    if exporting() {
        span.set_attribute(key, value);
    }
}

/// The trace id (32 hex digits) of a W3C `traceparent` value, if it is well-formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    (version.len() == 2 && trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn on() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        crate::EXPORTING.store(true, Ordering::Relaxed);
    }

    #[test]
    fn headers_round_trip_a_context() {
        on();
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc.clone());
        let headers = inject(&cx);
        assert_eq!(headers.get(TRACEPARENT).map(String::as_str), Some(PARENT));
        let back = extract(&headers);
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
        assert!(back.span().span_context().is_remote());
    }

    #[test]
    fn grpc_metadata_carries_a_context() {
        on();
        let mut md = MetadataMap::new();
        md.insert(TRACEPARENT, PARENT.parse().unwrap());
        let cx = extract_grpc(&md);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let garbage: MetadataMap = {
            let mut md = MetadataMap::new();
            md.insert(TRACEPARENT, "not-a-trace".parse().unwrap());
            md
        };
        assert!(!extract_grpc(&garbage).span().span_context().is_valid());
        assert!(
            !extract_grpc(&MetadataMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }

    #[test]
    fn trace_ids_are_read_from_traceparents() {
        assert_eq!(
            trace_id_of(PARENT),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of(""), None);
    }
}
