//! A process started with `--services` runs only part of the cluster. This module says
//! so: a log line naming the services that must run in other processes, and, for a gRPC
//! service this process does not run, an `UNIMPLEMENTED` answer that names what it does
//! run and where the call belongs (instead of tonic's bare "Unimplemented").

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;

use hookline_proto::v1 as pb;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{Context, Poll, Service as TowerService};
use tonic::server::NamedService;
use tonic::service::Routes as Router;

use crate::services::Service;

/// The services not in `running`, and the commands that start them, for the log; `None`
/// when this process runs them all.
pub fn missing_services_note(running: &BTreeSet<Service>) -> Option<String> {
    let missing: Vec<String> = Service::ALL
        .into_iter()
        .filter(|s| !running.contains(s))
        .map(|s| s.to_string())
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "this process runs {}; the cluster also needs {} running in other processes on the \
         same database and broker (e.g. `hookline serve --services {}`)",
        list(running),
        missing.join(", "),
        missing.join(",")
    ))
}

/// Adds an `UNIMPLEMENTED` answer with a useful message for every gRPC API of a service
/// this process does not run (the dispatcher has no API).
pub fn add_fallbacks(mut router: Router, running: &BTreeSet<Service>) -> Router {
    let runs = list(running);
    let message = |service: Service| -> Arc<str> {
        format!(
            "this process runs {runs}; {service} runs elsewhere: point the client at a \
             process started with --services {service} (or all)"
        )
        .into()
    };
    if !running.contains(&Service::Registry) {
        router = router.add_service(RunsElsewhere::<
            pb::registry_service_server::RegistryServiceServer<hookline_registry::RegistryApi>,
        >::new(message(Service::Registry)));
    }
    if !running.contains(&Service::Ingest) {
        router = router.add_service(RunsElsewhere::<
            pb::ingest_service_server::IngestServiceServer<hookline_ingest::IngestApi>,
        >::new(message(Service::Ingest)));
    }
    if !running.contains(&Service::Retry) {
        router = router.add_service(RunsElsewhere::<
            pb::delivery_service_server::DeliveryServiceServer<hookline_deliveries::DeliveryApi>,
        >::new(message(Service::Retry)));
    }
    router
}

fn list(services: &BTreeSet<Service>) -> String {
    services
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Stands in for the gRPC service `S` (same name, so tonic routes its calls here) and
/// answers every call with `UNIMPLEMENTED` and `message`.
struct RunsElsewhere<S> {
    message: Arc<str>,
    _service: PhantomData<fn() -> S>,
}

impl<S> RunsElsewhere<S> {
    fn new(message: Arc<str>) -> Self {
        Self {
            message,
            _service: PhantomData,
        }
    }
}

impl<S> Clone for RunsElsewhere<S> {
    fn clone(&self) -> Self {
        Self::new(self.message.clone())
    }
}

impl<S: NamedService> NamedService for RunsElsewhere<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> TowerService<Request<Body>> for RunsElsewhere<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<Body>) -> Self::Future {
        std::future::ready(Ok(
            tonic::Status::unimplemented(self.message.to_string()).into_http()
        ))
    }
}
