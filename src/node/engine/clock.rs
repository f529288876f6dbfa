//! When a round's collection ends if the quorum does not come first.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// When a round's collection ends if the quorum does not come first.
#[derive(Debug, Clone)]
pub enum RoundClock {
    /// `timeout` of wall time after this node published.
    Wall { timeout: Duration },
    /// Deadlines on the run's schedule: round r ends at start + (r+1)·length.
    Schedule { start: SystemTime, length: Duration },
    /// `timeout` counted only while no node's training is queued or running
    /// (the simulator's nodes share the CPU: a slow CPU must not turn into
    /// lost rounds). The receiver reports the jobs in flight.
    ComputeIdle { timeout: Duration, busy: watch::Receiver<usize> },
}

impl RoundClock {
    /// When the collection of `round`, starting now, ends in wall time, if
    /// that is known in advance.
    pub(super) fn wall_deadline(&self, round: u64) -> Option<SystemTime> {
        match self {
            RoundClock::Wall { timeout } => Some(SystemTime::now() + *timeout),
            RoundClock::Schedule { start, length } => Some(*start + *length * (round as u32 + 1)),
            RoundClock::ComputeIdle { .. } => None,
        }
    }

    /// Sleeps until the collection deadline of `round`.
    pub(super) async fn deadline(&mut self, round: u64) {
        self.share_of_deadline(round, 1).await
    }

    /// The collection deadline of `round` as a future that owns its clock
    /// (one that can be replaced by a fresh deadline).
    pub(super) fn owned_deadline(self, round: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut clock = self;
            clock.deadline(round).await;
        })
    }

    /// Sleeps half of the time left until the collection deadline of `round`.
    pub(super) async fn halfway(&mut self, round: u64) {
        self.share_of_deadline(round, 2).await
    }

    /// Sleeps 1/`parts` of the time left until the collection deadline of `round`.
    pub(super) async fn share_of_deadline(&mut self, round: u64, parts: u32) {
        match self {
            RoundClock::Wall { timeout } => tokio::time::sleep(*timeout / parts).await,
            RoundClock::Schedule { .. } => {
                let left = self.wall_deadline(round).and_then(|end| end.duration_since(SystemTime::now()).ok()).unwrap_or_default();
                tokio::time::sleep(left / parts).await;
            }
            RoundClock::ComputeIdle { timeout, .. } => {
                let share = *timeout / parts;
                self.wait(share).await
            }
        }
    }

    /// Sleeps `duration` of this clock's time (idle time for ComputeIdle).
    pub(super) async fn wait(&mut self, duration: Duration) {
        match self {
            RoundClock::Wall { .. } | RoundClock::Schedule { .. } => tokio::time::sleep(duration).await,
            RoundClock::ComputeIdle { busy, .. } => {
                let mut left = duration;
                // Bounded: every pass either ends or spends idle time.
                loop {
                    if busy.wait_for(|jobs| *jobs == 0).await.is_err() {
                        // The compute service is gone; fall back to wall time.
                        return tokio::time::sleep(left).await;
                    }
                    let started = tokio::time::Instant::now();
                    tokio::select! {
                        _ = tokio::time::sleep(left) => return,
                        _ = busy.wait_for(|jobs| *jobs > 0) => {
                            left = left.saturating_sub(started.elapsed());
                            if left.is_zero() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}
