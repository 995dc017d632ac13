//! The receiving side of the user API.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::Stream;
use tracing::Instrument;

use crate::driver::{self, Capabilities};
use crate::engine::lock;
use crate::engine::receiver::{Receiver, IN_HANDLER};
use crate::error::Result;
use crate::message::Message;
use crate::options::SubscriptionOptions;

/// A handle for receiving messages from a subscription.
///
/// Cheap to clone; clones share one local queue, one prefetcher and one ack
/// batcher. `receive` may be called from many tasks at once.
#[derive(Clone)]
pub struct Subscription {
    engine: Arc<Receiver>,
}

/// Counters of one subscription, for monitoring.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Messages handed to the application.
    pub received: u64,
    /// Messages acked (an ack handed to the backend or queued for it).
    pub acked: u64,
    /// Messages nacked, including dropped ones, on a backend that can nack.
    pub nacked: u64,
    /// Nacks on a backend that cannot nack: nothing is sent, and the
    /// message comes back once its ack deadline passes.
    pub nacks_left_to_deadline: u64,
    /// Acks and nacks made after shutdown began: not sent, so the backend
    /// redelivers those messages.
    pub late_settlements: u64,
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
        Subscription {
            engine: Receiver::new(driver, options),
        }
    }

    /// The next message, waiting until one arrives.
    ///
    /// Cancel-safe: dropping the future never loses a message. Fails with
    /// `FailedPrecondition` after `shutdown`, and with the first permanent
    /// receive or ack error, which fails the subscription for good.
    pub async fn receive(&self) -> Result<Message> {
        // A queued message is handed out without waiting: like a Tokio
        // channel's receive, this yields once the task's budget is spent,
        // so a receive loop cannot starve the worker's other tasks.
        tokio::task::consume_budget().await;
        // Under load a message is usually queued already: hand it out
        // without the receive call's debug span and the machinery of
        // waiting, whose setup and layers cost more than the hand-over
        // itself. Either way the message gets its consumer span.
        if let Some(r) = self.engine.try_receive(Message::from_received) {
            return traced(r);
        }
        traced(self.engine.receive(Message::from_received).await)
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
    /// [`shutdown`](Self::shutdown) drains: it stops handing out messages,
    /// waits for the running handlers (up to
    /// [`SubscriptionOptions::drain_timeout`](crate::SubscriptionOptions::drain_timeout)),
    /// then sends their acks, so work already done is not redelivered.
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
                    // Counted before it runs, so a shutdown from now on
                    // waits for it.
                    let guard = self.engine.handler_started();
                    let scope = self.engine.handler_scope();
                    #[cfg(feature = "opentelemetry")]
                    let span = m.span();
                    let work = async move {
                        let _running = guard;
                        h(m).await
                    };
                    // The handler runs in the message's consumer span.
                    #[cfg(feature = "opentelemetry")]
                    let work = tracing::Instrument::instrument(work, span);
                    running.spawn(IN_HANDLER.scope(scope, work));
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
        let d = &*self.engine.driver;
        let span = tracing::debug_span!(
            "subscription_shutdown",
            driver = d.driver_name(),
            resource = d.resource()
        );
        self.engine.shutdown().instrument(span).await
    }

    /// Whether `shutdown` has been called on any clone.
    pub fn is_shut_down(&self) -> bool {
        self.engine.is_shut_down()
    }

    /// What the backend can do.
    pub fn capabilities(&self) -> &Capabilities {
        &self.engine.caps
    }

    /// Counters since this subscription was opened.
    pub fn stats(&self) -> SubscriptionStats {
        let e = &self.engine;
        let (received, receive_batch_size, queued, revoked) = {
            let st = lock(&e.state);
            (st.received, st.sizer.current(), st.queue.len(), st.revoked)
        };
        let settled = &e.settler;
        SubscriptionStats {
            received,
            acked: settled.acked.load(Ordering::Relaxed),
            nacked: settled.nacked.load(Ordering::Relaxed),
            nacks_left_to_deadline: settled.unnackable.load(Ordering::Relaxed),
            late_settlements: settled.late.load(Ordering::Relaxed),
            dropped_unsettled: settled.dropped.load(Ordering::Relaxed),
            receive_batch_size,
            queued,
            revoked,
        }
    }

    /// The backend's own client, if it is a `T`: the typed escape hatch.
    /// Each driver documents the type it exposes.
    pub fn as_raw<T: Any>(&self) -> Option<&T> {
        self.engine.driver.raw()?.downcast_ref::<T>()
    }
}

/// A received message with its consumer span, made here, out of the
/// receive queue's lock and in the caller's context.
#[inline]
#[cfg_attr(not(feature = "opentelemetry"), allow(unused_mut))]
fn traced(mut r: Result<Message>) -> Result<Message> {
    #[cfg(feature = "opentelemetry")]
    if let Ok(m) = &mut r {
        m.start_span();
    }
    r
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
            .field("driver", &self.engine.driver.driver_name())
            .field("resource", &self.engine.driver.resource())
            .field("shut_down", &self.is_shut_down())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::driver::{AckId, BatchError, Deliveries, Nacked, ReceivedMessage, Settlement};
    use crate::error::{Error, ErrorKind};
    use async_trait::async_trait;
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
        fn send_acks<'a>(&'a self, _ids: &'a [AckId]) -> Settlement<'a> {
            Settlement::later(async {
                Err(Error::new(ErrorKind::PermissionDenied, "no acks for you").into())
            })
        }
    }

    #[tokio::test(start_paused = true)]
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

    /// A fake driver that cannot nack (as SQS with no visibility change,
    /// or any backend without `Capabilities::nack`).
    #[derive(Debug)]
    struct CannotNack;

    #[async_trait]
    impl driver::Subscription for CannotNack {
        fn driver_name(&self) -> &'static str {
            "fake"
        }
        fn resource(&self) -> &str {
            "cannot-nack"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                nack: false,
                ..Capabilities::default()
            }
        }
        async fn receive_batch(&self, _max: usize) -> Result<Vec<ReceivedMessage>> {
            Ok(vec![ReceivedMessage::new(
                Bytes::from_static(b"x"),
                Default::default(),
                "1".into(),
                AckId::from_u64(1),
            )])
        }
        fn send_acks<'a>(&'a self, _ids: &'a [AckId]) -> Settlement<'a> {
            Settlement::done(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nacks_the_backend_cannot_make_are_not_counted_as_nacked() {
        let sub = Subscription::new(CannotNack);
        sub.receive().await.unwrap().nack();
        drop(sub.receive().await.unwrap());
        let stats = sub.stats();
        assert_eq!(stats.nacked, 0, "{stats:?}");
        assert_eq!(stats.nacks_left_to_deadline, 2, "{stats:?}");
        sub.shutdown().await.unwrap();
    }

    type NackedCopy = (AckId, Bytes, crate::Attributes, Option<String>, Option<u32>);

    /// A fake driver whose settlement is local bookkeeping, recording what
    /// reaches it, and how.
    #[derive(Debug, Default)]
    struct AcksAtOnce {
        sent: AtomicUsize,
        acked: Mutex<Vec<AckId>>,
        /// Each nack's id, and the body, attributes, ordering key and
        /// attempt it handed back.
        nacked: Mutex<Vec<NackedCopy>>,
        /// Calls with more than one item: batched, not settled at once.
        batches: AtomicUsize,
        /// Messages beyond the three every test gets.
        extra: usize,
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
                local_settlement: true,
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
        fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
            if ids.len() > 1 {
                self.batches.fetch_add(1, Ordering::SeqCst);
            }
            lock(&self.acked).extend(ids.iter().cloned());
            Settlement::done(Ok(()))
        }
        fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
            if nacks.len() > 1 {
                self.batches.fetch_add(1, Ordering::SeqCst);
            }
            lock(&self.nacked).extend(nacks.iter().map(|n| {
                (
                    n.ack_id.clone(),
                    n.body.clone(),
                    n.attributes.clone(),
                    n.ordering_key.clone(),
                    n.delivery_attempt,
                )
            }));
            Settlement::done(Ok(()))
        }
        async fn extend_leases(&self, _ids: &[AckId], _by: Duration) -> Result<(), BatchError> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nacks_settled_at_once_hand_back_each_message_as_delivered() {
        let d = Arc::new(AcksAtOnce {
            extra: 1,
            ..AcksAtOnce::default()
        });
        let sub = Subscription::with_options(d.clone(), at_once());
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
            lock(&sub.engine.leases.held).len(),
            1,
            "their leases are let go"
        );
        plain.nack();
        let now = std::mem::take(&mut *lock(&d.nacked));
        let ids: Vec<_> = now.iter().map(|(id, ..)| id.as_u64()).collect();
        assert_eq!(
            ids,
            [Some(3), Some(0), Some(1), Some(2)],
            "settled before nack returns"
        );
        for (_, body, attributes, ordering_key, attempt) in &now {
            assert_eq!(body, "x");
            assert!(attributes.is_empty() && ordering_key.is_none());
            assert_eq!(*attempt, Some(1));
        }
        assert_eq!(d.batches.load(Ordering::SeqCst), 0, "nothing batched");
        assert_eq!(sub.stats().nacked, 4);
        assert_eq!(sub.stats().dropped_unsettled, 2);
        sub.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn local_settlements_skip_the_batchers_and_release_their_leases() {
        let d = Arc::new(AcksAtOnce::default());
        let sub = Subscription::with_options(d.clone(), at_once());
        let a = sub.receive().await.unwrap();
        let b = sub.receive().await.unwrap();
        let late = sub.receive().await.unwrap();
        assert_eq!(
            lock(&sub.engine.leases.held).len(),
            3,
            "held while unsettled"
        );
        a.ack();
        assert_eq!(lock(&d.acked).len(), 1, "settled before ack returns");
        assert_eq!(
            lock(&sub.engine.leases.held).len(),
            2,
            "its lease is let go"
        );
        b.nack();
        sub.shutdown().await.unwrap();
        late.ack();
        let now: Vec<_> = lock(&d.acked).iter().map(AckId::as_u64).collect();
        assert_eq!(now, [Some(0)], "a late ack is ignored");
        let nacked: Vec<_> = lock(&d.nacked).iter().map(|(id, ..)| id.as_u64()).collect();
        assert_eq!(nacked, [Some(1)], "settled at once too");
        assert_eq!(d.batches.load(Ordering::SeqCst), 0);
        assert_eq!(sub.stats().acked, 1, "the late ack is not counted as acked");
        assert_eq!(sub.stats().late_settlements, 1);
    }

    /// Options under which a nack is sent as it is made.
    fn at_once() -> SubscriptionOptions {
        SubscriptionOptions::default().with_nack_backoff(crate::NackBackoff::none())
    }

    fn nacked_ids(d: &AcksAtOnce) -> Vec<Option<u64>> {
        let mut ids: Vec<_> = lock(&d.nacked).iter().map(|(id, ..)| id.as_u64()).collect();
        ids.sort_unstable();
        ids
    }

    #[tokio::test(start_paused = true)]
    async fn nacks_wait_out_their_backoff_where_the_backend_cannot_delay() {
        let d = Arc::new(AcksAtOnce {
            extra: 1,
            ..AcksAtOnce::default()
        });
        let backoff = crate::NackBackoff::fixed(Duration::from_secs(1));
        let sub = Subscription::with_options(
            d.clone(),
            SubscriptionOptions::default().with_nack_backoff(backoff),
        );
        let started = tokio::time::Instant::now();
        let nacked = sub.receive().await.unwrap();
        let kept = sub.receive().await.unwrap();
        let dropped = sub.receive().await.unwrap();
        let own = sub.receive().await.unwrap();
        nacked.nack();
        drop(dropped);
        own.nack_with_delay(Duration::from_secs(3600));
        assert_eq!(nacked_ids(&d), [], "held, not sent");
        assert_eq!(
            lock(&sub.engine.leases.held).len(),
            4,
            "the leases of held nacks are kept"
        );
        assert_eq!(sub.stats().nacked, 3, "counted when made");
        tokio::time::sleep(Duration::from_millis(990)).await;
        assert_eq!(nacked_ids(&d), [], "not before the backoff");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(nacked_ids(&d), [Some(0), Some(2)], "sent when due");
        assert_eq!(lock(&sub.engine.leases.held).len(), 2);
        sub.shutdown().await.unwrap();
        assert_eq!(
            nacked_ids(&d),
            [Some(0), Some(2), Some(3)],
            "shutdown sends what it holds"
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        kept.ack();
        assert_eq!(sub.stats().nacked, 3);
        assert_eq!(sub.stats().late_settlements, 1);
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
        fn send_acks<'a>(&'a self, _ids: &'a [AckId]) -> Settlement<'a> {
            Settlement::done(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
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
    struct Lazy(Arc<Counts>);

    #[derive(Debug, Default)]
    struct Counts {
        ids: AtomicUsize,
        raws: AtomicUsize,
    }

    impl Deliveries for Counts {
        fn describe_id(&self, ack_id: &AckId, at: (i64, i64)) -> String {
            self.ids.fetch_add(1, Ordering::SeqCst);
            format!("p{}/{}", ack_id.as_u64().unwrap_or_default(), at.0)
        }
        fn describe_raw(
            &self,
            _ack_id: &AckId,
            at: (i64, i64),
            ordering_key: Option<&str>,
        ) -> Option<Box<dyn Any + Send + Sync>> {
            self.raws.fetch_add(1, Ordering::SeqCst);
            Some(Box::new((at.1, ordering_key.map(str::to_owned))))
        }
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
        fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
            Some(self.0.clone())
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
        fn send_acks<'a>(&'a self, _ids: &'a [AckId]) -> Settlement<'a> {
            Settlement::done(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
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

    /// A fake driver that takes deliveries back: those of ids in `gone`.
    #[derive(Debug, Default)]
    struct TakesBack {
        calls: AtomicUsize,
        gone: Arc<Gone>,
    }

    #[derive(Debug, Default)]
    struct Gone {
        count: AtomicU64,
        ids: Mutex<std::collections::HashSet<u64>>,
    }

    impl TakesBack {
        fn take_back(&self, ids: &[u64]) {
            lock(&self.gone.ids).extend(ids);
            self.gone.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    impl Deliveries for Gone {
        fn taken_back(&self) -> u64 {
            self.count.load(Ordering::Acquire)
        }

        fn is_current(&self, ack_id: &AckId) -> bool {
            !lock(&self.ids).contains(&ack_id.as_u64().unwrap())
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

        fn send_acks<'a>(&'a self, _ids: &'a [AckId]) -> Settlement<'a> {
            Settlement::done(Ok(()))
        }

        fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
            Some(self.gone.clone())
        }
    }

    #[tokio::test(start_paused = true)]
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
}
