//! The contract a backend implements.
//!
//! A driver only moves batches: it is handed a batch of messages, acks or
//! nacks and reports per-item success or failure, or asked for up to `max`
//! messages. It never retries, never buffers and never spawns batching of its
//! own: [`crate::Topic`] and [`crate::Subscription`] do all of that, once, for
//! every backend.
//!
//! # The contract on one screen
//! | trait | required | optional, with defaults |
//! |---|---|---|
//! | [`Topic`] | `driver_name`, `resource`, `capabilities`, `send_batch` | `close`, `raw` |
//! | [`Subscription`] | `driver_name`, `resource`, `capabilities`, `receive_batch`, `send_acks` | `send_nacks`, `extend_leases`, `close`, `raw`, `deliveries` |
//!
//! Everything else a backend can or cannot do is data in [`Capabilities`]:
//! nack, lease extension, redelivery after a deadline and its length,
//! ordering keys, fan-out, size and batch limits, and whether acks are
//! local bookkeeping ([`Capabilities::local_settlement`]). A driver whose
//! deliveries need more than an id (built lazily, or taken back before they
//! are settled) answers the core's questions about them through
//! [`Deliveries`].
//!
//! Each driver maps its native errors onto [`crate::Error`] in one function
//! (by convention `error.rs` in the driver crate), attaching the native error
//! as the source so users can downcast to it.
//!
//! # A whole driver
//! A queue in process memory, one subscription a topic, with ack and nack:
//! ```
//! use std::collections::VecDeque;
//! use std::sync::{Arc, Mutex};
//!
//! use pubsub_core::driver::{
//!     self, async_trait, AckId, BatchError, Capabilities, Nacked, OutgoingMessage,
//!     ReceivedMessage, Settlement,
//! };
//! use pubsub_core::{Message, Result};
//!
//! #[derive(Debug, Default)]
//! struct Queue {
//!     ready: Mutex<VecDeque<(u64, pubsub_core::Bytes)>>,
//!     next: Mutex<u64>,
//! }
//!
//! #[derive(Debug, Clone)]
//! struct QueueDriver(Arc<Queue>);
//!
//! fn capabilities() -> Capabilities {
//!     let mut c = Capabilities::default();
//!     c.nack = true;
//!     c.fan_out = false;
//!     c
//! }
//!
//! #[async_trait]
//! impl driver::Topic for QueueDriver {
//!     fn driver_name(&self) -> &'static str { "queue" }
//!     fn resource(&self) -> &str { "q" }
//!     fn capabilities(&self) -> Capabilities { capabilities() }
//!     async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
//!         let mut next = self.0.next.lock().unwrap();
//!         let mut ready = self.0.ready.lock().unwrap();
//!         for m in batch {
//!             *next += 1;
//!             ready.push_back((*next, m.body.clone()));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! #[async_trait]
//! impl driver::Subscription for QueueDriver {
//!     fn driver_name(&self) -> &'static str { "queue" }
//!     fn resource(&self) -> &str { "q" }
//!     fn capabilities(&self) -> Capabilities { capabilities() }
//!     async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
//!         let taken: Vec<_> = {
//!             let mut ready = self.0.ready.lock().unwrap();
//!             let n = max.min(ready.len());
//!             ready.drain(..n).collect()
//!         };
//!         if taken.is_empty() {
//!             // A real backend long-polls here.
//!             tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//!         }
//!         Ok(taken
//!             .into_iter()
//!             .map(|(seq, body)| {
//!                 let id = AckId::from_u64(seq);
//!                 ReceivedMessage::new(body, Default::default(), seq.to_string(), id)
//!             })
//!             .collect())
//!     }
//!     fn send_acks<'a>(&'a self, _ids: &'a [AckId]) -> Settlement<'a> {
//!         // Taken off the queue when received; nothing to do. A backend
//!         // that acks over the network returns `Settlement::later(async
//!         // move { ... })` with its call instead.
//!         Settlement::done(Ok(()))
//!     }
//!     fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
//!         let mut ready = self.0.ready.lock().unwrap();
//!         for n in nacks {
//!             let seq = n.ack_id.as_u64().unwrap_or_default();
//!             ready.push_front((seq, n.body.clone()));
//!         }
//!         Settlement::done(Ok(()))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pubsub_core::Result<()> {
//! let queue = QueueDriver(Arc::default());
//! let topic = pubsub_core::Topic::new(queue.clone());
//! let sub = pubsub_core::Subscription::new(queue);
//! topic.send(Message::new("hello")).await?;
//! let first = sub.receive().await?;
//! first.nack();
//! let again = sub.receive().await?;
//! assert_eq!(again.body().as_ref(), b"hello");
//! again.ack();
//! topic.shutdown().await?;
//! sub.shutdown().await
//! # }
//! ```

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

mod message;
mod settlement;

/// Re-exported so a driver crate implements the traits without depending
/// on `async-trait` itself.
pub use async_trait::async_trait;
pub(crate) use message::message_size;
pub use message::{
    AckId, AfterSend, Attributes, BeforeSend, Nacked, OutgoingMessage, ReceivedMessage, Sent,
};
pub use settlement::Settlement;

/// How a batch call failed.
#[derive(Debug, Clone)]
pub enum BatchError {
    /// Nothing in the batch was done.
    All(Error),
    /// Only these items (by index into the batch) failed; the rest succeeded.
    Items(Vec<(usize, Error)>),
}

impl From<Error> for BatchError {
    fn from(e: Error) -> Self {
        BatchError::All(e)
    }
}

/// Limits a driver puts on one kind of batch, and the defaults it prefers.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most items in one call.
    pub max_batch_size: usize,
    /// Fewest items in one call; items wait for company unless flushed.
    pub min_batch_size: usize,
    /// Most bytes in one call, if limited.
    pub max_batch_bytes: Option<usize>,
    /// Most calls in flight at once.
    pub max_handlers: usize,
    /// How long a batch short of the maximum waits for more items before
    /// the call, once; `None` calls at once. For calls with a fixed cost
    /// whose delay nobody sees (Kafka acks only record offsets until the
    /// next periodic commit). Shutdown cuts the wait short.
    pub linger: Option<Duration>,
    /// Whether a handler that has finished a call waits, briefly, for the
    /// items it answered to come back before it takes the next batch. For
    /// calls with a fixed cost a request (Pub/Sub's Publish): senders that
    /// each await their send return together once answered, and a batch
    /// taken as the first of them arrive leaves the rest for another
    /// request. The wait is timed against the call it follows (it ends once
    /// no item has arrived for a sixteenth of the call's time, and lasts
    /// at most a quarter of it), so it never holds a batch long next to
    /// what the call costs; as many items waiting as the call answered, a
    /// full batch and shutdown end it at once. With refill, a call beyond
    /// the first starts only for a full batch ([`max_batch_size`] items
    /// waiting), and a send goes out in its sender's own task only when no
    /// call is in flight: a few items wait for the call in flight instead
    /// of paying for a request of their own.
    ///
    /// [`max_batch_size`]: Self::max_batch_size
    pub refill: bool,
}

impl BatchLimits {
    /// Limits with the given maximum size and handler count.
    pub const fn new(max_batch_size: usize, max_handlers: usize) -> Self {
        BatchLimits {
            max_batch_size,
            min_batch_size: 1,
            max_batch_bytes: None,
            max_handlers,
            linger: None,
            refill: false,
        }
    }

    /// Sets the byte limit.
    pub const fn with_max_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = Some(bytes);
        self
    }

    /// Sets how long a batch short of the maximum waits for more items.
    pub const fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// Sets whether a handler waits for the items it answered to come back
    /// (see [`refill`](Self::refill)).
    pub const fn with_refill(mut self, refill: bool) -> Self {
        self.refill = refill;
        self
    }
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits::new(1000, 2)
    }
}

/// What a backend can do. The core refuses unsupported operations with an
/// `Unimplemented` error before any I/O, and the conformance suite selects
/// its cases from the same data.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Messages can be handed back for prompt redelivery.
    pub nack: bool,
    /// A delivery's ack deadline can be pushed back.
    pub lease_extension: bool,
    /// Unacknowledged messages come back after an ack deadline by themselves.
    pub redelivery_after_deadline: bool,
    /// The deadline a fresh delivery gets, which the core's lease keeper
    /// extends before it passes.
    pub ack_deadline: Option<Duration>,
    /// Messages with one ordering key are delivered in send order.
    pub ordering_keys: bool,
    /// Every subscription of a topic gets every message.
    pub fan_out: bool,
    /// Largest message the backend takes, as measured by
    /// [`OutgoingMessage::size`].
    pub max_message_bytes: Option<usize>,
    /// Most attributes one message may carry, if limited (SQS and SNS take
    /// 10); the core refuses a message with more before any I/O.
    pub max_attributes: Option<usize>,
    /// A message may have an empty body. Where it may not (SQS and SNS
    /// require at least one character), the core refuses such a send with
    /// `InvalidArgument` before any I/O.
    pub empty_body: bool,
    /// An attribute may have an empty value. Where it may not (SQS and SNS
    /// refuse one), the core refuses such a send with `InvalidArgument`
    /// before any I/O.
    pub empty_attribute_values: bool,
    /// Limits for `send_batch`.
    pub send_batching: BatchLimits,
    /// Limits for `send_acks`, `send_nacks` and `extend_leases`.
    pub ack_batching: BatchLimits,
    /// Acks and nacks are bookkeeping in this process that the backend
    /// learns of later by itself (the in-memory broker; Kafka's stored
    /// offsets, which the consumer commits on its own schedule; a client
    /// library that batches acks of its own). The core then calls
    /// `send_acks` and `send_nacks` with one item on the settling thread, as
    /// `ack` or `nack` is called, instead of queuing them for a batch: a
    /// queue and a batch task would cost more than the ack. They should then
    /// return [`Settlement::done`]; a [`Settlement::later`] is polled once,
    /// and if still pending, dropped and its item batched instead.
    pub local_settlement: bool,
    /// Most messages one `receive_batch` call may return; larger requests
    /// are split across concurrent calls.
    pub max_receive_batch: usize,
    /// Most `receive_batch` calls in flight at once.
    pub max_concurrent_receives: usize,
    /// The longest delay the backend itself can put on a nack's redelivery
    /// ([`Nacked::delay`]): the in-memory broker's, SQS's visibility timeout,
    /// JetStream's delayed nak. `None` (the default): the backend redelivers
    /// a nack at once, so the core holds a delayed nack, keeping its lease,
    /// and sends it when it is due. Delays beyond the maximum are cut to it.
    pub max_nack_delay: Option<Duration>,
    /// OpenTelemetry's `messaging.system` for this backend, on spans and
    /// metrics, where the conventions name one (`rabbitmq`, `kafka`,
    /// `gcp_pubsub`, `aws_sqs`, `aws.sns`). `None` (the default): the
    /// driver's name.
    pub messaging_system: Option<&'static str>,
}

impl Capabilities {
    /// The `messaging.system` of a driver named `driver`: the declared one,
    /// else the name.
    pub fn messaging_system_or(&self, driver: &'static str) -> &'static str {
        self.messaging_system.unwrap_or(driver)
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            nack: false,
            lease_extension: false,
            redelivery_after_deadline: false,
            ack_deadline: None,
            ordering_keys: false,
            fan_out: true,
            max_message_bytes: None,
            max_attributes: None,
            empty_body: true,
            empty_attribute_values: true,
            send_batching: BatchLimits::default(),
            ack_batching: BatchLimits::default(),
            local_settlement: false,
            max_receive_batch: 1000,
            max_concurrent_receives: 4,
            max_nack_delay: None,
            messaging_system: None,
        }
    }
}

/// The driver side of a topic.
#[async_trait]
pub trait Topic: Send + Sync + fmt::Debug + 'static {
    /// The driver's short name (`"mem"`, `"amqp"`...), for spans and errors.
    fn driver_name(&self) -> &'static str;

    /// The resource name, for spans and errors. Never holds a secret.
    fn resource(&self) -> &str;

    /// What this backend can do. Asked once, when the topic is made.
    fn capabilities(&self) -> Capabilities;

    /// Sends every message of the batch and returns once the backend has
    /// accepted them (or reports which failed). Must not retry.
    ///
    /// The future may be dropped mid-call (a lone send runs in its caller's
    /// task, and callers time out): dropping must leave the driver usable,
    /// and the messages then may or may not have been sent.
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError>;

    /// Releases the driver's resources. Called once, after the last batch.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// The backend's own client, for [`crate::Topic::as_raw`].
    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        None
    }
}

/// The driver side of a subscription.
#[async_trait]
pub trait Subscription: Send + Sync + fmt::Debug + 'static {
    /// The driver's short name, for spans and errors.
    fn driver_name(&self) -> &'static str;

    /// The resource name, for spans and errors. Never holds a secret.
    fn resource(&self) -> &str;

    /// What this backend can do. Asked once, when the subscription is made.
    fn capabilities(&self) -> Capabilities;

    /// Returns up to `max` messages. May wait a while (a long poll) for the
    /// first one and may return none; the core calls again. May be called
    /// concurrently, and may be dropped when the subscription shuts down:
    /// messages it had not returned yet must then come back by themselves.
    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>>;

    /// Acknowledges deliveries: [`Settlement::later`] with the call to the
    /// backend, or [`Settlement::done`] where the ack is bookkeeping in this
    /// process. Acking twice, or acking an expired delivery, must be
    /// harmless.
    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a>;

    /// Hands deliveries back for prompt redelivery, where
    /// [`Capabilities::nack`] says so; each comes as it was delivered. Nacking
    /// twice must be harmless, as must nacking a delivery acked meanwhile.
    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        let _ = nacks;
        Settlement::done(Err(Error::unimplemented("this backend cannot nack").into()))
    }

    /// Pushes the ack deadline of deliveries to `by` from now, where
    /// [`Capabilities::lease_extension`] says so.
    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        let _ = (ids, by);
        Err(Error::unimplemented("this backend cannot extend leases").into())
    }

    /// Releases the driver's resources. Called once, after the last acks.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// The backend's own client, for [`crate::Subscription::as_raw`].
    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        None
    }

    /// What the core may ask about deliveries this driver returned, for a
    /// driver that describes them lazily or takes them back; see
    /// [`Deliveries`]. Asked once, when the subscription is made.
    fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
        None
    }
}

/// A driver's answers about the deliveries it returned: how to describe one
/// made with [`ReceivedMessage::describe_lazily`], and whether one may still
/// be handed to the application.
///
/// Describing lazily is for drivers that receive at high rates and whose id
/// or raw record costs an allocation a message (the in-memory broker's
/// sequence numbers, Kafka's `topic/partition/offset`): the message carries
/// two numbers and the id is built only if someone asks.
///
/// Taking back is the one mechanism for deliveries that stop being the
/// subscriber's before they are settled: the partitions a Kafka consumer
/// loses in a rebalance belong to another consumer from then on, which reads
/// their unacked messages again, and acks of the old deliveries no longer
/// count. When [`Deliveries::taken_back`] moves, the core asks
/// [`Deliveries::is_current`] about each message it has fetched and not yet
/// handed out, and drops those that are not, without acking or nacking
/// them.
pub trait Deliveries: Send + Sync + 'static {
    /// The id, fit for logs, of a lazily described delivery; called at most
    /// once a message, and only if the application asks, possibly after the
    /// message was settled or the subscription shut down.
    fn describe_id(&self, ack_id: &AckId, at: (i64, i64)) -> String {
        let _ = at;
        format!("{ack_id:?}")
    }

    /// The backend's own form of such a message, for
    /// [`crate::Message::as_raw`]; `ordering_key` is the message's when
    /// first asked. Called at most once a message.
    fn describe_raw(
        &self,
        ack_id: &AckId,
        at: (i64, i64),
        ordering_key: Option<&str>,
    ) -> Option<Box<dyn Any + Send + Sync>> {
        let _ = (ack_id, at, ordering_key);
        None
    }

    /// A count the driver raises whenever deliveries it returned may have
    /// been taken back. Read before every hand-out, so it must be a load of
    /// an atomic, no more. The default never moves.
    fn taken_back(&self) -> u64 {
        0
    }

    /// Whether a delivery may still be handed to the application. Called
    /// with the core's receive queue locked, once for each queued message,
    /// after [`Deliveries::taken_back`] moved: at most a short lock of the
    /// driver's own, never I/O or a wait on the core.
    fn is_current(&self, ack_id: &AckId) -> bool {
        let _ = ack_id;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::AckId;

    #[test]
    fn ack_ids_keep_their_representation() {
        let pair = AckId::from_u64_pair(7, u64::MAX);
        assert_eq!(pair.as_u64_pair(), Some((7, u64::MAX)));
        assert_eq!(pair.as_u64(), None);
        assert_eq!(format!("{pair:?}"), format!("AckId(7, {})", u64::MAX));
        let int = AckId::from_u64(3);
        assert_eq!((int.as_u64(), int.as_u64_pair()), (Some(3), None));
        let text = AckId::from_text("r-1");
        assert_eq!((text.as_text(), text.as_u64_pair()), (Some("r-1"), None));
        let other = AckId::new(String::from("x"));
        assert_eq!(
            other.downcast_ref::<String>().map(String::as_str),
            Some("x")
        );
        assert_eq!(other.as_u64_pair(), None);
    }
}
