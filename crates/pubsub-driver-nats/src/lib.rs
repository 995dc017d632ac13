//! NATS JetStream driver for [`pubsub_core`], at-least-once.
//!
//! A topic is a subject that a JetStream stream captures; a subscription is
//! a durable pull consumer of a stream:
//! - topic `nats://SUBJECT`: publishes to `SUBJECT` and returns once
//!   JetStream stored the message;
//! - subscription `nats://STREAM?consumer=DURABLE[&batch=N]`: pulls from the
//!   existing durable pull consumer `DURABLE` of `STREAM`.
//!
//! Streams and consumers are the application's to create (with the `nats`
//! CLI or `async_nats::jetstream`), as topics and subscriptions are with the
//! other drivers; [`SubscriptionConfig::create`] makes a missing consumer
//! instead. The server comes from `NATS_SERVER_URL`
//! (`nats://[user:pass@]host:4222`), or [`NatsOpener::with_client`] and the
//! `open_*` functions take an `async_nats::Client` or JetStream context.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{registry, Message};
//!
//! // Once at start-up: make nats:// URLs open through this driver.
//! pubsub_driver_nats::register(registry());
//!
//! let topic = pubsub_core::open_topic("nats://orders.created").await?;
//! topic.send(Message::new("hello").with_attribute("kind", "greeting")).await?;
//!
//! let sub = pubsub_core::open_subscription("nats://ORDERS?consumer=billing").await?;
//! let msg = sub.receive().await?;
//! msg.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```
//!
//! # Behaviour
//! - `send` returns once JetStream acknowledged the publish. A subject no
//!   stream captures fails with `NotFound` (JetStream has no responder for
//!   it), never a silent drop. Each message carries `Nats-Msg-Id`, its
//!   `unique_id` in hex, the same on every retry, so JetStream stores a
//!   resend after a lost acknowledgement once (within the stream's
//!   duplicate window, two minutes by default).
//! - Attributes are NATS headers encoded as the Go CDK's `natsv2` mode
//!   does: names and values query-escaped as by Go's `url.QueryEscape`. A
//!   Go CDK service that publishes with `natsv2` to a subject a stream
//!   captures is understood, and reads what this driver sends. Headers
//!   whose names start with `Nats-` are NATS's own: they are not
//!   attributes, and an attribute whose name starts so is refused with
//!   `InvalidArgument`. A header that does not unescape (a stray `%` from a
//!   client that does not escape) is kept as it arrived; the Go CDK fails
//!   such a message. The ordering key is not carried.
//! - Ack is JetStream's `+ACK`, nack is `-NAK` with the delay the core's
//!   [`NackBackoff`](pubsub_core::NackBackoff) gives it (so the server
//!   waits, not the client; [`SubscriptionConfig::nack_delay`] where the
//!   backoff gives none), lease extension is `+WPI`
//!   (in progress), which restarts the delivery's `ack_wait`. The ack
//!   deadline is the consumer's `ack_wait`: the core's lease keeper sends
//!   `+WPI` for messages the application holds before it passes. Acks
//!   and nacks are messages the client writes out with its other traffic:
//!   they cost no round trip, and `shutdown` flushes them. Acking twice is
//!   harmless.
//! - A message is delivered again after `ack_wait` or a nack until the
//!   consumer's `max_deliver` is reached; JetStream then stops delivering it
//!   to this consumer (it stays in the stream) and publishes a
//!   `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES` advisory.
//!   `Message::delivery_attempt` is JetStream's delivery count.
//! - Every consumer of a stream gets every message (fan-out), unless the
//!   stream's retention is work-queue or interest.
//! - When the connection drops, the client reconnects by itself; sends
//!   time out and are retried by the core (and deduplicated by
//!   JetStream), the pull starts again, and messages in flight come back
//!   after `ack_wait`.
//! - Passwords and tokens in the server URL never appear in errors, logs or
//!   `Debug`.
//!
//! # Compared with the Go CDK
//! The Go CDK's `natspubsub` is core NATS: a subscriber that is away loses
//! messages, and there is no ack. This driver's topics speak the same
//! `natsv2` encoding on the wire, so a Go CDK `natsv2` subscriber on the
//! subject sees this driver's messages (with `Nats-Msg-Id` among its
//! metadata); its subscriptions are JetStream consumers, which the Go CDK's
//! URLs do not name. `nats://SUBJECT?natsv2` is accepted for topics, as the
//! Go CDK writes it; `natsv2=false` (the Go CDK's gob encoding) is refused.
//!
//! # Escape hatches
//! `Topic::as_raw` and `Subscription::as_raw` give the
//! `async_nats::jetstream::Context` (its `client()` is the connection);
//! `Message::as_raw::<async_nats::jetstream::Message>()`;
//! `Error::source_as` reaches async-nats's error; a before-send hook gets
//! `&mut async_nats::HeaderMap`, an after-send hook a
//! `async_nats::jetstream::publish::PublishAck`.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod error;
mod headers;
mod subscription;
mod topic;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use async_nats;
use async_nats::jetstream;
use async_trait::async_trait;
use pubsub_core::driver::{BatchLimits, Capabilities};
use pubsub_core::{
    query_pairs, Error, Opener, Registry, Result, Subscription, SubscriptionOptions, Topic,
    TopicOptions, Url,
};
use tokio::sync::OnceCell;

pub use subscription::{NatsSubscription, SubscriptionConfig, DEFAULT_ACK_WAIT, DEFAULT_BATCH};
pub use topic::NatsTopic;

/// The URL scheme of this driver.
pub const SCHEME: &str = "nats";

pub(crate) const DRIVER: &str = "nats";

/// NATS's default `max_payload`, assumed until the server says otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Room kept under the server's `max_payload` for the header block and
/// `Nats-Msg-Id`, which [`pubsub_core::driver::OutgoingMessage::size`] does
/// not count.
const HEADER_ROOM: usize = 128;

pub(crate) fn topic_capabilities(client: &async_nats::Client) -> Capabilities {
    let mut c = Capabilities::default();
    c.fan_out = true;
    let max = match client.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    };
    c.max_message_bytes = Some(max.saturating_sub(HEADER_ROOM));
    // A batch's publishes are pipelined on the one connection and their
    // acks awaited together, so a few batches in flight keep the link busy.
    c.send_batching = BatchLimits::new(256, 8);
    c
}

pub(crate) fn subscription_capabilities(ack_wait: Duration, batch: usize) -> Capabilities {
    let mut c = Capabilities::default();
    c.nack = true;
    c.lease_extension = true;
    c.redelivery_after_deadline = true;
    c.ack_deadline = Some(ack_wait);
    c.fan_out = true;
    c.max_message_bytes = Some(DEFAULT_MAX_PAYLOAD - HEADER_ROOM);
    // Acks are messages queued on the client (see `reply_all`), written out
    // with the rest of its traffic: bookkeeping from the core's view.
    c.local_settlement = true;
    c.ack_batching = BatchLimits::new(1000, 2);
    c.max_receive_batch = batch.max(1);
    // One pull stream a subscription: its messages arrive in one queue.
    c.max_concurrent_receives = 1;
    // A nak carries its delay, which the server keeps without a limit of its
    // own; half a day is what SQS allows.
    c.max_nack_delay = Some(Duration::from_secs(12 * 3600));
    c
}

/// Connects to a NATS server. The URL may hold credentials
/// (`nats://user:pass@host:4222`), which errors never show.
pub async fn connect(server: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("pubsub-rs")
        .connect(server)
        .await
        .map_err(|e| {
            Error::unavailable(format!(
                "cannot connect to NATS at {}: {}",
                redact(server),
                e.kind()
            ))
            .with_context("driver", DRIVER)
        })
}

/// The server URL without its user information.
fn redact(server: &str) -> String {
    match Url::parse(server) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) if server.contains('@') => "(a server URL)".to_owned(),
        Err(_) => server.to_owned(),
    }
}

/// Opens a topic publishing to `subject`.
pub fn open_topic(js: &jetstream::Context, subject: &str, options: TopicOptions) -> Result<Topic> {
    let driver = NatsTopic::new(js.clone(), subject)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens a subscription on the durable pull consumer `consumer` of
/// `stream`.
pub async fn open_subscription(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    config: SubscriptionConfig,
    options: SubscriptionOptions,
) -> Result<Subscription> {
    let driver = NatsSubscription::new(js.clone(), stream, consumer, config).await?;
    Ok(Subscription::with_options(Arc::new(driver), options))
}

/// Opens `nats://` URLs, on one connection to `NATS_SERVER_URL` shared by
/// everything it opens.
#[derive(Default)]
pub struct NatsOpener {
    js: OnceCell<jetstream::Context>,
}

impl fmt::Debug for NatsOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOpener")
            .field("connected", &self.js.initialized())
            .finish()
    }
}

impl NatsOpener {
    /// An opener on the given client instead of `NATS_SERVER_URL`.
    pub fn with_client(client: async_nats::Client) -> Self {
        NatsOpener {
            js: OnceCell::new_with(Some(jetstream::new(client))),
        }
    }

    async fn js(&self) -> Result<&jetstream::Context> {
        self.js
            .get_or_try_init(|| async {
                let server = std::env::var("NATS_SERVER_URL").map_err(|_| {
                    Error::invalid_argument(
                        "NATS_SERVER_URL is not set; set it to the server, e.g. nats://127.0.0.1:4222",
                    )
                })?;
                Ok(jetstream::new(connect(&server).await?))
            })
            .await
    }
}

fn name_of(url: &Url, what: &str, example: &str) -> Result<String> {
    pubsub_core::resource_name(url).ok_or_else(|| {
        Error::invalid_argument(format!("a nats:// URL needs {what}, as in {example}"))
    })
}

#[async_trait]
impl Opener for NatsOpener {
    fn url_forms(&self, _scheme: &str) -> &'static [&'static str] {
        &[
            "nats://SUBJECT[?natsv2=BOOL]  (topic: JetStream publishes; server from NATS_SERVER_URL)",
            "nats://STREAM?consumer=DURABLE[&batch=N]  (subscription: a pull consumer)",
        ]
    }

    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        let subject = name_of(url, "a subject", "nats://orders.created")?;
        for (k, v) in query_pairs(url) {
            match (k.as_str(), v.as_str()) {
                ("natsv2", "" | "true") => {}
                ("natsv2", _) => {
                    return Err(Error::invalid_argument(
                        "this driver speaks only the Go CDK's natsv2 encoding (NATS headers); \
                         natsv2 may only be true",
                    ))
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown nats:// topic URL parameter {k:?}; known: natsv2"
                    )))
                }
            }
        }
        open_topic(self.js().await?, &subject, TopicOptions::default())
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        let stream = name_of(url, "a stream name", "nats://ORDERS?consumer=billing")?;
        let mut consumer = None;
        let mut config = SubscriptionConfig::default();
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "consumer" => consumer = Some(v),
                "batch" => {
                    let n: usize = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::invalid_argument(format!(
                            "batch must be a positive number, not {v:?}"
                        ))
                    })?;
                    config.batch = n;
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown nats:// subscription URL parameter {k:?}; known: batch, consumer"
                    )))
                }
            }
        }
        let consumer = consumer.filter(|c| !c.is_empty()).ok_or_else(|| {
            Error::invalid_argument(
                "a nats:// subscription URL names its durable consumer, as in \
                 nats://ORDERS?consumer=billing",
            )
        })?;
        open_subscription(
            self.js().await?,
            &stream,
            &consumer,
            config,
            SubscriptionOptions::default(),
        )
        .await
    }
}

/// Registers `nats://` with `registry`, connecting to `NATS_SERVER_URL` on
/// first use.
pub fn register(registry: &Registry) {
    registry.register(SCHEME, NatsOpener::default());
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_show() {
        let r = redact("nats://user:s3cret@127.0.0.1:4222");
        assert!(!r.contains("s3cret") && !r.contains("user"), "{r}");
        assert!(!redact("nats://tok3n@127.0.0.1:4222").contains("tok3n"));
    }
}
