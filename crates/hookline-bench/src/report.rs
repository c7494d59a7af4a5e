//! The report of a run: figures computed from what the publishers, the receiver and
//! `/proc` recorded, printed as a table for people or as JSON (`--json`) for machines.
//!
//! Every figure's exact meaning is in the doc comment of its field; the crate README
//! repeats them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hdrhistogram::Histogram;
/// `1234567` as `1,234,567`: the one formatter Hookline states numbers with.
pub use hookline_core::fmt::thousands;
use serde::Serialize;

use crate::events::{EventTable, latency_histogram};
use crate::procstat::{self, Snapshot};
use crate::publisher::PublisherResult;
use crate::receiver::Receiver;
use crate::scenario::{Layout, Plan};
use crate::target::Target;

/// Everything `hookline bench --json` prints.
#[derive(Debug, Serialize)]
pub struct Output {
    /// [`IN_PROCESS`]: the publishers and the receiver run inside the bench.
    pub mode: &'static str,
    pub scenario: String,
    pub runs: Vec<RunReport>,
    /// Only when a run with hanging subscriptions was compared with one without.
    pub comparison: Option<Comparison>,
}

/// The label of every in-process report: its figures include the harness's own CPU use.
pub const IN_PROCESS: &str = "in-process (harness shares the CPU)";

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    pub(crate) fn line(&self) -> String {
        if self.count == 0 {
            return "none recorded".into();
        }
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
            self.p50,
            self.p90,
            self.p99,
            self.p999,
            self.max,
            thousands(self.count)
        )
    }
}

/// The target of a run.
#[derive(Debug, Serialize)]
pub struct TargetInfo {
    /// `spawned` or `server`.
    pub kind: String,
    /// Storage and broker of the server, without credentials.
    pub backend: String,
    pub grpc: String,
}

/// The plan as run.
#[derive(Debug, Serialize)]
pub struct ConfigInfo {
    pub subscriptions: usize,
    /// Subscriptions created in this run (the comparison run leaves out the hanging ones).
    pub subscriptions_created: usize,
    pub fanout: usize,
    pub hanging_subscriptions: usize,
    pub publishers: usize,
    pub connections: usize,
    /// Events per second (open loop); null for closed loop.
    pub rate: Option<f64>,
    pub duration_s: Option<f64>,
    pub events: Option<u64>,
    pub batch: usize,
    pub payload_bytes: usize,
    pub receiver_latency_ms: u64,
    pub fail_rate: f64,
    pub verify: bool,
    /// Null: Hookline's default schedule.
    pub retry_schedule_ms: Option<Vec<u64>>,
}

/// The publishing side.
#[derive(Debug, Serialize)]
pub struct PublishInfo {
    /// Publish or PublishBatch calls made.
    pub calls: u64,
    /// Events the server accepted (answered OK).
    pub events_accepted: u64,
    /// Calls that failed, in all and by gRPC code.
    pub errors: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Open loop only: events the schedule meant to send before the window ended but
    /// could not, because the server answered too slowly.
    pub missed_sends: u64,
    /// From the first call to the last answer, in seconds.
    pub window_s: f64,
    /// events_accepted / window_s.
    pub events_per_s: f64,
    /// Per call, from its intended send time (open loop) or its send time (closed loop)
    /// to its answer.
    pub latency_ms: Percentiles,
}

/// The receiving side. A delivery is one (event, subscription) pair answered 2xx.
#[derive(Debug, Serialize)]
pub struct DeliveryInfo {
    /// Deliveries to answering subscriptions that the accepted events should bring.
    pub expected: u64,
    /// Distinct deliveries received and answered 2xx.
    pub delivered: u64,
    /// Whether every expected delivery arrived within the drain timeout.
    pub complete: bool,
    /// Deliveries received while publishing (until the last publish answer).
    pub in_window: u64,
    /// in_window / the publishing window: the sustained rate under load.
    pub per_s_in_window: f64,
    /// delivered / (first call → last delivery): the rate including the drain.
    pub per_s_overall: f64,
    /// Last publish answer → last expected delivery, in seconds; null if the backlog
    /// did not drain within the timeout.
    pub drain_s: Option<f64>,
    /// Further 2xx answers for a pair already delivered (at-least-once redeliveries).
    pub duplicates: u64,
    /// Requests answered 500 on purpose (--fail-rate); Hookline retries them.
    pub injected_failures: u64,
    /// Requests to hanging subscriptions (each hung until the run ended).
    pub hanging_requests: u64,
    /// Every request the receiver got.
    pub requests: u64,
    /// Requests for no subscription of this run.
    pub unexpected_requests: u64,
    /// Requests without a readable `webhook-id`.
    pub bad_webhook_ids: u64,
    /// Events delivered that no publish answer named.
    pub unknown_events: u64,
    /// --verify: requests whose signature did not verify.
    pub verify_failures: u64,
    /// Publish answers whose deliveries_created differed from the scenario's fan-out.
    pub fanout_mismatches: u64,
    /// Publish answers whose event id could not be read.
    pub bad_event_ids: u64,
    /// Per delivery, from the event's intended send time to the arrival of the request
    /// answered 2xx (retries included).
    pub latency_ms: Percentiles,
}

/// CPU and memory of one process or group of processes during the measured period
/// (first call to the end of the drain).
#[derive(Debug, Serialize)]
pub struct ProcessInfo {
    pub label: String,
    pub cpu_s: Option<f64>,
    /// cpu_s over the measured period: 100 = one core busy.
    pub cpu_pct_of_core: Option<f64>,
    /// cpu_s per delivery, in µs.
    pub cpu_us_per_delivery: Option<f64>,
    /// Peak resident memory (VmHWM) over the process's life, in MiB.
    pub peak_rss_mib: Option<f64>,
}

/// The whole machine during the measured period.
#[derive(Debug, Serialize)]
pub struct MachineInfo {
    pub cores: usize,
    pub busy_cpu_s: f64,
    /// Share of all cores busy, in percent.
    pub busy_pct: f64,
}

/// One run's report.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub scenario: String,
    /// `healthy`, `with_hanging` or `without_hanging`.
    pub variant: String,
    pub target: TargetInfo,
    pub config: ConfigInfo,
    pub publish: PublishInfo,
    pub deliveries: DeliveryInfo,
    /// From the first call to the end of the drain, in seconds.
    pub measured_s: f64,
    pub processes: Vec<ProcessInfo>,
    pub machine: Option<MachineInfo>,
    /// Scenario `ordered`: whether arrival order matched publish order.
    pub order: Option<crate::events::OrderInfo>,
    pub notes: Vec<String>,
}

/// The hanging scenario's comparison.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// Deliveries/s to healthy subscriptions while publishing, without hanging subscriptions.
    pub without_hanging_per_s: f64,
    /// The same with the hanging subscriptions present.
    pub with_hanging_per_s: f64,
    /// with / without: 1.0 means a hanging subscription costs the healthy ones nothing.
    pub ratio: f64,
    /// Publish → receiver p99 of healthy deliveries, in ms, without and with.
    pub without_hanging_p99_ms: f64,
    pub with_hanging_p99_ms: f64,
}

/// What [`RunReport::build`] reads.
pub struct Inputs<'a> {
    pub plan: &'a Plan,
    pub layout: &'a Layout,
    pub target: &'a Target,
    pub receiver: &'a Receiver,
    pub events: &'a EventTable,
    pub epoch: Instant,
    pub start: Instant,
    pub publish_end: Instant,
    pub end: Instant,
    pub drained: bool,
    pub expected: u64,
    pub accepted: u64,
    pub delivered_in_window: u64,
    pub publishers: Vec<PublisherResult>,
    pub missed_sends: u64,
    pub before: Snapshot,
    pub after: Snapshot,
}

impl RunReport {
    pub fn build(i: Inputs<'_>) -> RunReport {
        let plan = i.plan;
        let c = i.receiver.counters();
        let totals = PublisherTotals::of(&i.publishers);
        let (totals_mismatches, totals_bad_ids) = (totals.mismatches, totals.bad_ids);
        let table = i.events.summary();
        let window = i
            .publish_end
            .duration_since(i.start)
            .as_secs_f64()
            .max(1e-9);
        let delivered = c.delivered.load(Ordering::Relaxed);
        let start_ns = i.start.duration_since(i.epoch).as_nanos() as u64;
        let publish_end_ns = i.publish_end.duration_since(i.epoch).as_nanos() as u64;
        let last_ns = c.last_delivery_ns.load(Ordering::Relaxed);
        let overall_s = if delivered > 0 {
            (last_ns.saturating_sub(start_ns) as f64 / 1e9).max(window)
        } else {
            window
        };
        let complete = i.drained && delivered >= i.expected;
        let (processes, machine) = resources(&i.before, &i.after, delivered);
        RunReport {
            scenario: plan.scenario.to_string(),
            variant: i.layout.variant().to_string(),
            target: TargetInfo {
                kind: i.target.kind.to_string(),
                backend: i.target.backend.clone(),
                grpc: i.target.grpc.clone(),
            },
            config: ConfigInfo::of(plan, i.layout),
            publish: totals.into_info(i.accepted, i.missed_sends, window),
            deliveries: DeliveryInfo {
                expected: i.expected,
                delivered,
                complete,
                in_window: i.delivered_in_window,
                per_s_in_window: i.delivered_in_window as f64 / window,
                per_s_overall: delivered as f64 / overall_s,
                drain_s: complete.then(|| last_ns.saturating_sub(publish_end_ns) as f64 / 1e9),
                duplicates: c.duplicates.load(Ordering::Relaxed),
                injected_failures: c.injected_failures.load(Ordering::Relaxed),
                hanging_requests: c.hanging_requests.load(Ordering::Relaxed),
                requests: c.requests.load(Ordering::Relaxed),
                unexpected_requests: c.unexpected.load(Ordering::Relaxed),
                bad_webhook_ids: c.bad_webhook_id.load(Ordering::Relaxed),
                unknown_events: table.unknown_events,
                verify_failures: c.verify_failures.load(Ordering::Relaxed),
                fanout_mismatches: totals_mismatches,
                bad_event_ids: totals_bad_ids,
                latency_ms: Percentiles::of(&table.e2e),
            },
            measured_s: i.end.duration_since(i.start).as_secs_f64(),
            processes,
            machine,
            order: i.events.order_check(),
            notes: Vec::new(),
        }
    }

    /// The report as a table for people.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nhookline bench: scenario {} ({}) [{IN_PROCESS}]",
            self.scenario, self.variant
        );
        let _ = writeln!(
            o,
            "  target      {}: {}",
            self.target.kind, self.target.backend
        );
        self.render_load(&mut o);
        self.render_publish(&mut o);
        self.render_deliveries(&mut o);
        self.render_resources(&mut o);
        if let Some(ord) = &self.order {
            let _ = writeln!(
                o,
                "  order       {}: {} deliveries checked, {} out of order, {} unknown",
                if ord.held { "held" } else { "NOT held" },
                ord.checked,
                ord.out_of_order,
                ord.unknown
            );
        }
        for n in &self.notes {
            let _ = writeln!(o, "  note        {n}");
        }
        o
    }

    /// The load asked for: publishers, pacing, calls, subscriptions.
    fn render_load(&self, o: &mut String) {
        let c = &self.config;
        let pace = match c.rate {
            Some(r) => format!("open loop at {r} events/s"),
            None => "closed loop".into(),
        };
        let call = if c.batch == 1 {
            "Publish".to_string()
        } else {
            format!("PublishBatch of {}", c.batch)
        };
        let limit = match (c.duration_s, c.events) {
            (Some(s), Some(n)) => format!("{s} s or {n} events"),
            (Some(s), None) => format!("{s} s"),
            (None, Some(n)) => format!("{n} events"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            o,
            "  load        {} publishers on {} connections, {pace}, {call}, {} B payloads, {limit}",
            c.publishers, c.connections, c.payload_bytes
        );
        let _ = writeln!(
            o,
            "              {} subscriptions ({} hanging), fan-out {}, receiver latency {} ms, fail rate {}{}",
            c.subscriptions_created,
            c.hanging_subscriptions,
            c.fanout,
            c.receiver_latency_ms,
            c.fail_rate,
            if c.verify {
                ", signatures verified"
            } else {
                ""
            }
        );
    }

    /// What the publishers did.
    fn render_publish(&self, o: &mut String) {
        let p = &self.publish;
        let _ = writeln!(
            o,
            "  publish     {} events accepted in {} calls, {} errors{} over {:.2} s: {:.0} events/s",
            thousands(p.events_accepted),
            thousands(p.calls),
            thousands(p.errors),
            if p.missed_sends > 0 {
                format!(
                    ", {} sends missed (behind schedule)",
                    thousands(p.missed_sends)
                )
            } else {
                String::new()
            },
            p.window_s,
            p.events_per_s
        );
        if let Some(e) = &p.first_error {
            let _ = writeln!(o, "              first error: {e}");
        }
        let _ = writeln!(
            o,
            "              call latency ms       {}",
            p.latency_ms.line()
        );
    }

    /// What the receiver got.
    fn render_deliveries(&self, o: &mut String) {
        let d = &self.deliveries;
        let _ = writeln!(
            o,
            "  deliveries  {} of {} expected{}, {} duplicates",
            thousands(d.delivered),
            thousands(d.expected),
            if d.complete {
                " (complete)"
            } else {
                " (INCOMPLETE: drain timed out)"
            },
            thousands(d.duplicates)
        );
        let _ = writeln!(
            o,
            "              while publishing {:.0}/s ({} delivered), overall incl. drain {:.0}/s, drain {}",
            d.per_s_in_window,
            thousands(d.in_window),
            d.per_s_overall,
            d.drain_s
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "did not finish".into())
        );
        let _ = writeln!(
            o,
            "              publish→receiver ms   {}",
            d.latency_ms.line()
        );
        let _ = writeln!(
            o,
            "  receiver    {} requests: {} answered 500 on purpose, {} hung, {} unexpected, {} without webhook-id, {} unknown events, {} bad signatures, {} fan-out mismatches",
            thousands(d.requests),
            thousands(d.injected_failures),
            thousands(d.hanging_requests),
            thousands(d.unexpected_requests),
            thousands(d.bad_webhook_ids),
            thousands(d.unknown_events),
            thousands(d.verify_failures),
            thousands(d.fanout_mismatches),
        );
    }

    /// CPU and memory, per process and for the machine.
    fn render_resources(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "  resources   over the measured {:.2} s (peak RSS: over each process's life)",
            self.measured_s
        );
        let _ = writeln!(
            o,
            "    {:<72} {:>8} {:>8} {:>10} {:>9}",
            "process", "CPU s", "% core", "µs/deliv.", "peak MiB"
        );
        let opt = |v: Option<f64>, prec: usize| {
            v.map(|x| format!("{x:.prec$}"))
                .unwrap_or_else(|| "-".into())
        };
        for pr in &self.processes {
            let _ = writeln!(
                o,
                "    {:<72} {:>8} {:>8} {:>10} {:>9}",
                pr.label,
                opt(pr.cpu_s, 2),
                opt(pr.cpu_pct_of_core, 0),
                opt(pr.cpu_us_per_delivery, 1),
                opt(pr.peak_rss_mib, 1)
            );
        }
        if let Some(m) = &self.machine {
            let _ = writeln!(
                o,
                "    machine: {} cores, {:.1} CPU s busy ({:.0}% of all cores)",
                m.cores, m.busy_cpu_s, m.busy_pct
            );
        }
    }
}

/// The publishers' results added up.
struct PublisherTotals {
    latency: Histogram<u64>,
    errors_by_code: BTreeMap<String, u64>,
    calls: u64,
    first_error: Option<String>,
    mismatches: u64,
    bad_ids: u64,
}

impl PublisherTotals {
    fn of(publishers: &[PublisherResult]) -> Self {
        let mut t = PublisherTotals {
            latency: latency_histogram(),
            errors_by_code: BTreeMap::new(),
            calls: 0,
            first_error: None,
            mismatches: 0,
            bad_ids: 0,
        };
        for p in publishers {
            let _ = t.latency.add(&p.latency);
            t.calls += p.calls;
            for (code, n) in &p.errors {
                *t.errors_by_code.entry(code.clone()).or_insert(0) += n;
            }
            if t.first_error.is_none() {
                t.first_error.clone_from(&p.first_error);
            }
            t.mismatches += p.fanout_mismatches;
            t.bad_ids += p.bad_event_ids;
        }
        t
    }

    fn into_info(self, accepted: u64, missed_sends: u64, window: f64) -> PublishInfo {
        PublishInfo {
            calls: self.calls,
            events_accepted: accepted,
            errors: self.errors_by_code.values().sum(),
            errors_by_code: self.errors_by_code,
            first_error: self.first_error,
            missed_sends,
            window_s: window,
            events_per_s: accepted as f64 / window,
            latency_ms: Percentiles::of(&self.latency),
        }
    }
}

impl ConfigInfo {
    fn of(plan: &Plan, layout: &Layout) -> Self {
        let created = (0..layout.subs).filter(|s| layout.created(*s)).count();
        ConfigInfo {
            subscriptions: plan.subscriptions,
            subscriptions_created: created,
            fanout: plan.fanout,
            hanging_subscriptions: if layout.with_hanging {
                plan.hang_subs
            } else {
                0
            },
            publishers: plan.publishers,
            connections: plan.connections,
            rate: plan.rate,
            duration_s: plan.duration.map(|d| d.as_secs_f64()),
            events: plan.events,
            batch: plan.batch,
            payload_bytes: plan.payload_bytes,
            receiver_latency_ms: plan.receiver_latency.as_millis() as u64,
            fail_rate: plan.fail_rate,
            verify: plan.verify,
            retry_schedule_ms: plan
                .retry_schedule
                .as_ref()
                .map(|s| s.iter().map(|d| d.as_millis() as u64).collect()),
        }
    }
}

/// CPU and memory of each watched process, the bench itself, the database and broker
/// servers, and the whole machine, between two snapshots.
pub(crate) fn resources(
    before: &Snapshot,
    after: &Snapshot,
    delivered: u64,
) -> (Vec<ProcessInfo>, Option<MachineInfo>) {
    let row = |label: String, ticks, rss| process_row(label, ticks, rss, before, after, delivered);
    let mut processes = Vec::new();
    for (w, cpu_before, _) in &before.watched {
        let end = after.watched.iter().find(|(a, _, _)| a.pid == w.pid);
        let ticks = (*cpu_before, end.and_then(|a| a.1));
        processes.push(row(w.label.clone(), ticks, end.and_then(|a| a.2)));
    }
    let bench = format!(
        "hookline bench: publishers + receiver (pid {})",
        std::process::id()
    );
    processes.push(row(bench, (before.bench.0, after.bench.0), after.bench.1));
    let group = |label: &str, b: Option<procstat::GroupCpu>, a: Option<procstat::GroupCpu>| {
        a.map(|a| {
            let label = format!("{label} ({} processes, whole machine)", a.processes);
            row(label, (b.map(|b| b.ticks), Some(a.ticks)), None)
        })
    };
    processes.extend(group(
        "PostgreSQL server: every `postgres` process",
        before.postgres,
        after.postgres,
    ));
    processes.extend(group(
        "RabbitMQ server: every `beam.smp` process",
        before.rabbitmq,
        after.rabbitmq,
    ));
    (processes, machine(before, after))
}

/// One row of the process table: CPU ticks at `before` and `after` (per second, per
/// core and per delivery over the time between the snapshots) and a peak RSS in KiB.
pub(crate) fn process_row(
    label: String,
    (ticks_before, ticks_after): (Option<u64>, Option<u64>),
    rss_kib: Option<u64>,
    before: &Snapshot,
    after: &Snapshot,
    delivered: u64,
) -> ProcessInfo {
    let measured = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let cpu_s = ticks_before
        .zip(ticks_after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / procstat::ticks_per_second());
    ProcessInfo {
        label,
        cpu_s,
        cpu_pct_of_core: cpu_s.map(|s| s / measured * 100.0),
        cpu_us_per_delivery: cpu_s
            .filter(|_| delivered > 0)
            .map(|s| s * 1e6 / delivered as f64),
        peak_rss_mib: rss_kib.map(|k| k as f64 / 1024.0),
    }
}

/// The whole machine's busy CPU between two snapshots.
fn machine(before: &Snapshot, after: &Snapshot) -> Option<MachineInfo> {
    let tps = procstat::ticks_per_second();
    before
        .machine
        .zip(after.machine)
        .map(|((bb, bt), (ab, at))| {
            let busy = ab.saturating_sub(bb);
            let total = at.saturating_sub(bt).max(1);
            MachineInfo {
                cores: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                busy_cpu_s: busy as f64 / tps,
                busy_pct: busy as f64 / total as f64 * 100.0,
            }
        })
}

impl Comparison {
    /// The comparison of a `without_hanging` and a `with_hanging` run, if both are there.
    pub fn from_runs(runs: &[RunReport]) -> Option<Comparison> {
        let without = runs.iter().find(|r| r.variant == "without_hanging")?;
        let with = runs.iter().find(|r| r.variant == "with_hanging")?;
        let (a, b) = (
            without.deliveries.per_s_in_window,
            with.deliveries.per_s_in_window,
        );
        Some(Comparison {
            without_hanging_per_s: a,
            with_hanging_per_s: b,
            ratio: if a > 0.0 { b / a } else { 0.0 },
            without_hanging_p99_ms: without.deliveries.latency_ms.p99,
            with_hanging_p99_ms: with.deliveries.latency_ms.p99,
        })
    }

    pub fn render(&self) -> String {
        format!(
            "hanging subscriptions: healthy deliveries/s while publishing {:.0} with vs {:.0} without: ratio {:.2}; publish→receiver p99 {:.1} ms vs {:.1} ms\n",
            self.with_hanging_per_s,
            self.without_hanging_per_s,
            self.ratio,
            self.with_hanging_p99_ms,
            self.without_hanging_p99_ms
        )
    }
}
