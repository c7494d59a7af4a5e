//! Logs and traces for every Hookline process, set up in one place.
//!
//! [`init`] installs the `tracing` subscriber: structured logs on stderr (text or JSON)
//! filtered by the operator's filter, and, only when OpenTelemetry's own variables ask
//! for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), a
//! `tracing-opentelemetry` layer that turns Hookline's spans into OpenTelemetry spans and
//! exports them over OTLP/gRPC through a batch processor. Everything else about the export
//! follows the SDK's reading of the standard variables: `OTEL_SERVICE_NAME` (here
//! defaulting to `hookline`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER*`,
//! `OTEL_EXPORTER_OTLP_*_{TIMEOUT,HEADERS}`; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off. The export is plaintext gRPC (no TLS in the
//! build): point it at a collector next to the process.
//!
//! The two layers filter separately. Logs keep the operator's filter; the export sees
//! Hookline's spans down to `DEBUG` (the per-message spans are at `DEBUG`, so that without
//! an exporter and at the default `info` log level they are disabled at their call site
//! and cost nothing) and events at `INFO` (`WARN` from other crates) as span events.
//!
//! The W3C trace context crosses process boundaries through [`propagation`]: gRPC
//! metadata into ingest, queue message headers from the outbox to the dispatcher, and a
//! stored `traceparent` for work that is queued again later (retries). Every helper
//! there does nothing unless spans are exported ([`exporting`]), so the hot path pays
//! one relaxed atomic load per message when tracing is off.
//!
//! The returned [`TelemetryGuard`] flushes and shuts the exporter down when dropped; the
//! binary holds it until its services have stopped, so the last spans leave before exit.

pub mod propagation;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

pub use opentelemetry::Context;
pub use propagation::{
    TRACEPARENT, TRACESTATE, extract, extract_grpc, inject, inject_current, link_spans, link_to,
    set_attribute, set_parent, trace_id_of, traceparent_of,
};

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "hookline";

/// How long dropping the guard waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once spans are exported: the propagation helpers do nothing while it is false.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans (an OTLP endpoint is configured and [`init`] ran).
#[inline]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Why logging or tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log filter {filter:?} is not valid")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error(
        "OTLP endpoint {0:?} uses https, but this build exports over plaintext gRPC only; \
         use an http:// endpoint (a collector on the node or beside the process)"
    )]
    TlsEndpoint(String),
    #[error("cannot set up the OTLP span exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot start logging")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

/// Keeps the span exporter running; dropping it exports what is buffered (for at most a
/// few seconds) and shuts the exporter down.
#[must_use = "dropping the guard stops the span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.provider.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// Whether this guard runs a span exporter.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        EXPORTING.store(false, Ordering::Relaxed);
        let shutdown = move || {
            if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                tracing::warn!(error = %e, "span exporter did not shut down cleanly; the last spans may be lost");
            }
        };
        // The gRPC exporter's connection is driven by the Tokio runtime: on a worker of a
        // multi-threaded runtime, let the other workers run while this one waits.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(shutdown)
            }
            _ => shutdown(),
        }
    }
}

/// Installs the process's `tracing` subscriber: logs to stderr filtered by `log_filter`
/// (an `EnvFilter` directive such as `info` or `hookline=debug,info`), as JSON lines when
/// `json` (text otherwise, coloured only when stderr is a terminal), and the OTLP span
/// export when OpenTelemetry's variables configure one. Sets the global propagator to
/// W3C Trace Context.
///
/// With an exporter this must run inside a Tokio runtime (the gRPC channel is created on
/// it) and the runtime must outlive the returned guard.
pub fn init(log_filter: &str, json: bool) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(with_quiet_dependencies(log_filter)).map_err(|source| {
        TelemetryError::Filter {
            filter: log_filter.to_owned(),
            source,
        }
    })?;
    let logs = if json {
        fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        // Colour codes only for a person at a terminal: a file, a pipe or a log collector
        // gets plain text.
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed()
    };

    let provider = if export_requested() {
        Some(build_provider()?)
    } else {
        None
    };
    let traces = provider.as_ref().map(|p| {
        // Code location stays; the target repeats it, and thread and busy/idle figures
        // cost work per span for little in a trace of async tasks.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("hookline"))
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(filter_fn(exported))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(TelemetryError::Subscriber)?;

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        warn_about_unsupported_settings();
        tracing::info!(
            endpoint = %export_endpoint().unwrap_or_default(),
            "exporting traces over OTLP/gRPC"
        );
    }
    Ok(TelemetryGuard { provider })
}

/// Dependencies whose own logs only repeat, without context, what Hookline reports about
/// the same failure (lapin logs every refused or lost RabbitMQ connection at ERROR; the
/// broker adapter reports it once, saying what to check). Silenced unless the filter
/// names them, e.g. `HOOKLINE_LOG=info,lapin=debug`.
const QUIET_DEPENDENCIES: &[&str] = &["lapin"];

fn with_quiet_dependencies(filter: &str) -> String {
    let mut out = filter.to_owned();
    for target in QUIET_DEPENDENCIES {
        if !filter.contains(target) {
            let sep = if out.trim().is_empty() { "" } else { "," };
            out.push_str(&format!("{sep}{target}=off"));
        }
    }
    out
}

/// What the export layer sees: Hookline's spans down to `DEBUG`; events as span events at
/// `INFO` from Hookline and `WARN` from other crates; nothing of OpenTelemetry's own (its
/// internal logs must not feed back into the pipeline exporting them).
fn exported(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    if target.starts_with("opentelemetry") {
        return false;
    }
    let ours = target.starts_with("hookline");
    let level = *meta.level();
    if meta.is_span() {
        ours && level <= Level::DEBUG
    } else if ours {
        level <= Level::INFO
    } else {
        level <= Level::WARN
    }
}

fn env_set(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The endpoint the exporter will use, if any is configured.
fn export_endpoint() -> Option<String> {
    env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env_set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// Whether OpenTelemetry's variables ask for an OTLP span export.
fn export_requested() -> bool {
    if env_set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    if env_set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none")) {
        return false;
    }
    export_endpoint().is_some()
}

fn build_provider() -> Result<SdkTracerProvider, TelemetryError> {
    if let Some(endpoint) = export_endpoint()
        && endpoint.trim().to_ascii_lowercase().starts_with("https:")
    {
        return Err(TelemetryError::TlsEndpoint(endpoint));
    }
    // The endpoint, timeout and headers come from the OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()
        .map_err(TelemetryError::Exporter)?;
    // The batch processor reads OTEL_BSP_*; the default sampler reads OTEL_TRACES_SAMPLER*.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build())
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, SDK attributes),
/// with `service.name` defaulting to [`DEFAULT_SERVICE_NAME`] instead of the SDK's
/// `unknown_service`, and `service.version` defaulting to this build's version.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let mut builder = Resource::builder();
    let named = detected
        .get_ref(&Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if !named {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    if detected
        .get_ref(&Key::from_static_str("service.version"))
        .is_none()
    {
        builder =
            builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    builder.build()
}

/// Settings of the standard variables this build does not honour, said once at start.
fn warn_about_unsupported_settings() {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = env_set(var)
            && value.trim() != "grpc"
        {
            tracing::warn!(
                variable = var,
                value = %value,
                "only OTLP over gRPC is built in; exporting over gRPC"
            );
        }
    }
    if let Some(value) = env_set("OTEL_TRACES_EXPORTER")
        && !value.split(',').any(|v| v.trim() == "otlp")
    {
        tracing::warn!(
            variable = "OTEL_TRACES_EXPORTER",
            value = %value,
            "only the otlp exporter is built in; exporting over OTLP"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::span;
    use tracing_subscriber::layer::Context as LayerContext;

    use super::*;

    /// Records the names of the spans and events it is shown.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
        fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: LayerContext<'_, S>) {
            self.0
                .lock()
                .unwrap()
                .push(attrs.metadata().name().to_owned());
        }
        fn on_event(&self, event: &tracing::Event<'_>, _: LayerContext<'_, S>) {
            self.0
                .lock()
                .unwrap()
                .push(format!("event:{}", event.metadata().target()));
        }
    }

    #[test]
    fn the_export_filter_keeps_our_spans_and_leaves_out_its_own_logs() {
        let seen = Seen::default();
        let subscriber =
            tracing_subscriber::registry().with(seen.clone().with_filter(filter_fn(exported)));
        tracing::subscriber::with_default(subscriber, || {
            let _a = tracing::debug_span!(target: "hookline_dispatcher::worker", "ours.debug");
            let _b = tracing::trace_span!(target: "hookline_dispatcher::worker", "ours.trace");
            let _c = tracing::info_span!(target: "h2::proto", "theirs.info");
            tracing::info!(target: "hookline_ingest", "kept");
            tracing::debug!(target: "hookline_ingest", "dropped");
            tracing::info!(target: "sqlx::query", "dropped");
            tracing::warn!(target: "sqlx::pool", "kept");
            tracing::warn!(target: "opentelemetry_sdk", "dropped");
        });
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["ours.debug", "event:hookline_ingest", "event:sqlx::pool"]
        );
    }

    #[test]
    fn the_service_name_defaults_to_hookline() {
        // Only meaningful when the test process names no service of its own.
        if env_set("OTEL_SERVICE_NAME").is_none() && env_set("OTEL_RESOURCE_ATTRIBUTES").is_none() {
            let r = resource();
            assert_eq!(
                r.get(&Key::from_static_str("service.name"))
                    .map(|v| v.as_str().into_owned()),
                Some(DEFAULT_SERVICE_NAME.to_owned())
            );
        }
    }
}
