//! What crosses the driver contract: ids, messages on their way out, and
//! deliveries on their way in and back.

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::Result;

/// String attributes of a message, ordered by key.
pub type Attributes = BTreeMap<String, String>;

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

/// A hook that sees what the backend returned for a sent message: its id
/// and the backend's own record (for example the partition and offset it
/// landed at).
pub type AfterSend = Arc<dyn Fn(&Sent<'_>) -> Result<()> + Send + Sync>;

/// What the backend returned for one message it accepted, as an after-send
/// hook sees it.
///
/// [`Sent::id`] is the id a receiver's [`crate::Message::id`] shows for the
/// same message wherever the backend lets the two agree, so a sender's log
/// line and a receiver's can be matched; each driver documents its form
/// and any backend where they differ. [`Sent::raw`] is the backend's own
/// record, of the type the driver documents.
pub struct Sent<'a> {
    id: Option<Cow<'a, str>>,
    raw: &'a dyn Any,
}

impl<'a> Sent<'a> {
    /// The backend's record of an accepted message, without an id.
    pub fn new(raw: &'a dyn Any) -> Self {
        Sent { id: None, raw }
    }

    /// Sets the message's id.
    pub fn with_id(mut self, id: impl Into<Cow<'a, str>>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The message's id, where the backend gives one.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The backend's own record, if it is a `T`.
    pub fn raw<T: Any>(&self) -> Option<&T> {
        self.raw.downcast_ref::<T>()
    }
}

impl fmt::Debug for Sent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sent")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A message on its way to a driver's [`Topic::send_batch`](super::Topic::send_batch).
#[non_exhaustive]
pub struct OutgoingMessage {
    /// The payload.
    pub body: Bytes,
    /// String attributes, already validated by the core.
    pub attributes: Attributes,
    /// Messages with the same key are delivered in order where the backend
    /// supports it.
    pub ordering_key: Option<String>,
    id: u128,
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
            id: fastrand::u128(..),
            before_send: None,
            after_send: None,
        }
    }

    /// A random 128-bit id drawn once for this message, the same on every
    /// attempt the core makes to send it. Drivers put it where the backend
    /// names or deduplicates a message (an AMQP `message_id`, a JetStream
    /// `Nats-Msg-Id`, an SQS FIFO deduplication id), so a resend after a
    /// lost acknowledgement carries the id of the first send and receivers
    /// can tell the duplicate.
    pub fn unique_id(&self) -> u128 {
        self.id
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
    ///
    /// Drivers call this once per accepted message; an error fails that
    /// message. `sent` is built only when asked, so a message without a
    /// hook costs no id string.
    pub fn run_after_send<'a>(&self, sent: impl FnOnce() -> Sent<'a>) -> Result<()> {
        match &self.after_send {
            Some(hook) => hook(&sent()),
            None => Ok(()),
        }
    }

    /// The id drivers give this message where the backend keeps one of the
    /// sender's choosing (an AMQP `message_id`, a `Nats-Msg-Id`): the
    /// [`unique_id`](Self::unique_id) as 32 lower-case hex digits, which is
    /// also the id the receiving side then reports.
    pub fn unique_id_hex(&self) -> String {
        format!("{:032x}", self.id)
    }

    /// Whether a before-send hook waits to see this message's record: a
    /// driver can hand over a message without one as soon as it is made.
    pub fn has_before_send(&self) -> bool {
        self.before_send.is_some()
    }

    /// Whether an after-send hook is set, so drivers can skip building the
    /// record it would see.
    pub fn has_after_send(&self) -> bool {
        self.after_send.is_some()
    }

    /// The size the core checks against [`Capabilities::max_message_bytes`](super::Capabilities::max_message_bytes):
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
    /// two numbers of the driver's choosing from which, with the ack id,
    /// its [`Deliveries`](super::Deliveries) builds those only when the
    /// application asks.
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

    /// A received message whose id and raw form the driver's
    /// [`Deliveries`](super::Deliveries) builds from `ack_id` and `at` when
    /// asked (`id` is left empty and `raw` unset), so that a message nobody
    /// asks about costs neither: no string and no box a message.
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

/// A delivery handed back by a nack, as it was delivered (not as the
/// application may have changed it since), for
/// [`Subscription::send_nacks`](super::Subscription::send_nacks).
///
/// Backends that can hand a delivery back need only `ack_id`; one that
/// cannot (Kafka, whose log only moves forward) redelivers from the content,
/// so it keeps no copy of the deliveries in flight.
#[non_exhaustive]
pub struct Nacked {
    /// The id the delivery was received with.
    pub ack_id: AckId,
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
    /// How long the backend should wait before delivering the message
    /// again; zero for at once. Only ever non-zero for a driver that declares
    /// [`Capabilities::max_nack_delay`](super::Capabilities::max_nack_delay),
    /// and never above it; the core holds longer-delayed nacks of other
    /// drivers itself.
    pub delay: Duration,
    /// The core's lease token, so a batch of nacks releases its leases
    /// without a copy of each id.
    pub(crate) token: u64,
}

impl Nacked {
    /// Sets the redelivery delay, for handing a delivery back at the driver
    /// level.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// A delivery as received, for handing it back at the driver level (the
    /// core does this itself).
    pub fn from_received(m: &ReceivedMessage) -> Self {
        Nacked {
            ack_id: m.ack_id.clone(),
            body: m.body.clone(),
            attributes: m.attributes.clone(),
            ordering_key: m.ordering_key.clone(),
            delivery_attempt: m.delivery_attempt,
            lazy: m.lazy,
            delay: Duration::ZERO,
            token: 0,
        }
    }

    /// A delivery never handed out, with its lease token, moved rather
    /// than copied.
    pub(crate) fn unreceived(m: ReceivedMessage, token: u64) -> Self {
        Nacked {
            ack_id: m.ack_id,
            body: m.body,
            attributes: m.attributes,
            ordering_key: m.ordering_key,
            delivery_attempt: m.delivery_attempt,
            lazy: m.lazy,
            delay: Duration::ZERO,
            token,
        }
    }
}

impl fmt::Debug for Nacked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nacked")
            .field("ack_id", &self.ack_id)
            .field("body_len", &self.body.len())
            .field("attributes", &self.attributes)
            .field("delivery_attempt", &self.delivery_attempt)
            .field("delay", &self.delay)
            .finish()
    }
}
