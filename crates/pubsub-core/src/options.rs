//! User options for topics and subscriptions.

use std::time::Duration;

use crate::driver::BatchLimits;
use crate::retry::RetryPolicy;

/// User overrides for one batcher. Unset fields take the driver's default;
/// sizes above the driver's limit are capped to it.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most items in one backend call.
    pub max_batch_size: Option<usize>,
    /// Fewest items in one backend call; items wait for company until
    /// shutdown flushes them.
    pub min_batch_size: Option<usize>,
    /// Most bytes in one backend call.
    pub max_batch_bytes: Option<usize>,
    /// Most backend calls in flight at once.
    pub max_handlers: Option<usize>,
    /// How long a batch short of the maximum waits for more items before
    /// the backend call; zero calls at once.
    pub linger: Option<Duration>,
    /// Whether a handler that has finished a call waits briefly for the
    /// items it answered to come back before it takes the next batch (see
    /// [`BatchLimits::refill`]).
    pub refill: Option<bool>,
}

impl BatchOptions {
    /// Sets the maximum batch size.
    pub fn with_max_batch_size(mut self, n: usize) -> Self {
        self.max_batch_size = Some(n);
        self
    }

    /// Sets the minimum batch size.
    pub fn with_min_batch_size(mut self, n: usize) -> Self {
        self.min_batch_size = Some(n);
        self
    }

    /// Sets the byte limit of a batch.
    pub fn with_max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = Some(n);
        self
    }

    /// Sets how many backend calls may be in flight.
    pub fn with_max_handlers(mut self, n: usize) -> Self {
        self.max_handlers = Some(n);
        self
    }

    /// Sets how long a batch short of the maximum waits for more items.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// Sets whether a handler waits for the items it answered to come
    /// back (see [`BatchLimits::refill`]).
    pub fn with_refill(mut self, refill: bool) -> Self {
        self.refill = Some(refill);
        self
    }

    /// The limits in force: the user's choice within the driver's limits.
    pub fn merge(&self, driver: BatchLimits) -> BatchLimits {
        let max_batch_size = self
            .max_batch_size
            .map_or(driver.max_batch_size, |n| n.min(driver.max_batch_size))
            .max(1);
        let min_batch_size = self
            .min_batch_size
            .unwrap_or(driver.min_batch_size)
            .clamp(1, max_batch_size);
        let max_batch_bytes = match (self.max_batch_bytes, driver.max_batch_bytes) {
            (Some(u), Some(d)) => Some(u.min(d)),
            (u, d) => u.or(d),
        };
        BatchLimits {
            max_batch_size,
            min_batch_size,
            max_batch_bytes,
            max_handlers: self.max_handlers.unwrap_or(driver.max_handlers).max(1),
            linger: self.linger.or(driver.linger).filter(|d| !d.is_zero()),
            refill: self.refill.unwrap_or(driver.refill),
        }
    }
}

/// Options for a [`crate::Topic`].
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct TopicOptions {
    /// How sends are batched.
    pub batching: BatchOptions,
    /// How temporary send failures are retried. By default a send gives up
    /// after 60 s of failures (`retry.give_up_after`), long enough to ride
    /// out a broker restart, short enough that a send to a backend that is
    /// gone returns.
    pub retry: RetryPolicy,
    /// Whether a send runs in a producer span whose trace context goes
    /// into the message's attributes (with the `opentelemetry` feature; see
    /// `pubsub_core::trace`). Default: on.
    pub trace_context: bool,
}

impl Default for TopicOptions {
    fn default() -> Self {
        TopicOptions {
            batching: BatchOptions::default(),
            retry: RetryPolicy::default().with_give_up_after(Some(DEFAULT_SEND_GIVE_UP)),
            trace_context: true,
        }
    }
}

/// How long a send is retried by default.
pub const DEFAULT_SEND_GIVE_UP: Duration = Duration::from_secs(60);

impl TopicOptions {
    /// Sets the batching options.
    pub fn with_batching(mut self, batching: BatchOptions) -> Self {
        self.batching = batching;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Turns producer spans and trace context in attributes on or off.
    pub fn with_trace_context(mut self, on: bool) -> Self {
        self.trace_context = on;
        self
    }
}

/// Options for a [`crate::Subscription`].
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionOptions {
    /// How acks, nacks and lease extensions are batched.
    pub ack_batching: BatchOptions,
    /// A cap on the adaptive receive batch size, below the driver's own.
    pub max_receive_batch: Option<usize>,
    /// How long the subscription keeps extending the lease of a message
    /// that is held (fetched and not settled). Zero turns the lease keeper
    /// off. Default: 60 minutes.
    pub max_lease_extension: Duration,
    /// How temporary receive and ack failures are retried.
    pub retry: RetryPolicy,
    /// How long `shutdown` waits for the handlers that
    /// [`handle_concurrently`](crate::Subscription::handle_concurrently)
    /// is running to finish, so their acks are sent. Default: 30 s.
    pub drain_timeout: Duration,
    /// Whether each received message gets a consumer span, a child of the
    /// producer's span its attributes carry (with the `opentelemetry`
    /// feature; see `pubsub_core::trace`). Default: on.
    pub trace_context: bool,
    /// How long a nacked (or dropped) message waits before it is delivered
    /// again, by its delivery attempt. Default:
    /// [`NackBackoff::default`], 100 ms doubling each attempt up to 60 s,
    /// so a message that always fails does not spin its consumer and the
    /// broker. [`NackBackoff::none`] redelivers at once, as the Go CDK does.
    pub nack_backoff: NackBackoff,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            ack_batching: BatchOptions::default(),
            max_receive_batch: None,
            max_lease_extension: Duration::from_secs(60 * 60),
            retry: RetryPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            trace_context: true,
            nack_backoff: NackBackoff::default(),
        }
    }
}

impl SubscriptionOptions {
    /// Sets the ack batching options.
    pub fn with_ack_batching(mut self, batching: BatchOptions) -> Self {
        self.ack_batching = batching;
        self
    }

    /// Caps the receive batch size.
    pub fn with_max_receive_batch(mut self, n: usize) -> Self {
        self.max_receive_batch = Some(n);
        self
    }

    /// Sets the longest automatic lease extension; zero turns it off.
    pub fn with_max_lease_extension(mut self, d: Duration) -> Self {
        self.max_lease_extension = d;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how long shutdown waits for running handlers.
    pub fn with_drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Turns consumer spans on or off.
    pub fn with_trace_context(mut self, on: bool) -> Self {
        self.trace_context = on;
        self
    }

    /// Sets the redelivery delay of nacked messages.
    pub fn with_nack_backoff(mut self, backoff: NackBackoff) -> Self {
        self.nack_backoff = backoff;
        self
    }
}

/// How long a nacked message waits before it is delivered again: `initial`
/// on its first delivery, multiplied by `multiplier` for each delivery
/// after that, never more than `max`.
///
/// The attempt is the one the backend reports
/// ([`Message::delivery_attempt`](crate::Message::delivery_attempt)); where
/// it reports none (RabbitMQ's classic queues, Kafka's first reads), every
/// nack waits `initial`.
///
/// Where the backend can delay a redelivery itself (the in-memory broker,
/// SQS's visibility timeout, JetStream's delayed nak; see
/// [`Capabilities::max_nack_delay`](crate::Capabilities::max_nack_delay))
/// the nack is sent at once and the backend waits; elsewhere the
/// subscription holds the nacked message, keeping its lease, and nacks it
/// when the delay is over. Either way another consumer does not get the
/// message before then either, and a subscription shut down meanwhile
/// nacks what it holds at once.
///
/// ```
/// use std::time::Duration;
/// use pubsub_core::NackBackoff;
///
/// let b = NackBackoff::exponential(Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(b.delay(Some(1)), Duration::from_millis(100));
/// assert_eq!(b.delay(Some(3)), Duration::from_millis(400));
/// assert_eq!(b.delay(Some(9)), Duration::from_secs(1));
/// assert_eq!(b.delay(None), Duration::from_millis(100));
/// assert_eq!(NackBackoff::none().delay(Some(5)), Duration::ZERO);
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NackBackoff {
    /// The delay after a first delivery.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// How much longer each further delivery waits.
    pub multiplier: f64,
}

impl Default for NackBackoff {
    fn default() -> Self {
        NackBackoff::exponential(Duration::from_millis(100), Duration::from_secs(60))
    }
}

impl NackBackoff {
    /// No delay: a nacked message is redelivered at once.
    pub const fn none() -> Self {
        NackBackoff::fixed(Duration::ZERO)
    }

    /// The same delay after every delivery.
    pub const fn fixed(delay: Duration) -> Self {
        NackBackoff {
            initial: delay,
            max: delay,
            multiplier: 1.0,
        }
    }

    /// A delay starting at `initial` and doubling each delivery, up to `max`.
    pub const fn exponential(initial: Duration, max: Duration) -> Self {
        NackBackoff {
            initial,
            max,
            multiplier: 2.0,
        }
    }

    /// Sets the factor between one delivery's delay and the next's.
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The delay of a message nacked on delivery `attempt` (1 for the first;
    /// `None` where the backend does not count).
    pub fn delay(&self, attempt: Option<u32>) -> Duration {
        if self.initial.is_zero() {
            return Duration::ZERO;
        }
        let further = attempt.unwrap_or(1).saturating_sub(1).min(64) as i32;
        let factor = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier.powi(further)
        } else {
            1.0
        };
        let secs = self.initial.as_secs_f64() * factor;
        Duration::try_from_secs_f64(secs).map_or(self.max, |d| d.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_options_stay_within_driver_limits() {
        let driver = BatchLimits::new(10, 2).with_max_bytes(1000);
        let merged = BatchOptions::default()
            .with_max_batch_size(50)
            .with_min_batch_size(20)
            .with_max_batch_bytes(5000)
            .merge(driver);
        assert_eq!(merged.max_batch_size, 10);
        assert_eq!(merged.min_batch_size, 10);
        assert_eq!(merged.max_batch_bytes, Some(1000));
        assert_eq!(merged.max_handlers, 2);
        assert_eq!(BatchOptions::default().merge(driver), driver);
    }

    #[test]
    fn nack_backoff_stays_within_its_bounds() {
        let b = NackBackoff::exponential(Duration::from_millis(100), Duration::from_secs(60));
        assert_eq!(b, NackBackoff::default());
        assert_eq!(b.delay(Some(0)), Duration::from_millis(100));
        assert_eq!(b.delay(Some(2)), Duration::from_millis(200));
        assert_eq!(b.delay(Some(11)), Duration::from_secs(60));
        assert_eq!(b.delay(Some(u32::MAX)), Duration::from_secs(60));
        let odd = NackBackoff::exponential(Duration::from_secs(1), Duration::ZERO)
            .with_multiplier(f64::NAN);
        assert_eq!(odd.delay(Some(3)), Duration::ZERO, "max wins");
        let shrinking = NackBackoff::fixed(Duration::from_secs(2)).with_multiplier(0.5);
        assert_eq!(shrinking.delay(Some(4)), Duration::from_secs(2));
        let huge =
            NackBackoff::exponential(Duration::from_secs(1), Duration::MAX).with_multiplier(1e300);
        assert_eq!(huge.delay(Some(3)), Duration::MAX);
    }
}
