//! A topic is a subject that a JetStream stream captures.

use std::any::Any;
use std::fmt;
use std::future::IntoFuture;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream;
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishAckFuture, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::Subject;
use async_trait::async_trait;
use futures_util::FutureExt;
use pubsub_core::driver::{self, BatchError, Capabilities, OutgoingMessage, Sent};
use pubsub_core::{Error, Result};

use crate::{error, headers, topic_capabilities, DRIVER};

/// The NATS JetStream topic driver: publishes to one subject and waits for
/// JetStream's acknowledgement of each message.
///
/// [`pubsub_core::Topic::as_raw`] gives the `async_nats::jetstream::Context`
/// (its `client()` is the connection). A before-send hook gets the outgoing
/// `&mut async_nats::HeaderMap`, already holding the attributes and
/// `Nats-Msg-Id`; an after-send hook gets JetStream's
/// `async_nats::jetstream::publish::PublishAck` as [`Sent::raw`] and the
/// `Nats-Msg-Id` the driver set as [`Sent::id`], the id receivers report
/// unless the before-send hook changed that header.
pub struct NatsTopic {
    js: jetstream::Context,
    subject: Subject,
}

/// What an after-send hook sees: JetStream's ack, and the `Nats-Msg-Id`
/// receivers report.
fn sent<'a>(m: &OutgoingMessage, ack: &'a jetstream::publish::PublishAck) -> Sent<'a> {
    Sent::new(ack).with_id(m.unique_id_hex())
}

impl NatsTopic {
    /// A topic publishing to `subject`. Whether a stream captures it is not
    /// checked until the first send, which fails with `NotFound` if none
    /// does.
    pub fn new(js: jetstream::Context, subject: &str) -> Result<Self> {
        if subject.is_empty() || subject.contains(char::is_whitespace) {
            return Err(Error::invalid_argument(format!(
                "{subject:?} is not a NATS subject to publish to"
            )));
        }
        if subject.contains(['*', '>']) {
            return Err(Error::invalid_argument(format!(
                "{subject:?} holds a wildcard; a topic publishes to one subject"
            )));
        }
        Ok(NatsTopic {
            js,
            subject: Subject::from(subject),
        })
    }

    /// Queues one publish; the future it gives resolves with JetStream's ack.
    async fn publish(&self, m: &OutgoingMessage) -> Result<PublishAckFuture> {
        let mut headers = headers::to_headers(&m.attributes)?;
        // JetStream drops a second publish with the same id within the
        // stream's duplicate window, so a resend after a lost ack (the core
        // retries with the same unique id) is stored once.
        headers.insert(NATS_MESSAGE_ID, m.unique_id_hex().as_str());
        m.run_before_send(&mut headers)?;
        let publish = PublishMessage::build()
            .payload(m.body.clone())
            .headers(headers);
        self.js
            .send_publish(self.subject.clone(), publish)
            .await
            .map_err(error::publish)
    }
}

impl NatsTopic {
    /// Whether JetStream knows a stream that captures the subject, asked
    /// after a publish found no responder. Right after a server start
    /// JetStream answers publishes before it has loaded its streams, and
    /// that "no responder" is not the application's missing stream.
    /// Anything but a definite "none" counts as yes (temporary).
    async fn ack_error(&self, e: async_nats::jetstream::context::PublishError) -> Error {
        let unanswered = e.kind() == PublishErrorKind::StreamNotFound;
        let e = error::publish(e);
        if unanswered && self.stream_exists().await {
            no_responder_yet(e)
        } else {
            e
        }
    }

    async fn stream_exists(&self) -> bool {
        !matches!(
            self.js.stream_by_subject(self.subject.as_str()).await,
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound
        )
    }
}

/// A "no responder" for a subject a stream does capture.
fn no_responder_yet(e: Error) -> Error {
    Error::unavailable(format!(
        "JetStream did not take the publish although a stream captures the subject \
         (it may be starting): {e}"
    ))
    .with_context("driver", DRIVER)
}

impl fmt::Debug for NatsTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTopic")
            .field("subject", &self.subject.as_str())
            .finish()
    }
}

#[async_trait]
impl driver::Topic for NatsTopic {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        self.subject.as_str()
    }

    fn capabilities(&self) -> Capabilities {
        topic_capabilities(&self.js.client())
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        if let [m] = batch {
            // A lone send (the common case with few senders) skips the
            // batch's bookkeeping.
            return match self.publish(m).await?.await {
                Ok(ack) => m.run_after_send(|| sent(m, &ack)).map_err(Into::into),
                Err(e) => Err(self.ack_error(e).await.into()),
            };
        }
        let mut failed = Vec::new();
        // Every publish is queued before any ack is awaited, so a batch
        // costs one round trip, not one a message.
        let mut acks = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            match self.publish(m).await {
                Ok(ack) => acks.push(ack.into_future().map(move |r| (i, r))),
                Err(e) => failed.push((i, e)),
            }
        }
        let mut unanswered = Vec::new();
        for (i, r) in futures_util::future::join_all(acks).await {
            let outcome = match r {
                Ok(ack) => batch[i].run_after_send(|| sent(&batch[i], &ack)),
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    unanswered.push((i, e));
                    continue;
                }
                Err(e) => Err(error::publish(e)),
            };
            if let Err(e) = outcome {
                failed.push((i, e));
            }
        }
        if !unanswered.is_empty() {
            // One lookup for all of them.
            let temporary = self.stream_exists().await;
            failed.extend(unanswered.into_iter().map(|(i, e)| {
                let e = error::publish(e);
                (i, if temporary { no_responder_yet(e) } else { e })
            }));
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(BatchError::Items(failed))
        }
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.js)
    }
}
