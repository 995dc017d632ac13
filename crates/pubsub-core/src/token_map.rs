//! Maps keyed by the sequential numbers the core and the in-memory broker
//! hand out (lease tokens, delivery tags).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Keys further than this past the window's end go to the side map rather
/// than grow the window with empty slots.
const MAX_GAP: u64 = 1 << 16;

/// A window this long or longer is compacted once it is mostly empty.
const COMPACT_FROM: usize = 1024;

/// A map from sequential `u64` keys. Keys come from a counter and mostly
/// leave in about the order they came, so the map is a window of slots
/// indexed by key (no hashing or probing; a hash map's insert and remove
/// were a twelfth of the in-memory benchmark), with a hash map on the side
/// for keys inserted behind the window and for long-lived entries moved
/// out of a window that would otherwise stay long for their sake.
pub(crate) struct TokenMap<V> {
    /// Keys `base..base + window.len()`; the first slot is always full.
    window: VecDeque<Option<V>>,
    base: u64,
    /// Full slots in `window`.
    live: usize,
    far: HashMap<u64, V, BuildHasherDefault<TokenHasher>>,
}

impl<V> Default for TokenMap<V> {
    fn default() -> Self {
        TokenMap {
            window: VecDeque::new(),
            base: 0,
            live: 0,
            far: HashMap::default(),
        }
    }
}

impl<V> TokenMap<V> {
    /// Inserts `value` at `key`, returning the value it replaced.
    pub(crate) fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if let Some(v) = self.far_mut(key) {
            return Some(std::mem::replace(v, value));
        }
        if self.window.is_empty() {
            self.base = key;
        }
        let end = self.base + self.window.len() as u64;
        if key < self.base || (key >= end && key - end > MAX_GAP) {
            return self.far.insert(key, value);
        }
        if key >= end {
            let gap = (key - end) as usize;
            self.window
                .extend(std::iter::repeat_with(|| None).take(gap));
            self.window.push_back(Some(value));
            self.live += 1;
            return None;
        }
        let old = self.window[(key - self.base) as usize].replace(value);
        if old.is_none() {
            self.live += 1;
        }
        old
    }

    /// Removes and returns the value at `key`.
    pub(crate) fn remove(&mut self, key: &u64) -> Option<V> {
        if let Some(i) = self.slot(*key) {
            if let Some(old) = self.window[i].take() {
                self.live -= 1;
                self.trim();
                return Some(old);
            }
        }
        if self.far.is_empty() {
            return None;
        }
        self.far.remove(key)
    }

    pub(crate) fn get(&self, key: &u64) -> Option<&V> {
        if let Some(v) = self.slot(*key).and_then(|i| self.window[i].as_ref()) {
            return Some(v);
        }
        if self.far.is_empty() {
            return None;
        }
        self.far.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &u64) -> Option<&mut V> {
        if let Some(i) = self.slot(*key) {
            if self.window[i].is_some() {
                return self.window[i].as_mut();
            }
        }
        self.far_mut(*key)
    }

    fn far_mut(&mut self, key: u64) -> Option<&mut V> {
        if self.far.is_empty() {
            return None;
        }
        self.far.get_mut(&key)
    }

    pub(crate) fn len(&self) -> usize {
        self.live + self.far.len()
    }

    /// Keeps the entries for which `keep` returns true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&u64, &mut V) -> bool) {
        let base = self.base;
        for (key, slot) in (base..).zip(self.window.iter_mut()) {
            if let Some(v) = slot {
                if !keep(&key, v) {
                    *slot = None;
                    self.live -= 1;
                }
            }
        }
        self.far.retain(|k, v| keep(k, v));
        self.trim();
    }

    fn slot(&self, key: u64) -> Option<usize> {
        let i = key.checked_sub(self.base)?;
        (i < self.window.len() as u64).then_some(i as usize)
    }

    /// Drops the empty slots at the front, and moves the entries that keep
    /// a mostly empty window long (a message held for hours while
    /// thousands pass) to the side map.
    fn trim(&mut self) {
        loop {
            while let Some(None) = self.window.front() {
                self.window.pop_front();
                self.base += 1;
            }
            if self.window.is_empty() && self.window.capacity() > 4 * COMPACT_FROM {
                // A burst's slots are not kept for good.
                self.window.shrink_to(COMPACT_FROM);
            }
            if self.window.len() < COMPACT_FROM || self.window.len() <= 4 * self.live {
                return;
            }
            if let Some(Some(v)) = self.window.pop_front() {
                self.far.insert(self.base, v);
                self.live -= 1;
            }
            self.base += 1;
        }
    }
}

/// Fibonacci hashing of one `u64`: the keys come from a counter, never from
/// outside, so they need no flood-resistant hash (SipHash cost a tenth of
/// the in-memory round trip).
#[derive(Default)]
pub(crate) struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; this keeps the hasher total anyway.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map against a `HashMap` on a mixed sequence: in-order and
    /// out-of-order inserts, removes in and out of order, replacements,
    /// keys far ahead, retain.
    #[test]
    fn behaves_as_a_hash_map() {
        let mut ours = TokenMap::default();
        let mut model = HashMap::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut next = 1_000u64;
        for step in 0..200_000u32 {
            match rng.u32(0..100) {
                0..=44 => {
                    let k = next;
                    next += 1;
                    assert_eq!(ours.insert(k, step), model.insert(k, step));
                }
                45..=49 => {
                    // Behind the window, or replacing one present.
                    let k = next.saturating_sub(rng.u64(1..5_000));
                    assert_eq!(ours.insert(k, step), model.insert(k, step));
                }
                50 => {
                    let k = next + MAX_GAP + rng.u64(1..10);
                    assert_eq!(ours.insert(k, step), model.insert(k, step));
                }
                51..=94 => {
                    // Mostly the oldest keys, sometimes any.
                    let k = if rng.bool() {
                        model.keys().min().copied().unwrap_or(0)
                    } else {
                        next.saturating_sub(rng.u64(0..3_000))
                    };
                    assert_eq!(ours.remove(&k), model.remove(&k));
                }
                95..=98 => {
                    let k = next.saturating_sub(rng.u64(0..3_000));
                    assert_eq!(ours.get(&k), model.get(&k));
                    if let (Some(a), Some(b)) = (ours.get_mut(&k), model.get_mut(&k)) {
                        *a += 1;
                        *b += 1;
                    }
                }
                _ => {
                    let cut = rng.u32(0..4);
                    ours.retain(|k, v| (*k as u32 ^ *v) % 4 != cut);
                    model.retain(|k, v| (*k as u32 ^ *v) % 4 != cut);
                }
            }
            assert_eq!(ours.len(), model.len(), "step {step}");
        }
        for (k, v) in &model {
            assert_eq!(ours.get(k), Some(v));
        }
    }

    /// One entry held while many pass does not keep a window of them all.
    #[test]
    fn a_long_held_entry_does_not_keep_the_window_long() {
        let mut m = TokenMap::default();
        m.insert(0, ());
        for k in 1..100_000u64 {
            m.insert(k, ());
            m.remove(&k);
        }
        assert_eq!(m.len(), 1);
        assert!(m.window.len() < 2 * COMPACT_FROM, "{}", m.window.len());
        assert_eq!(m.remove(&0), Some(()));
        assert_eq!(m.len(), 0);
    }
}
