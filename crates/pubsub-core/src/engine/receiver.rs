//! The receiving engine: the queue of fetched messages, the fetches that
//! fill it, the hand-out to receivers, and shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::fetched::Fetched;
use super::leases::{keep_leases, Leases};
use super::lock;
use super::settle::{FailureSlot, Settler};
use super::sizer::BatchSizer;
use crate::driver::{self, Capabilities, Deliveries, Nacked, ReceivedMessage};
use crate::error::{Error, Result};
use crate::metric::{Labels, ReceiveMetrics};
use crate::options::{NackBackoff, SubscriptionOptions};
use crate::retry::RetryPolicy;

/// One subscription's engine, shared by every clone of its handle and by
/// every message it handed out.
pub(crate) struct Receiver {
    pub(crate) driver: Arc<dyn driver::Subscription>,
    pub(crate) caps: Capabilities,
    /// The driver's answers about its deliveries, if it gives any.
    deliveries: Option<Arc<dyn Deliveries>>,
    pub(crate) state: Mutex<RecvState>,
    /// Wakes receivers when messages, an error or shutdown arrive.
    ready: Arc<Notify>,
    /// Wakes `shutdown` when the last fetch ends.
    fetch_done: Notify,
    waiting: AtomicUsize,
    pub(crate) settler: Settler,
    pub(crate) leases: Arc<Leases>,
    failure: Arc<FailureSlot>,
    shut_down: AtomicBool,
    stop: watch::Sender<bool>,
    next_token: AtomicU64,
    retry: RetryPolicy,
    runtime: Handle,
    /// The lease keeper, awaited on shutdown so no extension follows close.
    keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Stops the lease keeper: later than `stop`, so that the leases of
    /// messages still being handled are kept while shutdown waits for them.
    keeper_stop: watch::Sender<bool>,
    /// Handlers `handle_concurrently` is running, which shutdown waits for.
    handlers: AtomicUsize,
    handlers_done: Notify,
    drain_timeout: Duration,
    /// The redelivery delay of a nacked message.
    pub(crate) nack_backoff: NackBackoff,
    metrics: ReceiveMetrics,
    /// The consumer span's name (`process <subscription>`) where received
    /// messages get consumer spans; made once, not a message.
    #[cfg(feature = "opentelemetry")]
    pub(crate) trace: Option<Box<str>>,
}

tokio::task_local! {
    /// The receiver whose handler the current task runs, so a shutdown
    /// called from inside a handler does not wait for that handler itself.
    pub(crate) static IN_HANDLER: usize;
}

/// Counts one running handler until dropped.
pub(crate) struct HandlerGuard(Arc<Receiver>);

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        self.0.handlers.fetch_sub(1, Ordering::AcqRel);
        self.0.handlers_done.notify_waiters();
    }
}

pub(crate) struct RecvState {
    pub(crate) queue: Fetched,
    /// Messages handed out; counted here, under the lock already held,
    /// rather than in an atomic of their own.
    pub(crate) received: u64,
    fetches: usize,
    error: Option<Error>,
    pub(crate) sizer: BatchSizer,
    /// The driver's count of deliveries taken back, when the queue was last
    /// checked against it.
    taken_back_seen: u64,
    /// Queued messages dropped because the driver took them back.
    pub(crate) revoked: u64,
    /// This handle's share of the queue-depth gauge as last reported.
    reported_queued: usize,
}

/// Decrements the waiting count when a receiver stops waiting, however it
/// stops (including being dropped).
struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Receiver {
    /// Must be called within a Tokio runtime.
    pub(crate) fn new(
        driver: Arc<dyn driver::Subscription>,
        options: SubscriptionOptions,
    ) -> Arc<Self> {
        let caps = driver.capabilities();
        let limits = options.ack_batching.merge(caps.ack_batching);
        let per_call = caps.max_receive_batch.max(1);
        let driver_cap = per_call * caps.max_concurrent_receives.max(1);
        let max_batch = options
            .max_receive_batch
            .map_or(driver_cap, |n| n.min(driver_cap));
        let leases = Arc::new(Leases::new(
            caps.lease_extension
                && caps.ack_deadline.is_some()
                && !options.max_lease_extension.is_zero(),
            caps.ack_deadline.unwrap_or(Duration::from_secs(60)),
            options.max_lease_extension,
        ));
        let ready = Arc::new(Notify::new());
        let failure = Arc::new(FailureSlot::new(ready.clone()));
        let labels = Labels::subscription(
            caps.messaging_system_or(driver.driver_name()),
            driver.resource(),
        );
        let settler = Settler::new(
            driver.clone(),
            &caps,
            limits,
            options.retry,
            leases.clone(),
            failure.clone(),
            &labels,
        );
        let deliveries = driver.deliveries();
        let taken_back_seen = deliveries.as_ref().map_or(0, |d| d.taken_back());
        let (stop, _) = watch::channel(false);
        let (keeper_stop, _) = watch::channel(false);
        let keeper = leases.enabled.then(|| {
            let extender = settler.extender(limits, leases.deadline);
            tokio::spawn(keep_leases(
                leases.clone(),
                extender,
                keeper_stop.subscribe(),
            ))
        });
        #[cfg(feature = "opentelemetry")]
        let trace = crate::trace::span_name(options.trace_context, "process", driver.resource());
        Arc::new(Receiver {
            driver,
            caps,
            deliveries,
            state: Mutex::new(RecvState {
                queue: Fetched::default(),
                received: 0,
                fetches: 0,
                error: None,
                sizer: BatchSizer::new(max_batch),
                taken_back_seen,
                revoked: 0,
                reported_queued: 0,
            }),
            ready,
            fetch_done: Notify::new(),
            waiting: AtomicUsize::new(0),
            settler,
            leases,
            failure,
            shut_down: AtomicBool::new(false),
            stop,
            next_token: AtomicU64::new(0),
            retry: options.retry,
            runtime: Handle::current(),
            keeper: Mutex::new(keeper),
            keeper_stop,
            handlers: AtomicUsize::new(0),
            handlers_done: Notify::new(),
            drain_timeout: options.drain_timeout,
            nack_backoff: options.nack_backoff,
            #[cfg(feature = "opentelemetry")]
            trace,
            metrics: ReceiveMetrics::new(&labels),
        })
    }

    /// Nacks one delivery after its delay: at once where there is none or
    /// the backend waits by itself, otherwise held here (its lease kept)
    /// until it is due.
    pub(crate) fn nack(self: &Arc<Self>, mut nacked: Nacked) {
        let delay = std::mem::take(&mut nacked.delay);
        let token = nacked.token;
        if !delay.is_zero() {
            match self.caps.max_nack_delay {
                Some(max) => nacked.delay = delay.min(max),
                None => match self.settler.hold(nacked) {
                    Some(not_held) => nacked = not_held,
                    None => {
                        let this = Arc::downgrade(self);
                        // Only a weak reference waits, so a subscription
                        // dropped meanwhile is not kept alive by its nacks.
                        self.runtime.spawn(async move {
                            tokio::time::sleep(delay).await;
                            if let Some(this) = this.upgrade() {
                                this.settler.release_held(token);
                            }
                        });
                        return;
                    }
                },
            }
        }
        self.settler.nack(nacked);
    }

    /// Counts a handler as running until the guard is dropped; shutdown
    /// waits for it (up to the drain timeout) before sending the last acks.
    pub(crate) fn handler_started(self: &Arc<Self>) -> HandlerGuard {
        self.handlers.fetch_add(1, Ordering::AcqRel);
        HandlerGuard(self.clone())
    }

    /// The id `IN_HANDLER` holds for this receiver's handlers.
    pub(crate) fn handler_scope(&self) -> usize {
        self as *const Receiver as usize
    }

    /// Waits for the running handlers, up to the drain timeout; not for
    /// the one calling, if a handler calls shutdown.
    async fn drain_handlers(&self) {
        let own = IN_HANDLER
            .try_with(|id| *id == self.handler_scope())
            .unwrap_or(false);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        loop {
            let done = self.handlers_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let running = self.handlers.load(Ordering::Acquire);
            if running <= usize::from(own) {
                return;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                tracing::warn!(
                    running,
                    timeout = ?self.drain_timeout,
                    "shutting down with handlers still running; their acks will not be sent"
                );
                return;
            }
        }
    }

    /// The driver's answers about its deliveries, for describing a message
    /// lazily.
    pub(crate) fn deliveries(&self) -> Option<&dyn Deliveries> {
        self.deliveries.as_deref()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }

    /// `e` with the driver, resource and operation, where not already set.
    pub(crate) fn error(&self, e: Error, op: &str) -> Error {
        e.with_context_default("driver", self.driver.driver_name())
            .with_context_default("resource", self.driver.resource())
            .with_context_default("operation", op)
    }

    /// What `receive` returns without waiting: a queued message made into
    /// `R` by `make`, or the error that ends receiving; `None` if it must
    /// wait.
    ///
    /// The message is read out of the queue and built in one place, without
    /// intermediate wrappers: each wrapper around a message is another copy
    /// of it, and this runs once a message.
    #[inline]
    pub(crate) fn try_receive<R, F>(self: &Arc<Self>, make: F) -> Option<Result<R>>
    where
        F: FnOnce(ReceivedMessage, u64, Arc<Receiver>) -> R,
    {
        let mut st = lock(&self.state);
        if let Some(e) = self.receive_error() {
            return Some(Err(e));
        }
        self.check_taken_back(&mut st);
        match st
            .queue
            .pop_front_with(|m, token| self.hand_out(m, token, make))
        {
            Some(m) => {
                self.taken(&mut st);
                drop(st);
                Some(Ok(m))
            }
            None => st.error.clone().map(Err),
        }
    }

    /// The next message made into `R` by `make`, waiting for one.
    /// Cancel-safe: a message is taken from the queue only when it is
    /// returned.
    pub(crate) async fn receive<R, F>(self: &Arc<Self>, make: F) -> Result<R>
    where
        F: Fn(ReceivedMessage, u64, Arc<Receiver>) -> R,
    {
        let d = &*self.driver;
        let span =
            tracing::debug_span!("receive", driver = d.driver_name(), resource = d.resource());
        async {
            loop {
                let notified = self.ready.notified();
                tokio::pin!(notified);
                {
                    let mut st = lock(&self.state);
                    if let Some(e) = self.receive_error() {
                        return Err(e);
                    }
                    self.check_taken_back(&mut st);
                    if let Some(m) = st
                        .queue
                        .pop_front_with(|m, token| self.hand_out(m, token, &make))
                    {
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
        .instrument(span)
        .await
    }

    /// Why receiving cannot go on regardless of the queue, if it cannot.
    fn receive_error(&self) -> Option<Error> {
        if self.is_shut_down() {
            return Some(self.error(
                Error::failed_precondition("subscription has been shut down"),
                "receive",
            ));
        }
        self.failure.get()
    }

    /// The driver's count of deliveries taken back; 0, never moving, for
    /// drivers that take nothing back.
    #[inline]
    fn taken_back(&self) -> u64 {
        self.deliveries.as_ref().map_or(0, |d| d.taken_back())
    }

    /// Drops the queued messages the driver has taken back since the queue
    /// was last checked. Called with the state locked before each hand-out,
    /// so a message of a revoked Kafka partition is never handed out once
    /// the revocation is known.
    #[inline]
    fn check_taken_back(&self, st: &mut RecvState) {
        let now = self.taken_back();
        if now != st.taken_back_seen {
            self.drop_taken_back(st, now);
        }
    }

    #[cold]
    fn drop_taken_back(&self, st: &mut RecvState, now: u64) {
        st.taken_back_seen = now;
        let Some(d) = &self.deliveries else {
            return;
        };
        let dropped = st.queue.retain(|m| d.is_current(&m.ack_id));
        if !dropped.is_empty() {
            tracing::debug!(
                messages = dropped.len(),
                "dropped queued messages the backend took back"
            );
            st.revoked += dropped.len() as u64;
            self.leases.release(dropped.into_iter());
            self.report_queued(st);
        }
    }

    /// Makes a message taken from the queue into what `receive` returns.
    #[inline]
    fn hand_out<R>(
        self: &Arc<Self>,
        m: ReceivedMessage,
        token: u64,
        make: impl FnOnce(ReceivedMessage, u64, Arc<Receiver>) -> R,
    ) -> R {
        if m.delivery_attempt.is_some_and(|n| n > 1) {
            self.metrics.redelivered.increment(1);
        }
        make(m, token, self.clone())
    }

    /// Moves the queue-depth gauge by this handle's change since it last
    /// reported, so that handles on one subscription (one gauge, by its
    /// labels) add up instead of overwriting each other.
    fn report_queued(&self, st: &mut RecvState) {
        let now = st.queue.len();
        let was = std::mem::replace(&mut st.reported_queued, now);
        if now > was {
            self.metrics.queued.increment((now - was) as f64);
        } else if now < was {
            self.metrics.queued.decrement((was - now) as f64);
        }
    }

    /// Called with the state locked once a message was taken from the
    /// queue.
    fn taken(self: &Arc<Self>, st: &mut RecvState) {
        st.received += 1;
        st.sizer.handed += 1;
        self.metrics.consumed.increment(1);
        self.report_queued(st);
        self.maybe_fetch(st);
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
        if st.fetches > 0 || st.error.is_some() || self.is_shut_down() {
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
        struct Guard<'a>(&'a Receiver, bool);
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
            let taken_back = self.taken_back();
            let got = tokio::select! {
                r = d.receive_batch(max).instrument(span) => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            match got {
                Ok(batch) => {
                    let now = Instant::now();
                    self.metrics.receive.record_took(batch.len(), now - asked);
                    let base = self
                        .next_token
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.leases.hold(&batch, base, now);
                    let ask_again = {
                        let mut st = lock(&self.state);
                        let empty = batch.is_empty();
                        st.queue.push(batch, base);
                        self.report_queued(&mut st);
                        // Read under the lock, where receivers check it:
                        // deliveries taken back while this batch was fetched
                        // or on its way here are dropped before any
                        // receiver can take them.
                        let now = self.taken_back();
                        if now != taken_back {
                            self.drop_taken_back(&mut st, now);
                        }
                        if empty && self.waiting.load(Ordering::Acquire) > 0 && !self.is_shut_down()
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
                    self.metrics.receive.retries.increment(1);
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

    /// Extends one held message's lease.
    pub(crate) async fn extend(&self, id: &driver::AckId, token: u64, by: Duration) -> Result<()> {
        if !self.caps.lease_extension {
            return Err(self.error(
                Error::unimplemented("this backend cannot extend leases"),
                "extend lease",
            ));
        }
        if self.is_shut_down() {
            return Err(self.error(
                Error::failed_precondition("subscription has been shut down"),
                "extend lease",
            ));
        }
        self.settler
            .extend(id, token, by)
            .await
            .map_err(|e| self.error(e, "extend lease"))
    }

    /// Stops fetching, nacks what was fetched and never handed out, sends
    /// every pending ack and nack, and closes the driver.
    pub(crate) async fn shutdown(self: &Arc<Self>) -> Result<()> {
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
        let unreceived: Vec<Nacked> = {
            let mut st = lock(&self.state);
            // Deliveries taken back are dropped, not nacked.
            self.check_taken_back(&mut st);
            let unreceived = st
                .queue
                .drain()
                .map(|(m, token)| Nacked::unreceived(m, token))
                .collect();
            self.report_queued(&mut st);
            unreceived
        };
        self.leases.release(unreceived.iter().map(|n| n.token));
        // The driver is still open, so a driver that settles locally
        // settles these too.
        self.settler.nack_unreceived(unreceived);
        // Receives now fail, so no handler starts; those running finish
        // and settle before the last acks go out.
        self.drain_handlers().await;
        // Nacks waiting out their delay go now, to whoever reads next.
        self.settler.release_all_held();
        self.keeper_stop.send_replace(true);
        self.settler.close().await;
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
