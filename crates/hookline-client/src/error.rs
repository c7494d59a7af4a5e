//! The client's errors, sorted by what the caller should do about them: fix the
//! request ([`Error::is_retryable`] is false) or try again later (true).

use tonic::{Code, Status};

/// Everything a [`Client`](crate::Client) call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server address is not `host:port` or `http://host:port`.
    #[error("server address {server:?} is not valid: {reason}")]
    InvalidEndpoint { server: String, reason: String },
    /// A TLS file (`--ca`, `--client-cert`, `--client-key`) cannot be used.
    #[error("TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    /// No API key was given to the builder.
    #[error(
        "no API key: pass one to ClientBuilder::token (the CLI takes --token or HOOKLINE_TOKEN)"
    )]
    NoToken,
    /// The API key has characters that cannot go in a header.
    #[error("the API key has characters that cannot go in an HTTP header")]
    InvalidToken,
    /// The server could not be reached.
    #[error("cannot reach a Hookline server at {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server refused the request as it is (bad argument, unknown id, wrong key…):
    /// sending it again will not help.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rejected(Status),
    /// The server or the network failed for now (unavailable, overloaded, timed out):
    /// the same request may succeed later.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Unavailable(Status),
}

impl Error {
    /// True when the same request may succeed later; false when it must change first.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Connect { .. })
    }

    /// The gRPC status the server answered with, if it answered.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Rejected(s) | Error::Unavailable(s) => Some(s),
            _ => None,
        }
    }

    /// The gRPC code the server answered with, if it answered.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        match status.code() {
            Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal => Error::Unavailable(status),
            _ => Error::Rejected(status),
        }
    }
}

/// The gRPC name of a code (`NOT_FOUND`), as the API documents them.
pub use hookline_proto::code_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_are_not_retryable_and_outages_are() {
        assert!(!Error::from(Status::invalid_argument("x")).is_retryable());
        assert!(!Error::from(Status::not_found("x")).is_retryable());
        assert!(!Error::from(Status::unauthenticated("x")).is_retryable());
        assert!(Error::from(Status::unavailable("x")).is_retryable());
        assert!(Error::from(Status::resource_exhausted("x")).is_retryable());
        let e = Error::from(Status::not_found("tenant ten_x not found"));
        assert_eq!(e.to_string(), "NOT_FOUND: tenant ten_x not found");
    }
}
