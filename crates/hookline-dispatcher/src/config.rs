//! The dispatcher's settings, in one place so the binary can fill them from its
//! configuration and tests can shorten the timeouts.

use std::time::Duration;

/// How a dispatcher works. `Default` suits a laptop and a modest cluster node alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatcherConfig {
    /// Most HTTP requests in flight at once (over every subscription).
    pub concurrency: usize,
    /// Most unsettled messages per queue (AMQP prefetch).
    pub prefetch: u16,
    /// The whole of one request: connecting, sending, and reading the response excerpt.
    pub request_timeout: Duration,
    /// The `user-agent` of every request.
    pub user_agent: String,
    /// Most outcomes written to the store in one transaction.
    pub write_batch: usize,
    /// How long the first outcome of a batch waits for company before it is written.
    pub write_linger: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            concurrency: 512,
            prefetch: 256,
            request_timeout: Duration::from_secs(15),
            user_agent: format!("Hookline/{}", env!("CARGO_PKG_VERSION")),
            write_batch: 256,
            write_linger: Duration::from_millis(5),
        }
    }
}
