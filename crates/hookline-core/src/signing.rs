//! Standard Webhooks signing and verification.
//!
//! A receiver checks `webhook-signature` = `v1,` + base64(HMAC-SHA256(key, "{id}.{ts}.{body}"))
//! where the key is the base64 part of a `whsec_` secret. During a rotation a request
//! carries one `v1,` entry per live secret, separated by spaces. The verifier here is the
//! one our tests and the benchmark receiver use; receivers may use any implementation of
//! the standard.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

const SECRET_PREFIX: &str = "whsec_";
/// Fewest and most key bytes a secret may hold.
pub const SECRET_MIN_BYTES: usize = 24;
pub const SECRET_MAX_BYTES: usize = 64;
/// Bytes in a generated secret.
pub const GENERATED_SECRET_BYTES: usize = 32;
/// How far a timestamp may be from now before a verifier refuses it (the standard's 5 min).
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SigningError {
    #[error(
        "secret must be `whsec_` followed by base64 of {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes: {0}"
    )]
    BadSecret(&'static str),
    #[error("no signature matches")]
    NoMatch,
    #[error("timestamp {timestamp} is more than {tolerance} s away from now ({now})")]
    StaleTimestamp {
        timestamp: i64,
        now: i64,
        tolerance: i64,
    },
    #[error("malformed signature header")]
    MalformedHeader,
}

/// A signing key decoded from a `whsec_` secret.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Decodes `whsec_<base64>`. The prefix is optional, as in the standard's libraries.
    pub fn from_secret(secret: &str) -> Result<Self, SigningError> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SigningError::BadSecret("the part after `whsec_` is not base64"))?;
        if key.len() < SECRET_MIN_BYTES {
            return Err(SigningError::BadSecret("too few bytes"));
        }
        if key.len() > SECRET_MAX_BYTES {
            return Err(SigningError::BadSecret("too many bytes"));
        }
        Ok(Self { key })
    }

    /// Whether every key byte is the same (24 zero bytes, say): no secret at all. Refused
    /// when a caller gives a secret (`validate::given_secret`).
    pub fn is_uniform(&self) -> bool {
        self.key.iter().all(|b| Some(b) == self.key.first())
    }

    /// `v1,<base64 signature>` for one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(3 + 44);
        out.push_str("v1,");
        STANDARD.encode_string(self.mac(msg_id, timestamp, body), &mut out);
        out
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// Whether `header` (space-separated `v1,<sig>` entries) holds a valid signature.
    fn matches(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let expected = self.mac(msg_id, timestamp, body);
        header.split(' ').any(|entry| {
            entry
                .strip_prefix("v1,")
                .and_then(|sig| STANDARD.decode(sig).ok())
                .is_some_and(|sig| sig.ct_eq(&expected).into())
        })
    }
}

/// A fresh secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; GENERATED_SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

/// The `webhook-signature` value for a message signed with every key, space-separated.
pub fn signature_header(keys: &[SigningKey], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut out = String::new();
    for key in keys {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&key.sign(msg_id, timestamp, body));
    }
    out
}

/// Checks a received webhook: the timestamp is within `tolerance` of `now` and one
/// signature entry matches `key`.
pub fn verify(
    key: &SigningKey,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    signature_header: &str,
    now: i64,
    tolerance: i64,
) -> Result<(), SigningError> {
    if signature_header.trim().is_empty() {
        return Err(SigningError::MalformedHeader);
    }
    if (now - timestamp).abs() > tolerance {
        return Err(SigningError::StaleTimestamp {
            timestamp,
            now,
            tolerance,
        });
    }
    if key.matches(msg_id, timestamp, body, signature_header) {
        Ok(())
    } else {
        Err(SigningError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specification_vector() {
        let key = SigningKey::from_secret(SECRET).unwrap();
        assert_eq!(key.sign(MSG_ID, TS, BODY), EXPECTED);
    }

    #[test]
    fn verifies_the_specification_vector_and_rejects_tampering() {
        let key = SigningKey::from_secret(SECRET).unwrap();
        let tol = DEFAULT_TOLERANCE_SECS;
        assert_eq!(verify(&key, MSG_ID, TS, BODY, EXPECTED, TS, tol), Ok(()));
        let tampered = br#"{"test": 2432232315}"#;
        assert_eq!(
            verify(&key, MSG_ID, TS, tampered, EXPECTED, TS, tol),
            Err(SigningError::NoMatch)
        );
        assert_eq!(
            verify(&key, "msg_other", TS, BODY, EXPECTED, TS, tol),
            Err(SigningError::NoMatch)
        );
        assert!(matches!(
            verify(&key, MSG_ID, TS, BODY, EXPECTED, TS + tol + 1, tol),
            Err(SigningError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn any_live_secret_of_a_rotation_verifies() {
        let old = SigningKey::from_secret(SECRET).unwrap();
        let new = SigningKey::from_secret(&generate_secret()).unwrap();
        let header = signature_header(&[new.clone(), old.clone()], MSG_ID, TS, BODY);
        assert_eq!(header.split(' ').count(), 2);
        for key in [&old, &new] {
            assert_eq!(verify(key, MSG_ID, TS, BODY, &header, TS, 10), Ok(()));
        }
    }

    #[test]
    fn generated_secrets_are_whsec_with_32_bytes() {
        let s = generate_secret();
        assert!(s.starts_with("whsec_"));
        let bytes = STANDARD.decode(&s[6..]).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn bad_secrets_are_refused_with_the_rule() {
        assert!(SigningKey::from_secret("whsec_***").is_err());
        let short = format!("whsec_{}", STANDARD.encode([1u8; 8]));
        let err = SigningKey::from_secret(&short).unwrap_err();
        assert!(err.to_string().contains("24 to 64 bytes"));
    }
}
