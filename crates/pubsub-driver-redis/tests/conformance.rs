//! The conformance suite against a real Redis.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubsub_conformance::{async_trait, Harness};
use pubsub_core::driver::{self, Subscription as _};
use pubsub_core::{Capabilities, Error, ErrorKind, Message, Result, Subscription, Topic};
use pubsub_driver_redis::redis::{self, aio::ConnectionManager};
use pubsub_driver_redis::{
    Connector, Entry, Fields, RedisSubscription, RedisTopic, SubscriptionConfig, TopicConfig,
};

struct Redis {
    connector: Connector,
    admin: ConnectionManager,
    /// The stream and ack deadline of each group the suite created.
    groups: Mutex<HashMap<String, (String, Duration)>>,
}

fn mapped(e: redis::RedisError) -> Error {
    Error::new(ErrorKind::Unknown, format!("admin call failed: {e}"))
}

#[async_trait]
impl Harness for Redis {
    async fn connect() -> std::result::Result<Self, String> {
        let (connector, admin) = common::connect().await?;
        Ok(Redis {
            connector,
            admin,
            groups: Mutex::default(),
        })
    }

    fn capabilities(&self) -> Capabilities {
        RedisSubscription::new(
            self.connector.clone(),
            "s",
            "g",
            SubscriptionConfig::default(),
        )
        .expect("valid")
        .capabilities()
    }

    async fn create_topic(&self, name: &str) -> Result<()> {
        common::create_stream(&mut self.admin.clone(), name)
            .await
            .map_err(mapped)
    }

    async fn create_subscription(&self, topic: &str, name: &str, ack: Duration) -> Result<()> {
        common::create_group(&mut self.admin.clone(), topic, name)
            .await
            .map_err(mapped)?;
        self.groups
            .lock()
            .unwrap()
            .insert(name.to_owned(), (topic.to_owned(), ack));
        Ok(())
    }

    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
        Ok(Arc::new(RedisTopic::new(
            self.connector.clone(),
            name,
            TopicConfig::default(),
        )?))
    }

    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
        let known = self.groups.lock().unwrap().get(name).cloned();
        let (stream, ack) =
            known.unwrap_or_else(|| ("conf-missing-stream".to_owned(), Duration::from_secs(30)));
        let config = SubscriptionConfig::default().with_ack_deadline(ack);
        Ok(Arc::new(RedisSubscription::new(
            self.connector.clone(),
            &stream,
            name,
            config,
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
        let e = msg.as_raw::<Entry>().ok_or("no Entry")?;
        if e.id.contains('-') && e.fields.iter().any(|(k, _)| k.as_ref() == b"$body") {
            Ok(())
        } else {
            Err(format!("unexpected entry {e:?}"))
        }
    }

    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        // XADD NOMKSTREAM answers nil for a missing stream: no Redis error
        // to reach, so the driver's own NotFound is what there is.
        if err.kind() == ErrorKind::NotFound && err.to_string().contains("does not exist") {
            Ok(())
        } else {
            Err(format!("expected the driver's NotFound, got {err}"))
        }
    }

    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        // The entry id Redis gave, time-sequence.
        |s| s.raw::<String>().is_some_and(|id| id.contains('-'))
    }

    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |r| {
            r.downcast_mut::<Fields>()
                .is_some_and(|f| f.iter().any(|(k, _)| k == "$body"))
        }
    }
}

pubsub_conformance::conformance_tests!(
    Redis,
    nack,
    fan_out,
    redelivery_after_deadline,
    lease_extension,
    max_message_bytes
);
