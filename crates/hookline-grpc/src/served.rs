//! The connections the gRPC server serves, as one type: from the network in plaintext
//! or TLS (both under the limits of [`crate::conn`]), or from inside the process (the
//! REST API's calls, through an in-memory pipe: they need neither TLS nor a client
//! certificate, and reach the gRPC services however the network port is secured).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::conn::{ConnInfo, LimitedConn};

/// One connection of the gRPC server.
pub enum ApiConn {
    Plain(LimitedConn),
    Tls(Box<TlsStream<LimitedConn>>),
    Local(DuplexStream),
}

impl Connected for ApiConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ApiConn::Plain(c) => c.connect_info(),
            ApiConn::Tls(s) => s.get_ref().0.connect_info(),
            ApiConn::Local(_) => ConnInfo {
                remote_addr: None,
                state: Default::default(),
            },
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ApiConn::Plain($s) => $e,
            ApiConn::Tls($s) => $e,
            ApiConn::Local($s) => $e,
        }
    };
}

impl AsyncRead for ApiConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The sending side of the in-process connections: a tonic connector.
#[derive(Clone, Debug)]
pub struct LocalConnector {
    to_server: mpsc::Sender<DuplexStream>,
}

/// Bytes buffered each way in one in-process connection.
const LOCAL_PIPE_BYTES: usize = 256 * 1024;

impl LocalConnector {
    /// A connector and the stream of connections it makes, to serve beside the network.
    pub fn new() -> (
        Self,
        impl Stream<Item = io::Result<ApiConn>> + Send + 'static,
    ) {
        let (to_server, from_clients) = mpsc::channel(16);
        let incoming = tokio_stream::wrappers::ReceiverStream::new(from_clients)
            .map(|s| Ok(ApiConn::Local(s)));
        (Self { to_server }, incoming)
    }

    /// A lazily connecting channel to the server that serves this connector's stream.
    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_static("http://in-process.invalid")
            .connect_with_connector_lazy(self.clone())
    }
}

impl tower_service::Service<http::Uri> for LocalConnector {
    type Response = TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let to_server = self.to_server.clone();
        Box::pin(async move {
            let (client, server) = tokio::io::duplex(LOCAL_PIPE_BYTES);
            to_server.send(server).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the gRPC server has stopped",
                )
            })?;
            Ok(TokioIo::new(client))
        })
    }
}

/// Every connection the gRPC server serves: those accepted on `listener` (capped and
/// under deadlines by `limits`, in TLS when `tls` is set) and those of `local`.
pub fn incoming(
    limits: &crate::conn::ConnLimits,
    listener: tokio::net::TcpListener,
    tls: Option<&crate::tls::TlsServer>,
    local: impl Stream<Item = io::Result<ApiConn>> + Send + 'static,
) -> impl Stream<Item = io::Result<ApiConn>> + Send + 'static {
    let net = limits.incoming(listener);
    let net = match tls {
        Some(tls) => tls
            .incoming(net)
            .map(|r| r.map(|s| ApiConn::Tls(Box::new(s))))
            .boxed(),
        None => net.map(|r| r.map(ApiConn::Plain)).boxed(),
    };
    futures::stream::select(net, local)
}
