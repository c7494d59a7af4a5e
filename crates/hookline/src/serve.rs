//! Composition: binds the ports, builds the adapters, starts the requested services on
//! one gRPC port and the admin HTTP port, and stops them all on SIGTERM (`shutdown`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hookline_broker::Broker;
use hookline_changes::RegistryChanges;
use hookline_deliveries::DeliveryApi;
use hookline_dispatcher::{Dispatcher, DispatcherConfig};
use hookline_grpc::Authenticator;
use hookline_grpc::served;
use hookline_grpc::standard::{self, HealthReporter};
use hookline_grpc::tls::TlsServer;
use hookline_ingest::{BacklogLimit, IngestApi, IngestConfig, SubscriptionMatcher};
use hookline_outbox::{Relay, RelayConfig};
use hookline_proto::v1 as pb;
use hookline_registry::RegistryApi;
use hookline_retry::{Scheduler, SchedulerConfig};
use hookline_store::port::RegistryStore;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes as Router;

use crate::admin_http::{self, AdminState};
use crate::backends::{self, AnyStore, Mode};
use crate::config::Config;
use crate::keys::{self, Endpoints};
use crate::services::Service;
use crate::shutdown;
use crate::stdout::announce;
use crate::{console, rest};
use crate::{elsewhere, metrics_catalog};

/// Runs `services` until SIGTERM or Ctrl-C, then stops within the drain bound.
///
/// The ports come first: a port in use fails the start before anything is created or
/// opened (no data directory, no database, no queue consumer, no admin key). The first
/// admin key of an embedded installation is made last, once the servers are up.
pub async fn serve(config: Config, services: BTreeSet<Service>) -> anyhow::Result<()> {
    let mode = Mode::from_config(&config)?;
    mode.check_services(&services)?;
    let egress_settings = config.egress()?;
    let egress = hookline_egress::Egress::system(egress_settings.policy);
    let mut listeners = Listeners::bind(&config).await?;
    let metrics = install_metrics()?;
    let drain = Duration::from_secs(config.shutdown_drain_secs);
    let shutdown = CancellationToken::new();
    shutdown::on_signal(shutdown.clone(), drain);

    let store = open_store(&config, &mode).await?;
    let broker =
        backends::open_broker(&mode, &config, &store, connection_name(&config, &services)).await?;
    let changes = RegistryChanges::follow(broker.as_ref(), shutdown.clone()).await;
    // Every publisher of the process routes through this one router (fair delivery).
    let weights = crate::weights::WeightCache::new(store.registry());
    let weights_follower = weights.follow(&changes, shutdown.clone());
    let broker: Arc<dyn Broker> =
        Arc::new(hookline_broker::shards::ShardRouter::new(broker).with_weights(Arc::new(weights)));
    let wiring = Wiring {
        config: &config,
        store: &store,
        broker: broker.clone(),
        auth: Authenticator::with_limits(store.registry(), config.key_limits()),
        changes,
        shutdown: shutdown.clone(),
        egress,
        egress_proxy: egress_settings.proxy,
    };
    let mut tasks = vec![
        wiring.auth.follow(&wiring.changes, shutdown.clone()),
        weights_follower,
    ];
    let router = wiring.start_services(&services, &mut tasks).await?;
    let router = elsewhere::add_fallbacks(router, &services);
    tasks.push(tokio::spawn(report_gauges(
        store.health(),
        broker.clone(),
        shutdown.clone(),
    )));
    let console_at = match listeners.console.take() {
        Some(listener) => Some(wiring.start_console(listener, router.clone(), &mut tasks)?),
        None => None,
    };
    let admin_state = AdminState {
        store: store.health(),
        broker,
        metrics,
    };
    let mut running = listeners.serve(router, admin_state, &wiring.auth, &shutdown)?;
    let rest_at = running.rest.take().map(|(at, task)| {
        tasks.push(task);
        at
    });
    let loopback_allowed = wiring.egress.policy().check([127, 0, 0, 1].into()).is_ok();
    let started = announce_start(
        &running.at,
        [("rest", rest_at), ("console", console_at)],
        &services,
        &mode,
        store.registry().as_ref(),
        loopback_allowed,
    )
    .await;
    if started.is_err() {
        // Stop what runs in good order, then report why.
        shutdown.cancel();
    }
    let stopped = shutdown::stop_within(
        drain + STOP_MARGIN,
        running.servers,
        tasks,
        &store,
        &shutdown,
    )
    .await;
    started.and(stopped)
}

/// Opens the store, migrated when asked to (always for an embedded installation), with
/// payload encryption attached.
async fn open_store(config: &Config, mode: &Mode) -> anyhow::Result<AnyStore> {
    let mut store = backends::open_store(&mode.store(), config).await?;
    if config.migrate_on_start || matches!(mode, Mode::Embedded { .. }) {
        store.migrate().await?;
    }
    crate::encryption::attach(&mut store, config, &mode.store(), true).await?;
    Ok(store)
}

/// How long, beyond the drain, stopping may take (outcomes written, connections and
/// the store closed) before the process exits anyway.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// The bound ports, before anything else exists.
struct Listeners {
    grpc: TcpListener,
    admin: TcpListener,
    /// The REST/JSON API's, when `rest_addr` is set.
    rest: Option<TcpListener>,
    rest_max_connections: usize,
    /// The web console's, when `console_addr` is set.
    console: Option<TcpListener>,
    /// Connection caps and deadlines applied to every accepted gRPC connection.
    conn_limits: hookline_grpc::conn::ConnLimits,
    /// TLS of the gRPC port (and of REST and admin when `tls_rest` / `tls_admin`).
    tls: Option<TlsServer>,
    tls_rest: bool,
    tls_admin: bool,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Self> {
        let tls = match config.tls_files()? {
            Some(files) => {
                Some(TlsServer::load(&files).context("TLS of the API (tls_* settings)")?)
            }
            None => None,
        };
        Ok(Self {
            tls,
            tls_rest: config.tls_rest,
            tls_admin: config.tls_admin,
            grpc: bind(
                config.grpc_addr,
                "gRPC",
                "--grpc-addr",
                "HOOKLINE_GRPC_ADDR",
            )
            .await?,
            admin: bind(
                config.admin_addr,
                "admin HTTP",
                "--admin-addr",
                "HOOKLINE_ADMIN_ADDR",
            )
            .await?,
            rest: match config.rest_addr {
                Some(addr) => Some(bind(addr, "REST", "--rest-addr", "HOOKLINE_REST_ADDR").await?),
                None => None,
            },
            rest_max_connections: config.rest_max_connections,
            console: match config.console_addr {
                Some(addr) => Some(
                    bind(
                        addr,
                        "the web console",
                        "--console-addr",
                        "HOOKLINE_CONSOLE_ADDR",
                    )
                    .await?,
                ),
                None => None,
            },
            conn_limits: config.conn_limits(),
        })
    }

    /// Starts serving gRPC and admin HTTP on the bound ports until `shutdown`; the REST
    /// API, when it runs, calls `router`'s services in process.
    fn serve(
        self,
        router: Router,
        admin: AdminState,
        auth: &Authenticator,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Running> {
        let at = Endpoints {
            grpc: self.grpc.local_addr()?,
            admin: self.admin.local_addr()?,
        };
        let admin_tls = self.tls.as_ref().filter(|_| self.tls_admin);
        let admin = tokio::spawn(admin_http::serve(
            self.admin,
            admin_tls.cloned(),
            admin,
            shutdown.clone(),
        ));
        let rest = match self.rest {
            Some(listener) => Some(rest::start(
                listener,
                self.tls.as_ref().filter(|_| self.tls_rest).cloned(),
                router.clone(),
                self.rest_max_connections,
                auth.clone(),
                shutdown,
            )?),
            None => None,
        };
        let grpc = self
            .conn_limits
            .apply(tonic::transport::Server::builder())
            .layer(hookline_grpc::conn::CompletionLayer)
            .add_routes(router);
        let incoming = served::incoming(&self.conn_limits, self.grpc, self.tls.as_ref());
        let grpc = tokio::spawn(
            grpc.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
        );
        Ok(Running {
            at,
            rest,
            servers: shutdown::Servers { grpc, admin },
        })
    }
}

/// The servers, started.
struct Running {
    at: Endpoints,
    /// The REST API's address and task, when it runs.
    rest: Option<(SocketAddr, JoinHandle<()>)>,
    servers: shutdown::Servers,
}

/// Binds `addr`, or says what holds it and how to choose another.
async fn bind(addr: SocketAddr, what: &str, flag: &str, env: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::AddrInUse {
            "the address is already in use (another Hookline, or another program?)".to_string()
        } else {
            e.to_string()
        };
        anyhow::anyhow!(
            "cannot listen for {what} on {addr}: {why}. Stop what holds it, or choose another \
             address with {flag} or {env}. Nothing was created or opened"
        )
    })
}

/// Installs the Prometheus recorder `/metrics` renders.
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    metrics_catalog::describe_all();
    metrics::gauge!("hookline_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// The broker connection's name: the queue prefix and the services of this process.
fn connection_name(config: &Config, services: &BTreeSet<Service>) -> String {
    let names: Vec<_> = services.iter().map(|s| s.name()).collect();
    format!("hookline:{}:{}", config.queue_prefix, names.join("+"))
}

/// What the services of one process are built from.
struct Wiring<'a> {
    config: &'a Config,
    store: &'a AnyStore,
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    /// The process's one follower of the registry change stream, fanned out to caches.
    changes: RegistryChanges,
    shutdown: CancellationToken,
    /// The egress policy every subscription URL and every delivery goes through.
    egress: hookline_egress::Egress,
    /// An HTTP CONNECT proxy for every delivery, when the operator set one.
    egress_proxy: Option<url::Url>,
}

impl Wiring<'_> {
    /// Starts the console on `listener`; it calls the same services (gate included) in
    /// process, as REST does. Returns where it listens.
    fn start_console(
        &self,
        listener: TcpListener,
        router: Router,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> anyhow::Result<SocketAddr> {
        let (at, task) = console::start(
            listener,
            self.config,
            router,
            self.auth.clone(),
            self.broker.clone(),
            &self.shutdown,
        )?;
        tasks.push(task);
        Ok(at)
    }

    /// Mounts the gRPC services of `services` (with health and reflection) and spawns
    /// their background tasks into `tasks`.
    async fn start_services(
        &self,
        services: &BTreeSet<Service>,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> anyhow::Result<Router> {
        let (health, health_service) = standard::health();
        let mut router = Router::new(health_service)
            .add_service(standard::reflection_v1()?)
            .add_service(standard::reflection_v1alpha()?);
        if services.contains(&Service::Registry) {
            router = self.registry(router, &health).await;
        }
        if services.contains(&Service::Ingest) {
            router = self.ingest(router, &health, tasks).await;
        }
        if services.contains(&Service::Retry) {
            router = self.retry(router, &health, tasks).await;
        }
        if services.contains(&Service::Dispatcher) {
            tasks.push(self.dispatcher()?);
        }
        Ok(router)
    }

    async fn registry(&self, router: Router, health: &HealthReporter) -> Router {
        let api = RegistryApi::new(
            self.store.registry(),
            self.broker.clone(),
            self.auth.clone(),
        )
        .with_quotas(self.config.quotas())
        .with_egress(self.egress.clone());
        health
            .set_serving::<pb::registry_service_server::RegistryServiceServer<RegistryApi>>()
            .await;
        router.add_service(api.into_server())
    }

    async fn ingest(
        &self,
        router: Router,
        health: &HealthReporter,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Router {
        let matcher = SubscriptionMatcher::new(self.store.registry());
        tasks.push(matcher.follow(&self.changes, self.shutdown.clone()));
        let api = IngestApi::new(
            IngestConfig {
                max_payload_bytes: self.config.max_payload_bytes,
                max_batch_bytes: self.config.publish_batch_max_bytes,
                quotas: self.config.quotas(),
                ..IngestConfig::default()
            },
            self.store.events(),
            matcher,
            self.broker.clone(),
            self.auth.clone(),
        );
        let api = match self.config.ingest_max_backlog {
            0 => api,
            limit => {
                api.with_backlog_limit(Arc::new(BacklogLimit::new(limit, self.broker.clone())))
            }
        };
        // A stop waits for publishes still storing or queueing, hung up or not.
        tasks.push(api.finish_on(self.shutdown.clone()));
        health
            .set_serving::<pb::ingest_service_server::IngestServiceServer<IngestApi>>()
            .await;
        router.add_service(api.into_server())
    }

    async fn retry(
        &self,
        router: Router,
        health: &HealthReporter,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Router {
        let (config, store) = (self.config, self.store);
        let scheduler = Scheduler::new(
            SchedulerConfig {
                poll_interval: Duration::from_millis(config.retry_poll_interval_ms),
                ..SchedulerConfig::default()
            },
            store.deliveries(),
            store.events(),
            self.broker.clone(),
        );
        tasks.push(tokio::spawn(scheduler.run(self.shutdown.clone())));
        let relay = Relay::new(
            RelayConfig {
                grace: Duration::from_millis(config.relay_grace_ms),
                ..RelayConfig::default()
            },
            store.events(),
            self.broker.clone(),
        );
        tasks.push(tokio::spawn(relay.run(self.shutdown.clone())));
        let api = DeliveryApi::new(
            store.deliveries(),
            store.events(),
            store.registry(),
            self.broker.clone(),
            self.auth.clone(),
        )
        .ending_streams_on(self.shutdown.clone());
        health
            .set_serving::<pb::delivery_service_server::DeliveryServiceServer<DeliveryApi>>()
            .await;
        router.add_service(api.into_server())
    }

    fn dispatcher(&self) -> anyhow::Result<JoinHandle<()>> {
        let config = self.config;
        let dispatcher = Dispatcher::new(
            DispatcherConfig {
                concurrency: config.dispatcher_concurrency,
                prefetch: config.dispatcher_prefetch,
                shard_prefetch: config.dispatcher_shard_prefetch,
                writes_in_flight: config.dispatcher_writes_in_flight,
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                shutdown_drain: Duration::from_secs(config.shutdown_drain_secs),
                egress: self.egress.clone(),
                egress_proxy: self.egress_proxy.clone(),
                receiver_tls: config.receiver_tls()?,
                ..DispatcherConfig::default()
            },
            self.store.registry(),
            self.store.deliveries(),
            self.broker.clone(),
        )
        .context("cannot start the dispatcher")?
        .with_changes(self.changes.clone())
        .with_outbox(self.store.events());
        let stop = self.shutdown.clone();
        Ok(tokio::spawn(async move {
            if let Err(e) = dispatcher.run(stop.clone()).await {
                tracing::error!(error = %e, "dispatcher stopped with an error; shutting down");
                stop.cancel();
            }
        }))
    }
}

/// Prints where the servers listen (machine-readable lines: tests and scripts read the
/// bound ports from them) and, on an embedded installation's first start, the admin key.
async fn announce_start(
    at: &Endpoints,
    http: [(&str, Option<SocketAddr>); 2],
    services: &BTreeSet<Service>,
    mode: &Mode,
    registry: &dyn RegistryStore,
    loopback_allowed: bool,
) -> anyhow::Result<()> {
    let names: Vec<_> = services.iter().map(|s| s.name()).collect();
    for (name, addr) in http {
        if let Some(addr) = addr {
            // Before the gRPC line: readers stop at the gRPC and admin lines.
            announce(&format!("hookline: {name} listening on {addr}"));
        }
    }
    announce(&format!("hookline: grpc listening on {}", at.grpc));
    announce(&format!("hookline: admin listening on {}", at.admin));
    announce(&format!("hookline: services {}", names.join(",")));
    if let Mode::Embedded { data_dir } = mode {
        announce(&format!(
            "hookline: embedded backends in {}",
            data_dir.display()
        ));
        keys::show_first_admin_key(registry, data_dir, at, loopback_allowed).await?;
    }
    tracing::info!(grpc_addr = %at.grpc, admin_addr = %at.admin, services = ?names, "serving");
    if let Some(note) = elsewhere::missing_services_note(services) {
        tracing::info!("{note}");
    }
    Ok(())
}

/// Depth of every work queue (unsharded and shards) and, where the backend can tell, the
/// age of its oldest message.
async fn report_queue_gauges(broker: &dyn Broker) {
    let shards = broker.delivery_shards();
    let now = chrono::Utc::now().timestamp_millis();
    for queue in hookline_broker::QueueName::consumed(shards) {
        if let Ok(depth) = broker.queue_depth(queue).await {
            metrics::gauge!("hookline_queue_depth", "queue" => queue.name()).set(depth as f64);
        }
        if let Ok(Some(oldest)) = broker.oldest_published_ms(queue).await {
            let age = now.saturating_sub(oldest).max(0) as f64 / 1000.0;
            metrics::gauge!("hookline_queue_oldest_age_seconds", "queue" => queue.name()).set(age);
        }
    }
}

/// How often the gauges of queue depth, retry backlog and subscription states are read.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the gauges that need a query fresh: queue depths (dead-letter queue included),
/// the retry backlog and the
/// age of its oldest due entry, the outbox, and subscriptions by state.
async fn report_gauges(
    store: Arc<dyn hookline_store::port::StoreHealth>,
    broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
) {
    loop {
        report_queue_gauges(broker.as_ref()).await;
        if let Ok(depth) = broker.dead_letter_depth().await {
            metrics::gauge!("hookline_dead_letter_depth").set(depth as f64);
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
