//! The contract a backend implements.
//!
//! A driver only moves batches: it is handed a batch of messages, acks or
//! nacks and reports per-item success or failure, or asked for up to `max`
//! messages. It never retries, never buffers and never spawns batching of its
//! own: [`crate::Topic`] and [`crate::Subscription`] do all of that, once, for
//! every backend.
//!
//! Each driver maps its native errors onto [`crate::Error`] in one function
//! (by convention `error.rs` in the driver crate), attaching the native error
//! as the source so users can downcast to it.

use std::any::Any;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::message::Attributes;

/// The backend's handle for acknowledging one delivery.
///
/// Small integer ids (AMQP delivery tags, in-memory sequence numbers) and
/// pairs of them (a Kafka partition's assignment and offset, a Redis stream
/// entry's time and sequence) are stored inline, so a busy subscription
/// allocates nothing per id; anything else is boxed and reached by
/// downcasting.
#[derive(Clone)]
pub struct AckId(AckRepr);

#[derive(Clone)]
enum AckRepr {
    Int(u64),
    Pair(u64, u64),
    Text(Arc<str>),
    Other(Arc<dyn Any + Send + Sync>),
}

impl AckId {
    /// An id that is a number.
    pub fn from_u64(id: u64) -> Self {
        AckId(AckRepr::Int(id))
    }

    /// An id that is two numbers.
    pub fn from_u64_pair(first: u64, second: u64) -> Self {
        AckId(AckRepr::Pair(first, second))
    }

    /// An id that is a string (receipt handles, ack ids, reply subjects).
    pub fn from_text(id: impl Into<Arc<str>>) -> Self {
        AckId(AckRepr::Text(id.into()))
    }

    /// An id of any other type.
    pub fn new<T: Any + Send + Sync>(id: T) -> Self {
        AckId(AckRepr::Other(Arc::new(id)))
    }

    /// The number, if this id was made with [`AckId::from_u64`].
    pub fn as_u64(&self) -> Option<u64> {
        match self.0 {
            AckRepr::Int(n) => Some(n),
            _ => None,
        }
    }

    /// The two numbers, if this id was made with [`AckId::from_u64_pair`].
    pub fn as_u64_pair(&self) -> Option<(u64, u64)> {
        match self.0 {
            AckRepr::Pair(a, b) => Some((a, b)),
            _ => None,
        }
    }

    /// The string, if this id was made with [`AckId::from_text`].
    pub fn as_text(&self) -> Option<&str> {
        match &self.0 {
            AckRepr::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The value, if this id was made with [`AckId::new`] from a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        match &self.0 {
            AckRepr::Other(a) => a.downcast_ref::<T>(),
            _ => None,
        }
    }
}

impl fmt::Debug for AckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            AckRepr::Int(n) => write!(f, "AckId({n})"),
            AckRepr::Pair(a, b) => write!(f, "AckId({a}, {b})"),
            AckRepr::Text(s) => write!(f, "AckId({s:?})"),
            AckRepr::Other(_) => f.write_str("AckId(..)"),
        }
    }
}

/// A hook that sees the backend's own outgoing record before it is sent.
pub type BeforeSend = Arc<dyn Fn(&mut dyn Any) -> Result<()> + Send + Sync>;

/// A hook that sees the backend's own record of a sent message (for example
/// the partition and offset it landed at).
pub type AfterSend = Arc<dyn Fn(&dyn Any) -> Result<()> + Send + Sync>;

/// A message on its way to a driver's [`Topic::send_batch`].
#[non_exhaustive]
pub struct OutgoingMessage {
    /// The payload.
    pub body: Bytes,
    /// String attributes, already validated by the core.
    pub attributes: Attributes,
    /// Messages with the same key are delivered in order where the backend
    /// supports it.
    pub ordering_key: Option<String>,
    pub(crate) before_send: Option<BeforeSend>,
    pub(crate) after_send: Option<AfterSend>,
}

impl OutgoingMessage {
    /// A message with just a body, for drivers' own tests.
    pub fn new(body: impl Into<Bytes>) -> Self {
        OutgoingMessage {
            body: body.into(),
            attributes: Attributes::new(),
            ordering_key: None,
            before_send: None,
            after_send: None,
        }
    }

    /// Runs the user's before-send hook, if any, on the backend's record.
    ///
    /// Drivers call this once per message after building their own record
    /// and before sending it; an error fails that message.
    pub fn run_before_send(&self, record: &mut dyn Any) -> Result<()> {
        match &self.before_send {
            Some(hook) => hook(record),
            None => Ok(()),
        }
    }

    /// Runs the user's after-send hook, if any, on what the backend returned.
    pub fn run_after_send(&self, result: &dyn Any) -> Result<()> {
        match &self.after_send {
            Some(hook) => hook(result),
            None => Ok(()),
        }
    }

    /// Whether an after-send hook is set, so drivers can skip building the
    /// record it would see.
    pub fn has_after_send(&self) -> bool {
        self.after_send.is_some()
    }

    /// The size the core checks against [`Capabilities::max_message_bytes`]:
    /// body, attribute keys and values, and the ordering key.
    pub fn size(&self) -> usize {
        message_size(&self.body, &self.attributes, self.ordering_key.as_deref())
    }
}

pub(crate) fn message_size(body: &Bytes, attrs: &Attributes, key: Option<&str>) -> usize {
    body.len()
        + attrs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + key.map_or(0, str::len)
}

impl fmt::Debug for OutgoingMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("body_len", &self.body.len())
            .field("attributes", &self.attributes)
            .field("ordering_key", &self.ordering_key)
            .finish()
    }
}

/// A message a driver received, not yet acknowledged.
#[non_exhaustive]
pub struct ReceivedMessage {
    /// The payload.
    pub body: Bytes,
    /// String attributes.
    pub attributes: Attributes,
    /// The ordering key, where the backend carries one.
    pub ordering_key: Option<String>,
    /// An id fit for logs.
    pub id: String,
    /// How to acknowledge this delivery.
    pub ack_id: AckId,
    /// How many times this message was delivered, counting this one, where
    /// the backend knows.
    pub delivery_attempt: Option<u32>,
    /// The backend's own message, for [`crate::Message::as_raw`].
    pub raw: Option<Box<dyn Any + Send + Sync>>,
    /// Set instead of `id` and `raw` by [`ReceivedMessage::describe_lazily`]:
    /// two numbers from which, with the ack id, the driver's
    /// [`Subscription::describe_id`] and [`Subscription::describe_raw`]
    /// build those only when the application asks.
    pub lazy: Option<(i64, i64)>,
}

impl ReceivedMessage {
    /// A received message with the fields every backend has.
    pub fn new(body: Bytes, attributes: Attributes, id: String, ack_id: AckId) -> Self {
        ReceivedMessage {
            body,
            attributes,
            ordering_key: None,
            id,
            ack_id,
            delivery_attempt: None,
            raw: None,
            lazy: None,
        }
    }

    /// A received message whose id and raw form the driver builds from
    /// `ack_id` and `at` when asked (`id` is left empty and `raw` unset), so
    /// that a message nobody asks about costs neither. For drivers that
    /// receive at high rates: the message holds nothing shared, and its
    /// driver is reached through the subscription.
    pub fn describe_lazily(
        body: Bytes,
        attributes: Attributes,
        ack_id: AckId,
        at: (i64, i64),
    ) -> Self {
        let mut m = ReceivedMessage::new(body, attributes, String::new(), ack_id);
        m.lazy = Some(at);
        m
    }
}

impl fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceivedMessage")
            .field("id", &self.id)
            .field("lazy", &self.lazy)
            .field("body_len", &self.body.len())
            .field("attributes", &self.attributes)
            .field("ack_id", &self.ack_id)
            .finish()
    }
}

/// A received message handed back by a nack, as it was delivered (not as
/// the application may have changed it since), for
/// [`Subscription::nack_now`].
#[non_exhaustive]
pub struct Nacked {
    /// The payload.
    pub body: Bytes,
    /// String attributes.
    pub attributes: Attributes,
    /// The ordering key.
    pub ordering_key: Option<String>,
    /// The delivery attempt the message was delivered with.
    pub delivery_attempt: Option<u32>,
    /// The numbers given to [`ReceivedMessage::describe_lazily`], if the
    /// message was made with it.
    pub lazy: Option<(i64, i64)>,
}

impl Nacked {
    /// A delivery as received, for handing it back at the driver level (the
    /// core does this itself).
    pub fn from_received(m: &ReceivedMessage) -> Self {
        Nacked {
            body: m.body.clone(),
            attributes: m.attributes.clone(),
            ordering_key: m.ordering_key.clone(),
            delivery_attempt: m.delivery_attempt,
            lazy: m.lazy,
        }
    }
}

impl fmt::Debug for Nacked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nacked")
            .field("body_len", &self.body.len())
            .field("attributes", &self.attributes)
            .field("delivery_attempt", &self.delivery_attempt)
            .finish()
    }
}

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
    /// Limits for `send_batch`.
    pub send_batching: BatchLimits,
    /// Limits for `send_acks`, `send_nacks` and `extend_leases`.
    pub ack_batching: BatchLimits,
    /// Most messages one `receive_batch` call may return; larger requests
    /// are split across concurrent calls.
    pub max_receive_batch: usize,
    /// Most `receive_batch` calls in flight at once.
    pub max_concurrent_receives: usize,
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
            send_batching: BatchLimits::default(),
            ack_batching: BatchLimits::default(),
            max_receive_batch: 1000,
            max_concurrent_receives: 4,
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

    /// What this backend can do.
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

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Returns up to `max` messages. May wait a while (a long poll) for the
    /// first one and may return none; the core calls again. May be called
    /// concurrently, and may be dropped when the subscription shuts down:
    /// messages it had not returned yet must then come back by themselves.
    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>>;

    /// Acknowledges deliveries. Acking twice, or acking an expired delivery,
    /// must be harmless.
    async fn send_acks(&self, ids: &[AckId]) -> Result<(), BatchError>;

    /// Settles one ack at once, on the acking thread, instead of queuing it
    /// for [`Subscription::send_acks`]. For backends where an ack is local
    /// bookkeeping that reaches the backend later by itself (Kafka's stored
    /// offsets, which the consumer commits on its own schedule): a queue and
    /// a batch handler would cost more than the ack. Returns `false`, as the
    /// default does, to have the ack batched instead. Called for every ack
    /// while the subscription is open, so it must be quick and never block.
    fn ack_now(&self, id: &AckId) -> bool {
        let _ = id;
        false
    }

    /// Settles one nack at once, on the nacking thread, given the message as
    /// it was delivered, instead of queuing its id for
    /// [`Subscription::send_nacks`]. For backends that cannot hand a
    /// delivery back and redeliver nacked messages from memory (Kafka, whose
    /// log only moves forward): with the message handed back, the driver
    /// keeps no copy of every delivery in flight. Returns `false`, as the
    /// default does, to have the nack batched instead. Called, where
    /// [`Capabilities::nack`] says so, for every nack (and every message
    /// dropped unsettled) while the subscription is open, so it must be
    /// quick and never block.
    fn nack_now(&self, id: &AckId, message: Nacked) -> bool {
        let _ = (id, message);
        false
    }

    /// Hands deliveries back for prompt redelivery, where
    /// [`Capabilities::nack`] says so. A driver whose
    /// [`Subscription::nack_now`] settles every nack may refuse this with
    /// `FailedPrecondition`: the core then never calls it.
    async fn send_nacks(&self, ids: &[AckId]) -> Result<(), BatchError> {
        let _ = ids;
        Err(Error::unimplemented("this backend cannot nack").into())
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

    /// A counter the driver raises whenever deliveries it has returned may
    /// have been taken back before the application got them: the partitions
    /// a Kafka consumer loses in a rebalance belong to another consumer from
    /// then on, which reads their unacked messages again, and acks of the
    /// old deliveries no longer count. When the counter moves, the core asks
    /// [`Subscription::is_current`] about each message it has fetched and
    /// not yet handed out, and drops those that are not, without acking or
    /// nacking them. Asked once, when the subscription is made; `None`, the
    /// default, for backends whose deliveries stay good until they are
    /// settled or their ack deadline passes.
    fn revocations(&self) -> Option<Arc<AtomicU64>> {
        None
    }

    /// Whether a delivery this driver returned may still be handed to the
    /// application; see [`Subscription::revocations`]. Called with the
    /// core's receive queue locked, once for each queued message, so it
    /// must be quick: at most a short lock of the driver's own, never I/O
    /// or a wait on the core.
    fn is_current(&self, ack_id: &AckId) -> bool {
        let _ = ack_id;
        true
    }

    /// The id, fit for logs, of a message this driver made with
    /// [`ReceivedMessage::describe_lazily`]; called at most once a message,
    /// and only if the application asks, possibly after the message was
    /// settled or the subscription shut down.
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
