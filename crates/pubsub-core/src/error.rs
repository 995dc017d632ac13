//! The one error type every operation returns.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms that mean the same on every backend.
///
/// Drivers map their native errors onto these kinds in one function each, so
/// an application can react to `NotFound` or `Unavailable` without knowing
/// which broker it talks to.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The topic, subscription or other resource does not exist.
    NotFound,
    /// The resource already exists.
    AlreadyExists,
    /// The caller passed something invalid; nothing was sent.
    InvalidArgument,
    /// The operation is not allowed in the current state (for example after
    /// `shutdown`).
    FailedPrecondition,
    /// The credentials do not allow the operation.
    PermissionDenied,
    /// A quota or size limit was hit.
    ResourceExhausted,
    /// The backend could not be reached; usually temporary.
    Unavailable,
    /// The operation was cancelled.
    Canceled,
    /// The operation did not finish in time.
    DeadlineExceeded,
    /// The backend cannot do this at all.
    Unimplemented,
    /// A bug in this library or the backend.
    Internal,
    /// Anything the driver could not classify.
    Unknown,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Canceled => "canceled",
            ErrorKind::DeadlineExceeded => "deadline exceeded",
            ErrorKind::Unimplemented => "unimplemented",
            ErrorKind::Internal => "internal",
            ErrorKind::Unknown => "unknown",
        }
    }

    /// Whether errors of this kind are worth retrying when the driver did not
    /// say otherwise.
    pub fn is_temporary_by_default(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::ResourceExhausted
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Arc<dyn StdError + Send + Sync + 'static>;

/// The error of every fallible operation in this library.
///
/// Cheap to clone, so one backend failure can be reported to every sender in
/// the batch it hit. The backend's own error is the [`source`](StdError::source)
/// and can be reached with [`Error::source_as`].
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    temporary: bool,
    message: String,
    context: Vec<(&'static str, String)>,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind`; temporary if the kind usually is.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                temporary: kind.is_temporary_by_default(),
                message: message.into(),
                context: Vec::new(),
                source: None,
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        // Errors are built before they are shared; if a clone exists we copy
        // so that builders never change an error someone else holds.
        if Arc::get_mut(&mut self.inner).is_none() {
            let i = &self.inner;
            self.inner = Arc::new(Inner {
                kind: i.kind,
                temporary: i.temporary,
                message: i.message.clone(),
                context: i.context.clone(),
                source: i.source.clone(),
            });
        }
        Arc::get_mut(&mut self.inner).expect("unique after copy")
    }

    /// Sets whether retrying may help.
    pub fn with_temporary(mut self, temporary: bool) -> Self {
        self.inner_mut().temporary = temporary;
        self
    }

    /// Attaches the backend's own error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.inner_mut().source = Some(Arc::new(source));
        self
    }

    /// Adds a context pair such as `("driver", "amqp")` or `("resource", name)`.
    ///
    /// Values must not carry secrets: they are printed.
    pub fn with_context(mut self, key: &'static str, value: impl Into<String>) -> Self {
        let value = value.into();
        let ctx = &mut self.inner_mut().context;
        if let Some(slot) = ctx.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            ctx.push((key, value));
        }
        self
    }

    /// Adds context only where the key is not set yet, so the innermost layer
    /// (which knows most) wins.
    pub(crate) fn with_context_default(self, key: &'static str, value: &str) -> Self {
        if self.context(key).is_some() {
            self
        } else {
            self.with_context(key, value)
        }
    }

    /// The portable kind.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_temporary(&self) -> bool {
        self.inner.temporary
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// A context value, if set.
    pub fn context(&self, key: &str) -> Option<&str> {
        self.inner
            .context
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every context pair, in the order they were added.
    pub fn context_pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.inner.context.iter().map(|(k, v)| (*k, v.as_str()))
    }

    /// The backend's own error, if it is a `T`: the typed escape hatch.
    pub fn source_as<T: StdError + 'static>(&self) -> Option<&T> {
        self.inner.source.as_deref()?.downcast_ref::<T>()
    }

    // Shorthands for the kinds the core itself raises.

    /// `InvalidArgument`.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// `FailedPrecondition`.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    /// `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// `Unimplemented`.
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unimplemented, message)
    }

    /// `Unavailable`, temporary.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// `Internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.kind, self.inner.message)?;
        if !self.inner.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.inner.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str(")")?;
        }
        if let Some(src) = &self.inner.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("temporary", &self.inner.temporary)
            .field("message", &self.inner.message);
        for (k, v) in &self.inner.context {
            d.field(k, v);
        }
        if let Some(src) = &self.inner.source {
            d.field("source", &format_args!("{src}"));
        }
        d.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Native;
    impl fmt::Display for Native {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("native failure")
        }
    }
    impl StdError for Native {}

    #[test]
    fn kind_context_and_source() {
        let e = Error::new(ErrorKind::Unavailable, "connection lost")
            .with_context("driver", "mem")
            .with_context("resource", "t1")
            .with_source(Native);
        assert!(e.is_temporary());
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.source_as::<Native>().is_some());
        assert_eq!(
            e.to_string(),
            "unavailable: connection lost (driver=mem, resource=t1): native failure"
        );
        let e2 = e.clone().with_temporary(false);
        assert!(e.is_temporary(), "builders never change a shared error");
        assert!(!e2.is_temporary());
    }
}
