//! Mounts the REST/JSON API (crate `hookline-rest`) on its own port, calling the gRPC
//! API of this process over loopback: one implementation of every rule, one auth gate.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Starts serving the REST API on `listener` until `shutdown`; returns its address.
pub fn start(
    listener: TcpListener,
    grpc: SocketAddr,
    max_connections: usize,
    auth: hookline_grpc::Authenticator,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let at = listener.local_addr()?;
    let target = loopback_of(grpc);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .context("the gRPC address as a URI")?
        .connect_lazy();
    let router = hookline_rest::router(channel, auth)?;
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

/// `addr`, with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
fn loopback_of(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => ([127, 0, 0, 1], addr.port()).into(),
        ip if ip.is_unspecified() => (std::net::Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}
