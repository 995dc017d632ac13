//! The conformance suite against a real RabbitMQ.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Admin;
use pubsub_conformance::{async_trait, Harness};
use pubsub_core::driver::{self, Subscription as _};
use pubsub_core::{Capabilities, Error, ErrorKind, Message, Result, Subscription, Topic};
use pubsub_driver_amqp::lapin::{self, message::Delivery, BasicProperties};
use pubsub_driver_amqp::{AmqpSubscription, AmqpTopic, Connector, SubscriptionConfig, TopicConfig};

struct Rabbit(Admin);

fn mapped(e: lapin::Error) -> Error {
    Error::new(ErrorKind::Unknown, "admin call failed").with_source(e)
}

#[async_trait]
impl Harness for Rabbit {
    async fn connect() -> std::result::Result<Self, String> {
        Ok(Rabbit(Admin::connect().await?))
    }

    fn capabilities(&self) -> Capabilities {
        AmqpSubscription::new(
            self.0.connector.clone(),
            "any",
            SubscriptionConfig::default(),
        )
        .expect("valid")
        .capabilities()
    }

    async fn create_topic(&self, name: &str) -> Result<()> {
        self.0.exchange(name).await.map_err(mapped)
    }

    async fn create_subscription(&self, topic: &str, name: &str, _ack: Duration) -> Result<()> {
        self.0.queue(topic, name).await.map_err(mapped)
    }

    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
        Ok(Arc::new(AmqpTopic::new(
            self.0.connector.clone(),
            name,
            TopicConfig::default(),
        )?))
    }

    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
        Ok(Arc::new(AmqpSubscription::new(
            self.0.connector.clone(),
            name,
            SubscriptionConfig::default(),
        )?))
    }

    fn check_raw_topic(&self, topic: &Topic) -> std::result::Result<(), String> {
        topic
            .as_raw::<Connector>()
            .map(|_| ())
            .ok_or_else(|| "no Connector".into())
    }

    fn check_raw_subscription(&self, sub: &Subscription) -> std::result::Result<(), String> {
        sub.as_raw::<Connector>()
            .map(|_| ())
            .ok_or_else(|| "no Connector".into())
    }

    fn check_raw_message(&self, msg: &Message) -> std::result::Result<(), String> {
        let d = msg.as_raw::<Delivery>().ok_or("no Delivery")?;
        if d.delivery_tag > 0 && d.properties.message_id().is_some() {
            Ok(())
        } else {
            Err(format!("unexpected delivery {d:?}"))
        }
    }

    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        match err.source_as::<lapin::Error>() {
            Some(e) if e.is_amqp_soft_error() => Ok(()),
            other => Err(format!(
                "expected a lapin protocol error, got {other:?} in {err}"
            )),
        }
    }

    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        |s| s.raw::<lapin::Confirmation>().is_some()
    }

    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |r| r.downcast_mut::<BasicProperties>().is_some()
    }
}

pubsub_conformance::conformance_tests!(Rabbit, nack, fan_out, max_message_bytes);
