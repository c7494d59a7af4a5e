//! The client against a real gRPC server on a local port whose ingest answers
//! `UNAVAILABLE` a set number of times: a publish is sent again with the same
//! idempotency key until it is accepted, a rejected one is not sent again, and a batch
//! larger than one call is split.

use std::sync::{Arc, Mutex};

use hookline_client::{Client, Error, Event, RetryPolicy, pb};
use pb::ingest_service_server::{IngestService, IngestServiceServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

/// Fails the first `unavailable` calls, then accepts; records every call's keys.
#[derive(Default, Clone)]
struct Flaky {
    unavailable: usize,
    reject: bool,
    calls: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Flaky {
    fn answer(&self, keys: Vec<String>) -> Result<Vec<pb::PublishResponse>, Status> {
        let mut calls = self.calls.lock().unwrap();
        calls.push(keys.clone());
        if self.reject {
            return Err(Status::invalid_argument("event_type: not valid"));
        }
        if calls.len() <= self.unavailable {
            return Err(Status::unavailable("server shutting down"));
        }
        Ok(keys
            .iter()
            .map(|k| pb::PublishResponse {
                event_id: format!("evt_{k}"),
                deliveries_created: 1,
                duplicate: false,
            })
            .collect())
    }
}

#[tonic::async_trait]
impl IngestService for Flaky {
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let key = req.into_inner().idempotency_key;
        let mut res = self.answer(vec![key])?;
        Ok(Response::new(res.remove(0)))
    }

    async fn publish_batch(
        &self,
        req: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let keys = req
            .into_inner()
            .events
            .into_iter()
            .map(|e| e.idempotency_key)
            .collect();
        Ok(Response::new(pb::PublishBatchResponse {
            results: self.answer(keys)?,
        }))
    }

    async fn get_event(
        &self,
        _: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn list_events(
        &self,
        _: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn client_of(flaky: Flaky) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServiceServer::new(flaky))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let fast = RetryPolicy {
        max_retries: 3,
        first_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(5),
    };
    Client::builder(addr.to_string())
        .token("hl_test")
        .retry(fast)
        .connect()
        .await
        .expect("connect to the test server")
}

/// One publish to a server answering like `flaky`; the answer and the keys of every call.
async fn publish_to(flaky: Flaky) -> (Result<pb::PublishResponse, Error>, Vec<Vec<String>>) {
    let client = client_of(flaky.clone()).await;
    let res = client.publish(Event::new("ten_x", "a.b", "{}")).await;
    let calls = flaky.calls.lock().unwrap().clone();
    (res, calls)
}

#[tokio::test]
async fn unavailable_is_retried_with_the_same_idempotency_key() {
    let (res, calls) = publish_to(Flaky {
        unavailable: 2,
        ..Flaky::default()
    })
    .await;
    let res = res.expect("accepted on the third try");
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c == &calls[0]), "{calls:?}");
    assert_eq!(res.event_id, format!("evt_{}", calls[0][0]));
}

#[tokio::test]
async fn a_rejected_request_is_not_sent_again_and_says_so() {
    let (res, calls) = publish_to(Flaky {
        reject: true,
        ..Flaky::default()
    })
    .await;
    let err = res.expect_err("rejected");
    assert!(!err.is_retryable());
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert_eq!(calls.len(), 1);
}

#[tokio::test]
async fn retries_end_and_the_outage_is_reported_as_retryable() {
    let (res, calls) = publish_to(Flaky {
        unavailable: usize::MAX,
        ..Flaky::default()
    })
    .await;
    let err = res.expect_err("never accepted");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(calls.len(), 4, "the first try and 3 retries");
}

#[tokio::test]
async fn a_large_batch_is_split_into_calls_of_at_most_max_batch() {
    let flaky = Flaky::default();
    let client = client_of(flaky.clone()).await;
    let events = (0..1500).map(|i| Event::new("ten_x", "a.b", format!("{{\"i\":{i}}}")));
    let results = client.publish_batch(events).await.expect("accepted");
    assert_eq!(results.len(), 1500);
    let calls = flaky.calls.lock().unwrap().clone();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [hookline_client::MAX_BATCH, 500]);
}
