//! The report of an external-mode run (`--external`), and the medians of `--repeat` runs.
//!
//! Deliveries are counted from nginx's access log; latency is measured from the time in
//! the event id (the ULID's milliseconds, stamped by the server when it accepted the
//! event) to nginx's arrival time, both wall clock at millisecond resolution.

use std::fmt::Write as _;

use serde::Serialize;

use super::h2load::LoadResult;
use super::statements::StatementCost;
use crate::report::{MachineInfo, Percentiles, ProcessInfo, TargetInfo, thousands};

/// The label every external-mode report carries.
pub const MODE: &str = "external (nginx receiver and h2load load generator in their own processes)";

/// How the run was set up.
#[derive(Debug, Clone, Serialize)]
pub struct ExternalConfig {
    /// Subscriptions on the tenant; every event goes to all of them.
    pub fanout: usize,
    /// h2load connections (one request in flight on each).
    pub connections: usize,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    /// Events per second in all (h2load `--rps`); null for closed loop.
    pub rate: Option<f64>,
    pub payload_bytes: usize,
}

/// What arrived at nginx.
#[derive(Debug, Serialize)]
pub struct ExternalDeliveries {
    /// `hookline_deliveries_created_total` of the server after the run.
    pub expected: u64,
    /// Distinct (event, subscription) pairs answered 204.
    pub delivered: u64,
    pub duplicates: u64,
    /// Requests that were not a webhook for `/s/<n>` with an event id.
    pub unexpected_requests: u64,
    /// Every expected delivery arrived before the drain timeout.
    pub complete: bool,
    /// Deliveries that arrived while h2load ran ÷ its run time.
    pub while_publishing_per_s: f64,
    /// All deliveries ÷ (h2load start → last delivery).
    pub overall_incl_drain_per_s: f64,
    /// Last delivery − publishing stopped, in seconds (0 if nothing was left).
    pub drain_s: f64,
    /// Deliveries that arrived more than 2 s after publishing stopped.
    pub late_over_2s: u64,
    /// complete, and nothing arrived more than 2 s after publishing stopped.
    pub all_within_2s: bool,
    /// Event accepted (the id's time) → arrival at nginx, per first delivery.
    pub latency_ms: Percentiles,
}

/// One external-mode run.
#[derive(Debug, Serialize)]
pub struct ExternalReport {
    pub mode: &'static str,
    pub target: TargetInfo,
    pub config: ExternalConfig,
    pub load: LoadResult,
    /// `hookline_events_published_total` of the server after the run.
    pub events_accepted: u64,
    /// h2load's run time (process start to exit), seconds.
    pub publish_s: f64,
    pub events_per_s: f64,
    pub deliveries: ExternalDeliveries,
    /// From h2load's start to the end of the drain, seconds.
    pub measured_s: f64,
    pub processes: Vec<ProcessInfo>,
    /// Server, PostgreSQL, RabbitMQ, receiver and load generator together, µs per delivery.
    pub cpu_us_per_delivery_all: Option<f64>,
    /// Server, PostgreSQL and RabbitMQ only, µs per delivery.
    pub cpu_us_per_delivery_system: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
    /// PostgreSQL's costliest statements of the run (pg_stat_statements), when readable.
    pub statements: Vec<StatementCost>,
    pub machine: Option<MachineInfo>,
    pub notes: Vec<String>,
}

/// Medians over `--repeat` runs.
#[derive(Debug, Serialize)]
pub struct Medians {
    pub runs: usize,
    pub events_per_s: f64,
    pub while_publishing_per_s: f64,
    pub overall_incl_drain_per_s: f64,
    pub drain_s: f64,
    pub latency_p99_ms: f64,
    pub cpu_us_per_delivery_all: Option<f64>,
    pub cpu_us_per_delivery_system: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
    /// Every run delivered everything within 2 s of publishing stopping.
    pub all_within_2s: bool,
}

/// `--json` output of external mode.
#[derive(Debug, Serialize)]
pub struct ExternalOutput {
    pub mode: &'static str,
    pub scenario: String,
    pub runs: Vec<ExternalReport>,
    pub medians: Option<Medians>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = v.collect();
    v.filter(|v| !v.is_empty()).map(median)
}

impl Medians {
    /// The medians of two or more runs; None for one.
    pub fn of(runs: &[ExternalReport]) -> Option<Medians> {
        if runs.len() < 2 {
            return None;
        }
        let m = |f: fn(&ExternalReport) -> f64| median(runs.iter().map(f).collect());
        Some(Medians {
            runs: runs.len(),
            events_per_s: m(|r| r.events_per_s),
            while_publishing_per_s: m(|r| r.deliveries.while_publishing_per_s),
            overall_incl_drain_per_s: m(|r| r.deliveries.overall_incl_drain_per_s),
            drain_s: m(|r| r.deliveries.drain_s),
            latency_p99_ms: m(|r| r.deliveries.latency_ms.p99),
            cpu_us_per_delivery_all: median_opt(runs.iter().map(|r| r.cpu_us_per_delivery_all)),
            cpu_us_per_delivery_system: median_opt(
                runs.iter().map(|r| r.cpu_us_per_delivery_system),
            ),
            server_peak_rss_mib: median_opt(runs.iter().map(|r| r.server_peak_rss_mib)),
            all_within_2s: runs.iter().all(|r| r.deliveries.all_within_2s),
        })
    }

    pub fn render(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        format!(
            "\nhookline bench: medians of {} runs [{MODE}]\n  events/s {:.0}  deliveries/s while publishing {:.0}  incl. drain {:.0}  drain {:.1} s  all within 2 s: {}\n  latency p99 {:.1} ms  CPU µs per delivery: all {} (server+PostgreSQL+RabbitMQ {})  server peak RSS {} MiB\n",
            self.runs,
            self.events_per_s,
            self.while_publishing_per_s,
            self.overall_incl_drain_per_s,
            self.drain_s,
            if self.all_within_2s { "yes" } else { "no" },
            self.latency_p99_ms,
            opt(self.cpu_us_per_delivery_all),
            opt(self.cpu_us_per_delivery_system),
            self.server_peak_rss_mib
                .map_or("-".into(), |v| format!("{v:.1}")),
        )
    }
}

impl ExternalReport {
    /// The report as a table for people.
    pub fn render(&self, scenario: &str) -> String {
        let mut o = String::new();
        let c = &self.config;
        let _ = writeln!(o, "\nhookline bench: scenario {scenario} [{MODE}]");
        let _ = writeln!(
            o,
            "  target      {}: {}",
            self.target.kind, self.target.backend
        );
        let _ = writeln!(
            o,
            "  load        h2load, {} connections x 1 stream, {}, fan-out {}, payload {} bytes",
            c.connections,
            match c.rate {
                Some(r) => format!("open loop {r:.0} events/s"),
                None => "closed loop".into(),
            },
            c.fanout,
            c.payload_bytes
        );
        let _ = writeln!(
            o,
            "  publish     {} events accepted in {:.1} s = {:.0} events/s  (h2load: {} done, {} failed, mean {} ms)",
            thousands(self.events_accepted),
            self.publish_s,
            self.events_per_s,
            thousands(self.load.requests_done),
            thousands(self.load.requests_failed),
            self.load
                .mean_request_ms
                .map_or("-".into(), |v| format!("{v:.1}"))
        );
        self.render_deliveries(&mut o);
        self.render_resources(&mut o);
        self.render_statements(&mut o);
        for n in &self.notes {
            let _ = writeln!(o, "  note        {n}");
        }
        o
    }

    fn render_deliveries(&self, o: &mut String) {
        let d = &self.deliveries;
        let _ = writeln!(
            o,
            "  deliveries  {} of {} expected{}; duplicates {}, unexpected requests {}",
            thousands(d.delivered),
            thousands(d.expected),
            if d.complete {
                " (complete)"
            } else {
                " (INCOMPLETE)"
            },
            thousands(d.duplicates),
            thousands(d.unexpected_requests)
        );
        let _ = writeln!(
            o,
            "  throughput  while publishing {:.0}/s, incl. drain {:.0}/s; drain {:.2} s; {} arrived > 2 s after publishing stopped; all within 2 s: {}",
            d.while_publishing_per_s,
            d.overall_incl_drain_per_s,
            d.drain_s,
            thousands(d.late_over_2s),
            if d.all_within_2s { "yes" } else { "no" }
        );
        let _ = writeln!(o, "  accepted → receiver ms  {}", d.latency_ms.line());
    }

    fn render_statements(&self, o: &mut String) {
        if self.statements.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "  PostgreSQL statements (pg_stat_statements; execution only): exec µs per delivery, calls per 1k deliveries, rows per call"
        );
        for s in &self.statements {
            let _ = writeln!(
                o,
                "    {:>7.1} µs {:>8.1} {:>8.1}  {}",
                s.exec_us_per_delivery, s.calls_per_1k_deliveries, s.rows_per_call, s.query
            );
        }
    }

    fn render_resources(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "  resources over {:.1} s (CPU s, % of one core, µs per delivery, peak RSS):",
            self.measured_s
        );
        let f = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        for p in &self.processes {
            let _ = writeln!(
                o,
                "    {:<72} {:>8} {:>6}% {:>8} µs {:>8} MiB",
                p.label,
                f(p.cpu_s, 2),
                f(p.cpu_pct_of_core, 0),
                f(p.cpu_us_per_delivery, 0),
                f(p.peak_rss_mib, 1)
            );
        }
        let _ = writeln!(
            o,
            "    CPU µs per delivery: all processes {} (server + PostgreSQL + RabbitMQ {})",
            f(self.cpu_us_per_delivery_all, 0),
            f(self.cpu_us_per_delivery_system, 0)
        );
        if let Some(m) = &self.machine {
            let _ = writeln!(
                o,
                "    machine: {:.0}% of {} cores busy",
                m.busy_pct, m.cores
            );
        }
    }
}
