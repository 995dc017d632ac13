//! The in-memory topic and subscription drivers.

use std::any::Any;
use std::cmp::Reverse;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::resolved::{Resolved, StateRef};
use super::{
    lock, Broker, Delivery, Outstanding, Record, Stored, SubQueue, SubState, TopicState,
    DEFAULT_ACK_DEADLINE, DRIVER, POLL,
};
use crate::driver::{
    self, AckId, BatchError, Capabilities, Deliveries, Nacked, OutgoingMessage, ReceivedMessage,
    Sent, Settlement,
};
use crate::error::{Error, Result};

/// The in-memory topic driver.
pub struct TopicDriver {
    broker: Broker,
    name: String,
    resolved: Resolved<TopicState>,
}

impl TopicDriver {
    pub(super) fn new(broker: Broker, name: &str) -> Self {
        TopicDriver {
            broker,
            name: name.to_owned(),
            resolved: Resolved::default(),
        }
    }
}

impl TopicDriver {
    /// The topic's state, looked up again once the cached one was deleted,
    /// so a handle works again when the topic is re-created.
    fn state(&self) -> Result<StateRef<'_, TopicState>> {
        self.resolved.get(|| {
            let found = lock(&self.broker.inner.topics).get(&self.name).cloned();
            found.ok_or_else(|| self.missing())
        })
    }

    fn missing(&self) -> Error {
        Error::not_found(format!("topic {:?} does not exist", self.name))
    }
}

impl fmt::Debug for TopicDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("mem::TopicDriver")
            .field("name", &self.name)
            .finish()
    }
}

#[async_trait]
impl driver::Topic for TopicDriver {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        let t = self.state()?;
        let first = t.next_seq.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let record = |m: &OutgoingMessage| Record {
            body: m.body.clone(),
            attributes: m.attributes.clone(),
            ordering_key: m.ordering_key.clone(),
        };
        let unhooked = || {
            batch.iter().zip(first..).map(|(m, seq)| Stored {
                seq,
                record: record(m),
            })
        };
        let mut failed = Vec::new();
        // Hooks are user code: they run before any broker lock is taken
        // (one that opened or deleted a subscription would deadlock).
        let hooked = batch.iter().any(|m| m.before_send.is_some());
        let mut stored = Vec::new();
        if hooked {
            stored.reserve(batch.len());
            for (i, m) in batch.iter().enumerate() {
                let mut r = record(m);
                match m.run_before_send(&mut r) {
                    Ok(()) => stored.push(Stored {
                        seq: first + i as u64,
                        record: r,
                    }),
                    Err(e) => failed.push((i, e)),
                }
            }
        }
        {
            let subs = t.subs.read().unwrap_or_else(|p| p.into_inner());
            match &subs[..] {
                // Without hooks the records go straight into the one
                // subscription's queue: no batch of them is built.
                [only] if !hooked => {
                    lock(&only.incoming).extend(unhooked().map(|m| (m, 0)));
                    only.wake();
                }
                subs => {
                    if !hooked {
                        stored = unhooked().collect();
                    }
                    // Each subscription keeps a copy of its own (a body is
                    // shared, attributes are copied), as a broker does: the
                    // last one takes the batch's.
                    if let Some((last, others)) = subs.split_last() {
                        for s in others {
                            lock(&s.incoming).extend(stored.iter().map(|m| (m.clone(), 0)));
                            s.wake();
                        }
                        lock(&last.incoming).extend(stored.into_iter().map(|m| (m, 0)));
                        last.wake();
                    }
                }
            }
        }
        if batch.iter().any(|m| m.has_after_send()) {
            // `failed` holds only before-send failures here, in order.
            let refused = failed.len();
            let mut next_refused = 0;
            for (i, m) in batch.iter().enumerate() {
                if next_refused < refused && failed[next_refused].0 == i {
                    next_refused += 1;
                    continue;
                }
                if !m.has_after_send() {
                    continue;
                }
                let seq = first + i as u64;
                if let Err(e) = m.run_after_send(|| Sent::new(&seq).with_id(seq.to_string())) {
                    failed.push((i, e));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Items(failed))
        }
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.broker)
    }
}

/// The in-memory subscription driver.
pub struct SubscriptionDriver {
    broker: Broker,
    name: String,
    resolved: Resolved<SubState>,
    /// Deletes the subscription on close or drop (an anonymous one).
    delete_when_closed: bool,
}

impl SubscriptionDriver {
    pub(super) fn new(broker: Broker, name: &str) -> Self {
        SubscriptionDriver {
            broker,
            name: name.to_owned(),
            resolved: Resolved::default(),
            delete_when_closed: false,
        }
    }

    /// Makes closing (or dropping) this driver delete its subscription, as
    /// for the anonymous subscription a `mem://TOPIC` URL opens: no other
    /// handle can reach it, so it would otherwise collect every later
    /// message of the topic for good.
    pub fn delete_when_closed(mut self) -> Self {
        self.delete_when_closed = true;
        self
    }

    fn delete(&self) {
        if self.delete_when_closed {
            // Already gone (deleted by hand, or closed before) is fine.
            let _ = self.broker.delete_subscription(&self.name);
        }
    }
}

impl Drop for SubscriptionDriver {
    fn drop(&mut self) {
        self.delete();
    }
}

impl SubscriptionDriver {
    /// The subscription's state, looked up again once the cached one was
    /// deleted.
    fn state(&self) -> Result<StateRef<'_, SubState>> {
        self.resolved.get(|| self.broker.sub_state(&self.name))
    }

    fn ack_deadline(&self) -> Duration {
        self.state()
            .map_or(DEFAULT_ACK_DEADLINE, |s| s.ack_deadline)
    }

    fn settle<'a>(
        &self,
        ids: impl Iterator<Item = &'a AckId>,
        mut f: impl FnMut(&mut SubQueue, u64),
    ) -> Result<(), BatchError> {
        let s = self.state()?;
        let mut q = s.queue();
        for id in ids {
            // Ids of other drivers cannot occur; unknown tags (already acked
            // or redelivered) are ignored, as a real broker does.
            if let Some(tag) = id.as_u64() {
                f(&mut q, tag);
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SubscriptionDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("mem::SubscriptionDriver")
            .field("name", &self.name)
            .finish()
    }
}

#[async_trait]
impl driver::Subscription for SubscriptionDriver {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = self.broker.capabilities();
        c.ack_deadline = Some(self.ack_deadline());
        c
    }

    async fn close(&self) -> Result<()> {
        // The held acks let their messages go now: nobody may receive
        // from this subscription again to apply them.
        if let Ok(s) = self.state() {
            drop(s.queue());
        }
        self.delete();
        Ok(())
    }

    async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let s = self.state()?;
        let started = Instant::now();
        loop {
            let notified = s.notify.notified();
            tokio::pin!(notified);
            let wait = {
                if s.deleted.load(Ordering::Acquire) {
                    return Err(Error::not_found(format!(
                        "subscription {:?} does not exist",
                        self.name
                    )));
                }
                let mut q = s.queue();
                // Read under the lock: two receives may race for it, and
                // the batches' deadlines must be queued in time order.
                let now = Instant::now();
                q.reap(now);
                if q.ready.is_empty() {
                    s.take_incoming(&mut q);
                }
                if !q.ready.is_empty() {
                    let deadline = now + s.ack_deadline;
                    let mut out = Vec::with_capacity(max.min(q.ready.len()));
                    let first_tag = q.next_tag;
                    while out.len() < max {
                        // Sent messages are taken only once the ready ones
                        // are out, so that they are never copied into
                        // the ready queue one by one.
                        let next = match q.ready.pop_front() {
                            Some(m) => Some(m),
                            None => {
                                s.take_incoming(&mut q);
                                q.ready.pop_front()
                            }
                        };
                        let Some((msg, attempts)) = next else {
                            break;
                        };
                        let tag = q.next_tag;
                        q.next_tag += 1;
                        let attempt = attempts + 1;
                        let r = &msg.record;
                        // The id and raw form are built by `MemDeliveries`
                        // when asked: most messages are never asked about.
                        let mut m = ReceivedMessage::describe_lazily(
                            r.body.clone(),
                            r.attributes.clone(),
                            AckId::from_u64(tag),
                            (msg.seq as i64, i64::from(attempt)),
                        );
                        m.ordering_key = r.ordering_key.clone();
                        m.delivery_attempt = Some(attempt);
                        out.push(m);
                        q.outstanding.insert(
                            tag,
                            Outstanding {
                                msg,
                                attempts: attempt,
                                deadline,
                            },
                        );
                    }
                    let end = q.next_tag;
                    q.record_received(deadline, first_tag, end);
                    return Ok(out);
                }
                let waited = now.saturating_duration_since(started);
                if waited >= POLL {
                    return Ok(Vec::new());
                }
                let poll_left = POLL - waited;
                // Counted before `incoming` is looked at once more: a send
                // that pushed after that look sees the count and wakes us.
                notified.as_mut().enable();
                s.waiting.fetch_add(1, Ordering::SeqCst);
                q.next_deadline().map_or(poll_left, |d| {
                    d.saturating_duration_since(now).min(poll_left)
                })
            };
            // Uncounted however the wait ends, a dropped receive included.
            let _counted = Uncount(&s.waiting);
            if lock(&s.incoming).is_empty() {
                let _ = tokio::time::timeout(wait, notified).await;
            }
        }
    }

    fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
        // Ids of other drivers cannot occur.
        Settlement::done(
            self.state()
                .map(|s| {
                    s.ack(ids.iter().filter_map(AckId::as_u64));
                })
                .map_err(BatchError::from),
        )
    }

    fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
        let now = Instant::now();
        let mut nacks = nacks.iter();
        let r = self.settle(nacks.clone().map(|n| &n.ack_id), |q, tag| {
            // `settle` skips ids that are not tags, which mem never gives.
            let delay = nacks.next().map_or(Duration::ZERO, |n| n.delay);
            if delay.is_zero() {
                if let Some(o) = q.outstanding.remove(&tag) {
                    q.ready.push_front((o.msg, o.attempts));
                }
            } else if let Some(o) = q.outstanding.get_mut(&tag) {
                // Back when the reaper finds the deadline passed, as a lapsed
                // lease is; the receive waiting wakes to wait for it.
                let due = now.checked_add(delay).unwrap_or(o.deadline);
                o.deadline = due;
                q.deadlines.push(Reverse((due, tag)));
            }
        });
        if let Ok(s) = self.state() {
            s.wake();
        }
        Settlement::done(r)
    }

    async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
        let deadline = Instant::now() + by;
        self.settle(ids.iter(), |q, tag| {
            if let Some(o) = q.outstanding.get_mut(&tag) {
                o.deadline = deadline;
                q.deadlines.push(Reverse((deadline, tag)));
            }
        })
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.broker)
    }

    fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
        Some(Arc::new(MemDeliveries))
    }
}

struct Uncount<'a>(&'a AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Builds an in-memory message's id (its sequence number) and [`Delivery`]
/// from the ack id (the tag) and the numbers it was received with (the
/// sequence number and the attempt).
struct MemDeliveries;

impl Deliveries for MemDeliveries {
    fn describe_id(&self, _ack_id: &AckId, at: (i64, i64)) -> String {
        at.0.to_string()
    }

    fn describe_raw(
        &self,
        ack_id: &AckId,
        at: (i64, i64),
        _ordering_key: Option<&str>,
    ) -> Option<Box<dyn Any + Send + Sync>> {
        Some(Box::new(Delivery {
            sequence: at.0 as u64,
            tag: ack_id.as_u64()?,
            attempt: at.1 as u32,
        }))
    }
}
