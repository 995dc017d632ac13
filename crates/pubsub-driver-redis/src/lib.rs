//! Redis Streams driver for [`pubsub_core`], at-least-once.
//!
//! A topic is a stream and a subscription is a consumer group of it:
//! - topic `redis://STREAM[?maxlen=N]`: `XADD`s to `STREAM`, trimming it
//!   to about `N` entries (`MAXLEN ~`) if asked;
//! - subscription `redis://STREAM?group=G[&consumer=C][&ack_deadline_ms=MS][&batch=N]`:
//!   reads `STREAM` as consumer `C` of group `G`. Without `consumer`, each
//!   subscription draws a name unique to it, `pubsub-PID-RANDOM`.
//!
//! Streams and groups are the application's to create (`XGROUP CREATE
//! STREAM G $ MKSTREAM`), as topics and subscriptions are with the other
//! drivers; [`TopicConfig::create_stream`] and
//! [`SubscriptionConfig::create_group`] create them instead. The server
//! comes from `REDIS_URL` (`redis://[user:pass@]host:6379[/db]`), or
//! [`Connector`] takes a URL, a `redis::Client` or a connection manager.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{registry, Message};
//!
//! // Once at start-up: make redis:// URLs open through this driver.
//! pubsub_driver_redis::register(registry());
//!
//! let topic = pubsub_core::open_topic("redis://orders").await?;
//! topic.send(Message::new("hello").with_attribute("kind", "greeting")).await?;
//!
//! let sub = pubsub_core::open_subscription("redis://orders?group=billing").await?;
//! let msg = sub.receive().await?;
//! msg.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```
//!
//! # Behaviour
//! - `send` returns once Redis added the entry. A missing stream fails with
//!   `NotFound` (`XADD ... NOMKSTREAM`). A batch is one pipeline. Redis
//!   keeps no message ids of its own, so a resend after a lost reply is a
//!   second entry; both carry the message's `unique_id` in `$id`, which is
//!   the received message's id.
//! - The entry layout is in [`entry`](crate::Fields): `$body`, `$id`,
//!   `$key` and one field an attribute. Entries written by other clients
//!   with plain fields are received with those fields as attributes.
//! - Each group gets every entry (fan-out); within a group, each entry goes
//!   to one consumer.
//! - Ack is `XACK`. Redis has no ack deadline of its own: the subscription
//!   claims (`XAUTOCLAIM`) entries of its group that have been pending
//!   longer than [`SubscriptionConfig::ack_deadline`], and hands them out
//!   again with their delivery count. Nack makes an entry claimable at once
//!   (`XCLAIM ... IDLE`) when its [`NackBackoff`](pubsub_core::NackBackoff)
//!   delay is over (the core holds it, its lease kept, until then: an idle
//!   time cannot say "claimable later" to every consumer's deadline), lease
//!   extension resets its idle time (`XCLAIM ... JUSTID`), both without
//!   counting a delivery. Every consumer of a group should use the same
//!   deadline.
//! - [`SubscriptionConfig::max_deliveries`] stops handing out an entry
//!   delivered that often: it is copied to a dead-letter stream if one is
//!   set, and acked.
//! - Closing a subscription deletes its consumer from the group if it holds
//!   no pending entries (so groups do not fill with the names of closed
//!   subscriptions); with pending entries it stays, and another consumer
//!   claims them after the deadline.
//! - When a connection drops (server restart, `CLIENT KILL`), the next call
//!   reconnects; the core retries sends and receives meanwhile. Entries
//!   read but not handed out come back after the deadline.
//! - Trimming (`maxlen`) deletes entries whether or not every group acked
//!   them; pending entries trimmed away are logged and gone.
//! - Passwords in the URL never appear in errors, logs or `Debug`.
//!
//! # Escape hatches
//! `Topic::as_raw::<Connector>()` and `Subscription::as_raw::<Connector>()`
//! (its `client()` and `connection()`); `Message::as_raw::<Entry>()`;
//! `Error::source_as::<redis::RedisError>()`; a before-send hook gets the
//! entry's `&mut` [`Fields`], an after-send hook the new entry's id as a
//! `String`.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod connection;
mod entry;
mod error;
mod subscription;
mod topic;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use pubsub_core::{
    query_pairs, Error, Opener, Registry, Result, Subscription, SubscriptionOptions, Topic,
    TopicOptions, Url,
};

pub use connection::Connector;
pub use entry::{Entry, Fields};
pub use redis;
pub use subscription::{
    RedisSubscription, SubscriptionConfig, DEFAULT_ACK_DEADLINE, DEFAULT_BATCH,
};
pub use topic::{RedisTopic, TopicConfig};

/// The URL scheme of this driver.
pub const SCHEME: &str = "redis";

pub(crate) const DRIVER: &str = "redis";

/// The largest message a topic takes unless configured otherwise. Redis
/// itself takes up to 512 MB a field, but a stream of such entries is
/// rarely what anyone wants.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Opens a topic adding to `stream`.
pub fn open_topic(
    connector: &Connector,
    stream: &str,
    config: TopicConfig,
    options: TopicOptions,
) -> Result<Topic> {
    let driver = RedisTopic::new(connector.clone(), stream, config)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens a subscription reading `stream` in `group`.
pub fn open_subscription(
    connector: &Connector,
    stream: &str,
    group: &str,
    config: SubscriptionConfig,
    options: SubscriptionOptions,
) -> Result<Subscription> {
    let driver = RedisSubscription::new(connector.clone(), stream, group, config)?;
    Ok(Subscription::with_options(Arc::new(driver), options))
}

/// Opens `redis://` URLs, on one connector to `REDIS_URL` shared by
/// everything it opens.
#[derive(Debug, Default)]
pub struct RedisOpener {
    connector: OnceLock<Connector>,
}

impl RedisOpener {
    /// An opener on the given connector instead of `REDIS_URL`.
    pub fn with_connector(connector: Connector) -> Self {
        let o = RedisOpener::default();
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

fn name_of(url: &Url) -> Result<String> {
    pubsub_core::resource_name(url).ok_or_else(|| {
        Error::invalid_argument("a redis:// URL needs a stream name, as in redis://orders")
    })
}

fn number(k: &str, v: &str) -> Result<u64> {
    v.parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid_argument(format!("{k} must be a positive number, not {v:?}")))
}

#[async_trait]
impl Opener for RedisOpener {
    fn url_forms(&self, _scheme: &str) -> &'static [&'static str] {
        &[
            "redis://STREAM[?maxlen=N]  (topic; server from REDIS_URL)",
            "redis://STREAM?group=GROUP[&consumer=C&ack_deadline_ms=MS&batch=N]  (subscription: a consumer group)",
        ]
    }

    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        let stream = name_of(url)?;
        let mut config = TopicConfig::default();
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "maxlen" => config.max_len = Some(number(&k, &v)? as usize),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown redis:// topic URL parameter {k:?}; known: maxlen"
                    )))
                }
            }
        }
        open_topic(self.connector()?, &stream, config, TopicOptions::default())
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        let stream = name_of(url)?;
        let mut group = None;
        let mut config = SubscriptionConfig::default();
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "group" => group = Some(v),
                "consumer" if !v.is_empty() => config.consumer = Some(v),
                "ack_deadline_ms" => {
                    config.ack_deadline = Duration::from_millis(number(&k, &v)?);
                }
                "batch" => config.batch = number(&k, &v)? as usize,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown or empty redis:// subscription URL parameter {k:?}; \
                         known: ack_deadline_ms, batch, consumer, group"
                    )))
                }
            }
        }
        let group = group.filter(|g| !g.is_empty()).ok_or_else(|| {
            Error::invalid_argument(
                "a redis:// subscription URL names its consumer group, as in \
                 redis://orders?group=billing",
            )
        })?;
        open_subscription(
            self.connector()?,
            &stream,
            &group,
            config,
            SubscriptionOptions::default(),
        )
    }
}

/// Registers `redis://` with `registry`, connecting to `REDIS_URL` on first
/// use.
pub fn register(registry: &Registry) {
    registry.register(SCHEME, RedisOpener::default());
}
