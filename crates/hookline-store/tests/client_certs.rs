//! Client certificates of subscriptions (mutual TLS to receivers) in the storage port, on
//! both adapters: written with the subscription, replaced, removed, read in bulk, and gone
//! with the subscription.

mod support;

use std::collections::BTreeMap;

use hookline_core::client_cert::ClientIdentity;
use hookline_core::{Id, IdKind};
use hookline_store::{NewSubscription, StoreError};
use support::{Backend, Fixture};

on_both_backends! {
    current_thread client_certificates_are_stored_replaced_and_removed(3);
}

fn identity(tag: &str) -> ClientIdentity {
    ClientIdentity {
        certificate_pem: format!("-----BEGIN CERTIFICATE-----\n{tag}\n"),
        private_key_pem: format!("-----BEGIN PRIVATE KEY-----\n{tag}\n"),
    }
}

fn new_subscription(tenant_id: &Id, client_identity: Option<ClientIdentity>) -> NewSubscription {
    NewSubscription {
        ordering: Default::default(),
        client_identity,
        ..support::new_subscription(tenant_id)
    }
}

async fn client_certificates_are_stored_replaced_and_removed(fx: &Fixture) {
    let store = fx.store();
    let tenant = Id::new(IdKind::Tenant);
    store
        .create_tenant(&tenant, "t", &BTreeMap::new())
        .await
        .expect("tenant");
    let with = new_subscription(&tenant, Some(identity("a")));
    let without = new_subscription(&tenant, None);
    store.create_subscription(&with).await.expect("create with");
    store
        .create_subscription(&without)
        .await
        .expect("create without");

    let ids = [with.id.clone(), without.id.clone()];
    let found = store.client_identities(&ids).await.expect("read");
    assert_eq!(found.len(), 1);
    assert_eq!(found.get(&with.id), Some(&identity("a")));

    let before = store.get_subscription(&without.id).await.expect("get");
    store
        .set_client_identity(&without.id, Some(&identity("b")))
        .await
        .expect("set");
    store
        .set_client_identity(&with.id, Some(&identity("c")))
        .await
        .expect("replace");
    let found = store.client_identities(&ids).await.expect("read");
    assert_eq!(found.get(&with.id), Some(&identity("c")));
    assert_eq!(found.get(&without.id), Some(&identity("b")));
    let after = store.get_subscription(&without.id).await.expect("get");
    assert!(
        after.updated_at > before.updated_at,
        "setting a certificate is an update"
    );

    store
        .set_client_identity(&with.id, None)
        .await
        .expect("remove");
    let found = store.client_identities(&ids).await.expect("read");
    assert_eq!(found.keys().collect::<Vec<_>>(), vec![&without.id]);

    let missing = Id::new(IdKind::Subscription);
    let err = store
        .set_client_identity(&missing, Some(&identity("x")))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");

    store
        .delete_subscription(&without.id)
        .await
        .expect("delete");
    assert!(
        store
            .client_identities(&ids)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(fx.count("subscription_client_certs").await, 0);
}
