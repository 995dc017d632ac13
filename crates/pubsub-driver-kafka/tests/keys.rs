//! `key_name` as the Go CDK's Kafka driver has it: on a topic, the named
//! attribute becomes the record's key instead of a header; on a
//! subscription, a record's key comes back as that attribute.

mod common;

use std::time::Duration;

use common::Kafka;
use pubsub_core::{Message, Subscription};
use pubsub_driver_kafka::{
    open_subscription, open_topic, StartOffset, SubscriptionConfig, TopicConfig,
};

async fn recv(sub: &Subscription) -> Message {
    tokio::time::timeout(Duration::from_secs(60), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_name_moves_an_attribute_into_the_key_and_back() {
    let k = Kafka::mock();
    k.create_topic_with("keys", 1).await.unwrap();
    let topic = open_topic(
        &k.settings,
        "keys",
        TopicConfig::default().with_key_name("user"),
        Default::default(),
    )
    .unwrap();
    topic
        .send(
            Message::new("keyed")
                .with_attribute("user", "u-7")
                .with_attribute("other", "x"),
        )
        .await
        .unwrap();
    topic.shutdown().await.unwrap();

    let oldest = || SubscriptionConfig::default().with_offset(StartOffset::Oldest);
    let plain = open_subscription(
        &k.settings,
        "plain",
        &["keys"],
        oldest(),
        Default::default(),
    )
    .await
    .unwrap();
    let m = recv(&plain).await;
    assert_eq!(m.ordering_key(), Some("u-7"), "the attribute is the key");
    assert_eq!(m.attribute("user"), None, "and not also a header");
    assert_eq!(m.attribute("other"), Some("x"));
    m.ack();
    plain.shutdown().await.unwrap();

    let keyed = open_subscription(
        &k.settings,
        "keyed",
        &["keys"],
        oldest().with_key_name("user"),
        Default::default(),
    )
    .await
    .unwrap();
    let m = recv(&keyed).await;
    assert_eq!(
        m.attribute("user"),
        Some("u-7"),
        "the key comes back as the attribute"
    );
    assert_eq!(m.attribute("other"), Some("x"));
    m.ack();
    keyed.shutdown().await.unwrap();
}
