//! At most a set number of REST connections open at once: beyond it a new connection is
//! closed as soon as it is accepted, so clients that hold connections open cannot
//! exhaust the process's file descriptors or memory.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listener that holds one permit per open connection.
pub struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
}

impl CappedListener {
    pub fn new(inner: TcpListener, max_connections: usize) -> Self {
        let max = max_connections.max(1);
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedConn, SocketAddr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    return (
                        CappedConn {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(_) => {
                    tracing::warn!(%addr, max = self.max, "REST connection refused: too many open (rest_max_connections)");
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection; its permit is returned when it closes.
pub struct CappedConn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for CappedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedConn {
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
}
