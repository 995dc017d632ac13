//! Shared by the Pub/Sub tests: where they run (Google's emulator, or a
//! live project when the environment names one) and the admin calls they
//! make. Both go through this same code; they differ only in endpoint and
//! credentials.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::Duration;

use pubsub_driver_gcp::google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};
use pubsub_driver_gcp::{Clients, Endpoint};

/// The emulator `scripts/backends up` starts.
pub const EMULATOR: &str = "127.0.0.1:8085";

/// How to start the emulator, for the message of a test that cannot reach it.
pub const HOW: &str = "start Google's Pub/Sub emulator (scripts/backends up, or \
     `/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator \
     --host=127.0.0.1 --port=8085`) and set PUBSUB_EMULATOR_HOST if it is not on 127.0.0.1:8085, \
     or set PUBSUB_CONFORMANCE_GCP_PROJECT (with PUBSUB_EMULATOR_HOST unset) to run against a \
     live project";

/// Where the tests run: a live project when `PUBSUB_CONFORMANCE_GCP_PROJECT`
/// is set and `PUBSUB_EMULATOR_HOST` is not, otherwise the emulator.
pub fn target() -> (Endpoint, String) {
    let live = std::env::var("PUBSUB_CONFORMANCE_GCP_PROJECT")
        .ok()
        .filter(|p| !p.is_empty());
    match (Endpoint::from_env(), live) {
        (Endpoint::Google, Some(project)) => (Endpoint::Google, project),
        (Endpoint::Emulator(host), _) => (Endpoint::Emulator(host), "pubsub-rs-test".into()),
        (Endpoint::Google, None) => (Endpoint::Emulator(EMULATOR.into()), "pubsub-rs-test".into()),
    }
}

/// A connection to the target: the driver's clients and the admin clients.
pub struct Backend {
    pub endpoint: Endpoint,
    pub project: String,
    pub clients: Clients,
    pub topics: TopicAdmin,
    pub subscriptions: SubscriptionAdmin,
    /// What this connection created, deleted when it is dropped.
    created: Mutex<Vec<(bool, String)>>,
}

impl Backend {
    /// Connects to [`target`], failing with how to start the emulator when
    /// it does not answer.
    pub async fn connect() -> Result<Self, String> {
        let (endpoint, project) = target();
        Self::connect_to(endpoint, project).await
    }

    /// Connects to `endpoint` (the fault tests put a proxy there).
    pub async fn connect_to(endpoint: Endpoint, project: String) -> Result<Self, String> {
        if let Endpoint::Emulator(host) = &endpoint {
            let reach = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(host.as_str()),
            )
            .await;
            if !matches!(reach, Ok(Ok(_))) {
                return Err(format!("nothing answers at {host}; {HOW}"));
            }
        }
        let clients = pubsub_driver_gcp::connect(&endpoint)
            .await
            .map_err(|e| format!("{e}; {HOW}"))?;
        let topics = pubsub_driver_gcp::topic_admin(&endpoint)
            .await
            .map_err(|e| format!("{e}; {HOW}"))?;
        let subscriptions = pubsub_driver_gcp::subscription_admin(&endpoint)
            .await
            .map_err(|e| format!("{e}; {HOW}"))?;
        Ok(Backend {
            endpoint,
            project,
            clients,
            topics,
            subscriptions,
            created: Mutex::new(Vec::new()),
        })
    }

    pub fn topic_path(&self, name: &str) -> String {
        format!("projects/{}/topics/{name}", self.project)
    }

    pub fn subscription_path(&self, name: &str) -> String {
        format!("projects/{}/subscriptions/{name}", self.project)
    }

    pub async fn create_topic(&self, name: &str) -> Result<(), String> {
        let path = self.topic_path(name);
        self.topics
            .create_topic()
            .set_name(&path)
            .send()
            .await
            .map_err(|e| format!("create topic {path}: {e}"))?;
        self.created.lock().unwrap().push((true, path));
        Ok(())
    }

    /// A subscription with message ordering on, and with exactly-once
    /// delivery if asked.
    pub async fn create_subscription(
        &self,
        topic: &str,
        name: &str,
        ack_deadline: Duration,
        exactly_once: bool,
    ) -> Result<(), String> {
        let path = self.subscription_path(name);
        self.subscriptions
            .create_subscription()
            .set_name(&path)
            .set_topic(self.topic_path(topic))
            .set_ack_deadline_seconds(ack_deadline.as_secs().clamp(10, 600) as i32)
            .set_enable_message_ordering(true)
            .set_enable_exactly_once_delivery(exactly_once)
            .send()
            .await
            .map_err(|e| format!("create subscription {path}: {e}"))?;
        self.created.lock().unwrap().push((false, path));
        Ok(())
    }
}

impl Drop for Backend {
    /// Deletes what the tests created, on a thread of its own because a
    /// test's runtime may be ending.
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        if created.is_empty() {
            return;
        }
        let endpoint = self.endpoint.clone();
        // Clients of their own: the test's may be tied to its runtime,
        // which this thread blocks.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (Ok(topics), Ok(subscriptions)) = (
                    pubsub_driver_gcp::topic_admin(&endpoint).await,
                    pubsub_driver_gcp::subscription_admin(&endpoint).await,
                ) else {
                    return;
                };
                for (is_topic, path) in created.into_iter().rev() {
                    let r = if is_topic {
                        topics.delete_topic().set_topic(&path).send().await
                    } else {
                        subscriptions
                            .delete_subscription()
                            .set_subscription(&path)
                            .send()
                            .await
                    };
                    if let Err(e) = r {
                        eprintln!("cleanup of {path} failed: {e}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}
