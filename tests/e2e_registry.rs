//! `hookline serve --services registry` as a child process: reflection lists the
//! registry, an admin key made by `hookline admin create-key` creates and lists a tenant
//! and a subscription, the admin port answers, and SIGTERM stops it cleanly.

mod support;

use hookline_proto::v1 as pb;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::{Env, authed, http_get};
use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

#[tokio::test]
async fn registry_serves_grpc_with_reflection_and_stops_on_sigterm() {
    let env = Env::new().await;
    let admin = env.admin_key().await;
    let server = env.serve("registry").await;

    // Reflection, as grpcurl uses it: no .proto at hand.
    let channel = tonic::transport::Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"hookline.v1.RegistryService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut client = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let tenant = client
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let created = client
        .create_subscription(authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.id.clone(),
                    url: "https://example.com/webhooks".into(),
                    event_types: vec!["invoice.*".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let listed = client
        .list_subscriptions(authed(
            pb::ListSubscriptionsRequest {
                tenant_id: tenant.id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 1);
    assert_eq!(
        Some(&listed.subscriptions[0]),
        created.subscription.as_ref()
    );

    let (code, body) = http_get(&server.admin, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(&server.admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("database: ok") && body.contains("broker: ok"),
        "{body}"
    );
    let (code, body) = http_get(&server.admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("hookline_build_info"), "{body}");

    let status = server.terminate().await;
    assert!(status.success(), "hookline exited with {status} on SIGTERM");
    env.finish().await;
}

#[tokio::test]
async fn unknown_services_and_bad_configuration_fail_with_a_clear_message() {
    let out = tokio::process::Command::new(support::BIN)
        .args(["serve", "--services", "registry,frobnicator"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown service \"frobnicator\""),
        "{stderr}"
    );
    assert!(stderr.contains("allowed:"), "{stderr}");

    let out = tokio::process::Command::new(support::BIN)
        .args(["serve", "--log-format", "yaml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("log_format"), "{stderr}");
}
