//! Hookline's REST/JSON API. Each route comes from the `google.api.http` option of a
//! method in `proto/hookline/v1` (`routes`); a request becomes that method's request
//! message by the proto3 JSON mapping (`request`), is sent in process to the gRPC
//! services (`call`) — so the same gate, limits and handlers answer it — and the reply
//! is written back as JSON (a server stream as one object per line), errors as JSON with
//! their gRPC code (`error`). `openapi` describes the same routes as an OpenAPI 3.1
//! document, served at `GET /v1/openapi.json`; `conn` caps the open connections.
//!
//! The caller is admitted once, before the body is read, by the gate's own check
//! ([`Authenticator::admit`]: a valid key within its request rate), so a request without
//! a valid key, or over its rate, costs no memory for its body. The admitted
//! [`hookline_grpc::Principal`] rides in the gRPC request's extensions, which the gate
//! trusts without a second check (see `hookline_grpc::gate`).

pub mod call;
pub mod conn;
pub mod error;
pub mod openapi;
pub mod request;
pub mod routes;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use hookline_grpc::Authenticator;
use http::{HeaderMap, StatusCode};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::service::Routes;

pub use error::RestError;
use routes::Route;

/// Largest REST request body, in bytes. The gRPC services hold each message to its own
/// limit after transcoding; this bounds what is read before that (JSON and base64 are
/// larger than the protobuf they become).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Headers passed on to the gRPC call (the caller travels as the admitted principal).
const FORWARDED: [&str; 1] = ["x-request-id"];

/// Errors building the API from the descriptors.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the hookline.v1 descriptors do not decode: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
}

struct Api {
    routes: Vec<Route>,
    /// The gRPC services of this process, called in process.
    services: Routes,
    openapi: Bytes,
    /// Admits the caller (key and rate) before the body is read.
    auth: Authenticator,
}

/// The REST API, calling the gRPC `services` of this process; `auth` admits each caller
/// (key and rate) once, before its body is read.
pub fn router(services: Routes, auth: Authenticator) -> Result<axum::Router, BuildError> {
    let pool = DescriptorPool::decode(hookline_proto::FILE_DESCRIPTOR_SET)?;
    let routes = routes::from_pool(&pool);
    let openapi = Bytes::from(openapi::document(&pool, &routes).to_string());
    let api = Arc::new(Api {
        routes,
        services,
        openapi,
        auth,
    });
    Ok(axum::Router::new()
        .route("/v1/openapi.json", get(serve_openapi))
        .fallback(transcode)
        .with_state(api))
}

async fn serve_openapi(State(api): State<Arc<Api>>) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        api.openapi.clone(),
    )
        .into_response()
}

async fn transcode(State(api): State<Arc<Api>>, request: Request) -> Result<Response, RestError> {
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let matched = match routes::find(&api.routes, &method, uri.path()) {
        Ok(m) => m,
        Err(true) => {
            return Err(RestError::method_not_allowed(format!(
                "{} is not served for {method}",
                uri.path()
            )));
        }
        Err(false) => {
            return Err(RestError::not_found(format!(
                "no route {method} {}; the routes are listed at /v1/openapi.json",
                uri.path()
            )));
        }
    };
    // The caller before the body: without a valid key within its rate nothing more is read.
    let principal = api
        .auth
        .admit(&headers)
        .await
        .map_err(|s| RestError::from_status(&s))?;
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| RestError::unreadable_body(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?;
    let message = request::build(&matched, uri.query(), &body)?;
    let rpc = &matched.route.rpc;
    let mut request = tonic::Request::new(Bytes::from(message.encode_to_vec()));
    forward_headers(&headers, request.metadata_mut());
    request.extensions_mut().insert(principal);
    let path = format!("/{}/{}", rpc.parent_service().full_name(), rpc.name());
    if rpc.is_server_streaming() {
        let stream = call::server_streaming(api.services.clone(), &path, request)
            .await
            .map_err(|s| RestError::from_status(&s))?;
        return Ok(ndjson(stream.into_inner(), rpc.output()));
    }
    let reply = call::unary(api.services.clone(), &path, request)
        .await
        .map_err(|s| RestError::from_status(&s))?;
    let out = to_json(&rpc.output(), reply.into_inner()).map_err(|s| RestError::from_status(&s))?;
    Ok(([(http::header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// A service's answer as proto3 JSON.
fn to_json(desc: &MessageDescriptor, encoded: Bytes) -> Result<Vec<u8>, tonic::Status> {
    let reply = DynamicMessage::decode(desc.clone(), encoded).map_err(|e| {
        tracing::error!(error = %e, message = desc.full_name(), "a service answered with a message that does not decode");
        tonic::Status::internal("the service's answer does not decode")
    })?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    reply
        .serialize_with_options(&mut ser, &SerializeOptions::new())
        .map_err(|e| tonic::Status::internal(format!("cannot write JSON: {e}")))?;
    Ok(out)
}

/// A server stream as one JSON object per line; an error ends it with an `{"error": …}` line.
fn ndjson(stream: tonic::Streaming<Bytes>, desc: MessageDescriptor) -> Response {
    let lines = futures::stream::unfold(Some(stream), move |state| {
        let desc = desc.clone();
        async move {
            let mut stream = state?;
            let (line, next) = match stream.message().await {
                Ok(Some(encoded)) => match to_json(&desc, encoded) {
                    Ok(line) => (line, Some(stream)),
                    Err(status) => (error_line(&status), None),
                },
                Ok(None) => return None,
                Err(status) => (error_line(&status), None),
            };
            let mut line = line;
            line.push(b'\n');
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), next))
        }
    });
    (
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

fn error_line(status: &tonic::Status) -> Vec<u8> {
    RestError::from_status(status)
        .body()
        .to_string()
        .into_bytes()
}

fn forward_headers(headers: &HeaderMap, metadata: &mut MetadataMap) {
    for name in FORWARDED {
        if let Some(value) = headers.get(name)
            && let Ok(value) = MetadataValue::try_from(value.as_bytes())
        {
            metadata.insert(name, value);
        }
    }
}

/// Serves `router` on `listener`, at most `max_connections` open at once, until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    router: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(conn::CappedListener::new(listener, max_connections), router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
