//! The fault suite's harness: a distributed cluster of one process per service on private
//! PostgreSQL and RabbitMQ servers, a publisher that retries until acknowledged, and the
//! tally of what a receiver got for the events acknowledged during one fault.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tonic::transport::Channel;

use crate::support::private::{PrivatePostgres, PrivateRabbit, free_port};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{BIN, Server, authed, spawn_serve};

/// The services, one process each.
pub const SERVICES: [&str; 4] = ["registry", "ingest", "dispatcher", "retry"];

/// One service process, restarted on the same ports after a kill.
pub struct Proc {
    pub service: &'static str,
    pub grpc: String,
    pub admin: String,
    pub server: Option<Server>,
}

/// Four processes on private servers.
pub struct Cluster {
    pub pg: PrivatePostgres,
    pub mq: PrivateRabbit,
    pub procs: Vec<Proc>,
    prefix: String,
    data_dir: std::path::PathBuf,
}

impl Cluster {
    /// Starts private PostgreSQL and RabbitMQ (printing how long each took), migrates, and
    /// starts every service.
    pub async fn start() -> Cluster {
        let (pg, mq) = tokio::task::spawn_blocking(|| {
            let pg = PrivatePostgres::start();
            let mq = PrivateRabbit::start();
            (pg, mq)
        })
        .await
        .expect("start private servers");
        println!(
            "private servers: PostgreSQL started in {:.1} s, RabbitMQ in {:.1} s",
            pg.started_in.as_secs_f64(),
            mq.started_in.as_secs_f64()
        );
        let mut cluster = Cluster {
            pg,
            mq,
            procs: SERVICES
                .iter()
                .map(|service| Proc {
                    service,
                    grpc: format!("127.0.0.1:{}", free_port()),
                    admin: format!("127.0.0.1:{}", free_port()),
                    server: None,
                })
                .collect(),
            prefix: hookline_testkit::unique_name("fault_"),
            data_dir: std::env::temp_dir().join(hookline_testkit::unique_name("hookline-fault-")),
        };
        let mut migrate = cluster.command();
        let out = migrate.arg("migrate").output().await.expect("run migrate");
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..cluster.procs.len() {
            cluster.start_proc(i).await;
        }
        cluster
    }

    /// A `hookline` command on the private servers.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("HOOKLINE_DATABASE_URL", self.pg.url())
            .env("HOOKLINE_AMQP_URL", self.mq.url())
            .env("HOOKLINE_QUEUE_PREFIX", &self.prefix)
            .env("HOOKLINE_DATA_DIR", &self.data_dir)
            .env("HOOKLINE_DATABASE_MAX_CONNECTIONS", "4")
            .env("HOOKLINE_RETRY_POLL_INTERVAL_MS", "100")
            // The receiver listens on loopback, which the egress policy refuses by default.
            .env("HOOKLINE_EGRESS_ALLOW", crate::support::LOOPBACK_RECEIVERS)
            .env(
                "HOOKLINE_LOG",
                std::env::var("HOOKLINE_FAULT_LOG").unwrap_or_else(|_| "error".into()),
            )
            .env_remove("HOOKLINE_CONFIG")
            .kill_on_drop(true);
        cmd
    }

    pub fn proc(&self, service: &str) -> &Proc {
        self.procs
            .iter()
            .find(|p| p.service == service)
            .expect("a service of the cluster")
    }

    fn index(&self, service: &str) -> usize {
        self.procs
            .iter()
            .position(|p| p.service == service)
            .expect("a service of the cluster")
    }

    async fn start_proc(&mut self, i: usize) {
        let mut cmd = self.command();
        let p = &self.procs[i];
        cmd.args(["serve", "--services", p.service])
            .args(["--grpc-addr", &p.grpc, "--admin-addr", &p.admin])
            .stderr(std::process::Stdio::inherit());
        let server = spawn_serve(cmd).await;
        self.procs[i].server = Some(server);
    }

    /// SIGKILLs the process of `service` and waits until it is gone.
    pub async fn kill(&mut self, service: &str) {
        let i = self.index(service);
        if let Some(mut server) = self.procs[i].server.take() {
            server.child.start_kill().expect("SIGKILL");
            server.child.wait().await.expect("reap the killed process");
        }
    }

    /// Starts the process of `service` again on its ports.
    pub async fn restart(&mut self, service: &str) {
        let i = self.index(service);
        self.start_proc(i).await;
    }

    /// The `/readyz` status of every running process (`None`: no answer).
    pub async fn readiness(&self) -> Vec<(&'static str, Option<u16>)> {
        let mut out = Vec::new();
        for p in &self.procs {
            out.push((p.service, readyz(&p.admin).await));
        }
        out
    }

    /// Waits until every process answers `/readyz` with `want`, or panics after `within`.
    pub async fn wait_readiness(&self, want: u16, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        loop {
            let states = self.readiness().await;
            if states.iter().all(|(_, s)| *s == Some(want)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: /readyz did not answer {want} everywhere within {within:?}: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn channel(&self, service: &str) -> Channel {
        Channel::from_shared(format!("http://{}", self.proc(service).grpc))
            .expect("a URL")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy()
    }

    /// SIGTERMs every process and removes the data directory; the private servers stop
    /// when the cluster is dropped.
    pub async fn finish(mut self) {
        for p in &mut self.procs {
            if let Some(server) = p.server.take() {
                server.terminate().await;
            }
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// The status code of `GET /readyz`, or `None` when nothing answers within 3 s.
pub async fn readyz(addr: &str) -> Option<u16> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.ok()?;
        raw.split(' ').nth(1).and_then(|s| s.parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .ok()
        .flatten()
}

/// What a publisher got acknowledged, by the phase it was running in.
#[derive(Default)]
pub struct Ledger {
    acked: Mutex<BTreeMap<String, Vec<String>>>,
    phase: Mutex<String>,
    /// Publish calls that failed and were tried again.
    pub failures: AtomicU64,
}

impl Ledger {
    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap() = phase.to_string();
    }

    pub fn acked(&self, phase: &str) -> Vec<String> {
        self.acked
            .lock()
            .unwrap()
            .get(phase)
            .cloned()
            .unwrap_or_default()
    }

    fn record(&self, event_id: String) {
        let phase = self.phase.lock().unwrap().clone();
        self.acked
            .lock()
            .unwrap()
            .entry(phase)
            .or_default()
            .push(event_id);
    }
}

/// Publishes one event at a time, each with its own idempotency key, retrying it until
/// it is acknowledged (like a careful client), until `stop` is set.
pub struct Publisher {
    pub ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Pause between two publishes: sets the rate (about 40 events a second), it does not
/// wait for anything.
const PACE: Duration = Duration::from_millis(25);

impl Publisher {
    pub fn start(channel: Channel, token: String, tenant: String, event_type: &str) -> Self {
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, event_type) = (ledger.clone(), stop.clone(), event_type.to_string());
        let task = tokio::spawn(async move {
            let mut client = IngestServiceClient::new(channel);
            let run = hookline_testkit::unique_name("");
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) {
                seq += 1;
                let req = pb::PublishRequest {
                    tenant_id: tenant.clone(),
                    event_type: event_type.clone(),
                    payload: format!(r#"{{"seq":{seq}}}"#).into_bytes(),
                    idempotency_key: format!("{run}-{seq}"),
                    ..Default::default()
                };
                let id = publish_until_acked(&mut client, &token, req, &l.failures).await;
                l.record(id);
                tokio::time::sleep(PACE).await;
            }
        });
        Publisher { ledger, stop, task }
    }

    /// Stops after the event in hand is acknowledged.
    pub async fn stop(self) -> Arc<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the publisher gets its last event acknowledged within 60 s")
            .expect("publisher task");
        self.ledger
    }
}

/// Publishes `req` until the server acknowledges it; returns the event id.
pub async fn publish_until_acked(
    client: &mut IngestServiceClient<Channel>,
    token: &str,
    req: pb::PublishRequest,
    failures: &AtomicU64,
) -> String {
    loop {
        let call = client.publish(authed(req.clone(), token));
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(res)) => return res.into_inner().event_id,
            Ok(Err(_)) | Err(_) => {
                failures.fetch_add(1, Ordering::Relaxed);
                // Client back-off before trying again.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What receivers got for the events acknowledged during one fault.
#[derive(Debug)]
pub struct Tally {
    pub fault: String,
    pub acked: usize,
    /// Acknowledged events delivered (a 2xx from every subscription).
    pub delivered: usize,
    /// Successful requests beyond one per event and subscription.
    pub duplicates: usize,
    /// Successful requests in all.
    pub deliveries: usize,
    pub recovery: Duration,
    pub publish_retries: u64,
}

impl Tally {
    pub fn print(&self) {
        println!(
            "FAULT {:<22} acked {:>5}  delivered {:>5}  deliveries {:>5}  duplicates {:>3} ({:.2}%)  \
             recovery {:>5.1} s  publish retries {}",
            self.fault,
            self.acked,
            self.delivered,
            self.deliveries,
            self.duplicates,
            self.duplicate_percent(),
            self.recovery.as_secs_f64(),
            self.publish_retries,
        );
    }

    pub fn duplicate_percent(&self) -> f64 {
        if self.deliveries == 0 {
            0.0
        } else {
            100.0 * self.duplicates as f64 / self.deliveries as f64
        }
    }
}

/// Successful (2xx) requests per `webhook-id` at endpoint `name`.
pub fn counts(receiver: &Receiver, name: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in receiver.received(name) {
        if (200..300).contains(&r.status) {
            *counts.entry(r.header("webhook-id")).or_default() += 1;
        }
    }
    counts
}

/// Waits until every acknowledged event got a 2xx answer from both `sink` and `flaky`
/// (which fails the first request of some events); panics with the missing ones after
/// `within`. Returns (delivered, successful requests, duplicates).
pub async fn wait_delivered(
    receiver: &Receiver,
    acked: &[String],
    within: Duration,
) -> (usize, usize, usize) {
    let deadline = Instant::now() + within;
    loop {
        let (sink, flaky) = (counts(receiver, "sink"), counts(receiver, "flaky"));
        let missing: Vec<&String> = acked
            .iter()
            .filter(|id| !sink.contains_key(*id) || !flaky.contains_key(*id))
            .collect();
        if missing.is_empty() {
            let deliveries: usize = acked.iter().map(|id| sink[id] + flaky[id]).sum();
            return (acked.len(), deliveries, deliveries - 2 * acked.len());
        }
        let short_at_sink = missing.iter().filter(|id| !sink.contains_key(**id)).count();
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged events were not delivered within {within:?} ({short_at_sink} \
             not to sink, the others not to flaky), e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a tenant; returns its id.
pub async fn create_tenant(
    registry: &mut RegistryServiceClient<Channel>,
    token: &str,
    name: &str,
) -> String {
    registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: name.into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("create a tenant")
        .into_inner()
        .id
}

/// A subscription of `tenant` to `filter`, delivered to `receiver`'s endpoint `name`
/// (which answers as `behavior` and checks signatures with the new secret).
pub struct Subscribe<'a> {
    pub tenant: &'a str,
    pub name: &'a str,
    pub behavior: Behavior,
    pub filter: &'a str,
    pub retry_policy: Option<pb::RetryPolicy>,
}

impl Subscribe<'_> {
    pub async fn create(
        self,
        registry: &mut RegistryServiceClient<Channel>,
        token: &str,
        receiver: &Receiver,
    ) {
        let sub = pb::Subscription {
            tenant_id: self.tenant.to_string(),
            url: receiver.endpoint(self.name, self.behavior),
            event_types: vec![self.filter.to_string()],
            retry_policy: self.retry_policy,
            ..Default::default()
        };
        let res = registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(sub),
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect("create a subscription")
            .into_inner();
        receiver.set_secret(self.name, &res.secret);
    }
}

/// Connects to `server`, creates a tenant with one subscription to every event type at
/// `receiver`'s endpoint `sink` (answering 200); returns the channel and the tenant id.
pub async fn tenant_with_sink(
    server: &Server,
    token: &str,
    receiver: &Receiver,
) -> (Channel, String) {
    let channel = Channel::from_shared(server.grpc.clone())
        .expect("a URL")
        .connect()
        .await
        .expect("connect to hookline");
    let mut registry = RegistryServiceClient::new(channel.clone());
    let tenant = create_tenant(&mut registry, token, "faults").await;
    Subscribe {
        tenant: &tenant,
        name: "sink",
        behavior: Behavior::Ok,
        filter: "*",
        retry_policy: None,
    }
    .create(&mut registry, token, receiver)
    .await;
    (channel, tenant)
}

/// Makes registry changes one after another (creates subscriptions of `tenant` that no
/// event matches), recording the ones acknowledged, until stopped.
pub struct Changer {
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Changer {
    pub fn start(channel: Channel, token: String, tenant: String) -> Changer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut registry = RegistryServiceClient::new(channel);
            while !s.load(Ordering::Relaxed) {
                let sub = pb::Subscription {
                    tenant_id: tenant.clone(),
                    url: "http://127.0.0.1:9/never".into(),
                    event_types: vec!["side.never".into()],
                    ..Default::default()
                };
                let req = pb::CreateSubscriptionRequest {
                    subscription: Some(sub),
                    ..Default::default()
                };
                let call = registry.create_subscription(authed(req, &token));
                match tokio::time::timeout(Duration::from_secs(3), call).await {
                    Ok(Ok(res)) => {
                        let id = res.into_inner().subscription.map(|s| s.id);
                        a.lock().unwrap().extend(id);
                    }
                    // Not acknowledged: may or may not exist; a client would look.
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
                tokio::time::sleep(PACE).await;
            }
        });
        Changer { acked, stop, task }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until at least `n` changes were acknowledged, or panics after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} registry changes acknowledged within {within:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops; returns the ids of the acknowledged subscriptions.
    pub async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("changer task");
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

/// Every subscription id of `tenant`, page by page.
pub async fn subscription_ids(
    registry: &mut RegistryServiceClient<Channel>,
    token: &str,
    tenant: &str,
) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListSubscriptionsRequest {
            tenant_id: tenant.to_string(),
            page_size: 100,
            page_token,
        };
        let page = registry
            .list_subscriptions(authed(req, token))
            .await
            .expect("list subscriptions")
            .into_inner();
        ids.extend(page.subscriptions.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}
