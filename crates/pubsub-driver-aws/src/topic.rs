//! A topic is an SNS topic (PublishBatch) or an SQS queue sent to directly
//! (SendMessageBatch).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use futures_util::future::join_all;
use pubsub_core::driver::{self, BatchError, BatchLimits, Capabilities, OutgoingMessage, Sent};
use pubsub_core::{Error, Result};

use crate::encode::{self, BodyEncoding, Encoded};
use crate::{error, names, DRIVER};

/// Largest message SNS takes, and the size this driver holds SQS to as
/// well (SNS delivers to SQS, and SQS's own limit was this until 2025):
/// the body as sent plus every attribute's name, type and value.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Most bytes in one PublishBatch or SendMessageBatch request.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Most entries in one batch request.
pub const MAX_BATCH_ENTRIES: usize = 10;

/// The attribute the Go CDK reads a message's FIFO group from when it has
/// no ordering key.
pub const GROUP_ATTRIBUTE: &str = "MessageGroupId";

/// The attribute the Go CDK reads a message's FIFO deduplication id from.
pub const DEDUPLICATION_ATTRIBUTE: &str = "DeduplicationId";

/// Where a FIFO message's deduplication id comes from, when it has no
/// [`DEDUPLICATION_ATTRIBUTE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deduplication {
    /// The message's own id, the same on every attempt the core makes, so
    /// a resend after a lost response is dropped by SQS or SNS (within
    /// their five-minute window). The default.
    #[default]
    PerMessage,
    /// None: the queue or topic deduplicates by content
    /// (`ContentBasedDeduplication`), which it must have on.
    ContentBased,
}

/// Options of a topic.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct TopicConfig {
    /// When bodies are base64-encoded.
    pub body_encoding: BodyEncoding,
    /// How FIFO messages are deduplicated.
    pub deduplication: Deduplication,
}

impl TopicConfig {
    /// Sets when bodies are base64-encoded.
    pub fn with_body_encoding(mut self, how: BodyEncoding) -> Self {
        self.body_encoding = how;
        self
    }

    /// Sets how FIFO messages are deduplicated.
    pub fn with_deduplication(mut self, how: Deduplication) -> Self {
        self.deduplication = how;
        self
    }
}

enum Target {
    Sns {
        client: aws_sdk_sns::Client,
        arn: String,
    },
    Sqs {
        client: aws_sdk_sqs::Client,
        queue_url: String,
    },
}

/// The topic driver: sends each batch the core hands over as PublishBatch
/// (SNS) or SendMessageBatch (SQS) requests of up to ten entries and
/// [`MAX_REQUEST_BYTES`], concurrently, and reports each failed entry for
/// its own message.
///
/// [`pubsub_core::Topic::as_raw`] gives the `aws_sdk_sns::Client` or
/// `aws_sdk_sqs::Client`. A before-send hook gets the
/// `&mut aws_sdk_sns::types::PublishBatchRequestEntry` or
/// `&mut aws_sdk_sqs::types::SendMessageBatchRequestEntry`; an after-send
/// hook the `PublishBatchResultEntry` or `SendMessageBatchResultEntry` as
/// [`Sent::raw`], and its `MessageId` as [`Sent::id`]. An SQS queue's id is
/// the one its receivers see; an SNS topic's is SNS's own, and each queue
/// subscribed to the topic gives its copy an id of its own.
pub struct AwsTopic {
    target: Target,
    resource: String,
    config: TopicConfig,
    fifo: bool,
}

impl fmt::Debug for AwsTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsTopic")
            .field("resource", &self.resource)
            .field("fifo", &self.fifo)
            .finish()
    }
}

/// One message of a batch, encoded and checked.
struct Prepared {
    index: usize,
    encoded: Encoded,
    group: Option<String>,
    dedup: Option<String>,
}

impl AwsTopic {
    /// A topic publishing to the SNS topic `arn`. The ARN's form is checked
    /// now; whether the topic exists, on the first send (`NotFound`).
    pub fn sns(client: aws_sdk_sns::Client, arn: &str, config: TopicConfig) -> Result<Self> {
        let name = names::sns_topic_name(arn)?;
        Ok(AwsTopic {
            fifo: name.ends_with(".fifo"),
            target: Target::Sns {
                client,
                arn: arn.to_owned(),
            },
            resource: arn.to_owned(),
            config,
        })
    }

    /// A topic sending straight to the SQS queue at `queue_url`.
    pub fn sqs(client: aws_sdk_sqs::Client, queue_url: &str, config: TopicConfig) -> Result<Self> {
        let name = names::sqs_queue_name(queue_url)?;
        Ok(AwsTopic {
            fifo: name.ends_with(".fifo"),
            target: Target::Sqs {
                client,
                queue_url: queue_url.to_owned(),
            },
            resource: queue_url.to_owned(),
            config,
        })
    }

    fn prepare(&self, index: usize, m: &OutgoingMessage) -> Result<Prepared> {
        let encoded = encode::encode(&m.body, &m.attributes, self.config.body_encoding)?;
        let size = encoded.size();
        if size > MAX_MESSAGE_BYTES {
            return Err(Error::invalid_argument(format!(
                "message of {size} bytes as SQS and SNS count it (body as sent and attributes) \
                 exceeds their limit of {MAX_MESSAGE_BYTES}"
            )));
        }
        if encoded.body.is_empty() {
            return Err(Error::invalid_argument(
                "SQS and SNS need a message body of at least one character",
            ));
        }
        let (mut group, mut dedup) = (None, None);
        if self.fifo {
            group = m
                .ordering_key
                .clone()
                .or_else(|| m.attributes.get(GROUP_ATTRIBUTE).cloned());
            if group.is_none() {
                return Err(Error::invalid_argument(
                    "a FIFO queue or topic needs each message to have an ordering key (its \
                     MessageGroupId) or a MessageGroupId attribute",
                ));
            }
            dedup = match (
                m.attributes.get(DEDUPLICATION_ATTRIBUTE),
                self.config.deduplication,
            ) {
                (Some(d), _) => Some(d.clone()),
                (None, Deduplication::PerMessage) => Some(m.unique_id_hex()),
                (None, Deduplication::ContentBased) => None,
            };
        }
        Ok(Prepared {
            index,
            encoded,
            group,
            dedup,
        })
    }

    /// Splits prepared messages into requests within the entry and byte
    /// limits, keeping batch order.
    fn requests(prepared: Vec<Prepared>) -> Vec<Vec<Prepared>> {
        let mut out: Vec<Vec<Prepared>> = Vec::new();
        let mut bytes = 0;
        for p in prepared {
            let size = p.encoded.size();
            let fits = out
                .last()
                .is_some_and(|r| r.len() < MAX_BATCH_ENTRIES && bytes + size <= MAX_REQUEST_BYTES);
            if !fits {
                out.push(Vec::with_capacity(MAX_BATCH_ENTRIES));
                bytes = 0;
            }
            bytes += size;
            out.last_mut().expect("pushed above").push(p);
        }
        out
    }
}

fn built(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("could not build the request entry: {e}"))
        .with_context("driver", DRIVER)
}

/// The escaped attributes as the service's attribute values, `None` when
/// there are none (AWS refuses an empty map).
fn attribute_map<V>(
    attributes: std::collections::BTreeMap<String, String>,
    value: impl Fn(String) -> Result<V>,
) -> Result<Option<HashMap<String, V>>> {
    let mut out = HashMap::with_capacity(attributes.len());
    for (k, v) in attributes {
        out.insert(k, value(v)?);
    }
    Ok((!out.is_empty()).then_some(out))
}

/// A failed entry as both services report it: id, code, message, and
/// whether the sender was at fault.
type Failure<'a> = (&'a str, &'a str, Option<&'a str>, bool);

/// Records one request's outcome: every entry failed when the call did,
/// else each failed entry for its own message and the after-send hook of
/// each that succeeded.
fn record<F, S: std::any::Any>(
    what: &str,
    batch: &[OutgoingMessage],
    indices: Vec<usize>,
    out: Result<(&[F], &[S])>,
    failure: fn(&F) -> Failure<'_>,
    success: fn(&S) -> (Option<&str>, Option<&str>),
    failed: &mut Vec<(usize, Error)>,
) {
    let (failures, successes) = match out {
        Ok(o) => o,
        Err(e) => {
            failed.extend(indices.into_iter().map(|i| (i, e.clone())));
            return;
        }
    };
    for f in failures {
        let (id, code, message, sender_fault) = failure(f);
        if let Ok(i) = id.parse::<usize>() {
            failed.push((i, error::entry(what, code, message, sender_fault)));
        }
    }
    for s in successes {
        let (entry, message_id) = success(s);
        let Some(i) = entry.and_then(|id| id.parse::<usize>().ok()) else {
            continue;
        };
        if let Some(m) = batch.get(i).filter(|m| m.has_after_send()) {
            let sent = || match message_id {
                Some(id) => Sent::new(s).with_id(id),
                None => Sent::new(s),
            };
            if let Err(e) = m.run_after_send(sent) {
                failed.push((i, e));
            }
        }
    }
}

/// Builds each entry with `entry` and runs its message's before-send hook
/// on it; an entry that fails either fails its message.
fn entries<E: std::any::Any>(
    batch: &[OutgoingMessage],
    request: Vec<Prepared>,
    entry: impl Fn(Prepared) -> Result<E>,
    failed: &mut Vec<(usize, Error)>,
) -> (Vec<E>, Vec<usize>) {
    let (mut out, mut indices) = (Vec::with_capacity(request.len()), Vec::new());
    for p in request {
        let index = p.index;
        match entry(p).and_then(|mut e| batch[index].run_before_send(&mut e).map(|()| e)) {
            Ok(e) => {
                out.push(e);
                indices.push(index);
            }
            Err(e) => failed.push((index, e)),
        }
    }
    (out, indices)
}

impl AwsTopic {
    async fn publish_sns(
        client: &aws_sdk_sns::Client,
        arn: &str,
        batch: &[OutgoingMessage],
        request: Vec<Prepared>,
        failed: &mut Vec<(usize, Error)>,
    ) {
        use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
        let entry = |p: Prepared| {
            let attributes = attribute_map(p.encoded.attributes, |v| {
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .map_err(built)
            })?;
            PublishBatchRequestEntry::builder()
                .id(p.index.to_string())
                .message(p.encoded.body)
                .set_message_attributes(attributes)
                .set_message_group_id(p.group)
                .set_message_deduplication_id(p.dedup)
                .build()
                .map_err(built)
        };
        let (entries, indices) = entries(batch, request, entry, failed);
        if entries.is_empty() {
            return;
        }
        let what = format!("PublishBatch to {arn}");
        let out = client
            .publish_batch()
            .topic_arn(arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await
            .map_err(|e| error::call(&what, e));
        record(
            &what,
            batch,
            indices,
            out.as_ref()
                .map(|o| (o.failed(), o.successful()))
                .map_err(Clone::clone),
            |f| (f.id(), f.code(), f.message(), f.sender_fault()),
            |s| (s.id(), s.message_id()),
            failed,
        );
    }

    async fn send_sqs(
        client: &aws_sdk_sqs::Client,
        queue_url: &str,
        batch: &[OutgoingMessage],
        request: Vec<Prepared>,
        failed: &mut Vec<(usize, Error)>,
    ) {
        use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
        let entry = |p: Prepared| {
            let attributes = attribute_map(p.encoded.attributes, |v| {
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .map_err(built)
            })?;
            SendMessageBatchRequestEntry::builder()
                .id(p.index.to_string())
                .message_body(p.encoded.body)
                .set_message_attributes(attributes)
                .set_message_group_id(p.group)
                .set_message_deduplication_id(p.dedup)
                .build()
                .map_err(built)
        };
        let (entries, indices) = entries(batch, request, entry, failed);
        if entries.is_empty() {
            return;
        }
        let what = format!("SendMessageBatch to {queue_url}");
        let out = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| error::call(&what, e));
        record(
            &what,
            batch,
            indices,
            out.as_ref()
                .map(|o| (o.failed(), o.successful()))
                .map_err(Clone::clone),
            |f| (f.id(), f.code(), f.message(), f.sender_fault()),
            |s| (Some(s.id()), Some(s.message_id())),
            failed,
        );
    }
}

#[async_trait]
impl driver::Topic for AwsTopic {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.resource
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        // OpenTelemetry's names: SNS's is spelt with a dot.
        c.messaging_system = Some(match self.target {
            Target::Sns { .. } => "aws.sns",
            Target::Sqs { .. } => "aws_sqs",
        });
        c.fan_out = matches!(self.target, Target::Sns { .. });
        c.ordering_keys = self.fifo;
        c.max_message_bytes = Some(MAX_MESSAGE_BYTES);
        c.max_attributes = Some(encode::MAX_ATTRIBUTES);
        c.empty_body = false;
        c.empty_attribute_values = false;
        // Up to ten a request as AWS allows; the driver splits a batch
        // whose encoded size exceeds a request. Many requests in flight, as
        // the Go CDK, since each is one HTTP round trip.
        // A FIFO target takes one batch at a time, so a group's messages
        // and their retries reach it in send order.
        let handlers = if self.fifo { 1 } else { 64 };
        c.send_batching =
            BatchLimits::new(MAX_BATCH_ENTRIES, handlers).with_max_bytes(MAX_REQUEST_BYTES);
        c
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        let mut prepared = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            match self.prepare(i, m) {
                Ok(p) => prepared.push(p),
                Err(e) => failed.push((i, e)),
            }
        }
        let requests = Self::requests(prepared);
        let call = |request: Vec<Prepared>| async move {
            let mut failed = Vec::new();
            match &self.target {
                Target::Sns { client, arn } => {
                    Self::publish_sns(client, arn, batch, request, &mut failed).await
                }
                Target::Sqs { client, queue_url } => {
                    Self::send_sqs(client, queue_url, batch, request, &mut failed).await
                }
            }
            failed
        };
        if self.fifo {
            // One request after another, and none after one that failed,
            // so a group's messages are accepted in batch order; what is
            // held back fails with the same error and is retried, in order,
            // by the core (which runs one FIFO batch at a time).
            let mut requests = requests.into_iter();
            while let Some(request) = requests.next() {
                let sent = request.len();
                let f = call(request).await;
                let first = (f.len() == sent)
                    .then(|| f.first().map(|(_, e)| e.clone()))
                    .flatten();
                failed.extend(f);
                if let Some(e) = first {
                    for p in requests.by_ref().flatten() {
                        failed.push((p.index, e.clone()));
                    }
                }
            }
        } else {
            for f in join_all(requests.into_iter().map(call)).await {
                failed.extend(f);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else if failed.len() == batch.len() && batch.len() == 1 {
            Err(BatchError::All(failed.pop().expect("one").1))
        } else {
            Err(BatchError::Items(failed))
        }
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        match &self.target {
            Target::Sns { client, .. } => Some(client),
            Target::Sqs { client, .. } => Some(client),
        }
    }
}
