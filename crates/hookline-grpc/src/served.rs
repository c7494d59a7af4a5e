//! The connections the gRPC server serves, as one type whether they are plaintext or TLS
//! (both under the limits of [`crate::conn`]), so that `serve` has one server to run.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::conn::{ConnInfo, LimitedConn};

/// One connection of the gRPC server.
pub enum ApiConn {
    Plain(LimitedConn),
    Tls(Box<TlsStream<LimitedConn>>),
}

impl Connected for ApiConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ApiConn::Plain(c) => c.connect_info(),
            ApiConn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ApiConn::Plain($s) => $e,
            ApiConn::Tls($s) => $e,
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

/// Every connection the gRPC server serves: those accepted on `listener`, capped and
/// under deadlines by `limits`, in TLS when `tls` is set.
pub fn incoming(
    limits: &crate::conn::ConnLimits,
    listener: tokio::net::TcpListener,
    tls: Option<&crate::tls::TlsServer>,
) -> impl Stream<Item = io::Result<ApiConn>> + Send + 'static {
    let net = limits.incoming(listener);
    match tls {
        Some(tls) => tls
            .incoming(net)
            .map(|r| r.map(|s| ApiConn::Tls(Box::new(s))))
            .boxed(),
        None => net.map(|r| r.map(ApiConn::Plain)).boxed(),
    }
}
