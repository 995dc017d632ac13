//! Interoperation with a different Redis client: Python's redis-py,
//! installed by `scripts/backends up`.

mod common;

use std::time::Duration;

use pubsub_core::Message;
use pubsub_driver_redis::{open_subscription, open_topic, SubscriptionConfig};

async fn peer(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_peer.py");
    pubsub_conformance::peer::run("redis-py", script, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_another_client_writes_are_received_with_their_fields_as_attributes() {
    let (connector, mut admin) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = format!("interop-in-{:08x}", fastrand::u32(..));
    common::create_stream(&mut admin, &stream).await.unwrap();
    common::create_group(&mut admin, &stream, "g")
        .await
        .unwrap();
    let sub = open_subscription(
        &connector,
        &stream,
        "g",
        SubscriptionConfig::default(),
        Default::default(),
    )
    .unwrap();

    peer(&["publish", &common::server(), &stream]).await;

    let m = tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive");
    assert!(m.body().is_empty(), "a plain entry has no $body");
    let a = m.attributes();
    assert_eq!(a["name"], "alice");
    assert_eq!(a["count"], "3");
    assert_eq!(a["note"], "ünï 値");
    assert_eq!(a.len(), 3, "{a:?}");
    let id = m.id().expect("an id");
    assert!(
        id.contains('-'),
        "the entry id stands in for a message id: {id}"
    );
    assert_eq!(m.delivery_attempt(), Some(1));
    m.ack();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_this_driver_sends_are_read_by_another_client() {
    let (connector, mut admin) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = format!("interop-out-{:08x}", fastrand::u32(..));
    common::create_stream(&mut admin, &stream).await.unwrap();
    common::create_group(&mut admin, &stream, "g")
        .await
        .unwrap();
    let topic = open_topic(&connector, &stream, Default::default(), Default::default()).unwrap();
    let msg = Message::new("hello from rust ✓")
        .with_attribute("kind", "greeting")
        .with_attribute("$dollar", "escaped");
    topic.send(msg).await.unwrap();
    topic.shutdown().await.unwrap();

    let line = peer(&["get", &common::server(), &stream, "g"]).await;
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("json from the peer");
    let f = &v["fields"];
    assert_eq!(f["$body"], "hello from rust ✓");
    assert_eq!(f["kind"], "greeting");
    assert_eq!(f["$$dollar"], "escaped");
    assert_eq!(f["$id"].as_str().map(str::len), Some(32));
}
