//! Input limits against the real binary, on both backends: header names, numeric fields
//! that must fit storage, given secrets, payload depth, UTF-8 and size stated in exact
//! bytes, and the JSON Schema of an event type enforced on publish. Each refusal is
//! INVALID_ARGUMENT naming the field and what is allowed.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use hookline_proto::v1 as pb;
use support::tenant::TenantServer;
use support::{Backend, authed};
use tonic::Code;

/// The shared start, with this file's helpers below.
type Limits = TenantServer;

impl Limits {
    async fn create(
        &mut self,
        edit: impl FnOnce(&mut pb::CreateSubscriptionRequest),
    ) -> Result<pb::CreateSubscriptionResponse, tonic::Status> {
        let mut req = pb::CreateSubscriptionRequest {
            subscription: Some(pb::Subscription {
                tenant_id: self.tenant.clone(),
                url: "https://receiver.invalid/hook".into(),
                ..Default::default()
            }),
            start_disabled: true,
            ..Default::default()
        };
        edit(&mut req);
        self.registry
            .create_subscription(authed(req, &self.admin))
            .await
            .map(|r| r.into_inner())
    }

    async fn publish(&mut self, event_type: &str, payload: Vec<u8>) -> Result<(), tonic::Status> {
        self.ingest
            .publish(authed(
                pb::PublishRequest {
                    tenant_id: self.tenant.clone(),
                    event_type: event_type.into(),
                    payload,
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .map(|_| ())
    }

    async fn event_type(&mut self, name: &str, schema: &str) -> Result<(), tonic::Status> {
        self.registry
            .create_event_type(authed(
                pb::CreateEventTypeRequest {
                    name: name.into(),
                    description: String::new(),
                    schema: schema.into(),
                },
                &self.admin,
            ))
            .await
            .map(|_| ())
    }
}

fn invalid(result: Result<impl std::fmt::Debug, tonic::Status>, needles: &[&str]) -> String {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "{:?} lacks {n:?}",
            status.message()
        );
    }
    status.message().to_string()
}

fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn header_names_are_bounded_and_platform_ones_refused(backend: Backend) {
    let mut l = Limits::start(backend, &[]).await;
    let long = "a".repeat(100_000);
    let message = invalid(
        l.create(|r| {
            r.subscription.as_mut().unwrap().headers = headers(&[(long.as_str(), "v")]);
        })
        .await,
        &[
            "subscription.headers",
            "100,000 characters",
            "the limit is 256",
        ],
    );
    assert!(
        message.len() < 400,
        "the whole name is repeated: {} bytes",
        message.len()
    );
    for name in [
        "Metadata-Flavor",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Forwarded",
        "Proxy-Authorization",
        "Host",
    ] {
        invalid(
            l.create(|r| r.subscription.as_mut().unwrap().headers = headers(&[(name, "x")]))
                .await,
            &["subscription.headers", name, "cannot be set"],
        );
    }
    let ok = "b".repeat(256);
    l.create(|r| r.subscription.as_mut().unwrap().headers = headers(&[(ok.as_str(), "v")]))
        .await
        .unwrap();
    l.finish().await;
}

async fn numbers_that_storage_cannot_hold_are_invalid_not_unavailable(backend: Backend) {
    let mut l = Limits::start(backend, &[]).await;
    invalid(
        l.create(|r| r.subscription.as_mut().unwrap().rate_limit_per_second = u32::MAX)
            .await,
        &["subscription.rate_limit_per_second: is 4,294,967,295; allowed: 0 to 2,147,483,647"],
    );
    invalid(
        l.create(|r| r.subscription.as_mut().unwrap().max_in_flight = 2_147_483_648)
            .await,
        &["subscription.max_in_flight: is 2,147,483,648; allowed: 0 to 2,147,483,647"],
    );
    let created = l
        .create(|r| r.subscription.as_mut().unwrap().rate_limit_per_second = 2_147_483_647)
        .await
        .unwrap();
    let mut sub = created.subscription.unwrap();
    sub.max_in_flight = u32::MAX;
    let admin = l.admin.clone();
    let updated = l
        .registry
        .update_subscription(authed(
            pb::UpdateSubscriptionRequest {
                subscription: Some(sub),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["max_in_flight".into()],
                }),
            },
            &admin,
        ))
        .await;
    invalid(updated, &["max_in_flight", "allowed: 0 to 2,147,483,647"]);
    l.finish().await;
}

async fn given_secrets_must_be_24_to_64_bytes_not_all_equal(backend: Backend) {
    let mut l = Limits::start(backend, &[]).await;
    let b64 = |b: &[u8]| {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    };
    let zeros = b64(&[0u8; 24]);
    invalid(
        l.create(|r| r.secret = zeros.clone()).await,
        &["secret", "all the same"],
    );
    invalid(
        l.create(|r| r.secret = b64(&[7u8; 65])).await,
        &["secret", "24 to 64 bytes"],
    );
    invalid(
        l.create(|r| r.secret = b64(&[1, 2, 3])).await,
        &["secret", "24 to 64 bytes"],
    );
    let good = b64(&(0u8..24).collect::<Vec<_>>());
    let created = l.create(|r| r.secret = good.clone()).await.unwrap();
    assert_eq!(created.secret, good);
    let admin = l.admin.clone();
    let rotated = l
        .registry
        .rotate_secret(authed(
            pb::RotateSecretRequest {
                subscription_id: created.subscription.unwrap().id,
                grace_period: None,
                secret: b64(&[0xAB; 32]),
            },
            &admin,
        ))
        .await;
    invalid(rotated, &["secret", "all the same"]);
    l.finish().await;
}

async fn payloads_are_bounded_in_depth_utf8_and_exact_bytes(backend: Backend) {
    let mut l = Limits::start(backend, &[]).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    invalid(
        l.publish("order.created", deep.into_bytes()).await,
        &["payload", "more than 128 levels", "the limit is 128"],
    );
    let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
    l.publish("order.created", ok.into_bytes()).await.unwrap();
    invalid(
        l.publish("order.created", b"{\"name\":\"caf\xe9\"}".to_vec())
            .await,
        &["payload", "not valid UTF-8 at byte 12"],
    );
    let mut big = vec![b' '; 1_048_577];
    big[..2].copy_from_slice(b"{}");
    invalid(
        l.publish("order.created", big).await,
        &["payload: is 1,048,577 bytes; the limit is 1,048,576"],
    );
    l.finish().await;
}

const SCHEMA: &str = r#"{"type":"object","required":["amount"],
    "properties":{"amount":{"type":"integer","minimum":0},
                  "lines":{"type":"array","items":{"type":"string"}}}}"#;

async fn the_schema_of_an_event_type_is_enforced_on_publish(backend: Backend) {
    let mut l = Limits::start(backend, &[]).await;
    invalid(
        l.event_type("bad.schema", r#"{"type":"no-such-type"}"#)
            .await,
        &["schema", "not a usable JSON Schema"],
    );
    invalid(
        l.event_type("remote.schema", r#"{"$ref":"http://169.254.169.254/x"}"#)
            .await,
        &["schema", "not a usable JSON Schema"],
    );
    l.event_type("invoice.paid", SCHEMA).await.unwrap();
    l.publish("invoice.paid", br#"{"amount":5,"lines":["a"]}"#.to_vec())
        .await
        .unwrap();
    invalid(
        l.publish("invoice.paid", br#"{"amount":5,"lines":["a",7]}"#.to_vec())
            .await,
        &["payload", "invoice.paid", "JSON pointer \"/lines/1\""],
    );
    invalid(
        l.publish("invoice.paid", br#"{"lines":[]}"#.to_vec()).await,
        &["payload", "amount"],
    );
    // A type without a schema, or not in the catalogue, takes any JSON.
    l.publish("not.catalogued", br#"{"anything":true}"#.to_vec())
        .await
        .unwrap();

    // A changed schema applies from the registry's announcement on.
    let admin = l.admin.clone();
    l.registry
        .update_event_type(authed(
            pb::UpdateEventTypeRequest {
                name: "invoice.paid".into(),
                schema: Some(r#"{"type":"object","required":["currency"]}"#.into()),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match l.publish("invoice.paid", br#"{"amount":5}"#.to_vec()).await {
            Err(e) if e.code() == Code::InvalidArgument => {
                assert!(e.message().contains("currency"), "{}", e.message());
                break;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the new schema never applied: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    l.finish().await;
}

on_both_backends!(
    header_names_are_bounded_and_platform_ones_refused,
    numbers_that_storage_cannot_hold_are_invalid_not_unavailable,
    given_secrets_must_be_24_to_64_bytes_not_all_equal,
    payloads_are_bounded_in_depth_utf8_and_exact_bytes,
    the_schema_of_an_event_type_is_enforced_on_publish,
);
