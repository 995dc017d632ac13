//! The one place rdkafka's errors become [`pubsub_core::Error`]s.

use pubsub_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

/// Maps an rdkafka error onto a portable kind, keeping it as the source.
pub(crate) fn map(e: KafkaError) -> Error {
    let (kind, temporary) = match e.rdkafka_error_code() {
        Some(C::UnknownTopicOrPartition | C::UnknownTopic) => (ErrorKind::NotFound, false),
        Some(
            C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication,
        ) => (ErrorKind::PermissionDenied, false),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => (ErrorKind::InvalidArgument, false),
        Some(C::TopicAlreadyExists) => (ErrorKind::AlreadyExists, false),
        Some(C::InvalidPartitions | C::InvalidReplicationFactor | C::PolicyViolation) => {
            (ErrorKind::InvalidArgument, false)
        }
        Some(C::QueueFull) => (ErrorKind::ResourceExhausted, true),
        Some(C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut) => {
            (ErrorKind::DeadlineExceeded, true)
        }
        Some(
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::NetworkException
            | C::Resolve
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::RebalanceInProgress
            | C::UnknownMemberId
            | C::IllegalGeneration,
        ) => (ErrorKind::Unavailable, true),
        _ => match &e {
            KafkaError::Canceled => (ErrorKind::Unavailable, true),
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
                (ErrorKind::InvalidArgument, false)
            }
            _ => (ErrorKind::Unknown, false),
        },
    };
    Error::new(kind, "Kafka operation failed")
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
        .with_source(e)
}
