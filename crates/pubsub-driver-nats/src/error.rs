//! The one place async-nats errors become [`pubsub_core::Error`]s.

use std::error::Error as StdError;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::ErrorCode;
use pubsub_core::{Error, ErrorKind};

fn error(
    kind: ErrorKind,
    temporary: bool,
    message: impl Into<String>,
    source: impl StdError + Send + Sync + 'static,
) -> Error {
    Error::new(kind, message)
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
        .with_source(source)
}

/// A JetStream API error's kind: the "not found" codes are `NotFound`,
/// anything else the server refused is a precondition the application
/// must fix.
fn api_kind(e: &async_nats::jetstream::Error) -> (ErrorKind, bool) {
    match e.error_code() {
        ErrorCode::STREAM_NOT_FOUND | ErrorCode::CONSUMER_NOT_FOUND => (ErrorKind::NotFound, false),
        _ if e.code() == 503 => (ErrorKind::Unavailable, true),
        _ => (ErrorKind::FailedPrecondition, false),
    }
}

/// A publish that JetStream did not acknowledge.
pub(crate) fn publish(e: async_nats::jetstream::context::PublishError) -> Error {
    let (kind, temporary, message) = match e.kind() {
        PublishErrorKind::StreamNotFound => (
            ErrorKind::NotFound,
            false,
            "no JetStream stream captures this subject",
        ),
        PublishErrorKind::TimedOut => (
            ErrorKind::DeadlineExceeded,
            true,
            "JetStream did not acknowledge the publish in time",
        ),
        PublishErrorKind::BrokenPipe => (
            ErrorKind::Unavailable,
            true,
            "the connection to NATS dropped before JetStream acknowledged the publish",
        ),
        PublishErrorKind::MaxAckPending => (
            ErrorKind::ResourceExhausted,
            true,
            "too many publishes await JetStream's acknowledgement",
        ),
        PublishErrorKind::MaxPayloadExceeded => (
            ErrorKind::InvalidArgument,
            false,
            "the message with its headers exceeds the server's max_payload",
        ),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => (
            ErrorKind::FailedPrecondition,
            false,
            "JetStream refused the publish's expectation",
        ),
        PublishErrorKind::Other => {
            let api = e
                .source()
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
            return match api {
                Some(api) => {
                    let (kind, temporary) = api_kind(api);
                    let message = format!("JetStream refused the publish: {api}");
                    error(kind, temporary, message, e)
                }
                None => error(ErrorKind::Unavailable, true, "publishing to NATS failed", e),
            };
        }
    };
    error(kind, temporary, message, e)
}

/// A core-NATS publish (acks, nacks, lease extensions) that could not be
/// queued: the client is closed.
pub(crate) fn client_publish(e: async_nats::client::PublishError) -> Error {
    error(
        ErrorKind::Unavailable,
        true,
        "the NATS client could not queue an acknowledgement",
        e,
    )
}

/// Looking up (or creating) a stream's consumer.
pub(crate) fn consumer(e: async_nats::jetstream::stream::ConsumerError) -> Error {
    let (kind, temporary, message) = match e.kind() {
        ConsumerErrorKind::JetStream(api) => {
            let (kind, temporary) = api_kind(&api);
            (kind, temporary, format!("JetStream said: {api}"))
        }
        ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => (
            ErrorKind::Unavailable,
            true,
            "JetStream did not answer a consumer lookup".to_owned(),
        ),
        ConsumerErrorKind::InvalidName => (
            ErrorKind::InvalidArgument,
            false,
            "invalid stream or consumer name".to_owned(),
        ),
        ConsumerErrorKind::InvalidConsumerType => (
            ErrorKind::FailedPrecondition,
            false,
            "the consumer is a push consumer; this driver needs a pull consumer".to_owned(),
        ),
        _ => (
            ErrorKind::Unknown,
            false,
            "looking up the consumer failed".to_owned(),
        ),
    };
    error(kind, temporary, message, e)
}

/// Creating a consumer through [`crate::SubscriptionConfig::create`].
pub(crate) fn create(e: async_nats::Error) -> Error {
    let api = e.downcast_ref::<async_nats::jetstream::Error>().cloned();
    let (kind, temporary) = api
        .as_ref()
        .map_or((ErrorKind::Unavailable, true), api_kind);
    Error::new(kind, format!("creating the consumer failed: {e}"))
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
}

/// Starting a pull stream on a bound consumer.
pub(crate) fn stream(e: async_nats::jetstream::consumer::StreamError) -> Error {
    error(
        ErrorKind::Unavailable,
        true,
        "starting to pull from the consumer failed",
        e,
    )
}

/// An error the pull stream handed out in place of a message.
pub(crate) fn messages(e: async_nats::jetstream::consumer::pull::MessagesError) -> Error {
    let (kind, temporary, message) = match e.kind() {
        MessagesErrorKind::ConsumerDeleted => {
            (ErrorKind::NotFound, false, "the consumer was deleted")
        }
        MessagesErrorKind::PushBasedConsumer => (
            ErrorKind::FailedPrecondition,
            false,
            "the consumer is a push consumer; this driver needs a pull consumer",
        ),
        MessagesErrorKind::NoResponders => (
            ErrorKind::Unavailable,
            true,
            "JetStream did not answer the pull request",
        ),
        MessagesErrorKind::MissingHeartbeat => (
            ErrorKind::Unavailable,
            true,
            "JetStream's heartbeats stopped",
        ),
        _ => (ErrorKind::Unavailable, true, "pulling messages failed"),
    };
    error(kind, temporary, message, e)
}
