//! Sending through a producer whose delivery reports decide each result.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pubsub_core::driver::{self, BatchError, Capabilities, OutgoingMessage, Sent};
use pubsub_core::{Error, Result};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::{capabilities, error, topic_exists, KafkaConfig, DRIVER};

/// Options of a Kafka topic.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct TopicConfig {
    /// Take each message's key from this attribute, which is then not also
    /// sent as a header (as the Go CDK's `key_name`). Without it, the
    /// ordering key is the key.
    pub key_name: Option<String>,
}

impl TopicConfig {
    /// Sets the key attribute.
    pub fn with_key_name(mut self, attr: impl Into<String>) -> Self {
        self.key_name = Some(attr.into());
        self
    }
}

/// What a before-send hook sees and may change: the record about to be
/// produced.
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct OutgoingRecord {
    /// The key, which picks the partition.
    pub key: Option<Vec<u8>>,
    /// The headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// A partition to send to instead of the key's.
    pub partition: Option<i32>,
    /// A timestamp in milliseconds since the epoch instead of now.
    pub timestamp: Option<i64>,
}

/// Producer defaults. `linger.ms` 0 serves a lone awaited sender (a linger
/// of 5 ms caps it near 200 msg/s). One request in flight per broker makes
/// crowds batch anyway: what arrives while a request is out leaves together
/// in the next one, as the core's batcher does, with no timer. It also keeps
/// each partition's order across retries.
pub(crate) const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "0"),
    ("max.in.flight.requests.per.connection", "1"),
    ("acks", "all"),
    ("message.timeout.ms", "60000"),
];

/// The Kafka topic driver.
///
/// [`pubsub_core::Topic::as_raw`] gives the `rdkafka::producer::FutureProducer`.
/// A before-send hook gets a `&mut` [`OutgoingRecord`]; an after-send hook
/// the `rdkafka::producer::future_producer::Delivery` (partition, offset)
/// as [`Sent::raw`] and `topic/partition/offset` as [`Sent::id`], the id
/// receivers see.
pub struct KafkaTopic {
    producer: FutureProducer,
    topic: String,
    config: TopicConfig,
    exists: AtomicBool,
    settings: KafkaConfig,
}

impl KafkaTopic {
    /// A topic sending to `topic`. Its existence is checked on the first
    /// send, which fails with `NotFound` if it does not exist: this driver
    /// never relies on the broker creating topics.
    pub fn new(settings: &KafkaConfig, topic: &str, config: TopicConfig) -> Result<Self> {
        if topic.is_empty() {
            return Err(Error::invalid_argument(
                "a Kafka topic name must not be empty",
            ));
        }
        let producer: FutureProducer = settings
            .client_config(PRODUCER_DEFAULTS)
            .create()
            .map_err(error::map)?;
        Ok(KafkaTopic {
            producer,
            topic: topic.to_owned(),
            config,
            exists: AtomicBool::new(false),
            settings: settings.clone(),
        })
    }

    fn record(&self, m: &OutgoingMessage) -> Result<OutgoingRecord> {
        let key = match &self.config.key_name {
            Some(attr) => m.attributes.get(attr).map(|v| v.as_bytes().to_vec()),
            None => m.ordering_key.as_ref().map(|k| k.as_bytes().to_vec()),
        };
        let mut r = OutgoingRecord {
            key,
            // As in the Go CDK, the key attribute travels as the key alone;
            // a subscription with the same `key_name` restores it.
            headers: m
                .attributes
                .iter()
                .filter(|(k, _)| Some(*k) != self.config.key_name.as_ref())
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect(),
            partition: None,
            timestamp: None,
        };
        m.run_before_send(&mut r)?;
        Ok(r)
    }
}

impl fmt::Debug for KafkaTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTopic")
            .field("topic", &self.topic)
            .field("settings", &self.settings)
            .finish()
    }
}

#[async_trait]
impl driver::Topic for KafkaTopic {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.topic
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        if !self.exists.load(Ordering::Acquire) {
            let client = self.producer.clone();
            let topic = self.topic.clone();
            topic_exists(move |t| client.client().fetch_metadata(None, t), topic).await?;
            self.exists.store(true, Ordering::Release);
        }
        let mut failed = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        // Enqueue the whole batch, then await the delivery reports: one
        // round of produce requests for the batch.
        for (i, m) in batch.iter().enumerate() {
            let r = match self.record(m) {
                Ok(r) => r,
                Err(e) => {
                    failed.push((i, e));
                    continue;
                }
            };
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).payload(&m.body[..]);
            if !r.headers.is_empty() {
                let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
                for (k, v) in &r.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                rec = rec.headers(headers);
            }
            if let Some(k) = &r.key {
                rec = rec.key(&k[..]);
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p);
            }
            if let Some(t) = r.timestamp {
                rec = rec.timestamp(t);
            }
            match self.producer.send_result(rec) {
                Ok(delivery) => pending.push((i, delivery)),
                Err((e, _)) => failed.push((i, error::map(e))),
            }
        }
        for (i, delivery) in pending {
            match delivery.await {
                Ok(Ok(d)) => {
                    if batch[i].has_after_send() {
                        let sent = || {
                            let id = crate::subscription::delivery_id(
                                &self.topic,
                                d.partition,
                                d.offset,
                            );
                            Sent::new(&d).with_id(id)
                        };
                        if let Err(e) = batch[i].run_after_send(sent) {
                            failed.push((i, e));
                        }
                    }
                }
                Ok(Err((e, _))) => {
                    let e = error::map(e);
                    if e.kind() == pubsub_core::ErrorKind::NotFound {
                        self.exists.store(false, Ordering::Release);
                    }
                    failed.push((i, e));
                }
                Err(_) => failed.push((
                    i,
                    Error::unavailable("the producer dropped the delivery report"),
                )),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Items(failed))
        }
    }

    async fn close(&self) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            rdkafka::producer::Producer::flush(&producer, Timeout::After(Duration::from_secs(30)))
        })
        .await
        .map_err(|e| Error::internal(format!("flush task failed: {e}")))?
        .map_err(error::map)
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.producer)
    }
}
