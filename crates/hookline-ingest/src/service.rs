//! `hookline.v1.IngestService`: validate, authorise, match, store, enqueue.
//!
//! Each `Publish`/`PublishBatch` runs in an `ingest.publish` span, continuing the trace
//! the caller sent in its gRPC metadata (W3C `traceparent`) if any. Its `traceparent` is
//! stored with every delivery the call creates, and the outbox's `queue.publish` span
//! inside it puts the trace context into each queue message, so a dispatcher's attempt
//! continues the same trace and a later retry can link back to it.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hookline_broker::{Broker, QueueName};
use hookline_core::job::DeliveryJob;
use hookline_core::model::Event;
use hookline_core::quota::{Quota, QuotaExceeded, Quotas, thousands};
use hookline_core::schema::PayloadSchema;
use hookline_core::{Id, IdKind, validate};
use hookline_grpc::status::{from_id, from_quota, from_store, from_validation, invalid};
use hookline_grpc::{
    Authenticator, Gate, MessageLimits, Principal, convert, page_request, page_response, principal,
};
use hookline_outbox::{Confirmer, publish_jobs_batched};

use crate::backlog::BacklogLimit;
use crate::batcher::PublishBatcher;
use crate::detached::{Detached, DetachedError};
use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_server::IngestService;
use hookline_store::port::{EventFilter, EventStore, InsertOutcome, NewEvent};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::matcher::{SubscriptionMatcher, TenantSubscriptions};
use crate::rate::TenantRates;

/// Limits of the write path.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Most events in one `PublishBatch`.
    pub max_batch: usize,
    /// Largest `PublishBatch` request message, in bytes.
    pub max_batch_bytes: usize,
    /// The quotas of tenants without their own.
    pub quotas: Quotas,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_batch: 1000,
            max_batch_bytes: 16 * 1024 * 1024,
            quotas: Quotas::default(),
        }
    }
}

/// Most publish calls storing or queueing at once; more wait for a place before
/// anything of theirs is stored. As many as the group-commit queue holds.
const MAX_IN_FLIGHT: usize = 4096;

/// Room in a `Publish` request for what is not payload (ids, type, key, channels).
pub const PUBLISH_OVERHEAD_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct IngestApi {
    config: IngestConfig,
    events: Arc<dyn EventStore>,
    /// Group-commits the inserts of concurrent calls.
    writer: PublishBatcher,
    /// Clears the outbox of published deliveries in batches.
    confirmer: Confirmer,
    matcher: SubscriptionMatcher,
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    /// The events-per-second quota of each tenant.
    rates: TenantRates,
    /// Runs each call's store-and-queue step so that a hang-up cannot cancel it.
    detached: Detached,
    /// Refuses publishes while the delivery backlog is above `ingest_max_backlog`.
    backlog: Option<Arc<BacklogLimit>>,
}

impl IngestApi {
    pub fn new(
        config: IngestConfig,
        events: Arc<dyn EventStore>,
        matcher: SubscriptionMatcher,
        broker: Arc<dyn Broker>,
        auth: Authenticator,
    ) -> Self {
        Self {
            config,
            writer: PublishBatcher::spawn(events.clone()),
            confirmer: Confirmer::spawn(events.clone()),
            events,
            matcher,
            broker,
            auth,
            rates: TenantRates::default(),
            detached: Detached::new(MAX_IN_FLIGHT),
            backlog: None,
        }
    }

    /// Refuses publishes (`RESOURCE_EXHAUSTED`, nothing stored) while `limit` reads a
    /// backlog above it.
    #[must_use]
    pub fn with_backlog_limit(mut self, limit: Arc<BacklogLimit>) -> Self {
        self.backlog = Some(limit);
        self
    }

    /// The service behind the gate, which authenticates every call before its body is
    /// read and holds `Publish` to the payload limit plus [`PUBLISH_OVERHEAD_BYTES`] and
    /// `PublishBatch` to `max_batch_bytes`.
    pub fn into_server(self) -> Gate<pb::ingest_service_server::IngestServiceServer<Self>> {
        let limits = MessageLimits::default()
            .with(
                "Publish",
                self.config.max_payload_bytes + PUBLISH_OVERHEAD_BYTES,
                "max_payload_bytes",
            )
            .with(
                "PublishBatch",
                self.config.max_batch_bytes,
                "publish_batch_max_bytes",
            );
        // Answers (a page of events) may be as large as before: up to a full page of
        // the largest payloads.
        let answer_limit =
            self.config.max_payload_bytes * self.config.max_batch.max(1) + 1024 * 1024;
        let auth = self.auth.clone();
        let server = pb::ingest_service_server::IngestServiceServer::new(self)
            .max_decoding_message_size(limits.largest())
            .max_encoding_message_size(answer_limit);
        Gate::new(server, auth, limits)
    }

    /// Checks one publish request; `prefix` names it inside a batch (`events[3].`).
    fn check(&self, prefix: &str, req: &pb::PublishRequest) -> Result<Id, Status> {
        let f = |name: &str| format!("{prefix}{name}");
        let tenant = Id::parse(IdKind::Tenant, &f("tenant_id"), &req.tenant_id).map_err(from_id)?;
        validate::event_type(&f("event_type"), &req.event_type).map_err(from_validation)?;
        validate::json_payload(&f("payload"), &req.payload, self.config.max_payload_bytes)
            .map_err(from_validation)?;
        if !req.idempotency_key.is_empty() {
            validate::idempotency_key(&f("idempotency_key"), &req.idempotency_key)
                .map_err(from_validation)?;
        }
        validate::channels(&f("channels"), &req.channels).map_err(from_validation)?;
        Ok(tenant)
    }

    /// Matches one event and applies what depends on its tenant and event type: the
    /// deliveries-per-event quota and the event type's JSON Schema. Returns the matching
    /// subscriptions and the tenant's quotas. Tenants and schemas are read once per call
    /// (`seen`), however many of its events share them.
    async fn admit(
        &self,
        prefix: &str,
        tenant_id: &Id,
        req: &pb::PublishRequest,
        seen: &mut SeenInCall,
    ) -> Result<(Vec<Id>, Quotas), Status> {
        let tenant = match seen.tenants.get(tenant_id) {
            Some(tenant) => tenant.clone(),
            None => {
                let tenant = self.matcher.tenant(tenant_id).await.map_err(from_store)?;
                seen.tenants.insert(tenant_id.clone(), tenant.clone());
                tenant
            }
        };
        let Some(matched) = tenant.matching(&req.event_type, &req.channels) else {
            return Err(Status::not_found(format!("tenant {tenant_id} not found")));
        };
        let quotas = matched.quotas.effective(&self.config.quotas);
        let matches = matched.subscription_ids.len();
        if matches > quotas.deliveries_per_event as usize {
            return Err(from_quota(QuotaExceeded {
                quota: Quota::DeliveriesPerEvent,
                limit: quotas.deliveries_per_event,
                tenant: tenant_id.to_string(),
                context: format!(
                    "{prefix}event of type {:?} matches {} enabled subscriptions",
                    req.event_type,
                    thousands(matches as u64)
                ),
            }));
        }
        let schema = match seen.schemas.get(&req.event_type) {
            Some(schema) => schema.clone(),
            None => {
                let schema = self
                    .matcher
                    .schemas()
                    .get(&req.event_type)
                    .await
                    .map_err(from_store)?;
                seen.schemas.insert(req.event_type.clone(), schema.clone());
                schema
            }
        };
        if let Some(schema) = schema {
            schema
                .check(&format!("{prefix}payload"), &req.event_type, &req.payload)
                .map_err(from_validation)?;
        }
        Ok((matched.subscription_ids, quotas))
    }

    /// Validates, authorises and matches every request, then stores them in one
    /// transaction and enqueues their deliveries.
    async fn publish_all(
        &self,
        principal: &Principal,
        requests: Vec<pb::PublishRequest>,
        batch: bool,
    ) -> Result<Vec<pb::PublishResponse>, Status> {
        if let Some(backlog) = &self.backlog {
            backlog.admit()?;
        }
        let mut tenants = Vec::with_capacity(requests.len());
        let prefixes: Vec<String> = (0..requests.len())
            .map(|i| field_prefix(batch, i))
            .collect();
        for (req, prefix) in requests.iter().zip(&prefixes) {
            let tenant = self.check(prefix, req)?;
            principal.require_tenant(&tenant)?;
            tenants.push(tenant);
        }
        let span = tracing::Span::current();
        record_subject(&span, &requests);
        // One context for the whole call: where every delivery it creates comes from.
        let traceparent = hookline_telemetry::traceparent_of(&span);
        let now = Utc::now();
        let mut new_events = Vec::with_capacity(requests.len());
        // Events of this call per tenant, and the tenant's events-per-second quota.
        let mut per_tenant: Vec<(Id, u32, u32)> = Vec::new();
        let mut seen = SeenInCall::default();
        for ((req, tenant_id), prefix) in requests.into_iter().zip(tenants).zip(&prefixes) {
            let (subscription_ids, quotas) =
                self.admit(prefix, &tenant_id, &req, &mut seen).await?;
            match per_tenant.iter_mut().find(|(t, ..)| *t == tenant_id) {
                Some((_, n, _)) => *n += 1,
                None => per_tenant.push((tenant_id.clone(), 1, quotas.events_per_second)),
            }
            new_events.push(new_event(
                req,
                tenant_id,
                subscription_ids,
                now,
                traceparent.clone(),
            ));
        }
        // Last of the checks, so that a call refused for another reason uses no quota.
        for (tenant, events, per_second) in &per_tenant {
            self.rates
                .admit(tenant, *events, *per_second)
                .map_err(from_quota)?;
        }
        // From here on the call's work runs detached: a caller that hangs up does not
        // cancel the commit or the publish after it.
        let work = store_and_queue(
            self.writer.clone(),
            self.broker.clone(),
            self.confirmer.clone(),
            new_events,
            span.clone(),
        )
        .instrument(span);
        self.detached.run(work).await.map_err(|e| match e {
            DetachedError::Closed => Status::unavailable(e.to_string()),
            DetachedError::Failed(_) => Status::internal(e.to_string()),
        })?
    }

    /// A task that, once `shutdown` is cancelled, waits for every publish that is still
    /// storing or queueing (including those whose callers hung up).
    pub fn finish_on(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        self.detached.finish_on(shutdown)
    }
}

/// Stores the events (in a group with other calls) and queues the deliveries created.
/// Runs detached from the call (see [`Detached`]), inside the call's span.
async fn store_and_queue(
    writer: PublishBatcher,
    broker: Arc<dyn Broker>,
    confirmer: Confirmer,
    new_events: Vec<NewEvent>,
    span: tracing::Span,
) -> Result<Vec<pb::PublishResponse>, Status> {
    let event_count = new_events.len();
    let outcomes = writer
        .insert(new_events)
        .instrument(tracing::debug_span!(
            "store.insert_events",
            events = event_count
        ))
        .await
        .map_err(from_store)?;

    let (responses, jobs) = responses(outcomes);
    let created_events = responses.iter().filter(|r| !r.duplicate).count();
    span.record("deliveries_created", jobs.len());
    span.record("duplicates", responses.len() - created_events);
    metrics::counter!("hookline_events_published_total").increment(created_events as u64);
    metrics::counter!("hookline_deliveries_created_total").increment(jobs.len() as u64);
    // The events are committed: from here on the answer is OK whatever happens.
    // A publish that fails leaves the deliveries in the outbox for the relay.
    if let Err(e) =
        publish_jobs_batched(broker.as_ref(), &confirmer, QueueName::Deliveries, &jobs).await
    {
        tracing::warn!(error = %e, deliveries = jobs.len(), "deliveries committed but not yet queued; the relay will queue them");
    }
    Ok(responses)
}

/// The answer for each stored event, in the order asked, and the deliveries to enqueue
/// (those of the events created now; a duplicate's were enqueued when it was created).
fn responses(outcomes: Vec<InsertOutcome>) -> (Vec<pb::PublishResponse>, Vec<DeliveryJob>) {
    let mut responses = Vec::with_capacity(outcomes.len());
    let mut jobs = Vec::new();
    for outcome in outcomes {
        responses.push(match outcome {
            InsertOutcome::Created {
                event_id,
                jobs: created,
                held,
            } => {
                // Held ones (behind an ordered subscription's head) are created too.
                let count = u32::try_from(created.len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(held);
                jobs.extend(created);
                pb::PublishResponse {
                    event_id: event_id.into_string(),
                    deliveries_created: count,
                    duplicate: false,
                }
            }
            InsertOutcome::Duplicate {
                event_id,
                deliveries,
            } => pb::PublishResponse {
                event_id: event_id.into_string(),
                deliveries_created: deliveries,
                duplicate: true,
            },
        });
    }
    (responses, jobs)
}

/// The event of `req` to store for `tenant_id`, with the subscriptions it matched.
fn new_event(
    req: pb::PublishRequest,
    tenant_id: Id,
    subscription_ids: Vec<Id>,
    now: DateTime<Utc>,
    traceparent: Option<String>,
) -> NewEvent {
    NewEvent {
        event: Event {
            id: Id::new(IdKind::Event),
            tenant_id,
            event_type: req.event_type,
            payload: req.payload,
            channels: req.channels,
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            created_at: now,
        },
        subscription_ids,
        traceparent,
    }
}

/// The tenants and event-type schemas one publish call has read.
#[derive(Default)]
struct SeenInCall {
    tenants: HashMap<Id, Arc<TenantSubscriptions>>,
    schemas: HashMap<String, Option<Arc<PayloadSchema>>>,
}

/// How the fields of the `i`-th event are named in errors: `events[3].` in a batch.
fn field_prefix(batch: bool, i: usize) -> String {
    if batch {
        format!("events[{i}].")
    } else {
        String::new()
    }
}

/// The span of one publish call: a server span continuing the caller's trace. Tenant,
/// event type and outcome counts are recorded as they become known.
fn publish_span(
    method: &'static str,
    events: usize,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "ingest.publish",
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        rpc.system = "grpc",
        rpc.service = "hookline.v1.IngestService",
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        events,
        tenant_id = Empty,
        event_type = Empty,
        deliveries_created = Empty,
        duplicates = Empty,
    );
    hookline_telemetry::set_parent(&span, hookline_telemetry::extract_grpc(metadata));
    span
}

/// The tenant and event type of the call, when every event of it shares them.
fn record_subject(span: &tracing::Span, requests: &[pb::PublishRequest]) {
    if span.is_disabled() {
        return;
    }
    let Some(first) = requests.first() else {
        return;
    };
    if requests.iter().all(|r| r.tenant_id == first.tenant_id) {
        span.record("tenant_id", first.tenant_id.as_str());
    }
    if requests.iter().all(|r| r.event_type == first.event_type) {
        span.record("event_type", first.event_type.as_str());
    }
}

/// Runs a call and records its gRPC status on its span; as OpenTelemetry's conventions
/// have it for a server, only codes that mean the server failed mark the span an error
/// (a caller's invalid argument is not).
async fn traced<T>(
    span: &tracing::Span,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let result = call.await;
    let code = result.as_ref().err().map_or(Code::Ok, Status::code);
    span.record("rpc.grpc.status_code", code as i32);
    if let Err(status) = &result
        && matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        )
    {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", status.message());
    }
    result
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let span = publish_span("Publish", 1, req.metadata());
        traced(&span, async {
            let principal = principal(&req)?;
            let mut responses = self
                .publish_all(&principal, vec![req.into_inner()], false)
                .await?;
            let response = responses
                .pop()
                .ok_or_else(|| Status::internal("the store answered no outcome for the event"))?;
            Ok(Response::new(response))
        })
        .instrument(span.clone())
        .await
    }

    async fn publish_batch(
        &self,
        req: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let span = publish_span("PublishBatch", req.get_ref().events.len(), req.metadata());
        traced(&span, async {
            let principal = principal(&req)?;
            let events = req.into_inner().events;
            if events.is_empty() {
                return Err(invalid("events", "is empty; send 1 to 1000 events"));
            }
            if events.len() > self.config.max_batch {
                return Err(invalid(
                    "events",
                    format!(
                        "has {} events; the limit is {}",
                        events.len(),
                        self.config.max_batch
                    ),
                ));
            }
            let results = self.publish_all(&principal, events, true).await?;
            Ok(Response::new(pb::PublishBatchResponse { results }))
        })
        .instrument(span.clone())
        .await
    }

    async fn get_event(
        &self,
        req: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        let principal = principal(&req)?;
        let id = Id::parse(IdKind::Event, "event_id", &req.get_ref().event_id).map_err(from_id)?;
        let event = self.events.get_event(&id).await.map_err(from_store)?;
        principal.check_tenant(&event.tenant_id, "event", id.as_str())?;
        Ok(Response::new(convert::event(event)))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let tenant_id = Id::parse(IdKind::Tenant, "tenant_id", &req.tenant_id).map_err(from_id)?;
        principal.require_tenant(&tenant_id)?;
        if !req.event_type.is_empty() {
            validate::event_type("event_type", &req.event_type).map_err(from_validation)?;
        }
        // An unknown tenant is NOT_FOUND, not an empty list.
        let known = self.matcher.tenant(&tenant_id).await.map_err(from_store)?;
        if matches!(*known, crate::matcher::TenantSubscriptions::Missing) {
            return Err(Status::not_found(format!("tenant {tenant_id} not found")));
        }
        let page = page_request(req.page_size, &req.page_token)?;
        let filter = EventFilter {
            tenant_id,
            event_type: (!req.event_type.is_empty()).then_some(req.event_type),
            since: convert::opt_from_timestamp("since", req.since.as_ref())?,
            until: convert::opt_from_timestamp("until", req.until.as_ref())?,
        };
        let page = self
            .events
            .list_events(&filter, &page)
            .await
            .map_err(from_store)?;
        let (events, next_page_token) = page_response(page, convert::event);
        Ok(Response::new(pb::ListEventsResponse {
            events,
            next_page_token,
        }))
    }
}
