//! Interoperation with Google's own Python client (PyPI
//! `google-cloud-pubsub`), installed by `scripts/backends up`: the body and
//! attributes cross intact both ways.

mod common;

use std::time::Duration;

use pubsub_core::{Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_gcp::google_cloud_pubsub::model;
use pubsub_driver_gcp::{open_subscription, open_topic, Endpoint, SubscriptionConfig, TopicConfig};

async fn peer(b: &common::Backend, args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_peer.py");
    let env: Vec<(&str, &str)> = match &b.endpoint {
        Endpoint::Emulator(host) => vec![("PUBSUB_EMULATOR_HOST", host.as_str())],
        Endpoint::Google => Vec::new(),
    };
    let out =
        pubsub_conformance::peer::run_with_env("google-cloud-pubsub", script, args, &env).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("json from the peer ({e}): {out}"))
}

async fn pair(b: &common::Backend, what: &str) -> (String, String) {
    let topic = format!("interop-{what}-{:08x}", fastrand::u32(..));
    let sub = format!("{topic}-sub");
    b.create_topic(&topic).await.unwrap();
    b.create_subscription(&topic, &sub, Duration::from_secs(30), false)
        .await
        .unwrap();
    (b.topic_path(&topic), b.subscription_path(&sub))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_googles_python_client_publishes_are_received_intact() {
    let b = common::Backend::connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (topic, sub) = pair(&b, "in").await;
    let s = open_subscription(
        &b.clients,
        &sub,
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let sent = peer(&b, &["publish", &topic]).await;
    let m = tokio::time::timeout(Duration::from_secs(30), s.receive())
        .await
        .expect("a message arrives")
        .expect("receive");
    assert_eq!(m.body().as_ref(), b"\x00\xffbinary from python\xc3\x28");
    let a = m.attributes();
    assert_eq!(a["kind"], "greeting");
    assert_eq!(a["note"], "ünï 値");
    assert_eq!(a["with space"], "a b");
    assert_eq!(a["slash/key"], "x/y");
    assert_eq!(a.len(), 4, "{a:?}");
    assert_eq!(
        m.id(),
        sent["id"].as_str(),
        "the id Pub/Sub gave the publisher"
    );
    assert!(m
        .as_raw::<model::Message>()
        .is_some_and(|r| r.publish_time.is_some()));
    m.ack();
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_this_driver_publishes_are_read_by_googles_python_client() {
    let b = common::Backend::connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (topic, sub) = pair(&b, "out").await;
    let mut config = TopicConfig::default();
    config.message_ordering = true;
    let t = open_topic(&b.clients, &topic, config, TopicOptions::default()).unwrap();
    let body: &[u8] = b"\x00\x01 bytes from rust \xff";
    t.send(
        Message::new(body.to_vec())
            .with_attribute("kind", "greeting")
            .with_attribute("ключ", "値 ✓")
            .with_ordering_key("customer-7"),
    )
    .await
    .unwrap();
    t.shutdown().await.unwrap();
    let got = peer(&b, &["get", &sub]).await;
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD
        .decode(got["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, body);
    assert_eq!(got["attributes"]["kind"], "greeting");
    assert_eq!(got["attributes"]["ключ"], "値 ✓");
    assert_eq!(got["attributes"].as_object().unwrap().len(), 2);
    assert_eq!(got["ordering_key"], "customer-7");
}
