//! The control plane of the storage port (`RegistryStore`, `StoreHealth`, the schema),
//! run against both adapters: each case is one body, tested on a PostgreSQL database of its
//! own (`case::postgres`) and on a SQLite file of its own (`case::sqlite`).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use hookline_core::model::{PayloadFormat, SubscriptionSecret, SubscriptionState};
use hookline_core::{Id, IdKind};
use hookline_store::{NewApiKey, NewSubscription, PageRequest, StoreError};
use support::{Backend, Fixture, Store};

on_both_backends! {
    current_thread migrations_apply_twice_and_the_store_answers_pings(5);
    current_thread tenants_crud_and_pagination_across_pages(5);
    current_thread subscriptions_create_get_list_update_delete(5);
    current_thread rotate_secret_keeps_the_old_one_live_until_it_expires(5);
    current_thread current_secrets_are_read_in_bulk(5);
    current_thread deleting_a_tenant_cascades_to_everything_it_owns(5);
    current_thread api_keys_create_find_list_revoke(5);
    current_thread event_types_catalogue(5);
    current_thread oversized_numbers_are_refused_not_truncated(5);
    current_thread input_failures_name_their_field(5);
    current_thread an_unreachable_database_is_unavailable_and_transient(5);
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn page(after: Option<String>, limit: u32) -> PageRequest {
    PageRequest { after, limit }
}

fn secret_for(subscription_id: &Id, value: &str) -> SubscriptionSecret {
    SubscriptionSecret {
        id: Id::new(IdKind::Secret),
        subscription_id: subscription_id.clone(),
        secret: value.to_string(),
        created_at: Utc::now(),
        expires_at: None,
    }
}

fn new_subscription(tenant_id: &Id) -> NewSubscription {
    let id = Id::new(IdKind::Subscription);
    NewSubscription {
        ordering: Default::default(),
        client_identity: None,
        payload_format: PayloadFormat::Envelope,
        secret: secret_for(&id, "whsec_c2VjcmV0LW9uZS1zZWNyZXQtb25lLXNlY3JldA=="),
        id,
        tenant_id: tenant_id.clone(),
        url: "https://receiver.example/hooks".to_string(),
        description: "billing".to_string(),
        event_types: vec!["invoice.*".to_string(), "customer.created".to_string()],
        channels: vec!["eu".to_string()],
        headers: meta(&[("x-team", "billing")]),
        rate_limit_per_second: Some(20),
        max_in_flight: Some(4),
        retry_schedule: Some(vec![
            Duration::from_secs(5),
            Duration::from_millis(1500),
            Duration::from_secs(3600),
        ]),
        state: SubscriptionState::Enabled,
        metadata: meta(&[("owner", "ops")]),
    }
}

async fn tenant(store: &dyn Store, name: &str) -> Id {
    let id = Id::new(IdKind::Tenant);
    store
        .create_tenant(&id, name, &BTreeMap::new())
        .await
        .expect("create tenant");
    id
}

async fn migrations_apply_twice_and_the_store_answers_pings(fx: &Fixture) {
    let store = fx.store();
    fx.migrate().await.expect("second migrate is a no-op");
    fx.migrate_from_another_pool().await;

    let applied = fx.applied_migrations().await;
    assert_eq!(applied, fx.known_migrations());
    for table in [
        "tenants",
        "api_keys",
        "event_types",
        "subscriptions",
        "subscription_secrets",
        "events",
        "deliveries",
        "delivery_outbox",
        "attempts",
        "retry_schedule",
    ] {
        assert_eq!(fx.count(table).await, 0, "{table}");
    }
    store.ping().await.expect("ping");
}

async fn tenants_crud_and_pagination_across_pages(fx: &Fixture) {
    let store = fx.store();

    let id = Id::new(IdKind::Tenant);
    let created = store
        .create_tenant(&id, "Acme", &meta(&[("plan", "pro")]))
        .await
        .expect("create");
    assert_eq!(created.id, id);
    assert_eq!(created.name, "Acme");
    assert_eq!(created.metadata, meta(&[("plan", "pro")]));
    assert_eq!(store.get_tenant(&id).await.expect("get"), created);

    let err = store
        .create_tenant(&id, "Acme again", &BTreeMap::new())
        .await
        .expect_err("duplicate id");
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains(id.as_str())),
        "{err}"
    );

    // Only the name changes; metadata is kept.
    let renamed = store
        .update_tenant(&id, Some("Acme Corp"), None)
        .await
        .expect("rename");
    assert_eq!(renamed.name, "Acme Corp");
    assert_eq!(renamed.metadata, meta(&[("plan", "pro")]));
    assert_eq!(renamed.created_at, created.created_at);
    assert!(renamed.updated_at >= created.updated_at);
    // Only the metadata changes; the name is kept.
    let retagged = store
        .update_tenant(&id, None, Some(&meta(&[("plan", "free")])))
        .await
        .expect("retag");
    assert_eq!(retagged.name, "Acme Corp");
    assert_eq!(retagged.metadata, meta(&[("plan", "free")]));

    let mut all = vec![id.clone()];
    for i in 0..6 {
        all.push(tenant(store, &format!("t{i}")).await);
    }
    all.sort();

    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let p = store.list_tenants(&page(cursor, 3)).await.expect("list");
        pages += 1;
        assert!(p.items.len() <= 3);
        seen.extend(p.items.iter().map(|t| t.id.clone()));
        match p.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, all);

    // Exactly one page's worth: no next cursor.
    let p = store.list_tenants(&page(None, 7)).await.expect("list");
    assert_eq!(p.items.len(), 7);
    assert_eq!(p.next_cursor, None);
    // Limit 0 means the default.
    let p = store.list_tenants(&page(None, 0)).await.expect("list");
    assert_eq!(p.items.len(), 7);

    store.delete_tenant(&id).await.expect("delete");
    for err in [
        store.get_tenant(&id).await.expect_err("gone"),
        store.delete_tenant(&id).await.expect_err("gone"),
        store
            .update_tenant(&id, Some("x"), None)
            .await
            .expect_err("gone"),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound { entity: "tenant", id: got } if got == id.as_str()),
            "{err}"
        );
    }
}

async fn subscriptions_create_get_list_update_delete(fx: &Fixture) {
    let store = fx.store();
    let t1 = tenant(store, "one").await;
    let t2 = tenant(store, "two").await;

    let new = new_subscription(&t1);
    let sub = store.create_subscription(&new).await.expect("create");
    assert_eq!(sub.id, new.id);
    assert_eq!(sub.tenant_id, t1);
    assert_eq!(sub.url, new.url);
    assert_eq!(sub.description, new.description);
    assert_eq!(sub.event_types, new.event_types);
    assert_eq!(sub.channels, new.channels);
    assert_eq!(sub.headers, new.headers);
    assert_eq!(sub.rate_limit_per_second, Some(20));
    assert_eq!(sub.max_in_flight, Some(4));
    assert_eq!(sub.retry_schedule, new.retry_schedule);
    assert_eq!(sub.state, SubscriptionState::Enabled);
    assert_eq!(sub.disabled_reason, None);
    assert_eq!(sub.metadata, new.metadata);
    assert_eq!(sub.payload_format, PayloadFormat::Envelope);
    assert_eq!(store.get_subscription(&sub.id).await.expect("get"), sub);

    // The first secret was written with it.
    let secrets = store
        .live_secrets(&sub.id, Utc::now())
        .await
        .expect("secrets");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].id, new.secret.id);
    assert_eq!(secrets[0].subscription_id, sub.id);
    assert_eq!(secrets[0].secret, new.secret.secret);
    assert_eq!(secrets[0].expires_at, None);

    // Duplicate id: conflict, and nothing half-written.
    let err = store.create_subscription(&new).await.expect_err("dup");
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    // Unknown tenant: the tenant is what is not found; the secret was not written either.
    let ghost = Id::new(IdKind::Tenant);
    let err = store
        .create_subscription(&new_subscription(&ghost))
        .await
        .expect_err("no tenant");
    assert!(
        matches!(&err, StoreError::NotFound { entity: "tenant", id } if id == ghost.as_str()),
        "{err}"
    );
    assert_eq!(fx.count("subscription_secrets").await, 1);

    // No limits and the default schedule round-trip as None.
    let mut plain = new_subscription(&t1);
    plain.rate_limit_per_second = None;
    plain.max_in_flight = None;
    plain.retry_schedule = None;
    plain.event_types = vec![];
    plain.channels = vec![];
    plain.headers = BTreeMap::new();
    let plain = store.create_subscription(&plain).await.expect("create");
    assert_eq!(plain.rate_limit_per_second, None);
    assert_eq!(plain.retry_schedule, None);
    assert!(plain.event_types.is_empty());
    let other = store
        .create_subscription(&new_subscription(&t2))
        .await
        .expect("create");

    let mut mine = vec![sub.id.clone(), plain.id.clone()];
    mine.sort();
    let p1 = store
        .list_subscriptions(&t1, &page(None, 1))
        .await
        .expect("list");
    assert_eq!(p1.items.len(), 1);
    let p2 = store
        .list_subscriptions(&t1, &page(p1.next_cursor.clone(), 1))
        .await
        .expect("list");
    assert_eq!(p2.next_cursor, None);
    let listed: Vec<Id> = p1
        .items
        .iter()
        .chain(&p2.items)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(listed, mine);

    // Update replaces the mutable fields, keeps id, tenant and created_at.
    let mut changed = sub.clone();
    changed.url = "https://receiver.example/v2".to_string();
    changed.description = "billing v2".to_string();
    changed.event_types = vec!["invoice.paid".to_string()];
    changed.channels = vec![];
    changed.headers = meta(&[("x-team", "payments"), ("x-env", "prod")]);
    changed.rate_limit_per_second = None;
    changed.max_in_flight = Some(1);
    changed.retry_schedule = Some(vec![Duration::from_secs(1)]);
    changed.state = SubscriptionState::Disabled;
    changed.disabled_reason = Some("410 Gone".to_string());
    changed.metadata = BTreeMap::new();
    changed.payload_format = PayloadFormat::Raw;
    changed.tenant_id = t2.clone();
    let updated = store.update_subscription(&changed).await.expect("update");
    assert_eq!(updated.tenant_id, t1, "the tenant is kept");
    assert_eq!(updated.created_at, sub.created_at);
    assert!(updated.updated_at >= sub.updated_at);
    assert_eq!(updated.url, changed.url);
    assert_eq!(updated.description, changed.description);
    assert_eq!(updated.event_types, changed.event_types);
    assert!(updated.channels.is_empty());
    assert_eq!(updated.headers, changed.headers);
    assert_eq!(updated.rate_limit_per_second, None);
    assert_eq!(updated.max_in_flight, Some(1));
    assert_eq!(updated.retry_schedule, changed.retry_schedule);
    assert_eq!(updated.state, SubscriptionState::Disabled);
    assert_eq!(updated.disabled_reason.as_deref(), Some("410 Gone"));
    assert!(updated.metadata.is_empty());
    assert_eq!(updated.payload_format, PayloadFormat::Raw);
    assert_eq!(store.get_subscription(&sub.id).await.expect("get"), updated);

    // Only enabled ones match.
    let enabled = store.enabled_subscriptions(&t1).await.expect("enabled");
    assert_eq!(
        enabled.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&plain.id]
    );
    let enabled = store.enabled_subscriptions(&t2).await.expect("enabled");
    assert_eq!(
        enabled.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&other.id]
    );

    // Delete takes its secrets with it.
    store.delete_subscription(&sub.id).await.expect("delete");
    assert_eq!(fx.count("subscription_secrets").await, 2);
    let missing = Id::new(IdKind::Subscription);
    let mut ghost_sub = updated.clone();
    ghost_sub.id = missing.clone();
    for (err, want) in [
        (
            store.get_subscription(&sub.id).await.expect_err("gone"),
            &sub.id,
        ),
        (
            store.delete_subscription(&sub.id).await.expect_err("gone"),
            &sub.id,
        ),
        (
            store
                .update_subscription(&ghost_sub)
                .await
                .expect_err("gone"),
            &missing,
        ),
        (
            store
                .live_secrets(&missing, Utc::now())
                .await
                .expect_err("gone"),
            &missing,
        ),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound { entity: "subscription", id } if id == want.as_str()),
            "{err}"
        );
    }
}

async fn current_secrets_are_read_in_bulk(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store, "t").await;
    let (one, two) = (new_subscription(&t), new_subscription(&t));
    store.create_subscription(&one).await.expect("create one");
    store.create_subscription(&two).await.expect("create two");
    let rotated = secret_for(&two.id, "whsec_dHdvLXR3by10d28tdHdvLXR3by10d28=");
    let grace = Utc::now() + TimeDelta::hours(1);
    store.rotate_secret(&rotated, grace).await.expect("rotate");

    let missing = Id::new(IdKind::Subscription);
    let ids = [one.id.clone(), two.id.clone(), missing];
    let current = store.current_secrets(&ids).await.expect("current");
    assert_eq!(
        current.len(),
        2,
        "nothing for a subscription that does not exist"
    );
    assert_eq!(current[&one.id].id, one.secret.id);
    assert_eq!(
        current[&two.id].id, rotated.id,
        "the rotated-in secret, not the old one"
    );
    assert!(store.current_secrets(&[]).await.expect("none").is_empty());
}

async fn rotate_secret_keeps_the_old_one_live_until_it_expires(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store, "t").await;
    let new = new_subscription(&t);
    let sub = store.create_subscription(&new).await.expect("create");
    let before = store.get_subscription(&sub.id).await.expect("get");

    let now = Utc::now();
    let grace = now + TimeDelta::hours(1);
    let second = secret_for(&sub.id, "whsec_dHdvLXR3by10d28tdHdvLXR3by10d28=");
    store.rotate_secret(&second, grace).await.expect("rotate");

    let live = store.live_secrets(&sub.id, now).await.expect("live");
    let ids: Vec<&Id> = live.iter().map(|s| &s.id).collect();
    assert_eq!(ids, vec![&second.id, &new.secret.id], "newest first");
    assert_eq!(live[0].expires_at, None);
    let old_expiry = live[1].expires_at.expect("old secret expires");
    assert!((old_expiry - grace).abs() < TimeDelta::milliseconds(1));

    // After the grace period only the new one is live.
    let later = store
        .live_secrets(&sub.id, grace + TimeDelta::seconds(1))
        .await
        .expect("live");
    assert_eq!(
        later.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&second.id]
    );

    // Rotating again: the current one gets its own grace; the first keeps its expiry.
    let third = secret_for(&sub.id, "whsec_dGhyZWUtdGhyZWUtdGhyZWUtdGhyZWU=");
    store
        .rotate_secret(&third, now + TimeDelta::minutes(30))
        .await
        .expect("rotate");
    let live = store.live_secrets(&sub.id, now).await.expect("live");
    assert_eq!(
        live.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&third.id, &second.id, &new.secret.id]
    );
    assert_eq!(
        live.iter().filter(|s| s.expires_at.is_none()).count(),
        1,
        "one current secret"
    );

    // Rotation counts as a change of the subscription.
    let after = store.get_subscription(&sub.id).await.expect("get");
    assert!(after.updated_at >= before.updated_at);

    // Rotating with an immediate expiry drops the current one from the live set at once.
    let fourth = secret_for(&sub.id, "whsec_Zm91ci1mb3VyLWZvdXItZm91ci1mb3Vy");
    store
        .rotate_secret(&fourth, Utc::now() - TimeDelta::seconds(1))
        .await
        .expect("rotate");
    let live = store.live_secrets(&sub.id, Utc::now()).await.expect("live");
    assert_eq!(
        live.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&fourth.id, &second.id, &new.secret.id]
    );

    // Unknown subscription.
    let ghost = Id::new(IdKind::Subscription);
    let err = store
        .rotate_secret(&secret_for(&ghost, "whsec_x"), grace)
        .await
        .expect_err("no subscription");
    assert!(
        matches!(&err, StoreError::NotFound { entity: "subscription", id } if id == ghost.as_str()),
        "{err}"
    );
    // Reusing a secret id is a conflict, and the rotation is rolled back.
    let err = store
        .rotate_secret(&fourth, grace)
        .await
        .expect_err("dup secret id");
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let live_after = store.live_secrets(&sub.id, Utc::now()).await.expect("live");
    assert_eq!(live_after, live);
}

async fn deleting_a_tenant_cascades_to_everything_it_owns(fx: &Fixture) {
    let store = fx.store();
    let doomed = tenant(store, "doomed").await;
    let kept = tenant(store, "kept").await;

    for t in [&doomed, &kept] {
        let sub = store
            .create_subscription(&new_subscription(t))
            .await
            .expect("sub");
        store
            .create_api_key(&NewApiKey {
                id: Id::new(IdKind::ApiKey),
                name: "ci".to_string(),
                tenant_id: Some(t.clone()),
                token_prefix: "hl_abc".to_string(),
                token_hash: [if t == &doomed { 7 } else { 8 }; 32],
            })
            .await
            .expect("key");
        // The data plane, written directly so that this test depends on the schema only
        // (tests/pipeline.rs checks the same through the store's own methods).
        let event = Id::new(IdKind::Event);
        let delivery = Id::new(IdKind::Delivery);
        fx.execute(
            "INSERT INTO events (id, tenant_id, event_type, payload, channels) \
             VALUES ($1, $2, 'invoice.paid', '\\x7b7d'::bytea, '{}')",
            "INSERT INTO events (id, tenant_id, event_type, payload, channels) \
             VALUES ($1, $2, 'invoice.paid', x'7b7d', '[]')",
            &[event.as_str(), t.as_str()],
        )
        .await;
        let sql = "INSERT INTO deliveries (id, event_id, tenant_id, subscription_id, event_type) \
                   VALUES ($1, $2, $3, $4, 'invoice.paid')";
        fx.execute(
            sql,
            sql,
            &[
                delivery.as_str(),
                event.as_str(),
                t.as_str(),
                sub.id.as_str(),
            ],
        )
        .await;
        let sql = "INSERT INTO delivery_outbox (delivery_id) VALUES ($1)";
        fx.execute(sql, sql, &[delivery.as_str()]).await;
        fx.execute(
            "INSERT INTO attempts (id, delivery_id, attempt_number, started_at, duration_ms, \
             status_code) VALUES ($1, $2, 1, now(), 12, 500)",
            "INSERT INTO attempts (id, delivery_id, attempt_number, started_at, duration_ms, \
             status_code) VALUES ($1, $2, 1, 1700000000000000, 12, 500)",
            &[Id::new(IdKind::Attempt).as_str(), delivery.as_str()],
        )
        .await;
        fx.execute(
            "INSERT INTO retry_schedule (delivery_id, due_at, attempt_number) \
             VALUES ($1, now(), 2)",
            "INSERT INTO retry_schedule (delivery_id, due_at, attempt_number) \
             VALUES ($1, 1700000000000000, 2)",
            &[delivery.as_str()],
        )
        .await;
    }

    store.delete_tenant(&doomed).await.expect("delete");
    for table in [
        "tenants",
        "api_keys",
        "subscriptions",
        "subscription_secrets",
        "events",
        "deliveries",
        "delivery_outbox",
        "attempts",
        "retry_schedule",
    ] {
        assert_eq!(
            fx.count(table).await,
            1,
            "{table}: only the kept tenant's row"
        );
    }
    assert_eq!(store.get_tenant(&kept).await.expect("kept").id, kept);
}

fn new_key(tenant_id: Option<&Id>, hash_byte: u8) -> NewApiKey {
    NewApiKey {
        id: Id::new(IdKind::ApiKey),
        name: format!("key {hash_byte}"),
        tenant_id: tenant_id.cloned(),
        token_prefix: format!("hl_{hash_byte:02x}"),
        token_hash: [hash_byte; 32],
    }
}

async fn api_keys_create_find_list_revoke(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store, "t").await;

    let admin = store
        .create_api_key(&new_key(None, 1))
        .await
        .expect("admin");
    assert_eq!(admin.tenant_id, None);
    assert_eq!(admin.token_prefix, "hl_01");
    assert_eq!(admin.revoked_at, None);
    let scoped_new = new_key(Some(&t), 2);
    let scoped = store.create_api_key(&scoped_new).await.expect("scoped");
    assert_eq!(scoped.tenant_id.as_ref(), Some(&t));
    assert_eq!(scoped.name, scoped_new.name);

    assert_eq!(
        store.find_api_key_by_hash(&[1; 32]).await.expect("find"),
        admin
    );
    assert_eq!(
        store.find_api_key_by_hash(&[2; 32]).await.expect("find"),
        scoped
    );
    let used = fx.last_used_at(&admin.id).await;
    assert!(used.is_some(), "finding a key records its use");
    let err = store
        .find_api_key_by_hash(&[9; 32])
        .await
        .expect_err("unknown");
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "API key",
                ..
            }
        ),
        "{err}"
    );

    // Same token twice, same id twice, unknown tenant.
    let mut dup_hash = new_key(None, 1);
    dup_hash.name = "copy".to_string();
    let err = store.create_api_key(&dup_hash).await.expect_err("dup hash");
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("token")),
        "{err}"
    );
    let mut dup_id = new_key(None, 3);
    dup_id.id = admin.id.clone();
    let err = store.create_api_key(&dup_id).await.expect_err("dup id");
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains(admin.id.as_str())),
        "{err}"
    );
    let ghost = Id::new(IdKind::Tenant);
    let err = store
        .create_api_key(&new_key(Some(&ghost), 4))
        .await
        .expect_err("no tenant");
    assert!(
        matches!(&err, StoreError::NotFound { entity: "tenant", id } if id == ghost.as_str()),
        "{err}"
    );

    // Listing: admin keys and a tenant's keys are separate lists.
    let more_admin = store
        .create_api_key(&new_key(None, 5))
        .await
        .expect("admin 2");
    let admins = store
        .list_api_keys(None, &page(None, 1))
        .await
        .expect("list");
    assert_eq!(admins.items.len(), 1);
    let rest = store
        .list_api_keys(None, &page(admins.next_cursor.clone(), 1))
        .await
        .expect("list");
    assert_eq!(rest.next_cursor, None);
    let mut got: Vec<Id> = admins
        .items
        .iter()
        .chain(&rest.items)
        .map(|k| k.id.clone())
        .collect();
    got.sort();
    let mut want = vec![admin.id.clone(), more_admin.id.clone()];
    want.sort();
    assert_eq!(got, want);
    let of_tenant = store
        .list_api_keys(Some(&t), &PageRequest::default())
        .await
        .expect("list");
    assert_eq!(of_tenant.items, vec![scoped.clone()]);

    // Revoked keys no longer authenticate but can still be read; revoking is idempotent.
    let revoked = store.revoke_api_key(&scoped.id).await.expect("revoke");
    let at = revoked.revoked_at.expect("revoked_at set");
    let err = store
        .find_api_key_by_hash(&[2; 32])
        .await
        .expect_err("revoked");
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "API key",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.get_api_key(&scoped.id).await.expect("get"), revoked);
    let again = store
        .revoke_api_key(&scoped.id)
        .await
        .expect("revoke again");
    assert_eq!(again.revoked_at, Some(at));

    let missing = Id::new(IdKind::ApiKey);
    for err in [
        store.get_api_key(&missing).await.expect_err("missing"),
        store.revoke_api_key(&missing).await.expect_err("missing"),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound { entity: "API key", id } if id == missing.as_str()),
            "{err}"
        );
    }
}

async fn event_types_catalogue(fx: &Fixture) {
    let store = fx.store();

    let paid = store
        .create_event_type(
            "invoice.paid",
            "An invoice was paid",
            Some(r#"{"type":"object"}"#),
        )
        .await
        .expect("create");
    assert_eq!(paid.name, "invoice.paid");
    assert_eq!(paid.description, "An invoice was paid");
    let schema: serde_json::Value =
        serde_json::from_str(paid.schema.as_deref().expect("schema")).expect("json");
    assert_eq!(schema, serde_json::json!({"type": "object"}));
    assert!(!paid.archived);
    assert_eq!(
        store.get_event_type("invoice.paid").await.expect("get"),
        paid
    );

    let err = store
        .create_event_type("invoice.paid", "", None)
        .await
        .expect_err("dup");
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("invoice.paid")),
        "{err}"
    );

    for name in ["customer.created", "customer.deleted", "invoice.voided"] {
        store
            .create_event_type(name, "", None)
            .await
            .expect("create");
    }
    let archived = store
        .update_event_type("customer.deleted", None, None, Some(true))
        .await
        .expect("archive");
    assert!(archived.archived);
    assert_eq!(archived.description, "");

    // Name order, across pages, with and without the archived ones.
    let mut names = Vec::new();
    let mut cursor = None;
    loop {
        let p = store
            .list_event_types(true, &page(cursor, 2))
            .await
            .expect("list");
        names.extend(p.items.into_iter().map(|t| t.name));
        match p.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        names,
        [
            "customer.created",
            "customer.deleted",
            "invoice.paid",
            "invoice.voided"
        ]
    );
    let active = store
        .list_event_types(false, &PageRequest::default())
        .await
        .expect("list");
    assert_eq!(
        active
            .items
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["customer.created", "invoice.paid", "invoice.voided"]
    );

    // Description changes alone; the schema is kept, then cleared.
    let described = store
        .update_event_type("invoice.paid", Some("Paid in full"), None, None)
        .await
        .expect("describe");
    assert_eq!(described.description, "Paid in full");
    assert_eq!(described.schema, paid.schema);
    assert!(described.updated_at >= paid.updated_at);
    let cleared = store
        .update_event_type("invoice.paid", None, Some(None), None)
        .await
        .expect("clear schema");
    assert_eq!(cleared.schema, None);
    assert_eq!(cleared.description, "Paid in full");

    store
        .delete_event_type("invoice.voided")
        .await
        .expect("delete");
    for err in [
        store
            .get_event_type("invoice.voided")
            .await
            .expect_err("gone"),
        store
            .delete_event_type("invoice.voided")
            .await
            .expect_err("gone"),
        store
            .update_event_type("invoice.voided", Some("x"), None, None)
            .await
            .expect_err("gone"),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound { entity: "event type", id } if id == "invoice.voided"),
            "{err}"
        );
    }
}

async fn oversized_numbers_are_refused_not_truncated(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store, "t").await;
    let mut new = new_subscription(&t);
    new.rate_limit_per_second = Some(u32::MAX);
    let err = store.create_subscription(&new).await.expect_err("too big");
    assert!(err.to_string().contains("rate_limit_per_second"), "{err}");
    assert_eq!(fx.count("subscriptions").await, 0);
}

/// What the store cannot hold is `InvalidInput` naming the field (a request to fix), never a
/// driver error, and nothing is stored.
async fn input_failures_name_their_field(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store, "t").await;
    let field_of = |err: StoreError| match err {
        StoreError::InvalidInput { field, .. } => field,
        other => panic!("not InvalidInput: {other:?}"),
    };

    let mut new = new_subscription(&t);
    new.max_in_flight = Some(u32::MAX);
    let err = store.create_subscription(&new).await.expect_err("too big");
    assert_eq!(field_of(err), "max_in_flight");

    let mut new = new_subscription(&t);
    new.retry_schedule = Some(vec![Duration::MAX]);
    let err = store.create_subscription(&new).await.expect_err("too long");
    assert_eq!(field_of(err), "retry_schedule");
    assert_eq!(fx.count("subscriptions").await, 0);

    let quotas = hookline_core::quota::TenantQuotas {
        max_subscriptions: Some(u32::MAX),
        ..Default::default()
    };
    let err = store
        .set_tenant_quotas(&t, &quotas)
        .await
        .expect_err("too big");
    assert_eq!(field_of(err), "quotas.max_subscriptions");
    let stored = store.get_tenant(&t).await.expect("tenant");
    assert_eq!(stored.quotas.max_subscriptions, None);
}

/// A database the store cannot reach answers `Unavailable` (try again later), not a fault.
async fn an_unreachable_database_is_unavailable_and_transient(fx: &Fixture) {
    let store = fx.store();
    let t = tenant(store, "t").await;
    fx.close_store().await;
    let err = store.get_tenant(&t).await.expect_err("closed");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(err.is_transient(), "{err:?}");
    assert!(!err.is_out_of_space(), "{err:?}");
}
