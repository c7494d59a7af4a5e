//! Standard Webhooks signing and verification, symmetric (`v1`) and asymmetric (`v1a`).
//!
//! A receiver checks `webhook-signature` against the signing string `"{id}.{ts}.{body}"`:
//! - `v1,` + base64(HMAC-SHA256(key, string)) where the key is the base64 part of a
//!   `whsec_` secret (the default scheme);
//! - `v1a,` + base64(ed25519 signature of the string) made with a `whsk_` secret key (base64
//!   of the 32-byte seed) and checked with its `whpk_` public key (base64 of the 32 bytes),
//!   so the receiver never holds anything that could sign.
//!
//! During a rotation a request carries one entry per live secret, separated by spaces.
//! The verifier here is the one our tests and the benchmark receiver use; receivers may use
//! any implementation of the standard.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, Verifier as _};
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

const SECRET_PREFIX: &str = "whsec_";
const SECRET_KEY_PREFIX: &str = "whsk_";
const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// Fewest and most key bytes a secret may hold.
pub const SECRET_MIN_BYTES: usize = 24;
pub const SECRET_MAX_BYTES: usize = 64;
/// Bytes in a generated secret.
pub const GENERATED_SECRET_BYTES: usize = 32;
/// How far a timestamp may be from now before a verifier refuses it (the standard's 5 min).
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

/// How a subscription's requests are signed; chosen when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureScheme {
    /// `v1`: HMAC-SHA256 with a shared `whsec_` secret.
    #[default]
    HmacSha256,
    /// `v1a`: ed25519 with a `whsk_` secret key; receivers hold the `whpk_` public key.
    Ed25519,
}

impl SignatureScheme {
    /// The scheme of a stored secret, read from its prefix.
    pub fn of_secret(secret: &str) -> Self {
        if secret.starts_with(SECRET_KEY_PREFIX) {
            Self::Ed25519
        } else {
            Self::HmacSha256
        }
    }

    /// The version tag of its signature entries (`v1`, `v1a`).
    pub fn tag(self) -> &'static str {
        match self {
            Self::HmacSha256 => "v1",
            Self::Ed25519 => "v1a",
        }
    }
}

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
    #[error(
        "secret key must be `whsk_` followed by base64 of the 32-byte ed25519 seed \
         (or of the 64-byte seed and public key): {0}"
    )]
    BadSecretKey(&'static str),
    #[error("public key must be `whpk_` followed by base64 of 32 bytes: {0}")]
    BadPublicKey(&'static str),
}

/// A signing key decoded from a `whsec_` secret or a `whsk_` secret key.
#[derive(Clone)]
pub struct SigningKey {
    key: Key,
}

#[derive(Clone)]
enum Key {
    Hmac(Vec<u8>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Decodes `whsk_<base64>` as an ed25519 key, anything else as `whsec_<base64>` (whose
    /// prefix is optional, as in the standard's libraries).
    pub fn from_secret(secret: &str) -> Result<Self, SigningError> {
        if let Some(encoded) = secret.strip_prefix(SECRET_KEY_PREFIX) {
            return ed25519_key(encoded).map(|k| Self {
                key: Key::Ed25519(Box::new(k)),
            });
        }
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
        Ok(Self {
            key: Key::Hmac(key),
        })
    }

    pub fn scheme(&self) -> SignatureScheme {
        match self.key {
            Key::Hmac(_) => SignatureScheme::HmacSha256,
            Key::Ed25519(_) => SignatureScheme::Ed25519,
        }
    }

    /// The `whpk_` public key of an ed25519 key; `None` for an HMAC key.
    pub fn public_key(&self) -> Option<String> {
        match &self.key {
            Key::Hmac(_) => None,
            Key::Ed25519(k) => Some(format!(
                "{PUBLIC_KEY_PREFIX}{}",
                STANDARD.encode(k.verifying_key().as_bytes())
            )),
        }
    }

    /// Whether every key byte is the same (24 zero bytes, say): no secret at all. Refused
    /// when a caller gives a secret (`validate::given_secret`).
    pub fn is_uniform(&self) -> bool {
        let bytes: &[u8] = match &self.key {
            Key::Hmac(key) => key,
            Key::Ed25519(k) => k.as_bytes(),
        };
        bytes.iter().all(|b| Some(b) == bytes.first())
    }

    /// `v1,<base64 signature>` or `v1a,<base64 signature>` for one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(4 + 88);
        out.push_str(self.scheme().tag());
        out.push(',');
        match &self.key {
            Key::Hmac(key) => STANDARD.encode_string(mac(key, msg_id, timestamp, body), &mut out),
            Key::Ed25519(k) => {
                let signed = signing_string(msg_id, timestamp, body);
                STANDARD.encode_string(k.sign(&signed).to_bytes(), &mut out)
            }
        }
        out
    }

    /// Whether `header` (space-separated `v1,<sig>` / `v1a,<sig>` entries) holds a valid
    /// signature by this key.
    fn matches(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        match &self.key {
            Key::Hmac(key) => {
                let expected = mac(key, msg_id, timestamp, body);
                header.split(' ').any(|entry| {
                    entry
                        .strip_prefix("v1,")
                        .and_then(|sig| STANDARD.decode(sig).ok())
                        .is_some_and(|sig| sig.ct_eq(&expected).into())
                })
            }
            Key::Ed25519(k) => ed25519_matches(&k.verifying_key(), msg_id, timestamp, body, header),
        }
    }
}

/// `{id}.{timestamp}.{body}`: what both schemes sign.
fn signing_string(msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let ts = timestamp.to_string();
    let mut out = Vec::with_capacity(msg_id.len() + ts.len() + body.len() + 2);
    out.extend_from_slice(msg_id.as_bytes());
    out.push(b'.');
    out.extend_from_slice(ts.as_bytes());
    out.push(b'.');
    out.extend_from_slice(body);
    out
}

fn mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The seed (32 bytes), or the seed and its public key (64 bytes, checked).
fn ed25519_key(encoded: &str) -> Result<ed25519_dalek::SigningKey, SigningError> {
    let bytes = STANDARD
        .decode(encoded)
        .map_err(|_| SigningError::BadSecretKey("the part after `whsk_` is not base64"))?;
    let seed: [u8; 32] = bytes
        .get(..32)
        .and_then(|s| s.try_into().ok())
        .filter(|_| bytes.len() == 32 || bytes.len() == 64)
        .ok_or(SigningError::BadSecretKey("wrong length"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    if bytes.len() == 64 && key.verifying_key().as_bytes() != &bytes[32..] {
        return Err(SigningError::BadSecretKey(
            "the last 32 bytes are not the seed's public key",
        ));
    }
    Ok(key)
}

fn ed25519_matches(
    public: &ed25519_dalek::VerifyingKey,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let signed = signing_string(msg_id, timestamp, body);
    header.split(' ').any(|entry| {
        entry
            .strip_prefix("v1a,")
            .and_then(|sig| STANDARD.decode(sig).ok())
            .and_then(|sig| ed25519_dalek::Signature::from_slice(&sig).ok())
            .is_some_and(|sig| public.verify(&signed, &sig).is_ok())
    })
}

/// Checks a received `v1a` webhook with a `whpk_` public key, as a receiver would.
pub fn verify_with_public_key(
    public_key: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    signature_header: &str,
    now: i64,
    tolerance: i64,
) -> Result<(), SigningError> {
    let encoded = public_key
        .strip_prefix(PUBLIC_KEY_PREFIX)
        .ok_or(SigningError::BadPublicKey("no `whpk_` prefix"))?;
    let bytes: [u8; 32] = STANDARD
        .decode(encoded)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SigningError::BadPublicKey("not base64 of 32 bytes"))?;
    let public = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| SigningError::BadPublicKey("not a point of the curve"))?;
    check_header(signature_header, timestamp, now, tolerance)?;
    if ed25519_matches(&public, msg_id, timestamp, body, signature_header) {
        Ok(())
    } else {
        Err(SigningError::NoMatch)
    }
}

/// A fresh `whsk_` secret key: base64 of a random 32-byte ed25519 seed.
pub fn generate_secret_key() -> String {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    format!("{SECRET_KEY_PREFIX}{}", STANDARD.encode(seed))
}

/// A fresh secret of `scheme`.
pub fn generate_secret_for(scheme: SignatureScheme) -> String {
    match scheme {
        SignatureScheme::HmacSha256 => generate_secret(),
        SignatureScheme::Ed25519 => generate_secret_key(),
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
    check_header(signature_header, timestamp, now, tolerance)?;
    if key.matches(msg_id, timestamp, body, signature_header) {
        Ok(())
    } else {
        Err(SigningError::NoMatch)
    }
}

/// The checks before any signature: a header at all, and a fresh timestamp.
fn check_header(
    header: &str,
    timestamp: i64,
    now: i64,
    tolerance: i64,
) -> Result<(), SigningError> {
    if header.trim().is_empty() {
        return Err(SigningError::MalformedHeader);
    }
    if (now - timestamp).abs() > tolerance {
        return Err(SigningError::StaleTimestamp {
            timestamp,
            now,
            tolerance,
        });
    }
    Ok(())
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
    fn ed25519_keys_sign_v1a_that_their_public_key_verifies() {
        let secret = generate_secret_key();
        let key = SigningKey::from_secret(&secret).unwrap();
        assert_eq!(key.scheme(), SignatureScheme::Ed25519);
        assert_eq!(
            SignatureScheme::of_secret(&secret),
            SignatureScheme::Ed25519
        );
        let public = key.public_key().unwrap();
        assert!(public.starts_with("whpk_"));
        let sig = key.sign(MSG_ID, TS, BODY);
        assert!(sig.starts_with("v1a,"));
        assert_eq!(STANDARD.decode(&sig[4..]).unwrap().len(), 64);
        let ok = verify_with_public_key(&public, MSG_ID, TS, BODY, &sig, TS, 10);
        assert_eq!(ok, Ok(()));
        assert_eq!(verify(&key, MSG_ID, TS, BODY, &sig, TS, 10), Ok(()));
        let bad = verify_with_public_key(&public, MSG_ID, TS, b"other", &sig, TS, 10);
        assert_eq!(bad, Err(SigningError::NoMatch));
        // A v1 entry never satisfies a v1a key, nor the other way round.
        let hmac = SigningKey::from_secret(SECRET).unwrap();
        let v1 = hmac.sign(MSG_ID, TS, BODY);
        assert_eq!(
            verify(&key, MSG_ID, TS, BODY, &v1, TS, 10),
            Err(SigningError::NoMatch)
        );
        assert_eq!(
            verify(&hmac, MSG_ID, TS, BODY, &sig, TS, 10),
            Err(SigningError::NoMatch)
        );
    }

    #[test]
    fn a_rotation_header_mixes_schemes_and_keys() {
        let old = SigningKey::from_secret(&generate_secret_key()).unwrap();
        let new = SigningKey::from_secret(&generate_secret_key()).unwrap();
        let header = signature_header(&[new.clone(), old.clone()], MSG_ID, TS, BODY);
        assert_eq!(header.matches("v1a,").count(), 2);
        for key in [&old, &new] {
            let public = key.public_key().unwrap();
            let ok = verify_with_public_key(&public, MSG_ID, TS, BODY, &header, TS, 10);
            assert_eq!(ok, Ok(()));
        }
    }

    #[test]
    fn bad_secret_keys_are_refused_with_the_rule() {
        let short = format!("whsk_{}", STANDARD.encode([7u8; 16]));
        let err = SigningKey::from_secret(&short).unwrap_err();
        assert!(err.to_string().contains("32-byte ed25519 seed"), "{err}");
        let seed = [9u8; 32];
        let mut pair = seed.to_vec();
        pair.extend_from_slice(&[1u8; 32]);
        let err = SigningKey::from_secret(&format!("whsk_{}", STANDARD.encode(&pair)));
        assert!(matches!(err, Err(SigningError::BadSecretKey(_))));
        let real = ed25519_dalek::SigningKey::from_bytes(&seed);
        pair.truncate(32);
        pair.extend_from_slice(real.verifying_key().as_bytes());
        assert!(SigningKey::from_secret(&format!("whsk_{}", STANDARD.encode(&pair))).is_ok());
        assert!(verify_with_public_key("whsec_x", MSG_ID, TS, BODY, "v1a,x", TS, 1).is_err());
    }

    #[test]
    fn bad_secrets_are_refused_with_the_rule() {
        assert!(SigningKey::from_secret("whsec_***").is_err());
        let short = format!("whsec_{}", STANDARD.encode([1u8; 8]));
        let err = SigningKey::from_secret(&short).unwrap_err();
        assert!(err.to_string().contains("24 to 64 bytes"));
    }
}
