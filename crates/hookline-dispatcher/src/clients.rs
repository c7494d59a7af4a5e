//! One HTTP client per TLS client identity: the default client (presenting the operator's
//! default client certificate, if any) and one per subscription certificate, built on
//! first use and kept in a bounded map keyed by the SHA-256 of the certificate and key.
//!
//! Every client is built by `http::build_client`, so each one resolves through the egress
//! policy, follows no redirect, uses only the operator's proxy, and trusts the operator's
//! extra receiver roots beside the platform's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hookline_core::client_cert::ClientIdentity;
use reqwest::{Certificate, Identity};
use sha2::{Digest, Sha256};

use crate::config::DispatcherConfig;
use crate::http::{self, HttpClient};

/// Most clients kept for subscription certificates; past it the map starts over (their
/// connections close when the last request using them ends).
pub(crate) const MAX_IDENTITY_CLIENTS: usize = 256;

/// The clients of a dispatcher.
pub(crate) struct Clients {
    cfg: Arc<DispatcherConfig>,
    roots: Vec<Certificate>,
    default: HttpClient,
    by_identity: Mutex<HashMap<[u8; 32], HttpClient>>,
}

impl Clients {
    /// Reads the extra roots and the default identity and builds the default client.
    pub(crate) fn new(cfg: &DispatcherConfig) -> Result<Self, String> {
        let roots = match &cfg.receiver_tls.extra_roots_pem {
            Some(pem) => Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("the receiver CA bundle is not PEM certificates: {e}"))?,
            None => Vec::new(),
        };
        let identity = cfg
            .receiver_tls
            .default_identity
            .as_ref()
            .map(reqwest_identity)
            .transpose()
            .map_err(|e| format!("the default client certificate: {e}"))?;
        let default = http::build_client(cfg, &roots, identity)
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            cfg: Arc::new(cfg.clone()),
            roots,
            default,
            by_identity: Mutex::new(HashMap::new()),
        })
    }

    /// The client that presents `identity` (`None`: the default client).
    pub(crate) fn get(&self, identity: Option<&ClientIdentity>) -> Result<HttpClient, String> {
        let Some(identity) = identity else {
            return Ok(self.default.clone());
        };
        let key = fingerprint(identity);
        if let Some(client) = self.lock().get(&key) {
            return Ok(client.clone());
        }
        let client = http::build_client(&self.cfg, &self.roots, Some(reqwest_identity(identity)?))
            .map_err(|e| format!("cannot build an HTTP client for the client certificate: {e}"))?;
        let mut map = self.lock();
        if map.len() >= MAX_IDENTITY_CLIENTS {
            map.clear();
        }
        Ok(map.entry(key).or_insert(client).clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], HttpClient>> {
        // A poisoned map only holds clients; keep using it.
        self.by_identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn reqwest_identity(identity: &ClientIdentity) -> Result<Identity, String> {
    let mut pem = identity.certificate_pem.clone();
    pem.push('\n');
    pem.push_str(&identity.private_key_pem);
    Identity::from_pem(pem.as_bytes())
        .map_err(|e| format!("the client certificate and key cannot be used: {e}"))
}

fn fingerprint(identity: &ClientIdentity) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(identity.certificate_pem.as_bytes());
    hash.update([0]);
    hash.update(identity.private_key_pem.as_bytes());
    hash.finalize().into()
}
