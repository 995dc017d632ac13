//! Receiving through a consumer group, committing only the acked prefix of
//! each partition, with nack emulated by a local redelivery queue.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use pubsub_core::driver::{
    self, AckId, Capabilities, Deliveries, Nacked, ReceivedMessage, Settlement,
};
use pubsub_core::{Attributes, Error, Result};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message as _, OwnedMessage};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, Timestamp, TopicPartitionList};
use tokio::sync::Notify;

use crate::{capabilities, error, topic_exists, KafkaConfig, DRIVER};

/// How often closing retries a commit refused by a rebalance.
const CLOSE_COMMIT_ATTEMPTS: u32 = 25;

/// How long closing waits for the consumer to leave its group.
const LEAVE_WAIT: Duration = Duration::from_secs(10);

/// How long one `receive_batch` waits for a first message.
const POLL: Duration = Duration::from_millis(500);

/// How long after an ack the acked offsets are stored, so that the acks of
/// a moment are stored together. Stored offsets wait for the next
/// auto-commit anyway (every second); closing and revocation commit from
/// the acks themselves.
const STORE_AFTER: Duration = Duration::from_millis(5);

/// How long one poll of [`KafkaSubscription::join`] waits before it looks
/// at the assignment again.
const JOIN_POLL: Duration = Duration::from_millis(100);
/// Most messages one poll of `join` takes.
const JOIN_BATCH: usize = 1000;

/// How many deliveries of one partition wait to be committed, by default,
/// before it is paused: 16 bytes each.
pub const DEFAULT_MAX_PENDING: usize = 50_000;

/// How long opening a subscription at [`StartOffset::Newest`] waits for
/// its group to join by default.
pub const DEFAULT_WAIT_FOR_JOIN: Duration = Duration::from_secs(30);

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
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// Where a group with no committed offsets starts.
    pub offset: StartOffset,
    /// Store each record's key (when not empty) in this attribute: the
    /// counterpart of [`TopicConfig::key_name`](crate::TopicConfig::key_name),
    /// as the Go CDK's `SubscriptionOptions.KeyName`. The key is the
    /// message's ordering key either way.
    pub key_name: Option<String>,
    /// How long [`open_subscription`](crate::open_subscription) waits for
    /// the consumer to join its group (see [`KafkaSubscription::join`])
    /// when `offset` is [`StartOffset::Newest`], so that a new group does
    /// not skip what is sent between the open and the first receive.
    /// Default: [`DEFAULT_WAIT_FOR_JOIN`]; zero opens without waiting, as
    /// the Go CDK does by default (its `WaitForJoin`). Opening still
    /// succeeds if the time runs out.
    pub wait_for_join: Duration,
    /// Most deliveries of one partition held as delivered and not yet
    /// committed. Offsets commit only up to the first unacked message, so
    /// one message held long keeps everything acked behind it: past this
    /// many, the partition is paused (the rest keep flowing) until half are
    /// committed. Default: [`DEFAULT_MAX_PENDING`].
    pub max_pending: usize,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            offset: StartOffset::default(),
            key_name: None,
            wait_for_join: DEFAULT_WAIT_FOR_JOIN,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

impl SubscriptionConfig {
    /// Sets the attribute that gets each record's key.
    pub fn with_key_name(mut self, attr: impl Into<String>) -> Self {
        self.key_name = Some(attr.into());
        self
    }

    /// Sets where a new group starts.
    pub fn with_offset(mut self, offset: StartOffset) -> Self {
        self.offset = offset;
        self
    }

    /// Sets how many deliveries of one partition may wait to be committed
    /// before the partition is paused (at least 1).
    pub fn with_max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// Sets how long opening at `Newest` waits for the group to join.
    pub fn with_wait_for_join(mut self, within: Duration) -> Self {
        self.wait_for_join = within;
        self
    }
}

/// A nacked message's content, which the core hands back with the nack:
/// it is handed out again from here, without rewinding the consumer, and no
/// copy of the deliveries in flight is kept.
struct Content {
    body: Bytes,
    attributes: Attributes,
    key: Option<String>,
    timestamp: Timestamp,
}

struct Pending {
    offset: i64,
    acked: bool,
}

/// One assigned partition as this consumer tracks it.
struct Part {
    /// Names this assignment of the partition. Ack ids carry it (with the
    /// offset), so acks of deliveries from an earlier assignment are
    /// recognised and ignored. Never reused, and increasing along
    /// `Tracker::parts`.
    epoch: u64,
    topic: Arc<str>,
    /// The topic's place in the subscription's list.
    topic_ix: usize,
    partition: i32,
    /// Delivered and not yet committed, in offset order.
    pending: VecDeque<Pending>,
    /// One past the highest offset delivered.
    high: i64,
    /// The last offset committed (the next one to read).
    committed: i64,
    /// Paused for having `max_pending` deliveries waiting to be committed.
    paused: bool,
}

impl Part {
    /// The next offset to read once the acked prefix is dropped: the first
    /// unacked delivery, or one past the last delivered.
    fn advance(&mut self) -> Option<i64> {
        while self.pending.front().is_some_and(|p| p.acked) {
            self.pending.pop_front();
        }
        let position = self.pending.front().map_or(self.high, |p| p.offset);
        (position > self.committed).then_some(position)
    }

    fn find(&mut self, offset: i64) -> Option<&mut Pending> {
        // Offsets are usually contiguous, so the distance from the first
        // pending offset is the index; gaps (compaction, transaction
        // markers) fall back to a search.
        let first = self.pending.front()?.offset;
        let guess = usize::try_from(offset - first).ok()?;
        let i = if self.pending.get(guess).is_some_and(|p| p.offset == offset) {
            guess
        } else {
            self.pending
                .binary_search_by_key(&offset, |p| p.offset)
                .ok()?
        };
        self.pending.get_mut(i)
    }

    fn record(&mut self, offset: i64) {
        let p = Pending {
            offset,
            acked: false,
        };
        // Offsets arrive in order; anything else (a reset to an earlier
        // offset) is placed, or replaces a delivery of the same offset.
        if self.pending.back().map_or(true, |b| b.offset < offset) {
            self.pending.push_back(p);
        } else {
            match self.pending.binary_search_by_key(&offset, |p| p.offset) {
                Ok(i) => self.pending[i] = p,
                Err(i) => self.pending.insert(i, p),
            }
        }
        self.high = self.high.max(offset + 1);
    }
}

/// A nacked delivery waiting to be handed out again.
struct Redelivery {
    epoch: u64,
    offset: i64,
    copy: Content,
    attempt: u32,
}

/// Where [`describe_at`] keeps the topic's place: 30 bits, between the
/// timestamp's kind (2 bits) and the partition (32).
const TOPIC_BITS: i64 = 0x3FFF_FFFF;

/// The two numbers a lazily described message keeps: its timestamp's
/// milliseconds, and the timestamp's kind with the message's topic (its
/// place in the subscription's list) and partition. With the offset in the
/// ack id they describe the delivery without a lookup, for as long as the
/// message lives.
fn describe_at(timestamp: Timestamp, topic: usize, partition: i32) -> (i64, i64) {
    let (millis, kind) = match timestamp {
        Timestamp::NotAvailable => (-1, 0),
        Timestamp::CreateTime(t) => (t, 1),
        Timestamp::LogAppendTime(t) => (t, 2),
    };
    let topic = (topic as i64 & TOPIC_BITS) << 2;
    (millis, (i64::from(partition) << 32) | topic | kind)
}

/// The timestamp, topic and partition [`describe_at`] packed.
fn described((millis, packed): (i64, i64)) -> (Timestamp, usize, i32) {
    let timestamp = match packed & 3 {
        1 => Timestamp::CreateTime(millis),
        2 => Timestamp::LogAppendTime(millis),
        _ => Timestamp::NotAvailable,
    };
    // The shift is arithmetic, so the partition keeps its sign.
    (
        timestamp,
        ((packed >> 2) & TOPIC_BITS) as usize,
        (packed >> 32) as i32,
    )
}

struct Tracker {
    /// Ordered by epoch, which only grows, so acks find their partition by
    /// binary search without hashing.
    parts: Vec<Part>,
    /// Where the last delivered message's partition was, since messages
    /// come in runs from one partition.
    last: usize,
    redeliver: VecDeque<Redelivery>,
    next_epoch: u64,
    /// Acks settled at once moved some partition's acked prefix since the
    /// offsets were last stored.
    store_due: bool,
    /// [`SubscriptionConfig::max_pending`].
    max_pending: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tracker is consistent between statements; a panic elsewhere must
    // not stop acks.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    /// The partition's index, created with a fresh epoch when this consumer
    /// has not seen the partition since it was (re)assigned.
    fn part(&mut self, topic_ix: usize, topic: &Arc<str>, partition: i32) -> usize {
        let is = |p: &Part| p.partition == partition && p.topic_ix == topic_ix;
        if self.parts.get(self.last).is_some_and(is) {
            return self.last;
        }
        let i = match self.parts.iter().position(is) {
            Some(i) => i,
            None => {
                self.next_epoch += 1;
                self.parts.push(Part {
                    epoch: self.next_epoch,
                    topic: topic.clone(),
                    topic_ix,
                    partition,
                    pending: VecDeque::new(),
                    high: 0,
                    committed: -1,
                    paused: false,
                });
                self.parts.len() - 1
            }
        };
        self.last = i;
        i
    }

    fn new(max_pending: usize) -> Self {
        Tracker {
            parts: Vec::new(),
            last: 0,
            redeliver: VecDeque::new(),
            next_epoch: 0,
            store_due: false,
            max_pending: max_pending.max(1),
        }
    }

    /// The paused partitions among these whose waiting deliveries are down
    /// to half the limit, marked unpaused, to resume.
    fn drained(&mut self, indices: impl Iterator<Item = usize>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let low = self.max_pending / 2;
        for i in indices {
            if let Some(part) = self.parts.get_mut(i) {
                if part.paused && part.pending.len() <= low {
                    part.paused = false;
                    tpl.add_partition(&part.topic, part.partition);
                }
            }
        }
        tpl
    }

    fn by_epoch(&self, epoch: u64) -> Option<usize> {
        self.parts.binary_search_by_key(&epoch, |p| p.epoch).ok()
    }

    fn find(&mut self, epoch: u64, offset: i64) -> Option<&mut Pending> {
        let i = self.by_epoch(epoch)?;
        self.parts[i].find(offset)
    }

    /// Marks a delivery acked; the index of its partition, or `None` for a
    /// delivery of a partition since revoked.
    fn ack(&mut self, epoch: u64, offset: i64) -> Option<usize> {
        let i = self.by_epoch(epoch)?;
        self.parts[i].find(offset)?.acked = true;
        Some(i)
    }

    /// Commit positions of the partitions at these indices that moved
    /// forward.
    fn positions(&mut self, indices: impl Iterator<Item = usize>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for i in indices {
            if let Some(part) = self.parts.get_mut(i) {
                if let Some(pos) = part.advance() {
                    part.committed = pos;
                    let _ =
                        tpl.add_partition_offset(&part.topic, part.partition, Offset::Offset(pos));
                }
            }
        }
        tpl
    }
}

/// Commits, for each partition of `topics` that has no committed offset in
/// the consumer's group, the end of its log as it is now, before the
/// consumer joins: the group then starts there. Left to librdkafka, the
/// end is looked up only after the group assigns the partition, and again
/// at every assignment until something is committed, and what is sent
/// meanwhile is skipped.
fn commit_ends_of_new_partitions(
    consumer: &KafkaConsumer,
    topics: &[String],
    within: Duration,
) -> Result<()> {
    let timeout = Timeout::After(within.max(Duration::from_secs(1)));
    let mut all = TopicPartitionList::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(error::map)?;
        for t in md.topics() {
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer
        .committed_offsets(all, timeout)
        .map_err(error::map)?;
    let mut starts = TopicPartitionList::new();
    for e in committed.elements() {
        if matches!(e.offset(), Offset::Offset(_)) {
            continue;
        }
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(error::map)?;
        starts
            .add_partition_offset(e.topic(), e.partition(), Offset::Offset(high))
            .map_err(error::map)?;
    }
    if starts.count() > 0 {
        consumer
            .commit(&starts, CommitMode::Sync)
            .map_err(error::map)?;
    }
    Ok(())
}

/// The consumer's context: on revocation it commits the acked prefix of the
/// revoked partitions and forgets them. Appears in the consumer's type,
/// [`KafkaConsumer`].
pub struct KafkaContext {
    tracker: Arc<Mutex<Tracker>>,
    /// Raised once the revoked partitions are forgotten, so that a batch
    /// polled across a revocation, and the core's queue, can tell.
    revocations: Arc<AtomicU64>,
    /// Set once the group has given this consumer its first assignment.
    joined: Arc<AtomicBool>,
    /// How the commits that acks turn into went.
    commits: Arc<Commits>,
}

/// The outcome of the consumer's commits (librdkafka's automatic ones, and
/// those on revocation), which acks settled locally never see: a permanent
/// failure fails the subscription's receives, as a failed ack batch would;
/// temporary ones are logged once a run, since the next commit carries the
/// same offsets.
#[derive(Default)]
struct Commits {
    failed: Mutex<Option<Error>>,
    failing: AtomicBool,
}

impl Commits {
    fn outcome(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("Kafka offset commits succeed again");
                }
            }
            // An automatic commit with nothing new stored.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                let e = error::map(e).with_context("operation", "commit");
                if e.is_temporary() {
                    if !self.failing.swap(true, Ordering::AcqRel) {
                        tracing::warn!(error = %e, partitions = offsets.count(), "Kafka offset commit failed; it is retried with the next commit");
                    }
                } else {
                    tracing::error!(error = %e, partitions = offsets.count(), "Kafka offset commit failed for good; the subscription is now failed");
                    lock(&self.failed).get_or_insert(e);
                }
            }
        }
    }

    fn failure(&self) -> Option<Error> {
        lock(&self.failed).clone()
    }
}

impl ClientContext for KafkaContext {}

impl ConsumerContext for KafkaContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.commits.outcome(result, offsets);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // An assignment, even of no partition, means the group has joined.
        if let Rebalance::Assign(_) = rebalance {
            self.joined.store(true, Ordering::Release);
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let (tpl, paused) = {
            let mut t = lock(&self.tracker);
            let gone: Vec<usize> = (0..t.parts.len())
                .filter(|&i| {
                    let p = &t.parts[i];
                    revoked.find_partition(&p.topic, p.partition).is_some()
                })
                .collect();
            let tpl = t.positions(gone.iter().copied());
            // A paused partition stays paused in librdkafka across a later
            // assignment, where nothing would resume it.
            let mut paused = TopicPartitionList::new();
            for &i in &gone {
                if t.parts[i].paused {
                    paused.add_partition(&t.parts[i].topic, t.parts[i].partition);
                }
            }
            let epochs: Vec<u64> = gone.iter().map(|&i| t.parts[i].epoch).collect();
            t.parts.retain(|p| !epochs.contains(&p.epoch));
            t.last = 0;
            // Nacked messages of revoked partitions belong to their new owner.
            t.redeliver.retain(|r| !epochs.contains(&r.epoch));
            // Under the lock: whoever sees the new count finds the
            // partitions gone.
            self.revocations.fetch_add(1, Ordering::AcqRel);
            (tpl, paused)
        };
        if paused.count() > 0 {
            let _ = consumer.resume(&paused);
        }
        if tpl.count() > 0 && !consumer.assignment_lost() {
            // Stored too: librdkafka commits the stored offsets of revoked
            // partitions by itself next, and a stored offset behind this
            // commit would take the group's position back. Sent without
            // waiting: this runs on the thread polling the consumer (a
            // runtime worker), and the coordinator takes the commit before
            // the rejoin that follows on the same connection. Its outcome
            // comes to `commit_callback`.
            store(consumer, &tpl);
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "commit on partition revocation failed; acked messages may be redelivered to the new owner");
            }
        }
        tracing::debug!(partitions = revoked.count(), "partitions revoked");
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
///
/// Once its local queue holds `queued.min.messages` (100,000), librdkafka
/// stops fetching for `fetch.queue.backoff.ms`, by default a whole second; a
/// consumer that drains the queue faster than that then sits idle for the
/// rest of the second (a backlog was read at a tenth of its speed). Looking
/// again after 20 ms costs nothing measurable.
pub(crate) const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.queue.backoff.ms", "20"),
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
/// attributes, so neither is copied again). It and the message's id are
/// built on first use, so a message nobody asks about costs neither.
///
/// Bodies of up to 1 KiB are slices of a buffer shared with others of their
/// batch (up to 64 KiB), which lives while any of them does: an application
/// that keeps many small bodies long after settling their messages should
/// keep copies (`Bytes::copy_from_slice`) instead.
pub struct KafkaSubscription {
    consumer: Arc<KafkaConsumer>,
    group: String,
    topics: Vec<String>,
    /// The subscribed topics' names, shared by every message's tracking.
    topic_names: Vec<Arc<str>>,
    tracker: Arc<Mutex<Tracker>>,
    revocations: Arc<AtomicU64>,
    deliveries: Arc<KafkaDeliveries>,
    wake: Arc<Notify>,
    store: Arc<StoreSignal>,
    subscribed: AtomicBool,
    subscribe_lock: tokio::sync::Mutex<()>,
    /// Set by the context once the group first assigns partitions.
    joined: Arc<AtomicBool>,
    /// What the context learnt of the consumer's commits.
    commits: Arc<Commits>,
    /// Messages polled while [`join`](Self::join) waited, not yet handed out.
    early: Mutex<Vec<ReceivedMessage>>,
    /// A partition with no committed offset starts at the end of its log.
    starts_at_end: bool,
    settings: KafkaConfig,
    key_name: Option<String>,
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
        let tracker = Arc::new(Mutex::new(Tracker::new(config.max_pending)));
        let revocations = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let joined = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(Commits::default());
        let ctx = KafkaContext {
            tracker: tracker.clone(),
            revocations: revocations.clone(),
            joined: joined.clone(),
            commits: commits.clone(),
        };
        let mut cc = settings.client_config(CONSUMER_DEFAULTS);
        if settings.get("auto.offset.reset").is_none() {
            cc.set("auto.offset.reset", reset);
        }
        let starts_at_end = matches!(
            cc.get("auto.offset.reset"),
            Some("latest" | "largest" | "end")
        );
        cc.set("group.id", group);
        let consumer: KafkaConsumer = cc.create_with_context(ctx).map_err(error::map)?;
        let topic_names: Vec<Arc<str>> = topics.iter().map(|t| Arc::from(*t)).collect();
        let deliveries = Arc::new(KafkaDeliveries {
            tracker: tracker.clone(),
            revocations: revocations.clone(),
            topic_names: topic_names.clone(),
        });
        Ok(KafkaSubscription {
            consumer: Arc::new(consumer),
            group: group.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            topic_names,
            tracker,
            revocations,
            deliveries,
            wake,
            store: Arc::default(),
            subscribed: AtomicBool::new(false),
            subscribe_lock: tokio::sync::Mutex::new(()),
            joined,
            commits,
            early: Mutex::new(Vec::new()),
            starts_at_end,
            settings: settings.clone(),
            key_name: config.key_name,
        })
    }

    /// Joins the consumer group now rather than on the first receive, and
    /// waits up to `within` for the group to assign this consumer its
    /// partitions (possibly none): the Go CDK's `WaitForJoin`. At
    /// [`StartOffset::Newest`], each partition the group has no committed
    /// offset for first gets the end of its log as it is now committed as
    /// the group's start, so that what is sent once this returns is
    /// received, whichever member the partition goes to and however often
    /// the group rebalances before the first ack. Messages that arrive
    /// meanwhile are kept for the first receive.
    /// Returns whether the group assigned partitions in time. Fails with
    /// `NotFound` if a topic does not exist.
    pub async fn join(&self, within: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + within;
        if self.starts_at_end && !self.subscribed.load(Ordering::Acquire) {
            self.check_topics().await?;
            let (consumer, topics) = (self.consumer.clone(), self.topics.clone());
            let fixed = tokio::task::spawn_blocking(move || {
                commit_ends_of_new_partitions(&consumer, &topics, within)
            })
            .await
            .map_err(|e| Error::internal(format!("join task failed: {e}")))?;
            if let Err(e) = fixed {
                // The group's start is then librdkafka's own lookup of the
                // end, as without joining first.
                tracing::warn!(error = %e, "could not commit the new group's start at the end of each partition");
            }
        }
        self.ensure_subscribed().await?;
        while !self.joined.load(Ordering::Acquire) {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            // Polling is what lets librdkafka hand over the assignment.
            let step = (now + JOIN_POLL).min(deadline);
            let got = self.poll_batch(JOIN_BATCH, step).await?;
            lock(&self.early).extend(got);
        }
        Ok(true)
    }

    /// Messages polled by `join`, still assigned, up to `max`.
    fn take_early(&self, max: usize) -> Vec<ReceivedMessage> {
        let mut early = lock(&self.early);
        if early.is_empty() {
            return Vec::new();
        }
        let n = max.min(early.len());
        let mut got: Vec<ReceivedMessage> = early.drain(..n).collect();
        drop(early);
        got.retain(|m| self.deliveries.is_current(&m.ack_id));
        got
    }

    /// `NotFound` unless every subscribed topic exists.
    async fn check_topics(&self) -> Result<()> {
        for topic in &self.topics {
            let c = self.consumer.clone();
            topic_exists(move |t| c.fetch_metadata(None, t), topic.clone()).await?;
        }
        Ok(())
    }

    async fn ensure_subscribed(&self) -> Result<()> {
        if self.subscribed.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.subscribe_lock.lock().await;
        if self.subscribed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.check_topics().await?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&topics).map_err(error::map)?;
        tokio::spawn(store_acked(
            Arc::downgrade(&self.tracker),
            Arc::downgrade(&self.consumer),
            self.store.clone(),
        ));
        self.subscribed.store(true, Ordering::Release);
        Ok(())
    }

    /// Polls up to `max` messages, waiting until `deadline` for the first,
    /// and tracks them. Cancel-safe: nothing is taken before the last await.
    async fn poll_batch(
        &self,
        max: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<ReceivedMessage>> {
        let revocations = self.revocations.load(Ordering::Acquire);
        // One stream for the whole batch: each `recv` would register and
        // unregister a waker.
        let mut stream = self.consumer.stream();
        let first = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(r) => r,
        };
        let first = first
            .ok_or_else(|| Error::internal("the Kafka message stream ended"))?
            .map_err(error::map)?;
        let mut got = Vec::with_capacity(max.min(4096));
        let mut bodies = Bodies::new(max);
        self.copy_out(first, &mut bodies, &mut got);
        // Take what has already arrived; no message is held across an
        // await, and each is released before the next is polled.
        while got.len() < max {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => self.copy_out(m, &mut bodies, &mut got),
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, "Kafka consumer error");
                    break;
                }
                _ => break,
            }
        }
        drop(stream);
        if self.revocations.load(Ordering::Acquire) != revocations {
            self.still_assigned(&mut got);
        }
        self.track(&mut got);
        Ok(got)
    }

    fn take_redeliveries(&self, max: usize) -> Vec<ReceivedMessage> {
        let mut t = lock(&self.tracker);
        let n = max.min(t.redeliver.len());
        let taken: Vec<Redelivery> = t.redeliver.drain(..n).collect();
        taken
            .into_iter()
            .filter_map(|r| {
                // Redeliveries of revoked partitions were dropped with them.
                let part = &t.parts[t.by_epoch(r.epoch)?];
                let (topic, partition) = (part.topic_ix, part.partition);
                Some(to_received(
                    r.epoch, topic, partition, r.offset, r.copy, r.attempt,
                ))
            })
            .collect()
    }

    /// What is kept of a message, pushed onto `got`: copied out at once, so
    /// librdkafka's buffer is released while the next message is polled.
    /// Built as the message handed out, whose ack id still lacks the
    /// partition's epoch: [`KafkaSubscription::track`] fills it in.
    fn copy_out(
        &self,
        m: BorrowedMessage<'_>,
        bodies: &mut Bodies,
        got: &mut Vec<ReceivedMessage>,
    ) {
        // Reading the topic's name costs a strlen and a UTF-8 check a
        // message; with one topic subscribed it is known.
        let topic = match &self.topic_names[..] {
            [_] => 0,
            names => {
                let name = m.topic();
                let Some(i) = names.iter().position(|t| **t == *name) else {
                    // Subscribing by names delivers only those topics.
                    tracing::error!(
                        topic = name,
                        "ignored a message of a topic not subscribed to"
                    );
                    return;
                };
                i
            }
        };
        let body = bodies.copy(m.payload().unwrap_or_default());
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
        let ack = AckId::from_u64_pair(UNTRACKED, m.offset() as u64);
        let at = describe_at(m.timestamp(), topic, m.partition());
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        if let (Some(attr), Some(k)) = (&self.key_name, &key) {
            if !k.is_empty() {
                attributes.insert(attr.clone(), k.clone());
            }
        }
        // Released before the message handed out is built: releasing it
        // decrements an atomic count, which waits for every store before it,
        // the 176 bytes of a message built first included.
        drop(m);
        got.push(ReceivedMessage::describe_lazily(body, attributes, ack, at));
        if let Some(r) = got.last_mut() {
            r.ordering_key = key;
            // Unknown: Kafka keeps no delivery count, and another consumer
            // (or this group before a restart) may have read the offset.
        }
    }

    /// Drops messages polled before their partition was revoked during
    /// the same batch: they were not handed out, their new owner reads them,
    /// and tracking them would bring back a partition this consumer no
    /// longer holds.
    fn still_assigned(&self, got: &mut Vec<ReceivedMessage>) {
        let Ok(assigned) = self.consumer.assignment() else {
            got.clear();
            return;
        };
        got.retain(|m| {
            let (_, topic, partition) = described(m.lazy.unwrap_or_default());
            assigned
                .find_partition(&self.topic_names[topic], partition)
                .is_some()
        });
    }

    /// Records each message as pending in its partition and completes its
    /// ack id with the partition's epoch.
    fn track(&self, got: &mut [ReceivedMessage]) {
        let mut t = lock(&self.tracker);
        let max = t.max_pending;
        let mut full = TopicPartitionList::new();
        for m in got {
            let (_, topic, partition) = described(m.lazy.unwrap_or_default());
            let offset = m.ack_id.as_u64_pair().map_or(0, |(_, o)| o as i64);
            let i = t.part(topic, &self.topic_names[topic], partition);
            let part = &mut t.parts[i];
            part.record(offset);
            m.ack_id = AckId::from_u64_pair(part.epoch, offset as u64);
            if !part.paused && part.pending.len() >= max {
                part.paused = true;
                full.add_partition(&part.topic, part.partition);
            }
        }
        if full.count() > 0 {
            // librdkafka drops what it fetched of a paused partition and
            // reads on from the last message handed out when it resumes.
            // Paused with the tracker locked, as the store task resumes:
            // a resume decided after this pause must not reach librdkafka
            // before it, which left the partition paused for good.
            tracing::debug!(partitions = ?full, "pausing partitions with {max} deliveries waiting to be committed");
            if let Err(e) = self.consumer.pause(&full) {
                tracing::warn!(error = %e, "pausing a partition failed");
            }
        }
        drop(t);
    }

    /// The commit position of every partition this consumer holds, stored
    /// as well: librdkafka commits the stored offsets by itself when the
    /// consumer leaves its group, and stored offsets behind this commit
    /// would then take the group's position back (seen: a restarted
    /// consumer got acked messages again).
    fn final_positions(&self) -> TopicPartitionList {
        let mut t = lock(&self.tracker);
        let all = 0..t.parts.len();
        let _ = t.positions(all);
        let mut tpl = TopicPartitionList::new();
        for part in &t.parts {
            if part.committed >= 0 {
                let _ = tpl.add_partition_offset(
                    &part.topic,
                    part.partition,
                    Offset::Offset(part.committed),
                );
            }
        }
        // Under the lock, so no store computed earlier lands after it.
        store(&*self.consumer, &tpl);
        tpl
    }
}

/// Stores these commit positions (a local call: the next auto-commit sends
/// them).
fn store<C: ConsumerContext>(consumer: &impl Consumer<C>, tpl: &TopicPartitionList) {
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.store_offsets(tpl) {
        // Partitions revoked meanwhile cannot be stored; their new owner
        // starts from what revocation committed.
        tracing::debug!(error = %e, "storing acked offsets failed");
    }
}

/// Wakes [`store_acked`] when acks are due to be stored, and stops it.
#[derive(Default)]
struct StoreSignal {
    wake: Notify,
    stopped: AtomicBool,
}

impl StoreSignal {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // A stored permit: the task sees it even if it is not waiting yet.
        self.wake.notify_one();
    }
}

/// Stores the acked prefix of each partition shortly after acks settled at
/// once moved it, until the subscription closes or is dropped.
async fn store_acked(
    tracker: std::sync::Weak<Mutex<Tracker>>,
    consumer: std::sync::Weak<KafkaConsumer>,
    signal: Arc<StoreSignal>,
) {
    loop {
        signal.wake.notified().await;
        if signal.stopped.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(STORE_AFTER).await;
        let (Some(tracker), Some(consumer)) = (tracker.upgrade(), consumer.upgrade()) else {
            return;
        };
        let mut t = lock(&tracker);
        // Acks from here on wake this task again.
        t.store_due = false;
        let all = 0..t.parts.len();
        let tpl = t.positions(all.clone());
        // Under the lock, so stores land in the order they were computed.
        store(&*consumer, &tpl);
        let drained = t.drained(all);
        // Resumed with the tracker locked, in order with the pauses.
        if drained.count() > 0 {
            tracing::debug!(partitions = ?drained, "resuming partitions");
            if let Err(e) = consumer.resume(&drained) {
                tracing::warn!(error = %e, "resuming a partition failed");
            }
        }
        drop(t);
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.store.stop();
    }
}

/// `topic/partition/offset`.
pub(crate) fn delivery_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// Where a batch's small bodies are copied: one allocation holds many, and
/// each body is a reference-counted slice of it, so none costs an
/// allocation of its own. A chunk is freed when the
/// last of its messages is settled; a message larger than `SMALL_BODY` gets
/// a buffer of its own so it never pins a chunk.
struct Bodies {
    chunk: BytesMut,
    /// Messages still expected in this batch, to size the next chunk.
    expected: usize,
}

/// Bodies up to this size share chunks.
const SMALL_BODY: usize = 1024;
/// Measured: 16 KiB chunks read a backlog about 15% slower than 64 KiB.
const CHUNK: usize = 64 * 1024;

impl Bodies {
    fn new(expected: usize) -> Self {
        Bodies {
            chunk: BytesMut::new(),
            expected,
        }
    }

    fn copy(&mut self, body: &[u8]) -> Bytes {
        self.expected = self.expected.saturating_sub(1);
        if body.len() > SMALL_BODY {
            return Bytes::from(body.to_vec());
        }
        if self.chunk.capacity() - self.chunk.len() < body.len() {
            // Sized by this body and what the batch may still bring, so a
            // lone message does not hold a whole chunk.
            let want = body.len().max(1) * (self.expected + 1).min(CHUNK / 64);
            self.chunk = BytesMut::with_capacity(want.clamp(body.len(), CHUNK));
        }
        self.chunk.extend_from_slice(body);
        self.chunk.split().freeze()
    }
}

/// The epoch in the ack id of a message polled and not yet tracked; never
/// a real epoch, which count from 1.
const UNTRACKED: u64 = 0;

/// The message handed out: its id and raw record are built by
/// [`KafkaDeliveries`] if asked, from
/// the ack id (epoch, offset) and [`describe_at`]'s numbers.
fn to_received(
    epoch: u64,
    topic: usize,
    partition: i32,
    offset: i64,
    c: Content,
    attempt: u32,
) -> ReceivedMessage {
    let ack = AckId::from_u64_pair(epoch, offset as u64);
    let at = describe_at(c.timestamp, topic, partition);
    let mut m = ReceivedMessage::describe_lazily(c.body, c.attributes, ack, at);
    m.delivery_attempt = Some(attempt);
    m.ordering_key = c.key;
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

/// The (epoch, offset) of each id this driver made.
fn acks(ids: &[AckId]) -> impl Iterator<Item = (u64, i64)> + '_ {
    ids.iter()
        .filter_map(AckId::as_u64_pair)
        .map(|(epoch, offset)| (epoch, offset as i64))
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
        if let Some(e) = self.commits.failure() {
            return Err(e);
        }
        self.ensure_subscribed().await?;
        let early = self.take_early(max);
        if !early.is_empty() {
            return Ok(early);
        }
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
            tokio::select! {
                r = self.poll_batch(max, deadline) => return r,
                _ = nacked => continue,
            }
        }
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        // An ack only moves the acked prefix that the next auto-commit
        // sends, so it is settled on the acking thread (local settlement);
        // `store_acked` stores the offsets a moment later, for all acks of
        // that moment.
        let mut t = lock(&self.tracker);
        let mut moved = false;
        for (epoch, offset) in acks(ids) {
            moved |= t.ack(epoch, offset).is_some();
        }
        if moved && !t.store_due {
            t.store_due = true;
            drop(t);
            self.store.wake.notify_one();
        }
        Settlement::done(Ok(()))
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        // Kafka cannot hand a delivery back: the message is handed out
        // again from its content, and its offset stays uncommitted (so a
        // restart or the partition's next owner reads it again) until it
        // is acked.
        let mut queued = false;
        {
            let mut t = lock(&self.tracker);
            for n in nacks {
                let Some((epoch, offset)) = n.ack_id.as_u64_pair() else {
                    continue;
                };
                let offset = offset as i64;
                // Nothing to redeliver for an acked delivery, nor for one of
                // a partition since revoked: its new owner reads it.
                if !t.find(epoch, offset).is_some_and(|p| !p.acked) {
                    continue;
                }
                let (timestamp, _, _) = described(n.lazy.unwrap_or_default());
                t.redeliver.push_back(Redelivery {
                    epoch,
                    offset,
                    copy: Content {
                        body: n.body.clone(),
                        attributes: n.attributes.clone(),
                        key: n.ordering_key.clone(),
                        timestamp,
                    },
                    // Counted from this subscription's own first delivery.
                    attempt: n.delivery_attempt.unwrap_or(1).saturating_add(1),
                });
                queued = true;
            }
        }
        if queued {
            self.wake.notify_waiters();
        }
        Settlement::done(Ok(()))
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
        self.store.stop();
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
        committed?;
        // A commit that failed for good earlier is this subscription's
        // failure, as a failed ack batch would be.
        self.commits.failure().map_or(Ok(()), Err)
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&*self.consumer)
    }

    fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
        Some(self.deliveries.clone())
    }
}

/// What the core asks about a subscription's deliveries: their ids and
/// records, built only if asked, and whether their partition is still
/// assigned to this consumer.
struct KafkaDeliveries {
    tracker: Arc<Mutex<Tracker>>,
    revocations: Arc<AtomicU64>,
    topic_names: Vec<Arc<str>>,
}

impl KafkaDeliveries {
    /// The topic, partition, offset and timestamp of a delivery.
    fn delivery(&self, ack_id: &AckId, at: (i64, i64)) -> Option<(&str, i32, i64, Timestamp)> {
        let (_, offset) = ack_id.as_u64_pair()?;
        let (timestamp, topic, partition) = described(at);
        let topic = self.topic_names.get(topic)?;
        Some((topic, partition, offset as i64, timestamp))
    }
}

impl Deliveries for KafkaDeliveries {
    fn describe_id(&self, ack_id: &AckId, at: (i64, i64)) -> String {
        match self.delivery(ack_id, at) {
            Some((topic, partition, offset, _)) => delivery_id(topic, partition, offset),
            None => format!("{ack_id:?}"),
        }
    }

    fn describe_raw(
        &self,
        ack_id: &AckId,
        at: (i64, i64),
        ordering_key: Option<&str>,
    ) -> Option<Box<dyn Any + Send + Sync>> {
        let (topic, partition, offset, timestamp) = self.delivery(ack_id, at)?;
        // Headers are the attributes already and the payload the body; the
        // raw record carries the rest.
        Some(Box::new(OwnedMessage::new(
            None,
            ordering_key.map(|k| k.as_bytes().to_vec()),
            topic.to_owned(),
            timestamp,
            partition,
            offset,
            None,
        )))
    }

    fn taken_back(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    fn is_current(&self, ack_id: &AckId) -> bool {
        // Revocation forgets a partition's assignment, whose epoch the ids
        // of its deliveries carry; a later assignment of the same partition
        // reads its unacked messages again under a new epoch.
        match ack_id.as_u64_pair() {
            Some((epoch, _)) => lock(&self.tracker).by_epoch(epoch).is_some(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{delivery_id, describe_at, described};
    use rdkafka::Timestamp;

    #[test]
    fn describe_numbers_keep_timestamp_topic_and_partition() {
        for (ts, topic, partition) in [
            (Timestamp::NotAvailable, 0, 0),
            (Timestamp::CreateTime(1_700_000_000_123), 3, 11),
            (Timestamp::LogAppendTime(0), 0x3FFF_FFFF, i32::MAX),
            (Timestamp::CreateTime(-5), 1, -1),
            (Timestamp::LogAppendTime(i64::MAX), 7, i32::MIN),
        ] {
            assert_eq!(
                described(describe_at(ts, topic, partition)),
                (ts, topic, partition)
            );
        }
    }

    #[test]
    fn delivery_ids_read_topic_partition_offset() {
        assert_eq!(delivery_id("orders", 0, 0), "orders/0/0");
        assert_eq!(delivery_id("t", 12, 9_876_543_210), "t/12/9876543210");
        assert_eq!(delivery_id("t", -1, i64::MIN), format!("t/-1/{}", i64::MIN));
        assert_eq!(
            delivery_id("t", i32::MAX, i64::MAX),
            format!("t/{}/{}", i32::MAX, i64::MAX)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn timestamp() -> impl Strategy<Value = Timestamp> {
            prop_oneof![
                Just(Timestamp::NotAvailable),
                any::<i64>().prop_map(Timestamp::CreateTime),
                any::<i64>().prop_map(Timestamp::LogAppendTime),
            ]
        }

        proptest! {
            /// The two numbers a lazily described message keeps give back
            /// its timestamp, topic and partition, whatever they are.
            #[test]
            fn described_numbers_give_back_what_they_keep(
                ts in timestamp(),
                topic in 0usize..=0x3FFF_FFFF,
                partition: i32,
            ) {
                prop_assert_eq!(described(describe_at(ts, topic, partition)), (ts, topic, partition));
            }
        }
    }
}
