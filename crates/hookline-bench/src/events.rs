//! The event table: what the publishers and the receiver know about each event.
//!
//! A publisher learns an event's id from the Publish answer and records when the event
//! was meant to be sent; the receiver reads the same id from `webhook-id` and records
//! which subscriptions got the event. Either may come first (a fast dispatcher can
//! deliver before the Publish answer is read), so an arrival that finds no send time is
//! parked on the event and measured when the send time is registered.
//!
//! The table is sharded by the ULID's random bits, each shard behind its own mutex with
//! its own latency histogram, so publishers and receiver threads rarely meet on a lock;
//! the histograms are merged once at the end.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use ulid::Ulid;

const SHARDS: usize = 32;
/// `sent_ns` of an event whose Publish answer has not been read yet.
const UNKNOWN: u64 = u64::MAX;

/// An event id (`evt_` + ULID) as the number the table is keyed by.
pub fn event_key(id: &str) -> Option<u128> {
    let ulid = id.strip_prefix("evt_")?;
    Ulid::from_string(ulid).ok().map(u128::from)
}

/// A latency histogram in microseconds, up to one hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("the bounds are valid constants"))
}

/// What the receiver saw of one request for a known subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first successful delivery of this event to this subscription.
    First,
    /// It had been delivered to this subscription before.
    Duplicate,
}

#[derive(Debug)]
struct EventState {
    /// When the event was meant to be sent, ns since the run's epoch; [`UNKNOWN`] until
    /// the Publish answer is read.
    sent_ns: u64,
    /// Bit `i`: delivered to the `i`-th subscription of the event's group.
    received: u64,
    /// Arrival times (ns since the epoch) seen before `sent_ns` was known.
    early: Vec<u64>,
}

/// A hasher for keys that are already random (the ULID's 80 random bits).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = ((v as u64) ^ ((v >> 64) as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct Shard {
    map: HashMap<u128, EventState, BuildHasherDefault<KeyHasher>>,
    /// Publish → first successful arrival, per delivery, in µs.
    e2e: Histogram<u64>,
}

/// See the module documentation.
pub struct EventTable {
    epoch: Instant,
    shards: Box<[Mutex<Shard>]>,
    /// Scenario `ordered`: events in the order their Publish answers named them, and in
    /// the order their first deliveries arrived.
    order: Option<Mutex<(Vec<u128>, Vec<u128>)>>,
}

/// Whether deliveries arrived in publish order (scenario `ordered`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrderInfo {
    /// First deliveries compared.
    pub checked: u64,
    /// Deliveries that arrived after one of an event published later.
    pub out_of_order: u64,
    /// Deliveries of events no publish answer named.
    pub unknown: u64,
    pub held: bool,
}

/// What the table holds at the end of a run.
#[derive(Debug)]
pub struct TableSummary {
    pub e2e: Histogram<u64>,
    /// Events the receiver saw but no Publish answer named (a publish that failed or
    /// timed out on the client but was committed, or traffic of another run).
    pub unknown_events: u64,
}

impl EventTable {
    /// A table sized for about `expected_events` events.
    pub fn new(epoch: Instant, expected_events: usize) -> EventTable {
        let per_shard = expected_events / SHARDS + 16;
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::with_capacity_and_hasher(per_shard, Default::default()),
                    e2e: latency_histogram(),
                })
            })
            .collect();
        EventTable {
            epoch,
            shards,
            order: None,
        }
    }

    /// A table that also records publish and arrival order (scenario `ordered`).
    pub fn with_order(epoch: Instant, expected_events: usize) -> EventTable {
        let mut t = EventTable::new(epoch, expected_events);
        t.order = Some(Mutex::new((Vec::new(), Vec::new())));
        t
    }

    fn order_log(&self) -> Option<std::sync::MutexGuard<'_, (Vec<u128>, Vec<u128>)>> {
        self.order
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Arrival order against publish order, for a table made [`with_order`](Self::with_order).
    pub fn order_check(&self) -> Option<OrderInfo> {
        let log = self.order_log()?;
        let (published, arrived) = &*log;
        let index: HashMap<u128, usize> =
            published.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let (mut max_seen, mut out_of_order, mut unknown) = (None, 0u64, 0u64);
        for key in arrived {
            match index.get(key) {
                Some(&i) if max_seen.is_some_and(|m| i < m) => out_of_order += 1,
                Some(&i) => max_seen = Some(i),
                None => unknown += 1,
            }
        }
        Some(OrderInfo {
            checked: arrived.len() as u64,
            out_of_order,
            unknown,
            held: out_of_order == 0 && unknown == 0,
        })
    }

    /// Nanoseconds since the run's epoch.
    pub fn now_ns(&self) -> u64 {
        self.ns_since_epoch(Instant::now())
    }

    pub fn ns_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn shard(&self, key: u128) -> std::sync::MutexGuard<'_, Shard> {
        let i = ((key >> 16) as usize) & (SHARDS - 1);
        self.shards[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The Publish answer named event `key`, meant to be sent at `sent_ns`.
    pub fn register(&self, key: u128, sent_ns: u64) {
        if let Some(mut log) = self.order_log() {
            log.0.push(key);
        }
        let mut shard = self.shard(key);
        let shard = &mut *shard;
        let state = shard.map.entry(key).or_insert(EventState {
            sent_ns,
            received: 0,
            early: Vec::new(),
        });
        state.sent_ns = sent_ns;
        if !state.early.is_empty() {
            for arrival in std::mem::take(&mut state.early) {
                shard
                    .e2e
                    .saturating_record(arrival.saturating_sub(sent_ns) / 1000);
            }
        }
    }

    /// The receiver answered 2xx to event `key` for the subscription with group bit `bit`,
    /// which arrived at `arrival_ns`.
    pub fn delivered(&self, key: u128, bit: u32, arrival_ns: u64) -> Arrival {
        let mask = 1u64 << bit;
        let mut shard = self.shard(key);
        let shard = &mut *shard;
        let state = shard.map.entry(key).or_insert(EventState {
            sent_ns: UNKNOWN,
            received: 0,
            early: Vec::new(),
        });
        if state.received & mask != 0 {
            return Arrival::Duplicate;
        }
        state.received |= mask;
        if let Some(mut log) = self.order_log() {
            log.1.push(key);
        }
        if state.sent_ns == UNKNOWN {
            state.early.push(arrival_ns);
        } else {
            shard
                .e2e
                .saturating_record(arrival_ns.saturating_sub(state.sent_ns) / 1000);
        }
        Arrival::First
    }

    /// The merged latency histogram and the count of events no publisher registered.
    pub fn summary(&self) -> TableSummary {
        let mut e2e = latency_histogram();
        let mut unknown_events = 0;
        for shard in self.shards.iter() {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = e2e.add(&shard.e2e);
            unknown_events += shard.map.values().filter(|s| s.sent_ns == UNKNOWN).count() as u64;
        }
        TableSummary {
            e2e,
            unknown_events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_in_either_case_and_reject_other_ids() {
        let u = Ulid::new();
        let upper = format!("evt_{u}");
        let lower = format!("evt_{}", u.to_string().to_lowercase());
        assert_eq!(event_key(&upper), Some(u128::from(u)));
        assert_eq!(event_key(&lower), Some(u128::from(u)));
        assert_eq!(event_key(&format!("dlv_{u}")), None);
        assert_eq!(event_key("evt_short"), None);
    }

    #[test]
    fn arrivals_before_and_after_registration_are_measured_once() {
        let epoch = Instant::now();
        let t = EventTable::new(epoch, 10);
        let (a, b) = (u128::from(Ulid::new()), u128::from(Ulid::new()));
        // a: registered first; b: delivered before its answer was read.
        t.register(a, 1_000_000);
        assert_eq!(t.delivered(a, 0, 3_000_000), Arrival::First);
        assert_eq!(t.delivered(a, 0, 4_000_000), Arrival::Duplicate);
        assert_eq!(t.delivered(a, 1, 5_000_000), Arrival::First);
        assert_eq!(t.delivered(b, 0, 9_000_000), Arrival::First);
        let s = t.summary();
        assert_eq!((s.e2e.len(), s.unknown_events), (2, 1));
        t.register(b, 8_000_000);
        let s = t.summary();
        assert_eq!((s.e2e.len(), s.unknown_events), (3, 0));
        assert!(s.e2e.max() >= 3_990 && s.e2e.max() <= 4_010);
        assert!(t.order_check().is_none());
    }

    #[test]
    fn order_check_counts_deliveries_that_overtook_an_earlier_event() {
        let t = EventTable::with_order(Instant::now(), 10);
        let k: Vec<u128> = (0..4).map(|_| u128::from(Ulid::new())).collect();
        for key in &k {
            t.register(*key, 0);
        }
        for i in [0, 2, 1, 3] {
            t.delivered(k[i], 0, 1);
        }
        let o = t.order_check().unwrap();
        assert_eq!((o.checked, o.out_of_order, o.held), (4, 1, false));
    }
}
