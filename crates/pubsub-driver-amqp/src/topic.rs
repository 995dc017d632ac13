//! A topic is an exchange.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use pubsub_core::driver::{self, BatchError, Capabilities, OutgoingMessage, Sent};
use pubsub_core::{Error, ErrorKind, Result};

use crate::connection::{bounded, Connector, BROKER_TIMEOUT};
use crate::{capabilities, error, headers, DRIVER};

/// Options of an exchange-backed topic.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct TopicConfig {
    /// Take each message's routing key from this attribute (for direct and
    /// topic exchanges); without it the routing key is empty, which suits
    /// fanout exchanges. As in the Go CDK, that attribute is not also sent
    /// as a header: a subscription with the same `key_name` gets it back.
    pub key_name: Option<String>,
}

impl TopicConfig {
    /// Sets the routing-key attribute.
    pub fn with_key_name(mut self, attr: impl Into<String>) -> Self {
        self.key_name = Some(attr.into());
        self
    }
}

/// The RabbitMQ topic driver: publishes to one exchange with publisher
/// confirms and the mandatory flag, on a channel it reopens when it dies.
///
/// [`pubsub_core::Topic::as_raw`] gives the [`Connector`]. A before-send
/// hook gets the outgoing `&mut lapin::BasicProperties`; an after-send hook
/// the broker's `lapin::Confirmation` as [`Sent::raw`] and the message's
/// `message_id` property as sent (after the before-send hook) as
/// [`Sent::id`], the id receivers report.
pub struct AmqpTopic {
    connector: Connector,
    exchange: ShortString,
    config: TopicConfig,
    /// Open channels in confirm mode that no batch is using. A batch takes
    /// one for itself and puts it back when done; see `send_batch`.
    idle: std::sync::Mutex<Vec<Channel>>,
}

impl AmqpTopic {
    /// A topic publishing to `exchange`. The exchange is not checked until
    /// the first send, which fails with `NotFound` if it does not exist.
    pub fn new(connector: Connector, exchange: &str, config: TopicConfig) -> Result<Self> {
        let exchange = ShortString::try_new(exchange)
            .map_err(|_| Error::invalid_argument("exchange names are at most 255 bytes"))?;
        Ok(AmqpTopic {
            connector,
            exchange,
            config,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Channel>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A channel for one batch alone: an idle one, or a new one.
    async fn take_channel(&self) -> Result<Channel> {
        loop {
            let Some(ch) = self.idle().pop() else { break };
            if ch.status().connected() {
                return Ok(ch);
            }
        }
        let ch = self.connector.channel().await?;
        bounded(
            "turning publisher confirms on",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(ch)
    }

    /// Hands a batch's channel back for the next batch, if it still works.
    fn put_back(&self, ch: Channel) {
        if ch.status().connected() {
            self.idle().push(ch);
        }
    }

    fn routing_key(&self, m: &OutgoingMessage) -> Result<ShortString> {
        let key = match &self.config.key_name {
            Some(attr) => m.attributes.get(attr).map(String::as_str).unwrap_or(""),
            None => "",
        };
        ShortString::try_new(key)
            .map_err(|_| Error::invalid_argument("routing keys are at most 255 bytes"))
    }

    /// The message's properties; a before-send hook may change any of
    /// them, the message id included.
    fn properties(&self, m: &OutgoingMessage) -> Result<BasicProperties> {
        let mut props = BasicProperties::default()
            // Persistent, so a durable queue keeps a confirmed message
            // across a broker restart. The Go CDK publishes transient (the
            // AMQP default); receivers see no difference.
            .with_delivery_mode(2)
            // One id a message, kept across the core's retries, so a resend
            // after a lost confirm is a duplicate receivers can detect.
            .with_message_id(ShortString::from(m.unique_id_hex()));
        // The key attribute travels as the routing key only, as the Go CDK
        // sends it; a subscription with the same key_name restores it.
        let key = self.config.key_name.as_deref();
        if m.attributes.keys().any(|k| Some(k.as_str()) != key) {
            props = props.with_headers(headers::to_headers(&m.attributes, key)?);
        }
        m.run_before_send(&mut props)?;
        Ok(props)
    }
}

impl AmqpTopic {
    /// Publishes `batch` on `ch`, which no other batch uses meanwhile;
    /// sets `broken` when an error leaves the channel unfit for reuse.
    async fn publish(
        &self,
        ch: &Channel,
        batch: &[OutgoingMessage],
        broken: &mut bool,
    ) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // No time limit on publishing or confirms: lapin queues a message's
        // frames before anything can time out, so a limit would only send
        // it again, and a broker that blocks publishers (a memory or disk
        // alarm) should hold senders back, not multiply their messages. A
        // dead connection fails them instead.
        let mut named = Vec::with_capacity(batch.len());
        let mut publishes = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            let prepared = self
                .routing_key(m)
                .and_then(|k| Ok((k, self.properties(m)?)));
            match prepared {
                Ok((key, props)) => {
                    named.push((i, props.message_id().clone()));
                    publishes.push(ch.basic_publish(
                        self.exchange.clone(),
                        key,
                        options,
                        &m.body,
                        props,
                    ));
                }
                Err(e) => failed.push((i, e)),
            }
        }
        // Each publish queues its frames in its first poll: polling them
        // together queues the whole batch before awaiting any write, so the
        // batch costs one write and one round trip. The channel is this
        // batch's alone, so the order the polls take cannot swap numbers.
        let published = futures_util::future::join_all(publishes).await;
        let mut pending = Vec::with_capacity(published.len());
        for ((i, id), published) in named.into_iter().zip(published) {
            match published {
                Ok(confirm) => pending.push((i, id, confirm)),
                Err(e) => {
                    *broken |= error::kills_channel(&e);
                    failed.push((i, error::map(e)));
                }
            }
        }
        let mut confirmed = Vec::with_capacity(pending.len());
        let mut returned = Vec::new();
        for (i, id, confirm) in pending {
            match confirm.await {
                Ok(Confirmation::Ack(r)) => {
                    returned.extend(r.map(|r| (i, r)));
                    confirmed.push((i, id));
                }
                Ok(Confirmation::Nack(r)) => {
                    returned.extend(r.map(|r| (i, r)));
                    failed.push((
                        i,
                        Error::unavailable("the broker refused the message (publisher nack)"),
                    ));
                }
                Ok(Confirmation::NotRequested) => failed.push((
                    i,
                    Error::internal("publisher confirms are off on this channel"),
                )),
                Err(e) => {
                    *broken |= error::kills_channel(&e);
                    failed.push((i, error::map(e)));
                }
            }
        }
        // A return names its message by message id; one without an id (a
        // hook removed it) is taken as the message lapin paired it with.
        // Ids are unique unless a hook made them not; then each return
        // fails one message of its id.
        let mut unroutable: HashMap<&str, Vec<Error>> = HashMap::new();
        let mut unnamed = HashMap::new();
        for (i, r) in &returned {
            let e = self.unroutable(r);
            match r.properties.message_id() {
                Some(id) => unroutable.entry(id.as_str()).or_default().push(e),
                None => {
                    unnamed.insert(*i, e);
                }
            }
        }
        for (i, id) in confirmed {
            let named = id
                .as_ref()
                .and_then(|id| unroutable.get_mut(id.as_str())?.pop());
            if let Some(e) = named.or_else(|| unnamed.remove(&i)) {
                failed.push((i, e));
            } else if batch[i].has_after_send() {
                let ack = Confirmation::Ack(None);
                let sent = || match &id {
                    Some(id) => Sent::new(&ack).with_id(id.as_str()),
                    None => Sent::new(&ack),
                };
                if let Err(e) = batch[i].run_after_send(sent) {
                    failed.push((i, e));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Items(failed))
        }
    }

    fn unroutable(&self, returned: &BasicReturnMessage) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "message unroutable: exchange {:?} has no queue bound for routing key {:?} ({})",
                self.exchange.as_str(),
                returned.delivery.routing_key.as_str(),
                returned.reply_text.as_str()
            ),
        )
    }
}

impl fmt::Debug for AmqpTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTopic")
            .field("exchange", &self.exchange.as_str())
            .field("server", &self.connector.server())
            .finish()
    }
}

#[async_trait]
impl driver::Topic for AmqpTopic {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        self.exchange.as_str()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(0)
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        // A channel to this batch alone, for two reasons. lapin numbers a
        // publish for its confirm and then queues its frames, in two steps
        // that another publisher on the channel could get between, and the
        // broker numbers publishes as their frames arrive: swapped numbers
        // make the broker's ack of one message confirm another, and after a
        // connection cut a message is reported sent that the broker never
        // took. And lapin hands a returned (unroutable) message to whichever
        // confirm of the broker's ack range it completes first, so only when
        // every confirm of the range belongs to this batch can the returns
        // be matched to their messages. Concurrent batches use channels of
        // their own, so batches still overlap.
        let ch = self.take_channel().await?;
        let mut broken = false;
        let result = self.publish(&ch, batch, &mut broken).await;
        if !broken {
            self.put_back(ch);
        }
        result
    }

    async fn close(&self) -> Result<()> {
        let idle = std::mem::take(&mut *self.idle());
        for ch in idle {
            if ch.status().connected() {
                // Bounded, as a broker that stops answering would hold the
                // shutdown for ever; nothing is lost by leaving the channel.
                match tokio::time::timeout(BROKER_TIMEOUT, ch.close(200, "bye".into())).await {
                    Ok(r) => r.map_err(error::map)?,
                    Err(_) => tracing::warn!(
                        exchange = self.exchange.as_str(),
                        "RabbitMQ did not confirm closing a channel in time"
                    ),
                }
            }
        }
        Ok(())
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.connector)
    }
}
