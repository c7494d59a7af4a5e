//! Mounts the REST/JSON API (crate `hookline-rest`) on its own port, calling the gRPC
//! API of this process through an in-process connection: one implementation of every
//! rule, one auth gate, whatever TLS the gRPC port requires.

use std::net::SocketAddr;

use hookline_grpc::tls::TlsServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Starts serving the REST API on `listener` until `shutdown`; returns its address.
pub fn start(
    listener: TcpListener,
    tls: Option<TlsServer>,
    channel: tonic::transport::Channel,
    max_connections: usize,
    auth: hookline_grpc::Authenticator,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let at = listener.local_addr()?;
    let router = hookline_rest::router(channel, auth)?;
    let shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) =
            hookline_rest::serve(listener, tls, max_connections, router, shutdown.clone()).await
        {
            tracing::error!(error = %e, "the REST API failed; stopping");
            shutdown.cancel();
        }
    });
    Ok((at, task))
}
