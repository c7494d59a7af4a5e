//! TLS of `amqps://` URLs. lapin's rustls connector needs a root-store feature, or
//! `amqps://` silently connects in plaintext (issue #10): the workspace enables it, and
//! this module gives the connector what to trust and present — the bundled public roots
//! plus a private CA (`amqp_ca_file`, or the URL's `cacertfile` query, RabbitMQ's
//! name), and a client certificate and key (`amqp_cert_file` / `amqp_key_file`, or
//! `certfile` / `keyfile`) — and turns a failed handshake into an error that says so.
//! There is no fallback to plaintext: a far end that does not speak TLS fails.

use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use crate::BrokerError;

/// The TLS files of the broker connection (settings; the URL's queries fill the gaps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmqpTlsFiles {
    /// PEM CA certificates trusted beside the public roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for a broker that requires one.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8) of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl AmqpTlsFiles {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }
}

/// The TLS configuration for `url`, read now so that a missing file fails at start.
/// TLS files with an `amqp://` URL are refused: they would be silently unused.
pub(crate) fn tls_config(url: &str, files: &AmqpTlsFiles) -> Result<OwnedTLSConfig, BrokerError> {
    let invalid = BrokerError::InvalidConfig;
    let parsed =
        url::Url::parse(url).map_err(|e| invalid(format!("the AMQP URL is not valid: {e}")))?;
    let query = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| PathBuf::from(v.into_owned()))
    };
    let files = AmqpTlsFiles {
        ca_file: files.ca_file.clone().or_else(|| query("cacertfile")),
        cert_file: files.cert_file.clone().or_else(|| query("certfile")),
        key_file: files.key_file.clone().or_else(|| query("keyfile")),
    };
    if parsed.scheme() != "amqps" {
        if !files.is_empty() {
            return Err(invalid(
                "amqp_ca_file, amqp_cert_file, amqp_key_file (or the URL's cacertfile, \
                 certfile, keyfile) need an amqps:// URL; this one is plaintext amqp://"
                    .into(),
            ));
        }
        return Ok(OwnedTLSConfig::default());
    }
    let identity = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert, "amqp_cert_file")?,
            key: read(key, "amqp_key_file")?,
        }),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "amqp_cert_file and amqp_key_file (certfile and keyfile) go together: set both or neither"
                    .into(),
            ));
        }
    };
    let cert_chain = match &files.ca_file {
        Some(ca) => Some(
            String::from_utf8(read(ca, "amqp_ca_file")?)
                .map_err(|_| invalid(format!("amqp_ca_file {} is not PEM text", ca.display())))?,
        ),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn read(path: &Path, setting: &str) -> Result<Vec<u8>, BrokerError> {
    let bytes = std::fs::read(path).map_err(|e| {
        BrokerError::InvalidConfig(format!("cannot read {setting} {}: {e}", path.display()))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(BrokerError::InvalidConfig(format!(
            "{setting} {} holds no PEM block",
            path.display()
        )));
    }
    Ok(bytes)
}

/// What to say when connecting to an `amqps://` URL failed in the TLS handshake, or
/// `None` when `error` is not a TLS failure. rustls reports its errors as
/// `InvalidData` (a peer that answers in plaintext, an untrusted or mismatched
/// certificate).
pub(crate) fn handshake_failure(tls: bool, at: &str, error: &lapin::Error) -> Option<String> {
    let lapin::ErrorKind::IOError(io) = error.kind() else {
        return None;
    };
    (tls && io.kind() == std::io::ErrorKind::InvalidData).then(|| {
        format!(
            "TLS handshake with {at} failed: {io}. amqps:// needs a TLS port (RabbitMQ's \
             is usually 5671, not 5672) whose certificate is trusted (public roots, or \
             amqp_ca_file) and names the URL's host; Hookline never falls back to plaintext"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_url_with_tls_files_is_refused() {
        let files = AmqpTlsFiles {
            ca_file: Some("/x.pem".into()),
            ..Default::default()
        };
        assert!(tls_config("amqp://h:5672/%2f", &files).is_err());
        assert!(tls_config("amqp://h:5672/%2f?cacertfile=/x.pem", &Default::default()).is_err());
        assert!(tls_config("amqp://h:5672/%2f", &Default::default()).is_ok());
    }

    #[test]
    fn missing_files_fail_at_once() {
        let e = tls_config(
            "amqps://h/%2f?cacertfile=/nonexistent/ca.pem",
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("amqp_ca_file /nonexistent/ca.pem"), "{e}");
        let half = AmqpTlsFiles {
            cert_file: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(tls_config("amqps://h/%2f", &half).is_err());
    }
}
