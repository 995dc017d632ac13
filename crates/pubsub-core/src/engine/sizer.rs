//! The adaptive receive batch size.

use std::time::{Duration, Instant};

/// The queue aims to hold about this much work, measured by throughput.
const TARGET_QUEUE_DURATION: Duration = Duration::from_secs(2);
/// Without a full batch handed out, the size is re-measured this often.
const RESIZE_WINDOW: Duration = Duration::from_millis(100);
/// Each whole idle period of this length shrinks the batch size once more.
const IDLE_STEP: Duration = Duration::from_secs(1);

/// Adapts the receive batch size to throughput: aim at about two seconds
/// of messages, grow at most x2 and shrink at most x0.75 a step, and decay
/// while idle.
#[derive(Debug)]
pub(crate) struct BatchSizer {
    size: f64,
    max: f64,
    /// Messages handed out since the size was last measured.
    pub(crate) handed: u64,
    since: Instant,
}

impl BatchSizer {
    pub(crate) fn new(max: usize) -> Self {
        BatchSizer {
            size: 1.0,
            max: max.max(1) as f64,
            handed: 0,
            since: Instant::now(),
        }
    }

    pub(crate) fn current(&self) -> usize {
        self.size as usize
    }

    /// Called before each fetch; returns how many messages to ask for.
    pub(crate) fn next(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.since);
        if (self.handed as f64) >= self.size || elapsed >= RESIZE_WINDOW {
            let secs = elapsed.as_secs_f64().max(1e-6);
            let desired = self.handed as f64 / secs * TARGET_QUEUE_DURATION.as_secs_f64();
            let idle_steps = (elapsed.as_secs_f64() / IDLE_STEP.as_secs_f64())
                .floor()
                .max(1.0);
            let floor = self.size * 0.75f64.powf(idle_steps.min(64.0));
            self.size = desired.clamp(floor, self.size * 2.0).clamp(1.0, self.max);
            self.handed = 0;
            self.since = now;
        }
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_grows_at_most_twice_and_shrinks_at_most_by_a_quarter() {
        let t0 = Instant::now();
        let mut s = BatchSizer::new(10_000);
        s.since = t0;
        s.handed = 1000;
        assert_eq!(s.next(t0 + Duration::from_millis(10)), 2, "x2 at most");
        s.handed = 1000;
        assert_eq!(s.next(t0 + Duration::from_millis(20)), 4);
        for i in 0..20 {
            s.handed = 100_000;
            s.next(t0 + Duration::from_millis(30 + i));
        }
        assert_eq!(s.current(), 10_000, "capped by the driver");
        s.handed = 0;
        assert_eq!(
            s.next(t0 + Duration::from_millis(500)),
            7500,
            "x0.75 at most"
        );
        // Ten idle seconds decay ten steps at once.
        let n = s.next(t0 + Duration::from_millis(10_500));
        assert_eq!(n, (7500.0 * 0.75f64.powi(10)) as usize);
    }
}
