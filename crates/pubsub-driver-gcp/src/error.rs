//! The one place errors of the Google Cloud client become
//! [`pubsub_core::Error`]s.

use std::error::Error as StdError;

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::error::{AckError, PublishError};
use pubsub_core::{Error, ErrorKind};

fn error(
    kind: ErrorKind,
    temporary: bool,
    message: String,
    source: impl StdError + Send + Sync + 'static,
) -> Error {
    Error::new(kind, message)
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
        .with_source(source)
}

/// A gRPC status code's kind and whether retrying may help. Unavailable,
/// DeadlineExceeded, ResourceExhausted, Aborted and Internal are
/// temporary (the Go CDK maps Unavailable to Unknown, which never retries).
fn code_kind(code: Code) -> (ErrorKind, bool) {
    match code {
        Code::NotFound => (ErrorKind::NotFound, false),
        Code::AlreadyExists => (ErrorKind::AlreadyExists, false),
        Code::InvalidArgument | Code::OutOfRange => (ErrorKind::InvalidArgument, false),
        Code::FailedPrecondition => (ErrorKind::FailedPrecondition, false),
        Code::PermissionDenied | Code::Unauthenticated => (ErrorKind::PermissionDenied, false),
        Code::ResourceExhausted => (ErrorKind::ResourceExhausted, true),
        Code::Unavailable | Code::Aborted => (ErrorKind::Unavailable, true),
        Code::DeadlineExceeded => (ErrorKind::DeadlineExceeded, true),
        Code::Internal => (ErrorKind::Internal, true),
        Code::DataLoss => (ErrorKind::Internal, false),
        Code::Cancelled => (ErrorKind::Canceled, false),
        Code::Unimplemented => (ErrorKind::Unimplemented, false),
        _ => (ErrorKind::Unknown, false),
    }
}

/// The kind of a client error that carries no status: from the HTTP
/// status of the JSON admin calls, or from how the call failed.
fn kind_of(e: &google_cloud_pubsub::Error) -> (ErrorKind, bool) {
    if let Some(status) = e.status() {
        return code_kind(status.code);
    }
    if let Some(http) = e.http_status_code() {
        return match http {
            404 => (ErrorKind::NotFound, false),
            409 => (ErrorKind::AlreadyExists, false),
            400 => (ErrorKind::InvalidArgument, false),
            401 | 403 => (ErrorKind::PermissionDenied, false),
            429 => (ErrorKind::ResourceExhausted, true),
            500..=599 => (ErrorKind::Unavailable, true),
            _ => (ErrorKind::Unknown, false),
        };
    }
    if e.is_timeout() {
        (ErrorKind::DeadlineExceeded, true)
    } else if e.is_authentication() {
        // Fetching a token can fail for a while (a metadata server busy).
        (ErrorKind::PermissionDenied, e.is_transient_and_before_rpc())
    } else if e.is_connect() || e.is_io() || e.is_transport() || e.is_exhausted() {
        (ErrorKind::Unavailable, true)
    } else {
        (ErrorKind::Unknown, false)
    }
}

/// A failed call of the client, `what` saying which.
pub(crate) fn call(what: &str, e: google_cloud_pubsub::Error) -> Error {
    let (kind, temporary) = kind_of(&e);
    error(kind, temporary, describe(what, &e), e)
}

fn describe(what: &str, e: &google_cloud_pubsub::Error) -> String {
    match e.status() {
        Some(s) if !s.message.is_empty() => format!("{what}: {:?}: {}", s.code, s.message),
        Some(s) => format!("{what}: {:?}", s.code),
        None => format!("{what}: {e}"),
    }
}

/// A publish that Pub/Sub did not accept.
pub(crate) fn publish(e: PublishError) -> Error {
    let (kind, temporary, message) = match &e {
        PublishError::Rpc(inner) => {
            let (kind, temporary) = kind_of(inner);
            (kind, temporary, describe("publish", inner))
        }
        // The key paused after an earlier failure; the driver resumes it,
        // so a retry goes through in order.
        PublishError::OrderingKeyPaused => (
            ErrorKind::Unavailable,
            true,
            "publish: an earlier message with this ordering key failed".to_owned(),
        ),
        PublishError::Shutdown => (
            ErrorKind::Unavailable,
            true,
            "publish: the publisher shut down before the message was sent".to_owned(),
        ),
        other => (ErrorKind::Unknown, false, format!("publish: {other}")),
    };
    error(kind, temporary, message, e)
}

/// A confirmed ack (exactly-once delivery) that did not go through.
pub(crate) fn ack(e: AckError) -> Error {
    let (kind, temporary, message) = match &e {
        AckError::LeaseExpired => (
            ErrorKind::FailedPrecondition,
            false,
            "ack: the message's lease expired first; it will be delivered again".to_owned(),
        ),
        AckError::Rpc { source, .. } => {
            let (kind, temporary) = kind_of(source);
            (kind, temporary, describe("ack", source))
        }
        other => (ErrorKind::Unavailable, false, format!("ack: {other}")),
    };
    error(kind, temporary, message, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use google_cloud_gax::error::rpc::Status;

    fn status(code: Code) -> google_cloud_pubsub::Error {
        google_cloud_pubsub::Error::service(Status::default().set_code(code).set_message("m"))
    }

    #[test]
    fn temporary_codes_are_the_retryable_ones() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ] {
            assert!(call("x", status(code)).is_temporary(), "{code:?}");
        }
        for (code, kind) in [
            (Code::NotFound, ErrorKind::NotFound),
            (Code::PermissionDenied, ErrorKind::PermissionDenied),
            (Code::InvalidArgument, ErrorKind::InvalidArgument),
            (Code::FailedPrecondition, ErrorKind::FailedPrecondition),
        ] {
            let e = call("x", status(code));
            assert_eq!((e.kind(), e.is_temporary()), (kind, false), "{code:?}");
        }
        let e = call("receive", status(Code::NotFound));
        assert!(e.source_as::<google_cloud_pubsub::Error>().is_some());
        assert!(
            e.message().contains("NotFound") && e.message().contains('m'),
            "{e}"
        );
    }
}
