//! The one place redis errors become [`pubsub_core::Error`]s.

use pubsub_core::{Error, ErrorKind};

/// Maps a redis error onto a portable kind, keeping it as the source.
///
/// Connection trouble is `Unavailable` and temporary: the connection
/// manager reconnects and the core retries.
pub(crate) fn map(e: redis::RedisError, what: &str) -> Error {
    let (kind, temporary) = if e.is_timeout() {
        (ErrorKind::DeadlineExceeded, true)
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        (ErrorKind::Unavailable, true)
    } else {
        match e.code() {
            Some("NOGROUP") => (ErrorKind::NotFound, false),
            Some("NOPERM") | Some("NOAUTH") | Some("WRONGPASS") => {
                (ErrorKind::PermissionDenied, false)
            }
            Some("OOM") => (ErrorKind::ResourceExhausted, true),
            Some("LOADING") | Some("BUSY") | Some("TRYAGAIN") | Some("MASTERDOWN") => {
                (ErrorKind::Unavailable, true)
            }
            Some("WRONGTYPE") => (ErrorKind::FailedPrecondition, false),
            Some("READONLY") => (ErrorKind::FailedPrecondition, true),
            _ => match e.kind() {
                redis::ErrorKind::AuthenticationFailed => (ErrorKind::PermissionDenied, false),
                redis::ErrorKind::InvalidClientConfig => (ErrorKind::InvalidArgument, false),
                redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
                    (ErrorKind::Internal, false)
                }
                _ => (ErrorKind::Unknown, false),
            },
        }
    };
    let message = match kind {
        ErrorKind::NotFound => format!("{what}: the stream or its consumer group does not exist"),
        ErrorKind::Unavailable => format!("{what}: the connection to Redis is not usable"),
        ErrorKind::DeadlineExceeded => format!("{what}: Redis did not answer in time"),
        _ => format!("{what} failed"),
    };
    Error::new(kind, message)
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
        .with_source(e)
}
