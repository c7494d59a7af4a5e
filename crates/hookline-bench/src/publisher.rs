//! The publishers: concurrent gRPC clients that publish the run's events.
//!
//! Each publisher has one call in flight at a time. Without `--rate` it sends the next
//! call as soon as the last one is answered (closed loop: the server sets the pace).
//! With `--rate` every publisher follows a fixed schedule of intended send times, spread
//! so that the publishers interleave (open loop); a call's latency is measured from its
//! intended send time, not from when it was actually sent, so that a server that stalls
//! is charged for the calls that queued up behind the stall (no coordinated omission).
//! A schedule that falls behind stops at the end of the window; its unsent calls are
//! reported as missed.
//!
//! Every accepted event is registered in the [`EventTable`] with its intended send time,
//! and the deliveries it should produce are added to `expected`, which the drain waits for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::authed;
use crate::events::{EventTable, event_key, latency_histogram};
use crate::scenario::{Layout, Plan};

/// State every publisher of a run shares.
pub struct PublishShared {
    plan: Arc<Plan>,
    layout: Arc<Layout>,
    events: Arc<EventTable>,
    start: Instant,
    tenant: String,
    auth: MetadataValue<Ascii>,
    pad: String,
    next_seq: AtomicU64,
    /// Events the server accepted.
    pub accepted: AtomicU64,
    /// Deliveries the accepted events should bring to healthy subscriptions.
    pub expected: AtomicU64,
    /// Failed calls.
    pub errors: AtomicU64,
    /// Events an open-loop schedule meant to send but could not before the window ended.
    pub missed: AtomicU64,
    /// Set once every publisher has stopped.
    pub publishing_done: AtomicBool,
    /// Cancelled when the run is abandoned (Ctrl-C, a failed step): publishers stop.
    pub abort: CancellationToken,
}

/// What one publisher did.
#[derive(Debug)]
pub struct PublisherResult {
    /// Call latency in µs, from the intended send time to the answer.
    pub latency: Histogram<u64>,
    pub calls: u64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Answers whose `deliveries_created` differed from the layout's subscriptions.
    pub fanout_mismatches: u64,
    /// Answers whose event id could not be read.
    pub bad_event_ids: u64,
}

impl PublishShared {
    pub fn new(
        plan: Arc<Plan>,
        layout: Arc<Layout>,
        events: Arc<EventTable>,
        start: Instant,
        tenant: String,
        auth: MetadataValue<Ascii>,
    ) -> PublishShared {
        // `{"seq":1234567,"source":"hookline-bench","pad":"…"}` comes to payload_bytes.
        let frame = r#"{"seq":1234567,"source":"hookline-bench","pad":""}"#.len();
        let pad = "x".repeat(plan.payload_bytes.saturating_sub(frame));
        PublishShared {
            plan,
            layout,
            events,
            start,
            tenant,
            auth,
            pad,
            next_seq: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            publishing_done: AtomicBool::new(false),
            abort: CancellationToken::new(),
        }
    }

    fn event(&self, seq: u64) -> pb::PublishRequest {
        let group = self.layout.group_of_seq(seq);
        let payload = format!(
            r#"{{"seq":{seq},"source":"hookline-bench","pad":"{}"}}"#,
            self.pad
        );
        pb::PublishRequest {
            tenant_id: self.tenant.clone(),
            event_type: self.layout.event_type(group).to_string(),
            payload: payload.into_bytes(),
            ..Default::default()
        }
    }

    /// The server accepted event `seq` as `event_id` with `created` deliveries.
    fn accept(
        &self,
        seq: u64,
        event_id: &str,
        created: u32,
        sent_ns: u64,
        out: &mut PublisherResult,
    ) {
        let (want, healthy) = self.layout.group_counts(self.layout.group_of_seq(seq));
        let expected = if created == want {
            healthy
        } else {
            out.fanout_mismatches += 1;
            created.saturating_sub(want - healthy)
        };
        match event_key(event_id) {
            Some(key) => self.events.register(key, sent_ns),
            None => out.bad_event_ids += 1,
        }
        self.expected
            .fetch_add(u64::from(expected), Ordering::Relaxed);
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
}

/// Publisher number `index`: publishes until the run's window or event count ends.
pub async fn run(
    index: usize,
    shared: Arc<PublishShared>,
    mut client: IngestServiceClient<Channel>,
) -> PublisherResult {
    let plan = shared.plan.clone();
    let batch = plan.batch as u64;
    let mut out = PublisherResult {
        latency: latency_histogram(),
        calls: 0,
        errors: BTreeMap::new(),
        first_error: None,
        fanout_mismatches: 0,
        bad_event_ids: 0,
    };
    let mut pacer = Pacer::new(&plan, shared.start, index);
    loop {
        if shared.abort.is_cancelled() {
            break;
        }
        let Some(intended) = pacer.next_send(&shared, batch).await else {
            break;
        };
        let first = shared.next_seq.fetch_add(batch, Ordering::Relaxed);
        let count = match plan.events {
            Some(total) if first >= total => break,
            Some(total) => batch.min(total - first),
            None => batch,
        };
        out.calls += 1;
        let result = send(&mut client, &shared, first, count, intended, &mut out).await;
        if let Err(status) = result {
            record_error(&shared, &mut out, &status);
            if pacer.interval.is_none() {
                // Closed loop: do not spin on a failing server.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    out
}

/// When a publisher sends: on an open-loop schedule (a rate) or as soon as it can.
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
    stop_at: Option<Instant>,
}

impl Pacer {
    fn new(plan: &Plan, start: Instant, index: usize) -> Self {
        let batch = plan.batch as u64;
        let interval = plan
            .rate
            .map(|r| Duration::from_secs_f64(batch as f64 * plan.publishers as f64 / r));
        let next = match interval {
            Some(iv) => start + iv.mul_f64(index as f64 / plan.publishers as f64),
            None => start,
        };
        Self {
            interval,
            next,
            stop_at: plan.duration.map(|d| start + d),
        }
    }

    /// Waits for the next send and returns its intended time; `None` when the window
    /// has ended (counting what an open loop could no longer send as missed).
    async fn next_send(&mut self, shared: &PublishShared, batch: u64) -> Option<Instant> {
        let stop_at = self.stop_at;
        match self.interval {
            Some(iv) => {
                let due = self.next;
                self.next += iv;
                if stop_at.is_some_and(|s| due >= s) {
                    return None;
                }
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                } else if let Some(stop) = stop_at.filter(|s| now >= *s) {
                    // Behind schedule at the end of the window: what is left is missed.
                    let left = (stop - due).as_secs_f64() / iv.as_secs_f64();
                    shared
                        .missed
                        .fetch_add(left.ceil() as u64 * batch, Ordering::Relaxed);
                    return None;
                }
                Some(due)
            }
            None => {
                let now = Instant::now();
                if stop_at.is_some_and(|s| now >= s) {
                    return None;
                }
                Some(now)
            }
        }
    }
}

/// One call: the event `first` alone, or the batch of `count` events from it.
async fn send(
    client: &mut IngestServiceClient<Channel>,
    shared: &PublishShared,
    first: u64,
    count: u64,
    intended: Instant,
    out: &mut PublisherResult,
) -> Result<(), tonic::Status> {
    let sent_ns = shared.events.ns_since_epoch(intended);
    if shared.plan.batch == 1 {
        let req = authed(shared.event(first), &shared.auth);
        client.publish(req).await.map(|res| {
            let res = res.into_inner();
            record(out, intended);
            shared.accept(first, &res.event_id, res.deliveries_created, sent_ns, out);
        })
    } else {
        let events = (first..first + count)
            .map(|seq| shared.event(seq))
            .collect();
        let req = authed(pb::PublishBatchRequest { events }, &shared.auth);
        client.publish_batch(req).await.map(|res| {
            let res = res.into_inner();
            record(out, intended);
            for (i, r) in res.results.iter().enumerate() {
                shared.accept(
                    first + i as u64,
                    &r.event_id,
                    r.deliveries_created,
                    sent_ns,
                    out,
                );
            }
            if res.results.len() as u64 != count {
                out.bad_event_ids += count.abs_diff(res.results.len() as u64);
            }
        })
    }
}

/// Counts a failed call, by code, keeping the first message.
fn record_error(shared: &PublishShared, out: &mut PublisherResult, status: &tonic::Status) {
    shared.errors.fetch_add(1, Ordering::Relaxed);
    *out.errors
        .entry(format!("{:?}", status.code()))
        .or_default() += 1;
    if out.first_error.is_none() {
        out.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
    }
}

fn record(out: &mut PublisherResult, intended: Instant) {
    out.latency
        .saturating_record(intended.elapsed().as_micros() as u64);
}
