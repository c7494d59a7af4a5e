//! The part of a publish that must finish whether or not its caller waits for it.
//!
//! tonic drops a call's future when the client hangs up (a timeout, a closed
//! connection). If storing the events and queueing their deliveries ran inside that
//! future, a hang-up between the commit and the publisher confirm would leave committed
//! deliveries to the outbox relay: late by its grace period, and sometimes queued twice.
//! So a publish runs its store-and-queue step as a task of its own: the caller awaits
//! its answer but dropping the caller does not cancel it. A semaphore bounds how many
//! such tasks run at once (the caller waits for a place, before anything is stored),
//! and a [`TaskTracker`] lets a graceful shutdown wait until every one has finished.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs work detached from its caller, at most a fixed number at once. Cheap to clone.
#[derive(Clone)]
pub struct Detached {
    places: Arc<Semaphore>,
    tracker: TaskTracker,
}

/// Why detached work gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum DetachedError {
    #[error("the ingest service is stopping")]
    Closed,
    #[error("the work failed unexpectedly: {0}")]
    Failed(#[from] tokio::task::JoinError),
}

impl Detached {
    /// At most `max_in_flight` (at least 1) pieces of work at once.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            places: Arc::new(Semaphore::new(max_in_flight.max(1))),
            tracker: TaskTracker::new(),
        }
    }

    /// Waits for a place, then runs `work` in a task of its own and returns its output.
    /// Dropping the returned future before then does not cancel `work` once it started.
    pub async fn run<T, F>(&self, work: F) -> Result<T, DetachedError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| DetachedError::Closed)?;
        let task = self.tracker.spawn(async move {
            let output = work.await;
            drop(place);
            output
        });
        Ok(task.await?)
    }

    /// How many pieces of work run now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// A task that, once `shutdown` is cancelled, waits until every piece of work that
    /// started has finished (work may still start while the server drains its calls).
    pub fn finish_on(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let tracker = self.tracker.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracker.close();
            tracker.wait().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn work_goes_on_when_its_caller_is_dropped() {
        let detached = Detached::new(2);
        let (release, released) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel::<u32>();
        let caller = detached.run(async move {
            let _ = released.await;
            let _ = done.send(7);
        });
        // The caller starts the work, then hangs up.
        let dropped = tokio::time::timeout(Duration::from_millis(50), caller).await;
        assert!(dropped.is_err(), "the work waits for its release");
        assert_eq!(detached.in_flight(), 1);
        release.send(()).unwrap();
        assert_eq!(finished.await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_shutdown_waits_for_work_that_started() {
        let detached = Detached::new(1);
        let (release, released) = oneshot::channel::<()>();
        let d = detached.clone();
        let caller =
            tokio::spawn(async move { d.run(async move { released.await.is_ok() }).await });
        while detached.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let shutdown = CancellationToken::new();
        let finishing = detached.finish_on(shutdown.clone());
        shutdown.cancel();
        tokio::task::yield_now().await;
        assert!(!finishing.is_finished(), "the shutdown waits for the work");
        release.send(()).unwrap();
        finishing.await.unwrap();
        assert!(caller.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn no_more_than_the_bound_runs_at_once() {
        let detached = Detached::new(1);
        let (release, released) = oneshot::channel::<()>();
        let d = detached.clone();
        let first = tokio::spawn(async move { d.run(async move { released.await.is_ok() }).await });
        while detached.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let second =
            tokio::time::timeout(Duration::from_millis(50), detached.run(async { 1 })).await;
        assert!(second.is_err(), "the second waits for a place");
        release.send(()).unwrap();
        assert!(first.await.unwrap().unwrap());
        assert_eq!(detached.run(async { 1 }).await.unwrap(), 1);
    }
}
