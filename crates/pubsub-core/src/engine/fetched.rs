//! Fetched messages not yet handed out.

use std::collections::VecDeque;

use crate::driver::ReceivedMessage;

/// Fetched messages not yet handed out, kept as the batches the driver
/// returned: a batch is queued whole, and each message moves once, when it
/// is handed out. Each message has a token (the key of its lease), and a
/// batch's tokens run on without gaps from its first.
#[derive(Default)]
pub(crate) struct Fetched {
    batches: VecDeque<(std::vec::IntoIter<ReceivedMessage>, u64)>,
    len: usize,
}

impl Fetched {
    /// Queues a batch whose tokens run from `first`.
    pub(crate) fn push(&mut self, batch: Vec<ReceivedMessage>, first: u64) {
        if !batch.is_empty() {
            self.len += batch.len();
            self.batches.push_back((batch.into_iter(), first));
        }
    }

    /// Takes the first message and its token, and makes `R` of them where
    /// they are read: each wrapper a message passes through on its way out
    /// is another copy of it.
    #[inline]
    pub(crate) fn pop_front_with<R>(
        &mut self,
        make: impl FnOnce(ReceivedMessage, u64) -> R,
    ) -> Option<R> {
        let (batch, next) = self.batches.front_mut()?;
        let token = *next;
        let made = make(batch.next()?, token);
        *next += 1;
        self.len -= 1;
        if batch.len() == 0 {
            self.batches.pop_front();
        }
        Some(made)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the messages `keep` accepts, in order, and returns the tokens
    /// of the others.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&ReceivedMessage) -> bool) -> Vec<u64> {
        let mut dropped = Vec::new();
        let mut kept = Fetched::default();
        for (batch, first) in std::mem::take(&mut self.batches) {
            // A dropped message ends a run of kept ones, which is queued as
            // a batch of its own so that tokens still run without gaps.
            let mut run = Vec::new();
            let mut run_first = first;
            for (m, token) in batch.zip(first..) {
                if keep(&m) {
                    if run.is_empty() {
                        run_first = token;
                    }
                    run.push(m);
                } else {
                    dropped.push(token);
                    kept.push(std::mem::take(&mut run), run_first);
                }
            }
            kept.push(run, run_first);
        }
        *self = kept;
        dropped
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (ReceivedMessage, u64)> {
        self.len = 0;
        std::mem::take(&mut self.batches)
            .into_iter()
            .flat_map(|(batch, first)| batch.zip(first..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::AckId;
    use bytes::Bytes;

    impl Fetched {
        fn pop_front(&mut self) -> Option<(ReceivedMessage, u64)> {
            self.pop_front_with(|m, token| (m, token))
        }
    }

    /// Messages whose ids and ack ids are these texts.
    fn batch(ids: &[&str]) -> Vec<ReceivedMessage> {
        ids.iter()
            .map(|id| {
                ReceivedMessage::new(
                    Bytes::new(),
                    Default::default(),
                    (*id).to_owned(),
                    AckId::from_text(*id),
                )
            })
            .collect()
    }

    #[test]
    fn fetched_batches_hand_out_messages_in_order_with_their_tokens() {
        let mut q = Fetched::default();
        q.push(batch(&["a", "b"]), 10);
        q.push(batch(&[]), 12);
        q.push(batch(&["c"]), 12);
        assert_eq!(q.len(), 3);
        let (m, t) = q.pop_front().unwrap();
        assert_eq!((m.id.as_str(), t), ("a", 10));
        let (m, t) = q.pop_front().unwrap();
        assert_eq!((m.id.as_str(), t), ("b", 11));
        q.push(batch(&["d", "e"]), 13);
        assert_eq!(q.len(), 3);
        let rest: Vec<(String, u64)> = q.drain().map(|(m, t)| (m.id, t)).collect();
        assert_eq!(rest, [("c".into(), 12), ("d".into(), 13), ("e".into(), 14)]);
        assert!(q.is_empty() && q.pop_front().is_none());
    }

    #[test]
    fn retained_messages_keep_their_order_and_tokens() {
        let mut q = Fetched::default();
        q.push(batch(&["a", "b", "c", "d"]), 10);
        q.push(batch(&["e"]), 14);
        q.push(batch(&["f", "g"]), 20);
        let _ = q.pop_front();
        let dropped = q.retain(|m| !["c", "e", "f"].contains(&m.id.as_str()));
        assert_eq!(dropped, [12, 14, 20]);
        assert_eq!(q.len(), 3);
        let rest: Vec<(String, u64)> = q.drain().map(|(m, t)| (m.id, t)).collect();
        assert_eq!(rest, [("b".into(), 11), ("d".into(), 13), ("g".into(), 21)]);
    }
}
