//! The one place errors of the AWS SDK become [`pubsub_core::Error`]s.

use std::error::Error as StdError;

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use pubsub_core::{Error, ErrorKind};

/// The kind of an SQS or SNS error code, and whether retrying may help.
/// Both spellings of SQS's codes are known: the JSON protocol's
/// (`QueueDoesNotExist`) and the query protocol's
/// (`AWS.SimpleQueueService.NonExistentQueue`).
pub(crate) fn code_kind(code: &str) -> Option<(ErrorKind, bool)> {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    Some(match code {
        "QueueDoesNotExist"
        | "NonExistentQueue"
        | "NotFound"
        | "NotFoundException"
        | "KMSNotFound"
        | "KMSNotFoundException"
        | "ResourceNotFoundException" => (ErrorKind::NotFound, false),
        "AuthorizationError"
        | "AuthorizationErrorException"
        | "AccessDenied"
        | "AccessDeniedException"
        | "KMSAccessDenied"
        | "KMSAccessDeniedException"
        | "InvalidSecurity"
        | "InvalidSecurityException"
        | "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "MissingAuthenticationToken"
        | "IncompleteSignature" => (ErrorKind::PermissionDenied, false),
        "KMSDisabled"
        | "KMSDisabledException"
        | "KMSInvalidState"
        | "KMSInvalidStateException"
        | "KMSOptInRequired"
        | "MessageNotInflight"
        | "PurgeQueueInProgress"
        | "QueueDeletedRecently"
        | "InvalidState"
        | "InvalidStateException" => (ErrorKind::FailedPrecondition, false),
        "QueueNameExists" | "QueueAlreadyExists" => (ErrorKind::AlreadyExists, false),
        "InvalidParameter"
        | "InvalidParameterException"
        | "InvalidParameterValue"
        | "InvalidParameterValueException"
        | "InvalidParameterCombination"
        | "MissingParameter"
        | "ValidationError"
        | "ValidationException"
        | "BatchEntryIdsNotDistinct"
        | "BatchEntryIdsNotDistinctException"
        | "BatchRequestTooLong"
        | "BatchRequestTooLongException"
        | "EmptyBatchRequest"
        | "EmptyBatchRequestException"
        | "InvalidAttributeName"
        | "InvalidAttributeValue"
        | "InvalidBatchEntryId"
        | "InvalidBatchEntryIdException"
        | "InvalidIdFormat"
        | "InvalidMessageContents"
        | "ReceiptHandleIsInvalid"
        | "TooManyEntriesInBatchRequest"
        | "TooManyEntriesInBatchRequestException"
        | "UnsupportedOperation"
        | "InvalidAddress"
        | "MessageTooLong" => (ErrorKind::InvalidArgument, false),
        "FilterPolicyLimitExceeded"
        | "FilterPolicyLimitExceededException"
        | "SubscriptionLimitExceeded"
        | "SubscriptionLimitExceededException"
        | "TopicLimitExceeded"
        | "TopicLimitExceededException" => (ErrorKind::ResourceExhausted, false),
        "OverLimit"
        | "KMSThrottling"
        | "KMSThrottlingException"
        | "Throttled"
        | "ThrottledException"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "RequestThrottledException"
        | "TooManyRequestsException"
        | "SlowDown"
        | "RequestLimitExceeded" => (ErrorKind::ResourceExhausted, true),
        "InternalError" | "InternalErrorException" | "InternalFailure" => {
            (ErrorKind::Internal, true)
        }
        "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "RequestTimeout"
        | "RequestTimeoutException" => (ErrorKind::Unavailable, true),
        "RequestCanceled" => (ErrorKind::Canceled, false),
        _ => return None,
    })
}

/// The kind of an HTTP status without a known code.
fn status_kind(status: u16) -> (ErrorKind, bool) {
    match status {
        400 => (ErrorKind::InvalidArgument, false),
        401 | 403 => (ErrorKind::PermissionDenied, false),
        404 => (ErrorKind::NotFound, false),
        408 => (ErrorKind::Unavailable, true),
        429 => (ErrorKind::ResourceExhausted, true),
        500..=599 => (ErrorKind::Unavailable, true),
        _ => (ErrorKind::Unknown, false),
    }
}

/// A failed SDK call, `what` saying which (`"SendMessageBatch on QUEUE"`).
/// The SDK's error is the source, for [`pubsub_core::Error::source_as`].
pub(crate) fn call<E>(what: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let (kind, temporary, detail) = match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("");
            let (kind, temporary) =
                code_kind(code).unwrap_or_else(|| status_kind(s.raw().status().as_u16()));
            let detail = match err.message() {
                Some(m) if !code.is_empty() => format!("{code}: {m}"),
                Some(m) => m.to_owned(),
                None if !code.is_empty() => code.to_owned(),
                None => format!("HTTP {}", s.raw().status().as_u16()),
            };
            (kind, temporary, detail)
        }
        SdkError::TimeoutError(_) => (ErrorKind::DeadlineExceeded, true, "timed out".to_owned()),
        SdkError::DispatchFailure(d) => {
            let detail = if d.is_io() {
                "could not reach the endpoint (I/O error)"
            } else if d.is_timeout() {
                "timed out reaching the endpoint"
            } else {
                "could not send the request"
            };
            (ErrorKind::Unavailable, !d.is_user(), detail.to_owned())
        }
        SdkError::ResponseError(_) => (
            ErrorKind::Unavailable,
            true,
            "the response could not be read".to_owned(),
        ),
        SdkError::ConstructionFailure(_) => (
            ErrorKind::InvalidArgument,
            false,
            "the request could not be built".to_owned(),
        ),
        _ => (ErrorKind::Unknown, false, "failed".to_owned()),
    };
    // DisplayErrorContext shows the whole chain (credentials, DNS...)
    // where the top-level error says only "dispatch failure".
    let chain = DisplayErrorContext(&e).to_string();
    let message = if matches!(e, SdkError::ServiceError(_)) {
        format!("{what}: {detail}")
    } else {
        format!("{what}: {detail}: {chain}")
    };
    Error::new(kind, message)
        .with_temporary(temporary)
        .with_context("driver", crate::DRIVER)
        .with_source(e)
}

/// The error of one failed entry of a batch call. An entry failed through
/// no fault of the sender is temporary whatever its code.
pub(crate) fn entry(what: &str, code: &str, message: Option<&str>, sender_fault: bool) -> Error {
    let (kind, temporary) = code_kind(code).unwrap_or(if sender_fault {
        (ErrorKind::InvalidArgument, false)
    } else {
        (ErrorKind::Internal, true)
    });
    Error::new(
        kind,
        format!("{what}: {code}: {}", message.unwrap_or("failed")),
    )
    .with_temporary(temporary || !sender_fault)
    .with_context("driver", crate::DRIVER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_sqs_codes() {
        for code in [
            "QueueDoesNotExist",
            "AWS.SimpleQueueService.NonExistentQueue",
        ] {
            assert_eq!(
                code_kind(code),
                Some((ErrorKind::NotFound, false)),
                "{code}"
            );
        }
        assert_eq!(
            code_kind("AWS.SimpleQueueService.TooManyEntriesInBatchRequest"),
            code_kind("TooManyEntriesInBatchRequest")
        );
        assert_eq!(code_kind("NotFound"), Some((ErrorKind::NotFound, false)));
    }

    #[test]
    fn throttling_and_server_errors_are_temporary() {
        for code in [
            "Throttling",
            "ThrottlingException",
            "RequestThrottled",
            "OverLimit",
        ] {
            assert_eq!(
                code_kind(code),
                Some((ErrorKind::ResourceExhausted, true)),
                "{code}"
            );
        }
        assert!(code_kind("InternalError").unwrap().1);
        assert!(code_kind("ServiceUnavailable").unwrap().1);
        assert_eq!(status_kind(503), (ErrorKind::Unavailable, true));
        assert_eq!(status_kind(500), (ErrorKind::Unavailable, true));
        assert_eq!(status_kind(429), (ErrorKind::ResourceExhausted, true));
        assert!(!status_kind(400).1);
    }

    #[test]
    fn failed_entries_not_the_senders_fault_are_temporary() {
        let e = entry("SendMessageBatch", "SomethingNew", None, false);
        assert!(e.is_temporary());
        let e = entry(
            "SendMessageBatch",
            "InvalidMessageContents",
            Some("bad"),
            true,
        );
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(!e.is_temporary());
        assert!(e.to_string().contains("bad"));
    }
}
