//! One batch handed to the driver, with the retries of its temporary
//! failures.

use std::collections::VecDeque;
use std::future::Future;
use std::task::Poll;

use super::{BatchHandler, Entry, Inner};
use crate::driver::BatchError;
use crate::error::{Error, Result};

/// Retries a temporary failure gets once shutdown has begun.
const SHUTDOWN_RETRIES: u32 = 5;

impl<T: Send + Sync + 'static, H: BatchHandler<T>> Inner<T, H> {
    /// Hands one item to the driver in the caller's task, retrying a
    /// temporary failure, and returns its result: the batch of one that a
    /// lone send makes needs no queue, reply channel or result vectors.
    pub(super) async fn run_one(&self, item: &T) -> Result<()> {
        let batch = std::slice::from_ref(item);
        // The retry limit counts from before the first attempt. A first
        // attempt that completes when first polled took no time, so the
        // clock is read only when it does not, or when it failed: a lone
        // in-memory send then reads no clock (a fortieth of its time).
        let (mut outcome, mut started) = {
            let mut call = std::pin::pin!(self.handler.handle(batch));
            match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
                Poll::Ready(outcome) => (outcome, None),
                Poll::Pending => {
                    let started = self.retry.started();
                    (call.await, started)
                }
            }
        };
        let mut attempt = 0u32;
        loop {
            let e = match outcome {
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
            if started.is_none() {
                started = self.retry.started();
            }
            let wait = self.retry.backoff(attempt);
            if let Some(gave_up) = self.retry.give_up(started, wait, attempt + 1, &e) {
                return Err(gave_up);
            }
            tracing::debug!(error = %e, attempt, ?wait, "retrying temporary failure");
            self.handler.retrying();
            tokio::time::sleep(wait).await;
            attempt = attempt.saturating_add(1);
            outcome = self.handler.handle(batch).await;
        }
    }

    /// Hands one batch to the driver, retrying temporary failures of the
    /// items that failed, and reports each item's final result. Leaves
    /// `batch` empty. Withdrawn items are dropped here, before the driver
    /// sees them. Where calls refill, `answered_at` gets the count of items
    /// queued so far as the first call's results are about to be reported.
    pub(super) async fn run(&self, batch: &mut VecDeque<Entry<T>>, answered_at: &mut Option<u64>) {
        let mut items = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for e in batch.drain(..) {
            if e.withdrawn() {
                continue;
            }
            items.push(e.item);
            replies.push((e.reply, e.queued));
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
            if self.limits.refill && answered_at.is_none() {
                *answered_at = Some(self.lock().added);
            }
            if failed.is_empty() {
                for (r, _) in replies {
                    self.report(r, Ok(()));
                }
                return;
            }
            let mut failed_at: Vec<Option<Error>> = vec![None; items.len()];
            for (i, e) in failed {
                if let Some(slot) = failed_at.get_mut(i) {
                    *slot = Some(e);
                }
            }
            let shutting_down = attempt >= SHUTDOWN_RETRIES && self.lock().closed;
            let wait = self.retry.backoff(attempt);
            let mut retry_items = Vec::new();
            let mut retry_replies = Vec::new();
            let mut last_error = None;
            for ((item, (reply, queued)), failure) in items.into_iter().zip(replies).zip(failed_at)
            {
                match failure {
                    None => self.report(reply, Ok(())),
                    // Nobody waits any more for a send that failed: the
                    // sender was never told it succeeded, so give up on it.
                    Some(_) if reply.as_ref().is_some_and(|r| r.is_closed()) => {}
                    // Shutting down must end even while the backend is
                    // away: what still fails is reported, not retried for
                    // ever.
                    Some(e) if e.is_temporary() && shutting_down => self.report(reply, Err(e)),
                    Some(e) if e.is_temporary() => {
                        match self.retry.give_up(queued, wait, attempt + 1, &e) {
                            Some(g) => self.report(reply, Err(g)),
                            None => {
                                last_error = Some(e);
                                retry_items.push(item);
                                retry_replies.push((reply, queued));
                            }
                        }
                    }
                    Some(e) => self.report(reply, Err(e)),
                }
            }
            let Some(last_error) = last_error else {
                return;
            };
            tracing::debug!(
                error = %last_error,
                attempt,
                items = retry_items.len(),
                ?wait,
                "retrying temporary failure"
            );
            self.handler.retrying();
            tokio::time::sleep(wait).await;
            attempt = attempt.saturating_add(1);
            items = retry_items;
            replies = retry_replies;
        }
    }

    /// Tells an item's sender its result, or the handler a failure nobody
    /// waits for.
    fn report(&self, reply: Option<tokio::sync::oneshot::Sender<Result<()>>>, r: Result<()>) {
        match (reply, r) {
            (Some(tx), r) => {
                let _ = tx.send(r);
            }
            (None, Err(e)) => self.handler.unreported_failure(e),
            (None, Ok(())) => {}
        }
    }
}
