//! How a process stops: the first SIGTERM or Ctrl-C cancels a token every task watches
//! (open streams end with `UNAVAILABLE: server shutting down`, in-flight deliveries get
//! the drain), everything is awaited within a bound, and a second signal exits at once.

use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backends::AnyStore;
use crate::stdout::announce;

/// Cancels `token` on the first SIGTERM or Ctrl-C, and exits the process on the second.
pub fn on_signal(token: CancellationToken, drain: Duration) {
    tokio::spawn(async move {
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM and Ctrl-C");
                return;
            }
        };
        let first = signals.next().await;
        // Machine-readable, like the `listening` lines.
        announce(&format!(
            "hookline: shutting down on {first}; in-flight deliveries get up to {}s; \
             a second signal exits at once",
            drain.as_secs()
        ));
        tracing::info!(signal = first, "shutting down");
        token.cancel();
        let second = signals.next().await;
        eprintln!(
            "hookline: {second} again: exiting at once; deliveries not yet recorded are \
             delivered again after a restart"
        );
        std::process::exit(exit_code(second));
    });
}

/// The status of a process ended by `signal`, as a shell reports it (128 + number).
fn exit_code(signal: &str) -> i32 {
    match signal {
        "SIGTERM" => 128 + 15,
        _ => 128 + 2,
    }
}

/// SIGTERM and SIGINT (Ctrl-C), as one stream of their names.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// The servers of a process, running.
pub struct Servers {
    pub grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    pub admin: JoinHandle<std::io::Result<()>>,
}

/// Waits until `shutdown` (or until a server fails, which cancels it), then for the
/// servers, the `tasks` and the store to stop, for at most `bound` after the stop began.
/// Past the bound it returns anyway: whatever was not acknowledged is delivered again.
pub async fn stop_within(
    bound: Duration,
    mut servers: Servers,
    tasks: Vec<JoinHandle<()>>,
    store: &AnyStore,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // The gRPC server ends before the stop only by failing.
    let failed = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut servers.grpc => Some(result),
    };
    shutdown.cancel();
    let stopped = tokio::time::timeout(bound, async {
        let grpc = match failed {
            Some(result) => result,
            None => servers.grpc.await,
        };
        let admin = servers.admin.await;
        // The workers finish what they hold (the dispatcher records in-flight outcomes).
        for task in tasks {
            let _ = task.await;
        }
        store.close().await;
        (grpc, admin)
    })
    .await;
    let Ok((grpc, admin)) = stopped else {
        tracing::warn!(
            ?bound,
            "did not stop in time; exiting anyway (unacknowledged work is delivered again)"
        );
        return Ok(());
    };
    grpc.context("gRPC server task failed")?
        .context("gRPC server failed")?;
    admin
        .context("admin server task failed")?
        .context("admin server failed")?;
    tracing::info!("stopped");
    Ok(())
}
