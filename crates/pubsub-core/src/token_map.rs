//! Maps keyed by the sequential numbers the core and the in-memory broker
//! hand out (lease tokens, delivery tags).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from sequential `u64` keys. The keys come from a counter, never
/// from outside, so they need no flood-resistant hash: one multiplication
/// spreads them over the table (SipHash cost a tenth of the in-memory
/// round trip).
pub(crate) type TokenMap<V> = HashMap<u64, V, BuildHasherDefault<TokenHasher>>;

/// Fibonacci hashing of one `u64`.
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
