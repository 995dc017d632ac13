//! The conformance suite against Google's Pub/Sub emulator, or a live
//! project when `PUBSUB_CONFORMANCE_GCP_PROJECT` names one (see the crate
//! docs): the same harness, differing only in endpoint and credentials.

mod common;

use std::sync::Arc;
use std::time::Duration;

use pubsub_conformance::{async_trait, Harness};
use pubsub_core::driver::{self, Subscription as _, Topic as _};
use pubsub_core::{Capabilities, Error, ErrorKind, Message, Result, Subscription, Topic};
use pubsub_driver_gcp::google_cloud_pubsub::client::{BasePublisher, Subscriber};
use pubsub_driver_gcp::google_cloud_pubsub::error::PublishError;
use pubsub_driver_gcp::google_cloud_pubsub::model;
use pubsub_driver_gcp::{GcpSubscription, GcpTopic, SubscriptionConfig, TopicConfig};

struct Gcp(common::Backend);

fn admin(e: String) -> Error {
    Error::new(ErrorKind::Unknown, e)
}

fn ordered() -> TopicConfig {
    let mut c = TopicConfig::default();
    c.message_ordering = true;
    c
}

#[async_trait]
impl Harness for Gcp {
    async fn connect() -> std::result::Result<Self, String> {
        common::Backend::connect().await.map(Gcp)
    }

    fn capabilities(&self) -> Capabilities {
        // No I/O: the names are checked, the deadline given.
        let topic = GcpTopic::new(self.0.clients.publisher.clone(), "p/probe", ordered())
            .expect("probe topic");
        let mut config = SubscriptionConfig::default();
        config.ack_deadline = Some(Duration::from_secs(10));
        let sub = futures_util::FutureExt::now_or_never(GcpSubscription::new(
            self.0.clients.subscriber.clone(),
            None,
            "p/probe",
            config,
        ))
        .expect("no I/O")
        .expect("probe subscription");
        let mut caps = sub.capabilities();
        caps.ordering_keys &= topic.capabilities().ordering_keys;
        caps
    }

    fn short_ack_deadline(&self) -> Duration {
        // Pub/Sub's shortest ack deadline.
        Duration::from_secs(10)
    }

    async fn create_topic(&self, name: &str) -> Result<()> {
        self.0.create_topic(name).await.map_err(admin)
    }

    async fn create_subscription(&self, topic: &str, name: &str, ack: Duration) -> Result<()> {
        self.0
            .create_subscription(topic, name, ack, false)
            .await
            .map_err(admin)
    }

    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
        let path = self.0.topic_path(name);
        Ok(Arc::new(GcpTopic::new(
            self.0.clients.publisher.clone(),
            &path,
            ordered(),
        )?))
    }

    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
        let path = self.0.subscription_path(name);
        Ok(Arc::new(
            GcpSubscription::new(
                self.0.clients.subscriber.clone(),
                self.0.clients.admin.as_ref(),
                &path,
                SubscriptionConfig::default(),
            )
            .await?,
        ))
    }

    fn check_raw_topic(&self, topic: &Topic) -> std::result::Result<(), String> {
        topic
            .as_raw::<BasePublisher>()
            .map(|_| ())
            .ok_or_else(|| "no BasePublisher".into())
    }

    fn check_raw_subscription(&self, sub: &Subscription) -> std::result::Result<(), String> {
        sub.as_raw::<Subscriber>()
            .map(|_| ())
            .ok_or_else(|| "no Subscriber".into())
    }

    fn check_raw_message(&self, msg: &Message) -> std::result::Result<(), String> {
        let m = msg.as_raw::<model::Message>().ok_or("no model::Message")?;
        if !m.message_id.is_empty() && m.publish_time.is_some() && m.data == msg.body() {
            Ok(())
        } else {
            Err(format!("unexpected message {m:?}"))
        }
    }

    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        match err.source_as::<PublishError>() {
            Some(PublishError::Rpc(e)) if e.status().is_some() => Ok(()),
            other => Err(format!(
                "expected a publish error with a status, got {other:?} in {err}"
            )),
        }
    }

    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        |s| {
            s.raw::<String>()
                .is_some_and(|id| Some(id.as_str()) == s.id())
        }
    }

    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |r| r.downcast_mut::<model::Message>().is_some()
    }
}

pubsub_conformance::conformance_tests!(
    Gcp,
    nack,
    fan_out,
    redelivery_after_deadline,
    lease_extension,
    max_message_bytes,
    ordering_keys
);
