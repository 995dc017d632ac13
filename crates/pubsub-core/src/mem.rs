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
//!   subscription of its own. `ackdeadline` defaults to 60 s.
//!
//! Escape hatches: [`crate::Topic::as_raw`] and
//! [`crate::Subscription::as_raw`] give the [`Broker`];
//! [`crate::Message::as_raw`] gives a [`Delivery`]; a before-send hook gets a
//! `&mut` [`Record`], an after-send hook the message's sequence number as a
//! `u64`.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::driver::{
    self, AckId, BatchError, BatchLimits, Capabilities, OutgoingMessage, ReceivedMessage,
};
use crate::error::{Error, Result};
use crate::message::Attributes;
use crate::options::{SubscriptionOptions, TopicOptions};
use crate::registry::{query_pairs, Opener};
use crate::{Subscription, Topic};

/// The URL scheme of this driver.
pub const SCHEME: &str = "mem";

const DRIVER: &str = "mem";

/// The default ack deadline of a new subscription.
pub const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(60);

/// The largest message the in-memory broker takes by default, the same as
/// Google Cloud Pub/Sub's, so code that works here does not break there.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// How long one `receive_batch` waits for a message before returning none.
const POLL: Duration = Duration::from_millis(500);

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
    notify: Notify,
    deleted: AtomicBool,
}

#[derive(Default)]
struct SubQueue {
    ready: VecDeque<(Arc<Stored>, u32)>,
    outstanding: HashMap<u64, Outstanding>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    next_tag: u64,
}

struct Outstanding {
    msg: Arc<Stored>,
    attempts: u32,
    deadline: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The queues stay consistent between statements; a panicking user
    // thread elsewhere must not poison the whole broker.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SubQueue {
    /// Moves deliveries whose deadline passed back to the front of the queue.
    fn reap(&mut self, now: Instant) {
        while let Some(Reverse((deadline, tag))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let current = self.outstanding.get(&tag).map(|o| o.deadline);
            if current == Some(deadline) {
                let o = self.outstanding.remove(&tag).expect("present");
                self.ready.push_front((o.msg, o.attempts));
            }
        }
        // Acked deliveries leave stale deadline entries behind; drop them
        // once they outnumber live ones so memory follows the backlog.
        if self.deadlines.len() > 2 * self.outstanding.len() + 1024 {
            let live = &self.outstanding;
            self.deadlines
                .retain(|Reverse((d, t))| live.get(t).is_some_and(|o| o.deadline == *d));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((d, _))| *d)
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
    /// `NotFound` if the topic does not exist.
    pub fn create_subscription(
        &self,
        name: &str,
        topic: &str,
        ack_deadline: Duration,
    ) -> Result<()> {
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
        s.notify.notify_waiters();
        Ok(())
    }

    /// How many messages a subscription holds, delivered or not, until acked.
    pub fn backlog(&self, subscription: &str) -> Result<usize> {
        let s = self.sub_state(subscription)?;
        let q = lock(&s.q);
        Ok(q.ready.len() + q.outstanding.len())
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
        TopicDriver {
            broker: self.clone(),
            name: name.to_owned(),
            resolved: Mutex::new(None),
        }
    }

    /// The driver for a subscription. It need not exist yet: receives fail
    /// with `NotFound` while it does not.
    pub fn subscription_driver(&self, name: &str) -> SubscriptionDriver {
        SubscriptionDriver {
            broker: self.clone(),
            name: name.to_owned(),
            resolved: Mutex::new(None),
        }
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
            notify: Notify::new(),
            deleted: AtomicBool::new(false),
        }
    }
}

/// The in-memory topic driver.
pub struct TopicDriver {
    broker: Broker,
    name: String,
    resolved: Mutex<Option<Arc<TopicState>>>,
}

impl TopicDriver {
    /// The topic's state, looked up again once the cached one was deleted,
    /// so a handle works again when the topic is re-created.
    fn state(&self) -> Result<Arc<TopicState>> {
        let mut cached = lock(&self.resolved);
        if let Some(t) = cached.as_ref() {
            if !t.deleted.load(Ordering::Acquire) {
                return Ok(t.clone());
            }
        }
        let found = lock(&self.broker.inner.topics).get(&self.name).cloned();
        let t = found.ok_or_else(|| self.missing())?;
        *cached = Some(t.clone());
        Ok(t)
    }

    fn missing(&self) -> Error {
        Error::not_found(format!("topic {:?} does not exist", self.name))
    }
}

impl fmt::Debug for TopicDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("mem::TopicDriver")
            .field("name", &self.name)
            .finish()
    }
}

#[async_trait]
impl driver::Topic for TopicDriver {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        let t = self.state()?;
        let first = t.next_seq.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut stored = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let mut record = Record {
                body: m.body.clone(),
                attributes: m.attributes.clone(),
                ordering_key: m.ordering_key.clone(),
            };
            match m.run_before_send(&mut record) {
                Ok(()) => stored.push(Arc::new(Stored {
                    seq: first + i as u64,
                    record,
                })),
                Err(e) => failed.push((i, e)),
            }
        }
        let subs = t.subs.read().unwrap_or_else(|p| p.into_inner());
        for s in subs.iter() {
            let mut q = lock(&s.q);
            q.ready.extend(stored.iter().map(|m| (m.clone(), 0)));
            drop(q);
            s.notify.notify_waiters();
        }
        drop(subs);
        for m in &stored {
            let i = (m.seq - first) as usize;
            if batch[i].has_after_send() {
                if let Err(e) = batch[i].run_after_send(&m.seq) {
                    failed.push((i, e));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Items(failed))
        }
    }

    fn raw(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        Some(&self.broker)
    }
}

/// The in-memory subscription driver.
pub struct SubscriptionDriver {
    broker: Broker,
    name: String,
    resolved: Mutex<Option<Arc<SubState>>>,
}

impl SubscriptionDriver {
    /// The subscription's state, looked up again once the cached one was
    /// deleted.
    fn state(&self) -> Result<Arc<SubState>> {
        let mut cached = lock(&self.resolved);
        if let Some(s) = cached.as_ref() {
            if !s.deleted.load(Ordering::Acquire) {
                return Ok(s.clone());
            }
        }
        let s = self.broker.sub_state(&self.name)?;
        *cached = Some(s.clone());
        Ok(s)
    }

    fn ack_deadline(&self) -> Duration {
        self.state()
            .map_or(DEFAULT_ACK_DEADLINE, |s| s.ack_deadline)
    }

    fn settle(
        &self,
        ids: &[AckId],
        mut f: impl FnMut(&mut SubQueue, u64),
    ) -> Result<(), BatchError> {
        let s = self.state()?;
        let mut q = lock(&s.q);
        for id in ids {
            // Ids of other drivers cannot occur; unknown tags (already acked
            // or redelivered) are ignored, as a real broker does.
            if let Some(tag) = id.as_u64() {
                f(&mut q, tag);
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SubscriptionDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("mem::SubscriptionDriver")
            .field("name", &self.name)
            .finish()
    }
}

#[async_trait]
impl driver::Subscription for SubscriptionDriver {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = self.broker.capabilities();
        c.ack_deadline = Some(self.ack_deadline());
        c
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let s = self.state()?;
        let started = Instant::now();
        loop {
            let notified = s.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                if s.deleted.load(Ordering::Acquire) {
                    return Err(Error::not_found(format!(
                        "subscription {:?} does not exist",
                        self.name
                    )));
                }
                let now = Instant::now();
                let mut q = lock(&s.q);
                q.reap(now);
                if !q.ready.is_empty() {
                    let n = max.min(q.ready.len());
                    let deadline = now + s.ack_deadline;
                    let mut out = Vec::with_capacity(n);
                    for (msg, attempts) in q.ready.drain(..n).collect::<Vec<_>>() {
                        let tag = q.next_tag;
                        q.next_tag += 1;
                        let attempt = attempts + 1;
                        q.deadlines.push(Reverse((deadline, tag)));
                        let r = &msg.record;
                        let mut m = ReceivedMessage::new(
                            r.body.clone(),
                            r.attributes.clone(),
                            msg.seq.to_string(),
                            AckId::from_u64(tag),
                        );
                        m.ordering_key = r.ordering_key.clone();
                        m.delivery_attempt = Some(attempt);
                        m.raw = Some(Box::new(Delivery {
                            sequence: msg.seq,
                            tag,
                            attempt,
                        }));
                        out.push(m);
                        q.outstanding.insert(
                            tag,
                            Outstanding {
                                msg,
                                attempts: attempt,
                                deadline,
                            },
                        );
                    }
                    return Ok(out);
                }
                let waited = now.saturating_duration_since(started);
                if waited >= POLL {
                    return Ok(Vec::new());
                }
                let poll_left = POLL - waited;
                q.next_deadline().map_or(poll_left, |d| {
                    d.saturating_duration_since(now).min(poll_left)
                })
            };
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    async fn send_acks(&self, ids: &[AckId]) -> Result<(), BatchError> {
        self.settle(ids, |q, tag| {
            q.outstanding.remove(&tag);
        })
    }

    async fn send_nacks(&self, ids: &[AckId]) -> Result<(), BatchError> {
        let r = self.settle(ids, |q, tag| {
            if let Some(o) = q.outstanding.remove(&tag) {
                q.ready.push_front((o.msg, o.attempts));
            }
        });
        if let Ok(s) = self.state() {
            s.notify.notify_waiters();
        }
        r
    }

    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        let deadline = Instant::now() + by;
        self.settle(ids, |q, tag| {
            if let Some(o) = q.outstanding.get_mut(&tag) {
                o.deadline = deadline;
                q.deadlines.push(Reverse((deadline, tag)));
            }
        })
    }

    fn raw(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        Some(&self.broker)
    }
}

/// Opens `mem://` URLs on [`Broker::global`].
#[derive(Debug, Default, Clone, Copy)]
pub struct MemOpener;

#[async_trait]
impl Opener for MemOpener {
    async fn open_topic(&self, url: &url::Url) -> Result<Topic> {
        let name = name_of(url)?;
        if let Some((k, _)) = query_pairs(url).into_iter().next() {
            return Err(Error::invalid_argument(format!(
                "unknown mem:// topic URL parameter {k:?}"
            )));
        }
        let broker = Broker::global();
        broker.ensure_topic(&name);
        Ok(broker.topic(&name))
    }

    async fn open_subscription(&self, url: &url::Url) -> Result<Subscription> {
        let topic = name_of(url)?;
        let mut ack_deadline = DEFAULT_ACK_DEADLINE;
        let mut sub_name = None;
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "ackdeadline" => ack_deadline = parse_duration(&v)?,
                "subscription" => sub_name = Some(v),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown mem:// subscription URL parameter {k:?}; known: ackdeadline, subscription"
                    )))
                }
            }
        }
        let broker = Broker::global();
        broker.ensure_topic(&topic);
        let name = match sub_name {
            Some(n) => {
                if broker.sub_state(&n).is_err() {
                    match broker.create_subscription(&n, &topic, ack_deadline) {
                        Ok(()) => {}
                        // Another opener won the race; use theirs.
                        Err(e) if e.kind() == crate::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                }
                n
            }
            None => {
                let n = format!(
                    "{topic}/anonymous-{}",
                    broker.inner.anonymous.fetch_add(1, Ordering::Relaxed)
                );
                broker.create_subscription(&n, &topic, ack_deadline)?;
                n
            }
        };
        Ok(broker.subscription(&name))
    }
}

fn name_of(url: &url::Url) -> Result<String> {
    crate::registry::resource_name(url).ok_or_else(|| {
        Error::invalid_argument("a mem:// URL needs a topic name, as in mem://orders")
    })
}

/// Parses a Go-style duration such as `30s`, `1m30s`, `500ms` or `2h`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid_argument(format!(
            "invalid duration {s:?}: use a number with a unit, as in 500ms, 30s, 1m30s"
        ))
    };
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(value * unit).map_err(|_| bad())?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        for bad in ["", "10", "s", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
