//! Acks, nacks and lease extensions: settled at once where the driver's
//! bookkeeping is local, otherwise batched, and the first permanent failure
//! kept to fail the subscription.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument;

use super::batcher::{BatchHandler, Batcher};
use super::leases::{Leases, Settle};
use super::{lock, with_context};
use crate::driver::{self, AckId, BatchError, BatchLimits, Capabilities, Nacked, Settlement};
use crate::error::{Error, Result};
use crate::metric::{CallMetrics, Labels, SettleMetrics};
use crate::retry::RetryPolicy;

/// The first permanent ack or nack failure, which fails the subscription.
pub(crate) struct FailureSlot {
    error: Mutex<Option<Error>>,
    set: AtomicBool,
    /// Receivers, woken to report the failure.
    wake: Arc<Notify>,
}

impl FailureSlot {
    pub(crate) fn new(wake: Arc<Notify>) -> Self {
        FailureSlot {
            error: Mutex::new(None),
            set: AtomicBool::new(false),
            wake,
        }
    }

    pub(crate) fn get(&self) -> Option<Error> {
        if self.set.load(Ordering::Acquire) {
            lock(&self.error).clone()
        } else {
            None
        }
    }

    fn fail(&self, error: Error) {
        tracing::error!(%error, "acknowledgement failed; the subscription is now failed");
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(error);
            self.set.store(true, Ordering::Release);
        }
        drop(slot);
        self.wake.notify_waiters();
    }
}

/// Settles received messages with the driver.
pub(crate) struct Settler {
    driver: Arc<dyn driver::Subscription>,
    /// [`Capabilities::local_settlement`]: settle on the calling thread.
    local: bool,
    can_nack: bool,
    leases: Arc<Leases>,
    failure: Arc<FailureSlot>,
    acks: Batcher<Settle, AckHandler>,
    nacks: Batcher<Nacked, NackHandler>,
    retry: RetryPolicy,
    /// Set when shutdown begins: the driver is about to close, so late
    /// settlements go to the batchers, which refuse them.
    closed: AtomicBool,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Acks and nacks made after shutdown began, which were not sent.
    pub(crate) late: AtomicU64,
    /// Nacks on a backend that cannot nack, left to the ack deadline.
    pub(crate) unnackable: AtomicU64,
    /// Nacks waiting out their delay, by lease token; `None` once shutdown
    /// has sent them.
    held: Mutex<Option<HashMap<u64, Nacked>>>,
    metrics: Arc<SettleMetrics>,
    labels: Labels,
    /// `Message::extend_lease`'s calls, one lease each.
    extend_one: CallMetrics,
}

impl Settler {
    /// Must be called within a Tokio runtime.
    pub(crate) fn new(
        driver: Arc<dyn driver::Subscription>,
        caps: &Capabilities,
        limits: BatchLimits,
        retry: RetryPolicy,
        leases: Arc<Leases>,
        failure: Arc<FailureSlot>,
        labels: &Labels,
    ) -> Self {
        let metrics = Arc::new(SettleMetrics::new(labels));
        let common = Common {
            driver: driver.clone(),
            leases: leases.clone(),
            failure: failure.clone(),
            metrics: metrics.clone(),
        };
        Settler {
            acks: Batcher::new(
                limits,
                retry,
                Arc::new(AckHandler {
                    common: common.clone(),
                    extend: None,
                    call: labels.call("ack"),
                }),
            ),
            nacks: Batcher::new(
                limits,
                retry,
                Arc::new(NackHandler(common, labels.call("nack"))),
            ),
            driver,
            local: caps.local_settlement,
            can_nack: caps.nack,
            leases,
            failure,
            retry,
            closed: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            late: AtomicU64::new(0),
            unnackable: AtomicU64::new(0),
            held: Mutex::new(Some(HashMap::new())),
            metrics,
            labels: labels.clone(),
            extend_one: labels.call("extend"),
        }
    }

    /// The batcher that extends leases `by` a deadline, for the lease keeper.
    pub(crate) fn extender(
        &self,
        limits: BatchLimits,
        by: Duration,
    ) -> Batcher<Settle, AckHandler> {
        let handler = AckHandler {
            common: Common {
                driver: self.driver.clone(),
                leases: self.leases.clone(),
                failure: self.failure.clone(),
                metrics: self.metrics.clone(),
            },
            extend: Some(by),
            call: self.labels.call("extend"),
        };
        Batcher::new(limits, self.retry, Arc::new(handler))
    }

    /// Whether a settlement can go to the driver on the calling thread.
    #[inline]
    fn at_once(&self) -> bool {
        self.local && !self.closed.load(Ordering::Acquire)
    }

    /// Acks one delivery. Returns at once.
    #[inline]
    pub(crate) fn ack(&self, id: &AckId, token: u64) {
        if self.at_once()
            && self.settled(
                self.driver.send_acks(std::slice::from_ref(id)),
                token,
                "ack",
            )
        {
            self.count_ack();
            return;
        }
        let item = Settle {
            id: id.clone(),
            token,
        };
        if self.acks.add_detached(item, 0).is_ok() {
            self.count_ack();
        } else {
            self.late.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("ack after shutdown ignored; the backend will redeliver");
        }
    }

    fn count_ack(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.metrics.acked.increment(1);
    }

    fn count_nack(&self) {
        self.nacked.fetch_add(1, Ordering::Relaxed);
        self.metrics.nacked.increment(1);
    }

    /// Counts a message dropped unsettled; true for the first one.
    pub(crate) fn note_dropped(&self) -> bool {
        self.metrics.dropped.increment(1);
        self.dropped.fetch_add(1, Ordering::Relaxed) == 0
    }

    /// Nacks one delivery, handed over as delivered. Returns at once.
    pub(crate) fn nack(&self, nacked: Nacked) {
        if !self.can_nack {
            // Left to the ack deadline; stop keeping its lease alive.
            self.unnackable.fetch_add(1, Ordering::Relaxed);
            self.leases.release(std::iter::once(nacked.token));
            return;
        }
        if self.send_nack(nacked) {
            self.count_nack();
        } else {
            self.late.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("nack after shutdown ignored; the backend will redeliver");
        }
    }

    /// Sends a nack at once or batches it; false if refused after shutdown.
    fn send_nack(&self, nacked: Nacked) -> bool {
        if self.at_once() {
            let token = nacked.token;
            if self.settled(
                self.driver.send_nacks(std::slice::from_ref(&nacked)),
                token,
                "nack",
            ) {
                return true;
            }
        }
        self.nacks.add_detached(nacked, 0).is_ok()
    }

    /// Holds a nack until [`release_held`](Self::release_held) with its
    /// lease token or shutdown, keeping its lease, and counts it as nacked.
    /// Gives it back if it cannot be held: the backend cannot nack, or
    /// shutdown has begun.
    pub(crate) fn hold(&self, nacked: Nacked) -> Option<Nacked> {
        if !self.can_nack {
            return Some(nacked);
        }
        let mut held = lock(&self.held);
        let Some(map) = held.as_mut() else {
            return Some(nacked);
        };
        map.insert(nacked.token, nacked);
        drop(held);
        self.count_nack();
        None
    }

    /// Sends a held nack whose delay is over, unless shutdown sent it.
    pub(crate) fn release_held(&self, token: u64) {
        let nacked = lock(&self.held).as_mut().and_then(|m| m.remove(&token));
        if let Some(n) = nacked {
            self.send_held(n);
        }
    }

    /// Sends every held nack at once and holds no more, at shutdown.
    pub(crate) fn release_all_held(&self) {
        let held = lock(&self.held).take().unwrap_or_default();
        for (_, n) in held {
            self.send_held(n);
        }
    }

    /// Sends a held nack, already counted as nacked when it was held.
    fn send_held(&self, n: Nacked) {
        if !self.send_nack(n) {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the outcome of a settlement made on the calling thread. True if
    /// it is done with (settled, or failed for good); false if it must be
    /// batched (still pending, or failed for now).
    #[inline]
    fn settled(&self, call: Settlement<'_>, token: u64, op: &str) -> bool {
        match call.now() {
            Some(Ok(())) => {
                self.leases.release(std::iter::once(token));
                true
            }
            other => self.not_settled(other, token, op),
        }
    }

    #[cold]
    fn not_settled(&self, outcome: Option<Result<(), BatchError>>, token: u64, op: &str) -> bool {
        let error = match outcome {
            None | Some(Ok(())) => return false,
            Some(Err(BatchError::All(e))) => e,
            Some(Err(BatchError::Items(mut v))) => match v.pop() {
                Some((_, e)) => e,
                None => {
                    self.leases.release(std::iter::once(token));
                    return true;
                }
            },
        };
        if error.is_temporary() {
            return false;
        }
        let d = &*self.driver;
        self.failure.fail(
            error
                .with_context_default("driver", d.driver_name())
                .with_context_default("resource", d.resource())
                .with_context_default("operation", op),
        );
        self.leases.release(std::iter::once(token));
        true
    }

    /// Nacks messages fetched and never handed out, at shutdown, while the
    /// driver is still open.
    pub(crate) fn nack_unreceived(&self, unreceived: Vec<Nacked>) {
        if !self.can_nack || unreceived.is_empty() {
            return;
        }
        if self.local {
            let tokens: Vec<u64> = unreceived.iter().map(|n| n.token).collect();
            let done = self.driver.send_nacks(&unreceived).now();
            if matches!(done, Some(Ok(()))) {
                self.leases.release(tokens.into_iter());
                return;
            }
        }
        // Cannot fail: the nack batcher closes only in `close`.
        let _ = self.nacks.add_detached_many(unreceived);
    }

    /// Sends what is batched and refuses later settlements.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.acks.shutdown().await;
        self.nacks.shutdown().await;
    }

    /// Extends one lease at once, retrying temporary failures a few times.
    pub(crate) async fn extend(&self, id: &AckId, token: u64, by: Duration) -> Result<()> {
        let ids = std::slice::from_ref(id);
        let mut attempt = 0;
        loop {
            let started = self.extend_one.start();
            let r = self.driver.extend_leases(ids, by).await;
            self.extend_one.record(1, started);
            let e = match r {
                Ok(()) => break,
                Err(BatchError::All(e)) => e,
                Err(BatchError::Items(mut v)) => v
                    .pop()
                    .map(|(_, e)| e)
                    .unwrap_or_else(|| Error::internal("empty failure")),
            };
            if e.is_temporary() && attempt < 5 {
                self.extend_one.retries.increment(1);
                tokio::time::sleep(self.retry.backoff(attempt)).await;
                attempt += 1;
                continue;
            }
            return Err(e);
        }
        self.leases.extended(token, by);
        self.metrics.extended.increment(1);
        Ok(())
    }
}

/// What every settle handler needs.
#[derive(Clone)]
struct Common {
    driver: Arc<dyn driver::Subscription>,
    leases: Arc<Leases>,
    failure: Arc<FailureSlot>,
    metrics: Arc<SettleMetrics>,
}

/// Sends batches of acks, or of lease extensions by a duration.
pub(crate) struct AckHandler {
    common: Common,
    extend: Option<Duration>,
    call: CallMetrics,
}

impl BatchHandler<Settle> for AckHandler {
    async fn handle(&self, batch: &[Settle]) -> Result<(), BatchError> {
        let d = &*self.common.driver;
        let ids: Vec<AckId> = batch.iter().map(|s| s.id.clone()).collect();
        let started = self.call.start();
        let (name, res) = match self.extend {
            None => {
                self.common.leases.release(batch.iter().map(|s| s.token));
                let span = tracing::debug_span!(
                    "send_acks",
                    driver = d.driver_name(),
                    resource = d.resource(),
                    acks = ids.len()
                );
                ("ack", d.send_acks(&ids).instrument(span).await)
            }
            Some(by) => {
                let span = tracing::debug_span!(
                    "extend_leases",
                    driver = d.driver_name(),
                    resource = d.resource(),
                    leases = ids.len()
                );
                let r = d.extend_leases(&ids, by).instrument(span).await;
                let failed = match &r {
                    Ok(()) => 0,
                    Err(BatchError::All(_)) => ids.len(),
                    Err(BatchError::Items(f)) => f.len(),
                };
                let extended = ids.len().saturating_sub(failed) as u64;
                self.common.metrics.extended.increment(extended);
                ("extend lease", r)
            }
        };
        self.call.record(ids.len(), started);
        res.map_err(|e| with_context(e, d.driver_name(), d.resource(), name))
    }

    fn retrying(&self) {
        self.call.retries.increment(1);
    }

    fn unreported_failure(&self, error: Error) {
        if self.extend.is_some() {
            // The backend will redeliver; that is the only consequence.
            tracing::warn!(%error, "lease extension failed");
        } else {
            self.common.failure.fail(error);
        }
    }
}

/// Sends batches of nacks.
pub(crate) struct NackHandler(Common, CallMetrics);

impl BatchHandler<Nacked> for NackHandler {
    async fn handle(&self, batch: &[Nacked]) -> Result<(), BatchError> {
        let d = &*self.0.driver;
        self.0.leases.release(batch.iter().map(|n| n.token));
        let span = tracing::debug_span!(
            "send_nacks",
            driver = d.driver_name(),
            resource = d.resource(),
            nacks = batch.len()
        );
        let started = self.1.start();
        let r = d.send_nacks(batch).instrument(span).await;
        self.1.record(batch.len(), started);
        r.map_err(|e| with_context(e, d.driver_name(), d.resource(), "nack"))
    }

    fn retrying(&self) {
        self.1.retries.increment(1);
    }

    fn unreported_failure(&self, error: Error) {
        self.0.failure.fail(error);
    }
}
