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
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// A policy with the given first and largest ceilings.
    pub fn new(initial: Duration, max: Duration) -> Self {
        RetryPolicy { initial, max }
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
