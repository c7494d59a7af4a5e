//! The circuit breaker of one subscription, as a plain state machine.
//!
//! An endpoint that is down (refusing connections, timing out, answering 5xx) gains
//! nothing from being asked again at full speed, and every request to it holds a slot
//! for as long as it takes to fail. After enough failures the circuit *opens*:
//! deliveries are deferred without a request until the cool-down is over. Then it is
//! *half-open*: one probe request goes through; success closes the circuit, failure
//! opens it again for twice the cool-down (up to the maximum).
//!
//! This module knows no clocks, locks or subscriptions: the caller passes `now` and
//! holds it under its own lock, which keeps every transition testable with plain
//! instants. State lives in the dispatcher process (as in Svix and Convoy): each replica
//! learns an endpoint's health from its own requests.

use std::time::{Duration, Instant};

use crate::config::CircuitConfig;

/// What one request said about its endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// The endpoint answered (2xx, 3xx, 4xx).
    Up,
    /// No answer (connect, timeout, DNS, TLS) or a 5xx answer.
    Down,
    /// Nothing learnt: no request was sent.
    Unknown,
}

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// The circuit is closed.
    Pass,
    /// The circuit is half-open and this request may be the probe.
    Probe,
    /// The circuit is open (or its probe is out): no request before this instant.
    Wait(Instant),
}

/// A change of state worth logging (and counting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Closed → open, after `failures` consecutive failures or too high a failure ratio.
    Opened {
        cool_down: Duration,
        consecutive: u32,
        failed: u32,
        total: u32,
    },
    /// The probe failed: open again.
    Reopened { cool_down: Duration },
    /// The probe succeeded.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// `probe_until`: a probe is out and its answer is due by then.
    HalfOpen {
        probe_until: Option<Instant>,
    },
}

/// One subscription's breaker.
#[derive(Debug)]
pub(crate) struct Circuit {
    state: State,
    consecutive: u32,
    window_start: Instant,
    window_total: u32,
    window_failed: u32,
    /// The cool-down the next opening uses.
    next_cool_down: Duration,
}

impl Circuit {
    pub(crate) fn new(now: Instant, cfg: &CircuitConfig) -> Self {
        Self {
            state: State::Closed,
            consecutive: 0,
            window_start: now,
            window_total: 0,
            window_failed: 0,
            next_cool_down: cfg.cool_down,
        }
    }

    /// Closed, with no failure remembered: nothing is lost by forgetting it.
    pub(crate) fn is_idle(&self) -> bool {
        self.state == State::Closed && self.consecutive == 0
    }

    /// Open or half-open.
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.state != State::Closed
    }

    /// Whether a request may go at `now`. A stale probe (its answer overdue, say because
    /// its task was cancelled) no longer blocks the next one.
    pub(crate) fn gate(&mut self, now: Instant) -> Gate {
        match self.state {
            State::Closed => Gate::Pass,
            State::Open { until } if now < until => Gate::Wait(until),
            State::Open { .. } => {
                self.state = State::HalfOpen { probe_until: None };
                Gate::Probe
            }
            State::HalfOpen { probe_until: None } => Gate::Probe,
            State::HalfOpen {
                probe_until: Some(due),
            } if now < due => Gate::Wait(due),
            State::HalfOpen { .. } => Gate::Probe,
        }
    }

    /// The request that [`gate`](Self::gate) let through as the probe is on its way; its
    /// answer is due by `now + timeout`.
    pub(crate) fn start_probe(&mut self, now: Instant, timeout: Duration) {
        if let State::HalfOpen { .. } = self.state {
            self.state = State::HalfOpen {
                probe_until: Some(now + timeout),
            };
        }
    }

    /// The probe went out without an answer that counts: let the next request probe.
    pub(crate) fn cancel_probe(&mut self) {
        if let State::HalfOpen { .. } = self.state {
            self.state = State::HalfOpen { probe_until: None };
        }
    }

    /// Counts the health a request saw. While the circuit is not closed only the probe
    /// counts: answers of requests sent before it opened say nothing new.
    pub(crate) fn record(
        &mut self,
        now: Instant,
        health: Health,
        probe: bool,
        cfg: &CircuitConfig,
    ) -> Option<Transition> {
        if !cfg.enabled() {
            return None;
        }
        match self.state {
            State::Closed => self.record_closed(now, health, cfg),
            State::HalfOpen { .. } if probe => match health {
                Health::Up => {
                    self.close(now, cfg);
                    Some(Transition::Closed)
                }
                Health::Down => {
                    let cool_down = self.open(now, cfg);
                    Some(Transition::Reopened { cool_down })
                }
                Health::Unknown => {
                    self.cancel_probe();
                    None
                }
            },
            State::HalfOpen { .. } | State::Open { .. } => None,
        }
    }

    fn record_closed(
        &mut self,
        now: Instant,
        health: Health,
        cfg: &CircuitConfig,
    ) -> Option<Transition> {
        if now.saturating_duration_since(self.window_start) >= cfg.window {
            self.window_start = now;
            self.window_total = 0;
            self.window_failed = 0;
        }
        match health {
            Health::Unknown => return None,
            Health::Up => {
                self.consecutive = 0;
                self.window_total = self.window_total.saturating_add(1);
                return None;
            }
            Health::Down => {
                self.consecutive = self.consecutive.saturating_add(1);
                self.window_total = self.window_total.saturating_add(1);
                self.window_failed = self.window_failed.saturating_add(1);
            }
        }
        let by_count = cfg.failure_threshold > 0 && self.consecutive >= cfg.failure_threshold;
        let by_ratio = cfg.failure_ratio_percent > 0
            && self.window_total >= cfg.min_requests.max(1)
            && u64::from(self.window_failed) * 100
                >= u64::from(cfg.failure_ratio_percent) * u64::from(self.window_total);
        if !(by_count || by_ratio) {
            return None;
        }
        let (consecutive, failed, total) =
            (self.consecutive, self.window_failed, self.window_total);
        let cool_down = self.open(now, cfg);
        Some(Transition::Opened {
            cool_down,
            consecutive,
            failed,
            total,
        })
    }

    /// Opens for the next cool-down and doubles the one after; returns the one used.
    fn open(&mut self, now: Instant, cfg: &CircuitConfig) -> Duration {
        let cool_down = self.next_cool_down.min(cfg.max_cool_down);
        self.state = State::Open {
            until: now + cool_down,
        };
        self.next_cool_down = cool_down.saturating_mul(2).min(cfg.max_cool_down);
        cool_down
    }

    fn close(&mut self, now: Instant, cfg: &CircuitConfig) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.window_start = now;
        self.window_total = 0;
        self.window_failed = 0;
        self.next_cool_down = cfg.cool_down;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitConfig {
        CircuitConfig {
            failure_threshold: 3,
            failure_ratio_percent: 50,
            min_requests: 10,
            window: Duration::from_secs(30),
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(25),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn consecutive_failures_open_and_a_success_resets_the_count() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut c = Circuit::new(t0, &cfg);
        assert_eq!(c.record(t0, Health::Down, false, &cfg), None);
        assert_eq!(c.record(t0, Health::Down, false, &cfg), None);
        assert_eq!(c.record(t0, Health::Up, false, &cfg), None);
        assert_eq!(c.record(t0, Health::Down, false, &cfg), None);
        assert_eq!(c.record(t0, Health::Unknown, false, &cfg), None);
        assert_eq!(c.record(t0, Health::Down, false, &cfg), None);
        assert_eq!(c.gate(t0), Gate::Pass);
        assert!(matches!(
            c.record(t0, Health::Down, false, &cfg),
            Some(Transition::Opened { consecutive: 3, .. })
        ));
        assert!(c.is_open());
        assert_eq!(c.gate(t0 + S), Gate::Wait(t0 + 10 * S));
    }

    #[test]
    fn a_high_failure_ratio_opens_without_a_long_run_of_failures() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut c = Circuit::new(t0, &cfg);
        // Alternating: never 3 in a row, but half of 10 failed.
        for i in 0..9 {
            let health = if i % 2 == 0 { Health::Down } else { Health::Up };
            assert_eq!(c.record(t0, health, false, &cfg), None, "request {i}");
        }
        // 5 of 10 failed: the ratio is checked on a failure only.
        assert_eq!(c.record(t0, Health::Up, false, &cfg), None);
        assert!(matches!(
            c.record(t0, Health::Down, false, &cfg),
            Some(Transition::Opened {
                failed: 6,
                total: 11,
                ..
            })
        ));
    }

    #[test]
    fn the_ratio_window_starts_over() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut c = Circuit::new(t0, &cfg);
        for _ in 0..8 {
            c.record(t0, Health::Up, false, &cfg);
        }
        let later = t0 + 31 * S;
        // 2 of 10 in the old window would not open; in the new one 1 of 1 is below
        // min_requests.
        assert_eq!(c.record(later, Health::Down, false, &cfg), None);
        assert_eq!(c.record(later, Health::Up, false, &cfg), None);
        assert_eq!(c.gate(later), Gate::Pass);
    }

    #[test]
    fn one_probe_after_the_cool_down_and_the_cool_down_doubles_up_to_the_maximum() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut c = Circuit::new(t0, &cfg);
        for _ in 0..3 {
            c.record(t0, Health::Down, false, &cfg);
        }
        // Answers of requests sent before it opened change nothing.
        assert_eq!(c.record(t0, Health::Up, false, &cfg), None);
        assert_eq!(c.gate(t0 + 9 * S), Gate::Wait(t0 + 10 * S));

        let t1 = t0 + 10 * S;
        assert_eq!(c.gate(t1), Gate::Probe);
        c.start_probe(t1, 5 * S);
        assert_eq!(c.gate(t1), Gate::Wait(t1 + 5 * S), "one probe at a time");
        assert_eq!(
            c.record(t1 + S, Health::Down, true, &cfg),
            Some(Transition::Reopened { cool_down: 20 * S })
        );
        let t2 = t1 + S + 20 * S;
        assert_eq!(c.gate(t2 - S), Gate::Wait(t2));
        assert_eq!(c.gate(t2), Gate::Probe);
        c.start_probe(t2, 5 * S);
        assert_eq!(
            c.record(t2, Health::Down, true, &cfg),
            Some(Transition::Reopened { cool_down: 25 * S }),
            "capped at the maximum"
        );
        let t3 = t2 + 25 * S;
        assert_eq!(c.gate(t3), Gate::Probe);
        c.start_probe(t3, 5 * S);
        assert_eq!(
            c.record(t3, Health::Up, true, &cfg),
            Some(Transition::Closed)
        );
        assert!(!c.is_open() && c.is_idle());
        assert_eq!(c.gate(t3), Gate::Pass);

        // Closed again: the cool-down starts from the beginning.
        for _ in 0..3 {
            c.record(t3, Health::Down, false, &cfg);
        }
        assert_eq!(c.gate(t3), Gate::Wait(t3 + 10 * S));
    }

    #[test]
    fn a_lost_or_cancelled_probe_does_not_wedge_the_circuit() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut c = Circuit::new(t0, &cfg);
        for _ in 0..3 {
            c.record(t0, Health::Down, false, &cfg);
        }
        let t1 = t0 + 10 * S;
        assert_eq!(c.gate(t1), Gate::Probe);
        c.start_probe(t1, 5 * S);
        c.cancel_probe();
        assert_eq!(c.gate(t1), Gate::Probe);
        c.start_probe(t1, 5 * S);
        assert_eq!(c.record(t1, Health::Unknown, true, &cfg), None);
        assert_eq!(c.gate(t1), Gate::Probe);
        c.start_probe(t1, 5 * S);
        // Never answered: once it is overdue another request may probe.
        assert_eq!(c.gate(t1 + 5 * S), Gate::Probe);
    }

    #[test]
    fn a_disabled_breaker_never_opens() {
        let cfg = CircuitConfig {
            failure_threshold: 0,
            failure_ratio_percent: 0,
            ..cfg()
        };
        assert!(!cfg.enabled());
        let t0 = Instant::now();
        let mut c = Circuit::new(t0, &cfg);
        for _ in 0..1000 {
            assert_eq!(c.record(t0, Health::Down, false, &cfg), None);
        }
        assert_eq!(c.gate(t0), Gate::Pass);
    }
}
