//! Per-subscription admission: in-flight limit, rate limit and circuit breaker.
//!
//! One global semaphore alone lets a single slow endpoint take every permit and every
//! prefetched message, and then healthy endpoints starve. So before a request takes a
//! process-wide permit it must be admitted for its subscription:
//!
//! 1. **circuit** — while the subscription's circuit is open, no request; after the
//!    cool-down one probe ([`crate::circuit`]);
//! 2. **in flight** — at most `max_in_flight` requests open to the subscription (its own
//!    value, else the dispatcher's default); a message finding no slot may wait a few
//!    milliseconds for one (a fast endpoint frees slots that quickly), then is deferred;
//! 3. **rate** — at most `rate_limit_per_second` requests per second (GCRA via
//!    `governor`, burst of one second's worth).
//!
//! A message that is not admitted is never held: it is *deferred*, i.e. recorded as
//! "retry at T" without an attempt and acked, and the retry scheduler queues it again at
//! T. Deferrals for the rate limit get successive slots one emission interval apart, so
//! a backlog comes back spread at the rate it can go instead of all at once; deferrals
//! for an open circuit come back spread after the probe time.
//!
//! State is per dispatcher process, kept in a map by subscription id; entries idle for a
//! while (nothing in flight, circuit closed) are swept so the map stays bounded.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use hookline_core::Id;
use hookline_core::model::{Subscription, deferral};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::circuit::{Circuit, Gate, Health, Transition};
use crate::circuit_record::CircuitRecorder;
use crate::config::{CircuitConfig, DispatcherConfig};
use crate::metrics;

/// How often idle entries are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// An entry unused this long, with nothing in flight and its circuit closed, is dropped.
const IDLE_AFTER: Duration = Duration::from_secs(300);
/// The furthest ahead a delivery deferred for the in-flight limit is put.
const MAX_IN_FLIGHT_SPREAD: Duration = Duration::from_secs(60);
/// How long past the request timeout a probe's answer may take before another request
/// may probe instead.
const PROBE_MARGIN: Duration = Duration::from_secs(1);

/// Why a delivery was deferred (the `reason` label of the deferral counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeferReason {
    InFlight,
    RateLimit,
    CircuitOpen,
}

impl DeferReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeferReason::InFlight => deferral::IN_FLIGHT,
            DeferReason::RateLimit => deferral::RATE_LIMIT,
            DeferReason::CircuitOpen => deferral::CIRCUIT_OPEN,
        }
    }
}

/// What admission decided for one message.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Send the request; report how it went through the ticket.
    Go(Ticket),
    /// Do not send now: record a retry at `at` without an attempt.
    Defer {
        reason: DeferReason,
        at: DateTime<Utc>,
    },
    /// The dispatcher is stopping while the message waited for a slot.
    Stopped,
}

/// The per-subscription gates of one dispatcher.
pub(crate) struct Limits {
    shared: Arc<Shared>,
}

struct Shared {
    default_max_in_flight: u32,
    in_flight_wait: Duration,
    defer_delay: Duration,
    probe_timeout: Duration,
    circuit: CircuitConfig,
    gates: Mutex<Gates>,
    open_circuits: AtomicI64,
    /// Where circuit transitions are written for users to see, if anywhere.
    recorder: Option<CircuitRecorder>,
}

struct Gates {
    map: HashMap<Id, Arc<SubGate>>,
    last_sweep: Instant,
}

/// One subscription's gate.
struct SubGate {
    id: Id,
    state: Mutex<SubState>,
    /// Signalled whenever one of its in-flight slots frees.
    freed: Notify,
}

struct SubState {
    in_flight: u32,
    limiter: Option<Limiter>,
    circuit: Circuit,
    last_used: Instant,
    /// Smoothed time a request holds its slot; with the limit, how fast slots free.
    slot_time: Option<Duration>,
    /// When a slot last freed, or the first one was taken after none were: how long
    /// the subscription has made no progress.
    last_progress: Instant,
    /// The slot after the latest one handed to a delivery deferred for the in-flight
    /// limit.
    in_flight_horizon: Option<Instant>,
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<Instant>>;

struct Limiter {
    rate: NonZeroU32,
    gcra: Gcra,
    /// The slot after the latest one handed to a deferred delivery.
    horizon: Option<Instant>,
}

impl Limiter {
    fn new(rate: NonZeroU32) -> Self {
        Self {
            rate,
            gcra: RateLimiter::direct_with_clock(Quota::per_second(rate), MonotonicClock),
            horizon: None,
        }
    }

    /// Time between two requests at the rate.
    fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.rate.get()
    }
}

/// Why [`Shared::try_admit`] said no.
enum Blocked {
    /// Every in-flight slot is taken; whether one is likely to free within
    /// `in_flight_wait`, going by how long the subscription's requests take.
    Full { worth_waiting: bool },
    /// Not before this instant.
    Until(DeferReason, Instant),
}

/// An admitted request: holds one in-flight slot of its subscription until dropped, and
/// carries the request's health to the circuit breaker.
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    gate: Arc<SubGate>,
    probe: bool,
    health: Health,
    admitted_at: Instant,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("subscription_id", &self.gate.id)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// Reports what the request saw and frees the slot.
    pub(crate) fn finish(mut self, health: Health) {
        self.health = health;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = Instant::now();
        let transition = {
            let mut st = lock(&self.gate.state);
            st.in_flight = st.in_flight.saturating_sub(1);
            st.last_used = now;
            st.last_progress = now;
            if self.health != Health::Unknown {
                let held = now.saturating_duration_since(self.admitted_at);
                st.slot_time = Some(match st.slot_time {
                    Some(avg) => (avg * 4 + held) / 5,
                    None => held,
                });
            }
            st.circuit
                .record(now, self.health, self.probe, &self.shared.circuit)
        };
        self.gate.freed.notify_one();
        if let Some(t) = transition {
            self.shared.transitioned(&self.gate.id, t);
        }
    }
}

impl Limits {
    #[cfg(test)]
    pub(crate) fn new(cfg: &DispatcherConfig) -> Self {
        Self::recording(cfg, None)
    }

    /// Limits whose circuit transitions are also handed to `recorder`.
    pub(crate) fn recording(cfg: &DispatcherConfig, recorder: Option<CircuitRecorder>) -> Self {
        metrics::circuits_open(0);
        Self {
            shared: Arc::new(Shared {
                default_max_in_flight: cfg.default_max_in_flight.max(1),
                in_flight_wait: cfg.in_flight_wait,
                defer_delay: cfg.defer_delay,
                probe_timeout: cfg.request_timeout.saturating_add(PROBE_MARGIN),
                circuit: cfg.circuit.clone(),
                gates: Mutex::new(Gates {
                    map: HashMap::new(),
                    last_sweep: Instant::now(),
                }),
                open_circuits: AtomicI64::new(0),
                recorder,
            }),
        }
    }

    /// Admits a request to `sub`, waiting at most `in_flight_wait` for an in-flight slot;
    /// otherwise says until when to defer it.
    pub(crate) async fn admit(&self, sub: &Subscription, shutdown: &CancellationToken) -> Decision {
        let shared = &self.shared;
        let gate = shared.gate(&sub.id);
        let limit = sub
            .max_in_flight
            .filter(|n| *n > 0)
            .unwrap_or(shared.default_max_in_flight);
        let rate = sub.rate_limit_per_second.and_then(NonZeroU32::new);
        let deadline = tokio::time::Instant::now() + shared.in_flight_wait;
        let mut woken = false;
        loop {
            // Registered before the check, so a slot freed in between is not missed.
            let freed = gate.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (reason, at) = match shared.try_admit(&gate, limit, rate) {
                Ok(probe) => {
                    return Decision::Go(Ticket {
                        shared: shared.clone(),
                        gate: gate.clone(),
                        probe,
                        health: Health::Unknown,
                        admitted_at: Instant::now(),
                    });
                }
                Err(Blocked::Until(reason, at)) => (reason, at),
                Err(Blocked::Full { worth_waiting })
                    if worth_waiting && tokio::time::Instant::now() < deadline =>
                {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return Decision::Stopped,
                        () = &mut freed => woken = true,
                        () = tokio::time::sleep_until(deadline) => woken = false,
                    }
                    continue;
                }
                Err(Blocked::Full { .. }) => {
                    (DeferReason::InFlight, shared.in_flight_slot(&gate, limit))
                }
            };
            if woken {
                // The wake-up was meant for a request that can use the freed slot.
                gate.freed.notify_one();
            }
            return Decision::Defer {
                reason,
                at: wall_clock(at),
            };
        }
    }
}

impl Shared {
    /// The gate of a subscription, made on first use. Sweeps idle gates now and then.
    fn gate(&self, id: &Id) -> Arc<SubGate> {
        let mut gates = lock(&self.gates);
        let now = Instant::now();
        if now.saturating_duration_since(gates.last_sweep) >= SWEEP_EVERY {
            gates.last_sweep = now;
            // Only the map holds a gate nobody is using; taking a gate needs this lock,
            // so none can be taken while this runs.
            gates.map.retain(|_, g| {
                if Arc::strong_count(g) > 1 {
                    return true;
                }
                let st = lock(&g.state);
                let idle = st.in_flight == 0
                    && st.circuit.is_idle()
                    && now.saturating_duration_since(st.last_used) >= IDLE_AFTER
                    && st.in_flight_horizon.is_none_or(|h| h <= now)
                    && st
                        .limiter
                        .as_ref()
                        .and_then(|l| l.horizon)
                        .is_none_or(|h| h <= now);
                !idle
            });
        }
        gates
            .map
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(SubGate {
                    id: id.clone(),
                    state: Mutex::new(SubState {
                        in_flight: 0,
                        limiter: None,
                        circuit: Circuit::new(now, &self.circuit),
                        last_used: now,
                        slot_time: None,
                        last_progress: now,
                        in_flight_horizon: None,
                    }),
                    freed: Notify::new(),
                })
            })
            .clone()
    }

    /// Circuit, then in-flight slot, then rate: a request that would be refused by an
    /// earlier gate takes nothing from a later one. Returns whether the request is the
    /// circuit's probe.
    fn try_admit(
        &self,
        gate: &SubGate,
        limit: u32,
        rate: Option<NonZeroU32>,
    ) -> Result<bool, Blocked> {
        let now = Instant::now();
        let mut guard = lock(&gate.state);
        let st = &mut *guard;
        st.last_used = now;
        let probe = match st.circuit.gate(now) {
            Gate::Pass => false,
            Gate::Probe => true,
            Gate::Wait(until) => {
                // Spread what comes back after the probe time, so the probe meets no crowd.
                let spread = self
                    .defer_delay
                    .max(until.saturating_duration_since(now) / 10);
                return Err(Blocked::Until(
                    DeferReason::CircuitOpen,
                    until + random_up_to(spread),
                ));
            }
        };
        if st.in_flight >= limit {
            // With `limit` requests of about `slot_time` each, one frees every
            // slot_time / limit; a hanging endpoint frees none in any useful time, and
            // one that has freed none for longer than the wait is not about to.
            let pace = st.slot_time.map_or(Duration::ZERO, |t| t / limit.max(1));
            let stalled = now.saturating_duration_since(st.last_progress);
            let worth_waiting = pace.max(stalled) <= self.in_flight_wait;
            return Err(Blocked::Full { worth_waiting });
        }
        match rate {
            Some(rate) => {
                let limiter = match &mut st.limiter {
                    Some(l) if l.rate == rate => l,
                    slot => slot.insert(Limiter::new(rate)),
                };
                if let Err(not_until) = limiter.gcra.check() {
                    let earliest = not_until.earliest_possible().max(now);
                    let at = limiter.horizon.map_or(earliest, |h| h.max(earliest));
                    limiter.horizon = Some(at + limiter.interval());
                    return Err(Blocked::Until(DeferReason::RateLimit, at));
                }
            }
            None => st.limiter = None,
        }
        if st.in_flight == 0 {
            st.last_progress = now;
        }
        st.in_flight += 1;
        if probe {
            st.circuit.start_probe(now, self.probe_timeout);
            tracing::info!(subscription_id = %gate.id, "circuit half-open: sending one probe request");
        }
        Ok(probe)
    }

    /// When a delivery turned away for the in-flight limit comes back: `defer_delay`,
    /// or as long as the subscription has freed no slot if that is longer (an endpoint
    /// stuck for 10 s is not asked again in 1 s), jittered; and no sooner than the slot
    /// after the last one handed out, slots being as far apart as the subscription frees
    /// in-flight slots (smoothed slot time ÷ limit). A burst to a fast endpoint thus
    /// comes back at the pace the endpoint takes it instead of all at once (to be turned
    /// away again), and a stuck endpoint's backlog does not churn through the retry
    /// schedule every second. Never more than [`MAX_IN_FLIGHT_SPREAD`] ahead.
    fn in_flight_slot(&self, gate: &SubGate, limit: u32) -> Instant {
        let now = Instant::now();
        let mut st = lock(&gate.state);
        let stalled = if st.in_flight > 0 {
            now.saturating_duration_since(st.last_progress)
        } else {
            Duration::ZERO
        };
        let delay = jittered(self.defer_delay.max(stalled)).min(MAX_IN_FLIGHT_SPREAD);
        let earliest = now + delay;
        let Some(slot_time) = st.slot_time else {
            return earliest;
        };
        let at = st
            .in_flight_horizon
            .map_or(earliest, |h| h.max(earliest))
            .min(now + MAX_IN_FLIGHT_SPREAD);
        st.in_flight_horizon = Some(at + slot_time / limit.max(1));
        at
    }

    /// Logs a change of circuit state and keeps the open-circuit gauge.
    fn transitioned(&self, id: &Id, transition: Transition) {
        if let Some(recorder) = &self.recorder {
            match transition {
                Transition::Opened { cool_down, .. } | Transition::Reopened { cool_down } => {
                    recorder.opened(id, cool_down)
                }
                Transition::Closed => recorder.closed(id),
            }
        }
        match transition {
            Transition::Opened {
                cool_down,
                consecutive,
                failed,
                total,
            } => {
                let open = self.open_circuits.fetch_add(1, Ordering::Relaxed) + 1;
                metrics::circuits_open(open);
                tracing::warn!(
                    subscription_id = %id,
                    consecutive_failures = consecutive,
                    window_failed = failed,
                    window_requests = total,
                    ?cool_down,
                    "circuit opened: deferring deliveries without requests"
                );
            }
            Transition::Reopened { cool_down } => tracing::warn!(
                subscription_id = %id,
                ?cool_down,
                "circuit probe failed: circuit open again"
            ),
            Transition::Closed => {
                let open = self.open_circuits.fetch_sub(1, Ordering::Relaxed) - 1;
                metrics::circuits_open(open);
                tracing::info!(subscription_id = %id, "circuit probe succeeded: circuit closed");
            }
        }
    }
}

/// A poisoned lock only means a thread panicked mid-update; the counters are still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `base` ± 20%.
fn jittered(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..1.2);
    Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
}

/// A random duration in `[0, max)`.
fn random_up_to(max: Duration) -> Duration {
    let factor: f64 = rand::rng().random_range(0.0..1.0);
    Duration::try_from_secs_f64(max.as_secs_f64() * factor).unwrap_or_default()
}

/// The wall-clock time of a monotonic instant (now or later).
fn wall_clock(at: Instant) -> DateTime<Utc> {
    let now = Utc::now();
    let ahead =
        TimeDelta::from_std(at.saturating_duration_since(Instant::now())).unwrap_or(TimeDelta::MAX);
    now.checked_add_signed(ahead)
        .unwrap_or_else(|| now + TimeDelta::days(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_core::IdKind;
    use hookline_core::model::SubscriptionState;
    use std::collections::BTreeMap;

    fn sub(max_in_flight: Option<u32>, rate: Option<u32>) -> Subscription {
        Subscription {
            id: Id::new(IdKind::Subscription),
            tenant_id: Id::new(IdKind::Tenant),
            url: "http://127.0.0.1:1/".into(),
            description: String::new(),
            event_types: vec![],
            channels: vec![],
            headers: BTreeMap::new(),
            rate_limit_per_second: rate,
            max_in_flight,
            retry_schedule: None,
            state: SubscriptionState::Enabled,
            disabled_reason: None,
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            payload_format: Default::default(),
            ordering: Default::default(),
        }
    }

    fn limits(in_flight_wait: Duration) -> Limits {
        Limits::new(&DispatcherConfig {
            default_max_in_flight: 3,
            in_flight_wait,
            circuit: CircuitConfig {
                failure_threshold: 2,
                cool_down: Duration::from_secs(30),
                ..CircuitConfig::default()
            },
            ..DispatcherConfig::default()
        })
    }

    fn go(d: Decision) -> Ticket {
        match d {
            Decision::Go(t) => t,
            other => panic!("expected Go, got {other:?}"),
        }
    }

    fn deferred(d: Decision) -> (DeferReason, DateTime<Utc>) {
        match d {
            Decision::Defer { reason, at } => (reason, at),
            other => panic!("expected Defer, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_in_flight_limit_is_the_subscriptions_own_else_the_default() {
        let limits = limits(Duration::ZERO);
        let stop = CancellationToken::new();
        let own = sub(Some(1), None);
        let t = go(limits.admit(&own, &stop).await);
        let before = Utc::now();
        let (reason, at) = deferred(limits.admit(&own, &stop).await);
        assert_eq!(reason, DeferReason::InFlight);
        // 1 s ± 20%.
        assert!(
            at >= before + TimeDelta::milliseconds(790),
            "{at} vs {before}"
        );
        assert!(at <= Utc::now() + TimeDelta::milliseconds(1210));
        drop(t);
        let _t = go(limits.admit(&own, &stop).await);

        let default = sub(None, None);
        let held: Vec<Ticket> = futures::future::join_all(
            (0..3).map(|_| async { go(limits.admit(&default, &stop).await) }),
        )
        .await;
        assert_eq!(
            deferred(limits.admit(&default, &stop).await).0,
            DeferReason::InFlight
        );
        drop(held);
        let _t = go(limits.admit(&default, &stop).await);
    }

    #[tokio::test]
    async fn a_short_wait_takes_a_slot_freed_meanwhile() {
        let limits = limits(Duration::from_secs(5));
        let stop = CancellationToken::new();
        let s = sub(Some(1), None);
        let held = go(limits.admit(&s, &stop).await);
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            held.finish(Health::Up);
        });
        let _t = go(limits.admit(&s, &stop).await);
        releaser.await.unwrap();

        // Stopping ends the wait.
        let waiting = limits.admit(&s, &stop);
        stop.cancel();
        assert!(matches!(waiting.await, Decision::Stopped));
    }

    #[tokio::test]
    async fn no_wait_when_the_subscriptions_requests_are_too_slow_to_free_a_slot_in_time() {
        let limits = limits(Duration::from_millis(200));
        let stop = CancellationToken::new();
        let s = sub(Some(1), None);
        let slow = go(limits.admit(&s, &stop).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        slow.finish(Health::Up);
        let _held = go(limits.admit(&s, &stop).await);
        let started = Instant::now();
        assert_eq!(
            deferred(limits.admit(&s, &stop).await).0,
            DeferReason::InFlight
        );
        assert!(started.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn a_stuck_subscription_is_put_off_for_as_long_as_it_has_been_stuck() {
        let limits = Limits::new(&DispatcherConfig {
            default_max_in_flight: 1,
            in_flight_wait: Duration::ZERO,
            defer_delay: Duration::from_millis(100),
            ..DispatcherConfig::default()
        });
        let stop = CancellationToken::new();
        let s = sub(None, None);
        let _stuck = go(limits.admit(&s, &stop).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = Utc::now();
        let (reason, at) = deferred(limits.admit(&s, &stop).await);
        assert_eq!(reason, DeferReason::InFlight);
        // At least 400 ms - 20%, not 100 ms.
        assert!(
            at >= before + TimeDelta::milliseconds(310),
            "{at} vs {before}"
        );
    }

    #[tokio::test]
    async fn over_the_rate_deliveries_get_successive_slots() {
        let limits = limits(Duration::ZERO);
        let stop = CancellationToken::new();
        let s = sub(Some(100), Some(5));
        for _ in 0..5 {
            go(limits.admit(&s, &stop).await);
        }
        let mut slots = Vec::new();
        for _ in 0..10 {
            let (reason, at) = deferred(limits.admit(&s, &stop).await);
            assert_eq!(reason, DeferReason::RateLimit);
            slots.push(at);
        }
        let first = slots[0] - Utc::now();
        assert!(first <= TimeDelta::milliseconds(210), "{first}");
        // One emission interval (200 ms) apart; the margin is the time between two
        // conversions to wall-clock time.
        for pair in slots.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= TimeDelta::milliseconds(150) && gap <= TimeDelta::milliseconds(250),
                "{gap}"
            );
        }
    }

    #[tokio::test]
    async fn failures_open_the_circuit_and_deferrals_wait_for_the_probe_time() {
        let limits = limits(Duration::ZERO);
        let stop = CancellationToken::new();
        let s = sub(None, None);
        let a = go(limits.admit(&s, &stop).await);
        let b = go(limits.admit(&s, &stop).await);
        a.finish(Health::Down);
        b.finish(Health::Down);
        assert_eq!(limits.shared.open_circuits.load(Ordering::Relaxed), 1);
        let (reason, at) = deferred(limits.admit(&s, &stop).await);
        assert_eq!(reason, DeferReason::CircuitOpen);
        assert!(at >= Utc::now() + TimeDelta::seconds(29), "{at}");
        // Other subscriptions are not affected.
        let _t = go(limits.admit(&sub(None, None), &stop).await);
    }

    #[test]
    fn wall_clock_never_overflows() {
        let far = Instant::now() + Duration::from_secs(u64::from(u32::MAX) * 1000);
        assert!(wall_clock(far) > Utc::now());
    }
}
