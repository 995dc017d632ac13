//! The in-memory driver: the message model of a real broker, in process.
//!
//! A [`Broker`] holds topics and subscriptions. A topic fans every message
//! out to each subscription attached to it; a subscription gets only
//! messages sent after it was created and keeps each one until it is acked.
//! A delivery that is neither acked nor nacked within the subscription's ack
//! deadline is delivered again; a nacked one at once. Leases can be
//! extended. Deleting a topic or subscription makes later sends or receives
//! fail with `NotFound`.
//!
//! URLs (through [`crate::open_topic`] / [`crate::open_subscription`], on
//! [`Broker::global`]):
//! - topic `mem://NAME`: the topic is created if it does not exist yet;
//! - subscription `mem://TOPIC[?subscription=NAME][&ackdeadline=30s]`: with
//!   a name, the named subscription is opened (created on first use) so that
//!   several processes' handles share one backlog; without one, a new
//!   subscription of its own, deleted when that subscription is shut
//!   down. `ackdeadline` defaults to 60 s and must be more than zero.
//!
//! Escape hatches: [`crate::Topic::as_raw`] and
//! [`crate::Subscription::as_raw`] give the [`Broker`];
//! [`crate::Message::as_raw`] gives a [`Delivery`]; a before-send hook gets a
//! `&mut` [`Record`], an after-send hook the message's sequence number as a
//! `u64` (and as its id, the id its deliveries carry).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{mem::Broker, Message};
//! use std::time::Duration;
//!
//! let broker = Broker::new();
//! broker.create_topic("orders")?;
//! broker.create_subscription("billing", "orders", Duration::from_secs(30))?;
//! let topic = broker.topic("orders");
//! let sub = broker.subscription("billing");
//! topic.send(Message::new("order 1")).await?;
//! sub.receive().await?.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::driver::{Attributes, BatchLimits, Capabilities};
use crate::error::{Error, Result};
use crate::options::{SubscriptionOptions, TopicOptions};
use crate::registry::Registry;
use crate::subscription::Subscription;
use crate::token_map::TokenMap;
use crate::topic::Topic;

mod driver;
mod url;

pub use driver::{SubscriptionDriver, TopicDriver};
pub use url::{parse_duration, MemOpener};

/// The URL scheme of this driver.
pub const SCHEME: &str = "mem";

const DRIVER: &str = "mem";

/// Registers `mem://` with `registry`, opening on [`Broker::global`].
pub fn register(registry: &Registry) {
    registry.register(SCHEME, MemOpener);
}

/// The default ack deadline of a new subscription.
pub const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(60);

/// The largest message the in-memory broker takes by default, the same as
/// Google Cloud Pub/Sub's, so code that works here does not break there.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// The longest redelivery delay of a nack, as SQS's longest visibility
/// timeout: 12 hours.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(12 * 3600);

/// How long one `receive_batch` waits for a message before returning none.
const POLL: Duration = Duration::from_millis(500);

/// Acks held before the acking thread applies them itself: few enough
/// that a subscription nobody receives from any more keeps few acked
/// messages (closing applies the rest), enough that the acker rarely
/// takes the queue's lock.
const ACKS_HELD: usize = 64;

/// An in-process broker. Cheap to clone; clones share the same topics.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    topics: Mutex<HashMap<String, Arc<TopicState>>>,
    subs: Mutex<HashMap<String, Arc<SubState>>>,
    max_message_bytes: usize,
    anonymous: AtomicU64,
}

/// The stored content of a message; what a before-send hook may change.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Record {
    /// The payload.
    pub body: Bytes,
    /// The attributes.
    pub attributes: Attributes,
    /// The ordering key.
    pub ordering_key: Option<String>,
}

#[derive(Clone)]
struct Stored {
    seq: u64,
    record: Record,
}

/// What [`crate::Message::as_raw`] gives for an in-memory message.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// The message's sequence number within its topic.
    pub sequence: u64,
    /// This delivery's tag, unique within the subscription.
    pub tag: u64,
    /// How many times it was delivered, counting this one.
    pub attempt: u32,
}

struct TopicState {
    subs: RwLock<Vec<Arc<SubState>>>,
    next_seq: AtomicU64,
    deleted: AtomicBool,
}

struct SubState {
    ack_deadline: Duration,
    q: Mutex<SubQueue>,
    /// Messages sent since a receive last took them into `q`. Senders,
    /// receivers and ackers each have a lock of their own, so that none
    /// waits on the others: with one lock for all three, taking it was a
    /// fifth of a one-sender, one-receiver pipeline's time.
    incoming: Mutex<Vec<(Stored, u32)>>,
    /// Tags acked since `q` was last locked, applied by [`SubState::queue`]
    /// before anything reads `q`: an acked delivery is never redelivered.
    acked: Mutex<Vec<u64>>,
    notify: Notify,
    /// Receives waiting on `notify`; counted before they look at
    /// `incoming` a last time, senders read it after they push there.
    waiting: AtomicUsize,
    deleted: AtomicBool,
}

#[derive(Default)]
struct SubQueue {
    ready: VecDeque<(Stored, u32)>,
    outstanding: TokenMap<Outstanding>,
    /// The deadlines of received batches, oldest first: a batch's tags run
    /// on from `first` and share the deadline it was received with, read
    /// under the queue's lock, so they only grow and need no heap (a heap
    /// push a message cost a twentieth of the many-topic rows of the
    /// benchmark).
    received: VecDeque<BatchDeadline>,
    /// Deadlines set out of that order (extended leases, delayed nacks).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    next_tag: u64,
    /// The buffer `SubState::acked` gets back once its tags are applied.
    spare_acks: Vec<u64>,
}

/// The deadline the tags `first..end` of one received batch were given.
struct BatchDeadline {
    deadline: Instant,
    first: u64,
    end: u64,
}

struct Outstanding {
    msg: Stored,
    attempts: u32,
    deadline: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The queues stay consistent between statements; a panicking user
    // thread elsewhere must not poison the whole broker.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SubQueue {
    /// Moves deliveries whose deadline passed back to the front of the
    /// queue, earliest deadline (then tag) first, as one heap of them would.
    fn reap(&mut self, now: Instant) {
        loop {
            self.skip_settled_received();
            let batch = self.received.front().map(|b| (b.deadline, b.first));
            let other = self.deadlines.peek().map(|Reverse(d)| *d);
            let (deadline, tag, from_batch) = match (batch, other) {
                (Some(b), Some(o)) if o < b => (o.0, o.1, false),
                (Some(b), _) => (b.0, b.1, true),
                (None, Some(o)) => (o.0, o.1, false),
                (None, None) => break,
            };
            if deadline > now {
                break;
            }
            if from_batch {
                self.pop_received_tag();
            } else {
                self.deadlines.pop();
            }
            if self.is_due(tag, deadline) {
                let o = self.outstanding.remove(&tag).expect("present");
                self.ready.push_front((o.msg, o.attempts));
            }
        }
        // A delivery held at the front keeps every batch behind it queued,
        // settled or not: once they outnumber the outstanding deliveries,
        // its tag moves to the heap (same order there) and the settled ones
        // behind it go.
        while self.received.len() > self.outstanding.len() + 1024 {
            let Some(b) = self.received.front() else {
                break;
            };
            self.deadlines.push(Reverse((b.deadline, b.first)));
            self.pop_received_tag();
            self.skip_settled_received();
        }
        // Acked deliveries leave stale deadline entries behind; drop them
        // once they outnumber live ones so memory follows the backlog.
        if self.deadlines.len() > 2 * self.outstanding.len() + 1024 {
            let live = &self.outstanding;
            self.deadlines
                .retain(|Reverse((d, t))| live.get(t).is_some_and(|o| o.deadline == *d));
        }
    }

    /// Whether `tag` is outstanding with `deadline` as its deadline still.
    fn is_due(&self, tag: u64, deadline: Instant) -> bool {
        self.outstanding
            .get(&tag)
            .is_some_and(|o| o.deadline == deadline)
    }

    /// Drops the oldest batch's first tag.
    fn pop_received_tag(&mut self) {
        if let Some(b) = self.received.front_mut() {
            b.first += 1;
            if b.first >= b.end {
                self.received.pop_front();
            }
        }
    }

    /// Drops the leading tags of the oldest batches that were settled (or
    /// given another deadline): acks come mostly in the order of receipt,
    /// so this usually leaves few batches ahead of the first outstanding
    /// delivery (`reap` bounds the rest).
    fn skip_settled_received(&mut self) {
        while let Some(b) = self.received.front() {
            if self.is_due(b.first, b.deadline) {
                return;
            }
            self.pop_received_tag();
        }
    }

    /// Records that the tags `first..end` were received with `deadline`.
    fn record_received(&mut self, deadline: Instant, first: u64, end: u64) {
        if first < end {
            self.received.push_back(BatchDeadline {
                deadline,
                first,
                end,
            });
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let batch = self.received.front().map(|b| b.deadline);
        let other = self.deadlines.peek().map(|Reverse((d, _))| *d);
        batch.into_iter().chain(other).min()
    }
}

impl Default for Broker {
    fn default() -> Self {
        Self::new()
    }
}

impl Broker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::with_max_message_bytes(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// An empty broker that refuses messages over `max` bytes.
    pub fn with_max_message_bytes(max: usize) -> Self {
        Broker {
            inner: Arc::new(BrokerInner {
                topics: Mutex::new(HashMap::new()),
                subs: Mutex::new(HashMap::new()),
                max_message_bytes: max,
                anonymous: AtomicU64::new(0),
            }),
        }
    }

    /// The process-wide broker behind `mem://` URLs.
    pub fn global() -> &'static Broker {
        static GLOBAL: OnceLock<Broker> = OnceLock::new();
        GLOBAL.get_or_init(Broker::new)
    }

    /// Creates a topic; `AlreadyExists` if it does.
    pub fn create_topic(&self, name: &str) -> Result<()> {
        let mut topics = lock(&self.inner.topics);
        if topics.contains_key(name) {
            return Err(Error::new(
                crate::ErrorKind::AlreadyExists,
                format!("topic {name:?} already exists"),
            ));
        }
        topics.insert(name.to_owned(), Arc::new(TopicState::new()));
        Ok(())
    }

    fn ensure_topic(&self, name: &str) -> Arc<TopicState> {
        lock(&self.inner.topics)
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(TopicState::new()))
            .clone()
    }

    /// Deletes a topic: later sends to it fail with `NotFound`. Its
    /// subscriptions keep their backlog but get nothing new.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let t = lock(&self.inner.topics)
            .remove(name)
            .ok_or_else(|| Error::not_found(format!("topic {name:?} does not exist")))?;
        t.deleted.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates a subscription to `topic`, which gets every message sent to
    /// the topic from now on. `AlreadyExists` if the name is taken,
    /// `NotFound` if the topic does not exist, `InvalidArgument` for a zero
    /// ack deadline.
    pub fn create_subscription(
        &self,
        name: &str,
        topic: &str,
        ack_deadline: Duration,
    ) -> Result<()> {
        if ack_deadline.is_zero() {
            // A message would expire as it is handed out, and the lease
            // keeper would extend leases in a loop without pause.
            return Err(Error::invalid_argument(format!(
                "subscription {name:?}: the ack deadline must be more than zero"
            )));
        }
        let t = lock(&self.inner.topics)
            .get(topic)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("topic {topic:?} does not exist")))?;
        let mut subs = lock(&self.inner.subs);
        if subs.contains_key(name) {
            return Err(Error::new(
                crate::ErrorKind::AlreadyExists,
                format!("subscription {name:?} already exists"),
            ));
        }
        let s = Arc::new(SubState::new(ack_deadline));
        subs.insert(name.to_owned(), s.clone());
        t.subs.write().unwrap_or_else(|p| p.into_inner()).push(s);
        Ok(())
    }

    /// Deletes a subscription and its backlog: later receives fail with
    /// `NotFound`.
    pub fn delete_subscription(&self, name: &str) -> Result<()> {
        let s = lock(&self.inner.subs)
            .remove(name)
            .ok_or_else(|| Error::not_found(format!("subscription {name:?} does not exist")))?;
        s.deleted.store(true, Ordering::Release);
        for t in lock(&self.inner.topics).values() {
            t.subs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|x| !Arc::ptr_eq(x, &s));
        }
        *lock(&s.q) = SubQueue::default();
        lock(&s.incoming).clear();
        lock(&s.acked).clear();
        s.notify.notify_waiters();
        Ok(())
    }

    /// How many messages a subscription holds, delivered or not, until acked.
    pub fn backlog(&self, subscription: &str) -> Result<usize> {
        let s = self.sub_state(subscription)?;
        let q = s.queue();
        let incoming = lock(&s.incoming).len();
        Ok(q.ready.len() + q.outstanding.len() + incoming)
    }

    fn sub_state(&self, name: &str) -> Result<Arc<SubState>> {
        lock(&self.inner.subs)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("subscription {name:?} does not exist")))
    }

    /// The driver for a topic. It need not exist yet: sends fail with
    /// `NotFound` while it does not.
    pub fn topic_driver(&self, name: &str) -> TopicDriver {
        TopicDriver::new(self.clone(), name)
    }

    /// The driver for a subscription. It need not exist yet: receives fail
    /// with `NotFound` while it does not.
    pub fn subscription_driver(&self, name: &str) -> SubscriptionDriver {
        SubscriptionDriver::new(self.clone(), name)
    }

    /// Opens a topic with default options. Must be called within a Tokio
    /// runtime.
    pub fn topic(&self, name: &str) -> Topic {
        self.topic_with_options(name, TopicOptions::default())
    }

    /// Opens a topic. Must be called within a Tokio runtime.
    pub fn topic_with_options(&self, name: &str, options: TopicOptions) -> Topic {
        Topic::with_options(Arc::new(self.topic_driver(name)), options)
    }

    /// Opens a subscription with default options. Must be called within a
    /// Tokio runtime.
    pub fn subscription(&self, name: &str) -> Subscription {
        self.subscription_with_options(name, SubscriptionOptions::default())
    }

    /// Opens a subscription. Must be called within a Tokio runtime.
    pub fn subscription_with_options(
        &self,
        name: &str,
        options: SubscriptionOptions,
    ) -> Subscription {
        Subscription::with_options(Arc::new(self.subscription_driver(name)), options)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            nack: true,
            lease_extension: true,
            redelivery_after_deadline: true,
            fan_out: true,
            max_message_bytes: Some(self.inner.max_message_bytes),
            send_batching: BatchLimits::new(1000, 2),
            ack_batching: BatchLimits::new(1000, 2),
            max_receive_batch: 1000,
            max_concurrent_receives: 2,
            // Acks and nacks only update the subscription's queue.
            local_settlement: true,
            max_nack_delay: Some(MAX_NACK_DELAY),
            ..Capabilities::default()
        }
    }
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("topics", &lock(&self.inner.topics).len())
            .field("subscriptions", &lock(&self.inner.subs).len())
            .finish()
    }
}

impl TopicState {
    fn new() -> Self {
        TopicState {
            subs: RwLock::new(Vec::new()),
            next_seq: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
        }
    }
}

impl SubState {
    fn new(ack_deadline: Duration) -> Self {
        SubState {
            ack_deadline,
            q: Mutex::new(SubQueue::default()),
            incoming: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
        }
    }

    /// The queue, locked, with the acks made since it was last locked
    /// applied.
    fn queue(&self) -> MutexGuard<'_, SubQueue> {
        let mut q = lock(&self.q);
        let spare = std::mem::take(&mut q.spare_acks);
        let mut acked = std::mem::replace(&mut *lock(&self.acked), spare);
        for tag in acked.drain(..) {
            q.outstanding.remove(&tag);
        }
        q.spare_acks = acked;
        q
    }

    /// Records acks of `tags`, to be applied when the queue is next locked;
    /// applies them now once many are waiting, so that a subscription
    /// nobody receives from any more still lets its acked messages go.
    fn ack(&self, tags: impl Iterator<Item = u64>) {
        let mut acked = lock(&self.acked);
        acked.extend(tags);
        let many = acked.len() >= ACKS_HELD;
        drop(acked);
        if many {
            drop(self.queue());
        }
    }

    /// Moves the messages sent since the last call to the back of the
    /// ready queue. Receives call it once that queue is empty: the sent
    /// messages then become the ready queue as they are, and its empty
    /// buffer takes the next sends, so no message is copied.
    fn take_incoming(&self, q: &mut SubQueue) {
        let mut incoming = lock(&self.incoming);
        if incoming.is_empty() {
            return;
        }
        if q.ready.is_empty() {
            let spare = Vec::from(std::mem::take(&mut q.ready));
            q.ready = VecDeque::from(std::mem::replace(&mut *incoming, spare));
        } else {
            q.ready.extend(incoming.drain(..));
        }
    }

    /// Wakes waiting receives after messages were pushed to `incoming`;
    /// without waiters, skips the notifier's own lock.
    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: u64) -> Stored {
        Stored {
            seq,
            record: Record {
                body: Bytes::new(),
                attributes: Attributes::new(),
                ordering_key: None,
            },
        }
    }

    /// Hands out `n` queued-in-place deliveries as one batch with
    /// `deadline`, as `receive_batch` does; returns their tags.
    fn receive(q: &mut SubQueue, n: u64, deadline: Instant) -> std::ops::Range<u64> {
        let first = q.next_tag;
        for _ in 0..n {
            let tag = q.next_tag;
            q.next_tag += 1;
            let o = Outstanding {
                msg: stored(tag),
                attempts: 1,
                deadline,
            };
            q.outstanding.insert(tag, o);
        }
        q.record_received(deadline, first, q.next_tag);
        first..q.next_tag
    }

    /// One delivery held at the front while thousands of batches behind it
    /// are received and acked keeps no entry a batch for them; it still
    /// comes back at its deadline, once.
    #[test]
    fn a_delivery_held_at_the_front_does_not_keep_every_batch_behind_it() {
        let mut q = SubQueue::default();
        let t0 = Instant::now();
        let deadline = Duration::from_secs(60);
        let held = receive(&mut q, 1, t0 + deadline).start;
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_micros(i);
            q.reap(now);
            for tag in receive(&mut q, 2, now + deadline) {
                q.outstanding.remove(&tag);
            }
        }
        q.reap(t0 + Duration::from_millis(30));
        assert!(
            q.received.len() + q.deadlines.len() <= 2_100,
            "{} batch entries and {} heap entries for one outstanding delivery",
            q.received.len(),
            q.deadlines.len()
        );
        q.reap(t0 + deadline + Duration::from_secs(1));
        let back: Vec<u64> = q.ready.iter().map(|(m, _)| m.seq).collect();
        assert_eq!(back, [held]);
        assert_eq!(q.outstanding.len(), 0);
    }

    /// Redeliveries come earliest deadline first (then by tag), whether a
    /// deadline came with its batch or from an extension.
    #[test]
    fn redeliveries_follow_the_deadlines_across_batches_and_extensions() {
        let mut q = SubQueue::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Tags 0, 1, 2, then 3, 4.
        let a = receive(&mut q, 3, t0 + s(10));
        let b = receive(&mut q, 2, t0 + s(20));
        // Tag 1 extended past tag 3's deadline, tag 4 brought before tag 0's.
        for (tag, due) in [(a.start + 1, t0 + s(25)), (b.start + 1, t0 + s(5))] {
            q.outstanding.get_mut(&tag).unwrap().deadline = due;
            q.deadlines.push(Reverse((due, tag)));
        }
        q.outstanding.remove(&(a.start + 2));
        q.reap(t0 + s(30));
        // Each is pushed to the front as it comes due: the latest is first.
        let order: Vec<u64> = q.ready.iter().map(|(m, _)| m.seq).collect();
        assert_eq!(order, [1, 3, 0, 4]);
        assert_eq!(q.outstanding.len(), 0);
        q.reap(t0 + s(60));
        assert_eq!(q.ready.len(), 4, "each came back once");
    }

    fn outgoing(body: &'static str) -> crate::driver::OutgoingMessage {
        crate::driver::OutgoingMessage::new(body)
    }

    /// Acks wait to be applied until the queue is next locked; a deadline
    /// that passed meanwhile still does not bring an acked delivery back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_ack_is_applied_before_deadlines_are_read() {
        use crate::driver::{Subscription as _, Topic as _};
        let broker = Broker::new();
        broker.create_topic("t").unwrap();
        broker
            .create_subscription("s", "t", Duration::from_millis(50))
            .unwrap();
        let (topic, sub) = (broker.topic_driver("t"), broker.subscription_driver("s"));
        topic.send_batch(&[outgoing("acked")]).await.unwrap();
        let got = sub.receive_batch(10).await.unwrap();
        assert_eq!(got.len(), 1);
        sub.send_acks(&[got[0].ack_id.clone()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        topic.send_batch(&[outgoing("next")]).await.unwrap();
        let got = sub.receive_batch(10).await.unwrap();
        let bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
        assert_eq!(bodies, [Bytes::from("next")], "the acked one came back");
        assert_eq!(broker.backlog("s").unwrap(), 1);
    }

    /// Acks nobody's receive applies are applied by the acker once many
    /// wait, so their messages are let go.
    #[tokio::test(flavor = "current_thread")]
    async fn many_held_acks_are_applied_by_the_acker() {
        use crate::driver::{Subscription as _, Topic as _};
        let broker = Broker::new();
        broker.create_topic("t").unwrap();
        broker
            .create_subscription("s", "t", Duration::from_secs(60))
            .unwrap();
        let (topic, sub) = (broker.topic_driver("t"), broker.subscription_driver("s"));
        let batch: Vec<_> = (0..1000).map(|_| outgoing("m")).collect();
        let mut ids = Vec::new();
        for _ in 0..ACKS_HELD / 1000 + 1 {
            topic.send_batch(&batch).await.unwrap();
            ids.extend(
                sub.receive_batch(1000)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|m| m.ack_id),
            );
        }
        for id in &ids {
            sub.send_acks(std::slice::from_ref(id)).await.unwrap();
        }
        let s = broker.sub_state("s").unwrap();
        let held = lock(&s.acked).len();
        assert!(held < ACKS_HELD, "{held} acks held");
        assert!(lock(&s.q).outstanding.len() < ACKS_HELD);
    }

    /// Closing a subscription applies the acks it holds, so their messages
    /// go even though nobody receives from it again.
    #[tokio::test(flavor = "current_thread")]
    async fn closing_applies_the_held_acks() {
        use crate::driver::{Subscription as _, Topic as _};
        let broker = Broker::new();
        broker.create_topic("t").unwrap();
        broker
            .create_subscription("s", "t", Duration::from_secs(60))
            .unwrap();
        let (topic, sub) = (broker.topic_driver("t"), broker.subscription_driver("s"));
        topic.send_batch(&[outgoing("m")]).await.unwrap();
        let got = sub.receive_batch(10).await.unwrap();
        sub.send_acks(&[got[0].ack_id.clone()]).await.unwrap();
        sub.close().await.unwrap();
        let s = broker.sub_state("s").unwrap();
        assert_eq!(lock(&s.q).outstanding.len(), 0);
    }

    /// A receive waiting for messages is woken by the send that brings
    /// one, not by its poll running out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_receive_is_woken_by_a_send() {
        use crate::driver::{Subscription as _, Topic as _};
        let broker = Broker::new();
        broker.create_topic("t").unwrap();
        broker
            .create_subscription("s", "t", Duration::from_secs(60))
            .unwrap();
        let topic = broker.topic_driver("t");
        let sub = Arc::new(broker.subscription_driver("s"));
        let s = broker.sub_state("s").unwrap();
        for _ in 0..20 {
            let receiving = tokio::spawn({
                let sub = sub.clone();
                async move {
                    let got = sub.receive_batch(10).await.unwrap();
                    (got.len(), Instant::now())
                }
            });
            while s.waiting.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            let sent = Instant::now();
            topic.send_batch(&[outgoing("m")]).await.unwrap();
            let (n, at) = receiving.await.unwrap();
            assert_eq!(n, 1);
            let took = at.saturating_duration_since(sent);
            assert!(took < POLL / 2, "woken after {took:?}");
        }
    }
}
