//! Tenant quotas in the storage port, on both adapters: overrides are stored and read
//! back, and concurrent subscription creates of one tenant never exceed its quota (the
//! store's own serialisation, with no help from the service above it).

mod support;

use std::collections::BTreeMap;

use hookline_core::quota::{Quota, TenantQuotas};
use hookline_core::{Id, IdKind};
use hookline_store::StoreError;
use support::{Backend, Fixture, new_subscription};

on_both_backends! {
    current_thread tenant_quotas_are_stored_and_read_back(3);
    multi_thread concurrent_creates_never_exceed_the_subscription_quota(8);
}

async fn tenant_quotas_are_stored_and_read_back(fx: &Fixture) {
    let store = fx.store();
    let id = Id::new(IdKind::Tenant);
    let created = store
        .create_tenant(&id, "t", &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(created.quotas, TenantQuotas::default());
    let q = TenantQuotas {
        max_subscriptions: Some(7),
        max_deliveries_per_event: None,
        max_events_per_second: Some(2_147_483_647),
        weight: Some(3),
    };
    let set = store.set_tenant_quotas(&id, &q).await.unwrap();
    assert_eq!(set.quotas, q);
    assert_eq!(store.get_tenant(&id).await.unwrap().quotas, q);
    let listed = store.list_tenants(&Default::default()).await.unwrap();
    assert_eq!(listed.items[0].quotas, q);
    let err = store
        .set_tenant_quotas(&Id::new(IdKind::Tenant), &q)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    let err = store
        .create_subscription_within(&new_subscription(&Id::new(IdKind::Tenant)), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

async fn concurrent_creates_never_exceed_the_subscription_quota(fx: &Fixture) {
    let store = fx.shared();
    let tenant = Id::new(IdKind::Tenant);
    store
        .create_tenant(&tenant, "t", &BTreeMap::new())
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let (store, new) = (store.clone(), new_subscription(&tenant));
        calls.spawn(async move { store.create_subscription_within(&new, 50).await });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::Quota(q)) => {
                assert_eq!((q.quota, q.limit), (Quota::SubscriptionsPerTenant, 50));
                assert!(q.context.contains("has 50 subscriptions"), "{}", q.context);
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!((created, refused), (50, 250));
    assert_eq!(fx.count("subscriptions").await, 50);
    assert_eq!(
        fx.count("subscription_secrets").await,
        50,
        "nothing of a refused create"
    );

    // The tenant's own quota wins over the default given.
    let q = TenantQuotas {
        max_subscriptions: Some(52),
        ..TenantQuotas::default()
    };
    store.set_tenant_quotas(&tenant, &q).await.unwrap();
    for _ in 0..2 {
        store
            .create_subscription_within(&new_subscription(&tenant), 50)
            .await
            .unwrap();
    }
    let err = store
        .create_subscription_within(&new_subscription(&tenant), 50)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Quota(ref q) if q.limit == 52),
        "{err}"
    );
    drop(store);
}
