//! Receiving through a consumer group, committing only the acked prefix of
//! each partition, with nack emulated by a local redelivery queue.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::FutureExt;
use pubsub_core::driver::{self, AckId, BatchError, Capabilities, ReceivedMessage};
use pubsub_core::{Attributes, Error, Result};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers, Message as _, OwnedMessage};
use rdkafka::{ClientContext, Offset, Timestamp, TopicPartitionList};
use tokio::sync::Notify;

use crate::{capabilities, error, topic_exists, KafkaConfig, DRIVER};

/// How often closing retries a commit refused by a rebalance.
const CLOSE_COMMIT_ATTEMPTS: u32 = 25;

/// How long closing waits for the consumer to leave its group.
const LEAVE_WAIT: Duration = Duration::from_secs(10);

/// How long one `receive_batch` waits for a first message.
const POLL: Duration = Duration::from_millis(500);

/// Where a new consumer group starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartOffset {
    /// From the oldest retained message.
    Oldest,
    /// From messages sent after the group first joins (the Go CDK's
    /// default).
    #[default]
    Newest,
}

/// Options of a consumer-group subscription.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct SubscriptionConfig {
    /// Where a group with no committed offsets starts.
    pub offset: StartOffset,
}

impl SubscriptionConfig {
    /// Sets where a new group starts.
    pub fn with_offset(mut self, offset: StartOffset) -> Self {
        self.offset = offset;
        self
    }
}

/// Which delivery an ack id names. The epoch changes each time this
/// consumer is (re)assigned a partition, so acks of deliveries from an
/// earlier assignment are recognised and ignored.
#[derive(Clone, Debug)]
struct KafkaAck {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
}

/// What is kept of a delivered message until it is acked, so a nack can
/// hand it out again without rewinding the consumer.
#[derive(Clone)]
struct Copy {
    body: Bytes,
    attributes: Attributes,
    key: Option<String>,
    timestamp: Timestamp,
}

struct Pending {
    acked: bool,
    attempts: u32,
    copy: Option<Copy>,
}

struct Part {
    epoch: u64,
    /// Delivered and not yet committed, by offset.
    pending: BTreeMap<i64, Pending>,
    /// One past the highest offset delivered.
    high: i64,
    /// The last offset committed (the next one to read).
    committed: i64,
}

impl Part {
    /// The next offset to read once the acked prefix is dropped: the first
    /// unacked delivery, or one past the last delivered.
    fn advance(&mut self) -> Option<i64> {
        while let Some(e) = self.pending.first_entry() {
            if e.get().acked {
                e.remove();
            } else {
                break;
            }
        }
        let position = self.pending.keys().next().copied().unwrap_or(self.high);
        (position > self.committed).then_some(position)
    }
}

#[derive(Default)]
struct Tracker {
    /// Interned topic names, so tracking a message allocates no name.
    topics: HashMap<String, Arc<str>>,
    parts: HashMap<(Arc<str>, i32), Part>,
    redeliver: VecDeque<(KafkaAck, Copy, u32)>,
    next_epoch: u64,
}

fn lock(m: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    // The tracker is consistent between statements; a panic elsewhere must
    // not stop acks.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    /// The partition's state, created with a fresh epoch when this
    /// consumer has not seen the partition since it was (re)assigned.
    fn part(&mut self, topic: &str, partition: i32) -> (&mut Part, Arc<str>) {
        let topic: Arc<str> = match self.topics.get(topic) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(topic);
                self.topics.insert(topic.to_owned(), t.clone());
                t
            }
        };
        let next_epoch = &mut self.next_epoch;
        let part = self
            .parts
            .entry((topic.clone(), partition))
            .or_insert_with(|| {
                *next_epoch += 1;
                Part {
                    epoch: *next_epoch,
                    pending: BTreeMap::new(),
                    high: 0,
                    committed: -1,
                }
            });
        (part, topic)
    }

    fn find(&mut self, a: &KafkaAck) -> Option<&mut Pending> {
        let part = self.parts.get_mut(&(a.topic.clone(), a.partition))?;
        if part.epoch != a.epoch {
            return None;
        }
        part.pending.get_mut(&a.offset)
    }

    /// Commit positions of the given partitions that moved forward.
    fn positions<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a (Arc<str>, i32)>,
    ) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for key in keys {
            if let Some(part) = self.parts.get_mut(key) {
                if let Some(pos) = part.advance() {
                    part.committed = pos;
                    let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(pos));
                }
            }
        }
        tpl
    }
}

/// The consumer's context: on revocation it commits the acked prefix of the
/// revoked partitions and forgets them. Appears in the consumer's type,
/// [`KafkaConsumer`].
pub struct KafkaContext {
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for KafkaContext {}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let keys: Vec<(Arc<str>, i32)> = revoked
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let tpl = {
            let mut t = lock(&self.tracker);
            let tpl = t.positions(keys.iter());
            for k in &keys {
                t.parts.remove(k);
            }
            // Nacked messages of revoked partitions belong to their new owner.
            t.redeliver.retain(|(a, _, _)| {
                !keys
                    .iter()
                    .any(|(tp, p)| *tp == a.topic && *p == a.partition)
            });
            tpl
        };
        if tpl.count() > 0 && !consumer.assignment_lost() {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on partition revocation failed; acked messages may be redelivered to the new owner");
            }
        }
        tracing::debug!(partitions = keys.len(), "partitions revoked");
    }
}

impl fmt::Debug for KafkaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KafkaContext")
    }
}

/// The consumer a subscription reads with, as
/// [`pubsub_core::Subscription::as_raw`] gives it.
pub type KafkaConsumer = StreamConsumer<KafkaContext>;

/// Consumer defaults: the driver stores the offset of each partition's
/// acked prefix, and only that, and librdkafka commits what is stored once a
/// second (and the driver synchronously on close and revocation): commits
/// are batched without a commit request per ack batch. Topics are never
/// created by subscribing.
pub(crate) const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "true"),
    ("auto.commit.interval.ms", "1000"),
    ("enable.auto.offset.store", "false"),
    ("allow.auto.create.topics", "false"),
    ("enable.partition.eof", "false"),
];

/// The Kafka subscription driver: one consumer in a consumer group.
///
/// [`pubsub_core::Subscription::as_raw`] gives the [`KafkaConsumer`]; [`pubsub_core::Message::as_raw`] an
/// `rdkafka::message::OwnedMessage` with its topic, partition, offset,
/// timestamp and key (the payload is the message body and the headers its
/// attributes, so neither is copied again).
pub struct KafkaSubscription {
    consumer: Arc<KafkaConsumer>,
    group: String,
    topics: Vec<String>,
    tracker: Arc<Mutex<Tracker>>,
    wake: Arc<Notify>,
    subscribed: AtomicBool,
    subscribe_lock: tokio::sync::Mutex<()>,
    settings: KafkaConfig,
}

impl KafkaSubscription {
    /// A consumer in `group` for `topics`. The topics are checked on the
    /// first receive, which fails with `NotFound` if one does not exist.
    pub fn new(
        settings: &KafkaConfig,
        group: &str,
        topics: &[&str],
        config: SubscriptionConfig,
    ) -> Result<Self> {
        if group.is_empty() || topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
            return Err(Error::invalid_argument(
                "a Kafka subscription needs a group and at least one topic",
            ));
        }
        let reset = match config.offset {
            StartOffset::Oldest => "earliest",
            StartOffset::Newest => "latest",
        };
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let wake = Arc::new(Notify::new());
        let ctx = KafkaContext {
            tracker: tracker.clone(),
        };
        let mut cc = settings.client_config(CONSUMER_DEFAULTS);
        if settings.get("auto.offset.reset").is_none() {
            cc.set("auto.offset.reset", reset);
        }
        cc.set("group.id", group);
        let consumer: KafkaConsumer = cc.create_with_context(ctx).map_err(error::map)?;
        Ok(KafkaSubscription {
            consumer: Arc::new(consumer),
            group: group.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            tracker,
            wake,
            subscribed: AtomicBool::new(false),
            subscribe_lock: tokio::sync::Mutex::new(()),
            settings: settings.clone(),
        })
    }

    async fn ensure_subscribed(&self) -> Result<()> {
        if self.subscribed.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.subscribe_lock.lock().await;
        if self.subscribed.load(Ordering::Acquire) {
            return Ok(());
        }
        for topic in &self.topics {
            let c = self.consumer.clone();
            topic_exists(move |t| c.fetch_metadata(None, t), topic.clone()).await?;
        }
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&topics).map_err(error::map)?;
        self.subscribed.store(true, Ordering::Release);
        Ok(())
    }

    fn take_redeliveries(&self, max: usize) -> Vec<ReceivedMessage> {
        let mut t = lock(&self.tracker);
        let n = max.min(t.redeliver.len());
        t.redeliver
            .drain(..n)
            .map(|(a, c, attempt)| to_received(a, c, attempt))
            .collect::<Vec<_>>()
    }

    fn track(&self, msgs: Vec<BorrowedMessage<'_>>) -> Vec<ReceivedMessage> {
        let mut t = lock(&self.tracker);
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let body = Bytes::copy_from_slice(m.payload().unwrap_or_default());
            let mut attributes = Attributes::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    let v = header
                        .value
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    attributes.insert(header.key.to_owned(), v.into_owned());
                }
            }
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            let (part, topic) = t.part(m.topic(), m.partition());
            part.high = part.high.max(m.offset() + 1);
            let copy = Copy {
                body,
                attributes,
                key,
                timestamp: m.timestamp(),
            };
            part.pending.insert(
                m.offset(),
                Pending {
                    acked: false,
                    attempts: 1,
                    copy: Some(copy.clone()),
                },
            );
            let ack = KafkaAck {
                topic,
                partition: m.partition(),
                offset: m.offset(),
                epoch: part.epoch,
            };
            out.push(to_received(ack, copy, 1));
        }
        out
    }

    /// The commit position of every partition this consumer holds.
    fn final_positions(&self) -> TopicPartitionList {
        let mut t = lock(&self.tracker);
        let keys: Vec<_> = t.parts.keys().cloned().collect();
        let _ = t.positions(keys.iter());
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), part) in &t.parts {
            if part.committed >= 0 {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(part.committed));
            }
        }
        tpl
    }
}

fn to_received(a: KafkaAck, c: Copy, attempt: u32) -> ReceivedMessage {
    let id = format!("{}/{}/{}", a.topic, a.partition, a.offset);
    let mut m = ReceivedMessage::new(c.body, c.attributes, id, AckId::new(a.clone()));
    m.ordering_key = c.key.clone();
    m.delivery_attempt = Some(attempt);
    // Headers are the attributes already; the raw record carries the rest.
    m.raw = Some(Box::new(OwnedMessage::new(
        None,
        c.key.map(String::into_bytes),
        a.topic.to_string(),
        c.timestamp,
        a.partition,
        a.offset,
        None,
    )));
    m
}

impl fmt::Debug for KafkaSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscription")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("settings", &self.settings)
            .finish()
    }
}

fn acks(ids: &[AckId]) -> impl Iterator<Item = &KafkaAck> {
    ids.iter().filter_map(|id| id.downcast_ref::<KafkaAck>())
}

#[async_trait]
impl driver::Subscription for KafkaSubscription {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.group
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        self.ensure_subscribed().await?;
        let deadline = tokio::time::Instant::now() + POLL;
        loop {
            let redelivered = self.take_redeliveries(max);
            if !redelivered.is_empty() {
                return Ok(redelivered);
            }
            let nacked = self.wake.notified();
            tokio::pin!(nacked);
            nacked.as_mut().enable();
            if !lock(&self.tracker).redeliver.is_empty() {
                continue;
            }
            let first = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.consumer.recv()) => match r {
                    Err(_) => return Ok(Vec::new()),
                    Ok(r) => r,
                },
                _ = nacked => continue,
            };
            let first = first.map_err(error::map)?;
            let mut got = vec![first];
            // Take what has already arrived; `recv` is cancel-safe and no
            // message is held across an await.
            while got.len() < max {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => got.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        break;
                    }
                    None => break,
                }
            }
            return Ok(self.track(got));
        }
    }

    async fn send_acks(&self, ids: &[AckId]) -> Result<(), BatchError> {
        let tpl = {
            let mut t = lock(&self.tracker);
            let mut touched = Vec::new();
            for a in acks(ids) {
                if let Some(p) = t.find(a) {
                    p.acked = true;
                    p.copy = None;
                    touched.push((a.topic.clone(), a.partition));
                }
            }
            touched.sort();
            touched.dedup();
            t.positions(touched.iter())
        };
        if tpl.count() == 0 {
            return Ok(());
        }
        // A local call: the next auto-commit sends it.
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // Partitions revoked meanwhile cannot be stored; their new owner
            // starts from what revocation committed.
            tracing::debug!(error = %e, "storing acked offsets failed");
        }
        Ok(())
    }

    async fn send_nacks(&self, ids: &[AckId]) -> Result<(), BatchError> {
        {
            let mut t = lock(&self.tracker);
            for a in acks(ids) {
                if let Some(p) = t.find(a) {
                    if !p.acked {
                        if let Some(copy) = p.copy.clone() {
                            p.attempts += 1;
                            let attempt = p.attempts;
                            t.redeliver.push_back((a.clone(), copy, attempt));
                        }
                    }
                }
            }
        }
        self.wake.notify_waiters();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if !self.subscribed.load(Ordering::Acquire) {
            return Ok(());
        }
        // Everything acked is committed synchronously before leaving, in
        // case an earlier asynchronous commit did not land. A rebalance in
        // progress refuses commits until the consumer is polled through it
        // (its revocation then commits for us), so poll and try again.
        let mut attempt = 0;
        let committed = loop {
            let tpl = self.final_positions();
            if tpl.count() == 0 {
                break Ok(());
            }
            let consumer = self.consumer.clone();
            let r = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                .await
                .map_err(|e| Error::internal(format!("close task failed: {e}")))?
                .map_err(error::map);
            match r {
                Err(e) if e.is_temporary() && attempt < CLOSE_COMMIT_ATTEMPTS => {
                    attempt += 1;
                    let _ = tokio::time::timeout(Duration::from_millis(200), self.consumer.recv())
                        .await;
                }
                other => break other,
            }
        };
        self.consumer.unsubscribe();
        // Leaving the group completes only while the consumer is polled;
        // without this the group waits a whole session timeout before the
        // partitions go to the other members.
        let deadline = tokio::time::Instant::now() + LEAVE_WAIT;
        while self.consumer.assignment().is_ok_and(|a| a.count() > 0)
            && tokio::time::Instant::now() < deadline
        {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.consumer.recv()).await;
        }
        committed
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&*self.consumer)
    }
}
