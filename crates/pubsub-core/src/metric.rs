//! The metrics topics and subscriptions record, through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install a recorder (for example `metrics-exporter-prometheus`) before
//! opening topics and subscriptions: each registers its handles once, when
//! it is made, so that a message costs no lookup, and one made before the
//! recorder records nothing. Without a recorder every handle is a no-op,
//! and nothing is timed: a clock read a message would cost a lone send
//! about a tenth of its time. (The facade cannot be asked whether a
//! recorder is installed; a zero-sized one, which only the facade's own
//! no-op recorder is in practice, counts as none, and a topic or
//! subscription made under it records no durations.)
//!
//! Names follow OpenTelemetry's messaging semantic conventions where one
//! exists ([`SENT`], [`CONSUMED`], [`OPERATION_DURATION`]); the rest are
//! this library's, under `pubsub.`. Every metric carries
//! `messaging.system` (OpenTelemetry's name for the backend where the
//! conventions give one, `rabbitmq`, `kafka`, `gcp_pubsub`, `aws_sqs` or
//! `aws.sns`, else the driver's: `mem`, `nats`, `redis`)
//! and `messaging.destination.name` (a topic's resource) or
//! `messaging.destination.subscription.name` (a subscription's). Per-call
//! metrics add `messaging.operation.name` (`send`, `receive`, `ack`,
//! `nack`, `extend`); failed sends add `error.type`, the [`ErrorKind`]
//! as [`ErrorKind::as_str`] names it (`unavailable`, `not found`...). Durations are in seconds.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pubsub_core::Result<()> {
//! // With a recorder installed (here none is), these are the names to chart.
//! assert_eq!(pubsub_core::metric::SENT, "messaging.client.sent.messages");
//! let broker = pubsub_core::mem::Broker::new();
//! broker.create_topic("orders")?;
//! let topic = broker.topic("orders");
//! topic.send(pubsub_core::Message::new("recorded, if a recorder is installed")).await?;
//! # topic.shutdown().await
//! # }
//! ```

use std::time::{Duration, Instant};

use ::metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};

use crate::error::ErrorKind;

/// Messages a topic's backend accepted (counter); with `error.type`, sends
/// that failed, by error kind.
pub const SENT: &str = "messaging.client.sent.messages";
/// Messages a subscription handed to the application (counter).
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// How long each driver call took (histogram, seconds), by
/// `messaging.operation.name`. Acks and nacks a backend settles locally
/// ([`Capabilities::local_settlement`](crate::Capabilities::local_settlement):
/// mem, Kafka's stored offsets) are bookkeeping on the acking thread, not
/// calls, and are left out of this and [`BATCH_SIZE`]; they are counted in
/// [`ACKED`] and [`NACKED`].
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// How long a send took from the call to the backend's acceptance,
/// batching and retries included (histogram, seconds).
pub const SEND_DURATION: &str = "pubsub.send.duration";
/// Messages in each driver call (histogram), by `messaging.operation.name`.
pub const BATCH_SIZE: &str = "pubsub.batch.messages";
/// Driver calls retried after a temporary failure (counter), by
/// `messaging.operation.name`.
pub const RETRIES: &str = "pubsub.retries";
/// Messages acked (counter).
pub const ACKED: &str = "pubsub.acked.messages";
/// Messages the application nacked or dropped, on a backend that can nack
/// (counter); as `SubscriptionStats::nacked`. Messages fetched and never
/// handed out, nacked at shutdown, are not counted.
pub const NACKED: &str = "pubsub.nacked.messages";
/// Messages dropped without an ack or nack (counter).
pub const DROPPED: &str = "pubsub.dropped.messages";
/// Messages received again, where the backend tells a delivery attempt
/// above one (counter).
pub const REDELIVERED: &str = "pubsub.redelivered.messages";
/// Messages fetched and not yet handed out (gauge), summed over the
/// handles open on one subscription in the process.
pub const QUEUED: &str = "pubsub.receive.queued.messages";
/// Leases extended, by the lease keeper or `Message::extend_lease`
/// (counter).
pub const LEASES_EXTENDED: &str = "pubsub.leases.extended";

/// The labels every metric of one topic or subscription carries, and
/// whether a recorder is there to take durations.
#[derive(Clone)]
pub(crate) struct Labels {
    labels: Vec<Label>,
    pub(crate) timed: bool,
}

/// Whether a recorder other than the facade's no-op one is in force.
fn recording() -> bool {
    ::metrics::with_recorder(|r| std::mem::size_of_val(r) != 0)
}

impl Labels {
    pub(crate) fn topic(driver: &'static str, resource: &str) -> Self {
        Self::new(driver, "messaging.destination.name", resource)
    }

    pub(crate) fn subscription(driver: &'static str, resource: &str) -> Self {
        Self::new(driver, "messaging.destination.subscription.name", resource)
    }

    fn new(driver: &'static str, destination: &'static str, resource: &str) -> Self {
        Labels {
            labels: vec![
                Label::new("messaging.system", driver),
                Label::new(destination, resource.to_owned()),
            ],
            timed: recording(),
        }
    }

    /// The time now, if durations are recorded.
    #[inline]
    pub(crate) fn start(&self) -> Option<Instant> {
        self.timed.then(Instant::now)
    }

    fn with(&self, key: &'static str, value: &'static str) -> Vec<Label> {
        let mut l = self.labels.clone();
        l.push(Label::new(key, value));
        l
    }

    pub(crate) fn counter(&self, name: &'static str) -> Counter {
        counter!(name, self.labels.iter())
    }

    pub(crate) fn gauge(&self, name: &'static str) -> Gauge {
        gauge!(name, self.labels.iter())
    }

    pub(crate) fn histogram(&self, name: &'static str) -> Histogram {
        histogram!(name, self.labels.iter())
    }

    /// Counts a failed send of this kind. Registered when it happens: a
    /// failure is rare enough to afford the lookup.
    pub(crate) fn send_failed(&self, kind: ErrorKind) {
        counter!(SENT, self.with("error.type", kind.as_str()).iter()).increment(1);
    }

    /// The handles of one kind of driver call.
    pub(crate) fn call(&self, operation: &'static str) -> CallMetrics {
        let l = self.with("messaging.operation.name", operation);
        CallMetrics {
            timed: self.timed,
            duration: histogram!(OPERATION_DURATION, l.iter()),
            batch: histogram!(BATCH_SIZE, l.iter()),
            retries: counter!(RETRIES, l.iter()),
        }
    }
}

/// Duration, batch size and retries of one kind of driver call.
pub(crate) struct CallMetrics {
    timed: bool,
    duration: Histogram,
    batch: Histogram,
    pub(crate) retries: Counter,
}

impl CallMetrics {
    /// The time a call starts, if durations are recorded.
    #[inline]
    pub(crate) fn start(&self) -> Option<Instant> {
        self.timed.then(Instant::now)
    }

    /// Records a call of `items` that began at `started`.
    pub(crate) fn record(&self, items: usize, started: Option<Instant>) {
        if let Some(t) = started {
            self.duration.record(t.elapsed());
        }
        self.batch.record(items as f64);
    }

    /// Records a call of `items` that took `took`, timed anyway.
    pub(crate) fn record_took(&self, items: usize, took: Duration) {
        self.duration.record(took);
        self.batch.record(items as f64);
    }
}

/// The handles a subscription's receiving side records with.
pub(crate) struct ReceiveMetrics {
    pub(crate) consumed: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) queued: Gauge,
    pub(crate) receive: CallMetrics,
}

impl ReceiveMetrics {
    pub(crate) fn new(labels: &Labels) -> Self {
        ReceiveMetrics {
            consumed: labels.counter(CONSUMED),
            redelivered: labels.counter(REDELIVERED),
            queued: labels.gauge(QUEUED),
            receive: labels.call("receive"),
        }
    }
}

/// The handles a subscription's settling side records with.
pub(crate) struct SettleMetrics {
    pub(crate) acked: Counter,
    pub(crate) nacked: Counter,
    pub(crate) dropped: Counter,
    pub(crate) extended: Counter,
}

impl SettleMetrics {
    pub(crate) fn new(labels: &Labels) -> Self {
        SettleMetrics {
            acked: labels.counter(ACKED),
            nacked: labels.counter(NACKED),
            dropped: labels.counter(DROPPED),
            extended: labels.counter(LEASES_EXTENDED),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::CompositeKey;

    /// One snapshot (taking one resets every counter and histogram).
    type Snap = Vec<(CompositeKey, DebugValue)>;

    fn snapshot(recorder: &DebuggingRecorder) -> Snap {
        let s = recorder.snapshotter().snapshot().into_vec();
        s.into_iter().map(|(k, _, _, v)| (k, v)).collect()
    }

    use super::*;
    use crate::mem::Broker;
    use crate::Message;

    /// The value of the one metric named `name` whose labels include all of
    /// `labels`, and no `error.type` unless asked.
    fn value<'a>(snap: &'a Snap, name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
        let found: Vec<&DebugValue> = snap
            .iter()
            .filter(|(k, _)| {
                let key = k.key();
                let has = |(lk, lv): &(&str, &str)| {
                    key.labels().any(|l| l.key() == *lk && l.value() == *lv)
                };
                key.name() == name
                    && labels.iter().all(has)
                    && (labels.iter().any(|(lk, _)| *lk == "error.type")
                        || !key.labels().any(|l| l.key() == "error.type"))
            })
            .map(|(_, v)| v)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matched {found:?}");
        found.into_iter().next()
    }

    fn count(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> u64 {
        match value(snap, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            other => panic!("{name} {labels:?} is not a counter: {other:?}"),
        }
    }

    #[test]
    fn durations_are_taken_only_under_a_recorder() {
        assert!(!recording(), "no recorder is installed in these tests");
        let r = DebuggingRecorder::new();
        ::metrics::with_local_recorder(&r, || assert!(recording()));
    }

    /// A broker with topic `orders` and its subscription `billing`, and
    /// the topic.
    fn orders_for_billing() -> (Broker, crate::Topic) {
        let broker = Broker::new();
        broker.create_topic("orders").unwrap();
        broker
            .create_subscription("billing", "orders", Duration::from_secs(30))
            .unwrap();
        let topic = broker.topic("orders");
        (broker, topic)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_round_trip_is_counted_with_its_labels() {
        let recorder = DebuggingRecorder::new();
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        let (broker, topic) = orders_for_billing();
        let sub = broker.subscription("billing");
        for i in 0..3 {
            topic.send(Message::new(format!("m{i}"))).await.unwrap();
        }
        let bad = topic.send(Message::new("x").with_attribute("", "v")).await;
        assert!(bad.is_err());
        let snap = snapshot(&recorder);
        let t = [
            ("messaging.system", "mem"),
            ("messaging.destination.name", "orders"),
        ];
        assert_eq!(count(&snap, SENT, &t), 3);
        let failed = [t[0], t[1], ("error.type", "invalid argument")];
        assert_eq!(count(&snap, SENT, &failed), 1);
        match value(&snap, SEND_DURATION, &t) {
            Some(DebugValue::Histogram(v)) => {
                assert_eq!(v.len(), 3);
                assert!(v.iter().all(|s| s.0 >= 0.0 && s.0 < 10.0), "{v:?}");
            }
            other => panic!("send duration: {other:?}"),
        }
        let send = [t[0], t[1], ("messaging.operation.name", "send")];
        match value(&snap, BATCH_SIZE, &send) {
            Some(DebugValue::Histogram(v)) => {
                assert_eq!(v.iter().map(|n| n.0).sum::<f64>(), 3.0, "{v:?}")
            }
            other => panic!("send batch sizes: {other:?}"),
        }

        let first = sub.receive().await.unwrap();
        first.nack();
        let mut again = None;
        for _ in 0..3 {
            let m = sub.receive().await.unwrap();
            if m.delivery_attempt() == Some(2) {
                again = Some(m);
            } else {
                m.ack();
            }
        }
        let again = again.expect("the nacked message came back");
        again.extend_lease(Duration::from_secs(60)).await.unwrap();
        drop(again);
        sub.shutdown().await.unwrap();
        topic.shutdown().await.unwrap();
        let snap = snapshot(&recorder);
        let s = [
            ("messaging.system", "mem"),
            ("messaging.destination.subscription.name", "billing"),
        ];
        assert_eq!(count(&snap, CONSUMED, &s), 4);
        assert_eq!(count(&snap, REDELIVERED, &s), 1);
        assert_eq!(count(&snap, ACKED, &s), 2);
        // The nack, and the redelivery dropped unsettled (which nacks it).
        assert_eq!(count(&snap, NACKED, &s), 2);
        assert_eq!(count(&snap, DROPPED, &s), 1);
        assert_eq!(count(&snap, LEASES_EXTENDED, &s), 1);
        let receive = [s[0], s[1], ("messaging.operation.name", "receive")];
        match value(&snap, OPERATION_DURATION, &receive) {
            Some(DebugValue::Histogram(v)) => assert!(!v.is_empty()),
            other => panic!("receive durations: {other:?}"),
        }
        match value(&snap, QUEUED, &s) {
            Some(DebugValue::Gauge(n)) => assert_eq!(n.0, 0.0),
            other => panic!("queue depth: {other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn handles_on_one_subscription_add_up_in_the_queue_depth() {
        let recorder = DebuggingRecorder::new();
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        let (broker, topic) = orders_for_billing();
        let (a, b) = (
            broker.subscription("billing"),
            broker.subscription("billing"),
        );
        let s = [
            ("messaging.system", "mem"),
            ("messaging.destination.subscription.name", "billing"),
        ];
        // A snapshot hands over the gauge's value and starts it again from
        // zero, so the depth is the sum of the snapshots.
        let total = std::cell::Cell::new(0.0);
        let depth = || {
            match value(&snapshot(&recorder), QUEUED, &s) {
                Some(DebugValue::Gauge(n)) => total.set(total.get() + n.0),
                None => {}
                other => panic!("queue depth: {other:?}"),
            }
            total.get()
        };
        // Each handle fetches a batch and hands out one message of it.
        let mut held = Vec::new();
        for sub in [&a, &b] {
            for i in 0..10 {
                topic.send(Message::new(format!("m{i}"))).await.unwrap();
            }
            held.push(sub.receive().await.unwrap());
        }
        let (qa, qb) = (a.stats().queued, b.stats().queued);
        assert!(qa > 0 && qb > 0, "both handles hold messages: {qa}, {qb}");
        assert_eq!(depth(), (qa + qb) as f64);
        drop(held);
        a.shutdown().await.unwrap();
        assert_eq!(depth(), b.stats().queued as f64);
        b.shutdown().await.unwrap();
        assert_eq!(depth(), 0.0);
        topic.shutdown().await.unwrap();
    }
}
