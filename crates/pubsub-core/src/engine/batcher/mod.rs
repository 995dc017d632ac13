//! The one batcher behind sends, acks, nacks and lease extensions.
//!
//! Items wait in a queue. Whenever fewer than `max_handlers` driver calls are
//! in flight and at least `min_batch_size` items wait, a handler task takes
//! up to `max_batch_size` items (and `max_batch_bytes`) and hands them to the
//! driver. So a lone item leaves at once, and batches form by themselves
//! while the handlers are busy: no timer ever delays a send. Where calls
//! have a fixed cost a request, `BatchLimits::refill` has a handler wait a
//! moment for the senders it answered, and a second call start only for a
//! full batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::future::Future;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Notify};

use crate::driver::{BatchError, BatchLimits};
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;

mod run;

/// Below this, a handler lets the scheduler run once before it takes the
/// next batch.
const SMALL_BATCH: usize = 64;

/// Where a batch goes. Implemented by the topic and subscription engines
/// around a driver call. A type parameter of the batcher rather than a trait
/// object, so that its future needs no box a batch.
pub(crate) trait BatchHandler<T>: Send + Sync + 'static {
    fn handle(&self, batch: &[T]) -> impl Future<Output = Result<(), BatchError>> + Send;

    /// Called with the final error of an item nobody waits for (acks).
    fn unreported_failure(&self, error: Error) {
        tracing::warn!(%error, "batched operation failed");
    }

    /// Called before each retry of a call's temporary failure.
    fn retrying(&self) {}
}

/// The receiving half of one item's result. Dropping it before the item has
/// been handed to the driver withdraws the item.
#[cfg(test)]
pub(crate) type Reply = oneshot::Receiver<Result<()>>;

pub(crate) struct Batcher<T: Send + Sync + 'static, H: BatchHandler<T>> {
    inner: Arc<Inner<T, H>>,
}

impl<T: Send + Sync + 'static, H: BatchHandler<T>> Clone for Batcher<T, H> {
    fn clone(&self) -> Self {
        Batcher {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T, H> {
    limits: BatchLimits,
    retry: RetryPolicy,
    handler: Arc<H>,
    state: Mutex<State<T>>,
    idle: Notify,
    /// Cuts short a handler's linger when shutdown begins.
    flush: Notify,
    runtime: Handle,
}

struct State<T> {
    pending: VecDeque<Entry<T>>,
    /// The sizes of `pending`'s items summed, withdrawn ones included, so
    /// a queue that fits one batch is taken whole without a walk.
    pending_bytes: usize,
    /// An emptied batch's buffer, to become `pending` when a handler next
    /// takes everything, so a stream of items does not regrow one.
    spare: VecDeque<Entry<T>>,
    active: usize,
    /// Items queued so far (wrapping): where calls refill, how a handler
    /// counts the items that came back after its call.
    added: u64,
    /// Set by `shutdown`: send what waits even below the minimum.
    flushing: bool,
    /// Set by `shutdown` before it waits on `idle`, so that only then does
    /// going idle wake anyone (the notifier takes a lock of its own, on
    /// every lone send otherwise).
    closed: bool,
}

struct Entry<T> {
    item: T,
    size: usize,
    reply: Option<oneshot::Sender<Result<()>>>,
    /// When it was queued, where retrying it has a time limit: the limit
    /// counts from here, so time spent waiting for a handler counts too.
    queued: Option<tokio::time::Instant>,
}

impl<T> Entry<T> {
    fn withdrawn(&self) -> bool {
        self.reply.as_ref().is_some_and(|r| r.is_closed())
    }
}

impl<T: Send + Sync + 'static, H: BatchHandler<T>> Batcher<T, H> {
    /// Must be called inside a Tokio runtime: handlers are spawned on it.
    pub(crate) fn new(limits: BatchLimits, retry: RetryPolicy, handler: Arc<H>) -> Self {
        let limits = BatchLimits {
            max_batch_size: limits.max_batch_size.max(1),
            min_batch_size: limits.min_batch_size.clamp(1, limits.max_batch_size.max(1)),
            max_batch_bytes: limits.max_batch_bytes,
            max_handlers: limits.max_handlers.max(1),
            linger: limits.linger.filter(|d| !d.is_zero()),
            refill: limits.refill,
        };
        Batcher {
            inner: Arc::new(Inner {
                limits,
                retry,
                handler,
                state: Mutex::new(State {
                    pending: VecDeque::new(),
                    pending_bytes: 0,
                    spare: VecDeque::new(),
                    active: 0,
                    added: 0,
                    flushing: false,
                    closed: false,
                }),
                idle: Notify::new(),
                flush: Notify::new(),
                runtime: Handle::current(),
            }),
        }
    }

    /// Queues an item whose result someone awaits.
    #[cfg(test)]
    pub(crate) fn add(&self, item: T, size: usize) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        self.push(Entry {
            item,
            size,
            reply: Some(tx),
            queued: self.queued_at(),
        })?;
        Ok(rx)
    }

    /// Sends an item and waits for its result. When a handler slot is free
    /// and nothing waits, the caller's own task makes the driver call: a
    /// lone send then costs no task spawn or cross-task wake-up. Otherwise
    /// the item queues for the next batch, and dropping the future before
    /// that batch leaves withdraws it.
    pub(crate) async fn send(&self, item: T, size: usize) -> Result<()> {
        // A send the driver takes at once never waits, so a task sending in
        // a loop would keep its worker from every other task (receivers
        // included) until it stopped: it yields when its budget is spent,
        // as a send on a Tokio channel does.
        tokio::task::consume_budget().await;
        let mut item = Some(item);
        let inline = {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(Error::failed_precondition("topic has been shut down"));
            }
            // A linger asks every item to wait for company, the first too.
            if st.active < self.inner.limits.max_handlers
                && (st.active == 0 || !self.inner.limits.refill)
                && st.pending.is_empty()
                && self.inner.limits.min_batch_size <= 1
                && self.inner.limits.linger.is_none()
            {
                st.active += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.added = st.added.wrapping_add(1);
                st.pending_bytes += size;
                st.pending.push_back(Entry {
                    item: item.take().expect("not yet moved"),
                    size,
                    reply: Some(tx),
                    queued: self.queued_at(),
                });
                self.start_handlers(&mut st);
                Some(rx)
            }
        };
        let reply = match inline {
            Some(rx) => rx,
            None => {
                // Releases the slot however this future ends, including
                // being dropped mid-call.
                let _slot = Slot(self);
                // By reference: the item stays where it is instead of
                // being moved into a second future.
                return self
                    .inner
                    .run_one(item.as_ref().expect("not yet moved"))
                    .await;
            }
        };
        match reply.await {
            Ok(result) => result,
            Err(_) => Err(Error::internal(
                "the batch holding this message was abandoned: a driver or hook panicked, or the runtime is shutting down",
            )),
        }
    }

    /// Queues an item nobody waits for; its failure goes to the handler's
    /// `unreported_failure`.
    pub(crate) fn add_detached(&self, item: T, size: usize) -> Result<()> {
        self.push(Entry {
            item,
            size,
            reply: None,
            queued: self.queued_at(),
        })
    }

    /// Queues several detached items under one lock.
    pub(crate) fn add_detached_many(&self, items: impl IntoIterator<Item = T>) -> Result<()> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(Error::failed_precondition("already shut down"));
        }
        let queued = self.queued_at();
        let before = st.pending.len();
        st.pending.extend(items.into_iter().map(|item| Entry {
            item,
            size: 0,
            reply: None,
            queued,
        }));
        let n = st.pending.len() - before;
        st.added = st.added.wrapping_add(n as u64);
        self.start_handlers(&mut st);
        Ok(())
    }

    /// The time an item queued now is counted from, if its retries have a
    /// limit.
    fn queued_at(&self) -> Option<tokio::time::Instant> {
        self.inner.retry.started()
    }

    fn push(&self, entry: Entry<T>) -> Result<()> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(Error::failed_precondition("already shut down"));
        }
        st.added = st.added.wrapping_add(1);
        st.pending_bytes += entry.size;
        st.pending.push_back(entry);
        self.start_handlers(&mut st);
        Ok(())
    }

    fn start_handlers(&self, st: &mut State<T>) {
        while self.inner.may_start(st) {
            self.inner.spawn_handler(st);
        }
    }

    /// Refuses new items, sends everything queued (even below the minimum
    /// batch size) and waits until no call is in flight.
    pub(crate) async fn shutdown(&self) {
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            {
                let mut st = self.inner.lock();
                st.closed = true;
                st.flushing = true;
                self.inner.flush.notify_waiters();
                self.start_handlers(&mut st);
                if st.active == 0 && st.pending.is_empty() {
                    return;
                }
                idle.as_mut().enable();
            }
            idle.await;
        }
    }
}

/// A handler slot taken by an inline send.
struct Slot<'a, T: Send + Sync + 'static, H: BatchHandler<T>>(&'a Batcher<T, H>);

impl<T: Send + Sync + 'static, H: BatchHandler<T>> Drop for Slot<'_, T, H> {
    fn drop(&mut self) {
        let mut st = self.0.inner.lock();
        st.active -= 1;
        self.0.start_handlers(&mut st);
        if st.closed && st.active == 0 && st.pending.is_empty() {
            self.0.inner.idle.notify_waiters();
        }
    }
}

impl<T: Send + Sync + 'static, H: BatchHandler<T>> Inner<T, H> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the queue half-updated
        // in a way that matters more than losing the process, so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ready(&self, st: &State<T>) -> bool {
        let min = self.limits.min_batch_size;
        if st.pending.is_empty() {
            return false;
        }
        if st.flushing || min <= 1 {
            return true;
        }
        // Withdrawn items must not make up the minimum: only live ones
        // count, and only as far as the minimum needs.
        st.pending.len() >= min
            && st
                .pending
                .iter()
                .filter(|e| !e.withdrawn())
                .take(min)
                .count()
                >= min
    }

    /// Whether another call may start now: a slot is free and a batch is
    /// ready. Where calls refill, a call beyond the first starts only for a
    /// full batch: a fixed cost a request makes a second request of a few
    /// items cost nearly what the batch it leaves out would, so those wait
    /// for the call in flight, which takes them as it ends.
    fn may_start(&self, st: &State<T>) -> bool {
        st.active < self.limits.max_handlers
            && self.ready(st)
            && (!self.limits.refill
                || st.active == 0
                || st.flushing
                || st.pending.len() >= self.limits.max_batch_size)
    }

    /// Called under the lock that every new item takes too, so the common
    /// case (all that waits fits one batch) swaps the queue out whole
    /// instead of moving each item; withdrawn items are skipped when the
    /// batch runs.
    fn take_batch(&self, st: &mut State<T>) -> VecDeque<Entry<T>> {
        if st.pending.len() <= self.limits.max_batch_size
            && self
                .limits
                .max_batch_bytes
                .map_or(true, |max| st.pending_bytes <= max)
        {
            st.pending_bytes = 0;
            let spare = std::mem::take(&mut st.spare);
            return std::mem::replace(&mut st.pending, spare);
        }
        let mut batch = VecDeque::with_capacity(st.pending.len().min(self.limits.max_batch_size));
        let mut bytes = 0usize;
        while batch.len() < self.limits.max_batch_size {
            let Some(front) = st.pending.front() else {
                break;
            };
            if front.withdrawn() {
                st.pending_bytes -= front.size;
                st.pending.pop_front();
                continue;
            }
            if let Some(max) = self.limits.max_batch_bytes {
                if !batch.is_empty() && bytes + front.size > max {
                    break;
                }
            }
            bytes += front.size;
            st.pending_bytes -= front.size;
            batch.push_back(st.pending.pop_front().expect("front exists"));
        }
        batch
    }

    async fn handler_loop(self: Arc<Self>) {
        // Gives the slot back however the loop ends, including a panic in a
        // driver or a user's hook, so the batcher never runs out of slots.
        struct Release<T: Send + Sync + 'static, H: BatchHandler<T>>(Arc<Inner<T, H>>, bool);
        impl<T: Send + Sync + 'static, H: BatchHandler<T>> Drop for Release<T, H> {
            fn drop(&mut self) {
                if !self.1 {
                    return;
                }
                let inner = &self.0;
                let mut st = inner.lock();
                inner.leave(&mut st);
                if inner.may_start(&st) {
                    inner.spawn_handler(&mut st);
                }
            }
        }
        enum Step<T> {
            Yield,
            Linger(Duration),
            Run(VecDeque<Entry<T>>),
        }
        let mut release = Release(self.clone(), true);
        let mut lingered = false;
        // Whether the batch about to be taken has had its linger.
        let mut waited = false;
        // The last batch's buffer, emptied by `run`.
        let mut done = VecDeque::new();
        loop {
            let flush = self.flush.notified();
            tokio::pin!(flush);
            let step = {
                let mut st = self.lock();
                if done.capacity() > st.spare.capacity() {
                    st.spare = std::mem::take(&mut done);
                }
                if !self.ready(&st) {
                    if lingered {
                        // Leave under the lock that found nothing to do: an
                        // item added after it sees this handler gone and
                        // starts another, instead of waiting for the next.
                        release.1 = false;
                        self.leave(&mut st);
                        return;
                    }
                    Step::Yield
                } else {
                    match self.limits.linger {
                        Some(wait)
                            if !waited
                                && !st.flushing
                                && st.pending.len() < self.limits.max_batch_size =>
                        {
                            // Enabled under the lock that saw no flush, so
                            // a shutdown after it is not missed.
                            flush.as_mut().enable();
                            Step::Linger(wait)
                        }
                        _ => Step::Run(self.take_batch(&mut st)),
                    }
                }
            };
            let batch = match step {
                Step::Yield => {
                    // Items often follow in a stream (an ack a message): one
                    // turn of the scheduler lets the next ones join this
                    // handler instead of each few paying for a task of their
                    // own. The slot stays taken meanwhile, so none is spawned.
                    lingered = true;
                    tokio::task::yield_now().await;
                    continue;
                }
                Step::Linger(wait) => {
                    waited = true;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut flush => {}
                    }
                    continue;
                }
                Step::Run(batch) => batch,
            };
            lingered = false;
            waited = false;
            done = batch;
            let small = done.len() < SMALL_BATCH;
            if !done.is_empty() {
                let started = self.limits.refill.then(|| {
                    let awaited = done.iter().filter(|e| e.reply.is_some()).count();
                    (std::time::Instant::now(), awaited)
                });
                let mut answered_at = None;
                self.run(&mut done, &mut answered_at).await;
                if let (Some((started, awaited)), Some(mark)) = (started, answered_at) {
                    self.refill(started.elapsed(), awaited, mark).await;
                    continue;
                }
            }
            if small {
                // A quick driver call (acks that are local bookkeeping)
                // would otherwise have this loop take a few items at a
                // time, contending for the lock with every item added;
                // one turn of the scheduler lets more join the next batch.
                tokio::task::yield_now().await;
            }
        }
    }

    /// After a call that took `call` and answered `answered` waiting
    /// senders, lets them come back before the next batch is taken (see
    /// [`BatchLimits::refill`]): turns of the scheduler, not a timer, since
    /// the wait is far below a timer's millisecond and the answered senders
    /// are ready to run. Ends as soon as as many items have been queued
    /// since the answer (`added` was `mark` then).
    async fn refill(&self, call: Duration, answered: usize, mark: u64) {
        let enough = answered.max(1) as u64;
        let quiet = call / 16;
        let most = call / 4;
        let start = std::time::Instant::now();
        let mut seen = usize::MAX;
        let mut grew = start;
        loop {
            let (waiting, back) = {
                let st = self.lock();
                if st.flushing {
                    return;
                }
                (st.pending.len(), st.added.wrapping_sub(mark))
            };
            if back >= enough || waiting >= self.limits.max_batch_size {
                return;
            }
            let now = std::time::Instant::now();
            if waiting != seen {
                seen = waiting;
                grew = now;
            } else if now - grew >= quiet {
                return;
            }
            if now - start >= most {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Gives a handler's slot back.
    fn leave(&self, st: &mut State<T>) {
        st.active -= 1;
        if st.active == 0 {
            // Withdrawn items left behind below the minimum are not worth a
            // wake-up of their own.
            let mut dropped = 0;
            st.pending.retain(|e| {
                let withdrawn = e.withdrawn();
                dropped += if withdrawn { e.size } else { 0 };
                !withdrawn
            });
            st.pending_bytes -= dropped;
            if st.closed && st.pending.is_empty() {
                self.idle.notify_waiters();
            }
        }
    }

    fn spawn_handler(self: &Arc<Self>, st: &mut State<T>) {
        st.active += 1;
        let inner = self.clone();
        self.runtime
            .spawn(async move { inner.handler_loop().await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A fake driver call that records batch sizes and can fail on demand.
    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<u32>>>,
        fail_first: AtomicUsize,
        permanent_for: Mutex<Vec<u32>>,
        delay: Duration,
        unreported: AtomicUsize,
    }

    impl BatchHandler<u32> for Recorder {
        async fn handle(&self, batch: &[u32]) -> Result<(), BatchError> {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.batches.lock().unwrap().push(batch.to_vec());
            if self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::unavailable("flaky").into());
            }
            let perm = self.permanent_for.lock().unwrap();
            let failed: Vec<_> = batch
                .iter()
                .enumerate()
                .filter(|(_, v)| perm.contains(v))
                .map(|(i, _)| (i, Error::invalid_argument("bad item")))
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(BatchError::Items(failed))
            }
        }
        fn unreported_failure(&self, _error: Error) {
            self.unreported.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn fast_retry() -> RetryPolicy {
        RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(5))
    }

    /// A detached item added while the only handler is on its way out
    /// must not wait for the next item: each one here is the last for a
    /// while, so a stranded one shows as a timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_item_added_as_the_last_handler_leaves_is_still_handled() {
        let rec = Arc::new(Recorder::default());
        let b = Batcher::new(BatchLimits::new(100, 1), fast_retry(), rec.clone());
        for i in 0..3_000u32 {
            b.add_detached(i, 1).unwrap();
            let handled = |rec: &Recorder| {
                rec.batches
                    .lock()
                    .unwrap()
                    .iter()
                    .map(Vec::len)
                    .sum::<usize>()
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while handled(&rec) <= i as usize {
                assert!(
                    std::time::Instant::now() < deadline,
                    "item {i} was never handled"
                );
                // Spin through the handler's exit window with a varying
                // number of turns.
                for _ in 0..(i % 4) {
                    tokio::task::yield_now().await;
                }
                tokio::task::yield_now().await;
            }
        }
        b.shutdown().await;
    }

    /// Senders that each await their send, on calls with a fixed cost:
    /// with refill, once the first call is out every later batch holds
    /// every sender (none goes alone in a second slot, none is left for
    /// the next call because it came back a moment late).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refill_waits_for_the_answered_senders_to_come_back() {
        const SENDERS: usize = 40;
        const ROUNDS: usize = 6;
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(20),
            ..Default::default()
        });
        let limits = BatchLimits::new(1000, 2).with_refill(true);
        let b = Batcher::new(limits, fast_retry(), rec.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..SENDERS {
            let b = b.clone();
            tasks.spawn(async move {
                for r in 0..ROUNDS {
                    b.send((s * ROUNDS + r) as u32, 1).await.unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        b.shutdown().await;
        let sizes: Vec<usize> = rec.batches.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), SENDERS * ROUNDS);
        // The first sender goes alone and the rest gather behind it; from
        // then on every round is one call.
        assert!(
            sizes.len() <= ROUNDS + 2,
            "{} calls for {ROUNDS} rounds: {sizes:?}",
            sizes.len()
        );
        assert!(
            sizes[2..sizes.len() - 1].iter().all(|&n| n >= SENDERS - 1),
            "a round split across calls: {sizes:?}"
        );
    }

    /// With refill, a second call starts for a full batch, and only then:
    /// a few items wait for the call in flight.
    #[tokio::test(start_paused = true)]
    async fn refill_starts_a_second_call_only_for_a_full_batch() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(20),
            ..Default::default()
        });
        let limits = BatchLimits::new(10, 2).with_refill(true);
        let b = Batcher::new(limits, fast_retry(), rec.clone());
        b.add_detached(0, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        for i in 1..=5 {
            b.add_detached(i, 1).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        for i in 6..=10 {
            b.add_detached(i, 1).unwrap();
        }
        // The first call ends at 21 ms; the second, started at 6 ms when
        // ten waited, at 26 ms, before the first's end would have let it.
        tokio::time::sleep(Duration::from_millis(22)).await;
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![0], (1..=10).collect::<Vec<_>>()]);
        b.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn lone_item_leaves_at_once_and_batches_form_while_busy() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(20),
            ..Default::default()
        });
        let b = Batcher::new(BatchLimits::new(100, 1), fast_retry(), rec.clone());
        let first = b.add(0, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest: Vec<_> = (1..=50).map(|i| b.add(i, 1).unwrap()).collect();
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(batches[0], vec![0], "a lone item is not held back");
        assert_eq!(batches.len(), 2, "items queued while busy travel together");
        assert_eq!(batches[1].len(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn respects_max_size_bytes_and_min_size() {
        let rec = Arc::new(Recorder::default());
        let limits = BatchLimits {
            max_batch_size: 3,
            min_batch_size: 2,
            max_batch_bytes: Some(10),
            max_handlers: 1,
            linger: None,
            refill: false,
        };
        let b = Batcher::new(limits, fast_retry(), rec.clone());
        let lone = b.add(1, 4).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            rec.batches.lock().unwrap().is_empty(),
            "below the minimum nothing is sent"
        );
        let replies: Vec<_> = (2..=7).map(|i| b.add(i, 4).unwrap()).collect();
        lone.await.unwrap().unwrap();
        b.shutdown().await;
        for r in replies {
            r.await.unwrap().unwrap();
        }
        let batches = rec.batches.lock().unwrap().clone();
        assert!(
            batches.iter().all(|x| x.len() <= 2),
            "10 bytes hold two items of 4: {batches:?}"
        );
        assert_eq!(batches.concat(), (1..=7).collect::<Vec<_>>());
    }

    /// A queue within the byte limit is taken whole, one over it is cut
    /// at the limit, and a withdrawn item's bytes count for neither.
    #[tokio::test(start_paused = true)]
    async fn the_byte_limit_cuts_only_a_queue_that_exceeds_it() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(10),
            ..Default::default()
        });
        let limits = BatchLimits::new(100, 1).with_max_bytes(10);
        let b = Batcher::new(limits, fast_retry(), rec.clone());
        let busy = b.add(0, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Queued while the only handler is busy: 2 + 8 withdrawn + 3 + 5.
        let first = b.add(1, 2).unwrap();
        drop(b.add(2, 8).unwrap());
        let rest = [b.add(3, 3).unwrap(), b.add(4, 5).unwrap()];
        busy.await.unwrap().unwrap();
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        // Then 4 + 4 + 4: over the limit, so cut after two.
        let busy = b.add(5, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let more: Vec<_> = (6..=8).map(|i| b.add(i, 4).unwrap()).collect();
        busy.await.unwrap().unwrap();
        for r in more {
            r.await.unwrap().unwrap();
        }
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![0], vec![1, 3, 4], vec![5], vec![6, 7], vec![8]],
            "10 bytes: 2 + 3 + 5 travel together, 4 + 4 + 4 do not"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lone_sends_run_inline_and_a_dropped_one_frees_its_slot() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(50),
            ..Default::default()
        });
        let b = Batcher::new(BatchLimits::new(100, 1), fast_retry(), rec.clone());
        let dropped = tokio::time::timeout(Duration::from_millis(10), b.send(1, 1)).await;
        assert!(dropped.is_err(), "still in the driver call when dropped");
        b.send(2, 1).await.unwrap();
        let (a, c) = tokio::join!(b.send(3, 1), b.send(4, 1));
        a.unwrap();
        c.unwrap();
        tokio::time::timeout(Duration::from_secs(1), b.shutdown())
            .await
            .expect("no slot leaked");
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(
            batches[0],
            vec![2],
            "the dropped call never reached the record"
        );
        assert_eq!(batches.concat(), vec![2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn withdrawn_items_do_not_count_toward_the_minimum() {
        let rec = Arc::new(Recorder::default());
        let limits = BatchLimits {
            min_batch_size: 2,
            ..BatchLimits::new(10, 1)
        };
        let b = Batcher::new(limits, fast_retry(), rec.clone());
        drop(b.add(1, 1).unwrap());
        let kept = b.add(2, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            rec.batches.lock().unwrap().is_empty(),
            "one live item is below the minimum of two"
        );
        let other = b.add(3, 1).unwrap();
        kept.await.unwrap().unwrap();
        other.await.unwrap().unwrap();
        assert_eq!(*rec.batches.lock().unwrap(), vec![vec![2, 3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_gives_its_slot_back() {
        struct Panics(AtomicUsize);
        impl BatchHandler<u32> for Panics {
            async fn handle(&self, batch: &[u32]) -> Result<(), BatchError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                if batch.contains(&0) {
                    panic!("a hook panicked");
                }
                Ok(())
            }
        }
        let h = Arc::new(Panics(AtomicUsize::new(0)));
        let b = Batcher::new(BatchLimits::new(1, 1), fast_retry(), h.clone());
        let doomed = b.add(0, 1).unwrap();
        let after = b.add(1, 1).unwrap();
        assert!(doomed.await.is_err(), "its reply is dropped");
        after.await.unwrap().unwrap();
        b.send(2, 1).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), b.shutdown())
            .await
            .expect("no slot leaked");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_while_the_backend_stays_away() {
        let rec = Arc::new(Recorder {
            fail_first: AtomicUsize::new(usize::MAX),
            ..Default::default()
        });
        let b = Batcher::new(BatchLimits::new(10, 1), RetryPolicy::default(), rec.clone());
        b.add_detached(7, 0).unwrap();
        tokio::time::timeout(Duration::from_secs(600), b.shutdown())
            .await
            .expect("shutdown gives up on a backend that never comes back");
        assert_eq!(
            rec.unreported.load(Ordering::SeqCst),
            1,
            "and reports the loss"
        );
    }

    /// Whole-queue takes (no byte limit) still split what waits at the
    /// maximum, in order, and reuse the emptied buffer.
    #[tokio::test(start_paused = true)]
    async fn whole_queue_takes_respect_the_maximum_and_the_order() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(5),
            ..Default::default()
        });
        let b = Batcher::new(BatchLimits::new(4, 1), fast_retry(), rec.clone());
        for round in 0..3u32 {
            b.add_detached_many(round * 100..round * 100 + 10).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            b.add_detached(round * 100 + 10, 0).unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        b.shutdown().await;
        let batches = rec.batches.lock().unwrap().clone();
        assert!(
            batches.iter().all(|x| !x.is_empty() && x.len() <= 4),
            "{batches:?}"
        );
        let want: Vec<u32> = (0..3).flat_map(|r| r * 100..=r * 100 + 10).collect();
        assert_eq!(batches.concat(), want);
    }

    /// With a linger, a trickle of items waits for company and goes in one
    /// call; a full batch does not wait; shutdown cuts a linger short.
    #[tokio::test(start_paused = true)]
    async fn linger_gathers_a_trickle_but_not_a_full_batch_or_a_shutdown() {
        let rec = Arc::new(Recorder::default());
        let limits = BatchLimits::new(100, 1).with_linger(Duration::from_millis(300));
        let b = Batcher::new(limits, fast_retry(), rec.clone());
        for i in 0..5u32 {
            b.add_detached(i, 0).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rec.batches.lock().unwrap().is_empty(), "still lingering");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(*rec.batches.lock().unwrap(), vec![vec![0, 1, 2, 3, 4]]);

        b.add_detached_many(1000..1100).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            rec.batches.lock().unwrap().len(),
            2,
            "a full batch goes at once"
        );

        b.add_detached(7, 0).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = tokio::time::Instant::now();
        b.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "shutdown waited out the linger: {:?}",
            started.elapsed()
        );
        assert_eq!(rec.batches.lock().unwrap()[2], vec![7]);
    }

    /// A lone awaited send waits out the linger too, with whatever joins it.
    #[tokio::test(start_paused = true)]
    async fn linger_holds_a_lone_send_for_company() {
        let rec = Arc::new(Recorder::default());
        let limits = BatchLimits::new(100, 4).with_linger(Duration::from_millis(200));
        let b = Arc::new(Batcher::new(limits, fast_retry(), rec.clone()));
        let started = tokio::time::Instant::now();
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.send(1, 0).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.send(2, 0).await.unwrap();
        first.await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(*rec.batches.lock().unwrap(), vec![vec![1, 2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn withdrawn_items_are_never_sent() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_millis(20),
            ..Default::default()
        });
        let b = Batcher::new(BatchLimits::new(100, 1), fast_retry(), rec.clone());
        let busy = b.add(0, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let dropped = b.add(1, 1).unwrap();
        let kept = b.add(2, 1).unwrap();
        drop(dropped);
        busy.await.unwrap().unwrap();
        kept.await.unwrap().unwrap();
        assert_eq!(rec.batches.lock().unwrap().concat(), vec![0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn temporary_failures_are_retried_permanent_ones_reported() {
        let rec = Arc::new(Recorder {
            fail_first: AtomicUsize::new(2),
            permanent_for: Mutex::new(vec![3]),
            ..Default::default()
        });
        let b = Batcher::new(BatchLimits::new(100, 1), fast_retry(), rec.clone());
        let ok = b.add(1, 1).unwrap().await.unwrap();
        assert!(ok.is_ok(), "retried past two temporary failures");
        let bad = b.add(3, 1).unwrap().await.unwrap();
        assert_eq!(bad.unwrap_err().kind(), ErrorKind::InvalidArgument);
        b.add_detached(3, 0).unwrap();
        b.shutdown().await;
        assert_eq!(rec.unreported.load(Ordering::SeqCst), 1);
        let err = b.add(4, 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }

    #[tokio::test(start_paused = true)]
    async fn partial_failures_retry_only_failed_items() {
        struct FailOnce {
            seen: Mutex<Vec<Vec<u32>>>,
        }
        impl BatchHandler<u32> for FailOnce {
            async fn handle(&self, batch: &[u32]) -> Result<(), BatchError> {
                let mut seen = self.seen.lock().unwrap();
                seen.push(batch.to_vec());
                if seen.len() == 1 {
                    Err(BatchError::Items(vec![(1, Error::unavailable("later"))]))
                } else {
                    Ok(())
                }
            }
        }
        let h = Arc::new(FailOnce {
            seen: Mutex::new(Vec::new()),
        });
        let limits = BatchLimits {
            min_batch_size: 3,
            ..BatchLimits::new(10, 1)
        };
        let b = Batcher::new(limits, fast_retry(), h.clone());
        let rs: Vec<_> = (0..3).map(|i| b.add(i, 1).unwrap()).collect();
        for r in rs {
            r.await.unwrap().unwrap();
        }
        assert_eq!(*h.seen.lock().unwrap(), vec![vec![0, 1, 2], vec![1]]);
    }
}
