//! Scenario `noisy` (issue #11): does one tenant's burst delay another tenant?
//!
//! Tenant A publishes a burst (`--burst` deliveries, 200,000 by default: 50,000 events ×
//! 4 subscriptions) with `PublishBatch` as fast as the server takes it, to its own
//! healthy receiver. As soon as A's publishing ends — while A's backlog drains — tenant B
//! publishes at a steady `--rate` (50 events/s by default) to its own healthy receiver,
//! until A's backlog is delivered. The report gives B's publish → receiver latency
//! (p50/p99/max) and A's throughput; with `--compare` (the default) the same run without
//! B first, on a fresh server, and A's throughput drop between the two.
//!
//! Both tenants' receivers are the bench's in-process receiver (one each, so their
//! counts and latencies stay apart): this scenario runs in-process only, and says so.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::events::EventTable;
use crate::publisher::PublishShared;
use crate::receiver::{Receiver, ReceiverConfig};
use crate::report::{IN_PROCESS, Percentiles, ProcessInfo, TargetInfo};
use crate::scenario::{Layout, Plan};
use crate::target::Target;
use crate::{BenchError, BenchOptions, procstat};

/// A's burst in deliveries unless `--burst` says otherwise.
pub const DEFAULT_BURST: u64 = 200_000;
/// B's events per second unless `--rate` says otherwise.
pub const DEFAULT_B_RATE: f64 = 50.0;

/// One tenant of the scenario: its plan, subscriptions, events and receiver.
struct Side {
    plan: Arc<Plan>,
    layout: Arc<Layout>,
    events: Arc<EventTable>,
    receiver: Receiver,
}

impl Side {
    async fn start(plan: Plan, epoch: Instant) -> Result<Side, BenchError> {
        let events = Arc::new(EventTable::new(epoch, plan.expected_events()));
        let cfg = ReceiverConfig {
            latency: Duration::ZERO,
            fail_rate: 0.0,
            verify: false,
        };
        let receiver = Receiver::start(([127, 0, 0, 1], 0).into(), cfg, events.clone()).await?;
        Ok(Side {
            layout: Arc::new(Layout::new(&plan, true)),
            plan: Arc::new(plan),
            events,
            receiver,
        })
    }

    /// Creates the tenant and its subscriptions; returns the tenant id.
    async fn setup(
        &self,
        registry: &mut RegistryServiceClient<Channel>,
        auth: &MetadataValue<Ascii>,
        tenants: &mut Vec<String>,
    ) -> Result<String, BenchError> {
        let tenant = crate::create_tenant(registry, &self.plan, auth).await?;
        tenants.push(tenant.clone());
        let url = format!("http://{}", self.receiver.addr());
        let subs =
            crate::create_subscriptions(registry, &self.plan, &self.layout, &tenant, &url, auth)
                .await?;
        self.receiver.set_subscriptions(subs);
        Ok(tenant)
    }

    fn delivered(&self) -> u64 {
        self.receiver.counters().delivered.load(Ordering::Relaxed)
    }
}

/// Tenant A's figures.
#[derive(Debug, Serialize)]
pub struct BurstInfo {
    pub events_accepted: u64,
    pub deliveries_expected: u64,
    pub delivered: u64,
    pub complete: bool,
    pub publish_s: f64,
    /// Deliveries/s from the first publish to the last delivery: the figure the drop is
    /// computed on.
    pub deliveries_per_s: f64,
    /// Deliveries/s from the end of A's publishing to its last delivery.
    pub drain_deliveries_per_s: f64,
    pub drain_s: f64,
    pub latency_ms: Percentiles,
}

/// Tenant B's figures.
#[derive(Debug, Serialize)]
pub struct SteadyInfo {
    pub rate: f64,
    pub events_accepted: u64,
    pub delivered: u64,
    pub errors: u64,
    /// Publish → receiver, per delivery.
    pub latency_ms: Percentiles,
}

/// One run, with or without B.
#[derive(Debug, Serialize)]
pub struct NoisyRun {
    pub with_b: bool,
    pub target: TargetInfo,
    pub a: BurstInfo,
    pub b: Option<SteadyInfo>,
    pub processes: Vec<ProcessInfo>,
    pub notes: Vec<String>,
}

/// `--json` output.
#[derive(Debug, Serialize)]
pub struct NoisyOutput {
    pub mode: &'static str,
    pub scenario: &'static str,
    pub runs: Vec<NoisyRun>,
    /// 1 − A's deliveries/s with B ÷ without B (0.1 = A lost 10%), when both ran.
    pub a_throughput_drop: Option<f64>,
}

/// A's and B's plans from the resolved plan and the flags.
fn plans(args: &BenchOptions, plan: &Plan) -> Result<(Plan, Plan), BenchError> {
    let burst = args.burst.unwrap_or(DEFAULT_BURST);
    let rate = args.rate.unwrap_or(DEFAULT_B_RATE);
    if burst == 0 || burst > 50_000_000 {
        return Err(BenchError::Usage(format!(
            "--burst is {burst}; allowed: 1 to 50000000 deliveries"
        )));
    }
    let mut a = plan.clone();
    a.events = Some(burst.div_ceil(plan.fanout as u64));
    a.duration = None;
    a.rate = None;
    let mut b = plan.clone();
    b.subscriptions = 1;
    b.fanout = 1;
    // Open loop: several publishers, so that one slow answer does not hold back the rate.
    b.publishers = 8;
    b.connections = 1;
    b.batch = 1;
    b.rate = Some(rate);
    b.events = None;
    b.duration = Some(plan.drain_timeout);
    Ok((a, b))
}

/// Runs the scenario: without B (unless `--no-compare`), then with B; prints the result.
pub async fn run(args: &BenchOptions, plan: &Plan) -> Result<(), BenchError> {
    let (a, b) = plans(args, plan)?;
    let variants: &[bool] = if plan.compare {
        &[false, true]
    } else {
        &[true]
    };
    let mut runs = Vec::new();
    for &with_b in variants {
        let r = run_one(args, &a, &b, with_b).await?;
        if !args.json {
            println!("{}", r.render());
        }
        runs.push(r);
    }
    let a_throughput_drop = match runs.as_slice() {
        [without, with] if without.a.deliveries_per_s > 0.0 => {
            Some(1.0 - with.a.deliveries_per_s / without.a.deliveries_per_s)
        }
        _ => None,
    };
    if args.json {
        let out = NoisyOutput {
            mode: IN_PROCESS,
            scenario: "noisy",
            runs,
            a_throughput_drop,
        };
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| BenchError::Server(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else if let Some(drop) = a_throughput_drop {
        println!(
            "hookline bench: noisy: A's deliveries/s {:.1}% lower with B than without\n",
            drop * 100.0
        );
    }
    Ok(())
}

/// One run on a fresh target: receivers, setup, burst, B's steady load, drain, cleanup.
async fn run_one(
    args: &BenchOptions,
    a: &Plan,
    b: &Plan,
    with_b: bool,
) -> Result<NoisyRun, BenchError> {
    let epoch = Instant::now();
    let a = Side::start(a.clone(), epoch).await?;
    let b = Side::start(b.clone(), epoch).await?;
    eprintln!(
        "hookline bench: run `noisy` ({}), receivers at {} (A) and {} (B)",
        if with_b { "with B" } else { "A alone" },
        a.receiver.addr(),
        b.receiver.addr()
    );
    let mut target = match Target::start(args).await {
        Ok(t) => t,
        Err(e) => {
            a.receiver.shutdown();
            b.receiver.shutdown();
            return Err(e);
        }
    };
    let mut tenants = Vec::new();
    let outcome = tokio::select! {
        r = measure(&a, &b, with_b, &target, &mut tenants) => r,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
    };
    let mut notes = target
        .finish(!args.keep, tenants.first().map(String::as_str))
        .await;
    if let (Some(other), true) = (tenants.get(1), !args.keep) {
        notes.extend(crate::target::delete_other_tenant(&target, other).await);
    }
    a.receiver.shutdown();
    b.receiver.shutdown();
    for note in &notes {
        eprintln!("hookline bench: {note}");
    }
    let mut run = outcome?;
    run.notes.extend(notes);
    Ok(run)
}

/// Setup, A's burst, B's steady load during A's drain, and the figures.
async fn measure(
    a: &Side,
    b: &Side,
    with_b: bool,
    target: &Target,
    tenants: &mut Vec<String>,
) -> Result<NoisyRun, BenchError> {
    let (channels, auth, tenant_a, tenant_b) = setup(a, b, target, tenants).await?;
    let before = procstat::Snapshot::take(&target.processes);
    let start = Instant::now();
    let shared_a = Arc::new(PublishShared::new(
        a.plan.clone(),
        a.layout.clone(),
        a.events.clone(),
        start,
        tenant_a,
        auth.clone(),
    ));
    let _stop_a = shared_a.abort.clone().drop_guard();
    crate::run_publishers(&shared_a, a.plan.publishers, &channels).await?;
    let a_publish_end = Instant::now();
    let a_at_publish_end = a.delivered();
    let expected_a = shared_a.expected.load(Ordering::Relaxed);

    let shared_b = Arc::new(PublishShared::new(
        b.plan.clone(),
        b.layout.clone(),
        b.events.clone(),
        a_publish_end,
        tenant_b,
        auth,
    ));
    let _stop_b = shared_b.abort.clone().drop_guard();
    let b_task = with_b.then(|| {
        let (shared, n) = (shared_b.clone(), b.plan.publishers);
        let channel = channels[channels.len() - 1].clone();
        tokio::spawn(async move { crate::run_publishers(&shared, n, &[channel]).await })
    });
    let deadline = a_publish_end + a.plan.drain_timeout;
    let complete = drain(a, b, expected_a, deadline).await;
    shared_b.abort.cancel();
    let b_errors = match b_task {
        Some(t) => match t.await {
            Ok(Ok(results)) => results.iter().flat_map(|r| r.errors.values()).sum(),
            _ => 1,
        },
        None => 0,
    };
    let expected_b = shared_b.expected.load(Ordering::Relaxed);
    drain(b, b, expected_b, Instant::now() + Duration::from_secs(10)).await;
    let after = procstat::Snapshot::take(&target.processes);

    let a_info = burst_info(
        a,
        &shared_a,
        complete,
        start,
        a_publish_end,
        a_at_publish_end,
    );
    let b_info = with_b.then(|| SteadyInfo {
        rate: b.plan.rate.unwrap_or(0.0),
        events_accepted: shared_b.accepted.load(Ordering::Relaxed),
        delivered: b.delivered(),
        errors: b_errors,
        latency_ms: Percentiles::of(&b.events.summary().e2e),
    });
    let (processes, _) = crate::report::resources(&before, &after, a.delivered() + b.delivered());
    Ok(NoisyRun {
        notes: notes(b_info.as_ref()),
        with_b,
        target: TargetInfo {
            kind: target.kind.to_string(),
            backend: target.backend.clone(),
            grpc: target.grpc.clone(),
        },
        a: a_info,
        b: b_info,
        processes,
    })
}

fn notes(b: Option<&SteadyInfo>) -> Vec<String> {
    match b {
        Some(b) if b.events_accepted < 10 => vec![
            "B published fewer than 10 events: A's backlog drained at once; raise --burst".into(),
        ],
        _ => Vec::new(),
    }
}

/// Connections, the API key header and both tenants with their subscriptions.
async fn setup(
    a: &Side,
    b: &Side,
    target: &Target,
    tenants: &mut Vec<String>,
) -> Result<(Vec<Channel>, MetadataValue<Ascii>, String, String), BenchError> {
    let auth: MetadataValue<Ascii> = format!("Bearer {}", target.token)
        .parse()
        .map_err(|_| BenchError::Usage("the API key cannot go in a header".into()))?;
    let mut channels = Vec::with_capacity(a.plan.connections);
    for _ in 0..a.plan.connections {
        channels.push(crate::connect(&target.grpc, &target.tls).await?);
    }
    let mut registry = RegistryServiceClient::new(channels[0].clone());
    let tenant_a = a.setup(&mut registry, &auth, tenants).await?;
    let tenant_b = b.setup(&mut registry, &auth, tenants).await?;

    Ok((channels, auth, tenant_a, tenant_b))
}

/// Waits until `side` has `expected` deliveries or the deadline passed; prints progress of
/// both sides each second.
async fn drain(side: &Side, other: &Side, expected: u64, deadline: Instant) -> bool {
    let mut last_print = Instant::now();
    loop {
        if side.delivered() >= expected {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "hookline bench: noisy: A delivered {} of {}, B delivered {}",
                side.delivered(),
                expected,
                other.delivered()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A's figures: throughput over the whole run and over its drain.
fn burst_info(
    a: &Side,
    shared: &PublishShared,
    complete: bool,
    start: Instant,
    publish_end: Instant,
    at_publish_end: u64,
) -> BurstInfo {
    let delivered = a.delivered();
    let last_ns = a
        .receiver
        .counters()
        .last_delivery_ns
        .load(Ordering::Relaxed);
    let epoch_to = |t: Instant| a.events.ns_since_epoch(t) as f64 / 1e9;
    let last_s = last_ns as f64 / 1e9;
    let publish_s = publish_end.duration_since(start).as_secs_f64().max(1e-9);
    let drain_s = (last_s - epoch_to(publish_end)).max(0.0);
    let overall_s = (last_s - epoch_to(start)).max(publish_s);
    BurstInfo {
        events_accepted: shared.accepted.load(Ordering::Relaxed),
        deliveries_expected: shared.expected.load(Ordering::Relaxed),
        delivered,
        complete,
        publish_s,
        deliveries_per_s: delivered as f64 / overall_s,
        drain_deliveries_per_s: if drain_s > 0.0 {
            delivered.saturating_sub(at_publish_end) as f64 / drain_s
        } else {
            0.0
        },
        drain_s,
        latency_ms: Percentiles::of(&a.events.summary().e2e),
    }
}

impl NoisyRun {
    /// The run as text for people.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let a = &self.a;
        let _ = writeln!(
            o,
            "\nhookline bench: scenario noisy ({}) [{IN_PROCESS}]",
            if self.with_b { "with B" } else { "A alone" }
        );
        let _ = writeln!(
            o,
            "  target      {}: {}",
            self.target.kind, self.target.backend
        );
        let _ = writeln!(
            o,
            "  A (burst)   {} events, {} of {} deliveries{}; published in {:.1} s; {:.0} deliveries/s overall, {:.0}/s during its drain of {:.1} s",
            a.events_accepted,
            a.delivered,
            a.deliveries_expected,
            if a.complete { "" } else { " (INCOMPLETE)" },
            a.publish_s,
            a.deliveries_per_s,
            a.drain_deliveries_per_s,
            a.drain_s
        );
        let _ = writeln!(o, "  A latency ms  {}", a.latency_ms.line());
        if let Some(b) = &self.b {
            let _ = writeln!(
                o,
                "  B (steady)  {:.0} events/s: {} events, {} delivered, {} errors",
                b.rate, b.events_accepted, b.delivered, b.errors
            );
            let _ = writeln!(
                o,
                "  B publish → receiver ms  p50 {:.1}  p99 {:.1}  max {:.1}  (n={})",
                b.latency_ms.p50, b.latency_ms.p99, b.latency_ms.max, b.latency_ms.count
            );
        }
        for p in &self.processes {
            let _ = writeln!(
                o,
                "  cpu         {:<70} {:>8} s",
                p.label,
                p.cpu_s.map_or("-".into(), |v| format!("{v:.2}"))
            );
        }
        for n in &self.notes {
            let _ = writeln!(o, "  note        {n}");
        }
        o
    }
}
