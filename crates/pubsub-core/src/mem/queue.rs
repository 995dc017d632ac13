//! A subscription's queues: the messages sent to it, those ready to be
//! received, those received and not yet settled with their deadlines, and
//! the acks not yet applied.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{lock, Stored, ACKS_HELD};
use crate::token_map::TokenMap;

/// A subscription's state.
pub(super) struct SubState {
    pub(super) ack_deadline: Duration,
    pub(super) q: Mutex<SubQueue>,
    /// Messages sent since a receive last took them into `q`. Senders,
    /// receivers and ackers each have a lock of their own, so that none
    /// waits on the others: with one lock for all three, taking it was a
    /// fifth of a one-sender, one-receiver pipeline's time.
    pub(super) incoming: Mutex<Vec<(Stored, u32)>>,
    /// Tags acked since `q` was last locked, applied by [`SubState::queue`]
    /// before anything reads `q`: an acked delivery is never redelivered.
    pub(super) acked: Mutex<Vec<u64>>,
    pub(super) notify: Notify,
    /// Receives waiting on `notify`; counted before they look at
    /// `incoming` a last time, senders read it after they push there.
    pub(super) waiting: AtomicUsize,
    pub(super) deleted: AtomicBool,
}

/// What a subscription holds, under one lock.
#[derive(Default)]
pub(super) struct SubQueue {
    pub(super) ready: VecDeque<(Stored, u32)>,
    pub(super) outstanding: TokenMap<Outstanding>,
    /// The deadlines of received batches, oldest first: a batch's tags run
    /// on from `first` and share the deadline it was received with, read
    /// under the queue's lock, so they only grow and need no heap (a heap
    /// push a message cost a twentieth of the many-topic rows of the
    /// benchmark).
    received: VecDeque<BatchDeadline>,
    /// Deadlines set out of that order (extended leases, delayed nacks).
    pub(super) deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    pub(super) next_tag: u64,
    /// The buffer `SubState::acked` gets back once its tags are applied.
    spare_acks: Vec<u64>,
}

/// The deadline the tags `first..end` of one received batch were given.
struct BatchDeadline {
    deadline: Instant,
    first: u64,
    end: u64,
}

/// A delivery received and not yet settled.
pub(super) struct Outstanding {
    pub(super) msg: Stored,
    pub(super) attempts: u32,
    pub(super) deadline: Instant,
}

impl SubQueue {
    /// Moves deliveries whose deadline passed back to the front of the
    /// queue, earliest deadline (then tag) first, as one heap of them would.
    pub(super) fn reap(&mut self, now: Instant) {
        loop {
            self.skip_settled_received();
            let batch = self.received.front().map(|b| (b.deadline, b.first));
            let other = self.deadlines.peek().map(|Reverse(d)| *d);
            let (deadline, tag, from_batch) = match (batch, other) {
                (Some(b), Some(o)) if o < b => (o.0, o.1, false),
                (Some(b), _) => (b.0, b.1, true),
                (None, Some(o)) => (o.0, o.1, false),
                (None, None) => break,
            };
            if deadline > now {
                break;
            }
            if from_batch {
                self.pop_received_tag();
            } else {
                self.deadlines.pop();
            }
            if self.is_due(tag, deadline) {
                let o = self.outstanding.remove(&tag).expect("present");
                self.ready.push_front((o.msg, o.attempts));
            }
        }
        // A delivery held at the front keeps every batch behind it queued,
        // settled or not: once they outnumber the outstanding deliveries,
        // its tag moves to the heap (same order there) and the settled ones
        // behind it go.
        while self.received.len() > self.outstanding.len() + 1024 {
            let Some(b) = self.received.front() else {
                break;
            };
            self.deadlines.push(Reverse((b.deadline, b.first)));
            self.pop_received_tag();
            self.skip_settled_received();
        }
        // Acked deliveries leave stale deadline entries behind; drop them
        // once they outnumber live ones so memory follows the backlog.
        if self.deadlines.len() > 2 * self.outstanding.len() + 1024 {
            let live = &self.outstanding;
            self.deadlines
                .retain(|Reverse((d, t))| live.get(t).is_some_and(|o| o.deadline == *d));
        }
    }

    /// Whether `tag` is outstanding with `deadline` as its deadline still.
    fn is_due(&self, tag: u64, deadline: Instant) -> bool {
        self.outstanding
            .get(&tag)
            .is_some_and(|o| o.deadline == deadline)
    }

    /// Drops the oldest batch's first tag.
    fn pop_received_tag(&mut self) {
        if let Some(b) = self.received.front_mut() {
            b.first += 1;
            if b.first >= b.end {
                self.received.pop_front();
            }
        }
    }

    /// Drops the leading tags of the oldest batches that were settled (or
    /// given another deadline): acks come mostly in the order of receipt,
    /// so this usually leaves few batches ahead of the first outstanding
    /// delivery (`reap` bounds the rest).
    fn skip_settled_received(&mut self) {
        while let Some(b) = self.received.front() {
            if self.is_due(b.first, b.deadline) {
                return;
            }
            self.pop_received_tag();
        }
    }

    /// Records that the tags `first..end` were received with `deadline`.
    pub(super) fn record_received(&mut self, deadline: Instant, first: u64, end: u64) {
        if first < end {
            self.received.push_back(BatchDeadline {
                deadline,
                first,
                end,
            });
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let batch = self.received.front().map(|b| b.deadline);
        let other = self.deadlines.peek().map(|Reverse((d, _))| *d);
        batch.into_iter().chain(other).min()
    }
}

impl SubState {
    pub(super) fn new(ack_deadline: Duration) -> Self {
        SubState {
            ack_deadline,
            q: Mutex::new(SubQueue::default()),
            incoming: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
        }
    }

    /// The queue, locked, with the acks made since it was last locked
    /// applied.
    pub(super) fn queue(&self) -> MutexGuard<'_, SubQueue> {
        let mut q = lock(&self.q);
        let spare = std::mem::take(&mut q.spare_acks);
        let mut acked = std::mem::replace(&mut *lock(&self.acked), spare);
        for tag in acked.drain(..) {
            q.outstanding.remove(&tag);
        }
        q.spare_acks = acked;
        q
    }

    /// Records acks of `tags`, to be applied when the queue is next locked;
    /// applies them now once many are waiting, so that a subscription
    /// nobody receives from any more still lets its acked messages go.
    pub(super) fn ack(&self, tags: impl Iterator<Item = u64>) {
        let mut acked = lock(&self.acked);
        acked.extend(tags);
        let many = acked.len() >= ACKS_HELD;
        drop(acked);
        if many {
            drop(self.queue());
        }
    }

    /// Moves the messages sent since the last call to the back of the
    /// ready queue. Receives call it once that queue is empty: the sent
    /// messages then become the ready queue as they are, and its empty
    /// buffer takes the next sends, so no message is copied.
    pub(super) fn take_incoming(&self, q: &mut SubQueue) {
        let mut incoming = lock(&self.incoming);
        if incoming.is_empty() {
            return;
        }
        if q.ready.is_empty() {
            let spare = Vec::from(std::mem::take(&mut q.ready));
            q.ready = VecDeque::from(std::mem::replace(&mut *incoming, spare));
        } else {
            q.ready.extend(incoming.drain(..));
        }
    }

    /// Wakes waiting receives after messages were pushed to `incoming`;
    /// without waiters, skips the notifier's own lock.
    pub(super) fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{AckId, Attributes, Subscription as _, Topic as _};
    use crate::mem::{Broker, Record, POLL};
    use crate::mem::{SubscriptionDriver, TopicDriver};
    use bytes::Bytes;
    use std::sync::Arc;

    fn stored(seq: u64) -> Stored {
        Stored {
            seq,
            record: Record {
                body: Bytes::new(),
                attributes: Attributes::new(),
                ordering_key: None,
            },
        }
    }

    /// Hands out `n` queued-in-place deliveries as one batch with
    /// `deadline`, as `receive_batch` does; returns their tags.
    fn receive(q: &mut SubQueue, n: u64, deadline: Instant) -> std::ops::Range<u64> {
        let first = q.next_tag;
        for _ in 0..n {
            let tag = q.next_tag;
            q.next_tag += 1;
            let o = Outstanding {
                msg: stored(tag),
                attempts: 1,
                deadline,
            };
            q.outstanding.insert(tag, o);
        }
        q.record_received(deadline, first, q.next_tag);
        first..q.next_tag
    }

    /// One delivery held at the front while thousands of batches behind it
    /// are received and acked keeps no entry a batch for them; it still
    /// comes back at its deadline, once.
    #[test]
    fn a_delivery_held_at_the_front_does_not_keep_every_batch_behind_it() {
        let mut q = SubQueue::default();
        let t0 = Instant::now();
        let deadline = Duration::from_secs(60);
        let held = receive(&mut q, 1, t0 + deadline).start;
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_micros(i);
            q.reap(now);
            for tag in receive(&mut q, 2, now + deadline) {
                q.outstanding.remove(&tag);
            }
        }
        q.reap(t0 + Duration::from_millis(30));
        assert!(
            q.received.len() + q.deadlines.len() <= 2_100,
            "{} batch entries and {} heap entries for one outstanding delivery",
            q.received.len(),
            q.deadlines.len()
        );
        q.reap(t0 + deadline + Duration::from_secs(1));
        let back: Vec<u64> = q.ready.iter().map(|(m, _)| m.seq).collect();
        assert_eq!(back, [held]);
        assert_eq!(q.outstanding.len(), 0);
    }

    /// Redeliveries come earliest deadline first (then by tag), whether a
    /// deadline came with its batch or from an extension.
    #[test]
    fn redeliveries_follow_the_deadlines_across_batches_and_extensions() {
        let mut q = SubQueue::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Tags 0, 1, 2, then 3, 4.
        let a = receive(&mut q, 3, t0 + s(10));
        let b = receive(&mut q, 2, t0 + s(20));
        // Tag 1 extended past tag 3's deadline, tag 4 brought before tag 0's.
        for (tag, due) in [(a.start + 1, t0 + s(25)), (b.start + 1, t0 + s(5))] {
            q.outstanding.get_mut(&tag).unwrap().deadline = due;
            q.deadlines.push(Reverse((due, tag)));
        }
        q.outstanding.remove(&(a.start + 2));
        q.reap(t0 + s(30));
        // Each is pushed to the front as it comes due: the latest is first.
        let order: Vec<u64> = q.ready.iter().map(|(m, _)| m.seq).collect();
        assert_eq!(order, [1, 3, 0, 4]);
        assert_eq!(q.outstanding.len(), 0);
        q.reap(t0 + s(60));
        assert_eq!(q.ready.len(), 4, "each came back once");
    }

    fn outgoing(body: &'static str) -> crate::driver::OutgoingMessage {
        crate::driver::OutgoingMessage::new(body)
    }

    /// A subscription with `n` messages delivered, its drivers, and the
    /// deliveries' ack ids.
    async fn delivered(
        deadline: Duration,
        n: usize,
    ) -> (Broker, TopicDriver, SubscriptionDriver, Vec<AckId>) {
        let broker = Broker::new();
        broker.create_topic("t").unwrap();
        broker.create_subscription("s", "t", deadline).unwrap();
        let (topic, sub) = (broker.topic_driver("t"), broker.subscription_driver("s"));
        let batch: Vec<_> = (0..n).map(|_| outgoing("m")).collect();
        topic.send_batch(&batch).await.unwrap();
        let got = sub.receive_batch(n).await.unwrap();
        assert_eq!(got.len(), n);
        let ids = got.into_iter().map(|m| m.ack_id).collect();
        (broker, topic, sub, ids)
    }

    /// Acks wait to be applied until the queue is next locked; a deadline
    /// that passed meanwhile still does not bring an acked delivery back.
    #[tokio::test(flavor = "current_thread")]
    async fn a_held_ack_is_applied_before_deadlines_are_read() {
        let (broker, topic, sub, ids) = delivered(Duration::from_millis(50), 1).await;
        sub.send_acks(&ids).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        topic.send_batch(&[outgoing("next")]).await.unwrap();
        let got = sub.receive_batch(10).await.unwrap();
        let bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
        assert_eq!(bodies, [Bytes::from("next")], "the acked one came back");
        assert_eq!(broker.backlog("s").unwrap(), 1);
    }

    /// Acks nobody's receive applies are applied by the acker once many
    /// wait, so their messages are let go.
    #[tokio::test(flavor = "current_thread")]
    async fn many_held_acks_are_applied_by_the_acker() {
        let (broker, _topic, sub, ids) = delivered(Duration::from_secs(60), 3 * ACKS_HELD).await;
        for id in &ids {
            sub.send_acks(std::slice::from_ref(id)).await.unwrap();
        }
        let s = broker.sub_state("s").unwrap();
        let held = lock(&s.acked).len();
        assert!(held < ACKS_HELD, "{held} acks held");
        assert!(lock(&s.q).outstanding.len() < ACKS_HELD);
    }

    /// Closing a subscription applies the acks it holds, so their messages
    /// go even though nobody receives from it again.
    #[tokio::test(flavor = "current_thread")]
    async fn closing_applies_the_held_acks() {
        let (broker, _topic, sub, ids) = delivered(Duration::from_secs(60), 1).await;
        sub.send_acks(&ids).await.unwrap();
        sub.close().await.unwrap();
        let s = broker.sub_state("s").unwrap();
        assert_eq!(lock(&s.q).outstanding.len(), 0);
    }

    /// A receive waiting for messages is woken by the send that brings
    /// one, not by its poll running out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_receive_is_woken_by_a_send() {
        let broker = Broker::new();
        broker.create_topic("t").unwrap();
        broker
            .create_subscription("s", "t", Duration::from_secs(60))
            .unwrap();
        let topic = broker.topic_driver("t");
        let sub = Arc::new(broker.subscription_driver("s"));
        let s = broker.sub_state("s").unwrap();
        for _ in 0..20 {
            let receiving = tokio::spawn({
                let sub = sub.clone();
                async move {
                    let got = sub.receive_batch(10).await.unwrap();
                    (got.len(), Instant::now())
                }
            });
            while s.waiting.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            let sent = Instant::now();
            topic.send_batch(&[outgoing("m")]).await.unwrap();
            let (n, at) = receiving.await.unwrap();
            assert_eq!(n, 1);
            let took = at.saturating_duration_since(sent);
            assert!(took < POLL / 2, "woken after {took:?}");
        }
    }
}
