//! External mode (`hookline bench --external`): the receiver and the load generator are
//! processes of their own, cheap and measured separately, so that the figures are the
//! server's and not the harness's (issue #12: the in-process harness competes with the
//! server for the CPU of a small machine).
//!
//! One run starts nginx as the receiver ([`nginx`]), spawns (or targets) the server,
//! creates a tenant with `fanout` subscriptions that all take the one event type, writes
//! one framed gRPC `Publish` request to a file and lets `h2load` send it over
//! `connections` HTTP/2 connections, closed loop or at `--rate` ([`h2load`]). When h2load
//! exits, publishing has stopped; the run then waits until nginx's access log holds every
//! delivery the server says it created (`hookline_deliveries_created_total`). CPU per
//! process comes from `/proc` ([`procstat`](crate::procstat)): the server, every
//! `postgres` and `beam.smp` process, nginx, and h2load (its time as a reaped child).

pub mod h2load;
pub mod nginx;
pub mod report;
pub mod statements;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::metadata::{Ascii, MetadataValue};

use self::nginx::{LogTally, Nginx};
use self::report::{ExternalConfig, ExternalDeliveries, ExternalOutput, ExternalReport, Medians};
use self::statements::Statements;
use crate::procstat::{Snapshot, Watched};
use crate::report::{Percentiles, ProcessInfo, TargetInfo};
use crate::scenario::{Layout, Plan};
use crate::target::{Target, metric_sum};
use crate::{BenchError, BenchOptions};

/// Payload size of external runs unless `--payload-bytes` is given (the size used for
/// issue #12's comparison).
pub const DEFAULT_PAYLOAD_BYTES: usize = 511;
/// h2load connections unless `--connections` is given.
pub const DEFAULT_CONNECTIONS: usize = 32;

/// Runs `--repeat` external runs of the plan and prints their reports (and medians).
pub async fn run(args: &BenchOptions, plan: &Plan) -> Result<(), BenchError> {
    if plan.batch != 1 || plan.fail_rate > 0.0 || plan.hang_subs > 0 || plan.verify {
        return Err(BenchError::Usage(format!(
            "--external runs Publish with fan-out only; scenario {} (batch {}, fail rate {}, hanging {}, verify {}) needs the in-process mode",
            plan.scenario, plan.batch, plan.fail_rate, plan.hang_subs, plan.verify
        )));
    }
    let config = ExternalConfig {
        fanout: plan.fanout,
        connections: args.connections.unwrap_or(DEFAULT_CONNECTIONS),
        duration_s: plan.duration.map(|d| d.as_secs_f64()),
        requests: plan.events,
        rate: plan.rate,
        payload_bytes: args.payload_bytes.unwrap_or(DEFAULT_PAYLOAD_BYTES),
    };
    let mut runs = Vec::new();
    for i in 0..args.repeat.max(1) {
        eprintln!(
            "hookline bench: external run {} of {}",
            i + 1,
            args.repeat.max(1)
        );
        let r = run_one(args, plan, &config).await?;
        if !args.json {
            println!("{}", r.render(plan.scenario));
        }
        runs.push(r);
    }
    let medians = Medians::of(&runs);
    if args.json {
        let out = ExternalOutput {
            mode: report::MODE,
            scenario: plan.scenario.to_string(),
            runs,
            medians,
        };
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| BenchError::Server(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else if let Some(m) = medians {
        println!("{}", m.render());
    }
    Ok(())
}

/// One run: nginx, target, setup, h2load, drain, report, cleanup.
async fn run_one(
    args: &BenchOptions,
    plan: &Plan,
    config: &ExternalConfig,
) -> Result<ExternalReport, BenchError> {
    let nginx = Nginx::start().await?;
    eprintln!("hookline bench: nginx receiver at http://{}", nginx.addr);
    let mut target = match Target::start(args).await {
        Ok(t) => t,
        Err(e) => {
            nginx.stop(args.keep).await;
            return Err(e);
        }
    };
    let mut tenant = None;
    let outcome = tokio::select! {
        r = measure(plan, config, &target, &nginx, &mut tenant) => r,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
    };
    let notes = target.finish(!args.keep, tenant.as_deref()).await;
    nginx.stop(args.keep).await;
    for note in &notes {
        eprintln!("hookline bench: {note}");
    }
    let mut report = outcome?;
    report.notes.extend(notes);
    Ok(report)
}

/// Wall-clock milliseconds since the Unix epoch (nginx's `$msec` clock).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Setup, load and drain against a started target and nginx.
async fn measure(
    plan: &Plan,
    config: &ExternalConfig,
    target: &Target,
    nginx: &Nginx,
    tenant: &mut Option<String>,
) -> Result<ExternalReport, BenchError> {
    if target.admin.is_none() {
        return Err(BenchError::Usage(
            "--external needs a spawned server (it reads the server's /metrics)".into(),
        ));
    }
    let auth: MetadataValue<Ascii> = format!("Bearer {}", target.token)
        .parse()
        .map_err(|_| BenchError::Usage("the API key cannot go in a header".into()))?;
    let channel = crate::connect(&target.grpc, &target.tls).await?;
    let mut registry = RegistryServiceClient::new(channel);
    let tenant_id = crate::create_tenant(&mut registry, plan, &auth).await?;
    *tenant = Some(tenant_id.clone());
    // Every subscription takes the one event type h2load sends: fan-out = subscriptions.
    let mut sub_plan = plan.clone();
    sub_plan.subscriptions = plan.fanout;
    let layout = Layout::new(&sub_plan, true);
    let url = format!("http://{}", nginx.addr);
    crate::create_subscriptions(&mut registry, &sub_plan, &layout, &tenant_id, &url, &auth).await?;

    let body = h2load::publish_body(&tenant_id, layout.event_type(0), config.payload_bytes);
    let body_file = std::env::temp_dir().join(format!("hookline_bench_{}.grpc", ulid::Ulid::new()));
    std::fs::write(&body_file, body)
        .map_err(|e| BenchError::io(format!("writing {}", body_file.display()), e))?;
    let result = load_and_drain(plan, config, target, nginx, &body_file).await;
    let _ = std::fs::remove_file(&body_file);
    result
}

/// h2load to the end, then the drain; the report.
async fn load_and_drain(
    plan: &Plan,
    config: &ExternalConfig,
    target: &Target,
    nginx: &Nginx,
    body_file: &std::path::Path,
) -> Result<ExternalReport, BenchError> {
    let mut watched = target.processes.clone();
    watched.push(Watched {
        label: format!("receiver: nginx (pid {})", nginx.pid()),
        pid: nginx.pid(),
    });
    let spec = h2load::LoadSpec {
        url: &target.grpc,
        token: &target.token,
        body_file,
        connections: config.connections,
        duration_s: config.duration_s,
        requests: config.requests,
        rate: config.rate,
    };
    let mut tally = LogTally::new(nginx.log.clone());
    let mut notes = Vec::new();
    let statements = start_statements(target, &mut notes).await;
    let before = Snapshot::take(&watched);
    let (start, start_ms) = (Instant::now(), unix_ms());
    let load = h2load::run(&spec).await?;
    let (publish_end, publish_end_ms) = (Instant::now(), unix_ms());

    let (expected, complete) = drain(target, &mut tally, publish_end + plan.drain_timeout).await;
    let after = Snapshot::take(&watched);
    // Deliveries of publishes whose caller hung up can come later than the server's
    // count says (it counts when it answers): a last look for stragglers.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tally.poll();
    let accepted = metric_sum(target, "hookline_events_published_total")
        .await
        .unwrap_or(0.0) as u64;
    let publish_s = publish_end.duration_since(start).as_secs_f64().max(1e-9);
    let deliveries = deliveries(&tally, expected, complete, start_ms, publish_end_ms);
    let (processes, machine) = processes(&before, &after, tally.delivered());
    let (all, system) = cpu_sums(&processes);
    let statement_costs = match &statements {
        Some(s) => s.read(tally.delivered()).await.unwrap_or_else(|e| {
            notes.push(format!("no per-statement costs (pg_stat_statements): {e}"));
            Vec::new()
        }),
        None => Vec::new(),
    };
    if tally.delivered() > expected {
        notes.push(format!(
            "{} deliveries more than the server's hookline_deliveries_created_total: publishes committed after their caller (h2load, at the end of its duration) hung up",
            tally.delivered() - expected
        ));
    }
    Ok(ExternalReport {
        mode: report::MODE,
        target: TargetInfo {
            kind: target.kind.to_string(),
            backend: target.backend.clone(),
            grpc: target.grpc.clone(),
        },
        config: config.clone(),
        load,
        events_accepted: accepted,
        publish_s,
        events_per_s: accepted as f64 / publish_s,
        deliveries,
        measured_s: after.at.duration_since(before.at).as_secs_f64(),
        server_peak_rss_mib: processes.first().and_then(|p| p.peak_rss_mib),
        processes,
        cpu_us_per_delivery_all: all,
        cpu_us_per_delivery_system: system,
        statements: statement_costs,
        machine,
        notes,
    })
}

/// PostgreSQL's statement counters of a spawned run's database, reset now; None (and a
/// note saying why, unless the run has no database of its own) when they cannot be read.
async fn start_statements(target: &Target, notes: &mut Vec<String>) -> Option<Statements> {
    let (admin, name) = target.fresh_database()?;
    let statements = Statements::new(admin, name);
    match statements.reset().await {
        Ok(()) => Some(statements),
        Err(e) => {
            notes.push(format!("no per-statement costs (pg_stat_statements): {e}"));
            None
        }
    }
}

/// Waits until the access log holds as many deliveries as the server created, or the
/// deadline; returns the server's count and whether it was reached.
async fn drain(target: &Target, tally: &mut LogTally, deadline: Instant) -> (u64, bool) {
    let mut expected = 0;
    loop {
        tally.poll();
        if let Some(v) = metric_sum(target, "hookline_deliveries_created_total").await {
            expected = v as u64;
        }
        if expected > 0 && tally.delivered() >= expected {
            return (expected, true);
        }
        if Instant::now() >= deadline {
            return (expected, false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The delivery figures from the access log.
fn deliveries(
    tally: &LogTally,
    expected: u64,
    complete: bool,
    start_ms: u64,
    publish_end_ms: u64,
) -> ExternalDeliveries {
    let delivered = tally.delivered();
    let last = tally
        .arrivals_ms
        .iter()
        .copied()
        .max()
        .unwrap_or(publish_end_ms);
    let in_window = tally
        .arrivals_ms
        .iter()
        .filter(|&&t| t <= publish_end_ms)
        .count() as f64;
    let late = tally
        .arrivals_ms
        .iter()
        .filter(|&&t| t > publish_end_ms + 2000)
        .count() as u64;
    let publish_s = (publish_end_ms.saturating_sub(start_ms) as f64 / 1000.0).max(1e-3);
    let overall_s = (last.max(publish_end_ms).saturating_sub(start_ms) as f64 / 1000.0).max(1e-3);
    ExternalDeliveries {
        expected,
        delivered,
        duplicates: tally.duplicates,
        unexpected_requests: tally.unexpected,
        complete,
        while_publishing_per_s: in_window / publish_s,
        overall_incl_drain_per_s: delivered as f64 / overall_s,
        drain_s: last.saturating_sub(publish_end_ms) as f64 / 1000.0,
        late_over_2s: late,
        all_within_2s: complete && late == 0,
        latency_ms: Percentiles::of(&tally.latency),
    }
}

/// The process table: the server and nginx (watched), PostgreSQL, RabbitMQ, h2load (the
/// bench's reaped children) and the bench itself (setup and log reading, not in the sums).
fn processes(
    before: &Snapshot,
    after: &Snapshot,
    delivered: u64,
) -> (Vec<ProcessInfo>, Option<crate::report::MachineInfo>) {
    let (mut rows, machine) = crate::report::resources(before, after, delivered);
    rows.push(crate::report::process_row(
        "load generator: h2load".into(),
        (before.bench_children, after.bench_children),
        None,
        before,
        after,
        delivered,
    ));
    for r in rows.iter_mut() {
        if r.label.starts_with("hookline bench:") {
            r.label = format!(
                "hookline bench itself: setup, log reading (pid {}; not in sums)",
                std::process::id()
            );
        }
    }
    (rows, machine)
}

/// µs per delivery of all processes but the bench itself, and of server + PostgreSQL +
/// RabbitMQ alone.
fn cpu_sums(rows: &[ProcessInfo]) -> (Option<f64>, Option<f64>) {
    let sum = |pick: &dyn Fn(&str) -> bool| {
        rows.iter()
            .filter(|r| pick(&r.label))
            .map(|r| r.cpu_us_per_delivery)
            .sum::<Option<f64>>()
    };
    let system = |l: &str| {
        l.starts_with("hookline serve") || l.starts_with("PostgreSQL") || l.starts_with("RabbitMQ")
    };
    let all = sum(&|l: &str| !l.starts_with("hookline bench itself"));
    (all, sum(&system))
}
