//! One conformance suite that every driver runs unchanged, and the
//! benchmark harness.
//!
//! A driver crate implements [`Harness`] for its live backend and stamps out
//! one `#[tokio::test]` per case with [`conformance_tests!`], naming the
//! optional capabilities it supports. Cases that need a capability the
//! driver lacks are not generated; a generated `declared_capabilities_match`
//! test fails if the list and the driver's [`Capabilities`] disagree, so no
//! case is ever dropped silently.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use pubsub_conformance::{async_trait, Harness};
//! use pubsub_core::{driver, mem::Broker, Capabilities, Result};
//!
//! struct Mem(Broker);
//!
//! #[async_trait]
//! impl Harness for Mem {
//!     async fn connect() -> std::result::Result<Self, String> {
//!         Ok(Mem(Broker::new()))
//!     }
//!     fn capabilities(&self) -> Capabilities {
//!         use pubsub_core::driver::Subscription as _;
//!         self.0.subscription_driver("any").capabilities()
//!     }
//!     async fn create_topic(&self, name: &str) -> Result<()> {
//!         self.0.create_topic(name)
//!     }
//!     async fn create_subscription(&self, topic: &str, name: &str, ack: Duration) -> Result<()> {
//!         self.0.create_subscription(name, topic, ack)
//!     }
//!     async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
//!         Ok(Arc::new(self.0.topic_driver(name)))
//!     }
//!     async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
//!         Ok(Arc::new(self.0.subscription_driver(name)))
//!     }
//! }
//!
//! // In tests/conformance.rs of the driver crate:
//! // pubsub_conformance::conformance_tests!(Mem, nack, fan_out, redelivery_after_deadline,
//! //     lease_extension, max_message_bytes);
//! ```
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

use std::sync::Arc;
use std::time::Duration;

pub use async_trait::async_trait;
use pubsub_core::{driver, Capabilities, Error, Message, Result, Subscription, Topic};

pub mod bench;
pub mod cases;
pub mod chart;
pub mod faults;
pub mod peer;

/// A live backend the suite can create resources on.
#[async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// Connects to the backend. When it is not reachable, the error must say
    /// how to start it (the test fails with that message).
    async fn connect() -> std::result::Result<Self, String>;

    /// The capabilities of this driver's subscriptions and topics.
    fn capabilities(&self) -> Capabilities;

    /// Creates a topic on the backend.
    async fn create_topic(&self, name: &str) -> Result<()>;

    /// Creates a subscription to `topic` that gets every message sent from
    /// now on. Backends without an ack deadline ignore `ack_deadline`.
    async fn create_subscription(
        &self,
        topic: &str,
        name: &str,
        ack_deadline: Duration,
    ) -> Result<()>;

    /// The shortest ack deadline the backend takes, for the cases that wait
    /// for redelivery or for its absence: their subscriptions are created
    /// with it, and their waits scale with it, so a backend with a long
    /// minimum (Pub/Sub's is 10 s) does not pass them by waiting too
    /// little.
    fn short_ack_deadline(&self) -> Duration {
        cases::SHORT_DEADLINE
    }

    /// How many messages the concurrent senders and receivers case moves
    /// within its time limit: 10,000, or fewer on an emulator too slow for
    /// that (moto sustains about a hundred a second).
    fn concurrent_messages(&self) -> usize {
        10_000
    }

    /// The driver of a topic that may or may not exist.
    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>>;

    /// The driver of a subscription that may or may not exist.
    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>>;

    /// Checks [`Topic::as_raw`] gives the backend's client.
    fn check_raw_topic(&self, topic: &Topic) -> std::result::Result<(), String> {
        let _ = topic;
        Err("the harness does not check Topic::as_raw".into())
    }

    /// Checks [`Subscription::as_raw`] gives the backend's client.
    fn check_raw_subscription(&self, sub: &Subscription) -> std::result::Result<(), String> {
        let _ = sub;
        Err("the harness does not check Subscription::as_raw".into())
    }

    /// Checks [`Message::as_raw`] gives the backend's message.
    fn check_raw_message(&self, msg: &Message) -> std::result::Result<(), String> {
        let _ = msg;
        Err("the harness does not check Message::as_raw".into())
    }

    /// Checks the backend's error is reachable from an [`Error`] the driver
    /// returned for a nonexistent topic. Drivers whose `NotFound` is
    /// detected without a backend error may accept a missing source.
    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        let _ = err;
        Err("the harness does not check Error::source_as".into())
    }

    /// A check that a before-send hook's argument is the driver's
    /// documented outgoing record type.
    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |_| false
    }

    /// A check that an after-send hook's [`pubsub_core::Sent::raw`] is the
    /// driver's documented record type.
    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        |_| false
    }

    /// Whether the id an after-send hook sees is the id receivers see, as
    /// on every backend where one message keeps one id end to end. Not so
    /// where the backend copies a message on its way (SNS to each SQS
    /// queue): then the case checks only that sent ids are distinct.
    fn sent_id_is_received_id(&self) -> bool {
        true
    }
}

/// Connects a harness or panics with its message (how to start the backend).
pub async fn connect<H: Harness>() -> H {
    match H::connect().await {
        Ok(h) => h,
        Err(how) => panic!("the backend for this test is not reachable: {how}"),
    }
}

/// The optional capabilities, by the names [`conformance_tests!`] takes.
pub fn declared(caps: &Capabilities) -> Vec<&'static str> {
    let mut v = Vec::new();
    if caps.nack {
        v.push("nack");
    }
    if caps.fan_out {
        v.push("fan_out");
    }
    if caps.redelivery_after_deadline {
        v.push("redelivery_after_deadline");
    }
    if caps.lease_extension {
        v.push("lease_extension");
    }
    if caps.max_message_bytes.is_some() {
        v.push("max_message_bytes");
    }
    if caps.ordering_keys {
        v.push("ordering_keys");
    }
    v
}

/// Fails unless `listed` names exactly the optional capabilities the driver
/// declares.
pub fn check_declared(caps: &Capabilities, listed: &[&str]) {
    let mut have = declared(caps);
    let mut listed: Vec<&str> = listed.to_vec();
    have.sort_unstable();
    listed.sort_unstable();
    assert_eq!(
        have, listed,
        "conformance_tests! must list exactly the capabilities the driver declares \
         (left: declared by the driver, right: listed), so no case is left out silently"
    );
}

/// Stamps out one `#[tokio::test]` per conformance case for a [`Harness`].
///
/// The first argument is the harness type; the rest name the optional
/// capabilities whose cases to include: `nack`, `fan_out`,
/// `redelivery_after_deadline`, `lease_extension`, `max_message_bytes`,
/// `ordering_keys`. Each test has a time limit, so a hang fails.
#[macro_export]
macro_rules! conformance_tests {
    ($h:ty $(, $cap:ident)* $(,)?) => {
        $crate::__cases!($h;
            send_receive,
            json_body_unchanged,
            non_utf8_body_byte_for_byte,
            empty_body_with_attributes,
            awkward_attributes_round_trip,
            invalid_attributes_rejected,
            batching_respects_min_and_max,
            driver_double_ack_is_harmless,
            send_and_receive_after_shutdown_fail,
            cancelled_send_is_withdrawn,
            cancelled_receive_loses_nothing,
            dropped_receive_futures_lose_nothing,
            nonexistent_topic_is_not_found,
            nonexistent_subscription_is_not_found,
            shutdown_flushes_sends,
            shutdown_flushes_acks,
            extend_lease_matches_capability,
            escape_hatches,
            sent_ids_are_the_ids_receivers_see,
            concurrent_senders_and_receivers
        );
        $( $crate::__group!($h, $cap); )*
        #[::tokio::test]
        async fn declared_capabilities_match() {
            let h = $crate::connect::<$h>().await;
            $crate::check_declared(
                &$crate::Harness::capabilities(&h),
                &[$(stringify!($cap)),*],
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __group {
    ($h:ty, nack) => {
        $crate::__cases!(
            $h;
            nack_redelivers,
            nack_backoff_delays_redelivery,
            dropped_message_is_nacked,
            driver_double_nack_is_harmless
        );
    };
    ($h:ty, fan_out) => {
        $crate::__cases!($h; two_subscriptions_each_get_every_message);
    };
    ($h:ty, redelivery_after_deadline) => {
        $crate::__cases!($h; redelivered_after_ack_deadline);
    };
    ($h:ty, lease_extension) => {
        $crate::__cases!($h; held_message_lease_is_kept, explicit_lease_extension);
    };
    ($h:ty, max_message_bytes) => {
        $crate::__cases!($h; oversized_message_rejected);
    };
    ($h:ty, ordering_keys) => {
        $crate::__cases!($h; ordering_key_keeps_order);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cases {
    ($h:ty; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let h = $crate::connect::<$h>().await;
                let limit = $crate::cases::CASE_TIME_LIMIT;
                if ::tokio::time::timeout(limit, $crate::cases::$case(&h)).await.is_err() {
                    panic!("case {} did not finish within {:?}", stringify!($case), limit);
                }
            }
        )*
    };
}
