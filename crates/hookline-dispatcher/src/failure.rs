//! What a failed request is called: its [`ErrorClass`], one fixed message per class, and
//! whether the egress policy refused it.
//!
//! Transport errors are classified by walking the error's causes, because reqwest reports
//! DNS and TLS failures as connect errors with the cause further down. The message never
//! repeats the underlying text: "connection refused", "connection closed before message
//! completed" and "invalid HTTP version parsed" would tell a tenant what listens on a
//! port of the operator's network.

use std::error::Error as StdError;

use hookline_core::model::ErrorClass;
use hookline_egress::EgressRefused;

/// Longest error message an attempt keeps.
const ERROR_MESSAGE_LIMIT: usize = 1024;

/// The class of a transport error.
pub(crate) fn classify(error: &reqwest::Error) -> ErrorClass {
    if error.is_timeout() {
        return ErrorClass::Timeout;
    }
    let causes = causes(error);
    let mentions = |words: &[&str]| {
        causes.iter().any(|cause| {
            let text = cause.to_string().to_ascii_lowercase();
            words.iter().any(|w| text.contains(w))
        })
    };
    if causes.iter().any(|cause| cause.is::<rustls::Error>())
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

/// The egress policy's refusal somewhere below `error`, if that is why it failed.
pub(crate) fn egress_refusal(error: &reqwest::Error) -> Option<EgressRefused> {
    causes(error)
        .into_iter()
        .find_map(|c| c.downcast_ref::<EgressRefused>())
        .cloned()
}

/// Every cause below `error`. An `io::Error` hides what it wraps from `source()` (it
/// returns the wrapped error's own source), and TLS errors come wrapped in two of them,
/// so wrapped errors are visited explicitly.
fn causes(error: &reqwest::Error) -> Vec<&(dyn StdError + 'static)> {
    const MAX_CAUSES: usize = 32;
    let mut out = Vec::new();
    let mut pending: Vec<&(dyn StdError + 'static)> = error.source().into_iter().collect();
    while let Some(cause) = pending.pop() {
        if out.len() >= MAX_CAUSES {
            break;
        }
        out.push(cause);
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

/// One fixed message per class: the underlying text would say what answered (nothing,
/// something that closed the connection, something that is not HTTP), which turns the
/// attempt log into a port scanner. A certificate problem is named, since it is the
/// receiver's to fix and says nothing about other ports.
pub(crate) fn describe(class: ErrorClass, error: &reqwest::Error) -> String {
    match class {
        ErrorClass::Timeout => "no complete answer within the request timeout".into(),
        ErrorClass::Dns => "the host name did not resolve".into(),
        ErrorClass::Tls => match certificate_problem(error) {
            Some(problem) => truncate(format!("TLS handshake failed: {problem}")),
            None => "TLS handshake failed".into(),
        },
        ErrorClass::Body => "the answer's body could not be read".into(),
        ErrorClass::Invalid => "the request could not be built".into(),
        ErrorClass::Connect | ErrorClass::Status | ErrorClass::Egress => {
            "connection failed: no valid HTTP answer from the receiver".into()
        }
    }
}

/// Whether a TLS alert from the receiver is about the client certificate (mutual TLS).
fn refuses_client(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied
    )
}

/// The receiver's certificate problem, if the TLS handshake failed on one (or the
/// receiver's complaint about ours).
fn certificate_problem(error: &reqwest::Error) -> Option<String> {
    causes(error)
        .into_iter()
        .find_map(|c| match c.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(problem)) => {
                Some(format!("invalid certificate ({problem:?})"))
            }
            Some(rustls::Error::AlertReceived(alert)) if refuses_client(*alert) => Some(format!(
                "the receiver refused the client certificate, or requires one (alert {alert:?})"
            )),
            _ => None,
        })
}

/// At most [`ERROR_MESSAGE_LIMIT`] bytes, cut on a character boundary.
pub(crate) fn truncate(mut text: String) -> String {
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

    #[test]
    fn truncation_respects_characters() {
        let text = "é".repeat(ERROR_MESSAGE_LIMIT);
        let cut = truncate(text);
        assert!(cut.len() <= ERROR_MESSAGE_LIMIT);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate("short".into()), "short");
    }
}
