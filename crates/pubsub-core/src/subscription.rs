//! The receiving side of the user API.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::Stream;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::batcher::{BatchHandler, Batcher};
use crate::driver::{self, AckId, BatchError, Capabilities, Nacked, ReceivedMessage};
use crate::error::{Error, Result};
use crate::message::{Message, Receipt};
use crate::options::SubscriptionOptions;
use crate::retry::RetryPolicy;
use crate::topic::with_context;

/// The queue aims to hold about this much work, measured by throughput.
const TARGET_QUEUE_DURATION: Duration = Duration::from_secs(2);
/// Without a full batch handed out, the size is re-measured this often.
const RESIZE_WINDOW: Duration = Duration::from_millis(100);
/// Each whole idle period of this length shrinks the batch size once more.
const IDLE_STEP: Duration = Duration::from_secs(1);

/// A handle for receiving messages from a subscription.
///
/// Cheap to clone; clones share one local queue, one prefetcher and one ack
/// batcher. `receive` may be called from many tasks at once.
#[derive(Clone)]
pub struct Subscription {
    shared: Arc<Shared>,
}

/// Counters of one subscription, for monitoring.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Messages handed to the application.
    pub received: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages nacked, including dropped ones.
    pub nacked: u64,
    /// Messages dropped without ack or nack.
    pub dropped_unsettled: u64,
    /// The current adaptive receive batch size.
    pub receive_batch_size: usize,
    /// Messages fetched and not yet handed out.
    pub queued: usize,
    /// Messages fetched and then dropped before they were handed out,
    /// because the backend took them back (Kafka: of partitions revoked in
    /// a rebalance, which their new owner reads again).
    pub revoked: u64,
}

/// What acks, nacks and extensions carry: the backend's id and the token of
/// the lease the core keeps for it.
#[derive(Clone)]
struct Settle {
    id: AckId,
    token: u64,
}

pub(crate) struct Shared {
    driver: Arc<dyn driver::Subscription>,
    caps: Capabilities,
    state: Mutex<RecvState>,
    /// Wakes receivers when messages, an error or shutdown arrive.
    ready: Notify,
    /// Wakes `shutdown` when the last fetch ends.
    fetch_done: Notify,
    waiting: AtomicUsize,
    acks: Batcher<Settle>,
    nacks: Batcher<Settle>,
    leases: Arc<Leases>,
    failure: Arc<FailureSlot>,
    shut_down: AtomicBool,
    stop: watch::Sender<bool>,
    next_token: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    dropped: AtomicU64,
    retry: RetryPolicy,
    runtime: Handle,
    /// The lease keeper, awaited on shutdown so no extension follows close.
    keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The driver's count of revocations (`driver::Subscription::revocations`).
    revocations: Option<Arc<AtomicU64>>,
}

struct RecvState {
    queue: Fetched,
    /// Messages handed out; counted here, under the lock already held,
    /// rather than in an atomic of their own.
    received: u64,
    fetches: usize,
    error: Option<Error>,
    sizer: BatchSizer,
    /// The driver's revocation count the queue was last checked at.
    revocations_seen: u64,
    /// Queued messages dropped because the driver took them back.
    revoked: u64,
}

/// Fetched messages not yet handed out, kept as the batches the driver
/// returned: a batch is queued whole, and each message moves once, when it
/// is handed out.
#[derive(Default)]
struct Fetched {
    batches: VecDeque<(std::vec::IntoIter<ReceivedMessage>, u64)>,
    len: usize,
}

impl Fetched {
    /// Queues a batch whose tokens run from `first`.
    fn push(&mut self, batch: Vec<ReceivedMessage>, first: u64) {
        if !batch.is_empty() {
            self.len += batch.len();
            self.batches.push_back((batch.into_iter(), first));
        }
    }

    /// Takes the first message and its token, and makes `R` of them where
    /// they are read: each wrapper a message passes through on its way out
    /// is another copy of it.
    #[inline]
    fn pop_front_with<R>(&mut self, make: impl FnOnce(ReceivedMessage, u64) -> R) -> Option<R> {
        let (batch, next) = self.batches.front_mut()?;
        let token = *next;
        let made = make(batch.next()?, token);
        *next += 1;
        self.len -= 1;
        if batch.len() == 0 {
            self.batches.pop_front();
        }
        Some(made)
    }

    #[cfg(test)]
    fn pop_front(&mut self) -> Option<(ReceivedMessage, u64)> {
        self.pop_front_with(|m, token| (m, token))
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the messages `keep` accepts, in order, and returns the tokens
    /// of the others.
    fn retain(&mut self, mut keep: impl FnMut(&ReceivedMessage) -> bool) -> Vec<u64> {
        let mut dropped = Vec::new();
        let mut kept = Fetched::default();
        for (batch, first) in std::mem::take(&mut self.batches) {
            // A batch's tokens run on without gaps, so a dropped message
            // ends a run of kept ones, which is queued as a batch of its own.
            let mut run = Vec::new();
            let mut run_first = first;
            for (m, token) in batch.zip(first..) {
                if keep(&m) {
                    if run.is_empty() {
                        run_first = token;
                    }
                    run.push(m);
                } else {
                    dropped.push(token);
                    kept.push(std::mem::take(&mut run), run_first);
                }
            }
            kept.push(run, run_first);
        }
        *self = kept;
        dropped
    }

    fn drain(&mut self) -> impl Iterator<Item = (ReceivedMessage, u64)> {
        self.len = 0;
        std::mem::take(&mut self.batches)
            .into_iter()
            .flat_map(|(batch, first)| batch.zip(first..))
    }
}

/// The first permanent ack or nack failure, which fails the subscription.
#[derive(Default)]
struct FailureSlot {
    error: Mutex<Option<Error>>,
    set: AtomicBool,
}

impl FailureSlot {
    fn get(&self) -> Option<Error> {
        if self.set.load(Ordering::Acquire) {
            lock(&self.error).clone()
        } else {
            None
        }
    }
}

/// Adapts the receive batch size to throughput: aim at about two seconds
/// of messages, grow at most x2 and shrink at most x0.75 a step, and decay
/// while idle.
#[derive(Debug)]
struct BatchSizer {
    size: f64,
    max: f64,
    handed: u64,
    since: Instant,
}

impl BatchSizer {
    fn new(max: usize) -> Self {
        BatchSizer {
            size: 1.0,
            max: max.max(1) as f64,
            handed: 0,
            since: Instant::now(),
        }
    }

    fn current(&self) -> usize {
        self.size as usize
    }

    /// Called before each fetch; returns how many messages to ask for.
    fn next(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.since);
        if (self.handed as f64) >= self.size || elapsed >= RESIZE_WINDOW {
            let secs = elapsed.as_secs_f64().max(1e-6);
            let desired = self.handed as f64 / secs * TARGET_QUEUE_DURATION.as_secs_f64();
            let idle_steps = (elapsed.as_secs_f64() / IDLE_STEP.as_secs_f64())
                .floor()
                .max(1.0);
            let floor = self.size * 0.75f64.powf(idle_steps.min(64.0));
            self.size = desired.clamp(floor, self.size * 2.0).clamp(1.0, self.max);
            self.handed = 0;
            self.since = now;
        }
        self.current()
    }
}

/// Held messages whose leases the core keeps alive.
struct Leases {
    enabled: bool,
    deadline: Duration,
    max_extension: Duration,
    held: Mutex<HashMap<u64, Held>>,
}

struct Held {
    id: AckId,
    since: Instant,
    expires: Instant,
}

impl Leases {
    /// Holds a fetched batch whose tokens run from `first`.
    fn hold(&self, batch: &[ReceivedMessage], first: u64, now: Instant) {
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

    fn release(&self, tokens: impl Iterator<Item = u64>) {
        if !self.enabled {
            return;
        }
        let mut held = lock(&self.held);
        for t in tokens {
            held.remove(&t);
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent between statements, so a panic
    // elsewhere while holding the lock is no reason to fail every receiver.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy)]
enum SettleKind {
    Ack,
    Nack,
    Extend(Duration),
}

struct SettleHandler {
    driver: Arc<dyn driver::Subscription>,
    kind: SettleKind,
    leases: Arc<Leases>,
    failure: Arc<FailureSlot>,
    shared: Weak<Shared>,
}

#[async_trait]
impl BatchHandler<Settle> for SettleHandler {
    async fn handle(&self, batch: &[Settle]) -> Result<(), BatchError> {
        let d = &*self.driver;
        if !matches!(self.kind, SettleKind::Extend(_)) {
            self.leases.release(batch.iter().map(|s| s.token));
        }
        let ids: Vec<AckId> = batch.iter().map(|s| s.id.clone()).collect();
        let (name, res) = match self.kind {
            SettleKind::Ack => {
                let span = tracing::debug_span!(
                    "send_acks",
                    driver = d.driver_name(),
                    resource = d.resource(),
                    acks = ids.len()
                );
                ("ack", d.send_acks(&ids).instrument(span).await)
            }
            SettleKind::Nack => {
                let span = tracing::debug_span!(
                    "send_nacks",
                    driver = d.driver_name(),
                    resource = d.resource(),
                    nacks = ids.len()
                );
                ("nack", d.send_nacks(&ids).instrument(span).await)
            }
            SettleKind::Extend(by) => {
                let span = tracing::debug_span!(
                    "extend_leases",
                    driver = d.driver_name(),
                    resource = d.resource(),
                    leases = ids.len()
                );
                (
                    "extend lease",
                    d.extend_leases(&ids, by).instrument(span).await,
                )
            }
        };
        res.map_err(|e| with_context(e, d.driver_name(), d.resource(), name))
    }

    fn unreported_failure(&self, error: Error) {
        if let SettleKind::Extend(_) = self.kind {
            // The backend will redeliver; that is the only consequence.
            tracing::warn!(%error, "lease extension failed");
            return;
        }
        tracing::error!(%error, "acknowledgement failed; the subscription is now failed");
        let mut slot = lock(&self.failure.error);
        if slot.is_none() {
            *slot = Some(error);
            self.failure.set.store(true, Ordering::Release);
        }
        drop(slot);
        if let Some(s) = self.shared.upgrade() {
            s.ready.notify_waiters();
        }
    }
}

impl Subscription {
    /// Wraps a driver subscription with default options. Must be called
    /// within a Tokio runtime.
    pub fn new(driver: impl driver::Subscription) -> Self {
        Self::with_options(Arc::new(driver), SubscriptionOptions::default())
    }

    /// Wraps a driver subscription. Must be called within a Tokio runtime.
    pub fn with_options(
        driver: Arc<dyn driver::Subscription>,
        options: SubscriptionOptions,
    ) -> Self {
        let caps = driver.capabilities();
        let limits = options.ack_batching.merge(caps.ack_batching);
        let per_call = caps.max_receive_batch.max(1);
        let driver_cap = per_call * caps.max_concurrent_receives.max(1);
        let max_batch = options
            .max_receive_batch
            .map_or(driver_cap, |n| n.min(driver_cap));
        let leases = Arc::new(Leases {
            enabled: caps.lease_extension
                && caps.ack_deadline.is_some()
                && !options.max_lease_extension.is_zero(),
            deadline: caps.ack_deadline.unwrap_or(Duration::from_secs(60)),
            max_extension: options.max_lease_extension,
            held: Mutex::new(HashMap::new()),
        });
        let failure = Arc::new(FailureSlot::default());
        let (stop, _) = watch::channel(false);
        let revocations = driver.revocations();
        let revocations_seen = revocations
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Acquire));
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            let handler = |kind| -> Arc<dyn BatchHandler<Settle>> {
                Arc::new(SettleHandler {
                    driver: driver.clone(),
                    kind,
                    leases: leases.clone(),
                    failure: failure.clone(),
                    shared: weak.clone(),
                })
            };
            Shared {
                acks: Batcher::new(limits, options.retry, handler(SettleKind::Ack)),
                nacks: Batcher::new(limits, options.retry, handler(SettleKind::Nack)),
                driver: driver.clone(),
                caps: caps.clone(),
                state: Mutex::new(RecvState {
                    queue: Fetched::default(),
                    received: 0,
                    fetches: 0,
                    error: None,
                    sizer: BatchSizer::new(max_batch),
                    revocations_seen,
                    revoked: 0,
                }),
                ready: Notify::new(),
                fetch_done: Notify::new(),
                waiting: AtomicUsize::new(0),
                leases: leases.clone(),
                failure: failure.clone(),
                shut_down: AtomicBool::new(false),
                stop,
                next_token: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                nacked: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                retry: options.retry,
                runtime: Handle::current(),
                keeper: Mutex::new(None),
                revocations,
            }
        });
        if leases.enabled {
            let extender = Batcher::new(
                limits,
                options.retry,
                Arc::new(SettleHandler {
                    driver: driver.clone(),
                    kind: SettleKind::Extend(leases.deadline),
                    leases: leases.clone(),
                    failure: failure.clone(),
                    shared: Arc::downgrade(&shared),
                }),
            );
            let stop = shared.stop.subscribe();
            let keeper = shared.runtime.spawn(keep_leases(leases, extender, stop));
            *lock(&shared.keeper) = Some(keeper);
        }
        Subscription { shared }
    }

    /// The next message, waiting until one arrives.
    ///
    /// Cancel-safe: dropping the future never loses a message. Fails with
    /// `FailedPrecondition` after `shutdown`, and with the first permanent
    /// receive or ack error, which fails the subscription for good.
    pub async fn receive(&self) -> Result<Message> {
        // Under load a message is usually queued already: hand it out
        // without the span and the machinery of waiting, whose setup and
        // layers cost more than the hand-over itself.
        if let Some(r) = self.shared.try_receive() {
            return r;
        }
        let d = &*self.shared.driver;
        let span =
            tracing::debug_span!("receive", driver = d.driver_name(), resource = d.resource());
        self.shared.receive().instrument(span).await
    }

    /// The messages as a stream, which ends when the subscription is shut
    /// down and yields a permanent error once before ending.
    pub fn stream(&self) -> impl Stream<Item = Result<Message>> + Send + 'static {
        futures_util::stream::unfold(Some(self.clone()), |sub| async move {
            let sub = sub?;
            match sub.receive().await {
                Ok(m) => Some((Ok(m), Some(sub))),
                Err(_) if sub.is_shut_down() => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// Runs `handler` on every message, at most `max_concurrency` at once,
    /// each in its own task, until the subscription is shut down (then
    /// `Ok`, after the running handlers finish) or fails (the error).
    ///
    /// The handler settles each message; one it drops (or panics on) is
    /// nacked by the drop rule.
    pub async fn handle_concurrently<F, Fut>(
        &self,
        max_concurrency: usize,
        handler: F,
    ) -> Result<()>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let max = max_concurrency.max(1);
        let handler = Arc::new(handler);
        let mut running = tokio::task::JoinSet::new();
        let outcome = loop {
            while running.len() >= max {
                reap(running.join_next().await);
            }
            let msg = tokio::select! {
                r = self.receive() => r,
                Some(done) = running.join_next(), if !running.is_empty() => { reap(Some(done)); continue; }
            };
            match msg {
                Ok(m) => {
                    let h = handler.clone();
                    running.spawn(async move { h(m).await });
                }
                Err(_) if self.is_shut_down() => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        while let Some(done) = running.join_next().await {
            reap(Some(done));
        }
        outcome
    }

    /// Nacks messages fetched but never handed out (where the backend can
    /// nack), sends every pending ack and nack, and closes the driver.
    /// Returns the first ack failure, if any. Later calls on any clone fail
    /// with `FailedPrecondition`; so does a second `shutdown`.
    pub async fn shutdown(&self) -> Result<()> {
        let d = &*self.shared.driver;
        let span = tracing::debug_span!(
            "subscription_shutdown",
            driver = d.driver_name(),
            resource = d.resource()
        );
        self.shared.shutdown().instrument(span).await
    }

    /// Whether `shutdown` has been called on any clone.
    pub fn is_shut_down(&self) -> bool {
        self.shared.shut_down.load(Ordering::Acquire)
    }

    /// What the backend can do.
    pub fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    /// Counters since this subscription was opened.
    pub fn stats(&self) -> SubscriptionStats {
        let s = &self.shared;
        let (received, receive_batch_size, queued, revoked) = {
            let st = lock(&s.state);
            (st.received, st.sizer.current(), st.queue.len(), st.revoked)
        };
        SubscriptionStats {
            received,
            acked: s.acked.load(Ordering::Relaxed),
            nacked: s.nacked.load(Ordering::Relaxed),
            dropped_unsettled: s.dropped.load(Ordering::Relaxed),
            receive_batch_size,
            queued,
            revoked,
        }
    }

    /// The backend's own client, if it is a `T`: the typed escape hatch.
    /// Each driver documents the type it exposes.
    pub fn as_raw<T: Any>(&self) -> Option<&T> {
        self.shared.driver.raw()?.downcast_ref::<T>()
    }

    /// The driver under this subscription.
    pub fn driver(&self) -> &dyn driver::Subscription {
        &*self.shared.driver
    }
}

fn reap(done: Option<Result<(), tokio::task::JoinError>>) {
    if let Some(Err(e)) = done {
        if e.is_panic() {
            tracing::error!("a message handler panicked; its message was nacked");
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("driver", &self.shared.driver.driver_name())
            .field("resource", &self.shared.driver.resource())
            .field("shut_down", &self.is_shut_down())
            .finish()
    }
}

/// Decrements the waiting count when a receiver stops waiting, however it
/// stops (including being dropped).
struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub(crate) fn driver(&self) -> &dyn driver::Subscription {
        &*self.driver
    }

    fn error(&self, e: Error, op: &str) -> Error {
        e.with_context_default("driver", self.driver.driver_name())
            .with_context_default("resource", self.driver.resource())
            .with_context_default("operation", op)
    }

    /// What `receive` returns without waiting: a queued message, or the
    /// error that ends receiving; `None` if it must wait.
    ///
    /// The message is read out of the queue and built into a `Message` in
    /// one place, without intermediate wrappers: each wrapper around a
    /// message is another copy of it, and this runs once a message.
    fn try_receive(self: &Arc<Self>) -> Option<Result<Message>> {
        let mut st = lock(&self.state);
        if let Some(e) = self.receive_error() {
            return Some(Err(e));
        }
        self.check_revocations(&mut st);
        match st.queue.pop_front_with(|m, token| self.hand_out(m, token)) {
            Some(m) => {
                self.taken(&mut st);
                drop(st);
                Some(Ok(m))
            }
            None => st.error.clone().map(Err),
        }
    }

    /// Why receiving cannot go on regardless of the queue, if it cannot.
    fn receive_error(&self) -> Option<Error> {
        if self.shut_down.load(Ordering::Acquire) {
            return Some(self.error(
                Error::failed_precondition("subscription has been shut down"),
                "receive",
            ));
        }
        self.failure.get()
    }

    /// Drops the queued messages the driver has taken back since the queue
    /// was last checked. Called with the state locked before each hand-out,
    /// so a message of a revoked Kafka partition is never handed out once
    /// the revocation is known.
    #[inline]
    fn check_revocations(&self, st: &mut RecvState) {
        let now = self.revocation_count();
        if now != st.revocations_seen {
            self.drop_revoked(st, now);
        }
    }

    #[cold]
    fn drop_revoked(&self, st: &mut RecvState, now: u64) {
        st.revocations_seen = now;
        let dropped = st.queue.retain(|m| self.driver.is_current(&m.ack_id));
        if !dropped.is_empty() {
            tracing::debug!(
                messages = dropped.len(),
                "dropped queued messages the backend took back"
            );
            st.revoked += dropped.len() as u64;
            self.leases.release(dropped.into_iter());
        }
    }

    /// Called with the state locked once a message was taken from the
    /// queue.
    fn taken(self: &Arc<Self>, st: &mut RecvState) {
        st.received += 1;
        st.sizer.handed += 1;
        self.maybe_fetch(st);
    }

    /// The driver's revocation count; 0, never moving, for drivers that
    /// take nothing back.
    #[inline]
    fn revocation_count(&self) -> u64 {
        self.revocations
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    #[inline]
    fn hand_out(self: &Arc<Self>, m: ReceivedMessage, token: u64) -> Message {
        Message::from_received(m, token, self.clone())
    }

    async fn receive(self: &Arc<Self>) -> Result<Message> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            {
                let mut st = lock(&self.state);
                if let Some(e) = self.receive_error() {
                    return Err(e);
                }
                self.check_revocations(&mut st);
                if let Some(m) = st.queue.pop_front_with(|m, token| self.hand_out(m, token)) {
                    self.taken(&mut st);
                    drop(st);
                    return Ok(m);
                }
                if let Some(e) = st.error.clone() {
                    return Err(e);
                }
                self.waiting.fetch_add(1, Ordering::AcqRel);
                self.maybe_fetch(&mut st);
                notified.as_mut().enable();
            }
            let _guard = WaitGuard(&self.waiting);
            notified.await;
        }
    }

    /// Starts fetching when the queue holds less than two running batches
    /// and nothing is in flight. Called with the state locked, by receivers
    /// and by a fetch that brought messages.
    ///
    /// Receivers usually drain the queue faster than a fetch fills it. With
    /// room for a second batch, a fetch that brought messages starts the
    /// next one itself, so fetches run back to back; were the next one
    /// started by a receiver taking from a nearly full queue, each batch
    /// would wait for a receiver to wake and the new task to be scheduled
    /// (on a Kafka backlog, 10-20% of the time went in such gaps).
    fn maybe_fetch(self: &Arc<Self>, st: &mut RecvState) {
        if st.fetches > 0 || st.error.is_some() || self.shut_down.load(Ordering::Acquire) {
            return;
        }
        if st.queue.len() >= 2 * st.sizer.current() {
            return;
        }
        let want = st.sizer.next(Instant::now());
        let per_call = self.caps.max_receive_batch.max(1);
        let calls = want
            .div_ceil(per_call)
            .clamp(1, self.caps.max_concurrent_receives.max(1));
        let mut left = want;
        for _ in 0..calls {
            let n = left.min(per_call).max(1);
            left = left.saturating_sub(n);
            st.fetches += 1;
            let this = self.clone();
            self.runtime.spawn(async move { this.fetch(n).await });
        }
    }

    async fn fetch(self: Arc<Self>, max: usize) {
        // Counts the fetch out even if the driver panics, so receivers
        // and shutdown never wait on a fetch that is gone.
        struct Guard<'a>(&'a Shared, bool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if self.1 {
                    lock(&self.0.state).fetches -= 1;
                    self.0.ready.notify_waiters();
                    self.0.fetch_done.notify_waiters();
                }
            }
        }
        let mut guard = Guard(&self, true);
        let mut stop = self.stop.subscribe();
        let mut attempt = 0u32;
        loop {
            let d = &*self.driver;
            let span = tracing::debug_span!(
                "receive_batch",
                driver = d.driver_name(),
                resource = d.resource(),
                max
            );
            let asked = Instant::now();
            let revocations = self.revocation_count();
            let got = tokio::select! {
                r = d.receive_batch(max).instrument(span) => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            match got {
                Ok(batch) => {
                    let now = Instant::now();
                    let base = self
                        .next_token
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.leases.hold(&batch, base, now);
                    let ask_again = {
                        let mut st = lock(&self.state);
                        let empty = batch.is_empty();
                        st.queue.push(batch, base);
                        // Read under the lock, where receivers check it:
                        // deliveries taken back while this batch was fetched
                        // or on its way here are dropped before any
                        // receiver can take them.
                        let now = self.revocation_count();
                        if now != revocations {
                            self.drop_revoked(&mut st, now);
                        }
                        if empty
                            && self.waiting.load(Ordering::Acquire) > 0
                            && !self.shut_down.load(Ordering::Acquire)
                        {
                            true
                        } else {
                            guard.1 = false;
                            st.fetches -= 1;
                            // Receivers that found an empty queue and no
                            // fetch to wait on would otherwise sleep forever.
                            if !empty
                                || (st.queue.is_empty() && self.waiting.load(Ordering::Acquire) > 0)
                            {
                                self.maybe_fetch(&mut st);
                            }
                            false
                        }
                    };
                    if ask_again {
                        // Receivers are still waiting: ask again. A driver
                        // that answers "nothing" at once instead of long-
                        // polling is asked at a modest pace, not in a spin.
                        attempt = 0;
                        if asked.elapsed() < Duration::from_millis(1) {
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                                _ = stop.wait_for(|s| *s) => break,
                            }
                        }
                        continue;
                    }
                    self.ready.notify_waiters();
                    self.fetch_done.notify_waiters();
                    return;
                }
                Err(e) if e.is_temporary() => {
                    let wait = self.retry.backoff(attempt);
                    tracing::warn!(error = %e, ?wait, "receive failed; retrying");
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                Err(e) => {
                    let e = self.error(e, "receive");
                    tracing::error!(error = %e, "receive failed; the subscription is now failed");
                    let mut st = lock(&self.state);
                    st.error.get_or_insert(e);
                    guard.1 = false;
                    st.fetches -= 1;
                    drop(st);
                    self.ready.notify_waiters();
                    self.fetch_done.notify_waiters();
                    return;
                }
            }
        }
        guard.1 = false;
        lock(&self.state).fetches -= 1;
        self.fetch_done.notify_waiters();
    }

    pub(crate) fn settle_ack(&self, id: &AckId, token: u64) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        // After shutdown the driver is closed: the ack goes to the batcher,
        // which refuses it, like any late ack.
        if !self.shut_down.load(Ordering::Acquire) && self.driver.ack_now(id) {
            self.leases.release(std::iter::once(token));
            return;
        }
        let item = Settle {
            id: id.clone(),
            token,
        };
        if self.acks.add_detached(item, 0).is_err() {
            tracing::debug!("ack after shutdown ignored; the backend will redeliver");
        }
    }

    pub(crate) fn settle_nack(self: Arc<Self>, r: Receipt, nacked: Nacked, dropped: bool) {
        self.nacked.fetch_add(1, Ordering::Relaxed);
        if dropped && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                id = %r.id(),
                "a received message was dropped without ack or nack; it is nacked (further drops are counted in stats, not logged)"
            );
        }
        if !self.caps.nack {
            // Left to the ack deadline; stop keeping its lease alive.
            self.leases.release(std::iter::once(r.token));
            return;
        }
        // After shutdown the driver is closed: the nack goes to the batcher,
        // which refuses it, like any late nack.
        if !self.shut_down.load(Ordering::Acquire) && self.driver.nack_now(&r.ack_id, nacked) {
            self.leases.release(std::iter::once(r.token));
            return;
        }
        let item = Settle {
            id: r.ack_id,
            token: r.token,
        };
        if self.nacks.add_detached(item, 0).is_err() {
            tracing::debug!("nack after shutdown ignored; the backend will redeliver");
        }
    }

    pub(crate) async fn extend_one(&self, r: &Receipt, by: Duration) -> Result<()> {
        if !self.caps.lease_extension {
            return Err(self.error(
                Error::unimplemented("this backend cannot extend leases"),
                "extend lease",
            ));
        }
        if self.shut_down.load(Ordering::Acquire) {
            return Err(self.error(
                Error::failed_precondition("subscription has been shut down"),
                "extend lease",
            ));
        }
        let ids = [r.ack_id.clone()];
        let mut attempt = 0;
        loop {
            match self.driver.extend_leases(&ids, by).await {
                Ok(()) => break,
                Err(err) => {
                    let e = match err {
                        BatchError::All(e) => e,
                        BatchError::Items(mut v) => v
                            .pop()
                            .map(|(_, e)| e)
                            .unwrap_or_else(|| Error::internal("empty failure")),
                    };
                    if e.is_temporary() && attempt < 5 {
                        tokio::time::sleep(self.retry.backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    return Err(self.error(e, "extend lease"));
                }
            }
        }
        if self.leases.enabled {
            if let Some(h) = lock(&self.leases.held).get_mut(&r.token) {
                h.expires = Instant::now() + by;
            }
        }
        Ok(())
    }

    async fn shutdown(self: &Arc<Self>) -> Result<()> {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Err(self.error(
                Error::failed_precondition("subscription has already been shut down"),
                "shutdown",
            ));
        }
        self.stop.send_replace(true);
        self.ready.notify_waiters();
        loop {
            let done = self.fetch_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if lock(&self.state).fetches == 0 {
                break;
            }
            done.await;
        }
        let unreceived: Vec<_> = {
            let mut st = lock(&self.state);
            // Deliveries taken back are dropped, not nacked.
            self.check_revocations(&mut st);
            st.queue.drain().collect()
        };
        self.leases.release(unreceived.iter().map(|(_, t)| *t));
        if self.caps.nack && !unreceived.is_empty() {
            // The driver is still open, so a driver that settles nacks at
            // once settles these too.
            let items = unreceived.into_iter().filter_map(|(m, token)| {
                let nacked = Nacked::from_received(&m);
                let id = m.ack_id;
                (!self.driver.nack_now(&id, nacked)).then_some(Settle { id, token })
            });
            // Cannot fail: the nack batcher closes only below.
            let _ = self.nacks.add_detached_many(items);
        }
        self.acks.shutdown().await;
        self.nacks.shutdown().await;
        let keeper = lock(&self.keeper).take();
        if let Some(k) = keeper {
            let _ = k.await;
        }
        let closed = self
            .driver
            .close()
            .await
            .map_err(|e| self.error(e, "close"));
        if let Some(e) = self.failure.get() {
            return Err(e);
        }
        closed
    }
}

async fn keep_leases(
    leases: Arc<Leases>,
    extender: Batcher<Settle>,
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::driver::{AckId, BatchError};
    use crate::error::ErrorKind;
    use bytes::Bytes;

    /// A fake driver whose acks always fail for good.
    #[derive(Debug)]
    struct AcksFail;

    #[async_trait]
    impl driver::Subscription for AcksFail {
        fn driver_name(&self) -> &'static str {
            "fake"
        }
        fn resource(&self) -> &str {
            "acks-fail"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn receive_batch(&self, _max: usize) -> Result<Vec<ReceivedMessage>> {
            Ok(vec![ReceivedMessage::new(
                Bytes::from_static(b"x"),
                Default::default(),
                "1".into(),
                AckId::from_u64(1),
            )])
        }
        async fn send_acks(&self, _ids: &[AckId]) -> Result<(), BatchError> {
            Err(Error::new(ErrorKind::PermissionDenied, "no acks for you").into())
        }
    }

    #[tokio::test]
    async fn a_permanent_ack_failure_fails_the_subscription_loudly() {
        let sub = Subscription::new(AcksFail);
        sub.receive().await.unwrap().ack();
        let mut failed = None;
        for _ in 0..100 {
            match sub.receive().await {
                Ok(m) => {
                    m.ack();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("receive reports the ack failure");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert_eq!(e.context("operation"), Some("ack"));
        let e = sub.shutdown().await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::PermissionDenied,
            "shutdown reports it too"
        );
    }

    /// A fake driver that settles acks at once and counts what reaches
    /// each path.
    #[derive(Debug, Default)]
    struct AcksAtOnce {
        sent: AtomicUsize,
        now: Mutex<Vec<AckId>>,
        batched: AtomicUsize,
        nacked: AtomicUsize,
        /// Settle nacks at once too, recording what they hand back.
        nack_now: bool,
        /// Messages beyond the three every test gets.
        extra: usize,
        nacked_now: Mutex<Vec<(AckId, Nacked)>>,
    }

    #[async_trait]
    impl driver::Subscription for AcksAtOnce {
        fn driver_name(&self) -> &'static str {
            "fake"
        }
        fn resource(&self) -> &str {
            "acks-at-once"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                nack: true,
                lease_extension: true,
                ack_deadline: Some(Duration::from_secs(30)),
                ..Capabilities::default()
            }
        }
        async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
            // Three messages in all (unless told), so the leases held are
            // known.
            let all = 3 + self.extra;
            let first = self.sent.fetch_add(max, Ordering::SeqCst).min(all);
            let last = (first + max).min(all);
            if first == last {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok((first as u64..last as u64)
                .map(|i| {
                    let mut m = ReceivedMessage::new(
                        Bytes::from_static(b"x"),
                        Default::default(),
                        i.to_string(),
                        AckId::from_u64(i),
                    );
                    m.delivery_attempt = Some(1);
                    m
                })
                .collect())
        }
        async fn send_acks(&self, ids: &[AckId]) -> Result<(), BatchError> {
            self.batched.fetch_add(ids.len(), Ordering::SeqCst);
            Ok(())
        }
        async fn send_nacks(&self, ids: &[AckId]) -> Result<(), BatchError> {
            self.nacked.fetch_add(ids.len(), Ordering::SeqCst);
            Ok(())
        }
        async fn extend_leases(&self, _ids: &[AckId], _by: Duration) -> Result<(), BatchError> {
            Ok(())
        }
        fn ack_now(&self, id: &AckId) -> bool {
            lock(&self.now).push(id.clone());
            true
        }
        fn nack_now(&self, id: &AckId, message: Nacked) -> bool {
            if self.nack_now {
                lock(&self.nacked_now).push((id.clone(), message));
            }
            self.nack_now
        }
    }

    #[tokio::test]
    async fn nacks_settled_at_once_hand_back_each_message_as_delivered() {
        let d = Arc::new(AcksAtOnce {
            nack_now: true,
            extra: 1,
            ..AcksAtOnce::default()
        });
        let sub = Subscription::with_options(d.clone(), SubscriptionOptions::default());
        let mut changed = sub.receive().await.unwrap();
        let dropped = sub.receive().await.unwrap();
        let plain = sub.receive().await.unwrap();
        // A received message sent on elsewhere is nacked as it was
        // delivered (and sent as it is now).
        let forwarded = sub
            .receive()
            .await
            .unwrap()
            .with_attribute("hop", "1")
            .into_outgoing();
        assert_eq!(forwarded.body, "x");
        assert_eq!(forwarded.attributes.len(), 1);
        // What the application does to its message is not what is
        // redelivered.
        assert_eq!(changed.take_body(), "x");
        changed.attributes_mut().insert("k".into(), "v".into());
        let changed = changed.with_ordering_key("key").with_attribute("k2", "v2");
        changed.nack();
        drop(dropped);
        assert_eq!(
            lock(&sub.shared.leases.held).len(),
            1,
            "their leases are let go"
        );
        plain.nack();
        let now = std::mem::take(&mut *lock(&d.nacked_now));
        let ids: Vec<_> = now.iter().map(|(id, _)| id.as_u64()).collect();
        assert_eq!(
            ids,
            [Some(3), Some(0), Some(1), Some(2)],
            "settled before nack returns"
        );
        for (_, m) in &now {
            assert_eq!(m.body, "x");
            assert!(m.attributes.is_empty() && m.ordering_key.is_none());
            assert_eq!(m.delivery_attempt, Some(1));
        }
        assert_eq!(d.nacked.load(Ordering::SeqCst), 0, "nothing batched");
        assert_eq!(sub.stats().nacked, 4);
        assert_eq!(sub.stats().dropped_unsettled, 2);
        sub.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn acks_settled_at_once_skip_the_batcher_and_release_their_leases() {
        let d = Arc::new(AcksAtOnce::default());
        let sub = Subscription::with_options(d.clone(), SubscriptionOptions::default());
        let a = sub.receive().await.unwrap();
        let b = sub.receive().await.unwrap();
        let late = sub.receive().await.unwrap();
        assert_eq!(
            lock(&sub.shared.leases.held).len(),
            3,
            "held while unsettled"
        );
        a.ack();
        assert_eq!(lock(&d.now).len(), 1, "settled before ack returns");
        assert_eq!(
            lock(&sub.shared.leases.held).len(),
            2,
            "its lease is let go"
        );
        b.nack();
        sub.shutdown().await.unwrap();
        late.ack();
        let now: Vec<_> = lock(&d.now).iter().map(AckId::as_u64).collect();
        assert_eq!(now, [Some(0)], "a late ack is ignored");
        assert_eq!(d.batched.load(Ordering::SeqCst), 0);
        // Shutdown also nacks what was fetched and not handed out.
        assert!(
            d.nacked.load(Ordering::SeqCst) >= 1,
            "nacks are still batched"
        );
        assert_eq!(sub.stats().acked, 2);
    }

    /// A fake driver that answers "nothing" at once, and counts the asks.
    #[derive(Debug, Default)]
    struct NeverWaits(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl driver::Subscription for NeverWaits {
        fn driver_name(&self) -> &'static str {
            "fake"
        }
        fn resource(&self) -> &str {
            "never-waits"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn receive_batch(&self, _max: usize) -> Result<Vec<ReceivedMessage>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Vec::new())
        }
        async fn send_acks(&self, _ids: &[AckId]) -> Result<(), BatchError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_driver_that_never_waits_is_not_asked_in_a_spin() {
        let d = Arc::new(NeverWaits::default());
        let sub = Subscription::with_options(d.clone(), SubscriptionOptions::default());
        let r = tokio::time::timeout(Duration::from_millis(300), sub.receive()).await;
        assert!(r.is_err());
        let asks = d.0.load(Ordering::SeqCst);
        assert!(asks <= 40, "asked {asks} times in 300 ms");
        sub.shutdown().await.unwrap();
    }

    /// A fake driver whose messages describe themselves lazily, counting
    /// how often it is asked to.
    #[derive(Debug, Default)]
    struct Lazy(Counts);

    #[derive(Debug, Default)]
    struct Counts {
        ids: AtomicUsize,
        raws: AtomicUsize,
    }

    #[async_trait]
    impl driver::Subscription for Lazy {
        fn driver_name(&self) -> &'static str {
            "fake"
        }
        fn resource(&self) -> &str {
            "lazy"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        fn describe_id(&self, ack_id: &AckId, at: (i64, i64)) -> String {
            self.0.ids.fetch_add(1, Ordering::SeqCst);
            format!("p{}/{}", ack_id.as_u64().unwrap_or_default(), at.0)
        }
        fn describe_raw(
            &self,
            _ack_id: &AckId,
            at: (i64, i64),
            ordering_key: Option<&str>,
        ) -> Option<Box<dyn Any + Send + Sync>> {
            self.0.raws.fetch_add(1, Ordering::SeqCst);
            Some(Box::new((at.1, ordering_key.map(str::to_owned))))
        }
        async fn receive_batch(&self, _max: usize) -> Result<Vec<ReceivedMessage>> {
            let mut m = ReceivedMessage::describe_lazily(
                Bytes::from_static(b"x"),
                Default::default(),
                AckId::from_u64(1),
                (7, 42),
            );
            m.ordering_key = Some("k".into());
            Ok(vec![m])
        }
        async fn send_acks(&self, _ids: &[AckId]) -> Result<(), BatchError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn lazy_details_are_built_once_and_only_when_asked() {
        let d = Arc::new(Lazy::default());
        let sub = Subscription::with_options(d.clone(), SubscriptionOptions::default());
        let untouched = sub.receive().await.unwrap();
        untouched.ack();
        let m = sub.receive().await.unwrap();
        assert_eq!(d.0.ids.load(Ordering::SeqCst), 0);
        assert_eq!(d.0.raws.load(Ordering::SeqCst), 0);
        assert_eq!(m.id(), Some("p1/7"));
        assert_eq!(m.id(), Some("p1/7"));
        assert!(format!("{m:?}").contains("p1/7"));
        let raw = m.as_raw::<(i64, Option<String>)>().unwrap();
        assert_eq!(raw, &(42, Some("k".to_owned())));
        assert!(m.as_raw::<String>().is_none());
        assert_eq!(d.0.ids.load(Ordering::SeqCst), 1, "built once");
        assert_eq!(d.0.raws.load(Ordering::SeqCst), 1, "built once");
        m.ack();
        let later = sub.receive().await.unwrap();
        sub.shutdown().await.unwrap();
        assert_eq!(later.id(), Some("p1/7"), "described after shutdown");
        drop(later);
    }

    /// Messages whose ids and ack ids are these texts.
    fn batch(ids: &[&str]) -> Vec<ReceivedMessage> {
        ids.iter()
            .map(|id| {
                ReceivedMessage::new(
                    Bytes::new(),
                    Default::default(),
                    (*id).to_owned(),
                    AckId::from_text(*id),
                )
            })
            .collect()
    }

    #[test]
    fn fetched_batches_hand_out_messages_in_order_with_their_tokens() {
        let mut q = Fetched::default();
        q.push(batch(&["a", "b"]), 10);
        q.push(batch(&[]), 12);
        q.push(batch(&["c"]), 12);
        assert_eq!(q.len(), 3);
        let (m, t) = q.pop_front().unwrap();
        assert_eq!((m.id.as_str(), t), ("a", 10));
        let (m, t) = q.pop_front().unwrap();
        assert_eq!((m.id.as_str(), t), ("b", 11));
        q.push(batch(&["d", "e"]), 13);
        assert_eq!(q.len(), 3);
        let rest: Vec<(String, u64)> = q.drain().map(|(m, t)| (m.id, t)).collect();
        assert_eq!(rest, [("c".into(), 12), ("d".into(), 13), ("e".into(), 14)]);
        assert!(q.is_empty() && q.pop_front().is_none());
    }

    #[test]
    fn retained_messages_keep_their_order_and_tokens() {
        let mut q = Fetched::default();
        q.push(batch(&["a", "b", "c", "d"]), 10);
        q.push(batch(&["e"]), 14);
        q.push(batch(&["f", "g"]), 20);
        let _ = q.pop_front();
        let dropped = q.retain(|m| !["c", "e", "f"].contains(&m.id.as_str()));
        assert_eq!(dropped, [12, 14, 20]);
        assert_eq!(q.len(), 3);
        let rest: Vec<(String, u64)> = q.drain().map(|(m, t)| (m.id, t)).collect();
        assert_eq!(rest, [("b".into(), 11), ("d".into(), 13), ("g".into(), 21)]);
    }

    /// A fake driver that takes deliveries back: those of ids in `gone`.
    #[derive(Debug, Default)]
    struct TakesBack {
        calls: AtomicUsize,
        revocations: Arc<AtomicU64>,
        gone: Mutex<std::collections::HashSet<u64>>,
    }

    impl TakesBack {
        fn take_back(&self, ids: &[u64]) {
            lock(&self.gone).extend(ids);
            self.revocations.fetch_add(1, Ordering::AcqRel);
        }
    }

    #[async_trait]
    impl driver::Subscription for TakesBack {
        fn driver_name(&self) -> &'static str {
            "fake"
        }

        fn resource(&self) -> &str {
            "fake"
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }

        async fn receive_batch(&self, _max: usize) -> Result<Vec<ReceivedMessage>> {
            let batch = |ids: std::ops::Range<u64>| {
                ids.map(|id| {
                    ReceivedMessage::new(
                        Bytes::new(),
                        Default::default(),
                        id.to_string(),
                        AckId::from_u64(id),
                    )
                })
                .collect()
            };
            match self.calls.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(batch(0..10)),
                1 => {
                    // Taken back while this very batch is being fetched.
                    self.take_back(&[11]);
                    Ok(batch(10..13))
                }
                _ => std::future::pending().await,
            }
        }

        async fn send_acks(&self, _ids: &[AckId]) -> Result<(), BatchError> {
            Ok(())
        }

        fn revocations(&self) -> Option<Arc<AtomicU64>> {
            Some(self.revocations.clone())
        }

        fn is_current(&self, ack_id: &AckId) -> bool {
            !lock(&self.gone).contains(&ack_id.as_u64().unwrap())
        }
    }

    #[tokio::test]
    async fn messages_the_driver_took_back_are_never_handed_out() {
        let d = Arc::new(TakesBack::default());
        let sub = Subscription::with_options(d.clone(), SubscriptionOptions::default());
        let first = sub.receive().await.unwrap();
        assert_eq!(first.id(), Some("0"));
        d.take_back(&[3, 4, 5]);
        let mut ids = Vec::new();
        for _ in 0..8 {
            let m = tokio::time::timeout(Duration::from_secs(5), sub.receive())
                .await
                .expect("the rest arrives")
                .unwrap();
            ids.push(m.id().unwrap().to_owned());
            m.ack();
        }
        assert_eq!(ids, ["1", "2", "6", "7", "8", "9", "10", "12"]);
        let stats = sub.stats();
        assert_eq!((stats.revoked, stats.queued), (4, 0));
        first.ack();
        sub.shutdown().await.unwrap();
    }

    #[test]
    fn batch_size_grows_at_most_twice_and_shrinks_at_most_by_a_quarter() {
        let t0 = Instant::now();
        let mut s = BatchSizer::new(10_000);
        s.since = t0;
        s.handed = 1000;
        assert_eq!(s.next(t0 + Duration::from_millis(10)), 2, "x2 at most");
        s.handed = 1000;
        assert_eq!(s.next(t0 + Duration::from_millis(20)), 4);
        for i in 0..20 {
            s.handed = 100_000;
            s.next(t0 + Duration::from_millis(30 + i));
        }
        assert_eq!(s.current(), 10_000, "capped by the driver");
        s.handed = 0;
        assert_eq!(
            s.next(t0 + Duration::from_millis(500)),
            7500,
            "x0.75 at most"
        );
        // Ten idle seconds decay ten steps at once.
        let n = s.next(t0 + Duration::from_millis(10_500));
        assert_eq!(n, (7500.0 * 0.75f64.powi(10)) as usize);
    }
}
