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

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::driver::{Attributes, BatchLimits, Capabilities};
use crate::error::{Error, Result};
use crate::options::{SubscriptionOptions, TopicOptions};
use crate::registry::Registry;
use crate::subscription::Subscription;
use crate::topic::Topic;

mod driver;
mod queue;
mod resolved;
mod url;

use queue::{Outstanding, SubQueue, SubState};

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The queues stay consistent between statements; a panicking user
    // thread elsewhere must not poison the whole broker.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
