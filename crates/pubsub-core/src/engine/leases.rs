//! The leases of held messages, and the task that keeps them alive.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::batcher::Batcher;
use super::lock;
use super::settle::AckHandler;
use crate::driver::{AckId, ReceivedMessage};
use crate::token_map::TokenMap;

/// What acks and lease extensions carry: the backend's id and the token of
/// the lease the core keeps for it.
#[derive(Clone)]
pub(crate) struct Settle {
    pub(crate) id: AckId,
    pub(crate) token: u64,
}

/// Held messages (fetched and not settled) whose leases the core keeps
/// alive, by token.
pub(crate) struct Leases {
    pub(crate) enabled: bool,
    pub(crate) deadline: Duration,
    max_extension: Duration,
    pub(crate) held: Mutex<TokenMap<Held>>,
}

pub(crate) struct Held {
    id: AckId,
    since: Instant,
    pub(crate) expires: Instant,
}

impl Leases {
    pub(crate) fn new(enabled: bool, deadline: Duration, max_extension: Duration) -> Self {
        Leases {
            enabled,
            deadline,
            max_extension,
            held: Mutex::new(TokenMap::default()),
        }
    }

    /// Holds a fetched batch whose tokens run from `first`.
    pub(crate) fn hold(&self, batch: &[ReceivedMessage], first: u64, now: Instant) {
        if !self.enabled || batch.is_empty() {
            return;
        }
        let mut held = lock(&self.held);
        for (m, token) in batch.iter().zip(first..) {
            held.insert(
                token,
                Held {
                    id: m.ack_id.clone(),
                    since: now,
                    expires: now + self.deadline,
                },
            );
        }
    }

    #[inline]
    pub(crate) fn release(&self, tokens: impl Iterator<Item = u64>) {
        if !self.enabled {
            return;
        }
        let mut held = lock(&self.held);
        for t in tokens {
            held.remove(&t);
        }
    }

    /// Records that a held message's lease was extended by `by` from now.
    pub(crate) fn extended(&self, token: u64, by: Duration) {
        if self.enabled {
            if let Some(h) = lock(&self.held).get_mut(&token) {
                h.expires = Instant::now() + by;
            }
        }
    }

    /// Leases within half a deadline of running out, and still within the
    /// maximum extension, are due; those past the maximum are let go.
    fn due(&self, now: Instant) -> Vec<Settle> {
        let mut held = lock(&self.held);
        let mut due = Vec::new();
        held.retain(|token, h| {
            if now.saturating_duration_since(h.since) >= self.max_extension {
                return false;
            }
            if h.expires.saturating_duration_since(now) <= self.deadline / 2 {
                h.expires = now + self.deadline;
                due.push(Settle {
                    id: h.id.clone(),
                    token: *token,
                });
            }
            true
        });
        due
    }
}

/// Extends the leases that fall due until `stop` is set, then flushes the
/// extender.
pub(crate) async fn keep_leases(
    leases: Arc<Leases>,
    extender: Batcher<Settle, AckHandler>,
    mut stop: watch::Receiver<bool>,
) {
    // At least two ticks fall in the last half of every lease, however
    // short the deadline.
    let tick = (leases.deadline / 4).clamp(Duration::from_millis(1), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let due = leases.due(Instant::now());
        if !due.is_empty() {
            tracing::debug!(leases = due.len(), "extending leases of held messages");
            if extender.add_detached_many(due).is_err() {
                break;
            }
        }
    }
    extender.shutdown().await;
}
