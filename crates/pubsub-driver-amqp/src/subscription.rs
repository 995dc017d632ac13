//! A subscription is a queue.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, Channel, Consumer};
use pubsub_core::driver::{
    self, AckId, BatchError, Capabilities, Nacked, ReceivedMessage, Settlement,
};
use pubsub_core::{Error, Result};
use tokio::sync::Mutex;

use crate::connection::{bounded, Connector, BROKER_TIMEOUT};
use crate::{capabilities, error, headers, DRIVER};

/// How long one `receive_batch` waits for a first delivery.
const POLL: Duration = Duration::from_millis(500);

/// The default QoS prefetch count: deliveries the broker may push ahead of
/// acks, and so the most one receive batch can hold.
pub const DEFAULT_PREFETCH: u16 = 512;

/// Options of a queue-backed subscription.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// The channel's QoS prefetch count.
    pub prefetch_count: u16,
    /// Store each delivery's routing key (when not empty) in this
    /// attribute: the counterpart of [`TopicConfig::key_name`](crate::TopicConfig::key_name),
    /// as the Go CDK's `SubscriptionOptions.KeyName`.
    pub key_name: Option<String>,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            prefetch_count: DEFAULT_PREFETCH,
            key_name: None,
        }
    }
}

impl SubscriptionConfig {
    /// Sets the attribute that gets each delivery's routing key.
    pub fn with_key_name(mut self, attr: impl Into<String>) -> Self {
        self.key_name = Some(attr.into());
        self
    }

    /// Sets the prefetch count (at least 1).
    pub fn with_prefetch_count(mut self, n: u16) -> Self {
        self.prefetch_count = n.max(1);
        self
    }
}

/// The RabbitMQ subscription driver: consumes one queue on a channel it
/// reopens (with a new consumer) when the channel or connection dies.
///
/// [`pubsub_core::Subscription::as_raw`] gives the [`Connector`];
/// [`pubsub_core::Message::as_raw`] gives the `lapin::message::Delivery`
/// (its body moved out into the message). Deliveries of a dead channel were
/// requeued by the broker, so acking them is a harmless no-op.
pub struct AmqpSubscription {
    connector: Connector,
    queue: ShortString,
    config: SubscriptionConfig,
    consumer: Mutex<Option<(Channel, Consumer)>>,
}

impl AmqpSubscription {
    /// A subscription consuming `queue`. The queue is not checked until the
    /// first receive, which fails with `NotFound` if it does not exist.
    pub fn new(connector: Connector, queue: &str, config: SubscriptionConfig) -> Result<Self> {
        let queue = ShortString::try_new(queue)
            .map_err(|_| Error::invalid_argument("queue names are at most 255 bytes"))?;
        Ok(AmqpSubscription {
            connector,
            queue,
            config,
            consumer: Mutex::new(None),
        })
    }

    async fn open_consumer(&self) -> Result<(Channel, Consumer)> {
        let ch = self.connector.channel().await?;
        let setup = async {
            ch.basic_qos(self.config.prefetch_count, BasicQosOptions::default())
                .await?;
            ch.basic_consume(
                self.queue.clone(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        };
        match bounded("starting a consumer", setup).await {
            Ok(consumer) => Ok((ch, consumer)),
            Err(e) => {
                // A late answer would register the consumer on this channel
                // with nobody reading it, holding deliveries unacked: close
                // it, in the background since the broker is slow already.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        BROKER_TIMEOUT,
                        ch.close(200, "consumer setup failed".into()),
                    )
                    .await;
                });
                Err(e)
            }
        }
    }

    fn to_message(&self, mut d: Delivery) -> ReceivedMessage {
        let body = Bytes::from(std::mem::take(&mut d.data));
        let mut attributes = headers::from_headers(d.properties.headers().as_ref());
        if let Some(attr) = &self.config.key_name {
            if !d.routing_key.as_str().is_empty() {
                attributes.insert(attr.clone(), d.routing_key.as_str().to_owned());
            }
        }
        let id = match d.properties.message_id() {
            Some(id) => id.as_str().to_owned(),
            None => format!("{}#{}", self.queue.as_str(), d.delivery_tag),
        };
        let mut m = ReceivedMessage::new(body, attributes, id, AckId::new(d.acker.clone()));
        m.raw = Some(Box::new(d));
        m
    }
}

impl fmt::Debug for AmqpSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSubscription")
            .field("queue", &self.queue.as_str())
            .field("server", &self.connector.server())
            .finish()
    }
}

fn ackers<'a>(
    ids: impl Iterator<Item = &'a AckId>,
) -> impl Iterator<Item = (usize, Option<&'a Acker>)> {
    ids.enumerate()
        .map(|(i, id)| (i, id.downcast_ref::<Acker>()))
}

/// Runs one ack-like call per delivery concurrently and collects failures.
/// An acker whose channel is gone reports success without sending: the
/// broker already requeued that delivery.
async fn settle<'a, F, Fut>(ids: impl Iterator<Item = &'a AckId>, f: F) -> Result<(), BatchError>
where
    F: Fn(&'a Acker) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<bool>> + 'a,
{
    let mut failed = Vec::new();
    let mut calls = Vec::with_capacity(ids.size_hint().0);
    let mut n = 0;
    for (i, acker) in ackers(ids) {
        n = i + 1;
        match acker {
            Some(a) => calls.push(f(a).map(move |r| (i, r))),
            None => failed.push((i, Error::invalid_argument("not an AMQP delivery"))),
        }
    }
    // Bounded: a broker that stops answering without closing the
    // connection would otherwise hold acks, and the shutdown that flushes
    // them, for ever. A timed-out item is retried, or its delivery comes
    // back when the connection drops.
    match tokio::time::timeout(BROKER_TIMEOUT, futures_util::future::join_all(calls)).await {
        Ok(results) => {
            for (i, r) in results {
                if let Err(e) = r {
                    failed.push((i, error::map(e)));
                }
            }
        }
        Err(_) => {
            let e = crate::connection::timed_out("settling deliveries");
            let already: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
            failed.extend(
                (0..n)
                    .filter(|i| !already.contains(i))
                    .map(|i| (i, e.clone())),
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BatchError::Items(failed))
    }
}

#[async_trait]
impl driver::Subscription for AmqpSubscription {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        self.queue.as_str()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.config.prefetch_count)
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let mut slot = self.consumer.lock().await;
        let alive = slot.as_ref().is_some_and(|(ch, _)| ch.status().connected());
        if !alive {
            *slot = Some(self.open_consumer().await?);
        }
        let (_, consumer) = slot.as_mut().expect("opened above");
        let first = match tokio::time::timeout(POLL, consumer.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(next) => next,
        };
        let mut out = Vec::with_capacity(max.min(64));
        let mut end = None;
        match first {
            Some(Ok(d)) => out.push(self.to_message(d)),
            Some(Err(e)) => end = Some(e),
            None => {}
        }
        // Take what has already arrived, without waiting: every await above
        // happens before any delivery is taken, so a dropped call loses none.
        while end.is_none() && out.len() < max && !out.is_empty() {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => out.push(self.to_message(d)),
                Some(Some(Err(e))) => end = Some(e),
                Some(None) | None => break,
            }
        }
        if out.is_empty() {
            *slot = None;
            return Err(match end {
                Some(e) => error::map(e),
                None => Error::unavailable("the RabbitMQ consumer was cancelled")
                    .with_context("driver", DRIVER),
            });
        }
        if end.is_some() {
            // Hand out what arrived; the next call reopens.
            *slot = None;
        }
        Ok(out)
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        Settlement::later(settle(ids.iter(), |a| a.ack(BasicAckOptions::default())))
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        Settlement::later(settle(nacks.iter().map(|n| &n.ack_id), |a| {
            a.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
        }))
    }

    async fn close(&self) -> Result<()> {
        if let Some((ch, _)) = self.consumer.lock().await.take() {
            if ch.status().connected() {
                // Closing the channel requeues whatever it still holds. A
                // broker that does not answer in time is left to requeue
                // them when the connection drops.
                match tokio::time::timeout(BROKER_TIMEOUT, ch.close(200, "bye".into())).await {
                    Ok(r) => r.map_err(error::map)?,
                    Err(_) => tracing::warn!(
                        queue = self.queue.as_str(),
                        "RabbitMQ did not confirm closing the consumer's channel in time"
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
