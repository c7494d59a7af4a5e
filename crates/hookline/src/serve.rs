//! Composition: builds the adapters, starts the requested services on one gRPC port and
//! the admin HTTP port, and stops them all on SIGTERM.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hookline_broker::Broker;
use hookline_core::{Id, IdKind};
use hookline_dispatcher::{Dispatcher, DispatcherConfig};
use hookline_grpc::{Authenticator, auth, standard};
use hookline_ingest::{IngestApi, IngestConfig, SubscriptionMatcher};
use hookline_outbox::{Relay, RelayConfig};
use hookline_proto::v1 as pb;
use hookline_registry::RegistryApi;
use hookline_retry::{DeliveryApi, Scheduler, SchedulerConfig};
use hookline_store::port::{NewApiKey, RegistryStore};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::admin_http::{self, AdminState};
use crate::backends::{self, Mode};
use crate::config::Config;
use crate::egress_config;
use crate::shutdown;

/// The services one process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Registry,
    Ingest,
    Dispatcher,
    Retry,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Registry,
        Service::Ingest,
        Service::Dispatcher,
        Service::Retry,
    ];

    fn name(self) -> &'static str {
        match self {
            Service::Registry => "registry",
            Service::Ingest => "ingest",
            Service::Dispatcher => "dispatcher",
            Service::Retry => "retry",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `registry,ingest,…`; `all` means all four.
pub fn parse_services(list: &str) -> anyhow::Result<BTreeSet<Service>> {
    let mut out = BTreeSet::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if raw == "all" {
            out.extend(Service::ALL);
            continue;
        }
        let Some(service) = Service::ALL.into_iter().find(|s| s.name() == raw) else {
            bail!("unknown service {raw:?}; allowed: all, registry, ingest, dispatcher, retry");
        };
        out.insert(service);
    }
    if out.is_empty() {
        bail!("--services names no service; allowed: all, registry, ingest, dispatcher, retry");
    }
    Ok(out)
}

/// An API key just created, with the token that is shown only this once.
pub struct CreatedKey {
    pub description: String,
    pub token: String,
}

impl fmt::Display for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "created API key {}; the token is shown only now:\n{}",
            self.description, self.token
        )
    }
}

/// Creates an API key (an admin key without `tenant`).
pub async fn create_key(
    store: &dyn RegistryStore,
    name: &str,
    tenant: Option<&str>,
) -> anyhow::Result<CreatedKey> {
    hookline_core::validate::name("--name", name)?;
    let tenant_id = match tenant {
        Some(t) => {
            let id = Id::parse(IdKind::Tenant, "--tenant", t)?;
            store
                .get_tenant(&id)
                .await
                .with_context(|| format!("tenant {id}"))?;
            Some(id)
        }
        None => None,
    };
    let token = auth::generate_token();
    let key = store
        .create_api_key(&NewApiKey {
            id: Id::new(IdKind::ApiKey),
            name: name.to_string(),
            tenant_id,
            token_prefix: token.prefix,
            token_hash: token.hash,
        })
        .await
        .context("storing the key")?;
    let scope = key
        .tenant_id
        .map(|t| format!("tenant {t}"))
        .unwrap_or_else(|| "admin".into());
    Ok(CreatedKey {
        description: format!("{} ({scope})", key.id),
        token: token.token,
    })
}

pub async fn serve(config: Config, services: BTreeSet<Service>) -> anyhow::Result<()> {
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    metrics::gauge!("hookline_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let shutdown = CancellationToken::new();
    shutdown::on_signal(shutdown.clone());

    let mode = Mode::from_config(&config)?;
    mode.check_services(&services)?;
    let (store, fresh) = backends::open_store(&mode, &config).await?;
    if config.migrate_on_start || matches!(mode, Mode::Embedded { .. }) {
        store.migrate().await?;
    }
    let connection_name = format!(
        "hookline:{}:{}",
        config.queue_prefix,
        services
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join("+")
    );
    let broker = backends::open_broker(&mode, &config, &store, connection_name).await?;
    let registry_store = store.registry();
    let event_store = store.events();
    let delivery_store = store.deliveries();
    let authenticator = Authenticator::new(registry_store.clone());
    let egress_settings = egress_config::Egress::from_config(&config)?;
    let egress = hookline_egress::Egress::system(egress_settings.policy);
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    tasks.push(spawn_cache_invalidation(
        broker.clone(),
        authenticator.clone(),
        shutdown.clone(),
    ));

    let (health_reporter, health_service) = standard::health();
    let mut router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(standard::reflection_v1()?)
        .add_service(standard::reflection_v1alpha()?);
    if services.contains(&Service::Registry) {
        let api = RegistryApi::new(
            registry_store.clone(),
            broker.clone(),
            authenticator.clone(),
        )
        .with_egress(egress.clone());
        router = router.add_service(api.into_server());
        health_reporter
            .set_serving::<pb::registry_service_server::RegistryServiceServer<RegistryApi>>()
            .await;
    }
    if services.contains(&Service::Ingest) {
        let matcher = SubscriptionMatcher::new(registry_store.clone());
        tasks.push(tokio::spawn(
            matcher.clone().follow(broker.clone(), shutdown.clone()),
        ));
        let api = IngestApi::new(
            IngestConfig {
                max_payload_bytes: config.max_payload_bytes,
                ..IngestConfig::default()
            },
            event_store.clone(),
            matcher,
            broker.clone(),
            authenticator.clone(),
        );
        router = router.add_service(api.into_server());
        health_reporter
            .set_serving::<pb::ingest_service_server::IngestServiceServer<IngestApi>>()
            .await;
    }
    if services.contains(&Service::Retry) {
        let scheduler = Scheduler::new(
            SchedulerConfig {
                poll_interval: Duration::from_millis(config.retry_poll_interval_ms),
                ..SchedulerConfig::default()
            },
            delivery_store.clone(),
            event_store.clone(),
            broker.clone(),
        );
        tasks.push(tokio::spawn(scheduler.run(shutdown.clone())));
        let relay = Relay::new(
            RelayConfig {
                grace: Duration::from_millis(config.relay_grace_ms),
                ..RelayConfig::default()
            },
            event_store.clone(),
            broker.clone(),
        );
        tasks.push(tokio::spawn(relay.run(shutdown.clone())));
        let api = DeliveryApi::new(
            delivery_store.clone(),
            event_store.clone(),
            registry_store.clone(),
            broker.clone(),
            authenticator.clone(),
        );
        router = router.add_service(api.into_server());
        health_reporter
            .set_serving::<pb::delivery_service_server::DeliveryServiceServer<DeliveryApi>>()
            .await;
    }
    if services.contains(&Service::Dispatcher) {
        let dispatcher = Dispatcher::new(
            DispatcherConfig {
                concurrency: config.dispatcher_concurrency,
                prefetch: config.dispatcher_prefetch,
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                egress: egress.clone(),
                egress_proxy: egress_settings.proxy.clone(),
                ..DispatcherConfig::default()
            },
            registry_store.clone(),
            delivery_store.clone(),
            broker.clone(),
        )
        .context("cannot start the dispatcher")?;
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dispatcher.run(stop.clone()).await {
                tracing::error!(error = %e, "dispatcher stopped with an error; shutting down");
                stop.cancel();
            }
        }));
    }

    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_addr))?;
    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen for admin HTTP on {}", config.admin_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let names: Vec<_> = services.iter().map(|s| s.name()).collect();
    // Machine-readable lines: tests and scripts read the bound ports from here.
    println!("hookline: grpc listening on {grpc_addr}");
    println!("hookline: admin listening on {admin_addr}");
    println!("hookline: services {}", names.join(","));
    if let Mode::Embedded { data_dir } = &mode {
        println!("hookline: embedded backends in {}", data_dir.display());
        if fresh {
            let key = create_key(registry_store.as_ref(), "admin", None).await?;
            println!(
                "{}",
                first_start_banner(grpc_addr, admin_addr, &key.token, egress.policy())
            );
        }
    }
    tracing::info!(%grpc_addr, %admin_addr, services = ?names, "serving");

    tasks.push(tokio::spawn(report_gauges(
        store.health(),
        broker.clone(),
        shutdown.clone(),
    )));
    let admin = tokio::spawn(admin_http::serve(
        admin_listener,
        AdminState {
            store: store.health(),
            broker: broker.clone(),
            metrics,
        },
        shutdown.clone(),
    ));
    let grpc = router.serve_with_incoming_shutdown(
        TcpListenerStream::new(grpc_listener),
        shutdown.clone().cancelled_owned(),
    );
    let grpc_result = grpc.await;
    shutdown.cancel();
    let admin_result = admin.await;
    // Let the workers finish what they hold (the dispatcher records in-flight outcomes).
    for task in tasks {
        let _ = task.await;
    }
    store.close().await;
    grpc_result.context("gRPC server failed")?;
    admin_result
        .context("admin server task failed")?
        .context("admin server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Drops cached API-key lookups when the registry announces a change (or after a
/// reconnection, when changes may have been missed).
fn spawn_cache_invalidation(
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut changes = match broker.changes().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow registry changes; caches expire on their own");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                notice = changes.next() => match notice {
                    Some(_) => auth.invalidate(),
                    None => return,
                },
            }
        }
    })
}

/// What a newcomer sees on the first start of an embedded Hookline: where everything
/// listens, the admin key (shown this once), and commands to paste.
fn first_start_banner(
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    token: &str,
    egress: &hookline_egress::EgressPolicy,
) -> String {
    let allowed = if egress.check([127, 0, 0, 1].into()).is_ok() {
        "127.0.0.1 is allowed"
    } else {
        "127.0.0.1 is refused"
    };
    format!(
        r#"
Hookline is running (embedded: every service in this process, state in SQLite).
  gRPC API (registry, ingest, deliveries): {grpc}   reflection on: grpcurl -plaintext {grpc} list
  admin HTTP: http://{admin}/healthz  /readyz  /metrics

First start: an admin API key was created. It is shown only now; keep it:
  {token}

Receivers on this machine: the egress policy refuses loopback and private addresses by
default (tenants must not reach your admin port or database). For a local receiver, start
the server with HOOKLINE_EGRESS_ALLOW=127.0.0.1/32 (now: {allowed}).

Try it (in another terminal, with a receiver listening on http://127.0.0.1:8000/webhook):
  export HOOKLINE_SERVER=http://{grpc} HOOKLINE_TOKEN={token}
  hookline tenants create --name acme                                   # prints ten_…
  hookline subscriptions create --tenant ten_… --url http://127.0.0.1:8000/webhook --event-type 'invoice.*'
  hookline publish --tenant ten_… --type invoice.paid --data '{{"amount": 42}}'
  hookline tail --tenant ten_…
(`hookline` is `cargo run --release -p hookline --` from a checkout.)
"#
    )
}

/// How often the gauges of queue depth, retry backlog and subscription states are read.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the gauges that need a query fresh: queue depths, the retry backlog and the
/// age of its oldest due entry, the outbox, and subscriptions by state.
async fn report_gauges(
    store: Arc<dyn hookline_store::port::StoreHealth>,
    broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
) {
    use hookline_broker::QueueName;
    loop {
        for queue in QueueName::ALL {
            if let Ok(depth) = broker.queue_depth(queue).await {
                metrics::gauge!("hookline_queue_depth", "queue" => queue.as_str())
                    .set(depth as f64);
            }
        }
        match store.stats().await {
            Ok(stats) => {
                metrics::gauge!("hookline_retry_backlog").set(stats.retry_backlog as f64);
                let overdue = stats
                    .oldest_due_retry
                    .map(|due| (chrono::Utc::now() - due).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                metrics::gauge!("hookline_retry_oldest_due_age_seconds").set(overdue);
                metrics::gauge!("hookline_outbox_pending").set(stats.outbox as f64);
                metrics::gauge!("hookline_subscriptions", "state" => "enabled")
                    .set(stats.subscriptions_enabled as f64);
                metrics::gauge!("hookline_subscriptions", "state" => "disabled")
                    .set(stats.subscriptions_disabled as f64);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read store statistics"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}
