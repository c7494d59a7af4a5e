//! `hookline.v1.DeliveryService`: what happened to each delivery, and manual retries.
//!
//! Its own crate because it is an API over the delivery records, not part of the retry
//! scheduler (`hookline-retry`); the two run in the same `retry` service of the binary.
//! A manual retry or replay commits its jobs to the outbox and queues them on
//! [`QueueName::Retries`], as the scheduler does.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hookline_broker::{Broker, QueueName};
use hookline_core::model::Delivery;
use hookline_core::{Id, IdKind};
use hookline_grpc::status::{from_id, from_store, invalid, shutting_down};
use hookline_grpc::{
    Authenticator, Gate, MessageLimits, Principal, convert, page_request, page_response, principal,
};
use hookline_outbox::publish_jobs;
use hookline_proto::v1 as pb;
use hookline_proto::v1::delivery_service_server::DeliveryService;
use hookline_store::port::{DeliveryFilter, DeliveryStore, EventStore, PageRequest, RegistryStore};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Most deliveries one `ReplayFailed` queues.
const MAX_REPLAY: u32 = 100_000;
const REPLAY_CHUNK: u32 = 500;
/// How often a watch looks for changes, and how far back it looks again to catch
/// transactions that committed late with an earlier timestamp.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
const WATCH_OVERLAP: chrono::Duration = chrono::Duration::seconds(2);
const WATCH_BATCH: u32 = 1000;

#[derive(Clone)]
pub struct DeliveryApi {
    deliveries: Arc<dyn DeliveryStore>,
    events: Arc<dyn EventStore>,
    registry: Arc<dyn RegistryStore>,
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    /// Ends every open watch when cancelled (the server is stopping).
    shutdown: CancellationToken,
}

impl DeliveryApi {
    pub fn new(
        deliveries: Arc<dyn DeliveryStore>,
        events: Arc<dyn EventStore>,
        registry: Arc<dyn RegistryStore>,
        broker: Arc<dyn Broker>,
        auth: Authenticator,
    ) -> Self {
        Self {
            deliveries,
            events,
            registry,
            broker,
            auth,
            shutdown: CancellationToken::new(),
        }
    }

    /// Ends every open `WatchDeliveries` stream with `UNAVAILABLE: server shutting down`
    /// when `shutdown` is cancelled, so a graceful stop never waits on a watching client.
    pub fn ending_streams_on(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The service behind the gate, which authenticates every call before its body is read.
    pub fn into_server(self) -> Gate<pb::delivery_service_server::DeliveryServiceServer<Self>> {
        let auth = self.auth.clone();
        let server = pb::delivery_service_server::DeliveryServiceServer::new(self);
        Gate::new(server, auth, MessageLimits::default())
    }

    /// The delivery with `id`, if the caller may see it; otherwise `NOT_FOUND`.
    async fn visible_delivery(&self, principal: &Principal, id: &str) -> Result<Delivery, Status> {
        let id = Id::parse(IdKind::Delivery, "delivery_id", id).map_err(from_id)?;
        let delivery = self
            .deliveries
            .get_delivery(&id)
            .await
            .map_err(from_store)?;
        principal.check_tenant(&delivery.tenant_id, "delivery", id.as_str())?;
        Ok(delivery)
    }

    /// A filter from the request's ids, each checked against what the caller may see.
    async fn filter(
        &self,
        principal: &Principal,
        tenant_id: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<DeliveryFilter, Status> {
        let mut filter = DeliveryFilter::default();
        if !tenant_id.is_empty() {
            let t = Id::parse(IdKind::Tenant, "tenant_id", tenant_id).map_err(from_id)?;
            principal.require_tenant(&t)?;
            // An unknown tenant is NOT_FOUND, not an empty list.
            self.registry.get_tenant(&t).await.map_err(from_store)?;
            filter.tenant_id = Some(t);
        }
        if !subscription_id.is_empty() {
            let id = Id::parse(IdKind::Subscription, "subscription_id", subscription_id)
                .map_err(from_id)?;
            let sub = self
                .registry
                .get_subscription(&id)
                .await
                .map_err(from_store)?;
            principal.check_tenant(&sub.tenant_id, "subscription", id.as_str())?;
            filter.subscription_id = Some(id);
        }
        if !event_id.is_empty() {
            let id = Id::parse(IdKind::Event, "event_id", event_id).map_err(from_id)?;
            let event = self.events.get_event(&id).await.map_err(from_store)?;
            principal.check_tenant(&event.tenant_id, "event", id.as_str())?;
            filter.event_id = Some(id);
        }
        // A tenant key only ever sees its own tenant, whatever else it asked for; an
        // admin key with no filter sees every tenant.
        if let Some(own) = principal.tenant() {
            filter.tenant_id = Some(own.clone());
        }
        Ok(filter)
    }

    /// Queues the deliveries again now (manual retry), via the outbox.
    async fn requeue(&self, ids: &[Id]) -> Result<usize, Status> {
        let jobs = self
            .deliveries
            .requeue_deliveries(ids)
            .await
            .map_err(from_store)?;
        if let Err(e) = publish_jobs(
            self.broker.as_ref(),
            self.events.as_ref(),
            QueueName::Retries,
            &jobs,
        )
        .await
        {
            tracing::warn!(error = %e, "manual retry committed but not yet queued; the relay will queue it");
        }
        Ok(jobs.len())
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Delivery, Status>> + Send>>;

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn list_deliveries(
        &self,
        req: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let mut filter = self
            .filter(
                &principal,
                &req.tenant_id,
                &req.subscription_id,
                &req.event_id,
            )
            .await?;
        filter.status = convert::from_delivery_status("status", req.status)?;
        filter.since = convert::opt_from_timestamp("since", req.since.as_ref())?;
        filter.until = convert::opt_from_timestamp("until", req.until.as_ref())?;
        let page = page_request(req.page_size, &req.page_token)?;
        let page = self
            .deliveries
            .list_deliveries(&filter, &page)
            .await
            .map_err(from_store)?;
        let (deliveries, next_page_token) = page_response(page, convert::delivery);
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries,
            next_page_token,
        }))
    }

    async fn get_delivery(
        &self,
        req: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        let principal = principal(&req)?;
        let delivery = self
            .visible_delivery(&principal, &req.get_ref().delivery_id)
            .await?;
        let attempts = self
            .deliveries
            .list_attempts(&delivery.id, &PageRequest::first_of_max())
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::GetDeliveryResponse {
            delivery: Some(convert::delivery(delivery)),
            attempts: attempts.items.into_iter().map(convert::attempt).collect(),
        }))
    }

    async fn list_attempts(
        &self,
        req: Request<pb::ListAttemptsRequest>,
    ) -> Result<Response<pb::ListAttemptsResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let delivery = self.visible_delivery(&principal, &req.delivery_id).await?;
        let page = page_request(req.page_size, &req.page_token)?;
        let page = self
            .deliveries
            .list_attempts(&delivery.id, &page)
            .await
            .map_err(from_store)?;
        let (attempts, next_page_token) = page_response(page, convert::attempt);
        Ok(Response::new(pb::ListAttemptsResponse {
            attempts,
            next_page_token,
        }))
    }

    async fn retry_delivery(
        &self,
        req: Request<pb::RetryDeliveryRequest>,
    ) -> Result<Response<pb::Delivery>, Status> {
        let principal = principal(&req)?;
        let delivery = self
            .visible_delivery(&principal, &req.get_ref().delivery_id)
            .await?;
        self.requeue(std::slice::from_ref(&delivery.id)).await?;
        let delivery = self
            .deliveries
            .get_delivery(&delivery.id)
            .await
            .map_err(from_store)?;
        // Queued now, but a dispatcher whose circuit is open puts it off: say until when.
        let open_until =
            convert::circuit_open_until(self.registry.as_ref(), &delivery.subscription_id).await?;
        let mut delivery = convert::delivery(delivery);
        if let Some(until) = open_until {
            delivery.deferred_reason = hookline_core::model::deferral::CIRCUIT_OPEN.to_owned();
            delivery.deferred_until = Some(until);
        }
        Ok(Response::new(delivery))
    }

    async fn replay_failed(
        &self,
        req: Request<pb::ReplayFailedRequest>,
    ) -> Result<Response<pb::ReplayFailedResponse>, Status> {
        let principal = principal(&req)?;
        let req = req.into_inner();
        let sub_id = Id::parse(
            IdKind::Subscription,
            "subscription_id",
            &req.subscription_id,
        )
        .map_err(from_id)?;
        let sub = self
            .registry
            .get_subscription(&sub_id)
            .await
            .map_err(from_store)?;
        principal.check_tenant(&sub.tenant_id, "subscription", sub_id.as_str())?;
        let since = req
            .since
            .as_ref()
            .ok_or_else(|| {
                invalid(
                    "since",
                    "is required: replay failed deliveries created since when?",
                )
            })
            .and_then(|t| convert::from_timestamp("since", t))?;
        let until = convert::opt_from_timestamp("until", req.until.as_ref())?;
        let mut replayed = 0u32;
        // Requeued deliveries leave the `failed` state, so each round sees the next ones.
        while replayed < MAX_REPLAY {
            let ids = self
                .deliveries
                .failed_deliveries(&sub_id, since, until, REPLAY_CHUNK)
                .await
                .map_err(from_store)?;
            if ids.is_empty() {
                break;
            }
            let n = self.requeue(&ids).await?;
            replayed += u32::try_from(n).unwrap_or(u32::MAX);
            if ids.len() < REPLAY_CHUNK as usize {
                break;
            }
        }
        Ok(Response::new(pb::ReplayFailedResponse { replayed }))
    }

    type WatchDeliveriesStream = WatchStream;

    async fn watch_deliveries(
        &self,
        req: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let principal = principal(&req)?;
        let permit = self.auth.limits().open_stream(&principal)?;
        let req = req.into_inner();
        let filter = self
            .filter(&principal, &req.tenant_id, &req.subscription_id, "")
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let store = self.deliveries.clone();
        tokio::spawn(async move {
            let mut cursor = Utc::now();
            let mut seen: HashSet<(Id, chrono::DateTime<Utc>)> = HashSet::new();
            let mut overlap = WATCH_OVERLAP;
            loop {
                let batch = match store
                    .deliveries_updated_after(&filter, cursor - overlap, WATCH_BATCH)
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(from_store(e))).await;
                        return;
                    }
                };
                // A full batch means more is waiting: read on from its end without
                // looking back, or a busy window could be read again and again.
                overlap = if batch.len() as u32 >= WATCH_BATCH {
                    chrono::Duration::zero()
                } else {
                    WATCH_OVERLAP
                };
                for d in batch {
                    cursor = cursor.max(d.updated_at);
                    if !seen.insert((d.id.clone(), d.updated_at)) {
                        continue;
                    }
                    if tx.send(Ok(convert::delivery(d))).await.is_err() {
                        return; // the client went away
                    }
                }
                // Forget what is older than the look-back window: it cannot come again.
                seen.retain(|(_, at)| *at >= cursor - WATCH_OVERLAP);
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(hookline_grpc::auth::guard_stream(
            &self.auth,
            principal,
            permit,
            until_shutdown(stream, self.shutdown.clone()),
        )))
    }
}

/// `updates` until `shutdown` fires, then a last `UNAVAILABLE: server shutting down`.
/// Dropping `updates` closes its channel, which stops the task feeding it.
fn until_shutdown(
    updates: impl Stream<Item = Result<pb::Delivery, Status>> + Send + 'static,
    shutdown: CancellationToken,
) -> WatchStream {
    use futures::StreamExt;
    let stopped = shutdown.clone();
    let last = futures::stream::once(async move { stopped.is_cancelled() })
        .filter_map(|stopped| async move { stopped.then(shutting_down).map(Err) });
    Box::pin(updates.take_until(shutdown.cancelled_owned()).chain(last))
}
