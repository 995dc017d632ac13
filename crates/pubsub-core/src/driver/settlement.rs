//! What an ack or nack call gives back.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::BatchError;
use crate::error::Error;

/// The outcome of [`Subscription::send_acks`](super::Subscription::send_acks)
/// or [`send_nacks`](super::Subscription::send_nacks): settled on the spot
/// ([`Settlement::done`]), as bookkeeping in this process is, or a call to
/// the backend still to be awaited ([`Settlement::later`]).
///
/// A future either way; the core awaits it. Where the driver declares
/// [`Capabilities::local_settlement`](super::Capabilities::local_settlement),
/// the core settles each ack as it is made and takes a `done` outcome
/// without polling, boxing or waking anything: an ack then costs what the
/// driver's bookkeeping costs.
#[must_use = "a settlement does nothing until it is awaited"]
pub struct Settlement<'a>(State<'a>);

enum State<'a> {
    Done(Option<Result<(), BatchError>>),
    Later(BoxFuture<'a, Result<(), BatchError>>),
}

impl<'a> Settlement<'a> {
    /// Settled already, with this result.
    pub fn done(result: Result<(), BatchError>) -> Self {
        Settlement(State::Done(Some(result)))
    }

    /// Settled once `call` completes.
    pub fn later(call: impl Future<Output = Result<(), BatchError>> + Send + 'a) -> Self {
        Settlement(State::Later(Box::pin(call)))
    }

    /// The result if it is known without waiting: at once for `done`, or
    /// after one poll of a `later` call; `None` if that call is pending
    /// (it is then dropped).
    #[inline]
    pub(crate) fn now(self) -> Option<Result<(), BatchError>> {
        match self.0 {
            State::Done(r) => r,
            State::Later(call) => call.now_or_never(),
        }
    }
}

impl Future for Settlement<'_> {
    type Output = Result<(), BatchError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            State::Done(r) => Poll::Ready(r.take().unwrap_or_else(|| {
                Err(Error::internal("a settlement was polled after it completed").into())
            })),
            State::Later(call) => call.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for Settlement<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            State::Done(_) => "Settlement::done",
            State::Later(_) => "Settlement::later",
        })
    }
}
