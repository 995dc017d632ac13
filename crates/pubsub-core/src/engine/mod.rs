//! The engine between the user API and the driver contract.
//!
//! The layers read top-down, each using only the ones below it:
//! - the user API: [`crate::Topic`], [`crate::Subscription`],
//!   [`crate::Message`];
//! - this engine: [`send`] (a topic's batch handler), [`receiver`] (the
//!   fetched queue, fetching and hand-out, shutdown), [`settle`] (acks,
//!   nacks and lease extensions), [`leases`] (held messages' leases and
//!   the task keeping them), [`fetched`] and [`sizer`] (the queue and the
//!   adaptive batch size), and [`batcher`], the one batcher behind every
//!   batched driver call;
//! - the driver contract, [`crate::driver`].

pub(crate) mod batcher;
pub(crate) mod fetched;
pub(crate) mod leases;
pub(crate) mod receiver;
pub(crate) mod send;
pub(crate) mod settle;
pub(crate) mod sizer;

use std::sync::{Mutex, MutexGuard};

use crate::driver::BatchError;
use crate::error::Error;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent between statements, so a panic
    // elsewhere while holding the lock is no reason to fail every caller.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `e` with the driver, resource and operation, where not already set.
pub(crate) fn with_context(e: BatchError, driver: &str, resource: &str, op: &str) -> BatchError {
    let add = |e: Error| {
        e.with_context_default("driver", driver)
            .with_context_default("resource", resource)
            .with_context_default("operation", op)
    };
    match e {
        BatchError::All(e) => BatchError::All(add(e)),
        BatchError::Items(v) => {
            BatchError::Items(v.into_iter().map(|(i, e)| (i, add(e))).collect())
        }
    }
}
