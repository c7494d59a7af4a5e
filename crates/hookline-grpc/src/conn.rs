//! Limits on every connection, before anyone is authenticated: at most `max_connections`
//! open at once (beyond that a new connection is closed as soon as it is accepted), and
//! a deadline by which a connection must have sent one complete request (a connection
//! that sends nothing, only the HTTP/2 preface, or headers without a body is closed when
//! it passes). The HTTP/2 settings (streams per connection, keepalive) are on tonic's
//! server builder, see [`ConnLimits::apply`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::transport::server::Connected;

use crate::body::CheckedBody;
pub use crate::body::ConnState;

/// The connection settings; see the `grpc_*` settings.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most connections open at once in this process.
    pub max_connections: usize,
    /// By when a new connection must have sent one complete request.
    pub first_request_timeout: Duration,
    /// Most concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// How often an idle connection is pinged, and how long the answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            first_request_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnLimits {
    /// The HTTP/2 settings on a tonic server builder.
    pub fn apply<L>(&self, builder: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
        builder
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
    }

    /// The accepted connections of `listener`, capped and each under the first-request
    /// deadline.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<LimitedConn>> + Send + 'static {
        let open = Arc::new(Semaphore::new(self.max_connections));
        let max = self.max_connections;
        let deadline = self.first_request_timeout;
        tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| {
            let open = open.clone();
            async move {
                let stream = match accepted {
                    Ok(s) => s,
                    // A failed accept (e.g. out of file descriptors) is not the end of
                    // the listener; tonic logs and goes on.
                    Err(e) => return Some(Err(e)),
                };
                let Ok(permit) = open.try_acquire_owned() else {
                    metrics::counter!("hookline_grpc_connections_refused_total").increment(1);
                    tracing::debug!(
                        peer = ?stream.peer_addr().ok(),
                        "connection refused: {max} connections are open (setting grpc_max_connections)"
                    );
                    return None; // dropping the socket closes it
                };
                let _ = stream.set_nodelay(true);
                Some(Ok(LimitedConn::new(stream, permit, deadline)))
            }
        })
    }
}

/// In every request's extensions: the connection it came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
    pub state: Arc<ConnState>,
}

/// An accepted connection: holds its slot under the cap, and fails reads once the
/// first-request deadline passes without a complete request.
pub struct LimitedConn {
    stream: TcpStream,
    info: ConnInfo,
    deadline: Option<Pin<Box<Sleep>>>,
    _permit: OwnedSemaphorePermit,
}

impl LimitedConn {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, deadline: Duration) -> Self {
        Self {
            info: ConnInfo {
                remote_addr: stream.peer_addr().ok(),
                state: Arc::default(),
            },
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(deadline))),
            _permit: permit,
        }
    }

    /// `Err` once the deadline passed with no complete request; clears it after one.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(deadline) = &mut self.deadline else {
            return Ok(());
        };
        if self.info.state.has_completed_request() {
            self.deadline = None;
            return Ok(());
        }
        if deadline.as_mut().poll(cx).is_ready() {
            metrics::counter!("hookline_grpc_connections_timed_out_total").increment(1);
            tracing::debug!(peer = ?self.info.remote_addr, "connection closed: no complete request before the deadline (setting grpc_first_request_timeout_ms)");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request before the first-request deadline",
            ));
        }
        Ok(())
    }
}

impl Connected for LimitedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A server-wide layer that tells a request's connection when its body was read to the
/// end, which lifts the connection's first-request deadline.
#[derive(Debug, Clone, Default)]
pub struct CompletionLayer;

impl<S> tower_layer::Layer<S> for CompletionLayer {
    type Service = Completion<S>;

    fn layer(&self, inner: S) -> Completion<S> {
        Completion { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Completion<S> {
    inner: S,
}

impl<S> tower_service::Service<http::Request<Body>> for Completion<S>
where
    S: tower_service::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> S::Future {
        let mut state = req
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.state.clone());
        if let Some(conn) = &state
            && http_body::Body::is_end_stream(req.body())
        {
            // Headers that end the stream: a complete request with no body to read.
            conn.request_completed();
            state = None;
        }
        self.inner
            .call(req.map(|body| Body::new(CheckedBody::new(body, None, state))))
    }
}
