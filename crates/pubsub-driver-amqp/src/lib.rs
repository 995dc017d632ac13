//! RabbitMQ (AMQP 0-9-1) driver for [`pubsub_core`].
//!
//! A topic is an exchange and a subscription is a queue, as in the Go CDK's
//! RabbitMQ driver, so Go and Rust services share them:
//! - topic `rabbit://EXCHANGE[?key_name=ATTR]`: publishes to `EXCHANGE`;
//!   with `key_name`, each message's routing key is its `ATTR` attribute;
//! - subscription `rabbit://QUEUE[?prefetch_count=N][&key_name=ATTR]`:
//!   consumes `QUEUE`; with `key_name`, each delivery's routing key becomes
//!   its `ATTR` attribute (the Go CDK takes this option in code only, not
//!   in the URL).
//!
//! As in the Go CDK, the `key_name` attribute is sent as the routing key and
//! not also as a header.
//!
//! The server comes from `RABBIT_SERVER_URL`
//! (`amqp://user:pass@host:5672/vhost`); [`Connector`] takes it, or an
//! existing `lapin` connection, directly. Exchanges, queues and bindings are
//! the application's to declare, as with the Go CDK.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{registry, Message};
//!
//! // Once at start-up: make rabbit:// URLs open through this driver.
//! pubsub_driver_amqp::register(registry());
//!
//! let topic = pubsub_core::open_topic("rabbit://orders").await?;
//! topic.send(Message::new("hello").with_attribute("kind", "greeting")).await?;
//!
//! let sub = pubsub_core::open_subscription("rabbit://orders-billing?prefetch_count=100").await?;
//! let msg = sub.receive().await?;
//! msg.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```
//!
//! # Behaviour
//! - `send` returns once the broker confirmed the message (publisher
//!   confirms). Messages are published persistent and mandatory: a missing
//!   exchange, or a message no queue is bound to receive, fails with
//!   `NotFound` rather than vanishing. Two deviations from the Go CDK,
//!   invisible to its receivers: it publishes transient messages with no
//!   `message_id`; this driver publishes persistent ones whose
//!   `message_id` is the message's `unique_id`, the same on a resend.
//! - Each batch in flight publishes on a channel of its own (up to 16 at
//!   once). lapin pairs confirms with publishes by counting, and pairs a
//!   returned message with whichever confirm of the broker's ack range it
//!   completes first; on a channel shared by concurrent batches either
//!   could report the wrong message as sent. With a channel a batch, the
//!   driver matches each return to its message by message id. The Go CDK
//!   gets the same effect by sending one batch at a time.
//! - Attributes travel as AMQP headers with long-string values; headers of
//!   other types written by other clients are read as strings by the rule in
//!   [`headers`](crate#headers). The ordering key is not carried.
//! - Acks and nacks are batched by the core; nack requeues at once, so a
//!   nack's [`NackBackoff`](pubsub_core::NackBackoff) delay is kept by the
//!   core, which holds the delivery (unacked, counting against the
//!   prefetch) until it is due and requeues it then.
//!   RabbitMQ has no ack deadline or lease: an unacked delivery comes back
//!   when its channel closes.
//! - When the connection or a channel drops (broker restart, forced close,
//!   network cut), the next call reopens them; the core retries sends and
//!   receives with backoff meanwhile. A send whose confirm was lost is sent
//!   again (a possible duplicate), never dropped.
//! - Passwords in the server URL never appear in errors, logs or `Debug`.
//!
//! # Headers
//! Sending, every attribute becomes a header whose value is a long string.
//! Receiving, strings are read as UTF-8 (invalid bytes replaced by U+FFFD);
//! booleans as `true`/`false`; integers, floats and timestamps in decimal;
//! decimals scaled (`12.34`); byte arrays as base64; arrays and tables as
//! compact JSON; void as the empty string.
//!
//! # Escape hatches
//! `Topic::as_raw::<Connector>()` and `Subscription::as_raw::<Connector>()`;
//! `Message::as_raw::<lapin::message::Delivery>()`;
//! `Error::source_as::<lapin::Error>()`; a before-send hook gets
//! `&mut lapin::BasicProperties`, an after-send hook a `lapin::Confirmation`.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod connection;
mod error;
mod headers;
mod subscription;
mod topic;

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use pubsub_core::driver::{BatchLimits, Capabilities};
use pubsub_core::{
    query_pairs, Error, Opener, Registry, Result, Subscription, SubscriptionOptions, Topic,
    TopicOptions, Url,
};

pub use connection::Connector;
pub use lapin;
pub use subscription::{AmqpSubscription, SubscriptionConfig, DEFAULT_PREFETCH};
pub use topic::{AmqpTopic, TopicConfig};

/// The URL scheme of this driver.
pub const SCHEME: &str = "rabbit";

pub(crate) const DRIVER: &str = "amqp";

/// RabbitMQ's default largest message (`max_message_size`, 128 MiB).
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

pub(crate) fn capabilities(prefetch: u16) -> Capabilities {
    let mut c = Capabilities::default();
    c.messaging_system = Some("rabbitmq");
    c.nack = true;
    c.fan_out = true;
    c.max_message_bytes = Some(MAX_MESSAGE_BYTES);
    // A confirm takes a broker round trip (and a disk write for durable
    // queues), so throughput follows the publishes in flight. Each batch in
    // flight has a channel to itself (see `AmqpTopic::send_batch`); up to
    // 16 run at once, and beyond that sends wait and go as larger batches,
    // which keeps the channels few and the publishes in flight many.
    c.send_batching = BatchLimits::new(1000, 16);
    c.ack_batching = BatchLimits::new(1000, 2);
    c.max_receive_batch = usize::from(prefetch.max(1));
    // One consumer a subscription: its deliveries arrive in one stream.
    c.max_concurrent_receives = 1;
    c
}

/// Opens a topic on `exchange`.
pub fn open_topic(
    connector: &Connector,
    exchange: &str,
    config: TopicConfig,
    options: TopicOptions,
) -> Result<Topic> {
    let driver = AmqpTopic::new(connector.clone(), exchange, config)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens a subscription on `queue`.
pub fn open_subscription(
    connector: &Connector,
    queue: &str,
    config: SubscriptionConfig,
    options: SubscriptionOptions,
) -> Result<Subscription> {
    let driver = AmqpSubscription::new(connector.clone(), queue, config)?;
    Ok(Subscription::with_options(Arc::new(driver), options))
}

/// Opens `rabbit://` URLs, on one connection to `RABBIT_SERVER_URL` shared
/// by everything it opens.
#[derive(Debug, Default)]
pub struct RabbitOpener {
    connector: OnceLock<Connector>,
}

impl RabbitOpener {
    /// An opener on the given connector instead of `RABBIT_SERVER_URL`.
    pub fn with_connector(connector: Connector) -> Self {
        let o = RabbitOpener::default();
        let _ = o.connector.set(connector);
        o
    }

    fn connector(&self) -> Result<&Connector> {
        if let Some(c) = self.connector.get() {
            return Ok(c);
        }
        let c = Connector::from_env()?;
        Ok(self.connector.get_or_init(|| c))
    }
}

fn name_of(url: &Url, what: &str) -> Result<String> {
    pubsub_core::resource_name(url).ok_or_else(|| {
        Error::invalid_argument(format!(
            "a rabbit:// URL needs {what}, as in rabbit://orders"
        ))
    })
}

#[async_trait]
impl Opener for RabbitOpener {
    fn url_forms(&self, _scheme: &str) -> &'static [&'static str] {
        &[
            "rabbit://EXCHANGE[?key_name=ATTR]  (topic; broker from RABBIT_SERVER_URL)",
            "rabbit://QUEUE[?key_name=ATTR&prefetch_count=N]  (subscription)",
        ]
    }

    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        let exchange = name_of(url, "an exchange name")?;
        let mut config = TopicConfig::default();
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "key_name" => config.key_name = Some(v),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown rabbit:// topic URL parameter {k:?}; known: key_name"
                    )))
                }
            }
        }
        open_topic(
            self.connector()?,
            &exchange,
            config,
            TopicOptions::default(),
        )
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        let queue = name_of(url, "a queue name")?;
        let mut config = SubscriptionConfig::default();
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "prefetch_count" => {
                    let n: u16 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::invalid_argument(format!(
                            "prefetch_count must be a number from 1 to 65535, not {v:?}"
                        ))
                    })?;
                    config.prefetch_count = n;
                }
                "key_name" => config.key_name = Some(v),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown rabbit:// subscription URL parameter {k:?}; known: key_name, prefetch_count"
                    )))
                }
            }
        }
        open_subscription(
            self.connector()?,
            &queue,
            config,
            SubscriptionOptions::default(),
        )
    }
}

/// Registers `rabbit://` with `registry`, connecting to `RABBIT_SERVER_URL`
/// on first use.
pub fn register(registry: &Registry) {
    registry.register(SCHEME, RabbitOpener::default());
}
