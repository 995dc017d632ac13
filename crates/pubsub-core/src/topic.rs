//! The sending side of the user API.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::Instrument;

use crate::driver::{self, Capabilities, OutgoingMessage};
use crate::engine::batcher::Batcher;
use crate::engine::send::SendHandler;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::metric::Labels;
use crate::options::TopicOptions;

/// A handle for sending messages to a topic.
///
/// Cheap to clone; clones share one batching engine. `send` may be called
/// from many tasks at once: messages that arrive while a batch is in flight
/// travel together in the next one.
#[derive(Clone)]
pub struct Topic {
    inner: Arc<Inner>,
}

struct Inner {
    driver: Arc<dyn driver::Topic>,
    caps: Capabilities,
    batcher: Batcher<OutgoingMessage, SendHandler>,
    shut_down: AtomicBool,
    labels: Labels,
    sent: ::metrics::Counter,
    send_duration: ::metrics::Histogram,
    /// The producer span's name (`send <topic>`) where sends run in
    /// producer spans that carry their context; made once, not a send.
    #[cfg(feature = "opentelemetry")]
    trace: Option<Box<str>>,
}

impl Topic {
    /// Wraps a driver topic with default options. Must be called within a
    /// Tokio runtime.
    pub fn new(driver: impl driver::Topic) -> Self {
        Self::with_options(Arc::new(driver), TopicOptions::default())
    }

    /// Wraps a driver topic. Must be called within a Tokio runtime.
    pub fn with_options(driver: Arc<dyn driver::Topic>, options: TopicOptions) -> Self {
        let caps = driver.capabilities();
        let limits = options.batching.merge(caps.send_batching);
        let labels = Labels::topic(
            caps.messaging_system_or(driver.driver_name()),
            driver.resource(),
        );
        let batcher = Batcher::new(
            limits,
            options.retry,
            Arc::new(SendHandler {
                driver: driver.clone(),
                metrics: labels.call("send"),
            }),
        );
        #[cfg(feature = "opentelemetry")]
        let trace = crate::trace::span_name(options.trace_context, "send", driver.resource());
        Topic {
            inner: Arc::new(Inner {
                driver,
                caps,
                batcher,
                shut_down: AtomicBool::new(false),
                sent: labels.counter(crate::metric::SENT),
                send_duration: labels.histogram(crate::metric::SEND_DURATION),
                labels,
                #[cfg(feature = "opentelemetry")]
                trace,
            }),
        }
    }

    /// Sends a message and returns once the backend has accepted the batch
    /// holding it, or failed.
    ///
    /// Invalid messages (an empty attribute key, a body over the backend's
    /// size limit) fail with `InvalidArgument` before any I/O. Dropping the
    /// returned future before its batch is handed to the driver withdraws
    /// the message; after that it may still be delivered.
    pub async fn send(&self, message: Message) -> Result<()> {
        let inner = &*self.inner;
        #[cfg(feature = "opentelemetry")]
        let producer = inner
            .trace
            .as_deref()
            .filter(|_| crate::trace::spans_wanted())
            .map(|name| {
                crate::trace::producer_span(
                    name,
                    inner.caps.messaging_system_or(inner.driver.driver_name()),
                    inner.driver.resource(),
                )
            });
        #[cfg(feature = "opentelemetry")]
        let span = producer.clone().unwrap_or_else(|| self.send_span());
        #[cfg(not(feature = "opentelemetry"))]
        let (span, producer) = (self.send_span(), None);
        let started = inner.labels.start();
        // The checks and the conversion run before the one await, so the
        // future holds neither the message nor a nested future of them: a
        // send's future is moved on every poll path, and the copies of the
        // larger one were an eighth of an in-memory send's time.
        let r = match span.in_scope(|| self.prepare(message, producer.as_ref())) {
            Ok((out, size)) => inner
                .batcher
                .send(out, size)
                .instrument(span)
                .await
                .map_err(|e| self.error(e)),
            Err(e) => Err(e),
        };
        match &r {
            Ok(()) => {
                inner.sent.increment(1);
                if let Some(t) = started {
                    inner.send_duration.record(t.elapsed());
                }
            }
            Err(e) => {
                inner.labels.send_failed(e.kind());
                #[cfg(feature = "opentelemetry")]
                if let Some(span) = &producer {
                    crate::trace::failed(span, e.kind().as_str());
                }
            }
        }
        r
    }

    #[inline]
    fn send_span(&self) -> tracing::Span {
        tracing::debug_span!(
            "send",
            driver = self.inner.driver.driver_name(),
            resource = self.inner.driver.resource()
        )
    }

    /// Checks `message` and makes it what the batcher takes, with its size,
    /// carrying the trace context of `producer` (the send's producer span)
    /// where it fits.
    fn prepare(
        &self,
        message: Message,
        producer: Option<&tracing::Span>,
    ) -> Result<(OutgoingMessage, usize)> {
        let inner = &*self.inner;
        if inner.shut_down.load(Ordering::Acquire) {
            return Err(self.error(Error::failed_precondition("topic has been shut down")));
        }
        if message.is_received() {
            // Sending would consume the delivery and so settle it by the
            // drop rule, before the send even happens.
            return Err(self.error(Error::invalid_argument(
                "a received message cannot be sent as is: send msg.clone() (its content) and then ack the original",
            )));
        }
        message.validate().map_err(|e| self.error(e))?;
        if let Some(max) = inner.caps.max_attributes {
            let n = message.attributes().len();
            if n > max {
                return Err(self.error(Error::invalid_argument(format!(
                    "message has {n} attributes; the backend takes at most {max}"
                ))));
            }
        }
        if !inner.caps.empty_attribute_values {
            if let Some((k, _)) = message.attributes().iter().find(|(_, v)| v.is_empty()) {
                return Err(self.error(Error::invalid_argument(format!(
                    "attribute {k:?} has an empty value, which this backend does not take"
                ))));
            }
        }
        if !inner.caps.empty_body && message.body().is_empty() {
            return Err(self.error(Error::invalid_argument(
                "this backend needs a message body of at least one byte",
            )));
        }
        let size = message.size();
        if let Some(max) = inner.caps.max_message_bytes {
            if size > max {
                return Err(self.error(Error::invalid_argument(format!(
                    "message of {size} bytes exceeds the backend's limit of {max} bytes"
                ))));
            }
        }
        // Added after the checks, so that a message the application made
        // within the limits is never refused for the attributes added here.
        #[cfg(feature = "opentelemetry")]
        let traced =
            producer.and_then(|span| Some((span, crate::trace::context_attributes(span)?)));
        #[cfg(feature = "opentelemetry")]
        let (message, size) = match traced {
            Some((span, mut extra)) => {
                let mut message = message;
                let size = crate::trace::with_context_fields(|fields| {
                    message.set_trace_context(&mut extra, fields, size, &inner.caps)
                });
                // The id the backend gives the message, on the producer span
                // as on the consumer's.
                let span = span.clone();
                let message = message.also_after_send(move |sent| {
                    if let Some(id) = sent.id() {
                        span.record("messaging.message.id", id);
                    }
                });
                (message, size)
            }
            None => (message, size),
        };
        #[cfg(not(feature = "opentelemetry"))]
        let _ = producer;
        Ok((message.into_outgoing(), size))
    }

    fn error(&self, e: Error) -> Error {
        e.with_context_default("driver", self.inner.driver.driver_name())
            .with_context_default("resource", self.inner.driver.resource())
            .with_context_default("operation", "send")
    }

    /// Sends every queued message, waits for them, and closes the driver.
    /// Later calls on any clone fail with `FailedPrecondition`; so does a
    /// second `shutdown`.
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.shut_down.swap(true, Ordering::AcqRel) {
            return Err(self.error(Error::failed_precondition(
                "topic has already been shut down",
            )));
        }
        let span = tracing::debug_span!(
            "topic_shutdown",
            driver = self.inner.driver.driver_name(),
            resource = self.inner.driver.resource()
        );
        async {
            self.inner.batcher.shutdown().await;
            self.inner.driver.close().await
        }
        .instrument(span)
        .await
    }

    /// Whether `shutdown` has been called on any clone.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shut_down.load(Ordering::Acquire)
    }

    /// What the backend can do.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// The backend's own client, if it is a `T`: the typed escape hatch.
    /// Each driver documents the type it exposes.
    pub fn as_raw<T: Any>(&self) -> Option<&T> {
        self.inner.driver.raw()?.downcast_ref::<T>()
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic")
            .field("driver", &self.inner.driver.driver_name())
            .field("resource", &self.inner.driver.resource())
            .field("shut_down", &self.is_shut_down())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::driver::BatchError;
    use crate::RetryPolicy;

    /// Fails each message's first two attempts as temporary and records the
    /// id every attempt carried.
    #[derive(Debug, Default)]
    struct Flaky {
        seen: Mutex<Vec<(Bytes, u128)>>,
    }

    #[async_trait::async_trait]
    impl driver::Topic for Flaky {
        fn driver_name(&self) -> &'static str {
            "flaky"
        }
        fn resource(&self) -> &str {
            "t"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
            let mut seen = self.seen.lock().unwrap();
            let mut failed = Vec::new();
            for (i, m) in batch.iter().enumerate() {
                let tries = seen.iter().filter(|(b, _)| *b == m.body).count();
                seen.push((m.body.clone(), m.unique_id()));
                if tries < 2 {
                    failed.push((i, Error::unavailable("not yet").with_temporary(true)));
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(BatchError::Items(failed))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_at_a_message_carries_its_one_id() {
        let driver = Arc::new(Flaky::default());
        let topic = Topic::with_options(
            driver.clone(),
            TopicOptions::default().with_retry(RetryPolicy::new(
                Duration::from_millis(1),
                Duration::from_millis(1),
            )),
        );
        let sends = (0..20).map(|n| topic.send(Message::new(format!("m{n}"))));
        for r in futures_util::future::join_all(sends).await {
            r.unwrap();
        }
        topic.shutdown().await.unwrap();
        let seen = driver.seen.lock().unwrap();
        assert_eq!(seen.len(), 60, "three attempts each");
        for (body, id) in seen.iter() {
            let ids: std::collections::HashSet<u128> = seen
                .iter()
                .filter(|(b, _)| b == body)
                .map(|(_, i)| *i)
                .collect();
            assert_eq!(ids.len(), 1, "{body:?} was sent with ids {ids:?}");
            assert!(ids.contains(id));
        }
        let distinct: std::collections::HashSet<u128> = seen.iter().map(|(_, i)| *i).collect();
        assert_eq!(distinct.len(), 20, "each message has an id of its own");
    }
}

#[cfg(test)]
mod give_up_tests {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use super::*;
    use crate::driver::BatchError;
    use crate::{ErrorKind, RetryPolicy, DEFAULT_SEND_GIVE_UP};

    /// A backend that is away: every send fails as temporary, after
    /// hanging for `hang`.
    #[derive(Debug, Default)]
    struct Down {
        calls: AtomicU32,
        hang: Duration,
    }

    #[async_trait::async_trait]
    impl driver::Topic for Down {
        fn driver_name(&self) -> &'static str {
            "down"
        }
        fn resource(&self) -> &str {
            "t"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                send_batching: crate::driver::BatchLimits::new(10, 1),
                ..Capabilities::default()
            }
        }
        async fn send_batch(&self, _: &[OutgoingMessage]) -> Result<(), BatchError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if !self.hang.is_zero() {
                tokio::time::sleep(self.hang).await;
            }
            Err(BatchError::All(
                Error::unavailable("connection refused").with_temporary(true),
            ))
        }
    }

    /// A send to a backend that stays away fails once the retry limit has
    /// passed, with a temporary `DeadlineExceeded` that says what was tried;
    /// lone sends (run in the caller's task) and batched ones alike.
    #[tokio::test(start_paused = true)]
    async fn a_send_gives_up_after_the_retry_limit() {
        let driver = Arc::new(Down::default());
        let topic = Topic::with_options(driver.clone(), TopicOptions::default());
        assert_eq!(topic_limit(), Some(DEFAULT_SEND_GIVE_UP));
        let started = tokio::time::Instant::now();
        let sends = (0..5).map(|n| topic.send(Message::new(format!("m{n}"))));
        let results = tokio::time::timeout(
            Duration::from_secs(600),
            futures_util::future::join_all(sends),
        )
        .await
        .expect("sends to a backend that is away must give up");
        for r in results {
            let e = r.expect_err("the backend is away");
            assert_eq!(e.kind(), ErrorKind::DeadlineExceeded, "{e}");
            assert!(e.is_temporary());
            assert!(e.message().contains("attempts"), "{e}");
            assert!(e.to_string().contains("connection refused"), "{e}");
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(55) && took <= Duration::from_secs(61),
            "gave up after {took:?}"
        );
        assert!(driver.calls.load(Ordering::Relaxed) > 5, "it retried");
    }

    /// The limit counts the first attempt too: a lone send whose attempts
    /// each hang for 50 s fails after its second (at 100 s: 50 s had passed
    /// of the 60 s limit when it began), not its third (150 s, were the
    /// limit counted from the first failure).
    #[tokio::test(start_paused = true)]
    async fn the_retry_limit_counts_a_slow_first_attempt() {
        let driver = Down {
            hang: Duration::from_secs(50),
            ..Down::default()
        };
        let topic = Topic::with_options(Arc::new(driver), TopicOptions::default());
        let started = tokio::time::Instant::now();
        let e = topic
            .send(Message::new("m"))
            .await
            .expect_err("the backend never answers");
        assert_eq!(e.kind(), ErrorKind::DeadlineExceeded, "{e}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(110),
            "the first attempt was not counted: gave up after {took:?}"
        );
    }

    fn topic_limit() -> Option<Duration> {
        TopicOptions::default().retry.give_up_after
    }

    /// Without a limit, a send waits for the backend for as long as it
    /// takes.
    #[tokio::test(start_paused = true)]
    async fn without_a_limit_a_send_keeps_retrying() {
        let driver = Arc::new(Down::default());
        let mut options = TopicOptions::default();
        options.retry.give_up_after = None;
        let topic = Topic::with_options(driver.clone(), options);
        let send = topic.send(Message::new("m"));
        let r = tokio::time::timeout(Duration::from_secs(3600), send).await;
        assert!(r.is_err(), "still retrying after an hour");
        let _ = RetryPolicy::default();
    }
}
