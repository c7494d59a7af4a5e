//! A running `hookline serve --services all` with an admin key, one tenant and gRPC
//! clients: the start most end-to-end tests share. Tests add their own helpers in an
//! `impl TenantServer` block of their own.

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::Channel;

use super::receiver::{Behavior, Receiver};
use super::{Backend, Env, Server, authed};

pub struct TenantServer {
    pub env: Env,
    pub server: Server,
    pub admin: String,
    pub tenant: String,
    pub registry: RegistryServiceClient<Channel>,
    pub ingest: IngestServiceClient<Channel>,
}

impl TenantServer {
    /// Starts the server with extra `HOOKLINE_*` settings and creates tenant `acme`.
    pub async fn start(backend: Backend, settings: &[(&str, &str)]) -> Self {
        let env = Env::with(backend).await;
        let admin = env.admin_key().await;
        let server = env.serve_with("all", settings).await;
        let channel = super::channel(&server).await;
        let tenant = super::create_tenant(&channel, &admin, "acme", None).await;
        TenantServer {
            env,
            server,
            admin,
            tenant,
            registry: RegistryServiceClient::new(channel.clone()),
            ingest: IngestServiceClient::new(channel).max_decoding_message_size(8 << 20),
        }
    }

    /// Creates a subscription of `tenant` to `receiver`'s endpoint `name`, which answers
    /// as `behavior` and checks signatures with the subscription's secret.
    pub async fn subscribe_receiver(
        &mut self,
        tenant: &str,
        receiver: &Receiver,
        name: &str,
        behavior: Behavior,
    ) {
        let created = self
            .registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: tenant.to_owned(),
                        url: receiver.endpoint(name, behavior),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .expect("create a subscription")
            .into_inner();
        receiver.set_secret(name, &created.secret);
    }

    /// Stops the server, requires a clean exit, and drops the test's database.
    pub async fn finish(self) {
        let status = self.server.terminate().await;
        assert!(status.success(), "hookline exited with {status}");
        self.env.finish().await;
    }
}
