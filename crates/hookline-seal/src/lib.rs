//! The operator keyring that seals secrets at rest (issue #10 part 4).
//!
//! Signing secrets, custom header values and private keys are stored *sealed*: encrypted
//! and authenticated with XChaCha20-Poly1305 under a 256-bit operator key. Several keys are
//! accepted at once, each with an id; the first one seals, every one opens. A sealed value
//! describes itself, so rows sealed under different keys live side by side while a key is
//! rotated:
//!
//! ```text
//! hlsealed:v1:<key-id>:<base64url, no padding, of nonce (24 bytes) ‖ ciphertext ‖ tag (16 bytes)>
//! ```
//!
//! A value without the `hlsealed:` prefix is plaintext written before sealing existed; it
//! is opened as itself until the store seals it (see `hookline_store::sealing`).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::Zeroizing;

/// What every sealed value starts with (format version 1).
pub const PREFIX: &str = "hlsealed:v1:";
/// Bytes of an operator key.
pub const KEY_LEN: usize = 32;
/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Why a keyring could not be made or a value could not be opened. Messages never carry
/// key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("invalid encryption key: {0}")]
    BadKey(String),
    #[error(
        "a value is sealed under encryption key id {0:?}, which is not configured; add that \
         key to the keyring (after the current key)"
    )]
    UnknownKey(String),
    #[error("a sealed value under key id {0:?} is damaged or was not sealed by that key")]
    Corrupt(String),
}

/// How a stored value stands against a keyring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Plaintext, written before sealing (or while no key was configured).
    Plain,
    /// Sealed under the current key.
    Current,
    /// Sealed under another accepted key: readable, re-sealed by a rotation.
    Old(String),
    /// Sealed under a key id the keyring does not have.
    Unknown(String),
}

struct SealKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The accepted keys, the first of them current. `Debug` shows the ids only.
pub struct Keyring {
    keys: Vec<SealKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("ids", &self.ids()).finish()
    }
}

impl Keyring {
    /// Parses `id:base64key[,id:base64key…]` (commas, whitespace or new lines between
    /// entries; `#` starts a comment line in a key file). The first entry is the current
    /// key; the others are only opened with. Each key is 32 bytes in standard or URL-safe
    /// base64 (`openssl rand -base64 32`); ids are 1 to 32 of `A-Z a-z 0-9 _ -`.
    pub fn parse(spec: &str) -> Result<Keyring, SealError> {
        let mut keys: Vec<SealKey> = Vec::new();
        let entries = spec
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split([',', ' ', '\t']))
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for entry in entries {
            let (id, material) = entry.split_once(':').ok_or_else(|| {
                SealError::BadKey("each key is written `<id>:<base64 of 32 bytes>`".into())
            })?;
            check_id(id)?;
            if keys.iter().any(|k| k.id == id) {
                return Err(SealError::BadKey(format!("key id {id:?} is given twice")));
            }
            keys.push(SealKey {
                id: id.to_string(),
                cipher: cipher(id, material)?,
            });
        }
        if keys.is_empty() {
            return Err(SealError::BadKey(
                "no key given; write `<id>:<base64 of 32 bytes>`".into(),
            ));
        }
        Ok(Keyring { keys })
    }

    /// A new random key under `id`, as the text [`Keyring::parse`] reads (for a key file).
    pub fn generate_spec(id: &str) -> Result<Zeroizing<String>, SealError> {
        check_id(id)?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(key.as_mut());
        Ok(Zeroizing::new(format!("{id}:{}\n", STANDARD.encode(*key))))
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Every accepted key id, the current one first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `plaintext` under the current key, with a fresh random nonce.
    pub fn seal(&self, plaintext: &str) -> String {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = key
            .cipher
            .encrypt(&XNonce::from(nonce), plaintext.as_bytes())
            .expect("XChaCha20-Poly1305 seals any message that fits in memory");
        let mut raw = Vec::with_capacity(NONCE_LEN + sealed.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        format!("{PREFIX}{}:{}", key.id, URL_SAFE_NO_PAD.encode(raw))
    }

    /// The plaintext of a stored value: opened under the key its id names, or the value
    /// itself when it is not sealed (written before sealing).
    pub fn open(&self, stored: &str) -> Result<String, SealError> {
        let Some((id, body)) = split(stored) else {
            return Ok(stored.to_string());
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.to_string()))?;
        let corrupt = || SealError::Corrupt(id.to_string());
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| corrupt())?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(corrupt());
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| corrupt())?;
        let plain = key.cipher.decrypt(&nonce, sealed).map_err(|_| corrupt())?;
        String::from_utf8(plain).map_err(|_| corrupt())
    }

    /// How `stored` stands against this keyring (no decryption).
    pub fn standing(&self, stored: &str) -> Standing {
        match split(stored) {
            None => Standing::Plain,
            Some((id, _)) if id == self.current_id() => Standing::Current,
            Some((id, _)) if self.keys.iter().any(|k| k.id == id) => Standing::Old(id.into()),
            Some((id, _)) => Standing::Unknown(id.into()),
        }
    }
}

/// The key id of a sealed value, `None` for plaintext.
pub fn sealed_key_id(stored: &str) -> Option<&str> {
    split(stored).map(|(id, _)| id)
}

/// Whether `stored` is a sealed value (whichever key sealed it).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

fn split(stored: &str) -> Option<(&str, &str)> {
    stored.strip_prefix(PREFIX)?.split_once(':')
}

fn check_id(id: &str) -> Result<(), SealError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SealError::BadKey(format!(
            "key id {:?} must be 1 to {MAX_KEY_ID_LEN} of A-Z a-z 0-9 _ -",
            id.chars().take(40).collect::<String>()
        )))
    }
}

fn cipher(id: &str, material: &str) -> Result<XChaCha20Poly1305, SealError> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(material)
            .or_else(|_| URL_SAFE.decode(material))
            .or_else(|_| URL_SAFE_NO_PAD.decode(material))
            .map_err(|_| SealError::BadKey(format!("key {id:?} is not valid base64")))?,
    );
    if bytes.len() != KEY_LEN {
        return Err(SealError::BadKey(format!(
            "key {id:?} decodes to {} bytes; it must be {KEY_LEN} (`openssl rand -base64 32`)",
            bytes.len()
        )));
    }
    let key = Key::try_from(&bytes[..]).map_err(|_| SealError::BadKey("key length".into()))?;
    Ok(XChaCha20Poly1305::new(&key))
}

#[cfg(test)]
mod tests;
