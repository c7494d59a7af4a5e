//! Errors as JSON: the gRPC code (number and name), the message, and the field it is
//! about when there is one, with the HTTP status of the conventional gRPC→HTTP mapping.

use axum::response::{IntoResponse, Response};
use hookline_proto::code_name;
use http::{HeaderValue, StatusCode};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

/// An error answer of the REST API.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RestError {
    pub code: Code,
    pub message: String,
    /// The request field the error is about (`subscription.url`), when known.
    pub field: Option<String>,
    /// Seconds to wait before trying again (`Retry-After`), when the server said.
    pub retry_after: Option<u64>,
    /// An HTTP status that is not the code's usual one (405).
    http: Option<StatusCode>,
}

impl RestError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            http: None,
        }
    }

    /// `INVALID_ARGUMENT` about the request as a whole.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `INVALID_ARGUMENT` about one field; the message reads `field: why`.
    pub fn field(field: &str, why: impl std::fmt::Display) -> Self {
        let mut e = Self::new(Code::InvalidArgument, format!("{field}: {why}"));
        e.field = Some(field.to_string());
        e
    }

    /// A body that could not be read (413 when over [`crate::MAX_BODY_BYTES`]).
    pub fn unreadable_body(status: StatusCode, why: String) -> Self {
        let mut e = Self::bad_body(format!(
            "the body cannot be read ({why}); the limit is {} bytes",
            crate::MAX_BODY_BYTES
        ));
        e.http = Some(status);
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        let mut e = Self::new(Code::Unimplemented, message);
        e.http = Some(StatusCode::METHOD_NOT_ALLOWED);
        e
    }

    /// The answer of the gRPC service, as it is.
    pub fn from_status(status: &tonic::Status) -> Self {
        let mut e = Self::new(status.code(), status.message());
        if status.code() == Code::InvalidArgument {
            e.field = field_of(status.message());
        }
        e.retry_after = status
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        e
    }

    /// The HTTP status of the gRPC code (google.rpc.Code's documented mapping).
    pub fn http_status(&self) -> StatusCode {
        if let Some(status) = self.http {
            return status;
        }
        match self.code {
            Code::Ok => StatusCode::OK,
            Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The field a service's `INVALID_ARGUMENT` message names first (`events[2].payload: …`).
fn field_of(message: &str) -> Option<String> {
    let (head, _) = message.split_once(": ")?;
    let ok = !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
    ok.then(|| head.to_string())
}

impl RestError {
    /// The JSON answer: `{"error": {"code", "status", "message", "field"}}`.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({
            "code": self.code as i32,
            "status": code_name(self.code),
            "message": self.message,
        });
        if let Some(field) = &self.field {
            error["field"] = json!(field);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let mut response = (self.http_status(), axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        if self.code == Code::Unauthenticated {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_field_of_a_field_error_only() {
        assert_eq!(
            field_of("subscription.url: must be https").as_deref(),
            Some("subscription.url")
        );
        assert_eq!(
            field_of("events[2].payload: too big").as_deref(),
            Some("events[2].payload")
        );
        assert_eq!(field_of("the tenant t_1 is not found: x"), None);
    }
}
