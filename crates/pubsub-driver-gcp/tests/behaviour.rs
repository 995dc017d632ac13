//! What the Pub/Sub driver does beyond the conformance suite: URLs, bad
//! input refused before I/O, the ack deadline read from the subscription,
//! `nacklazy`, and exactly-once delivery.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Backend;
use pubsub_core::{ErrorKind, Message, Registry, Subscription, SubscriptionOptions, TopicOptions};
use pubsub_driver_gcp::{
    open_subscription, open_topic, GcpOpener, SubscriptionConfig, TopicConfig,
};

fn unique(what: &str) -> String {
    format!("behaviour-{what}-{:08x}", fastrand::u32(..))
}

async fn backend() -> Backend {
    Backend::connect().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn recv(sub: &Subscription, within: Duration) -> pubsub_core::Message {
    tokio::time::timeout(within, sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive")
}

/// A topic and a subscription to it, created on the backend.
async fn pair(b: &Backend, what: &str, deadline: Duration, exactly_once: bool) -> (String, String) {
    let topic = unique(what);
    let sub = format!("{topic}-sub");
    b.create_topic(&topic).await.unwrap();
    b.create_subscription(&topic, &sub, deadline, exactly_once)
        .await
        .unwrap();
    (b.topic_path(&topic), b.subscription_path(&sub))
}

#[tokio::test]
async fn urls_open_and_bad_ones_are_invalid_argument() {
    let b = backend().await;
    let (topic, sub) = pair(&b, "urls", Duration::from_secs(20), false).await;
    let registry = Registry::new();
    registry.register("gcppubsub", GcpOpener::with_clients(b.clients.clone()));
    let short_topic = format!(
        "gcppubsub://{}/{}",
        b.project,
        topic.rsplit('/').next().unwrap()
    );
    let t = registry
        .open_topic(&format!("{short_topic}?max_send_batch_size=10"))
        .await
        .unwrap();
    assert_eq!(t.capabilities().send_batching.max_batch_size, 10);
    t.send(Message::new("by url")).await.unwrap();
    t.shutdown().await.unwrap();
    let s = registry
        .open_subscription(&format!(
            "gcppubsub://{sub}?max_recv_batch_size=5&nacklazy=false"
        ))
        .await
        .unwrap();
    let caps = s.capabilities();
    assert_eq!(caps.max_receive_batch, 5);
    assert_eq!(
        caps.ack_deadline,
        Some(Duration::from_secs(20)),
        "the subscription's deadline, read at open"
    );
    let m = recv(&s, Duration::from_secs(20)).await;
    assert_eq!(m.body().as_ref(), b"by url");
    m.ack();
    s.shutdown().await.unwrap();
    for bad in [
        "gcppubsub://",
        "gcppubsub://p",
        "gcppubsub://projects/p/subscriptions/s",
        "gcppubsub://p/ab",
        "gcppubsub://p/goog-x",
        "gcppubsub://p/topic?max_send_batch_size=0",
        "gcppubsub://p/topic?max_send_batch_size=1001",
        "gcppubsub://p/topic?nacklazy=true",
        "gcppubsub://p/topic?bogus=1",
    ] {
        let e = registry.open_topic(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
    for bad in [
        "gcppubsub://p/s/extra",
        "gcppubsub://projects/p/topics/t",
        "gcppubsub://p/sub?max_recv_batch_size=0",
        "gcppubsub://p/sub?nacklazy=maybe",
        "gcppubsub://p/sub?ordering=true",
    ] {
        let e = registry.open_subscription(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
}

#[tokio::test]
async fn bad_messages_are_refused_before_any_io_and_nothing_else_is_lost() {
    let b = backend().await;
    let (topic, sub) = pair(&b, "bad-input", Duration::from_secs(20), false).await;
    // Without ordering: an ordering key is refused.
    let plain = open_topic(
        &b.clients,
        &topic,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    let too_many: BTreeMap<String, String> = (0..101)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let cases = [
        (
            "ordering key without ordering",
            Message::new("x").with_ordering_key("k"),
        ),
        ("neither data nor attributes", Message::new("")),
        (
            "101 attributes",
            Message::new("x").with_attributes(too_many),
        ),
        (
            "long attribute name",
            Message::new("x").with_attribute("k".repeat(257), "v"),
        ),
        (
            "long attribute value",
            Message::new("x").with_attribute("k", "v".repeat(1025)),
        ),
        (
            "over 10 MB",
            Message::new(vec![b'x'; pubsub_driver_gcp::MAX_MESSAGE_BYTES + 1]),
        ),
    ];
    for (what, m) in cases {
        let e = plain.send(m).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{what}: {e}");
        assert!(!e.is_temporary(), "{what}");
    }
    plain.send(Message::new("fits")).await.unwrap();
    let s = open_subscription(
        &b.clients,
        &sub,
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let m = recv(&s, Duration::from_secs(20)).await;
    assert_eq!(
        m.body().as_ref(),
        b"fits",
        "only the valid message was sent"
    );
    m.ack();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.receive())
            .await
            .is_err(),
        "nothing else arrives"
    );
    plain.shutdown().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn nacklazy_leaves_a_message_to_its_deadline() {
    let b = backend().await;
    let (topic, sub) = pair(&b, "nacklazy", Duration::from_secs(10), false).await;
    let t = open_topic(
        &b.clients,
        &topic,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    let mut config = SubscriptionConfig::default();
    config.nack_lazy = true;
    let s = open_subscription(&b.clients, &sub, config, SubscriptionOptions::default())
        .await
        .unwrap();
    t.send(Message::new("lazy")).await.unwrap();
    let m = recv(&s, Duration::from_secs(20)).await;
    let nacked = Instant::now();
    m.nack();
    let again = recv(&s, Duration::from_secs(40)).await;
    let waited = nacked.elapsed();
    assert_eq!(again.body().as_ref(), b"lazy");
    assert!(
        waited >= Duration::from_secs(5),
        "a lazy nack waits for the deadline, not {waited:?}"
    );
    again.ack();
    t.shutdown().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn exactly_once_acks_are_confirmed() {
    let b = backend().await;
    let (topic, sub) = pair(&b, "exactly-once", Duration::from_secs(10), true).await;
    let t = open_topic(
        &b.clients,
        &topic,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    let s = open_subscription(
        &b.clients,
        &sub,
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    for i in 0..3 {
        t.send(Message::new(format!("once{i}"))).await.unwrap();
    }
    for _ in 0..3 {
        let m = recv(&s, Duration::from_secs(20)).await;
        m.ack();
    }
    // Shutdown waits for the confirmations.
    s.shutdown().await.expect("the acks are confirmed");
    // A new stream gets none of them again, even after the deadline.
    let again = open_subscription(
        &b.clients,
        &sub,
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(15), again.receive())
            .await
            .is_err(),
        "confirmed acks are not redelivered"
    );
    again.shutdown().await.unwrap();
    t.shutdown().await.unwrap();
}
