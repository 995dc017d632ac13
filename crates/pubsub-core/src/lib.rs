//! One publish/subscribe API over many brokers.
//!
//! An application sends, receives and acknowledges one message at a time;
//! underneath, this crate batches sends, receives and acks, retries
//! temporary failures, keeps leases of held messages alive, and lets the
//! same code move between backends by changing a URL.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{open_subscription, open_topic, Message};
//!
//! // Subscribe first: a subscription gets messages sent after it exists.
//! let sub = open_subscription("mem://orders?ackdeadline=30s").await?;
//! let topic = open_topic("mem://orders").await?;
//!
//! topic.send(Message::new("hello").with_attribute("lang", "en")).await?;
//!
//! let msg = sub.receive().await?;
//! assert_eq!(msg.body().as_ref(), b"hello");
//! assert_eq!(msg.attribute("lang"), Some("en"));
//! msg.ack();
//!
//! topic.shutdown().await?;
//! sub.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Pieces
//! - [`Topic`], [`Subscription`] and [`Message`]: the API applications use.
//! - [`driver`]: the small contract a backend implements.
//! - [`open_topic`] / [`open_subscription`] and [`Registry`]: opening by URL.
//! - [`mem`]: the in-memory driver, a faithful model of a broker for tests
//!   and single-process use.
//! - [`metric`]: the metrics every topic and subscription records.
//! - `trace` (the `opentelemetry` feature): trace context carried in
//!   message attributes from producer to consumer.
//!
//! # Semantics every driver keeps
//! - `send` returns once the backend accepted the batch holding the message;
//!   dropping its future before the batch leaves withdraws the message.
//! - `receive` is cancel-safe; messages are delivered at least once until
//!   acked; `nack` asks for prompt redelivery.
//! - A received message dropped without ack or nack is nacked where the
//!   backend can (counted in [`SubscriptionStats`]), else left to its ack
//!   deadline.
//! - After `shutdown`, every call on any clone fails with
//!   [`ErrorKind::FailedPrecondition`].
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

// The user API, over the engine, over the driver contract; `mem` is a
// driver like any other, and the registry knows no driver.
pub mod driver;
mod engine;
mod error;
pub mod mem;
mod message;
pub mod metric;
mod options;
mod registry;
mod retry;
mod subscription;
mod token_map;
mod topic;
#[cfg(feature = "opentelemetry")]
pub mod trace;

pub use bytes::Bytes;
pub use driver::{Attributes, BatchLimits, Capabilities, Sent};
pub use error::{Error, ErrorKind, Result};
pub use mem::parse_duration;
pub use message::Message;
pub use options::{
    BatchOptions, NackBackoff, SubscriptionOptions, TopicOptions, DEFAULT_SEND_GIVE_UP,
};
pub use registry::{
    open_subscription, open_topic, parse_bool, query_pairs, redact_url, registry, resource_name,
    Opener, Registry,
};
pub use retry::RetryPolicy;
pub use subscription::{Subscription, SubscriptionStats};
pub use topic::Topic;

/// Re-exported so openers can name the parsed URL type.
pub use url::Url;

impl Registry {
    /// A registry with the in-memory driver's `mem://` registered, as the
    /// process-wide [`registry()`] starts.
    pub fn with_defaults() -> Self {
        let r = Registry::new();
        mem::register(&r);
        r
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Topic>();
    send_sync::<Subscription>();
    send_sync::<Error>();
    send_sync::<Registry>();
    const fn send<T: Send>() {}
    send::<Message>();
};
