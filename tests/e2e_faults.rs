//! The fault suite: the real binary survives its dependencies and its own processes
//! failing, with nothing acknowledged lost.
//!
//! - A distributed cluster (one `hookline serve --services X` process per service) on
//!   private PostgreSQL and RabbitMQ servers (the shared ones are never restarted), with a
//!   publisher that retries until acknowledged, goes through, one at a time: a RabbitMQ
//!   restart, a PostgreSQL restart, and a SIGKILL and restart of each service. Every
//!   acknowledged event is delivered, `/readyz` says not-ready while a dependency is down,
//!   and the cluster delivers again within 30 s of the dependency coming back. Each fault
//!   prints its figures (`FAULT …` lines; run with `--nocapture`), kept in
//!   docs/RELIABILITY.md.
//! - A poison message (an undecodable job put straight on the deliveries queue) goes to
//!   the dead-letter queue with a log line naming its ids and a metric, and other work
//!   goes on: on both backends.
//! - A full disk under the embedded store fails publishes with `UNAVAILABLE` and a clear
//!   message, loses nothing acknowledged, and publishing works again once space returns.
//!
//! A SIGKILL of the embedded process in the middle of deliveries is in `e2e_embedded.rs`.

#[macro_use]
mod support;
mod faults;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use faults::{Cluster, Publisher, Tally, publish_until_acked, readyz, wait_delivered};
use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, authed};
use tonic::transport::Channel;

/// The longest the cluster may take to deliver again once a fault is over.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// How long a dependency stays down.
const OUTAGE: Duration = Duration::from_secs(5);
/// Publishing before each fault, so it hits a busy pipeline.
const WARMUP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Fault {
    RabbitRestart,
    PostgresRestart,
    Kill(&'static str),
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::RabbitRestart => "RabbitMQ restart".into(),
            Fault::PostgresRestart => "PostgreSQL restart".into(),
            Fault::Kill(service) => format!("SIGKILL {service}"),
        }
    }
}

const FAULTS: [Fault; 6] = [
    Fault::RabbitRestart,
    Fault::PostgresRestart,
    Fault::Kill("ingest"),
    Fault::Kill("dispatcher"),
    Fault::Kill("retry"),
    Fault::Kill("registry"),
];

/// What every fault phase uses.
struct Rig {
    cluster: Cluster,
    receiver: Receiver,
    token: String,
    tenant: String,
    registry: RegistryServiceClient<Channel>,
    ingest: IngestServiceClient<Channel>,
    probes: u64,
}

impl Rig {
    async fn start() -> Rig {
        let cluster = Cluster::start().await;
        let token = support::create_key(cluster.command()).await;
        let mut registry = RegistryServiceClient::new(cluster.channel("registry").await);
        let tenant = faults::create_tenant(&mut registry, &token, "faults").await;
        let ingest = IngestServiceClient::new(cluster.channel("ingest").await);
        let mut rig = Rig {
            cluster,
            receiver: Receiver::start().await,
            token,
            tenant,
            registry,
            ingest,
            probes: 0,
        };
        // `sink` takes every event; `flaky` fails the first request of every fourth, so
        // ticks also go through the retry service (a failure rate under the circuit
        // breaker's 50%).
        rig.subscribe("sink", Behavior::Ok, "fault.*").await;
        rig.subscribe("flaky", Behavior::FailFirstOfEvery(4, 500), "fault.tick")
            .await;
        rig
    }

    async fn subscribe(&mut self, name: &str, behavior: Behavior, filter: &str) {
        let schedule = [300, 1_000, 2_000, 5_000, 10_000, 10_000, 10_000];
        faults::Subscribe {
            tenant: &self.tenant,
            name,
            behavior,
            filter,
            retry_policy: Some(pb::RetryPolicy {
                schedule: schedule
                    .iter()
                    .map(|ms| prost_types::Duration {
                        seconds: ms / 1000,
                        nanos: ((ms % 1000) * 1_000_000) as i32,
                    })
                    .collect(),
            }),
        }
        .create(&mut self.registry, &self.token, &self.receiver)
        .await;
    }

    /// Time from `since` until every process is ready and a new event published after
    /// that reached `sink` (and `also`, when given).
    async fn recovery(&mut self, since: Instant, also: Option<&str>) -> Duration {
        self.cluster
            .wait_readiness(200, RECOVERY_LIMIT, "after the fault")
            .await;
        self.probes += 1;
        let req = pb::PublishRequest {
            tenant_id: self.tenant.clone(),
            event_type: "fault.probe".into(),
            payload: format!(r#"{{"probe":{}}}"#, self.probes).into_bytes(),
            idempotency_key: hookline_testkit::unique_name("probe-"),
            ..Default::default()
        };
        let id = publish_until_acked(&mut self.ingest, &self.token, req, &AtomicU64::new(0)).await;
        for endpoint in std::iter::once("sink").chain(also) {
            let left = RECOVERY_LIMIT.saturating_sub(since.elapsed());
            self.receiver
                .wait_for(endpoint, left, "a probe published after the fault", |got| {
                    got.iter().any(|r| r.header("webhook-id") == id)
                })
                .await;
        }
        since.elapsed()
    }

    /// Injects `fault`, checks readiness while it lasts, ends it, and returns when
    /// the cluster delivers again, with the recovery time.
    async fn inject(&mut self, fault: Fault) -> Duration {
        match fault {
            Fault::RabbitRestart | Fault::PostgresRestart => {
                self.dependency_down(fault).await;
                let since = Instant::now();
                self.recovery(since, None).await
            }
            Fault::Kill("registry") => self.kill_registry_during_changes().await,
            Fault::Kill(service) => {
                self.cluster.kill(service).await;
                self.check_killed(service).await;
                let since = Instant::now();
                self.cluster.restart(service).await;
                self.recovery(since, None).await
            }
        }
    }

    /// A killed process answers nothing; the others stay ready.
    async fn check_killed(&self, service: &str) {
        let gone = self.cluster.proc(service).admin.clone();
        assert_eq!(
            readyz(&gone).await,
            None,
            "a killed {service} answers nothing"
        );
        for (other, state) in self.cluster.readiness().await {
            if other != service {
                assert_eq!(
                    state,
                    Some(200),
                    "{other} stays ready while {service} is down"
                );
            }
        }
    }

    /// Stops RabbitMQ or PostgreSQL for [`OUTAGE`], requiring every process to say
    /// not-ready meanwhile, and starts it again.
    async fn dependency_down(&mut self, fault: Fault) {
        type Action = fn(&Cluster);
        let (stop, start): (Action, Action) = match fault {
            Fault::RabbitRestart => (|c| c.mq.stop_app(), |c| c.mq.start_app()),
            _ => (|c| c.pg.stop(), |c| c.pg.start_again()),
        };
        let down_at = Instant::now();
        tokio::task::block_in_place(|| stop(&self.cluster));
        self.cluster
            .wait_readiness(503, Duration::from_secs(15), &fault.name())
            .await;
        println!(
            "{}: every process not ready {:.1} s after the stop",
            fault.name(),
            down_at.elapsed().as_secs_f64()
        );
        if let Some(left) = OUTAGE.checked_sub(down_at.elapsed()) {
            tokio::time::sleep(left).await; // the outage itself
        }
        tokio::task::block_in_place(|| start(&self.cluster));
    }

    /// Kills the registry in the middle of a stream of changes (subscriptions created on
    /// a side tenant). While it is down its clients get errors; once it is back, changes
    /// are acknowledged again, every change acknowledged before or after exists, and a
    /// new subscription reaches ingest and the dispatcher: the next event is delivered
    /// to its endpoint.
    async fn kill_registry_during_changes(&mut self) -> Duration {
        let side = faults::create_tenant(&mut self.registry, &self.token, "side").await;
        let changer = faults::Changer::start(
            self.cluster.channel("registry").await,
            self.token.clone(),
            side.clone(),
        );
        changer.wait_for(5, Duration::from_secs(30)).await;
        self.cluster.kill("registry").await;
        self.check_killed("registry").await;
        let before = changer.acked();
        let call = self
            .registry
            .list_tenants(authed(pb::ListTenantsRequest::default(), &self.token));
        let refused = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "a killed registry cannot answer"
        );
        let since = Instant::now();
        self.cluster.restart("registry").await;
        self.cluster
            .wait_readiness(200, RECOVERY_LIMIT, "registry back")
            .await;
        changer.wait_for(before + 5, RECOVERY_LIMIT).await;
        let acked = changer.stop().await;
        let stored = faults::subscription_ids(&mut self.registry, &self.token, &side).await;
        let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "acknowledged registry changes lost: {lost:?}"
        );
        println!(
            "SIGKILL registry: {} changes acknowledged around the kill, all stored",
            acked.len()
        );
        self.subscribe("late", Behavior::Ok, "fault.probe").await;
        self.recovery(since, Some("late")).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_cluster_survives_each_fault_with_nothing_acknowledged_lost() {
    let mut rig = Rig::start().await;
    let publisher = Publisher::start(
        rig.cluster.channel("ingest").await,
        rig.token.clone(),
        rig.tenant.clone(),
        "fault.tick",
    );
    let ledger = publisher.ledger.clone();
    let mut tallies = Vec::new();
    // `HOOKLINE_FAULTS=rabbit,ingest` runs only the faults whose names contain one of these.
    let only = std::env::var("HOOKLINE_FAULTS")
        .unwrap_or_default()
        .to_lowercase();
    let chosen = FAULTS.into_iter().filter(|f| {
        only.is_empty()
            || only
                .split(',')
                .any(|w| f.name().to_lowercase().contains(w.trim()))
    });
    for fault in chosen {
        let name = fault.name();
        ledger.set_phase(&name);
        let failures_before = ledger.failures.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(WARMUP).await; // publishing goes on meanwhile
        let recovery = rig.inject(fault).await;
        assert!(
            recovery <= RECOVERY_LIMIT,
            "{name}: took {recovery:?} to deliver again"
        );
        tokio::time::sleep(WARMUP).await;
        ledger.set_phase("between");
        let acked = ledger.acked(&name);
        let (delivered, deliveries, duplicates) =
            wait_delivered(&rig.receiver, &acked, Duration::from_secs(90)).await;
        let tally = Tally {
            fault: name,
            acked: acked.len(),
            delivered,
            deliveries,
            duplicates,
            recovery,
            publish_retries: ledger.failures.load(std::sync::atomic::Ordering::Relaxed)
                - failures_before,
        };
        tally.print();
        tallies.push(tally);
    }
    let ledger = publisher.stop().await;
    let between = ledger.acked("between");
    wait_delivered(&rig.receiver, &between, Duration::from_secs(60)).await;

    let deliveries: usize = tallies.iter().map(|t| t.deliveries).sum();
    let duplicates: usize = tallies.iter().map(|t| t.duplicates).sum();
    println!(
        "FAULT all: {} acknowledged events delivered, {duplicates} duplicates in {deliveries} deliveries ({:.2}%)",
        tallies.iter().map(|t| t.acked).sum::<usize>(),
        100.0 * duplicates as f64 / deliveries.max(1) as f64
    );
    assert!(
        duplicates * 100 <= deliveries,
        "more than 1% duplicates: {duplicates} in {deliveries}"
    );
    rig.cluster.finish().await;
}

/// An undecodable job put straight onto the deliveries queue.
fn poison(delivery_id: &str) -> hookline_broker::OutgoingMessage {
    hookline_broker::OutgoingMessage::new(b"not a delivery job".to_vec())
        .with_header(hookline_core::job::H_DELIVERY, delivery_id)
}

/// Puts the poison on the server's deliveries queue and returns the broker to read the
/// dead-letter queue with.
async fn inject_poison(
    env: &Env,
    delivery_id: &str,
) -> std::sync::Arc<dyn hookline_broker::Broker> {
    use hookline_broker::{Broker, QueueName};
    let broker: std::sync::Arc<dyn Broker> = match env.backend {
        Backend::Distributed => std::sync::Arc::new(
            hookline_broker::RabbitBroker::connect(hookline_broker::RabbitConfig::new(
                hookline_testkit::amqp_url(),
                env.prefix.clone(),
            ))
            .await
            .expect("connect to RabbitMQ"),
        ),
        Backend::Embedded => {
            let store = hookline_store::SqliteStore::open(&env.data_dir.join("hookline.db"))
                .await
                .expect("open the embedded database");
            std::sync::Arc::new(
                hookline_broker::EmbeddedBroker::open(
                    store.pool().clone(),
                    hookline_broker::EmbeddedConfig::default(),
                )
                .await
                .expect("open the embedded queue"),
            )
        }
    };
    broker
        .publish(QueueName::Deliveries, vec![poison(delivery_id)])
        .await
        .expect("publish the poison");
    broker
}

/// Waits until `cond` holds for the text `read` returns, or panics after `within`.
async fn wait_text(
    within: Duration,
    what: &str,
    read: impl AsyncFn() -> String,
    cond: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let text = read().await;
        if cond(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}; last:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn a_poison_message_is_dead_lettered_visibly_and_work_goes_on(backend: Backend) {
    let env = Env::with(backend).await;
    let token = env.admin_key().await;
    let log = env.data_dir.with_extension("stderr.log");
    let mut cmd = env.command();
    cmd.args(["serve", "--services", "all"])
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).expect("create the log file"));
    let server = support::spawn_serve(cmd).await;
    let receiver = Receiver::start().await;
    let (channel, tenant) = faults::tenant_with_sink(&server, &token, &receiver).await;

    let poison_id = hookline_core::Id::new(hookline_core::IdKind::Delivery).to_string();
    let broker = inject_poison(&env, &poison_id).await;

    // Other work goes on.
    let mut ingest = IngestServiceClient::new(channel);
    let event = ingest
        .publish(authed(
            pb::PublishRequest {
                tenant_id: tenant,
                event_type: "after.poison".into(),
                payload: b"{}".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("publish after the poison")
        .into_inner()
        .event_id;
    receiver
        .wait_for(
            "sink",
            Duration::from_secs(30),
            "the event published after the poison",
            |got| got.iter().any(|r| r.header("webhook-id") == event),
        )
        .await;

    // The poison is in the dead-letter queue, counted, gauged and logged with its id.
    wait_text(
        Duration::from_secs(30),
        "the poison in the dead-letter queue",
        async || {
            broker
                .dead_letter_depth()
                .await
                .map(|d| d.to_string())
                .unwrap_or_default()
        },
        |d| d == "1",
    )
    .await;
    let admin = server.admin.clone();
    wait_text(
        Duration::from_secs(30),
        "the dead-letter metrics",
        async || support::http_get(&admin, "/metrics").await.1,
        |m| {
            m.contains(r#"hookline_messages_dead_lettered_total{reason="undecodable"} 1"#)
                && m.lines().any(|l| l == "hookline_dead_letter_depth 1")
        },
    )
    .await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = log_text
        .lines()
        .find(|l| l.contains("undecodable message moved to the dead-letter queue"))
        .unwrap_or_else(|| panic!("no log line for the poison in:\n{log_text}"));
    assert!(
        line.contains(&poison_id) && line.contains("hl-event-id is missing"),
        "{line}"
    );

    if let Backend::Embedded = backend {
        drop(broker); // the test's handle on the file, before the server's SIGTERM
    }
    let status = server.terminate().await;
    assert!(status.success(), "hookline exited with {status}");
    let _ = std::fs::remove_file(&log);
    env.finish().await;
}

on_both_backends!(a_poison_message_is_dead_lettered_visibly_and_work_goes_on);

/// A small tmpfs mounted for one test, unmounted on drop (needs root, as CI here has).
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = std::env::temp_dir().join(hookline_testkit::unique_name("hookline-disk-"));
        std::fs::create_dir_all(&dir).expect("create the mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a {megabytes} MiB tmpfs on {} (this test needs root): {status}",
            dir.display()
        );
        SmallDisk { dir }
    }

    /// Fills the file system with one file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        // Whatever is left is smaller than a chunk: take it byte by byte.
        while file.write_all(&[0]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_full_disk_fails_embedded_publishes_with_unavailable_and_loses_nothing() {
    let disk = SmallDisk::mount(16);
    let mut env = Env::with(Backend::Embedded).await;
    env.data_dir = disk.dir.join("data");
    let token = env.admin_key().await;
    let server = env.serve("all").await;
    let receiver = Receiver::start().await;
    let (channel, tenant) = faults::tenant_with_sink(&server, &token, &receiver).await;
    let mut ingest = IngestServiceClient::new(channel);
    // 32 KiB payloads use up what SQLite still has free quickly.
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(32 * 1024)).into_bytes();
    let event = |n: usize| pb::PublishRequest {
        tenant_id: tenant.clone(),
        event_type: "disk.test".into(),
        payload: payload.clone(),
        idempotency_key: format!("disk-{n}"),
        ..Default::default()
    };

    let mut acked = Vec::new();
    for n in 0..5 {
        let res = ingest
            .publish(authed(event(n), &token))
            .await
            .expect("publish with room");
        acked.push(res.into_inner().event_id);
    }
    let filler = disk.fill();

    // SQLite may still have free pages: publish until it cannot.
    let mut refusal = None;
    for n in 5..2_000 {
        match ingest.publish(authed(event(n), &token)).await {
            Ok(res) => acked.push(res.into_inner().event_id),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a publish fails once the disk is full");
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("out of disk space"),
        "{:?}",
        refusal.message()
    );
    println!(
        "disk full: {} events acknowledged, then {:?}",
        acked.len(),
        refusal.message()
    );

    // Space returns: publishing works again by itself.
    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    let mut n = 10_000;
    loop {
        n += 1;
        match ingest.publish(authed(event(n), &token)).await {
            Ok(res) => {
                acked.push(res.into_inner().event_id);
                break;
            }
            Err(status) => assert!(
                freed.elapsed() < RECOVERY_LIMIT,
                "publishing still fails {RECOVERY_LIMIT:?} after space returned: {status:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "disk full: publishing again {:.1} s after space returned",
        freed.elapsed().as_secs_f64()
    );

    // Nothing acknowledged was lost.
    receiver
        .wait_for(
            "sink",
            Duration::from_secs(60),
            "every acknowledged event",
            |got| {
                let seen: std::collections::HashSet<String> =
                    got.iter().map(|r| r.header("webhook-id")).collect();
                acked.iter().all(|id| seen.contains(id))
            },
        )
        .await;
    let status = server.terminate().await;
    assert!(status.success(), "hookline exited with {status}");
    env.finish().await;
    drop(disk);
}
