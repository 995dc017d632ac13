//! Capped exponential backoff with full jitter.
//!
//! Only the core retries; drivers report temporary errors and return.

use std::time::Duration;

/// How the core waits between attempts after a temporary error.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the first wait.
    pub initial: Duration,
    /// The largest ceiling any wait can have.
    pub max: Duration,
    /// How long one operation is retried before the core gives up on it
    /// with a temporary `DeadlineExceeded` error naming the last failure;
    /// `None` retries for as long as it takes. Sends default to 60 s (see
    /// [`TopicOptions`](crate::TopicOptions)); receives and acks to `None`,
    /// so a worker rides out an outage of any length.
    pub give_up_after: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            give_up_after: None,
        }
    }
}

impl RetryPolicy {
    /// A policy with the given first and largest ceilings.
    pub fn new(initial: Duration, max: Duration) -> Self {
        RetryPolicy {
            initial,
            max,
            give_up_after: None,
        }
    }

    /// Sets how long one operation is retried; `None` for no limit.
    pub fn with_give_up_after(mut self, limit: Option<Duration>) -> Self {
        self.give_up_after = limit;
        self
    }

    /// When an operation starting now began, for [`give_up`](Self::give_up);
    /// no clock read without a limit.
    pub(crate) fn started(&self) -> Option<tokio::time::Instant> {
        self.give_up_after.map(|_| tokio::time::Instant::now())
    }

    /// The error that ends retrying `last` after `attempts` attempts, if
    /// waiting `wait` more would pass the limit for an operation that
    /// began at `started` (from [`started`](Self::started)).
    pub(crate) fn give_up(
        &self,
        started: Option<tokio::time::Instant>,
        wait: Duration,
        attempts: u32,
        last: &crate::Error,
    ) -> Option<crate::Error> {
        let limit = self.give_up_after?;
        let elapsed = started?.elapsed();
        if elapsed + wait <= limit {
            return None;
        }
        // The last failure is the source, shown after this message.
        let e = crate::Error::new(
            crate::ErrorKind::DeadlineExceeded,
            format!(
                "gave up after {attempts} attempts in {:.1} s (the retry limit is {} s)",
                elapsed.as_secs_f64(),
                limit.as_secs_f64()
            ),
        )
        .with_temporary(true)
        .with_source(last.clone());
        Some(e)
    }

    /// The wait before retry number `attempt` (0 for the first retry): a
    /// uniformly random time between zero and the capped exponential
    /// ceiling, so that many clients hit by one outage do not retry in step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(100));
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(10 * (1u64 << attempt.min(4))).min(p.max);
            for _ in 0..50 {
                assert!(p.backoff(attempt) <= ceiling);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(10)).collect();
        assert!(distinct.len() > 10, "waits are jittered");
    }
}
