//! A subscription is an SQS queue, fed by an SNS topic or sent to directly.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName,
};
use bytes::Bytes;
use pubsub_core::driver::{
    self, AckId, BatchError, BatchLimits, Capabilities, Nacked, ReceivedMessage, Settlement,
};
use pubsub_core::{Error, Result};

use crate::encode;
use crate::{error, names, DRIVER};

/// Most messages one ReceiveMessage call returns.
pub const MAX_RECEIVE: usize = 10;

/// How long a receive waits for messages by default (SQS long polling).
/// Long enough that an idle subscription costs a call every couple of
/// seconds; short enough that a receive still running when the
/// subscription shuts down holds few messages back (they come back after
/// the visibility timeout).
pub const DEFAULT_WAIT_TIME: Duration = Duration::from_secs(2);

/// The visibility timeout assumed when the queue's cannot be read at
/// open: SQS's default.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest visibility timeout SQS takes.
pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// How long an empty short poll (wait time 0) waits before the core asks
/// again, as the Go CDK does.
const EMPTY_POLL_PAUSE: Duration = Duration::from_millis(250);

/// Options of a queue-backed subscription.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// Bodies are taken as sent, never unwrapped from an SNS envelope: for
    /// queues sent to directly, or subscribed with raw message delivery.
    /// Without it, a body is unwrapped only when it is an SNS notification
    /// (see [`crate::encode::unwrap_notification`]).
    pub raw: bool,
    /// Unwrap only notifications from this SNS topic.
    pub sns_topic_arn: Option<String>,
    /// Nack does nothing; the message comes back after its visibility
    /// timeout.
    pub nack_lazy: bool,
    /// How long a nacked message stays invisible when its nack carries no
    /// delay of its own (0: redelivered at once). The core's
    /// [`NackBackoff`](pubsub_core::NackBackoff), on by default, gives each
    /// nack its delay, which then sets the visibility timeout; this applies
    /// only where it gives none.
    pub nack_delay: Duration,
    /// ReceiveMessage's wait time (0–20 s).
    pub wait_time: Duration,
    /// The queue's visibility timeout, the ack deadline the core's lease
    /// keeper works to; `None` reads it from the queue at open.
    pub visibility_timeout: Option<Duration>,
    /// Most ReceiveMessage calls in flight at once (at least 1; default
    /// [`DEFAULT_RECEIVE_CONCURRENCY`]): the core asks for more at once when
    /// the application keeps up and the batches come back full.
    pub receive_concurrency: usize,
}

/// How many ReceiveMessage calls a subscription makes at once by default.
pub const DEFAULT_RECEIVE_CONCURRENCY: usize = 16;

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            raw: false,
            sns_topic_arn: None,
            nack_lazy: false,
            nack_delay: Duration::ZERO,
            wait_time: DEFAULT_WAIT_TIME,
            visibility_timeout: None,
            receive_concurrency: DEFAULT_RECEIVE_CONCURRENCY,
        }
    }
}

impl SubscriptionConfig {
    /// Sets raw mode.
    pub fn with_raw(mut self, raw: bool) -> Self {
        self.raw = raw;
        self
    }

    /// Sets the SNS topic whose notifications are unwrapped.
    pub fn with_sns_topic_arn(mut self, arn: impl Into<String>) -> Self {
        self.sns_topic_arn = Some(arn.into());
        self
    }

    /// Sets lazy nacks.
    pub fn with_nack_lazy(mut self, lazy: bool) -> Self {
        self.nack_lazy = lazy;
        self
    }

    /// Sets how long a nacked message stays invisible.
    pub fn with_nack_delay(mut self, delay: Duration) -> Self {
        self.nack_delay = delay;
        self
    }

    /// Sets the receive wait time (at most 20 s).
    pub fn with_wait_time(mut self, wait: Duration) -> Self {
        self.wait_time = wait;
        self
    }

    /// Sets how many ReceiveMessage calls may be in flight at once.
    pub fn with_receive_concurrency(mut self, n: usize) -> Self {
        self.receive_concurrency = n.max(1);
        self
    }

    /// Sets the visibility timeout instead of reading the queue's.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }
}

struct Shared {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    config: SubscriptionConfig,
    /// Messages of receive calls whose caller went away: handed out first
    /// by the next receive, so a receive cut short loses nothing.
    leftover: Mutex<VecDeque<ReceivedMessage>>,
}

/// The SQS subscription driver: ReceiveMessage with long polling, acks as
/// DeleteMessageBatch, nacks and lease extensions as
/// ChangeMessageVisibilityBatch.
///
/// Each ReceiveMessage runs in a task of its own, so when the core drops a
/// receive (a cancelled `receive`, a shutdown) the call still completes and
/// its messages go to the next receive instead of waiting out their
/// visibility timeout.
///
/// [`pubsub_core::Subscription::as_raw`] gives the `aws_sdk_sqs::Client`;
/// [`pubsub_core::Message::as_raw`] the `aws_sdk_sqs::types::Message`, its
/// body moved out into the message.
pub struct AwsSubscription {
    shared: Arc<Shared>,
    fifo: bool,
    visibility: Duration,
}

impl fmt::Debug for AwsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSubscription")
            .field("queue_url", &self.shared.queue_url)
            .field("visibility", &self.visibility)
            .finish()
    }
}

fn whole_seconds(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX)
}

impl AwsSubscription {
    /// A subscription on the queue at `queue_url`. Reads the queue's
    /// visibility timeout unless the config gives one; a queue that cannot
    /// be read is assumed to have [`DEFAULT_VISIBILITY_TIMEOUT`], and a
    /// missing one is `NotFound` on the first receive.
    pub async fn new(
        client: aws_sdk_sqs::Client,
        queue_url: &str,
        config: SubscriptionConfig,
    ) -> Result<Self> {
        let name = names::sqs_queue_name(queue_url)?;
        if config.wait_time > Duration::from_secs(20) {
            return Err(Error::invalid_argument(format!(
                "SQS waits at most 20 s for messages, not {:?}",
                config.wait_time
            )));
        }
        if config.nack_delay > MAX_VISIBILITY_TIMEOUT {
            return Err(Error::invalid_argument("nack delay is at most 12 hours"));
        }
        let visibility = match config.visibility_timeout {
            Some(v) => v,
            None => read_visibility(&client, queue_url)
                .await
                .unwrap_or(DEFAULT_VISIBILITY_TIMEOUT),
        };
        Ok(AwsSubscription {
            shared: Arc::new(Shared {
                client,
                queue_url: queue_url.to_owned(),
                config,
                leftover: Mutex::new(VecDeque::new()),
            }),
            fifo: name.ends_with(".fifo"),
            visibility,
        })
    }

    fn leftover(&self) -> std::sync::MutexGuard<'_, VecDeque<ReceivedMessage>> {
        self.shared
            .leftover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn change_visibility(
        &self,
        what: &str,
        ids: &[&AckId],
        timeout: Duration,
    ) -> Result<(), BatchError> {
        let s = &self.shared;
        let secs = whole_seconds(timeout.min(MAX_VISIBILITY_TIMEOUT));
        let mut failed = Vec::new();
        let entries = entries(ids.iter().copied(), &mut failed, |i, handle| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .visibility_timeout(secs)
                .build()
        });
        if !entries.is_empty() {
            let what = format!("{what} on {}", s.queue_url);
            let out = s
                .client
                .change_message_visibility_batch()
                .queue_url(&s.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| error::call(&what, e))?;
            failures(&what, out.failed(), &mut failed);
        }
        settled(failed)
    }

    async fn delete(&self, ids: &[AckId]) -> Result<(), BatchError> {
        let s = &self.shared;
        let mut failed = Vec::new();
        let entries = entries(ids.iter(), &mut failed, |i, handle| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .build()
        });
        if !entries.is_empty() {
            let what = format!("DeleteMessageBatch on {}", s.queue_url);
            let out = s
                .client
                .delete_message_batch()
                .queue_url(&s.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| error::call(&what, e))?;
            failures(&what, out.failed(), &mut failed);
        }
        settled(failed)
    }
}

/// An entry for each delivery, named by its index; a delivery that is not
/// an SQS one (or whose entry cannot be built) fails on its own.
fn entries<'a, E>(
    ids: impl Iterator<Item = &'a AckId>,
    failed: &mut Vec<(usize, Error)>,
    entry: impl Fn(usize, &str) -> Result<E, aws_sdk_sqs::error::BuildError>,
) -> Vec<E> {
    let mut out = Vec::new();
    for (i, id) in ids.enumerate() {
        let Some(handle) = id.downcast_ref::<String>() else {
            failed.push((i, Error::invalid_argument("not an SQS delivery")));
            continue;
        };
        match entry(i, handle) {
            Ok(e) => out.push(e),
            Err(e) => failed.push((
                i,
                Error::internal(format!("could not build the request entry: {e}")),
            )),
        }
    }
    out
}

/// The failed entries of a settling call, but for deliveries no longer the
/// subscriber's (acked, expired, received again), which need nothing more.
fn failures(
    what: &str,
    entries: &[aws_sdk_sqs::types::BatchResultErrorEntry],
    failed: &mut Vec<(usize, Error)>,
) {
    for f in entries {
        if gone(f.code()) {
            continue;
        }
        if let Ok(i) = f.id().parse::<usize>() {
            failed.push((
                i,
                error::entry(what, f.code(), f.message(), f.sender_fault()),
            ));
        }
    }
}

fn settled(failed: Vec<(usize, Error)>) -> Result<(), BatchError> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BatchError::Items(failed))
    }
}

/// Whether a failed entry's code says the delivery is no longer the
/// subscriber's, so settling it is moot.
fn gone(code: &str) -> bool {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    matches!(code, "ReceiptHandleIsInvalid" | "MessageNotInflight")
}

async fn read_visibility(client: &aws_sdk_sqs::Client, queue_url: &str) -> Option<Duration> {
    let out = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .send()
        .await
        .ok()?;
    let secs: u64 = out
        .attributes()?
        .get(&QueueAttributeName::VisibilityTimeout)?
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

impl Shared {
    async fn receive(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max.clamp(1, MAX_RECEIVE) as i32)
            .wait_time_seconds(whole_seconds(self.config.wait_time))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| error::call(&format!("ReceiveMessage on {}", self.queue_url), e))?;
        let messages = out.messages.unwrap_or_default();
        Ok(messages
            .into_iter()
            .filter_map(|m| self.to_message(m))
            .collect())
    }

    fn to_message(&self, mut m: aws_sdk_sqs::types::Message) -> Option<ReceivedMessage> {
        let handle = m.receipt_handle.clone()?;
        let body = m.body.take().unwrap_or_default();
        let attributes: BTreeMap<String, String> = m
            .message_attributes
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.string_value().unwrap_or_default().to_owned()))
            .collect();
        // As the Go CDK: top-level attributes mean a raw message (an SNS
        // envelope carries its attributes inside).
        let (body, attributes) = if self.config.raw || !attributes.is_empty() {
            (body, attributes)
        } else {
            match encode::unwrap_notification(&body, self.config.sns_topic_arn.as_deref()) {
                Some(unwrapped) => unwrapped,
                None => (body, attributes),
            }
        };
        let (body, attributes) = encode::decode(body, attributes);
        let system = m.attributes.as_ref();
        let attempt = system
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|n| n.parse().ok());
        let group = system
            .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
            .cloned();
        let id = m.message_id.clone().unwrap_or_else(|| handle.clone());
        let mut r = ReceivedMessage::new(Bytes::from(body), attributes, id, AckId::new(handle));
        r.delivery_attempt = attempt;
        r.ordering_key = group;
        r.raw = Some(Box::new(m));
        Some(r)
    }
}

#[async_trait]
impl driver::Subscription for AwsSubscription {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.shared.queue_url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.messaging_system = Some("aws_sqs");
        c.nack = true;
        c.lease_extension = true;
        c.redelivery_after_deadline = true;
        c.ack_deadline = Some(self.visibility);
        // A nack's delay is the visibility timeout it sets.
        c.max_nack_delay = Some(MAX_VISIBILITY_TIMEOUT);
        c.ordering_keys = self.fifo;
        c.max_message_bytes = Some(crate::MAX_MESSAGE_BYTES);
        c.max_attributes = Some(encode::MAX_ATTRIBUTES);
        c.empty_body = false;
        c.empty_attribute_values = false;
        c.ack_batching = BatchLimits::new(crate::MAX_BATCH_ENTRIES, 16);
        c.max_receive_batch = MAX_RECEIVE;
        c.max_concurrent_receives = self.shared.config.receive_concurrency.max(1);
        c
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        {
            let mut left = self.leftover();
            if !left.is_empty() {
                let n = max.min(left.len());
                return Ok(left.drain(..n).collect());
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let got = shared.receive(max).await;
            if let Err(Ok(messages)) = tx.send(got) {
                // The caller went away: keep the messages for the next.
                shared
                    .leftover
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(messages);
            }
        });
        let got = rx
            .await
            .unwrap_or_else(|_| Err(Error::internal("the receive task ended without a result")))?;
        if got.is_empty() && self.shared.config.wait_time.is_zero() {
            tokio::time::sleep(EMPTY_POLL_PAUSE).await;
        }
        Ok(got)
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        Settlement::later(self.delete(ids))
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        if self.shared.config.nack_lazy {
            return Settlement::done(Ok(()));
        }
        Settlement::later(async move {
            // One request a visibility timeout: nacks of one batch mostly
            // share their delay, which comes from the delivery attempt.
            let configured = self.shared.config.nack_delay;
            let mut by_delay: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
            for (i, n) in nacks.iter().enumerate() {
                let delay = if n.delay.is_zero() {
                    configured
                } else {
                    n.delay
                };
                by_delay.entry(whole_seconds(delay)).or_default().push(i);
            }
            let mut failed = Vec::new();
            for (secs, at) in &by_delay {
                let ids: Vec<&AckId> = at.iter().map(|&i| &nacks[i].ack_id).collect();
                let delay = Duration::from_secs(u64::try_from(*secs).unwrap_or(0));
                match self
                    .change_visibility("ChangeMessageVisibilityBatch (nack)", &ids, delay)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if by_delay.len() == 1 => return Err(e),
                    Err(BatchError::All(e)) => failed.extend(at.iter().map(|&i| (i, e.clone()))),
                    Err(BatchError::Items(v)) => {
                        failed.extend(v.into_iter().map(|(j, e)| (at[j], e)));
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

    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        let ids: Vec<&AckId> = ids.iter().collect();
        self.change_visibility("ChangeMessageVisibilityBatch", &ids, by)
            .await
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.shared.client)
    }
}
