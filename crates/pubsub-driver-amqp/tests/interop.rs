//! Interoperation with a different AMQP client: Python's pika, installed by
//! `scripts/backends up`.

mod common;

use std::time::Duration;

use common::{server_url, Admin};
use pubsub_core::Message;
use pubsub_driver_amqp::{open_subscription, open_topic, SubscriptionConfig, TopicConfig};

async fn peer(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_peer.py");
    pubsub_conformance::peer::run("pika", script, args).await
}

fn unique(what: &str) -> String {
    format!("interop-{what}-{:08x}", fastrand::u32(..))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_another_client_are_received_with_their_headers_as_strings() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (x, q) = (unique("x"), unique("q"));
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    let sub = open_subscription(
        &admin.connector,
        &q,
        SubscriptionConfig::default(),
        Default::default(),
    )
    .unwrap();

    peer(&["publish", &server_url(), &x, "hello from pika"]).await;

    let m = tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive");
    assert_eq!(m.body().as_ref(), b"hello from pika");
    assert_eq!(m.id(), Some("from-pika"));
    let a = m.attributes();
    assert_eq!(a["text"], "plain text");
    assert_eq!(a["unicode"], "ünïcödé 値");
    assert_eq!(a["int"], "42");
    assert_eq!(a["negative"], "-7");
    assert_eq!(a["big"], "1099511627776");
    assert_eq!(a["bool"], "true");
    assert_eq!(a["decimal"], "12.34");
    assert_eq!(a["timestamp"], "1700000000");
    assert_eq!(a["nested"], r#"{"x":1,"y":"z"}"#);
    assert_eq!(a["list"], r#"[1,"a",false]"#);
    assert_eq!(a["none"], "");
    m.ack();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_this_driver_publishes_are_read_by_another_client() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (x, q) = (unique("x"), unique("q"));
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    let topic = open_topic(
        &admin.connector,
        &x,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    topic
        .send(
            Message::new("hello from rust ✓")
                .with_attribute("kind", "greeting")
                .with_attribute("ünï", "値 with spaces"),
        )
        .await
        .unwrap();
    topic.shutdown().await.unwrap();

    let line = peer(&["get", &server_url(), &q]).await;
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("json from the peer");
    assert_eq!(v["body"], "hello from rust ✓");
    assert_eq!(v["headers"]["kind"], "greeting");
    assert_eq!(v["headers"]["ünï"], "値 with spaces");
    assert_eq!(v["delivery_mode"], 2, "published persistent");
}
