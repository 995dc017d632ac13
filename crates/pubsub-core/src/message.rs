//! The message an application sends and receives.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::driver::{
    message_size, AckId, AfterSend, Attributes, BeforeSend, Nacked, OutgoingMessage,
    ReceivedMessage,
};
use crate::engine::receiver::Receiver;
use crate::error::{Error, Result};

/// A message: a body, string attributes and an optional ordering key.
///
/// Build one with [`Message::new`] to send it; a received one also carries
/// an id and must be settled with [`ack`](Message::ack) or
/// [`nack`](Message::nack), which consume it so a message cannot be settled
/// twice. A received message dropped without either is nacked where the
/// backend can nack (and counted in [`crate::SubscriptionStats`]), otherwise
/// it comes back after its ack deadline.
pub struct Message {
    body: Bytes,
    attributes: Attributes,
    ordering_key: Option<String>,
    /// Boxed, like the receipt, because received messages are moved
    /// several times between the queue and the application and rarely
    /// carry hooks: a smaller `Message` moves faster.
    hooks: Option<Box<Hooks>>,
    /// Boxed: a `Message` is moved about eight times on its way from the
    /// queue to the application, and with its receipt inline (184 bytes
    /// instead of 96) each move was a `memcpy` call that stalled on the
    /// stores just made; on a Kafka backlog the receiving thread spent a
    /// sixth less time a message with the receipt boxed, the allocation
    /// included.
    receipt: Option<Box<Receipt>>,
}

/// The hooks of a message to send.
#[derive(Clone, Default)]
struct Hooks {
    before_send: Option<BeforeSend>,
    after_send: Option<AfterSend>,
}

/// What a received message needs to settle itself.
struct Receipt {
    details: Details,
    ack_id: AckId,
    /// The key of the lease the core keeps for the delivery.
    token: u64,
    delivery_attempt: Option<u32>,
    sub: Arc<Receiver>,
    /// What the application changed of the message, as delivered: a nack
    /// hands the message as delivered to the driver for redelivery.
    delivered: Option<Box<Delivered>>,
    /// The consumer span, open until the message is settled.
    #[cfg(feature = "opentelemetry")]
    span: tracing::Span,
}

/// The parts of a received message as delivered, each kept when it is
/// first changed.
#[derive(Default)]
struct Delivered {
    body: Option<Bytes>,
    attributes: Option<Attributes>,
    ordering_key: Option<Option<String>>,
}

type Raw = Box<dyn Any + Send + Sync>;

/// A received message's id and raw form: given by the driver, or built by
/// it on first use.
enum Details {
    Given {
        id: String,
        raw: Option<Raw>,
    },
    /// Built by the driver's [`crate::driver::Deliveries`] from the ack id
    /// and these numbers, in a box made only when asked.
    Lazy {
        at: (i64, i64),
        built: OnceLock<Box<Built>>,
    },
}

/// What a lazily described message built on demand.
#[derive(Default)]
struct Built {
    id: OnceLock<String>,
    raw: OnceLock<Option<Raw>>,
}

impl Receipt {
    fn id(&self) -> &str {
        match &self.details {
            Details::Given { id, .. } => id,
            Details::Lazy { at, built } => {
                built
                    .get_or_init(Box::default)
                    .id
                    .get_or_init(|| match self.sub.deliveries() {
                        Some(d) => d.describe_id(&self.ack_id, *at),
                        None => format!("{:?}", self.ack_id),
                    })
            }
        }
    }

    fn raw(&self, ordering_key: Option<&str>) -> Option<&(dyn Any + Send + Sync)> {
        match &self.details {
            Details::Given { raw, .. } => raw.as_deref(),
            Details::Lazy { at, built } => built
                .get_or_init(Box::default)
                .raw
                .get_or_init(|| {
                    self.sub
                        .deliveries()?
                        .describe_raw(&self.ack_id, *at, ordering_key)
                })
                .as_deref(),
        }
    }
}

impl Message {
    /// A message with this body and no attributes.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            body: body.into(),
            attributes: Attributes::new(),
            ordering_key: None,
            hooks: None,
            receipt: None,
        }
    }

    /// Adds an attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.keep_attributes();
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Adds attributes.
    pub fn with_attributes<K, V>(mut self, attrs: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.keep_attributes();
        self.attributes
            .extend(attrs.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Adds an attribute given as raw bytes, as read from a file or another
    /// protocol. Attributes are strings on every backend, so bytes that are
    /// not UTF-8 are refused with `InvalidArgument`.
    pub fn try_with_attribute_bytes(mut self, key: &[u8], value: &[u8]) -> Result<Self> {
        let key = std::str::from_utf8(key)
            .map_err(|_| Error::invalid_argument("attribute key is not valid UTF-8"))?;
        let value = std::str::from_utf8(value).map_err(|_| {
            Error::invalid_argument(format!("value of attribute {key:?} is not valid UTF-8"))
        })?;
        self.keep_attributes();
        self.attributes.insert(key.to_owned(), value.to_owned());
        Ok(self)
    }

    /// Sets the ordering key: messages with one key are delivered in the
    /// order they were sent, where the backend supports it.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.keep_ordering_key();
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets a hook that sees the backend's own outgoing record (for example
    /// AMQP `BasicProperties`) just before it is sent, and may change it.
    /// Each driver documents the type it passes. The hook may run more than
    /// once when a send is retried.
    pub fn with_before_send<F>(mut self, hook: F) -> Self
    where
        F: Fn(&mut dyn Any) -> Result<()> + Send + Sync + 'static,
    {
        self.hooks.get_or_insert_with(Box::default).before_send = Some(Arc::new(hook));
        self
    }

    /// Sets a hook that sees what the backend returned for this message once
    /// it was accepted: its id ([`Sent::id`](crate::Sent::id), the id a
    /// receiver's [`Message::id`] shows wherever the backend allows) and the
    /// backend's own record ([`Sent::raw`](crate::Sent::raw), of the type
    /// each driver documents). It runs before `send` returns; an error it
    /// returns fails the send.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> pubsub_core::Result<()> {
    /// use std::sync::{Arc, Mutex};
    /// use pubsub_core::{mem::Broker, Message};
    ///
    /// let broker = Broker::new();
    /// broker.create_topic("orders")?;
    /// broker.create_subscription("billing", "orders", std::time::Duration::from_secs(30))?;
    /// let (topic, sub) = (broker.topic("orders"), broker.subscription("billing"));
    /// let id = Arc::new(Mutex::new(None));
    /// let slot = id.clone();
    /// let message = Message::new("order 1").with_after_send(move |sent| {
    ///     *slot.lock().unwrap() = sent.id().map(str::to_owned);
    ///     Ok(())
    /// });
    /// topic.send(message).await?;
    /// let got = sub.receive().await?;
    /// assert_eq!(got.id(), id.lock().unwrap().as_deref());
    /// got.ack();
    /// # topic.shutdown().await?; sub.shutdown().await
    /// # }
    /// ```
    pub fn with_after_send<F>(mut self, hook: F) -> Self
    where
        F: Fn(&crate::Sent<'_>) -> Result<()> + Send + Sync + 'static,
    {
        self.hooks.get_or_insert_with(Box::default).after_send = Some(Arc::new(hook));
        self
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    /// Mutable access to the attributes.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        self.keep_attributes();
        &mut self.attributes
    }

    /// One attribute.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// The ordering key, if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }

    /// The backend's id of a received message, fit for logs.
    pub fn id(&self) -> Option<&str> {
        self.receipt.as_deref().map(Receipt::id)
    }

    /// How many times a received message has been delivered, counting this
    /// time, where the backend tells.
    pub fn delivery_attempt(&self) -> Option<u32> {
        self.receipt.as_ref().and_then(|r| r.delivery_attempt)
    }

    /// The backend's own message, if it is a `T`: the typed escape hatch.
    /// Each driver documents the type it exposes. Where the driver builds it
    /// on first use, it carries the ordering key the message had then.
    pub fn as_raw<T: Any>(&self) -> Option<&T> {
        let key = self.ordering_key.as_deref();
        self.receipt.as_ref()?.raw(key)?.downcast_ref::<T>()
    }

    /// Takes the body, leaving an empty one.
    pub fn take_body(&mut self) -> Bytes {
        self.keep_body();
        std::mem::take(&mut self.body)
    }

    /// Acknowledges a received message: it will not be delivered to this
    /// subscription again. Returns at once; acks are batched, and a failure
    /// shows in later `receive` and `shutdown` calls. Does nothing on a
    /// message that was never received.
    ///
    /// `ack` consumes the message, so a message cannot be settled twice:
    /// ```compile_fail,E0382
    /// # async fn twice(sub: pubsub_core::Subscription) -> pubsub_core::Result<()> {
    /// let msg = sub.receive().await?;
    /// msg.ack();
    /// msg.ack(); // error[E0382]: use of moved value: `msg`
    /// # Ok(())
    /// # }
    /// ```
    #[inline]
    pub fn ack(mut self) {
        if let Some(r) = &self.receipt {
            r.sub.settler.ack(&r.ack_id, r.token);
            #[cfg(feature = "opentelemetry")]
            crate::trace::settled(&r.span, "ack");
        }
        // Dropped in place rather than taken out: the ack path runs once a
        // message, and taking it out would move it once more.
        self.receipt = None;
    }

    /// Hands a received message back for redelivery after the
    /// subscription's [`NackBackoff`](crate::NackBackoff) (100 ms on a first
    /// delivery by default, doubling each delivery). Returns at once.
    ///
    /// Where the backend cannot nack, the message is left to come back after
    /// its ack deadline; [`crate::Capabilities::nack`] tells which.
    pub fn nack(mut self) {
        self.settle_nack(false, None);
    }

    /// Hands a received message back for redelivery after `delay` instead of
    /// the subscription's backoff; zero redelivers at once. Returns at once.
    pub fn nack_with_delay(mut self, delay: std::time::Duration) {
        self.settle_nack(false, Some(delay));
    }

    /// Nacks a received message, handing its content as delivered to the
    /// subscription.
    fn settle_nack(&mut self, dropped: bool, delay: Option<std::time::Duration>) {
        let Some(r) = self.receipt.take() else {
            return;
        };
        let settler = &r.sub.settler;
        if dropped && settler.note_dropped() {
            tracing::warn!(
                id = %r.id(),
                "a received message was dropped without ack or nack; it is nacked (further drops are counted in stats, not logged)"
            );
        }
        let Receipt {
            details,
            ack_id,
            token,
            delivery_attempt,
            sub,
            delivered,
            #[cfg(feature = "opentelemetry")]
            span,
        } = *r;
        #[cfg(feature = "opentelemetry")]
        crate::trace::settled(&span, if dropped { "drop" } else { "nack" });
        let d = delivered.map(|d| *d).unwrap_or_default();
        let delay = delay.unwrap_or_else(|| sub.nack_backoff.delay(delivery_attempt));
        sub.nack(Nacked {
            ack_id,
            body: d.body.unwrap_or_else(|| std::mem::take(&mut self.body)),
            attributes: d
                .attributes
                .unwrap_or_else(|| std::mem::take(&mut self.attributes)),
            ordering_key: d.ordering_key.unwrap_or_else(|| self.ordering_key.take()),
            delivery_attempt,
            lazy: match details {
                Details::Lazy { at, .. } => Some(at),
                Details::Given { .. } => None,
            },
            delay,
            token,
        });
    }

    // A received message keeps each part as delivered before it is first
    // changed; a message to send keeps nothing.

    fn keep_body(&mut self) {
        if let Some(d) = delivered(&mut self.receipt) {
            d.body.get_or_insert_with(|| self.body.clone());
        }
    }

    fn keep_attributes(&mut self) {
        if let Some(d) = delivered(&mut self.receipt) {
            d.attributes.get_or_insert_with(|| self.attributes.clone());
        }
    }

    fn keep_ordering_key(&mut self) {
        if let Some(d) = delivered(&mut self.receipt) {
            d.ordering_key
                .get_or_insert_with(|| self.ordering_key.clone());
        }
    }

    /// Pushes this message's ack deadline to `by` from now. The subscription
    /// already does this for held messages up to its maximum extension; this
    /// is for work known to take long.
    pub async fn extend_lease(&self, by: Duration) -> Result<()> {
        match &self.receipt {
            Some(r) => r.sub.extend(&r.ack_id, r.token, by).await,
            None => Err(Error::failed_precondition(
                "only a received message has a lease",
            )),
        }
    }

    /// Whether this message was received (and so has to be settled).
    pub(crate) fn is_received(&self) -> bool {
        self.receipt.is_some()
    }

    /// Runs `first` once the backend accepted the message, before the
    /// application's after-send hook, if any.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn also_after_send<F>(mut self, first: F) -> Self
    where
        F: Fn(&crate::Sent<'_>) + Send + Sync + 'static,
    {
        let hooks = self.hooks.get_or_insert_with(Box::default);
        let then = hooks.after_send.take();
        hooks.after_send = Some(Arc::new(move |sent| {
            first(sent);
            then.as_ref().map_or(Ok(()), |hook| hook(sent))
        }));
        self
    }

    pub(crate) fn into_outgoing(self) -> OutgoingMessage {
        let mut this = self;
        if this.receipt.is_some() {
            // Dropping `this` below nacks it, handing over what it holds
            // then, so the content must stay as delivered.
            this.keep_body();
            this.keep_attributes();
            this.keep_ordering_key();
        }
        let mut out = OutgoingMessage::new(std::mem::take(&mut this.body));
        out.attributes = std::mem::take(&mut this.attributes);
        out.ordering_key = this.ordering_key.take();
        if let Some(hooks) = this.hooks.take() {
            out.before_send = hooks.before_send;
            out.after_send = hooks.after_send;
        }
        // A received message re-sent elsewhere still has to be settled with
        // its own subscription; dropping `this` does that by the drop rule.
        out
    }

    #[inline]
    pub(crate) fn from_received(m: ReceivedMessage, token: u64, sub: Arc<Receiver>) -> Self {
        let receipt = Box::new(Receipt {
            details: match m.lazy {
                Some(at) => Details::Lazy {
                    at,
                    built: OnceLock::new(),
                },
                None => Details::Given {
                    id: m.id,
                    raw: m.raw,
                },
            },
            ack_id: m.ack_id,
            token,
            delivery_attempt: m.delivery_attempt,
            sub,
            delivered: None,
            #[cfg(feature = "opentelemetry")]
            span: tracing::Span::none(),
        });
        Message {
            body: m.body,
            attributes: m.attributes,
            ordering_key: m.ordering_key,
            hooks: None,
            receipt: Some(receipt),
        }
    }

    /// Gives a received message its consumer span, where its subscription
    /// traces. Called once the message is out of the receive queue, so that
    /// no span is made with the queue locked, and in the receiving
    /// application's context on every path.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn start_span(&mut self) {
        if !crate::trace::spans_wanted() {
            return;
        }
        let Some(r) = self.receipt.as_mut() else {
            return;
        };
        let Some(name) = r.sub.trace.as_deref() else {
            return;
        };
        let d = &r.sub.driver;
        let system = r.sub.caps.messaging_system_or(d.driver_name());
        let span =
            crate::trace::consumer_span(name, system, d.resource(), &self.attributes, || {
                r.id().to_owned()
            });
        r.span = span;
    }

    /// Moves `extra`, the attributes carrying a send's trace context, in
    /// place of any trace attributes (`fields`) the message carries, where
    /// the backend's limits leave room; `size` is the message's size now.
    /// Returns the size after.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn set_trace_context(
        &mut self,
        extra: &mut crate::Attributes,
        fields: &[&str],
        size: usize,
        caps: &crate::Capabilities,
    ) -> usize {
        let stale = fields
            .iter()
            .filter_map(|f| self.attributes.get_key_value(*f));
        let (stale_count, stale_bytes) =
            stale.fold((0, 0), |(n, b), (k, v)| (n + 1, b + k.len() + v.len()));
        let added: usize = extra.iter().map(|(k, v)| k.len() + v.len()).sum();
        let after = size - stale_bytes + added;
        let count = self.attributes.len() - stale_count + extra.len();
        if caps.max_attributes.is_some_and(|max| count > max)
            || caps.max_message_bytes.is_some_and(|max| after > max)
        {
            tracing::debug!(
                attributes = count,
                bytes = after,
                "no room in the message for its trace context; sent without it"
            );
            return size;
        }
        for f in fields {
            self.attributes.remove(*f);
        }
        self.attributes.append(extra);
        after
    }

    /// The consumer span of a received message, open until it is settled:
    /// a child of the producer's span when the message carries its trace
    /// context (see [`crate::trace`]). Run the work on the message in it
    /// (`work.instrument(msg.span())`) to make that work part of the
    /// producer's trace. A disabled span for a message to send, or when
    /// nothing records spans.
    #[cfg(feature = "opentelemetry")]
    pub fn span(&self) -> tracing::Span {
        match &self.receipt {
            Some(r) => r.span.clone(),
            None => tracing::Span::none(),
        }
    }

    /// Validates attributes the type system does not already rule out.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.attributes.contains_key("") {
            return Err(Error::invalid_argument("attribute keys must not be empty"));
        }
        Ok(())
    }

    pub(crate) fn size(&self) -> usize {
        message_size(&self.body, &self.attributes, self.ordering_key.as_deref())
    }
}

/// Where a received message keeps its parts as delivered; `None` for a
/// message to send.
fn delivered(receipt: &mut Option<Box<Receipt>>) -> Option<&mut Delivered> {
    let r = receipt.as_mut()?;
    Some(r.delivered.get_or_insert_with(Box::default))
}

impl Drop for Message {
    fn drop(&mut self) {
        self.settle_nack(true, None);
    }
}

impl Clone for Message {
    /// Clones the content only: the copy is a new message to send and
    /// carries no receipt, so a delivery is still settled exactly once.
    fn clone(&self) -> Self {
        Message {
            body: self.body.clone(),
            attributes: self.attributes.clone(),
            ordering_key: self.ordering_key.clone(),
            hooks: self.hooks.clone(),
            receipt: None,
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Message");
        if let Some(r) = &self.receipt {
            d.field("id", &r.id());
        }
        d.field("body_len", &self.body.len())
            .field("attributes", &self.attributes);
        if let Some(k) = &self.ordering_key {
            d.field("ordering_key", k);
        }
        d.finish()
    }
}

impl From<&'static str> for Message {
    fn from(s: &'static str) -> Self {
        Message::new(s)
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::new(s)
    }
}

impl From<Vec<u8>> for Message {
    fn from(v: Vec<u8>) -> Self {
        Message::new(v)
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::new(b)
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Attribute bytes are taken exactly when both are UTF-8, and
        /// refused with InvalidArgument otherwise.
        #[test]
        fn attribute_bytes_are_taken_only_as_utf8(
            k in proptest::collection::vec(any::<u8>(), 0..8),
            v in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let utf8 = (std::str::from_utf8(&k), std::str::from_utf8(&v));
            match (Message::new("x").try_with_attribute_bytes(&k, &v), utf8) {
                (Ok(m), (Ok(k), Ok(v))) => {
                    prop_assert_eq!(m.attributes().get(k).map(String::as_str), Some(v));
                }
                (Err(e), (k, v)) => {
                    prop_assert!(k.is_err() || v.is_err());
                    prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
                }
                (Ok(_), _) => prop_assert!(false, "non-UTF-8 bytes were taken"),
            }
        }
    }
}
