//! A subscription is a consumer group.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pubsub_core::driver::{
    self, AckId, BatchError, BatchLimits, Capabilities, Nacked, ReceivedMessage, Settlement,
};
use pubsub_core::{Error, ErrorKind, Result};
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::connection::Connector;
use crate::entry::{self, Entry};
use crate::{error, DEFAULT_MAX_MESSAGE_BYTES, DRIVER};

/// The default ack deadline: how long a delivery may stay unacked before
/// any consumer of the group may claim it again.
pub const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(30);

/// The default most entries one read returns.
pub const DEFAULT_BATCH: usize = 256;

/// How long one `XREADGROUP` blocks waiting for a new entry.
const BLOCK: Duration = Duration::from_millis(500);

/// The idle time a nack gives an entry: longer than any sane ack deadline,
/// so every consumer's next `XAUTOCLAIM` takes it.
const NACKED_IDLE_MS: u64 = 24 * 3600 * 1000;

/// Options of a group-backed subscription.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// This subscription's consumer name in the group. `None` draws one
    /// unique to the subscription: `pubsub-PID-RANDOM`. A stable name lets a
    /// restarted process take its own pending entries back at once (they
    /// are claimed after the ack deadline either way).
    pub consumer: Option<String>,
    /// How long a delivery may stay unacked before it is claimed again (by
    /// `XAUTOCLAIM` of entries idle that long). Every consumer of a group
    /// should use the same.
    pub ack_deadline: Duration,
    /// Most entries one read returns.
    pub batch: usize,
    /// Create the group (reading from new entries, and the stream with it)
    /// if it does not exist; without it a missing stream or group is
    /// `NotFound`.
    pub create_group: bool,
    /// Deliveries after which an entry is not handed out again: it is
    /// copied to [`SubscriptionConfig::dead_letter_stream`] if set, then
    /// acked.
    pub max_deliveries: Option<u64>,
    /// Where entries past `max_deliveries` go.
    pub dead_letter_stream: Option<String>,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            consumer: None,
            ack_deadline: DEFAULT_ACK_DEADLINE,
            batch: DEFAULT_BATCH,
            create_group: false,
            max_deliveries: None,
            dead_letter_stream: None,
        }
    }
}

impl SubscriptionConfig {
    /// Sets the consumer name.
    pub fn with_consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Sets the ack deadline (at least 1 ms).
    pub fn with_ack_deadline(mut self, d: Duration) -> Self {
        self.ack_deadline = d.max(Duration::from_millis(1));
        self
    }

    /// Sets the most entries a read returns (at least 1).
    pub fn with_batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Creates the group if it is missing.
    pub fn with_create_group(mut self) -> Self {
        self.create_group = true;
        self
    }

    /// Stops handing out an entry after `n` deliveries, moving it to
    /// `dead_letter` if given.
    pub fn with_max_deliveries(mut self, n: u64, dead_letter: Option<String>) -> Self {
        self.max_deliveries = Some(n.max(1));
        self.dead_letter_stream = dead_letter;
        self
    }
}

struct ReadState {
    /// The blocking-read connection, made on first receive.
    reader: Option<ConnectionManager>,
    group_ready: bool,
    /// Where the `XAUTOCLAIM` scan of the group's pending entries goes on.
    cursor: String,
    /// When the next scan is due.
    next_claim: Instant,
}

/// The Redis Streams subscription driver: one consumer of one group.
///
/// [`pubsub_core::Subscription::as_raw`] gives the [`Connector`];
/// [`pubsub_core::Message::as_raw`] the [`Entry`] as read.
pub struct RedisSubscription {
    connector: Connector,
    stream: String,
    group: String,
    consumer: String,
    resource: String,
    config: SubscriptionConfig,
    state: Mutex<ReadState>,
    /// A nack asks for the next receive to claim at once.
    nacked: AtomicBool,
    /// Stops the tasks that keep long lease extensions alive.
    closed: Arc<AtomicBool>,
}

impl RedisSubscription {
    /// A subscription reading `stream` as a consumer of `group`. Neither is
    /// checked until the first receive.
    pub fn new(
        connector: Connector,
        stream: &str,
        group: &str,
        config: SubscriptionConfig,
    ) -> Result<Self> {
        if stream.is_empty() || group.is_empty() {
            return Err(Error::invalid_argument(
                "a Redis subscription needs a stream and a group name",
            ));
        }
        let consumer = config
            .consumer
            .clone()
            .unwrap_or_else(|| format!("pubsub-{}-{:08x}", std::process::id(), fastrand::u32(..)));
        Ok(RedisSubscription {
            resource: format!("{stream}/{group}"),
            connector,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer,
            config,
            state: Mutex::new(ReadState {
                reader: None,
                group_ready: false,
                cursor: "0-0".to_owned(),
                next_claim: Instant::now(),
            }),
            nacked: AtomicBool::new(false),
            closed: Arc::default(),
        })
    }

    /// This subscription's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn deadline_ms(&self) -> u64 {
        u64::try_from(self.config.ack_deadline.as_millis()).unwrap_or(u64::MAX)
    }

    async fn ensure_group(&self, conn: &mut ConnectionManager) -> Result<()> {
        let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(error::map(e, "XGROUP CREATE")),
        }
    }

    /// Claims entries idle past the ack deadline (or nacked), continuing
    /// the scan where the last call left it.
    async fn claim(&self, st: &mut ReadState, max: usize) -> Result<Vec<ReceivedMessage>> {
        let mut conn = self.connector.connection()?;
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.deadline_ms())
            .arg(&st.cursor)
            .arg("COUNT")
            .arg(max)
            .query_async(&mut conn)
            .await
            .map_err(|e| error::map(e, "XAUTOCLAIM"))?;
        let (cursor, claimed, deleted) = entry::autoclaim_reply(&self.stream, reply)?;
        if deleted > 0 {
            tracing::warn!(
                stream = %self.stream, group = %self.group, deleted,
                "pending entries were trimmed or deleted before they were acked"
            );
        }
        let scanned = cursor == "0-0";
        st.cursor = cursor;
        if scanned {
            st.next_claim =
                Instant::now() + (self.config.ack_deadline / 4).max(Duration::from_millis(50));
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let counts = self.delivery_counts(&mut conn, &claimed).await?;
        let mut out = Vec::with_capacity(claimed.len());
        let mut dead = Vec::new();
        for e in claimed {
            let count = counts.get(&e.id).copied();
            match (self.config.max_deliveries, count) {
                (Some(limit), Some(n)) if n > limit => dead.push(e),
                _ => out.extend(self.to_message(e, count)),
            }
        }
        if !dead.is_empty() {
            self.bury(&mut conn, dead).await?;
        }
        Ok(out)
    }

    async fn delivery_counts(
        &self,
        conn: &mut ConnectionManager,
        claimed: &[Entry],
    ) -> Result<HashMap<String, u64>> {
        let (first, last) = (&claimed[0].id, &claimed[claimed.len() - 1].id);
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(first)
            .arg(last)
            .arg(claimed.len().max(1) * 2)
            .arg(&self.consumer)
            .query_async(conn)
            .await
            .map_err(|e| error::map(e, "XPENDING"))?;
        Ok(entry::pending_reply(reply)?.into_iter().collect())
    }

    /// Moves entries past the delivery limit out of the way: copied to the
    /// dead-letter stream, if any, and acked, in one transaction.
    async fn bury(&self, conn: &mut ConnectionManager, dead: Vec<Entry>) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for e in &dead {
            if let Some(dl) = &self.config.dead_letter_stream {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(dl).arg("*");
                for (k, v) in &e.fields {
                    cmd.arg(k.as_ref()).arg(v.as_ref());
                }
                pipe.add_command(cmd).ignore();
            }
            pipe.cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&e.id)
                .ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| error::map(e, "moving entries past max_deliveries"))?;
        tracing::warn!(
            stream = %self.stream, group = %self.group, entries = dead.len(),
            dead_letter = ?self.config.dead_letter_stream,
            "entries reached max_deliveries and will not be handed out again"
        );
        Ok(())
    }

    async fn read_new(&self, st: &mut ReadState, max: usize) -> Result<Vec<ReceivedMessage>> {
        if st.reader.is_none() {
            st.reader = Some(self.connector.blocking_connection(BLOCK)?);
        }
        let reader = st.reader.as_mut().expect("made above");
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(500))
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(reader)
            .await
            .map_err(|e| error::map(e, "XREADGROUP"))?;
        Ok(entry::read_reply(&self.stream, reply)?
            .into_iter()
            .filter_map(|e| self.to_message(e, Some(1)))
            .collect())
    }

    fn to_message(&self, e: Entry, deliveries: Option<u64>) -> Option<ReceivedMessage> {
        let Some(at) = entry::parse_id(&e.id) else {
            tracing::warn!(id = %e.id, "skipping a stream entry with an unreadable id");
            return None;
        };
        let d = entry::decode(&e.fields);
        let id = d.id.unwrap_or_else(|| e.id.clone());
        let mut m =
            ReceivedMessage::new(d.body, d.attributes, id, AckId::from_u64_pair(at.0, at.1));
        m.ordering_key = d.ordering_key;
        m.delivery_attempt = deliveries.and_then(|n| u32::try_from(n).ok());
        m.raw = Some(Box::new(e));
        Some(m)
    }

    fn entry_ids<'a>(ids: impl Iterator<Item = &'a AckId>) -> Result<Vec<String>, BatchError> {
        ids.map(|id| {
            id.as_u64_pair()
                .map(entry::format_id)
                .ok_or_else(|| Error::invalid_argument("not a Redis stream delivery"))
        })
        .collect::<Result<_>>()
        .map_err(BatchError::All)
    }

    fn toucher(&self) -> Toucher {
        Toucher {
            connector: self.connector.clone(),
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
        }
    }

    /// Deletes this consumer from the group if it holds nothing, so groups
    /// do not collect the names of subscriptions long closed. A consumer
    /// with pending entries stays: deleting it would drop them.
    async fn forget_consumer_if_idle(&self) -> Result<()> {
        let mut conn = self.connector.connection()?;
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&self.consumer)
            .query_async(&mut conn)
            .await
            .map_err(|e| error::map(e, "XPENDING"))?;
        if entry::pending_reply(pending)?.is_empty() {
            redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .query_async::<Value>(&mut conn)
                .await
                .map_err(|e| error::map(e, "XGROUP DELCONSUMER"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscription")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("server", &self.connector.server())
            .finish()
    }
}

#[async_trait]
impl driver::Subscription for RedisSubscription {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.resource
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.nack = true;
        c.lease_extension = true;
        c.redelivery_after_deadline = true;
        c.ack_deadline = Some(self.config.ack_deadline);
        c.fan_out = true;
        c.max_message_bytes = Some(DEFAULT_MAX_MESSAGE_BYTES);
        // XACK of a few hundred ids costs Redis little more than of one;
        // two in flight keep up with any receive rate, and bound what a
        // lost connection can leave acked by the application but not by
        // Redis (redelivered later).
        c.ack_batching = BatchLimits::new(500, 2);
        c.max_receive_batch = self.config.batch.max(1);
        // One blocking reader a subscription.
        c.max_concurrent_receives = 1;
        c
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let mut st = self.state.lock().await;
        if self.config.create_group && !st.group_ready {
            self.ensure_group(&mut self.connector.connection()?).await?;
            st.group_ready = true;
        }
        // Entries whose deadline passed (or that were nacked) first, so a
        // busy stream cannot starve them.
        if self.nacked.swap(false, Ordering::AcqRel) || Instant::now() >= st.next_claim {
            let claimed = self.claim(&mut st, max).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        self.read_new(&mut st, max).await
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        Settlement::later(async move {
            let ids = Self::entry_ids(ids.iter())?;
            let mut conn = self.connector.connection()?;
            redis::cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&ids)
                .query_async::<Value>(&mut conn)
                .await
                .map_err(|e| BatchError::All(error::map(e, "XACK")))?;
            Ok(())
        })
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        Settlement::later(async move {
            let ids = Self::entry_ids(nacks.iter().map(|n| &n.ack_id))?;
            self.toucher()
                .touch(&ids, Some(NACKED_IDLE_MS))
                .await
                .map_err(BatchError::All)?;
            self.nacked.store(true, Ordering::Release);
            Ok(())
        })
    }

    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        let ids = Self::entry_ids(ids.iter())?;
        let toucher = self.toucher();
        toucher.touch(&ids, None).await.map_err(BatchError::All)?;
        // An entry's idle time can only be reset to now, which buys one ack
        // deadline; a longer extension resets it again every half deadline
        // until `by` is covered or the subscription closes. Harmless for an
        // entry acked meanwhile: XCLAIM skips entries no longer pending.
        let deadline = self.config.ack_deadline;
        if by > deadline {
            let closed = self.closed.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut covered = deadline;
                while covered < by {
                    tokio::time::sleep_until(start + covered - deadline / 2).await;
                    if closed.load(Ordering::Acquire) || toucher.touch(&ids, None).await.is_err() {
                        return;
                    }
                    covered += deadline / 2;
                }
            });
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.state.lock().await.reader = None;
        match self.forget_consumer_if_idle().await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.connector)
    }
}

/// `XCLAIM ... JUSTID` of entries for this consumer: resets their idle
/// time (to `idle_ms`, or to now), which restarts or ends their ack
/// deadline, without counting a delivery. Owned, so a background
/// lease-extension task can keep one.
struct Toucher {
    connector: Connector,
    stream: String,
    group: String,
    consumer: String,
}

impl Toucher {
    async fn touch(&self, ids: &[String], idle_ms: Option<u64>) -> Result<()> {
        let mut conn = self.connector.connection()?;
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(ids);
        if let Some(ms) = idle_ms {
            cmd.arg("IDLE").arg(ms);
        }
        cmd.arg("JUSTID")
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| error::map(e, "XCLAIM"))?;
        Ok(())
    }
}
