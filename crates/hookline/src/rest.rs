//! Mounts the REST/JSON API (crate `hookline-rest`) on its own port, calling the gRPC
//! services of this process in process: one implementation of every rule, one gate.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Starts serving the REST API on `listener` until `shutdown`; returns its address.
pub fn start(
    listener: TcpListener,
    services: tonic::service::Routes,
    max_connections: usize,
    auth: hookline_grpc::Authenticator,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let at = listener.local_addr()?;
    let router = hookline_rest::router(services, auth)?;
    let shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) =
            hookline_rest::serve(listener, max_connections, router, shutdown.clone()).await
        {
            tracing::error!(error = %e, "the REST API failed; stopping");
            shutdown.cancel();
        }
    });
    Ok((at, task))
}
