//! Kafka driver for [`pubsub_core`], on rdkafka (librdkafka).
//!
//! URLs, as the Go CDK's Kafka driver takes them:
//! - topic `kafka://TOPIC[?key_name=ATTR]`: with `key_name`, each message's
//!   key is its `ATTR` attribute, which is not also sent as a header (as in
//!   the Go CDK); otherwise its ordering key;
//! - subscription `kafka://GROUP?topic=T[&topic=T2][&offset=oldest|newest][&key_name=ATTR][&wait_for_join=DURATION]`:
//!   a consumer in consumer group `GROUP`; `offset` says where a group with
//!   no committed offsets starts (default `newest`); with `key_name`, each
//!   record's key (when not empty) becomes its `ATTR` attribute, so a Go
//!   service's keyed messages keep that attribute (the Go CDK takes this
//!   option in code only, not in the URL). At `newest`, opening joins the
//!   group first, waiting up to `wait_for_join` (default 30 s; `0s` does
//!   not wait), so nothing sent after the open is skipped: the Go CDK's
//!   `WaitForJoin`, which there is code-only and off by default.
//!
//! The brokers come from `KAFKA_BROKERS`; [`KafkaConfig`] takes them, any
//! librdkafka setting (`session.timeout.ms`, SASL...) or an rdkafka
//! `ClientConfig` directly.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{registry, Message};
//!
//! pubsub_driver_kafka::register(registry());
//! let topic = pubsub_core::open_topic("kafka://orders").await?;
//! topic.send(Message::new("order 1").with_ordering_key("customer-7")).await?;
//!
//! let sub = pubsub_core::open_subscription("kafka://billing?topic=orders&offset=oldest").await?;
//! let msg = sub.receive().await?;
//! msg.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```
//!
//! # Behaviour
//! - `send` returns once the producer's delivery report came back
//!   (`acks=all`). Attributes travel as headers; the key comes from
//!   `key_name` or the ordering key, so messages with one ordering key go to
//!   one partition, in order.
//! - A topic that does not exist fails sends and receives with `NotFound`;
//!   the driver checks metadata rather than relying on brokers that create
//!   topics on first use.
//! - Acks commit offsets, but only the contiguous acked prefix of each
//!   partition: a later message acked before an earlier one never moves the
//!   committed offset past the earlier one. Each ack batch stores that
//!   prefix; librdkafka commits what is stored once a second, and the
//!   driver on revocation (without waiting: the rebalance runs on the
//!   thread polling the consumer) and synchronously on close. A commit that
//!   fails for good (authorization, say) fails the subscription: later
//!   receives and `shutdown` return its error, as a failed ack would;
//!   temporary failures are logged at warn level once a run and carried by
//!   the next commit.
//! - One message held unacked keeps its partition's committed offset
//!   behind it, and the deliveries acked after it wait to be committed:
//!   past [`SubscriptionConfig::max_pending`] (50,000) of them the
//!   partition is paused, and it resumes once half have been committed,
//!   so the window is bounded and the other partitions keep flowing.
//! - The consumer asks librdkafka to look again 20 ms (not its default
//!   second) after its local queue filled up (`fetch.queue.backoff.ms`), so
//!   a consumer that keeps up never idles waiting for the next fetch. Any
//!   setting given in [`KafkaConfig`] overrides the driver's.
//! - Nack works, unlike in the Go CDK (which panics): a nacked message is
//!   handed out again by this consumer from a local queue once its
//!   [`NackBackoff`](pubsub_core::NackBackoff) delay is over (the core
//!   holds it until then), and its offset is not committed until it is
//!   acked.
//! - `Message::delivery_attempt` is `None` on a first read: Kafka keeps no
//!   delivery count, and another consumer (or this group before a restart)
//!   may have read the offset already. A nacked message handed out again
//!   reports 2, 3, ..., counting this subscription's own deliveries.
//! - On a rebalance, revoked partitions' acked prefixes are committed, and
//!   their messages not yet handed out are dropped unacked, for their new
//!   owner reads them: nacked ones waiting to be handed out again, and
//!   those the subscription prefetched (counted in
//!   `SubscriptionStats::revoked`). With librdkafka's default (eager)
//!   assignors every rebalance revokes every partition, so the whole
//!   prefetched queue goes, and a partition assigned again is read again
//!   from its committed offset. Acks of deliveries from before the
//!   revocation are ignored. The revocation itself is served when the
//!   consumer is next polled, which the subscription does whenever its
//!   queue has room for another batch.
//! - Header values are read as UTF-8, invalid bytes replaced by U+FFFD; a
//!   message's key becomes its ordering key.
//! - Secrets in the settings never appear in errors, logs or `Debug`.
//!
//! # Escape hatches
//! `Topic::as_raw::<rdkafka::producer::FutureProducer>()`,
//! `Subscription::as_raw::<KafkaConsumer>()` (an rdkafka `StreamConsumer`),
//! `Message::as_raw::<rdkafka::message::OwnedMessage>()`,
//! `Error::source_as::<rdkafka::error::KafkaError>()`; a before-send hook
//! gets a `&mut` [`OutgoingRecord`], an after-send hook the delivery
//! (`rdkafka::producer::future_producer::Delivery`).
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod config;
mod error;
mod subscription;
mod topic;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pubsub_core::driver::{BatchLimits, Capabilities};
use pubsub_core::{
    parse_duration, query_pairs, Error, Opener, Registry, Result, Subscription,
    SubscriptionOptions, Topic, TopicOptions, Url,
};
use rdkafka::error::KafkaResult;
use rdkafka::metadata::Metadata;
use rdkafka::util::Timeout;

pub use config::KafkaConfig;
pub use rdkafka;
pub use subscription::{
    KafkaConsumer, KafkaContext, KafkaSubscription, StartOffset, SubscriptionConfig,
    DEFAULT_MAX_PENDING, DEFAULT_WAIT_FOR_JOIN,
};
pub use topic::{KafkaTopic, OutgoingRecord, TopicConfig};

/// The URL scheme of this driver.
pub const SCHEME: &str = "kafka";

pub(crate) const DRIVER: &str = "kafka";

/// Kafka's default largest record (`message.max.bytes`).
pub const MAX_MESSAGE_BYTES: usize = 1_000_000;

pub(crate) fn capabilities() -> Capabilities {
    let mut c = Capabilities::default();
    c.messaging_system = Some("kafka");
    c.nack = true;
    c.fan_out = true;
    c.ordering_keys = true;
    c.max_message_bytes = Some(MAX_MESSAGE_BYTES);
    // A delivery report takes a broker round trip: keep many batches in
    // flight so a crowd of senders is not serialised behind one.
    c.send_batching = BatchLimits::new(1000, 128);
    // An ack only moves the acked prefix that the consumer commits on its
    // own schedule, and a nack only queues a local redelivery: both are
    // settled on the settling thread, without the core's batching.
    c.local_settlement = true;
    // Polling takes what librdkafka has already fetched, without waiting,
    // so a large batch costs no latency; it spreads the hand-over between
    // the fetch task and receivers over more messages (a backlog read about
    // 20% faster than with batches of 1,000).
    c.max_receive_batch = 4000;
    c.max_concurrent_receives = 1;
    c
}

/// Checks with a metadata request, off the async threads, that `topic`
/// exists. Listing all topics never asks the broker to create one.
pub(crate) async fn topic_exists<F>(fetch: F, topic: String) -> Result<()>
where
    F: FnOnce(Timeout) -> KafkaResult<Metadata> + Send + 'static,
{
    let found = tokio::task::spawn_blocking(move || {
        let md = fetch(Timeout::After(Duration::from_secs(10))).map_err(error::map)?;
        Ok::<_, Error>(
            md.topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
        )
    })
    .await
    .map_err(|e| Error::internal(format!("metadata task failed: {e}")))??;
    if found {
        Ok(())
    } else {
        Err(Error::not_found("the Kafka topic does not exist").with_context("driver", DRIVER))
    }
}

/// Opens a topic.
pub fn open_topic(
    settings: &KafkaConfig,
    topic: &str,
    config: TopicConfig,
    options: TopicOptions,
) -> Result<Topic> {
    let driver = KafkaTopic::new(settings, topic, config)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens a subscription: a consumer in `group` for `topics`. At
/// [`StartOffset::Newest`] it first joins the group, waiting up to
/// [`SubscriptionConfig::wait_for_join`] (see [`KafkaSubscription::join`]),
/// so that what is sent once this returns is received; `NotFound` if a
/// topic does not exist.
pub async fn open_subscription(
    settings: &KafkaConfig,
    group: &str,
    topics: &[&str],
    config: SubscriptionConfig,
    options: SubscriptionOptions,
) -> Result<Subscription> {
    let wait = config.wait_for_join;
    let join = config.offset == StartOffset::Newest && !wait.is_zero();
    let driver = KafkaSubscription::new(settings, group, topics, config)?;
    if join && !driver.join(wait).await? {
        tracing::warn!(
            group,
            "the consumer group did not join within {wait:?}; messages sent before it does may be skipped"
        );
    }
    Ok(Subscription::with_options(Arc::new(driver), options))
}

/// Opens `kafka://` URLs with the brokers of `KAFKA_BROKERS`, or of the
/// settings it was made with.
#[derive(Debug, Default)]
pub struct KafkaOpener {
    settings: Option<KafkaConfig>,
}

impl KafkaOpener {
    /// An opener using these settings instead of `KAFKA_BROKERS`.
    pub fn with_settings(settings: KafkaConfig) -> Self {
        KafkaOpener {
            settings: Some(settings),
        }
    }

    fn settings(&self) -> Result<KafkaConfig> {
        match &self.settings {
            Some(s) => Ok(s.clone()),
            None => KafkaConfig::from_env(),
        }
    }
}

fn name_of(url: &Url, what: &str) -> Result<String> {
    pubsub_core::resource_name(url).ok_or_else(|| {
        Error::invalid_argument(format!("a kafka:// URL needs {what}, as in kafka://orders"))
    })
}

#[async_trait]
impl Opener for KafkaOpener {
    fn url_forms(&self, _scheme: &str) -> &'static [&'static str] {
        &[
            "kafka://TOPIC[?key_name=ATTR]  (topic; brokers from KAFKA_BROKERS)",
            "kafka://GROUP?topic=TOPIC[&offset=oldest|newest&key_name=ATTR&wait_for_join=DURATION]  (subscription: a consumer group)",
        ]
    }

    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        let topic = name_of(url, "a topic name")?;
        let mut config = TopicConfig::default();
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "key_name" => config.key_name = Some(v),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown kafka:// topic URL parameter {k:?}; known: key_name"
                    )))
                }
            }
        }
        open_topic(&self.settings()?, &topic, config, TopicOptions::default())
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        let group = name_of(url, "a consumer group")?;
        let mut topics = Vec::new();
        let mut config = SubscriptionConfig::default();
        for (k, v) in query_pairs(url) {
            match (k.as_str(), v.as_str()) {
                ("topic", _) => topics.push(v),
                ("offset", "oldest") => config.offset = StartOffset::Oldest,
                ("offset", "newest") => config.offset = StartOffset::Newest,
                ("key_name", _) if !v.is_empty() => config.key_name = Some(v),
                ("wait_for_join", _) => config.wait_for_join = parse_duration(&v)?,
                ("offset", _) => {
                    return Err(Error::invalid_argument(format!(
                        "offset must be oldest or newest, not {v:?}"
                    )))
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown kafka:// subscription URL parameter {k:?}; known: key_name, offset, topic, wait_for_join"
                    )))
                }
            }
        }
        if topics.is_empty() {
            return Err(Error::invalid_argument(
                "a kafka:// subscription URL needs at least one topic=NAME",
            ));
        }
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        open_subscription(
            &self.settings()?,
            &group,
            &topics,
            config,
            SubscriptionOptions::default(),
        )
        .await
    }
}

/// Registers `kafka://` with `registry`, using `KAFKA_BROKERS`.
pub fn register(registry: &Registry) {
    registry.register(SCHEME, KafkaOpener::default());
}
