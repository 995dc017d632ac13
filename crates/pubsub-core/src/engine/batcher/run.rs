//! One batch handed to the driver, with the retries of its temporary
//! failures.

use std::collections::VecDeque;

use super::{BatchHandler, Entry, Inner};
use crate::driver::BatchError;
use crate::error::{Error, Result};

/// Retries a temporary failure gets once shutdown has begun.
const SHUTDOWN_RETRIES: u32 = 5;

impl<T: Send + Sync + 'static, H: BatchHandler<T>> Inner<T, H> {
    /// Hands one item to the driver in the caller's task, retrying a
    /// temporary failure, and returns its result: the batch of one that a
    /// lone send makes needs no queue, reply channel or result vectors.
    pub(super) async fn run_one(&self, item: T) -> Result<()> {
        let batch = std::slice::from_ref(&item);
        let mut attempt = 0u32;
        loop {
            let e = match self.handler.handle(batch).await {
                Ok(()) => return Ok(()),
                Err(BatchError::All(e)) => e,
                Err(BatchError::Items(mut failed)) => match failed.pop() {
                    Some((_, e)) => e,
                    None => return Ok(()),
                },
            };
            if !e.is_temporary() || (attempt >= SHUTDOWN_RETRIES && self.lock().closed) {
                return Err(e);
            }
            let wait = self.retry.backoff(attempt);
            tracing::debug!(error = %e, attempt, ?wait, "retrying temporary failure");
            tokio::time::sleep(wait).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// Hands one batch to the driver, retrying temporary failures of the
    /// items that failed, and reports each item's final result. Leaves
    /// `batch` empty. Withdrawn items are dropped here, before the driver
    /// sees them.
    pub(super) async fn run(&self, batch: &mut VecDeque<Entry<T>>) {
        let mut items = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for e in batch.drain(..) {
            if e.withdrawn() {
                continue;
            }
            items.push(e.item);
            replies.push(e.reply);
        }
        if items.is_empty() {
            return;
        }
        let mut attempt = 0u32;
        loop {
            let failed = match self.handler.handle(&items).await {
                Ok(()) => Vec::new(),
                Err(BatchError::All(e)) => (0..items.len()).map(|i| (i, e.clone())).collect(),
                Err(BatchError::Items(f)) => f,
            };
            if failed.is_empty() {
                for r in replies.into_iter().flatten() {
                    let _ = r.send(Ok(()));
                }
                return;
            }
            let mut failed_at: Vec<Option<Error>> = vec![None; items.len()];
            for (i, e) in failed {
                if let Some(slot) = failed_at.get_mut(i) {
                    *slot = Some(e);
                }
            }
            let mut retry_items = Vec::new();
            let mut retry_replies = Vec::new();
            let mut last_error = None;
            for ((item, reply), failure) in items.into_iter().zip(replies).zip(failed_at) {
                match failure {
                    None => {
                        if let Some(r) = reply {
                            let _ = r.send(Ok(()));
                        }
                    }
                    // Nobody waits any more for a send that failed: the
                    // sender was never told it succeeded, so give up on it.
                    Some(_) if reply.as_ref().is_some_and(|r| r.is_closed()) => {}
                    Some(e) if e.is_temporary() => {
                        last_error = Some(e);
                        retry_items.push(item);
                        retry_replies.push(reply);
                    }
                    Some(e) => match reply {
                        Some(r) => {
                            let _ = r.send(Err(e));
                        }
                        None => self.handler.unreported_failure(e),
                    },
                }
            }
            if retry_items.is_empty() {
                return;
            }
            if attempt >= SHUTDOWN_RETRIES && self.lock().closed {
                // Shutting down must end even while the backend is away:
                // what still fails is reported, not retried for ever.
                let e = last_error.expect("a temporary failure");
                for reply in retry_replies {
                    match reply {
                        Some(r) => {
                            let _ = r.send(Err(e.clone()));
                        }
                        None => self.handler.unreported_failure(e.clone()),
                    }
                }
                return;
            }
            let wait = self.retry.backoff(attempt);
            tracing::debug!(
                error = %last_error.expect("a temporary failure"),
                attempt,
                items = retry_items.len(),
                ?wait,
                "retrying temporary failure"
            );
            tokio::time::sleep(wait).await;
            attempt = attempt.saturating_add(1);
            items = retry_items;
            replies = retry_replies;
        }
    }
}
