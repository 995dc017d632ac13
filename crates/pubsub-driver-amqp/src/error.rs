//! The one place lapin's errors become [`pubsub_core::Error`]s.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use pubsub_core::{Error, ErrorKind};

/// Maps a lapin error onto a portable kind, keeping it as the source.
///
/// Anything that means "the connection or channel is gone" is
/// `Unavailable` and temporary: the driver reopens and the core retries.
pub(crate) fn map(e: lapin::Error) -> Error {
    use lapin::ErrorKind as K;
    let (kind, temporary) = match e.kind() {
        K::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => match soft {
                AMQPSoftError::NOTFOUND => (ErrorKind::NotFound, false),
                AMQPSoftError::ACCESSREFUSED => (ErrorKind::PermissionDenied, false),
                AMQPSoftError::PRECONDITIONFAILED => (ErrorKind::FailedPrecondition, false),
                AMQPSoftError::RESOURCELOCKED => (ErrorKind::FailedPrecondition, false),
                AMQPSoftError::CONTENTTOOLARGE => (ErrorKind::InvalidArgument, false),
                AMQPSoftError::NOROUTE | AMQPSoftError::NOCONSUMERS => (ErrorKind::NotFound, false),
            },
            AMQPErrorKind::Hard(hard) => match hard {
                AMQPHardError::CONNECTIONFORCED => (ErrorKind::Unavailable, true),
                AMQPHardError::RESOURCEERROR => (ErrorKind::ResourceExhausted, true),
                AMQPHardError::NOTALLOWED => (ErrorKind::PermissionDenied, false),
                AMQPHardError::NOTIMPLEMENTED => (ErrorKind::Unimplemented, false),
                AMQPHardError::INTERNALERROR => (ErrorKind::Internal, true),
                _ => (ErrorKind::Unavailable, true),
            },
        },
        K::IOError(_)
        | K::InvalidChannelState(..)
        | K::InvalidConnectionState(_)
        | K::InvalidChannel(_)
        | K::MissingHeartbeatError => (ErrorKind::Unavailable, true),
        K::ChannelsLimitReached => (ErrorKind::ResourceExhausted, true),
        K::AuthProviderError(_) => (ErrorKind::PermissionDenied, false),
        K::InvalidProtocolVersion(_) => (ErrorKind::FailedPrecondition, false),
        _ => (ErrorKind::Internal, false),
    };
    let message = match e.kind() {
        K::ProtocolError(amqp) => format!("broker said: {}", amqp.get_message()),
        K::IOError(_) | K::InvalidChannelState(..) | K::InvalidConnectionState(_) => {
            "the connection or channel to RabbitMQ is not usable".to_owned()
        }
        _ => "RabbitMQ operation failed".to_owned(),
    };
    Error::new(kind, message)
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
        .with_source(e)
}

/// Whether an error means the channel (or connection) it came from is dead
/// and must be reopened.
pub(crate) fn kills_channel(e: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    matches!(
        e.kind(),
        K::ProtocolError(_)
            | K::IOError(_)
            | K::InvalidChannelState(..)
            | K::InvalidConnectionState(_)
            | K::InvalidChannel(_)
            | K::MissingHeartbeatError
    )
}
