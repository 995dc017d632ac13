//! The conformance suite against a real NATS server with JetStream.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubsub_conformance::{async_trait, Harness};
use pubsub_core::driver::{self, Subscription as _};
use pubsub_core::{Capabilities, Error, ErrorKind, Message, Result, Subscription, Topic};
use pubsub_driver_nats::async_nats::{self, jetstream};
use pubsub_driver_nats::{NatsSubscription, NatsTopic, SubscriptionConfig};

struct Nats {
    js: jetstream::Context,
    capabilities: Capabilities,
    /// The stream of each subscription (consumer) the suite created.
    streams: Mutex<HashMap<String, String>>,
}

fn mapped(e: async_nats::Error) -> Error {
    Error::new(ErrorKind::Unknown, format!("admin call failed: {e}"))
}

#[async_trait]
impl Harness for Nats {
    async fn connect() -> std::result::Result<Self, String> {
        let js = common::jetstream().await?;
        let probe =
            NatsSubscription::new(js.clone(), "probe", "probe", SubscriptionConfig::default())
                .await
                .map_err(|e| e.to_string())?;
        Ok(Nats {
            capabilities: probe.capabilities(),
            js,
            streams: Mutex::default(),
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn create_topic(&self, name: &str) -> Result<()> {
        common::create_stream(&self.js, name).await.map_err(mapped)
    }

    async fn create_subscription(&self, topic: &str, name: &str, ack: Duration) -> Result<()> {
        common::create_consumer(&self.js, topic, name, ack)
            .await
            .map_err(mapped)?;
        self.streams
            .lock()
            .unwrap()
            .insert(name.to_owned(), topic.to_owned());
        Ok(())
    }

    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
        Ok(Arc::new(NatsTopic::new(self.js.clone(), name)?))
    }

    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
        let stream = self.streams.lock().unwrap().get(name).cloned();
        let stream = stream.unwrap_or_else(|| "conf-missing-stream".to_owned());
        Ok(Arc::new(
            NatsSubscription::new(
                self.js.clone(),
                &stream,
                name,
                SubscriptionConfig::default(),
            )
            .await?,
        ))
    }

    fn check_raw_topic(&self, topic: &Topic) -> std::result::Result<(), String> {
        topic
            .as_raw::<jetstream::Context>()
            .map(|_| ())
            .ok_or_else(|| "no jetstream::Context".into())
    }

    fn check_raw_subscription(&self, sub: &Subscription) -> std::result::Result<(), String> {
        sub.as_raw::<jetstream::Context>()
            .map(|_| ())
            .ok_or_else(|| "no jetstream::Context".into())
    }

    fn check_raw_message(&self, msg: &Message) -> std::result::Result<(), String> {
        let m = msg
            .as_raw::<jetstream::Message>()
            .ok_or("no jetstream::Message")?;
        let info = m.info().map_err(|e| e.to_string())?;
        if info.stream_sequence > 0 && info.delivered >= 1 {
            Ok(())
        } else {
            Err(format!("unexpected message {m:?}"))
        }
    }

    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        match err.source_as::<jetstream::context::PublishError>() {
            Some(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => Ok(()),
            other => Err(format!(
                "expected a StreamNotFound publish error, got {other:?} in {err}"
            )),
        }
    }

    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        |s| {
            s.raw::<async_nats::jetstream::publish::PublishAck>()
                .is_some()
        }
    }

    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |r| {
            r.downcast_mut::<async_nats::HeaderMap>()
                .is_some_and(|h| h.get(async_nats::header::NATS_MESSAGE_ID).is_some())
        }
    }
}

pubsub_conformance::conformance_tests!(
    Nats,
    nack,
    fan_out,
    redelivery_after_deadline,
    lease_extension,
    max_message_bytes
);
