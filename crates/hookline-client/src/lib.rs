//! A client for publishers of [Hookline](https://github.com/hookline/hookline), the
//! self-hosted webhook delivery platform.
//!
//! [`Client::publish`] sends one event; Hookline signs it and delivers it to every
//! matching subscription of the tenant, retrying on its own schedule. The client gives
//! every event an idempotency key unless you set one, so it can safely send a publish
//! again when the server was `UNAVAILABLE` (a restart, a lost connection): the server
//! stores each key once. [`Client::publish_batch`] sends many events in as few calls as
//! the server allows. Errors tell a request to fix from an outage to wait out
//! ([`Error::is_retryable`]).
//!
//! Every other call of the API (tenants, subscriptions, deliveries…) is reachable
//! through [`Client::registry`], [`Client::ingest`] and [`Client::deliveries`], with
//! [`Client::request`] adding the API key.
//!
//! ```no_run
//! use hookline_client::{Client, Event};
//!
//! # async fn run() -> Result<(), hookline_client::Error> {
//! let client = Client::builder("127.0.0.1:50051")
//!     .token("hl_…")
//!     .connect()
//!     .await?;
//! let published = client
//!     .publish(Event::new("ten_01J…", "invoice.paid", r#"{"amount": 42}"#))
//!     .await?;
//! println!("{} reached {} subscriptions", published.event_id, published.deliveries_created);
//! # Ok(())
//! # }
//! ```
//!
//! The connection is gRPC over HTTP/2: plaintext for `host:port` or `http://…`, TLS
//! (rustls, ring) for `https://…`, trusting the public roots or only the CA given to
//! [`ClientBuilder::ca_certificate`]; [`ClientBuilder::client_identity`] presents a
//! client certificate to a server that requires one (mTLS).

mod endpoint;
mod error;
mod event;

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
pub use hookline_proto::v1 as pb;
use pb::delivery_service_client::DeliveryServiceClient;
use pb::ingest_service_client::IngestServiceClient;
use pb::registry_service_client::RegistryServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

pub use endpoint::normalize as normalize_server;
pub use error::{Error, code_name};
pub use event::Event;

/// The most events one `PublishBatch` call takes.
pub const MAX_BATCH: usize = 1000;

/// How a [`Client`] is made: where, with which key, how patient.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    server: String,
    token: Option<String>,
    connect_timeout: Duration,
    retry: RetryPolicy,
    tls: TlsOptions,
}

/// What `https://` connections trust and present.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificates to trust instead of the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsOptions {
    /// Reads the PEM files of `--ca`, `--client-cert` and `--client-key` (the last two
    /// go together).
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self, Error> {
        let read = |path: &std::path::Path, what: &str| {
            let bytes = std::fs::read(path).map_err(|e| Error::TlsFile {
                path: path.display().to_string(),
                reason: format!("cannot read it: {e}"),
            })?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(Error::TlsFile {
                    path: path.display().to_string(),
                    reason: format!("it holds no PEM block; expected {what}"),
                });
            }
            Ok(bytes)
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c, "a certificate")?, read(k, "a private key")?)),
            (None, None) => None,
            (Some(p), None) | (None, Some(p)) => {
                return Err(Error::TlsFile {
                    path: p.display().to_string(),
                    reason: "--client-cert and --client-key go together; give both".into(),
                });
            }
        };
        Ok(Self {
            ca_pem: ca.map(|p| read(p, "CA certificates")).transpose()?,
            identity,
        })
    }

    /// The tonic TLS configuration of these options.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }

    /// `endpoint` with these options when `url` is `https://`; unchanged otherwise.
    pub fn apply(
        &self,
        url: &str,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        if url.starts_with("https://") {
            endpoint.tls_config(self.client_config())
        } else {
            Ok(endpoint)
        }
    }
}

/// How often and how patiently a publish is sent again after `UNAVAILABLE`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries after the first one; 0 never retries.
    pub max_retries: usize,
    /// The first pause; each next one doubles, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl ClientBuilder {
    /// The API key, sent as `authorization: Bearer <token>`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// PEM CA certificates trusted for `https://` instead of the public roots (a private
    /// CA).
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_pem = Some(pem.into());
        self
    }

    /// A PEM client certificate chain and key, for servers that require one (mTLS).
    pub fn client_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Every TLS option at once (see [`TlsOptions::from_files`]).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How publishes are retried on `UNAVAILABLE` (default: 5 retries, 100 ms doubling
    /// to 5 s).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Connects now; fails at once when the server cannot be reached.
    pub async fn connect(self) -> Result<Client, Error> {
        let url = endpoint::normalize(&self.server)?;
        let invalid = |e: &dyn std::fmt::Display| Error::InvalidEndpoint {
            server: self.server.clone(),
            reason: e.to_string(),
        };
        let endpoint = Channel::from_shared(url.clone()).map_err(|e| invalid(&e))?;
        let channel = self
            .tls
            .apply(&url, endpoint)
            .map_err(|e| invalid(&e))?
            .connect_timeout(self.connect_timeout)
            .connect()
            .await
            .map_err(|source| Error::Connect {
                server: self.server.clone(),
                source,
            })?;
        let token = match self.token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| Error::InvalidToken)?,
            ),
            None => None,
        };
        Ok(Client {
            channel,
            token,
            retry: self.retry,
        })
    }
}

/// A connection to a Hookline server. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    retry: RetryPolicy,
}

impl Client {
    /// Starts building a client for `server`: `host:port`, `http://host:port` or
    /// `https://host:port`.
    pub fn builder(server: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            server: server.into(),
            token: None,
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            tls: TlsOptions::default(),
        }
    }

    /// `msg` as a request carrying the API key.
    pub fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Error> {
        let mut req = tonic::Request::new(msg);
        let token = self.token.clone().ok_or(Error::NoToken)?;
        req.metadata_mut().insert("authorization", token);
        Ok(req)
    }

    /// The registry API: tenants, subscriptions, secrets, event types, API keys.
    pub fn registry(&self) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel.clone())
    }

    /// The ingest API: publish, read events back.
    pub fn ingest(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::new(self.channel.clone())
    }

    /// The delivery API: list, inspect, retry, replay and watch deliveries.
    pub fn deliveries(&self) -> DeliveryServiceClient<Channel> {
        DeliveryServiceClient::new(self.channel.clone())
    }

    /// Publishes one event. Without an idempotency key the event gets a fresh one, so a
    /// retry after `UNAVAILABLE` never stores the event twice.
    pub async fn publish(&self, event: Event) -> Result<pb::PublishResponse, Error> {
        let msg = event.into_request();
        self.with_retries(|| async {
            let req = self.request(msg.clone())?;
            Ok(self.ingest().publish(req).await?.into_inner())
        })
        .await
    }

    /// Publishes many events, [`MAX_BATCH`] per call, each call all-or-nothing. Answers
    /// one result per event, in order. On an error, the calls before it were stored
    /// (their events are not sent again by a retry: every event has its key).
    pub async fn publish_batch(
        &self,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<Vec<pb::PublishResponse>, Error> {
        let all: Vec<pb::PublishRequest> = events.into_iter().map(Event::into_request).collect();
        let mut results = Vec::with_capacity(all.len());
        for chunk in all.chunks(MAX_BATCH) {
            let msg = pb::PublishBatchRequest {
                events: chunk.to_vec(),
            };
            let res = self
                .with_retries(|| async {
                    let req = self.request(msg.clone())?;
                    Ok(self.ingest().publish_batch(req).await?.into_inner())
                })
                .await?;
            results.extend(res.results);
        }
        Ok(results)
    }

    /// Runs `call` again after `UNAVAILABLE`, with exponential backoff.
    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        call.retry(
            ExponentialBuilder::default()
                .with_min_delay(self.retry.first_delay)
                .with_max_delay(self.retry.max_delay)
                .with_max_times(self.retry.max_retries)
                .with_jitter(),
        )
        .when(|e: &Error| e.code() == Some(Code::Unavailable))
        .await
    }
}
