//! Writes circuit-breaker transitions to the store, so users see them.
//!
//! A circuit lives in its dispatcher's memory ([`crate::circuit`]); without this, only
//! the log and metrics would say why a subscription's deliveries wait. Each transition
//! sets the subscription's `circuit_open_until` (opened: now + cool-down; closed:
//! none), which `subscriptions get` and `deliveries retry` show. Writes are rare (one per
//! transition), go through one task in order (an opening never overtakes the closing
//! after it), and are best effort: a lost write only leaves a time that passes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_store::port::RegistryStore;
use tokio::sync::mpsc;

/// Transitions waiting to be written; beyond this many, new ones are dropped (logged).
const QUEUE: usize = 1024;

/// Hands transitions to the writing task.
#[derive(Clone)]
pub(crate) struct CircuitRecorder {
    tx: mpsc::Sender<(Id, Option<DateTime<Utc>>)>,
}

impl CircuitRecorder {
    /// Starts the writing task; it ends when every recorder is dropped.
    pub(crate) fn spawn(registry: Arc<dyn RegistryStore>) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Id, Option<DateTime<Utc>>)>(QUEUE);
        tokio::spawn(async move {
            while let Some((id, until)) = rx.recv().await {
                if let Err(e) = registry.set_circuit_open_until(&id, until).await {
                    tracing::warn!(subscription_id = %id, error = %e, "could not record the circuit state");
                }
            }
        });
        Self { tx }
    }

    /// The circuit of `id` opened (or opened again) for `cool_down`.
    pub(crate) fn opened(&self, id: &Id, cool_down: Duration) {
        let until = chrono::Duration::from_std(cool_down)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d));
        self.send(id, until);
    }

    /// The circuit of `id` closed.
    pub(crate) fn closed(&self, id: &Id) {
        self.send(id, None);
    }

    fn send(&self, id: &Id, until: Option<DateTime<Utc>>) {
        if self.tx.try_send((id.clone(), until)).is_err() {
            tracing::warn!(subscription_id = %id, "circuit state not recorded: too many waiting");
        }
    }
}
