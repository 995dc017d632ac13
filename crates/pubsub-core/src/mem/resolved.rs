//! A driver handle's cached broker state.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use super::{lock, SubState, TopicState};
use crate::error::Result;

/// A handle's broker state, looked up on first use and again only once it
/// was deleted (so a handle works again when its resource is re-created).
/// Read without a lock while the first one lives: every send and ack reads
/// it.
pub(super) struct Resolved<S> {
    first: OnceLock<Arc<S>>,
    later: Mutex<Option<Arc<S>>>,
}

impl<S> Default for Resolved<S> {
    fn default() -> Self {
        Resolved {
            first: OnceLock::new(),
            later: Mutex::new(None),
        }
    }
}

/// State a [`Resolved`] gave: its first, borrowed, or a later one.
pub(super) enum StateRef<'a, S> {
    First(&'a S),
    Later(Arc<S>),
}

impl<S> std::ops::Deref for StateRef<'_, S> {
    type Target = S;

    fn deref(&self) -> &S {
        match self {
            StateRef::First(s) => s,
            StateRef::Later(s) => s,
        }
    }
}

/// Broker state that can be deleted.
pub(super) trait Deletable {
    fn is_deleted(&self) -> bool;
}

impl Deletable for TopicState {
    fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

impl Deletable for SubState {
    fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

impl<S: Deletable> Resolved<S> {
    pub(super) fn get(&self, lookup: impl FnOnce() -> Result<Arc<S>>) -> Result<StateRef<'_, S>> {
        if let Some(s) = self.first.get() {
            if !s.is_deleted() {
                return Ok(StateRef::First(s));
            }
        }
        let mut later = lock(&self.later);
        if let Some(s) = later.as_ref() {
            if !s.is_deleted() {
                return Ok(StateRef::Later(s.clone()));
            }
        }
        let s = lookup()?;
        if self.first.set(s.clone()).is_err() {
            *later = Some(s.clone());
        }
        Ok(StateRef::Later(s))
    }
}
