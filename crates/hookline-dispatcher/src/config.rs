//! The dispatcher's settings, in one place so the binary can fill them from its
//! configuration and tests can shorten the timeouts.

use std::time::Duration;

use hookline_core::client_cert::ClientIdentity;
use hookline_egress::Egress;
use reqwest::Url;

/// How a dispatcher works. `Default` suits a laptop and a modest cluster node alike.
///
/// The per-subscription limits (`default_max_in_flight`, the subscription's own
/// `max_in_flight` and `rate_limit_per_second`) and the circuit breaker are kept per
/// dispatcher process: with several replicas, a subscription may see up to one
/// `max_in_flight` (and one rate) per replica.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Most HTTP requests in flight at once (over every subscription): the process-wide
    /// cap, taken after a subscription's own slot.
    pub concurrency: usize,
    /// Most unsettled messages of each unsharded queue (`deliveries`, `retries`: what
    /// versions before fair delivery queued; AMQP prefetch).
    pub prefetch: u16,
    /// Most unsettled messages of each shard queue (`deliveries.<i>`, `retries.<i>`).
    /// The process holds up to `2 × shards × shard_prefetch` messages.
    pub shard_prefetch: u16,
    /// The whole of one request: connecting, sending, and reading the response excerpt.
    pub request_timeout: Duration,
    /// The `user-agent` of every request.
    pub user_agent: String,
    /// Most outcomes written to the store in one transaction.
    pub write_batch: usize,
    /// How long the first outcome of a batch waits for company before it is written.
    pub write_linger: Duration,
    /// Most batches of outcomes being written at once (each its own transaction).
    pub writes_in_flight: usize,
    /// Most requests in flight to one subscription that sets no `max_in_flight` of its
    /// own. A message for a subscription at its limit is deferred (see `defer_delay`),
    /// never held, so one slow endpoint cannot take the whole process.
    pub default_max_in_flight: u32,
    /// How long a message for a subscription at its in-flight limit may wait in the
    /// process for a slot to free before it is deferred. A fast endpoint frees slots
    /// within milliseconds, and waiting that long is far cheaper than a deferral (a
    /// database write, a trip through the retry schedule, and a second or more of
    /// latency): a burst of a few times the limit then goes through without one. The
    /// wait is skipped when the subscription's requests are slow enough that no slot is
    /// likely to free in time (a hanging endpoint), so it costs a hanging endpoint
    /// nothing once its first requests have ended. Zero defers at once.
    pub in_flight_wait: Duration,
    /// How far a delivery is put off when its subscription is at its in-flight limit,
    /// jittered by ±20% so deferred deliveries do not come back together; when the
    /// subscription already has deferred deliveries, later ones are spaced at the pace
    /// it frees slots (at most 60 s ahead).
    pub defer_delay: Duration,
    /// The per-subscription circuit breaker.
    pub circuit: CircuitConfig,
    /// At shutdown, how long in-flight deliveries may take to finish before they are
    /// abandoned (their messages go back to the queue, unacknowledged, and are delivered
    /// again). Their outcomes then get [`OUTCOME_FLUSH`](crate::OUTCOME_FLUSH) more to be
    /// written. Keep the sum under the platform's grace period (Kubernetes: 30 s).
    pub shutdown_drain: Duration,
    /// Which addresses requests may go to (and the resolver names go through). The
    /// default refuses everything that is not globally routable unicast.
    pub egress: Egress,
    /// An HTTP CONNECT proxy every request goes through (for a static egress address);
    /// the proxy then resolves names, so it should enforce a policy of its own.
    pub egress_proxy: Option<Url>,
    /// TLS towards receivers beyond the platform's roots.
    pub receiver_tls: ReceiverTls,
}

/// TLS towards receivers: a default client certificate and extra roots for private PKI.
#[derive(Debug, Clone, Default)]
pub struct ReceiverTls {
    /// Presented to every receiver that asks for a client certificate, unless the
    /// subscription carries its own (checked by the binary with `client_cert::validate`).
    pub default_identity: Option<ClientIdentity>,
    /// PEM certificates trusted as roots for receivers, beside the platform's.
    pub extra_roots_pem: Option<String>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            concurrency: 512,
            prefetch: 256,
            shard_prefetch: 64,
            request_timeout: Duration::from_secs(15),
            user_agent: format!("Hookline/{}", env!("CARGO_PKG_VERSION")),
            write_batch: 256,
            write_linger: Duration::from_millis(5),
            writes_in_flight: 3,
            default_max_in_flight: 64,
            in_flight_wait: Duration::from_millis(50),
            defer_delay: Duration::from_secs(1),
            circuit: CircuitConfig::default(),
            shutdown_drain: Duration::from_secs(10),
            egress: Egress::default(),
            egress_proxy: None,
            receiver_tls: ReceiverTls::default(),
        }
    }
}

/// When a subscription's circuit opens and for how long.
///
/// A failure is a request that got no answer (timeout, refused or reset connection, DNS,
/// TLS) or a 5xx answer; any other answer (2xx, 3xx, 4xx including 429) is a success
/// for the breaker, since the endpoint is up. While the circuit is open, deliveries to
/// the subscription are deferred without a request; after the cool-down one probe
/// request goes through (half-open): success closes the circuit, failure opens it again
/// for twice the cool-down, up to `max_cool_down`. The state lives in the dispatcher
/// process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Consecutive failures that open the circuit; 0 turns this trigger off.
    pub failure_threshold: u32,
    /// Share of failed requests, in percent, within one `window` of at least
    /// `min_requests` requests, that opens the circuit; 0 turns this trigger off.
    pub failure_ratio_percent: u8,
    /// Fewest requests in a window before the failure ratio counts.
    pub min_requests: u32,
    /// The length of the window the failure ratio is counted over.
    pub window: Duration,
    /// How long the circuit stays open the first time.
    pub cool_down: Duration,
    /// The longest cool-down, however often the probe fails.
    pub max_cool_down: Duration,
}

impl CircuitConfig {
    /// Whether either trigger is on.
    pub fn enabled(&self) -> bool {
        self.failure_threshold > 0 || self.failure_ratio_percent > 0
    }
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 10,
            failure_ratio_percent: 50,
            min_requests: 20,
            window: Duration::from_secs(30),
            cool_down: Duration::from_secs(30),
            max_cool_down: Duration::from_secs(600),
        }
    }
}
