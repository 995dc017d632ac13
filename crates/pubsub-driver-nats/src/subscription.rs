//! A subscription is a durable pull consumer.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::pull::{self, Stream as Pull};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_nats::Subject;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use pubsub_core::driver::{
    self, AckId, BatchError, Capabilities, Deliveries, Nacked, ReceivedMessage, Settlement,
};
use pubsub_core::{Error, ErrorKind, Result};
use tokio::sync::Mutex;

use crate::{error, headers, subscription_capabilities, DRIVER};

/// How long one `receive_batch` waits for a first message.
const POLL: Duration = Duration::from_millis(500);

/// The default number of messages the client pulls ahead, and so the most
/// one receive batch holds.
pub const DEFAULT_BATCH: usize = 256;

/// JetStream's default `ack_wait`, assumed for a consumer that does not
/// exist yet when the subscription is opened.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Options of a consumer-backed subscription.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// Messages the client pulls ahead of the application. Each counts
    /// against the consumer's `max_ack_pending` and its `ack_wait` runs from
    /// when the server sent it, so keep it well under what the application
    /// handles in one `ack_wait`.
    pub batch: usize,
    /// How long JetStream waits before redelivering a nacked message whose
    /// nack carries no delay of its own. The core's
    /// [`NackBackoff`](pubsub_core::NackBackoff) (on by default) gives each
    /// nack its delay, and this applies only where it gives none
    /// ([`NackBackoff::none`](pubsub_core::NackBackoff::none), or
    /// `Message::nack_with_delay(Duration::ZERO)`). `None` redelivers those at
    /// once.
    pub nack_delay: Option<Duration>,
    /// Create the durable consumer with this configuration if it does not
    /// exist (its `durable_name` is set to the subscription's consumer
    /// name). Without it, a missing consumer is `NotFound`.
    pub create: Option<pull::Config>,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            batch: DEFAULT_BATCH,
            nack_delay: None,
            create: None,
        }
    }
}

impl SubscriptionConfig {
    /// Sets how many messages the client pulls ahead (at least 1).
    pub fn with_batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Sets the redelivery delay of nacked messages.
    pub fn with_nack_delay(mut self, delay: Duration) -> Self {
        self.nack_delay = Some(delay);
        self
    }

    /// Creates the consumer with `config` if it is missing.
    pub fn with_create(mut self, config: pull::Config) -> Self {
        self.create = Some(config);
        self
    }
}

/// The NATS JetStream subscription driver: pulls from one durable pull
/// consumer of one stream.
///
/// [`pubsub_core::Subscription::as_raw`] gives the
/// `async_nats::jetstream::Context`; [`pubsub_core::Message::as_raw`] the
/// `async_nats::jetstream::Message` as delivered.
pub struct NatsSubscription {
    js: jetstream::Context,
    client: async_nats::Client,
    stream: String,
    consumer: String,
    resource: String,
    config: SubscriptionConfig,
    ack_wait: Duration,
    pull: Mutex<Option<Pull>>,
    /// Stops the tasks that keep long lease extensions alive.
    closed: Arc<AtomicBool>,
}

impl NatsSubscription {
    /// A subscription on the durable pull consumer `consumer` of `stream`.
    ///
    /// Asks JetStream for the consumer's `ack_wait`, which becomes the ack
    /// deadline the core's lease keeper works to. A consumer that does not
    /// exist yet is not an error here: the first receive fails with
    /// `NotFound` (or creates it, with [`SubscriptionConfig::create`]).
    pub async fn new(
        js: jetstream::Context,
        stream: &str,
        consumer: &str,
        config: SubscriptionConfig,
    ) -> Result<Self> {
        for (what, name) in [("stream", stream), ("consumer", consumer)] {
            if name.is_empty() || name.contains(['.', '*', '>', ' ', '\t', '/', '\\']) {
                return Err(Error::invalid_argument(format!(
                    "{name:?} is not a valid JetStream {what} name"
                )));
            }
        }
        let ack_wait = match js
            .get_consumer_from_stream::<pull::Config, _, _>(consumer, stream)
            .await
        {
            Ok(c) => c.cached_info().config.ack_wait,
            Err(e) => {
                let e = error::consumer(e);
                if e.kind() != ErrorKind::NotFound {
                    return Err(e);
                }
                config
                    .create
                    .as_ref()
                    .map(|c| c.ack_wait)
                    .filter(|w| !w.is_zero())
                    .unwrap_or(DEFAULT_ACK_WAIT)
            }
        };
        Ok(NatsSubscription {
            client: js.client(),
            js,
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            resource: format!("{stream}/{consumer}"),
            config,
            ack_wait,
            pull: Mutex::new(None),
            closed: Arc::default(),
        })
    }

    /// The consumer's `ack_wait` the subscription works to.
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    async fn bind(&self) -> Result<Pull> {
        let consumer: PullConsumer = match self
            .js
            .get_consumer_from_stream(&self.consumer, &self.stream)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let e = error::consumer(e);
                match (&self.config.create, e.kind()) {
                    (Some(create), ErrorKind::NotFound) => self.create(create.clone()).await?,
                    _ => return Err(e),
                }
            }
        };
        let ack_wait = consumer.cached_info().config.ack_wait;
        if ack_wait < self.ack_wait {
            return Err(Error::failed_precondition(format!(
                "consumer {} has ack_wait {ack_wait:?}, shorter than the {:?} this \
                 subscription was opened with; open it again",
                self.resource, self.ack_wait
            ))
            .with_context("driver", DRIVER));
        }
        consumer
            .stream()
            .max_messages_per_batch(self.config.batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(error::stream)
    }

    async fn create(&self, mut config: pull::Config) -> Result<PullConsumer> {
        config.durable_name = Some(self.consumer.clone());
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| error::create(e.into()))?;
        stream
            .get_or_create_consumer(&self.consumer, config)
            .await
            .map_err(|e| error::create(e.into()))
    }

    /// The message keeps the JetStream message as its ack id (one shared
    /// allocation); its id and raw form are built from it only if the
    /// application asks (see [`Lazy`]).
    fn to_message(&self, m: jetstream::Message) -> Result<ReceivedMessage> {
        if m.message.reply.is_none() {
            return Err(Error::internal(
                "a JetStream message without a reply subject",
            ));
        }
        let delivered = m.info().ok().and_then(|i| u32::try_from(i.delivered).ok());
        let body: Bytes = m.message.payload.clone();
        let attributes = headers::from_headers(m.message.headers.as_ref());
        let mut r = ReceivedMessage::describe_lazily(body, attributes, AckId::new(m), (0, 0));
        r.delivery_attempt = delivered;
        Ok(r)
    }

    /// Publishes one acknowledgement message a delivery: JetStream's acks
    /// are plain messages to the delivery's reply subject, which the client
    /// writes out with whatever else it has queued.
    async fn reply_all<'a>(
        &'a self,
        ids: impl Iterator<Item = &'a AckId>,
        kind: AckKind,
    ) -> Result<(), BatchError> {
        let payload = Bytes::from(kind);
        self.reply_each(ids.map(|id| (id, payload.clone()))).await
    }

    /// Publishes each payload to its delivery's reply subject.
    async fn reply_each<'a>(
        &'a self,
        replies: impl Iterator<Item = (&'a AckId, Bytes)>,
    ) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        for (i, (id, payload)) in replies.enumerate() {
            let Some(reply) = reply_of(id) else {
                failed.push((i, Error::invalid_argument("not a JetStream delivery")));
                continue;
            };
            if let Err(e) = self.client.publish(reply.clone(), payload).await {
                failed.push((i, error::client_publish(e)));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Items(failed))
        }
    }
}

/// The reply subject acks go to, of a delivery this driver returned.
fn reply_of(id: &AckId) -> Option<&Subject> {
    id.downcast_ref::<jetstream::Message>()?
        .message
        .reply
        .as_ref()
}

/// Builds a delivery's id and raw form from the JetStream message its ack
/// id holds, when asked: a receive that nobody asks about allocates
/// neither the id string nor the box.
struct Lazy;

impl Deliveries for Lazy {
    fn describe_id(&self, ack_id: &AckId, _at: (i64, i64)) -> String {
        let Some(m) = ack_id.downcast_ref::<jetstream::Message>() else {
            return String::new();
        };
        // The publisher's id where it gave one, else the stream position.
        match m
            .message
            .headers
            .as_ref()
            .and_then(|h| h.get(NATS_MESSAGE_ID))
        {
            Some(v) => v.as_str().to_owned(),
            None => m
                .info()
                .map(|i| format!("{}:{}", i.stream, i.stream_sequence))
                .unwrap_or_default(),
        }
    }

    fn describe_raw(
        &self,
        ack_id: &AckId,
        _at: (i64, i64),
        _ordering_key: Option<&str>,
    ) -> Option<Box<dyn Any + Send + Sync>> {
        let m = ack_id.downcast_ref::<jetstream::Message>()?;
        Some(Box::new(m.clone()))
    }
}

impl fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .field("ack_wait", &self.ack_wait)
            .finish()
    }
}

#[async_trait]
impl driver::Subscription for NatsSubscription {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.resource
    }

    fn capabilities(&self) -> Capabilities {
        subscription_capabilities(self.ack_wait, self.config.batch)
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let mut slot = self.pull.lock().await;
        if slot.is_none() {
            *slot = Some(self.bind().await?);
        }
        let pull = slot.as_mut().expect("bound above");
        let first = match tokio::time::timeout(POLL, pull.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(next) => next,
        };
        let mut out = Vec::with_capacity(max.min(64));
        let mut end = None;
        match first {
            Some(Ok(m)) => out.push(self.to_message(m)?),
            Some(Err(e)) => end = Some(error::messages(e)),
            None => end = Some(Error::unavailable("the pull stream ended")),
        }
        // Take what has already arrived, without waiting: every await above
        // happens before any message is taken, so a dropped call loses none.
        while end.is_none() && out.len() < max {
            match pull.next().now_or_never() {
                Some(Some(Ok(m))) => out.push(self.to_message(m)?),
                Some(Some(Err(e))) => end = Some(error::messages(e)),
                Some(None) => end = Some(Error::unavailable("the pull stream ended")),
                None => break,
            }
        }
        if let Some(e) = end {
            // Pull again from scratch on the next call; hand out what came.
            *slot = None;
            if out.is_empty() {
                return Err(e.with_context("driver", DRIVER));
            }
        }
        Ok(out)
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        Settlement::later(self.reply_all(ids.iter(), AckKind::Ack))
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        let configured = self.config.nack_delay;
        Settlement::later(self.reply_each(nacks.iter().map(move |n| {
            let delay = Some(n.delay).filter(|d| !d.is_zero()).or(configured);
            (&n.ack_id, Bytes::from(AckKind::Nak(delay)))
        })))
    }

    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        // `+WPI` restarts the delivery's ack_wait; JetStream has no other
        // length to ask for. A longer extension is kept by sending it again
        // every half ack_wait until `by` is covered (or the subscription
        // closes): harmless for a delivery acked meanwhile.
        self.reply_all(ids.iter(), AckKind::Progress).await?;
        if by > self.ack_wait {
            let replies: Vec<Subject> = ids.iter().filter_map(|id| reply_of(id).cloned()).collect();
            let (client, closed, ack_wait) =
                (self.client.clone(), self.closed.clone(), self.ack_wait);
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let mut covered = ack_wait;
                while covered < by {
                    tokio::time::sleep_until(start + covered - ack_wait / 2).await;
                    if closed.load(Ordering::Acquire) {
                        return;
                    }
                    for reply in &replies {
                        let _ = client
                            .publish(reply.clone(), Bytes::from(AckKind::Progress))
                            .await;
                    }
                    covered += ack_wait / 2;
                }
            });
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.pull.lock().await.take();
        // Acks are queued in the client; write them out before returning.
        match tokio::time::timeout(Duration::from_secs(10), self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::unavailable("flushing acks to NATS failed")
                .with_context("driver", DRIVER)
                .with_source(e)),
            Err(_) => Err(Error::new(
                ErrorKind::DeadlineExceeded,
                "flushing acks to NATS took over 10 s",
            )
            .with_context("driver", DRIVER)),
        }
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.js)
    }

    fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
        Some(Arc::new(Lazy))
    }
}
