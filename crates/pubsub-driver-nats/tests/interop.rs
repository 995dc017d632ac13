//! Interoperation with a different NATS client: Python's nats-py, installed
//! by `scripts/backends up`, writing and reading headers as the Go CDK's
//! `natsv2` mode does.

mod common;

use std::time::Duration;

use pubsub_core::Message;
use pubsub_driver_nats::async_nats::jetstream;
use pubsub_driver_nats::{open_subscription, open_topic, SubscriptionConfig};

async fn peer(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_peer.py");
    pubsub_conformance::peer::run("nats-py", script, args).await
}

async fn stream_and_consumer(what: &str) -> (jetstream::Context, String) {
    let js = common::jetstream().await.unwrap_or_else(|e| panic!("{e}"));
    let name = format!("interop-{what}-{:08x}", fastrand::u32(..));
    common::create_stream(&js, &name).await.unwrap();
    common::create_consumer(&js, &name, "c", Duration::from_secs(30))
        .await
        .unwrap();
    (js, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_another_client_are_received_with_their_headers() {
    let (js, name) = stream_and_consumer("in").await;
    let sub = open_subscription(
        &js,
        &name,
        "c",
        SubscriptionConfig::default(),
        Default::default(),
    )
    .await
    .unwrap();

    peer(&["publish", &common::server(), &name, "hello from nats-py"]).await;

    let m = tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive");
    assert_eq!(m.body().as_ref(), b"hello from nats-py");
    let a = m.attributes();
    assert_eq!(a["kind"], "greeting");
    assert_eq!(a["with space"], "a/b c=d&e");
    assert_eq!(a["ünï"], "値 🎉");
    assert_eq!(a["empty"], "");
    assert_eq!(a["raw"], "50%", "a header that does not unescape is kept");
    assert_eq!(a.len(), 5, "{a:?}");
    assert_eq!(m.delivery_attempt(), Some(1));
    m.ack();
    sub.shutdown().await.unwrap();
    let _ = js.delete_stream(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_this_driver_publishes_are_read_by_another_client() {
    let (js, name) = stream_and_consumer("out").await;
    let topic = open_topic(&js, &name, Default::default()).unwrap();
    let msg = Message::new("hello from rust ✓")
        .with_attribute("kind", "greeting")
        .with_attribute("ünï", "値 with spaces")
        .with_attribute("a:b", "x=y&z");
    topic.send(msg).await.unwrap();
    topic.shutdown().await.unwrap();

    let line = peer(&["get", &common::server(), &name, "c"]).await;
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("json from the peer");
    assert_eq!(v["body"], "hello from rust ✓");
    assert_eq!(v["headers"]["kind"], "greeting");
    assert_eq!(v["headers"]["ünï"], "値 with spaces");
    assert_eq!(v["headers"]["a:b"], "x=y&z");
    assert_eq!(
        v["raw_headers"]["a%3Ab"], "x%3Dy%26z",
        "escaped as Go's QueryEscape"
    );
    let id = v["raw_headers"]["Nats-Msg-Id"]
        .as_str()
        .expect("Nats-Msg-Id");
    assert_eq!(id.len(), 32, "{id}");
    let _ = js.delete_stream(&name).await;
}
