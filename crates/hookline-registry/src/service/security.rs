//! The signing scheme and the client certificate of a subscription, as the API shows and
//! takes them: the scheme is read from the current secret's prefix (`whsec_` HMAC `v1`,
//! `whsk_` ed25519 `v1a`), an ed25519 secret key is shown only as its `whpk_` public key,
//! and a client certificate is shown as its subject, fingerprint and expiry, never its key.

use std::collections::HashMap;

use chrono::Utc;
use hookline_core::client_cert::{self, ClientIdentity};
use hookline_core::model::SubscriptionSecret;
use hookline_core::signing::{SignatureScheme, SigningKey};
use hookline_core::{Id, IdKind};
use hookline_grpc::convert;
use hookline_grpc::status::{from_store, from_validation, invalid};
use hookline_proto::v1 as pb;
use hookline_store::port::RegistryStore;
use tonic::Status;

/// The scheme a create request asks for (unspecified: HMAC).
pub(super) fn scheme_from(field: &str, value: i32) -> Result<SignatureScheme, Status> {
    match pb::SignatureScheme::try_from(value) {
        Ok(pb::SignatureScheme::Unspecified | pb::SignatureScheme::HmacSha256) => {
            Ok(SignatureScheme::HmacSha256)
        }
        Ok(pb::SignatureScheme::Ed25519) => Ok(SignatureScheme::Ed25519),
        Err(_) => Err(invalid(
            field,
            format!(
                "unknown value {value}; allowed: SIGNATURE_SCHEME_HMAC_SHA256 (1), \
                 SIGNATURE_SCHEME_ED25519 (2)"
            ),
        )),
    }
}

fn scheme_to_pb(scheme: SignatureScheme) -> pb::SignatureScheme {
    match scheme {
        SignatureScheme::HmacSha256 => pb::SignatureScheme::HmacSha256,
        SignatureScheme::Ed25519 => pb::SignatureScheme::Ed25519,
    }
}

/// What a caller may see of a stored secret: an ed25519 secret key is shown as its public
/// key; an HMAC secret as itself (the receiver needs it).
pub(super) fn shown_secret(secret: &str) -> String {
    match SigningKey::from_secret(secret) {
        Ok(key) => key.public_key().unwrap_or_else(|| secret.to_string()),
        Err(_) => secret.to_string(),
    }
}

/// The scheme of the subscription's current secret, so that a rotation keeps it.
pub(super) async fn current_scheme(
    store: &dyn RegistryStore,
    id: &Id,
) -> Result<SignatureScheme, Status> {
    let live = store
        .live_secrets(id, Utc::now())
        .await
        .map_err(from_store)?;
    Ok(current(&live).map_or(SignatureScheme::HmacSha256, |s| {
        SignatureScheme::of_secret(&s.secret)
    }))
}

/// The current secret among the live ones (the one without an expiry, else the newest).
pub(super) fn current(live: &[SubscriptionSecret]) -> Option<&SubscriptionSecret> {
    live.iter()
        .find(|s| s.expires_at.is_none())
        .or(live.first())
}

/// The client certificate given on input, checked; `None` when the message is absent or
/// carries neither PEM (which removes the certificate on update).
pub(super) fn given_identity(
    field: &str,
    given: Option<&pb::ClientCertificate>,
) -> Result<Option<ClientIdentity>, Status> {
    let Some(given) = given else {
        return Ok(None);
    };
    if given.certificate_pem.is_empty() && given.private_key_pem.is_empty() {
        return Ok(None);
    }
    let identity = ClientIdentity {
        certificate_pem: given.certificate_pem.clone(),
        private_key_pem: given.private_key_pem.clone(),
    };
    client_cert::validate(field, &identity, Utc::now()).map_err(from_validation)?;
    Ok(Some(identity))
}

/// Fills the output-only `signature_scheme` and `client_certificate` of shown subscriptions.
pub(super) async fn decorate(
    store: &dyn RegistryStore,
    subs: &mut [pb::Subscription],
) -> Result<(), Status> {
    let ids: Vec<Option<Id>> = subs
        .iter()
        .map(|s| Id::parse(IdKind::Subscription, "id", &s.id).ok())
        .collect();
    let known: Vec<Id> = ids.iter().flatten().cloned().collect();
    let identities: HashMap<Id, ClientIdentity> =
        store.client_identities(&known).await.map_err(from_store)?;
    let secrets = store.current_secrets(&known).await.map_err(from_store)?;
    for (sub, id) in subs.iter_mut().zip(&ids) {
        let Some(id) = id else { continue };
        let scheme = secrets.get(id).map_or(SignatureScheme::HmacSha256, |s| {
            SignatureScheme::of_secret(&s.secret)
        });
        sub.signature_scheme = scheme_to_pb(scheme) as i32;
        sub.client_certificate = identities.get(id).map(shown_certificate);
    }
    Ok(())
}

fn shown_certificate(identity: &ClientIdentity) -> pb::ClientCertificate {
    match client_cert::describe(&identity.certificate_pem) {
        Ok(info) => pb::ClientCertificate {
            subject: info.subject,
            sha256_fingerprint: info.sha256_fingerprint,
            not_after: Some(convert::timestamp(info.not_after)),
            ..Default::default()
        },
        // Checked when given; a stored chain that no longer reads still says it is there.
        Err(e) => pb::ClientCertificate {
            subject: format!("(unreadable: {})", e.message),
            ..Default::default()
        },
    }
}
