//! Subscriptions: the client's streaming pull, with its lease management
//! held to the core's lease keeper.
//!
//! The client keeps the lease of every message it delivered alive (it
//! sends ModifyAckDeadline on its own schedule) until the message is acked,
//! nacked or its handler dropped, and it offers no call to extend one
//! message. So this driver keeps a lease table of its own: each delivery
//! is kept until a time the core moves (`extend_leases` is bookkeeping),
//! and a delivery whose time passes is let go (its handler dropped, which
//! nacks it), as an expired lease would be. The core's lease keeper, its
//! `max_lease_extension` and `Message::extend_lease` therefore behave as on
//! every other backend, and only the client talks to Pub/Sub about leases.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;
use google_cloud_pubsub::client::{Subscriber, SubscriptionAdmin};
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior, ShutdownToken};
use pubsub_core::driver::{
    self, AckId, BatchError, BatchLimits, Capabilities, Nacked, ReceivedMessage, Settlement,
};
use pubsub_core::{Error, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::path::{full_path, Collection};

/// Most messages one receive returns, and the Go CDK's limit for
/// `max_recv_batch_size`.
pub const MAX_RECV_BATCH: usize = 1000;
/// The ack deadline assumed when the subscription's cannot be read.
pub const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(60);
/// Pub/Sub's bounds on an ack deadline.
const MIN_DEADLINE: Duration = Duration::from_secs(10);
const MAX_DEADLINE: Duration = Duration::from_secs(600);
/// The client's cap on holding a message; the core's lease keeper decides.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// How long `close` waits for the client to send its last acks and nacks.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Messages read from the stream and not yet received; past it the pump
/// waits, and the client's flow control holds the service back.
const PUMP_CAPACITY: usize = 1024;

/// How a subscription receives.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// Most messages one receive returns, 1 to 1000 (the URL's
    /// `max_recv_batch_size`).
    pub max_recv_batch_size: usize,
    /// Nack leaves a message to its ack deadline instead of asking for
    /// prompt redelivery (the URL's `nacklazy`), as the Go CDK's option.
    pub nack_lazy: bool,
    /// The ack deadline of deliveries, 10 s to 600 s. `None` (the default)
    /// reads the subscription's at open, falling back to
    /// [`DEFAULT_ACK_DEADLINE`] when it cannot be read (an identity with
    /// only `roles/pubsub.subscriber` may not read it). The streaming pull
    /// asks for this deadline, so it is the deadline that holds.
    pub ack_deadline: Option<Duration>,
    /// Most messages delivered and not yet settled (the client's flow
    /// control); the service stops sending past it.
    pub max_outstanding_messages: i64,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            max_recv_batch_size: MAX_RECV_BATCH,
            nack_lazy: false,
            ack_deadline: None,
            max_outstanding_messages: 1000,
        }
    }
}

type Confirmation = Shared<BoxFuture<'static, std::result::Result<(), Error>>>;

/// One delivery the core has not settled yet.
struct Entry {
    /// Taken when the delivery is settled; dropping it nacks.
    handler: Option<Handler>,
    /// An exactly-once ack in flight, awaited again if the core asks again.
    confirming: Option<Confirmation>,
    keep_until: Instant,
}

#[derive(Default)]
struct Held {
    next: u64,
    entries: HashMap<u64, Entry>,
}

type Pulled =
    std::result::Result<(google_cloud_pubsub::model::Message, Handler), google_cloud_pubsub::Error>;

/// A task that reads the client's stream into a channel.
///
/// The stream's `next` is not cancel-safe while it reopens the streaming
/// pull after a transport error: a `next` dropped then abandons a
/// StreamingPull the service may already have sent messages on, which the
/// client never sees. So one task owns the stream and awaits `next` to the
/// end, and `receive_batch` (which the core may cancel) only reads the
/// channel. The channel holds no more than the client's flow control lets
/// out, and every message in it is leased by the client until handed on.
struct Pump {
    rx: mpsc::Receiver<Pulled>,
    token: ShutdownToken,
    /// An error read after messages a receive returned, for the next one.
    failed: Option<google_cloud_pubsub::Error>,
    task: JoinHandle<()>,
}

impl Pump {
    fn start(mut stream: MessageStream) -> Pump {
        let token = stream.shutdown_token();
        let (tx, rx) = mpsc::channel(PUMP_CAPACITY);
        let task = tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    // Nobody reads any more: dropping the stream nacks what
                    // the client still leases.
                    _ = tx.closed() => return,
                    item = stream.next() => item,
                };
                let Some(item) = item else { return };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    // The client gives an error only once the stream is
                    // done for good.
                    return;
                }
            }
        });
        Pump {
            rx,
            token,
            failed: None,
            task,
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The driver side of a Pub/Sub subscription.
///
/// [`pubsub_core::Subscription::as_raw`] gives its
/// [`google_cloud_pubsub::client::Subscriber`]; [`pubsub_core::Message::as_raw`]
/// gives the received [`google_cloud_pubsub::model::Message`] (its
/// `publish_time` among the rest). The message's handler stays with the
/// driver, so that a message is settled once, through the core.
pub struct GcpSubscription {
    client: Subscriber,
    path: String,
    config: SubscriptionConfig,
    deadline: Duration,
    pump: tokio::sync::Mutex<Option<Pump>>,
    held: Arc<Mutex<Held>>,
    reaper: JoinHandle<()>,
}

impl fmt::Debug for GcpSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpSubscription")
            .field("path", &self.path)
            .field("deadline", &self.deadline)
            .field("config", &self.config)
            .finish()
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

impl GcpSubscription {
    /// A subscription named `projects/P/subscriptions/S` or `P/S`,
    /// receiving through `client`. `admin`, when given and the config
    /// names no deadline, reads the subscription's ack deadline. Fails
    /// with `InvalidArgument` for a name Pub/Sub would refuse; a
    /// subscription that does not exist fails its first receive.
    pub async fn new(
        client: Subscriber,
        admin: Option<&SubscriptionAdmin>,
        name: &str,
        config: SubscriptionConfig,
    ) -> Result<Self> {
        if !(1..=MAX_RECV_BATCH).contains(&config.max_recv_batch_size) {
            return Err(Error::invalid_argument(format!(
                "max_recv_batch_size must be between 1 and {MAX_RECV_BATCH}, not {}",
                config.max_recv_batch_size
            )));
        }
        let path = full_path(name, Collection::Subscriptions)?;
        let deadline = match (config.ack_deadline, admin) {
            (Some(d), _) => d,
            (None, Some(admin)) => subscription_deadline(admin, &path).await,
            (None, None) => DEFAULT_ACK_DEADLINE,
        }
        .clamp(MIN_DEADLINE, MAX_DEADLINE);
        let held = Arc::new(Mutex::new(Held::default()));
        let reaper = tokio::spawn(let_go_expired(Arc::downgrade(&held), deadline));
        Ok(GcpSubscription {
            client,
            path,
            config,
            deadline,
            pump: tokio::sync::Mutex::new(None),
            held,
            reaper,
        })
    }

    /// The subscription's full path, `projects/P/subscriptions/S`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The ack deadline deliveries get.
    pub fn ack_deadline(&self) -> Duration {
        self.deadline
    }

    fn stream(&self) -> MessageStream {
        self.client
            .subscribe(self.path.clone())
            .set_max_lease(FOREVER)
            .set_max_lease_extension(self.deadline)
            .set_max_outstanding_messages(self.config.max_outstanding_messages)
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build()
    }

    fn deliver(
        &self,
        got: Vec<(google_cloud_pubsub::model::Message, Handler)>,
    ) -> Vec<ReceivedMessage> {
        let keep_until = Instant::now() + self.deadline;
        let mut held = lock(&self.held);
        let mut out = Vec::with_capacity(got.len());
        for (m, handler) in got {
            held.next += 1;
            let seq = held.next;
            let attempt = handler
                .delivery_attempt()
                .and_then(|a| u32::try_from(a).ok());
            held.entries.insert(
                seq,
                Entry {
                    handler: Some(handler),
                    confirming: None,
                    keep_until,
                },
            );
            let attributes: BTreeMap<String, String> = m
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut r = ReceivedMessage::new(
                m.data.clone(),
                attributes,
                m.message_id.clone(),
                AckId::from_u64(seq),
            );
            r.ordering_key = (!m.ordering_key.is_empty()).then(|| m.ordering_key.clone());
            r.delivery_attempt = attempt;
            r.raw = Some(Box::new(m));
            out.push(r);
        }
        out
    }
}

/// The subscription's configured ack deadline, or the default when it
/// cannot be read.
async fn subscription_deadline(admin: &SubscriptionAdmin, path: &str) -> Duration {
    match admin.get_subscription().set_subscription(path).send().await {
        Ok(s) if s.ack_deadline_seconds > 0 => Duration::from_secs(s.ack_deadline_seconds as u64),
        Ok(_) => MIN_DEADLINE,
        Err(e) => {
            tracing::debug!(
                subscription = path,
                error = %e,
                "cannot read the subscription's ack deadline; assuming {DEFAULT_ACK_DEADLINE:?}"
            );
            DEFAULT_ACK_DEADLINE
        }
    }
}

/// Lets go of deliveries whose lease the core stopped keeping, a few times
/// a deadline, until the subscription is gone.
async fn let_go_expired(held: Weak<Mutex<Held>>, deadline: Duration) {
    let tick = (deadline / 8).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let Some(held) = held.upgrade() else { return };
        let now = Instant::now();
        let mut expired = Vec::new();
        lock(&held).entries.retain(|_, e| {
            if e.keep_until > now {
                return true;
            }
            expired.extend(e.handler.take());
            false
        });
        if !expired.is_empty() {
            tracing::debug!(deliveries = expired.len(), "leases ran out; letting go");
        }
        // Dropping a handler nacks its message: it is delivered again, as
        // after an expired lease.
        drop(expired);
    }
}

pub(crate) fn capabilities(config: &SubscriptionConfig, deadline: Duration) -> Capabilities {
    let mut c = Capabilities::default();
    c.messaging_system = Some(crate::MESSAGING_SYSTEM);
    c.nack = true;
    c.lease_extension = true;
    c.redelivery_after_deadline = true;
    c.ack_deadline = Some(deadline);
    c.ordering_keys = true;
    c.fan_out = true;
    c.max_message_bytes = Some(crate::topic::MAX_MESSAGE_BYTES);
    // Acks and nacks go to the client, which batches them into
    // Acknowledge and ModifyAckDeadline calls of its own.
    c.local_settlement = true;
    c.ack_batching = BatchLimits::new(1000, 2);
    c.max_receive_batch = config.max_recv_batch_size;
    // One streaming pull a subscription: its messages arrive in one queue.
    c.max_concurrent_receives = 1;
    // The client's handler nacks at once only, so the core holds a delayed
    // nack (the client keeps its lease meanwhile). A lazy nack leaves the
    // message to its deadline anyway: nothing to hold it for.
    if config.nack_lazy {
        c.max_nack_delay = Some(Duration::MAX);
    }
    c
}

#[async_trait]
impl driver::Subscription for GcpSubscription {
    fn driver_name(&self) -> &'static str {
        crate::DRIVER
    }

    fn resource(&self) -> &str {
        &self.path
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.config, self.deadline)
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let mut guard = self.pump.lock().await;
        let pump = guard.get_or_insert_with(|| Pump::start(self.stream()));
        if let Some(e) = pump.failed.take() {
            *guard = None;
            return Err(crate::error::call("receive", e));
        }
        // Cancel-safe: a message the channel holds stays there.
        let first = match pump.rx.recv().await {
            Some(Ok(pair)) => pair,
            Some(Err(e)) => {
                // A stream that failed for good is done; the next receive
                // opens a new one (the subscription may exist by then).
                *guard = None;
                return Err(crate::error::call("receive", e));
            }
            None => {
                *guard = None;
                return Ok(Vec::new());
            }
        };
        let mut got = vec![first];
        while got.len() < max {
            match pump.rx.try_recv() {
                Ok(Ok(pair)) => got.push(pair),
                Ok(Err(e)) => {
                    // Returned by the next receive, after these messages.
                    pump.failed = Some(e);
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    *guard = None;
                    break;
                }
            }
        }
        drop(guard);
        Ok(self.deliver(got))
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        let mut confirmations = Vec::new();
        {
            let mut held = lock(&self.held);
            for seq in ids.iter().filter_map(AckId::as_u64) {
                let Some(entry) = held.entries.get_mut(&seq) else {
                    // Settled or let go already: acking twice is harmless.
                    continue;
                };
                if let Some(c) = &entry.confirming {
                    confirmations.push((seq, c.clone()));
                    continue;
                }
                match entry.handler.take() {
                    Some(Handler::ExactlyOnce(h)) => {
                        let c: Confirmation =
                            async move { h.confirmed_ack().await.map_err(crate::error::ack) }
                                .boxed()
                                .shared();
                        entry.confirming = Some(c.clone());
                        confirmations.push((seq, c));
                    }
                    Some(h) => {
                        h.ack();
                        held.entries.remove(&seq);
                    }
                    None => {
                        held.entries.remove(&seq);
                    }
                }
            }
        }
        if confirmations.is_empty() {
            return Settlement::done(Ok(()));
        }
        // Exactly-once delivery: the ack counts once Pub/Sub confirms it.
        Settlement::later(async move {
            let mut failed = Vec::new();
            for (seq, c) in confirmations {
                let r = c.await;
                lock(&self.held).entries.remove(&seq);
                if let Err(e) = r {
                    if let Some(i) = ids.iter().position(|id| id.as_u64() == Some(seq)) {
                        failed.push((i, e));
                    }
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(BatchError::Items(failed))
            }
        })
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        if self.config.nack_lazy {
            // Left to the deadline: the entry keeps its time and is let go
            // when it passes, as the lease would lapse.
            return Settlement::done(Ok(()));
        }
        let handlers: Vec<Handler> = {
            let mut held = lock(&self.held);
            nacks
                .iter()
                .filter_map(|n| n.ack_id.as_u64())
                .filter_map(|seq| held.entries.remove(&seq))
                .filter_map(|e| e.handler)
                .collect()
        };
        for h in handlers {
            h.nack();
        }
        Settlement::done(Ok(()))
    }

    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        let until = Instant::now() + by;
        let mut held = lock(&self.held);
        for seq in ids.iter().filter_map(AckId::as_u64) {
            if let Some(e) = held.entries.get_mut(&seq) {
                e.keep_until = until;
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let pump = self.pump.lock().await.take();
        if let Some(pump) = pump {
            // Sends the acks the client holds and nacks what it still
            // leases (those the channel holds among them), so those
            // messages come back promptly.
            if tokio::time::timeout(CLOSE_WAIT, pump.token.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(
                    subscription = %self.path,
                    "the client did not finish its last acks within {CLOSE_WAIT:?}"
                );
            }
        }
        self.reaper.abort();
        // Whatever is still held was nacked by the shutdown.
        let rest: Vec<Entry> = lock(&self.held).entries.drain().map(|(_, e)| e).collect();
        drop(rest);
        Ok(())
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.client)
    }
}

impl Drop for GcpSubscription {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}
