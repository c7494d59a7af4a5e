//! Scenarios and the plan of a run.
//!
//! A scenario is a named set of defaults; flags override any of them, and [`Plan`] is the
//! result. [`Layout`] decides which subscriptions exist and which events reach them:
//! subscriptions form groups of `fanout`, every subscription of group `g` filters on the
//! event type `bench.g<g>`, and event number `k` has the type of group `k % groups`, so
//! each event goes to exactly `fanout` subscriptions and the groups share the load evenly.
//! Hanging subscriptions are the first `hang_subs` ones.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{BenchError, BenchOptions};

/// A named set of defaults.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    pub subscriptions: usize,
    pub fanout: usize,
    pub publishers: usize,
    pub batch: usize,
    pub fail_rate: f64,
    pub hang_share: f64,
    pub compare: bool,
}

const BASE: Scenario = Scenario {
    name: "",
    summary: "",
    subscriptions: 10,
    fanout: 1,
    publishers: 16,
    batch: 1,
    fail_rate: 0.0,
    hang_share: 0.0,
    compare: false,
};

/// Every scenario, in the order `--list` shows them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "single",
        summary: "each event goes to one subscription (10 subscriptions, events spread evenly); Publish, one event per call",
        ..BASE
    },
    Scenario {
        name: "fanout10",
        summary: "each event goes to 10 subscriptions: 10 deliveries per publish",
        fanout: 10,
        ..BASE
    },
    Scenario {
        name: "batch100",
        summary: "like single, but PublishBatch with 100 events per call",
        publishers: 4,
        batch: 100,
        ..BASE
    },
    Scenario {
        name: "fail1pct",
        summary: "like single, but 1% of the receiver's answers are 500, so Hookline retries them",
        fail_rate: 0.01,
        ..BASE
    },
    Scenario {
        name: "hanging",
        summary: "5 subscriptions, one of which never answers: 20% of events go to it; runs the same setup without that subscription too and reports the healthy deliveries/s of both and their ratio",
        subscriptions: 5,
        hang_share: 0.2,
        compare: true,
        ..BASE
    },
    Scenario {
        name: "noisy",
        summary: "two tenants: A publishes a burst of --burst deliveries (200000) with PublishBatch to 4 subscriptions; during A's drain B publishes --rate (50) events/s to its own; B's latency and A's throughput, also without B (--compare)",
        subscriptions: 4,
        fanout: 4,
        publishers: 4,
        batch: 500,
        compare: true,
        ..BASE
    },
    Scenario {
        name: "ordered",
        summary: "one ordered subscription, one publisher, PublishBatch of 100 in order: events/s of the subscription and whether arrival order matched publish order",
        subscriptions: 1,
        publishers: 1,
        batch: 100,
        ..BASE
    },
];

/// The retry schedule the bench gives its subscriptions unless told otherwise: short, so
/// that a retried delivery arrives within a run.
pub const DEFAULT_RETRY_SCHEDULE_MS: &[u64] = &[1000, 2000, 4000, 8000, 16000];
/// Seconds of publishing when neither --duration nor --events is given.
pub const DEFAULT_DURATION_SECS: f64 = 60.0;
/// Bytes of each payload unless --payload-bytes says otherwise.
pub const DEFAULT_PAYLOAD_BYTES: usize = 200;

/// `hookline bench --list`.
pub fn list() -> String {
    let mut out = String::from("scenarios (flags override every default):\n");
    for s in SCENARIOS {
        let _ = writeln!(out, "\n  {:<9} {}", s.name, s.summary);
        let _ = writeln!(
            out,
            "            --subscriptions {} --fanout {} --publishers {} --batch {} --fail-rate {} --hang-share {}{}",
            s.subscriptions,
            s.fanout,
            s.publishers,
            s.batch,
            s.fail_rate,
            s.hang_share,
            if s.compare { " --compare" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "\nevery scenario: closed loop (no --rate), --duration {DEFAULT_DURATION_SECS} unless --events, --payload-bytes {DEFAULT_PAYLOAD_BYTES}, --retry-schedule-ms {}",
        DEFAULT_RETRY_SCHEDULE_MS
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    out
}

/// The scenario named `name`.
fn scenario(name: &str) -> Result<&'static Scenario, BenchError> {
    let usage = |m: String| Err(BenchError::Usage(m));
    let Some(s) = SCENARIOS.iter().find(|s| s.name == name) else {
        return usage(format!(
            "--scenario {:?} is unknown; known: {}",
            name,
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    Ok(s)
}

/// `--rate`, `--duration` and `--events` checked; the run's time window (none when
/// `--events` alone bounds it).
fn duration(args: &BenchOptions) -> Result<Option<Duration>, BenchError> {
    let usage = |m: String| Err(BenchError::Usage(m));
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        return usage(format!("--rate is {r}; it must be more than 0"));
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0 && d <= 86_400.0)
    {
        return usage(format!(
            "--duration is {d}; allowed: more than 0 to 86400 s"
        ));
    }
    if args.events == Some(0) {
        return usage("--events must be at least 1".into());
    }
    Ok(match (args.duration, args.events) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs_f64(DEFAULT_DURATION_SECS)),
    })
}

/// `--hang-share` checked, and how many subscriptions hang.
fn hangs(hang_share: f64, subscriptions: usize) -> Result<(f64, usize), BenchError> {
    let usage = |m: String| Err(BenchError::Usage(m));
    if !(0.0..1.0).contains(&hang_share) {
        return usage(format!(
            "--hang-share is {hang_share}; allowed: 0 to below 1"
        ));
    }
    let hang_subs = (subscriptions as f64 * hang_share).round() as usize;
    if hang_share > 0.0 && hang_subs == 0 {
        return usage(format!(
            "--hang-share {hang_share} of {subscriptions} subscriptions rounds to none; use more subscriptions"
        ));
    }
    Ok((hang_share, hang_subs))
}

/// `--retry-schedule-ms`: `default` is Hookline's schedule (none sent); absent is the
/// bench's short one.
fn retry_schedule(arg: Option<&str>) -> Result<Option<Vec<Duration>>, BenchError> {
    let usage = |m: String| Err(BenchError::Usage(m));
    Ok(match arg {
        Some("default") => None,
        Some(list) => {
            let mut out = Vec::new();
            for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match part.parse::<u64>() {
                    Ok(ms) => out.push(Duration::from_millis(ms)),
                    Err(_) => {
                        return usage(format!(
                            "--retry-schedule-ms: {part:?} is not a number of milliseconds"
                        ));
                    }
                }
            }
            Some(out)
        }
        None => Some(
            DEFAULT_RETRY_SCHEDULE_MS
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
        ),
    })
}

/// `--drain-timeout` checked; by default 120 s, and 600 s for `noisy` (a burst of
/// 200,000 deliveries takes minutes to drain on a small machine).
fn drain_timeout(arg: Option<f64>, scenario: &str) -> Result<Duration, BenchError> {
    let secs = arg.unwrap_or(if scenario == "noisy" { 600.0 } else { 120.0 });
    if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
        return Err(BenchError::Usage(format!(
            "--drain-timeout is {secs}; allowed: 0 to 86400 s"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Everything a run needs to know, with defaults applied and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: &'static str,
    pub subscriptions: usize,
    pub fanout: usize,
    pub hang_subs: usize,
    pub compare: bool,
    pub publishers: usize,
    pub connections: usize,
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    pub events: Option<u64>,
    pub batch: usize,
    pub payload_bytes: usize,
    pub receiver_latency: Duration,
    pub fail_rate: f64,
    pub hang_share: f64,
    pub verify: bool,
    /// None: Hookline's default schedule.
    pub retry_schedule: Option<Vec<Duration>>,
    pub drain_timeout: Duration,
    /// Scenario `ordered`: the subscriptions ask for ordered delivery and the run checks
    /// arrival order against publish order.
    pub ordered: bool,
}

impl Plan {
    /// The scenario's defaults with the flags applied, or what is wrong with them.
    pub fn resolve(args: &BenchOptions) -> Result<Plan, BenchError> {
        let usage = |m: String| Err(BenchError::Usage(m));
        let s = scenario(&args.scenario)?;
        let fanout = args.fanout.unwrap_or(s.fanout);
        // External mode sends one event type: every subscription takes every event.
        let subscriptions = args.subscriptions.unwrap_or(if args.external {
            fanout
        } else {
            s.subscriptions
        });
        if !(1..=64).contains(&fanout) {
            return usage(format!("--fanout is {fanout}; allowed: 1 to 64"));
        }
        if !(1..=10_000).contains(&subscriptions) || !subscriptions.is_multiple_of(fanout) {
            return usage(format!(
                "--subscriptions is {subscriptions}; it must be 1 to 10000 and a multiple of --fanout ({fanout})"
            ));
        }
        let publishers = args.publishers.unwrap_or(s.publishers);
        if !(1..=4096).contains(&publishers) {
            return usage(format!("--publishers is {publishers}; allowed: 1 to 4096"));
        }
        let connections = args.connections.unwrap_or(publishers.min(4));
        if !(1..=256).contains(&connections) {
            return usage(format!("--connections is {connections}; allowed: 1 to 256"));
        }
        let batch = args.batch.unwrap_or(s.batch);
        if !(1..=1000).contains(&batch) {
            return usage(format!("--batch is {batch}; allowed: 1 to 1000"));
        }
        let duration = duration(args)?;
        let payload_bytes = args.payload_bytes.unwrap_or(DEFAULT_PAYLOAD_BYTES);
        if !(64..=1024 * 1024).contains(&payload_bytes) {
            return usage(format!(
                "--payload-bytes is {payload_bytes}; allowed: 64 to 1048576"
            ));
        }
        let fail_rate = args.fail_rate.unwrap_or(s.fail_rate);
        if !(0.0..1.0).contains(&fail_rate) {
            return usage(format!("--fail-rate is {fail_rate}; allowed: 0 to below 1"));
        }
        let (hang_share, hang_subs) =
            hangs(args.hang_share.unwrap_or(s.hang_share), subscriptions)?;
        let compare = if args.no_compare {
            false
        } else {
            args.compare || s.compare
        };
        let retry_schedule = retry_schedule(args.retry_schedule_ms.as_deref())?;
        let ordered = s.name == "ordered";
        if ordered && publishers != 1 {
            return usage(format!(
                "--publishers is {publishers}; scenario ordered needs 1 (publish order is one publisher's order)"
            ));
        }
        let drain_timeout = drain_timeout(args.drain_timeout, s.name)?;
        Ok(Plan {
            scenario: s.name,
            subscriptions,
            fanout,
            hang_subs,
            compare,
            publishers,
            connections,
            rate: args.rate,
            duration,
            events: args.events,
            batch,
            payload_bytes,
            receiver_latency: Duration::from_millis(args.receiver_latency_ms.unwrap_or(0)),
            fail_rate,
            hang_share,
            verify: args.verify,
            retry_schedule,
            drain_timeout,
            ordered,
        })
    }

    /// A guess at how many events a run publishes, to size tables up front.
    pub fn expected_events(&self) -> usize {
        let guess = match (self.events, self.rate, self.duration) {
            (Some(n), _, _) => n as f64,
            (None, Some(r), Some(d)) => r * d.as_secs_f64(),
            // Closed loop: a few thousand events per second is what one small machine takes.
            (None, None, Some(d)) => 5_000.0 * d.as_secs_f64(),
            _ => 100_000.0,
        };
        (guess.min(20_000_000.0)) as usize
    }
}

/// Which subscriptions exist in one run and which events reach them.
#[derive(Debug, Clone)]
pub struct Layout {
    pub subs: usize,
    pub fanout: usize,
    pub groups: usize,
    pub hang_subs: usize,
    /// False for the comparison run: hanging subscriptions are not created at all.
    pub with_hanging: bool,
    event_types: Vec<String>,
    /// Per group: subscriptions created, and how many of them answer.
    group_created: Vec<u32>,
    group_healthy: Vec<u32>,
}

impl Layout {
    pub fn new(plan: &Plan, with_hanging: bool) -> Layout {
        let groups = plan.subscriptions / plan.fanout;
        let mut group_created = vec![0u32; groups];
        let mut group_healthy = vec![0u32; groups];
        for s in 0..plan.subscriptions {
            let g = s / plan.fanout;
            let hanging = s < plan.hang_subs;
            if !hanging {
                group_healthy[g] += 1;
            }
            if !hanging || with_hanging {
                group_created[g] += 1;
            }
        }
        Layout {
            subs: plan.subscriptions,
            fanout: plan.fanout,
            groups,
            hang_subs: plan.hang_subs,
            with_hanging,
            event_types: (0..groups).map(|g| format!("bench.g{g}")).collect(),
            group_created,
            group_healthy,
        }
    }

    /// How the run is described in reports.
    pub fn label(&self) -> &'static str {
        match (self.hang_subs > 0, self.with_hanging) {
            (false, _) => "all subscriptions healthy",
            (true, true) => "with hanging subscriptions",
            (true, false) => "without the hanging subscriptions (comparison)",
        }
    }

    /// The run's variant for machines: `healthy`, `with_hanging` or `without_hanging`.
    pub fn variant(&self) -> &'static str {
        match (self.hang_subs > 0, self.with_hanging) {
            (false, _) => "healthy",
            (true, true) => "with_hanging",
            (true, false) => "without_hanging",
        }
    }

    pub fn group_of_seq(&self, seq: u64) -> usize {
        (seq % self.groups as u64) as usize
    }

    pub fn group_of_sub(&self, sub: usize) -> usize {
        sub / self.fanout
    }

    /// The bit of subscription `sub` among the subscriptions of its group.
    pub fn bit_of_sub(&self, sub: usize) -> u32 {
        (sub % self.fanout) as u32
    }

    pub fn is_hanging(&self, sub: usize) -> bool {
        sub < self.hang_subs
    }

    /// Whether subscription `sub` is created in this run.
    pub fn created(&self, sub: usize) -> bool {
        self.with_hanging || !self.is_hanging(sub)
    }

    pub fn event_type(&self, group: usize) -> &str {
        &self.event_types[group]
    }

    /// Deliveries a publish of group `g` should create, and how many of them arrive.
    pub fn group_counts(&self, group: usize) -> (u32, u32) {
        (self.group_created[group], self.group_healthy[group])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: crate::BenchArgs,
    }

    fn plan(args: &[&str]) -> Result<Plan, BenchError> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map_err(|e| BenchError::Usage(e.to_string()))?;
        Plan::resolve(&cli.bench.options)
    }

    #[test]
    fn scenarios_resolve_and_flags_override() {
        for s in SCENARIOS {
            let p = plan(&["--scenario", s.name]).expect(s.name);
            assert_eq!(p.subscriptions, s.subscriptions);
        }
        let p = plan(&[
            "--scenario",
            "fanout10",
            "--publishers",
            "3",
            "--events",
            "5",
        ])
        .unwrap();
        assert_eq!(
            (p.fanout, p.publishers, p.events, p.duration),
            (10, 3, Some(5), None)
        );
        assert!(plan(&["--scenario", "nope"]).is_err());
        let noisy = plan(&["--scenario", "noisy"]).unwrap();
        assert_eq!(noisy.drain_timeout, Duration::from_secs(600));
        assert_eq!(plan(&[]).unwrap().drain_timeout, Duration::from_secs(120));
        assert!(plan(&["--scenario", "ordered"]).unwrap().ordered);
        assert!(plan(&["--scenario", "ordered", "--publishers", "2"]).is_err());
        let ext = plan(&["--external", "--fanout", "3"]).unwrap();
        assert_eq!((ext.subscriptions, ext.fanout), (3, 3));
        assert!(plan(&["--subscriptions", "7", "--fanout", "2"]).is_err());
    }

    #[test]
    fn hanging_layout_sends_a_fifth_of_events_to_the_hanging_subscription() {
        let p = plan(&["--scenario", "hanging"]).unwrap();
        assert_eq!(p.hang_subs, 1);
        let with = Layout::new(&p, true);
        let without = Layout::new(&p, false);
        let hanging_events = (0..100u64)
            .filter(|k| with.group_counts(with.group_of_seq(*k)).1 == 0)
            .count();
        assert_eq!(hanging_events, 20);
        assert_eq!(without.group_counts(0), (0, 0));
        assert_eq!(with.group_counts(0), (1, 0));
        assert_eq!(with.group_counts(1), (1, 1));
    }
}
