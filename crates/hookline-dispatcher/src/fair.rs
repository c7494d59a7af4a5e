//! The process-wide `concurrency` permits, granted fairly across lanes.
//!
//! A lane is one consumed queue (a shard queue of first attempts or retries, or an
//! unsharded queue). Tokio's semaphore serves waiters first come, first served, so a
//! shard with hundreds of admitted messages waiting would hold every newly freed permit
//! until its queue in the process is gone, and a message on another shard would wait
//! behind all of them. Here a freed permit goes to the next lane, round robin, that has
//! a waiter; within a lane waiters are served in order. With one busy lane it gets every
//! permit (work-conserving).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Fair permits; share as `Arc<FairPermits>`.
#[derive(Debug)]
pub(crate) struct FairPermits {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    available: usize,
    /// Waiters per lane, in arrival order.
    waiting: Vec<VecDeque<oneshot::Sender<()>>>,
    /// Lanes with waiters, in the order they are served next.
    turn: VecDeque<usize>,
}

/// One permit; given back (to the next lane's waiter) when dropped.
#[derive(Debug)]
pub(crate) struct FairPermit {
    permits: Arc<FairPermits>,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        self.permits.release();
    }
}

/// Gives a permit that was sent to a waiter who went away back.
struct Abandoned<'a> {
    permits: &'a Arc<FairPermits>,
    receiver: Option<oneshot::Receiver<()>>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            // Closed first: no permit can be sent after this; one sent before is here.
            receiver.close();
            if receiver.try_recv().is_ok() {
                self.permits.release();
            }
        }
    }
}

impl FairPermits {
    /// `permits` permits over `lanes` lanes.
    pub(crate) fn new(permits: usize, lanes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                available: permits,
                waiting: (0..lanes.max(1)).map(|_| VecDeque::new()).collect(),
                turn: VecDeque::new(),
            }),
        })
    }

    /// Waits for a permit for a message of `lane` (taken modulo the lane count).
    /// Cancel-safe: dropping the future gives back a permit it was granted.
    pub(crate) async fn acquire(self: &Arc<Self>, lane: usize) -> FairPermit {
        let receiver = {
            let mut state = self.lock();
            let lane = lane % state.waiting.len();
            if state.available > 0 && state.turn.is_empty() {
                state.available -= 1;
                return FairPermit {
                    permits: self.clone(),
                };
            }
            let (sender, receiver) = oneshot::channel();
            if state.waiting[lane].is_empty() {
                state.turn.push_back(lane);
            }
            state.waiting[lane].push_back(sender);
            receiver
        };
        let mut guard = Abandoned {
            permits: self,
            receiver: Some(receiver),
        };
        let granted = match guard.receiver.as_mut() {
            Some(receiver) => receiver.await.is_ok(),
            None => false,
        };
        guard.receiver = None;
        debug_assert!(granted, "a waiter's sender is only dropped after sending");
        FairPermit {
            permits: self.clone(),
        }
    }

    /// Hands a freed permit to the next lane's first live waiter, or keeps it.
    fn release(&self) {
        let mut state = self.lock();
        while let Some(lane) = state.turn.pop_front() {
            let mut granted = false;
            while let Some(waiter) = state.waiting[lane].pop_front() {
                if waiter.send(()).is_ok() {
                    granted = true;
                    break;
                }
            }
            if !state.waiting[lane].is_empty() {
                state.turn.push_back(lane);
            }
            if granted {
                return;
            }
        }
        state.available += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Permits not held now (for tests).
    #[cfg(test)]
    fn available(&self) -> usize {
        self.lock().available
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_busy_lane_does_not_delay_another() {
        let permits = FairPermits::new(2, 4);
        let held: Vec<_> = vec![permits.acquire(0).await, permits.acquire(0).await];
        // Lane 0 has hundreds waiting, then lane 3 asks for one.
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..300 {
            let (permits, done) = (permits.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let permit = permits.acquire(0).await;
                done.send(i).unwrap();
                drop(permit);
            }));
            tokio::task::yield_now().await;
        }
        let (permits3, done3) = (permits.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let permit = permits3.acquire(3).await;
            done3.send(1000).unwrap();
            drop(permit);
        }));
        tokio::task::yield_now().await;
        drop(held);
        let mut seen = Vec::new();
        for _ in 0..301 {
            seen.push(
                tokio::time::timeout(Duration::from_secs(5), order.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        let position = seen.iter().position(|i| *i == 1000).unwrap();
        assert!(position <= 2, "lane 3 was served at position {position}");
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(permits.available(), 2);
    }

    #[tokio::test]
    async fn one_busy_lane_gets_every_permit() {
        let permits = FairPermits::new(3, 8);
        let held = [
            permits.acquire(5).await,
            permits.acquire(5).await,
            permits.acquire(5).await,
        ];
        assert_eq!(permits.available(), 0);
        drop(held);
        assert_eq!(permits.available(), 3);
    }

    #[tokio::test]
    async fn an_abandoned_wait_gives_its_permit_back() {
        let permits = FairPermits::new(1, 2);
        let held = permits.acquire(0).await;
        let waiting = tokio::time::timeout(Duration::from_millis(20), permits.acquire(1)).await;
        assert!(waiting.is_err());
        drop(held);
        assert_eq!(permits.available(), 1);
        let _again = permits.acquire(1).await;
        assert_eq!(permits.available(), 0);
    }
}
