//! Client certificates for mutual TLS to receivers: the one place that reads them.
//!
//! A subscription (or the operator, as a default) may give a PEM certificate chain and its
//! private key; the dispatcher presents them to receivers that require a client
//! certificate. They are checked when given (size, parse, the key belongs to the leaf
//! certificate, not expired) so that a bad pair is a clear error at the API and never a
//! failing delivery later. What Get/List show of them is [`CertificateInfo`]: never the key.

use chrono::{DateTime, Utc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::validate::{Result, ValidationError};

/// Most bytes of a certificate chain, and of a private key, in PEM.
pub const MAX_PEM_BYTES: usize = 64 * 1024;
/// Most certificates in a chain.
pub const MAX_CHAIN_LEN: usize = 8;

/// A certificate chain and its private key, both PEM, as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientIdentity {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity(..)")
    }
}

/// What may be shown of a client certificate: its leaf's subject, SHA-256 fingerprint (of
/// the DER, lowercase hex) and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub subject: String,
    pub sha256_fingerprint: String,
    pub not_after: DateTime<Utc>,
}

/// Checks a certificate chain and key given for `field` (`client_certificate`) at `now`.
pub fn validate(
    field: &str,
    identity: &ClientIdentity,
    now: DateTime<Utc>,
) -> Result<CertificateInfo> {
    let cert_field = format!("{field}.certificate_pem");
    let key_field = format!("{field}.private_key_pem");
    for (name, value) in [
        (&cert_field, &identity.certificate_pem),
        (&key_field, &identity.private_key_pem),
    ] {
        if value.trim().is_empty() {
            return Err(ValidationError::new(
                name.as_str(),
                "is required: give the PEM certificate chain and its private key together",
            ));
        }
        if value.len() > MAX_PEM_BYTES {
            return Err(ValidationError::new(
                name.as_str(),
                format!("is {} bytes; allowed: at most {MAX_PEM_BYTES}", value.len()),
            ));
        }
    }
    let chain = chain(&cert_field, &identity.certificate_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.private_key_pem.as_bytes()).map_err(|e| {
        ValidationError::new(
            key_field.as_str(),
            format!("is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let info = info(&cert_field, &chain[0])?;
    if info.not_after <= now {
        return Err(ValidationError::new(
            cert_field.as_str(),
            format!("expired at {}; give a current certificate", info.not_after),
        ));
    }
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        ValidationError::new(
            key_field.as_str(),
            format!("is not a supported key (RSA, ECDSA P-256/P-384, ed25519): {e}"),
        )
    })?;
    if signer.public_key().as_deref() != Some(spki(&chain[0])?.as_slice()) {
        return Err(ValidationError::new(
            key_field.as_str(),
            "does not belong to the first certificate of the chain",
        ));
    }
    Ok(info)
}

/// The shown facts of a stored certificate chain (already validated when it was given).
pub fn describe(certificate_pem: &str) -> Result<CertificateInfo> {
    let chain = chain("certificate_pem", certificate_pem)?;
    info("certificate_pem", &chain[0])
}

/// Checks a bundle of PEM CA certificates trusted for receivers: at least one, each an
/// X.509 certificate. Returns how many it holds.
pub fn ca_bundle(field: &str, pem: &str) -> Result<usize> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ValidationError::new(field, format!("is not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ValidationError::new(
            field,
            "holds no `-----BEGIN CERTIFICATE-----` block",
        ));
    }
    for der in &certs {
        parse(field, der)?;
    }
    Ok(certs.len())
}

/// Every certificate of a PEM chain: at least one, at most [`MAX_CHAIN_LEN`].
fn chain(field: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .take(MAX_CHAIN_LEN + 1)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ValidationError::new(field, format!("is not PEM certificates: {e}")))?;
    match chain.len() {
        0 => Err(ValidationError::new(
            field,
            "holds no `-----BEGIN CERTIFICATE-----` block",
        )),
        n if n > MAX_CHAIN_LEN => Err(ValidationError::new(
            field,
            format!("holds more than {MAX_CHAIN_LEN} certificates"),
        )),
        _ => Ok(chain),
    }
}

fn parse<'a>(
    field: &str,
    der: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| ValidationError::new(field, format!("is not an X.509 certificate: {e}")))
}

fn spki(der: &CertificateDer<'_>) -> Result<Vec<u8>> {
    Ok(parse("certificate_pem", der)?
        .tbs_certificate
        .subject_pki
        .raw
        .to_vec())
}

fn info(field: &str, der: &CertificateDer<'_>) -> Result<CertificateInfo> {
    let cert = parse(field, der)?;
    let not_after = DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        .ok_or_else(|| ValidationError::new(field, "has an expiry out of range"))?;
    let fingerprint = Sha256::digest(der.as_ref());
    Ok(CertificateInfo {
        subject: cert.subject().to_string(),
        sha256_fingerprint: fingerprint.iter().map(|b| format!("{b:02x}")).collect(),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> ClientIdentity {
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        ClientIdentity {
            certificate_pem: made.cert.pem(),
            private_key_pem: made.signing_key.serialize_pem(),
        }
    }

    #[test]
    fn a_matching_pair_is_described_without_its_key() {
        let id = pair("client.example");
        let info = validate("client_certificate", &id, Utc::now()).unwrap();
        assert!(info.subject.contains("rcgen"), "{}", info.subject);
        assert_eq!(info.sha256_fingerprint.len(), 64);
        assert!(info.not_after > Utc::now());
        assert_eq!(describe(&id.certificate_pem).unwrap(), info);
        assert_eq!(format!("{id:?}"), "ClientIdentity(..)");
    }

    #[test]
    fn bad_pairs_are_refused_saying_what_is_wrong() {
        let a = pair("a.example");
        let b = pair("b.example");
        let mixed = ClientIdentity {
            certificate_pem: a.certificate_pem.clone(),
            private_key_pem: b.private_key_pem.clone(),
        };
        let e = validate("c", &mixed, Utc::now()).unwrap_err();
        assert_eq!(e.field, "c.private_key_pem");
        assert!(e.message.contains("does not belong"), "{}", e.message);

        let no_key = ClientIdentity {
            private_key_pem: String::new(),
            ..a.clone()
        };
        let e = validate("c", &no_key, Utc::now()).unwrap_err();
        assert!(e.message.contains("together"), "{}", e.message);

        let garbage = ClientIdentity {
            certificate_pem: "hello".into(),
            ..a.clone()
        };
        let e = validate("c", &garbage, Utc::now()).unwrap_err();
        assert_eq!(e.field, "c.certificate_pem");

        let huge = ClientIdentity {
            certificate_pem: "x".repeat(MAX_PEM_BYTES + 1),
            ..a.clone()
        };
        let e = validate("c", &huge, Utc::now()).unwrap_err();
        assert!(e.message.contains("at most 65536"), "{}", e.message);

        let later = Utc::now() + chrono::Duration::days(365 * 5000);
        let e = validate("c", &a, later).unwrap_err();
        assert!(e.message.contains("expired"), "{}", e.message);
    }
}
