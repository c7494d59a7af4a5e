//! Mounts the web console and tenant portal (crate `hookline-console`) on its own port.
//! It calls this process's services in process (the gate's trusted path, as REST does),
//! as the principal it admitted with the gate's own authenticator or a portal link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hookline_broker::Broker;
use hookline_console::ConsoleConfig;
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Starts serving the console on `listener` until `shutdown`; returns its address.
pub fn start(
    listener: TcpListener,
    config: &Config,
    services: tonic::service::Routes,
    auth: hookline_grpc::Authenticator,
    broker: Arc<dyn Broker>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let at = listener.local_addr()?;
    let secret = match &config.console_portal_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            let mut bytes = vec![0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            bytes
        }
    };
    let mut settings = ConsoleConfig::new(secret);
    settings.frame_ancestors = config.console_frame_ancestors.trim().to_string();
    settings.portal_max_ttl = Duration::from_secs(config.console_portal_max_ttl_secs);
    let router = hookline_console::router(settings, services, auth, broker);
    let config_max = config.console_max_connections;
    let shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        // The REST API's server: the same cap on open connections, the same graceful stop
        // (plain HTTP: TLS of the console is not a setting yet; see docs/SECURITY.md).
        let max = config_max;
        let served = hookline_rest::serve(listener, None, max, router, shutdown.clone());
        if let Err(e) = served.await {
            tracing::error!(error = %e, "the web console failed; stopping");
            shutdown.cancel();
        }
    });
    Ok((at, task))
}
