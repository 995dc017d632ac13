//! Topics: each batch the core hands over leaves as one Publish request.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_pubsub::client::{BasePublisher, Publisher};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::publisher::PublishFuture;
use pubsub_core::driver::{self, BatchError, BatchLimits, Capabilities, OutgoingMessage, Sent};
use pubsub_core::{Error, Result};

use crate::path::{full_path, Collection};

/// Most messages in one Publish request.
pub const MAX_SEND_BATCH: usize = 1000;
/// Pub/Sub's limit on one Publish request.
const MAX_REQUEST_BYTES: u32 = 10_000_000;
/// Room for a request's framing and topic name, which
/// [`OutgoingMessage::size`] does not count.
const REQUEST_ROOM: usize = 4096;
/// Largest message this driver sends, as [`OutgoingMessage::size`]
/// counts it (data, attribute names and values, ordering key).
pub const MAX_MESSAGE_BYTES: usize = MAX_REQUEST_BYTES as usize - REQUEST_ROOM;
/// Pub/Sub's limits on attributes.
const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_KEY: usize = 256;
const MAX_ATTRIBUTE_VALUE: usize = 1024;
/// Long enough that the publisher never sends on a timer: batches leave
/// when the driver lets go of them.
const NEVER: Duration = Duration::from_secs(24 * 60 * 60);

/// How a topic publishes.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct TopicConfig {
    /// Most messages in one Publish request, 1 to 1000 (the URL's
    /// `max_send_batch_size`).
    pub max_send_batch_size: usize,
    /// Whether messages may carry ordering keys (the URL's `ordering`). As
    /// with Google's own clients, a message with an ordering key is refused
    /// with `InvalidArgument` by a topic without it.
    pub message_ordering: bool,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            max_send_batch_size: MAX_SEND_BATCH,
            message_ordering: false,
        }
    }
}

/// The driver side of a Pub/Sub topic.
///
/// [`pubsub_core::Topic::as_raw`] gives its
/// [`google_cloud_pubsub::client::BasePublisher`]; a before-send hook gets
/// the outgoing [`google_cloud_pubsub::model::Message`]; an after-send hook
/// gets the message id Pub/Sub assigned as [`Sent::id`] (the id receivers
/// see) and as [`Sent::raw`], a `String`.
#[derive(Debug)]
pub struct GcpTopic {
    client: BasePublisher,
    path: String,
    config: TopicConfig,
    /// Long-lived publishers for batches without ordering keys, by batch
    /// size: each sends a request as soon as it holds that many messages.
    sized: Mutex<HashMap<usize, Publisher>>,
}

impl GcpTopic {
    /// A topic named `projects/P/topics/T` or `P/T`, publishing through
    /// `client`. Fails with `InvalidArgument` for a name Pub/Sub would
    /// refuse; a topic that does not exist fails its first send.
    pub fn new(client: BasePublisher, name: &str, config: TopicConfig) -> Result<Self> {
        if !(1..=MAX_SEND_BATCH).contains(&config.max_send_batch_size) {
            return Err(Error::invalid_argument(format!(
                "max_send_batch_size must be between 1 and {MAX_SEND_BATCH}, not {}",
                config.max_send_batch_size
            )));
        }
        Ok(GcpTopic {
            client,
            path: full_path(name, Collection::Topics)?,
            config,
            sized: Mutex::new(HashMap::new()),
        })
    }

    /// The topic's full path, `projects/P/topics/T`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A publisher that sends a request once it holds `count` messages and
    /// never on a timer. Its bytes threshold is above what the core hands
    /// over, so it never splits a batch.
    fn publisher(&self, count: usize) -> Publisher {
        self.client
            .publisher(self.path.clone())
            .set_message_count_threshold(count as u32)
            .set_byte_threshold(MAX_REQUEST_BYTES)
            .set_delay_threshold(NEVER)
            .build()
    }

    /// The publisher for a batch of `count` messages. Without ordering
    /// keys, a long-lived one sized to the batch: it sends the batch as one
    /// request when the last message is in, with no task to start (batches
    /// in flight at once may share a request; each still gets its own
    /// results). With ordering keys, one for this batch alone, which the
    /// publisher splits by key: it sends what each key holds when dropped.
    fn batch_publisher(&self, count: usize, keyed: bool) -> Publisher {
        if keyed {
            return self.publisher(MAX_SEND_BATCH);
        }
        let mut sized = self.sized.lock().unwrap_or_else(|p| p.into_inner());
        sized
            .entry(count)
            .or_insert_with(|| self.publisher(count))
            .clone()
    }

    fn check(&self, m: &OutgoingMessage) -> Result<()> {
        if m.ordering_key.as_deref().is_some_and(|k| !k.is_empty()) && !self.config.message_ordering
        {
            return Err(Error::invalid_argument(
                "the message has an ordering key, and this topic was opened without message \
                 ordering (TopicConfig::message_ordering, or ?ordering=true in its URL)",
            ));
        }
        if m.body.is_empty() && m.attributes.is_empty() {
            return Err(Error::invalid_argument(
                "Pub/Sub refuses a message with neither data nor attributes",
            ));
        }
        if m.attributes.len() > MAX_ATTRIBUTES {
            return Err(Error::invalid_argument(format!(
                "the message has {} attributes; Pub/Sub takes at most {MAX_ATTRIBUTES}",
                m.attributes.len()
            )));
        }
        for (k, v) in &m.attributes {
            if k.len() > MAX_ATTRIBUTE_KEY || v.len() > MAX_ATTRIBUTE_VALUE {
                return Err(Error::invalid_argument(format!(
                    "Pub/Sub takes attribute names of at most {MAX_ATTRIBUTE_KEY} bytes and \
                     values of at most {MAX_ATTRIBUTE_VALUE}; {:?}... has {} and {}",
                    k.chars().take(32).collect::<String>(),
                    k.len(),
                    v.len()
                )));
            }
        }
        Ok(())
    }

    /// The message's record, before any hook has seen it.
    fn plain_record(m: &OutgoingMessage) -> Message {
        let mut record = Message::new()
            .set_data(m.body.clone())
            .set_attributes(m.attributes.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(key) = &m.ordering_key {
            record = record.set_ordering_key(key.clone());
        }
        record
    }

    fn record(m: &OutgoingMessage) -> Result<Message> {
        let mut record = Self::plain_record(m);
        m.run_before_send(&mut record)?;
        Ok(record)
    }
}

pub(crate) fn capabilities(config: &TopicConfig) -> Capabilities {
    let mut c = Capabilities::default();
    c.messaging_system = Some(crate::MESSAGING_SYSTEM);
    c.fan_out = true;
    c.ordering_keys = config.message_ordering;
    c.max_message_bytes = Some(MAX_MESSAGE_BYTES);
    // The Go CDK's limits: 1000 messages and 8 MB a request, two in
    // flight. A request has a fixed cost, so the core refills: after a
    // Publish it lets the senders it answered come back before the next,
    // and a second request goes out only for a full batch. Without that,
    // 100 awaiting senders made requests of 39 on average (the first to
    // come back went alone) and reached 0.70-0.77 of the raw publisher;
    // with it, 99.5 and 0.91-0.92. More in flight measured slower still (4
    // gave 0.48).
    c.send_batching = BatchLimits::new(config.max_send_batch_size, 2)
        .with_max_bytes(8_000_000)
        .with_refill(true);
    c
}

#[async_trait]
impl driver::Topic for GcpTopic {
    fn driver_name(&self) -> &'static str {
        crate::DRIVER
    }

    fn resource(&self) -> &str {
        &self.path
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.config)
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        if !batch.iter().any(OutgoingMessage::has_before_send) {
            // Without hooks the checks alone give the batch's size, so each
            // record is handed over as soon as it is made and the
            // publisher's tasks (on another core where there is one) take
            // the first while the rest are made: making all the records
            // and only then handing them over was a chain, after the last
            // sender came back, that the raw publisher's senders do not
            // wait for.
            let mut valid = Vec::with_capacity(batch.len());
            for (i, m) in batch.iter().enumerate() {
                match self.check(m) {
                    Ok(()) => valid.push(i),
                    Err(e) => failed.push((i, e)),
                }
            }
            let keyed = valid.iter().any(|&i| {
                batch[i]
                    .ordering_key
                    .as_deref()
                    .is_some_and(|k| !k.is_empty())
            });
            let records = valid.iter().map(|&i| (i, Self::plain_record(&batch[i])));
            let pending = self.publish(valid.len(), keyed, records);
            return self.answered(batch, pending, failed).await;
        }
        let mut records = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            match self.check(m).and_then(|()| Self::record(m)) {
                Ok(record) => records.push((i, record)),
                Err(e) => failed.push((i, e)),
            }
        }
        let keyed = records.iter().any(|(_, r)| !r.ordering_key.is_empty());
        let pending = self.publish(records.len(), keyed, records.into_iter());
        self.answered(batch, pending, failed).await
    }

    async fn close(&self) -> Result<()> {
        // Every batch has been answered; the publishers' tasks end with
        // their handles.
        self.sized.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.client)
    }
}

impl GcpTopic {
    /// Publishes a batch of `count` records, `keyed` if any has an ordering
    /// key, and gives each one's index and pending answer.
    fn publish(
        &self,
        count: usize,
        keyed: bool,
        records: impl Iterator<Item = (usize, Message)>,
    ) -> Vec<(usize, PublishFuture)> {
        let publisher = self.batch_publisher(count.max(1), keyed);
        // Published without an await between them, so a batch is never
        // cut short: a sized publisher sends when its last one is in.
        let pending = records.map(|(i, r)| (i, publisher.publish(r))).collect();
        // A publisher of this batch alone sends what it holds when its
        // last handle is dropped. Each batch with ordering keys has a
        // publisher of its own, so a key the publisher pauses after a
        // failure never holds up a later batch: the core's retry of this
        // one goes out in order.
        drop(publisher);
        pending
    }

    /// Waits for each published message's answer and reports the batch's
    /// failures, `failed` (those refused before publishing) included.
    async fn answered(
        &self,
        batch: &[OutgoingMessage],
        pending: Vec<(usize, PublishFuture)>,
        mut failed: Vec<(usize, Error)>,
    ) -> Result<(), BatchError> {
        for (i, future) in pending {
            match future.await {
                Ok(id) => {
                    if let Err(e) = batch[i].run_after_send(|| Sent::new(&id).with_id(id.as_str()))
                    {
                        failed.push((i, e));
                    }
                }
                Err(e) => failed.push((i, crate::error::publish(e))),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        // Each failure is reported for its own message, a whole-batch
        // failure too: the core retries each as its error says.
        failed.sort_by_key(|(i, _)| *i);
        Err(BatchError::Items(failed))
    }
}
