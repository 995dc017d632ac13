//! A topic is an exchange.

use std::any::Any;
use std::fmt;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use pubsub_core::driver::{self, BatchError, Capabilities, OutgoingMessage};
use pubsub_core::{Error, ErrorKind, Result};
use tokio::sync::Mutex;

use crate::connection::{bounded, Connector};
use crate::{capabilities, error, headers, DRIVER};

/// Options of an exchange-backed topic.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct TopicConfig {
    /// Take each message's routing key from this attribute (for direct and
    /// topic exchanges); without it the routing key is empty, which suits
    /// fanout exchanges.
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
/// the broker's `lapin::Confirmation`.
pub struct AmqpTopic {
    connector: Connector,
    exchange: ShortString,
    config: TopicConfig,
    channel: Mutex<Option<Channel>>,
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
            channel: Mutex::new(None),
        })
    }

    async fn channel(&self) -> Result<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self.connector.channel().await?;
        bounded(
            "turning publisher confirms on",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    async fn forget_channel(&self, dead: &Channel) {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == dead.id()) {
            *slot = None;
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

    fn properties(&self, m: &OutgoingMessage) -> Result<BasicProperties> {
        let mut props = BasicProperties::default()
            // Persistent, as the Go CDK publishes: a durable queue keeps the
            // message across a broker restart once it is confirmed.
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("{:032x}", fastrand::u128(..))));
        if !m.attributes.is_empty() {
            props = props.with_headers(headers::to_headers(&m.attributes)?);
        }
        m.run_before_send(&mut props)?;
        Ok(props)
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
        let ch = self.channel().await?;
        let mut failed = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // No time limit on publishing or confirms: lapin queues a message's
        // frames before anything can time out, so a limit would only send
        // it again, and a broker that blocks publishers (a memory or disk
        // alarm) should hold senders back, not multiply their messages. A
        // dead connection fails them instead.
        // Publish the whole batch before awaiting any confirm, so the batch
        // costs one round trip, not one a message.
        for (i, m) in batch.iter().enumerate() {
            let prepared = self
                .routing_key(m)
                .and_then(|k| Ok((k, self.properties(m)?)));
            let (key, props) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    failed.push((i, e));
                    continue;
                }
            };
            match ch
                .basic_publish(self.exchange.clone(), key, options, &m.body, props)
                .await
            {
                Ok(confirm) => pending.push((i, confirm)),
                Err(e) => {
                    if error::kills_channel(&e) {
                        self.forget_channel(&ch).await;
                    }
                    failed.push((i, error::map(e)));
                }
            }
        }
        for (i, confirm) in pending {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {
                    if batch[i].has_after_send() {
                        if let Err(e) = batch[i].run_after_send(&Confirmation::Ack(None)) {
                            failed.push((i, e));
                        }
                    }
                }
                Ok(Confirmation::Ack(Some(returned))) => {
                    failed.push((
                        i,
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "message unroutable: exchange {:?} has no queue bound for routing key {:?} ({})",
                                self.exchange.as_str(),
                                returned.delivery.routing_key.as_str(),
                                returned.reply_text.as_str()
                            ),
                        ),
                    ));
                }
                Ok(Confirmation::Nack(_)) => failed.push((
                    i,
                    Error::unavailable("the broker refused the message (publisher nack)"),
                )),
                Ok(Confirmation::NotRequested) => failed.push((
                    i,
                    Error::internal("publisher confirms are off on this channel"),
                )),
                Err(e) => {
                    if error::kills_channel(&e) {
                        self.forget_channel(&ch).await;
                    }
                    failed.push((i, error::map(e)));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Items(failed))
        }
    }

    async fn close(&self) -> Result<()> {
        if let Some(ch) = self.channel.lock().await.take() {
            if ch.status().connected() {
                ch.close(200, "bye".into()).await.map_err(error::map)?;
            }
        }
        Ok(())
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.connector)
    }
}
