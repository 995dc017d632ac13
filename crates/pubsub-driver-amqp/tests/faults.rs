//! Fault tests: 10,000 messages sent by several tasks while the broker
//! connection is forcibly closed, while RabbitMQ is stopped and started, or
//! while a proxy between driver and broker cuts every connection. Every
//! message whose `send` succeeded must be received at least once;
//! duplicates are counted and bounded.
//!
//! They disturb the broker with `rabbitmqctl`, so they run one at a time.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::Admin;
use pubsub_conformance::faults::{faults_lose_nothing, FaultProxy};
use pubsub_driver_amqp::{
    open_subscription, open_topic, Connector, SubscriptionConfig, TopicConfig,
};

const SENDERS: usize = 5;
const PER_SENDER: usize = 2_000;
const SETTLE: Duration = Duration::from_secs(120);

type Fault = Box<dyn FnMut(u32) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Serializes the tests of this file: each disturbs the whole broker.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect(
            "rabbitmqctl must be on PATH to run the fault tests (it comes with rabbitmq-server)",
        );
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the broker application again if a test stops half way.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .status();
    }
}

/// Declares an exchange and queue on the broker and runs the faults through
/// topic and subscription drivers on `through`.
async fn run(name: &str, through: Option<&Connector>, fault: Fault) {
    // What the driver and core did, shown only when a run fails (the test
    // writer is captured); RUST_LOG overrides it.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("pubsub_core=debug,pubsub_driver_amqp=debug,lapin=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let x = format!("fault-{name}-{:08x}", fastrand::u32(..));
    let q = format!("{x}-q");
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    let connector = through.unwrap_or(&admin.connector);
    let topic = open_topic(connector, &x, TopicConfig::default(), Default::default()).unwrap();
    let sub = open_subscription(
        connector,
        &q,
        SubscriptionConfig::default(),
        Default::default(),
    )
    .unwrap();
    faults_lose_nothing(topic, sub, SENDERS, PER_SENDER, SETTLE, fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_forcibly_closed_twice_lose_no_confirmed_message() {
    let _serial = BROKER.lock().await;
    let fault: Fault = Box::new(|_| {
        Box::pin(rabbitmqctl(&[
            "close_all_connections",
            "fault test: forced close",
        ]))
    });
    run("close", None, fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_restarted_twice_loses_no_confirmed_message() {
    let _serial = BROKER.lock().await;
    let _restart = StartAppOnDrop;
    let fault: Fault = Box::new(|k| {
        Box::pin(async move {
            rabbitmqctl(&["stop_app"]).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            rabbitmqctl(&["start_app"]).await;
            println!("RabbitMQ restarted ({k})");
        })
    });
    run("restart", None, fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_twice_through_a_proxy_lose_no_confirmed_message() {
    let _serial = BROKER.lock().await;
    let url = pubsub_core::Url::parse(&common::server_url()).expect("RABBIT_SERVER_URL is a URL");
    let upstream = (
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5672),
    );
    let upstream = tokio::net::lookup_host(upstream)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .expect("RabbitMQ's address resolves");
    let proxy = Arc::new(FaultProxy::start(upstream).await.expect("proxy"));
    let mut through = url.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.addr().port())).unwrap();
    let connector = Connector::new(through.as_str()).unwrap();
    let fault: Fault = Box::new(FaultProxy::cutter(&proxy));
    run("cut", Some(&connector), fault).await;
    assert!(
        proxy.accepted() >= 3,
        "the driver reconnected after each cut"
    );
}

/// A broker that stops answering (traffic paused, the connection still
/// open) must not hold a subscription's or topic's shutdown for ever: its
/// acks and closing time out, and the deliveries come back when the
/// connection finally drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_while_the_broker_does_not_answer() {
    let _serial = BROKER.lock().await;
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let url = pubsub_core::Url::parse(&common::server_url()).expect("RABBIT_SERVER_URL is a URL");
    let upstream = tokio::net::lookup_host((
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5672),
    ))
    .await
    .ok()
    .and_then(|mut a| a.next())
    .expect("RabbitMQ's address resolves");
    let proxy = FaultProxy::start(upstream).await.expect("proxy");
    let mut through = url.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.addr().port())).unwrap();
    let connector = Connector::new(through.as_str()).unwrap();
    let x = format!("fault-stall-{:08x}", fastrand::u32(..));
    let q = format!("{x}-q");
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    let topic = open_topic(&connector, &x, TopicConfig::default(), Default::default()).unwrap();
    let sub = open_subscription(
        &connector,
        &q,
        SubscriptionConfig::default(),
        Default::default(),
    )
    .unwrap();
    for i in 0..3 {
        topic
            .send(pubsub_core::Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let m = tokio::time::timeout(Duration::from_secs(10), sub.receive())
        .await
        .expect("a message arrives")
        .unwrap();
    proxy.pause();
    m.ack();
    let limit = Duration::from_secs(45);
    let closed = tokio::time::timeout(limit, async {
        let _ = sub.shutdown().await;
        let _ = topic.shutdown().await;
    })
    .await;
    proxy.resume();
    assert!(
        closed.is_ok(),
        "shutdown did not return within {limit:?} while the broker did not answer"
    );
}
