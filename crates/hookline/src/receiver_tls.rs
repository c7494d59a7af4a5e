//! The receiver TLS settings (`receiver_client_cert_file`, `receiver_client_key_file`,
//! `receiver_ca_file`) read and checked into what the dispatcher presents and trusts.
//! Read once at start: a bad file is a start-up error naming the setting.

use std::path::Path;

use anyhow::Context as _;
use hookline_core::client_cert::{self, ClientIdentity, MAX_PEM_BYTES};
use hookline_dispatcher::ReceiverTls;

/// Most bytes of the receiver CA bundle.
const MAX_CA_BUNDLE_BYTES: u64 = 1024 * 1024;

/// The three settings' files read and checked; the default from none set.
pub fn from_settings(
    client_cert_file: Option<&Path>,
    client_key_file: Option<&Path>,
    ca_file: Option<&Path>,
) -> anyhow::Result<ReceiverTls> {
    let default_identity = match (client_cert_file, client_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let identity = ClientIdentity {
                certificate_pem: read("receiver_client_cert_file", cert, MAX_PEM_BYTES as u64)?,
                private_key_pem: read("receiver_client_key_file", key, MAX_PEM_BYTES as u64)?,
            };
            let info = client_cert::validate("receiver_client", &identity, chrono::Utc::now())
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))
                .context("receiver_client_cert_file / receiver_client_key_file")?;
            tracing::info!(
                subject = %info.subject,
                not_after = %info.not_after,
                "default client certificate for receivers loaded"
            );
            Some(identity)
        }
        _ => anyhow::bail!(
            "receiver_client_cert_file and receiver_client_key_file go together: set both or neither"
        ),
    };
    let extra_roots_pem = match ca_file {
        None => None,
        Some(path) => {
            let pem = read("receiver_ca_file", path, MAX_CA_BUNDLE_BYTES)?;
            let count = client_cert::ca_bundle("receiver_ca_file", &pem)
                .map_err(|e| anyhow::anyhow!("{} {}: {}", e.field, path.display(), e.message))?;
            tracing::info!(certificates = count, "receiver CA bundle loaded");
            Some(pem)
        }
    };
    Ok(ReceiverTls {
        default_identity,
        extra_roots_pem,
    })
}

fn read(setting: &str, path: &Path, max: u64) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{setting} {}: cannot be read", path.display()))?
        .len();
    anyhow::ensure!(
        len <= max,
        "{setting} {}: is {len} bytes; allowed: at most {max}",
        path.display()
    );
    std::fs::read_to_string(path)
        .with_context(|| format!("{setting} {}: cannot be read as text", path.display()))
}
