//! The conformance suite against the in-memory driver.

use std::sync::Arc;
use std::time::Duration;

use pubsub_conformance::{async_trait, Harness};
use pubsub_core::driver::{self, Subscription as _};
use pubsub_core::mem::{Broker, Delivery, Record};
use pubsub_core::{Capabilities, Error, Message, Result, Subscription, Topic};

struct Mem(Broker);

#[async_trait]
impl Harness for Mem {
    async fn connect() -> std::result::Result<Self, String> {
        Ok(Mem(Broker::new()))
    }

    fn capabilities(&self) -> Capabilities {
        self.0.subscription_driver("any").capabilities()
    }

    async fn create_topic(&self, name: &str) -> Result<()> {
        self.0.create_topic(name)
    }

    async fn create_subscription(&self, topic: &str, name: &str, ack: Duration) -> Result<()> {
        self.0.create_subscription(name, topic, ack)
    }

    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
        Ok(Arc::new(self.0.topic_driver(name)))
    }

    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
        Ok(Arc::new(self.0.subscription_driver(name)))
    }

    fn check_raw_topic(&self, topic: &Topic) -> std::result::Result<(), String> {
        topic
            .as_raw::<Broker>()
            .map(|_| ())
            .ok_or_else(|| "no Broker".into())
    }

    fn check_raw_subscription(&self, sub: &Subscription) -> std::result::Result<(), String> {
        sub.as_raw::<Broker>()
            .map(|_| ())
            .ok_or_else(|| "no Broker".into())
    }

    fn check_raw_message(&self, msg: &Message) -> std::result::Result<(), String> {
        let d = msg.as_raw::<Delivery>().ok_or("no Delivery")?;
        if d.attempt == 1 && msg.id() == Some(&d.sequence.to_string()) {
            Ok(())
        } else {
            Err(format!("unexpected delivery {d:?}"))
        }
    }

    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        // The in-memory broker has no error type of its own: NotFound is
        // raised by the driver itself, so there is no source to reach.
        match err.source_as::<Error>() {
            None if err.kind() == pubsub_core::ErrorKind::NotFound => Ok(()),
            _ => Err(format!("unexpected error {err:?}")),
        }
    }

    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        |s| s.raw::<u64>().is_some()
    }

    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |r| r.downcast_mut::<Record>().is_some()
    }
}

pubsub_conformance::conformance_tests!(
    Mem,
    nack,
    fan_out,
    redelivery_after_deadline,
    lease_extension,
    max_message_bytes
);
