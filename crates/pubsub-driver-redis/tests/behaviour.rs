//! What the Redis driver does beyond the conformance suite: URLs, creating
//! groups, the delivery limit and dead-letter stream, trimming, and
//! forgetting idle consumers.

mod common;

use std::time::Duration;

use pubsub_core::{ErrorKind, Message, Registry, Subscription, Topic};
use pubsub_driver_redis::redis::{self, aio::ConnectionManager};
use pubsub_driver_redis::{
    open_subscription, open_topic, Connector, RedisOpener, SubscriptionConfig, TopicConfig,
};

fn unique(what: &str) -> String {
    format!("behaviour-{what}-{:08x}", fastrand::u32(..))
}

async fn recv(sub: &Subscription) -> pubsub_core::Message {
    tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive")
}

async fn expire(conn: &mut ConnectionManager, key: &str) {
    let _: () = redis::cmd("EXPIRE")
        .arg(key)
        .arg(600)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn urls_open_and_bad_ones_are_invalid_argument() {
    let (connector, _) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let registry = Registry::new();
    registry.register("redis", RedisOpener::with_connector(connector));
    let t = registry
        .open_topic("redis://orders?maxlen=100")
        .await
        .unwrap();
    t.shutdown().await.unwrap();
    let s = registry
        .open_subscription("redis://orders?group=g&consumer=c1&ack_deadline_ms=5000&batch=10")
        .await
        .unwrap();
    assert_eq!(s.capabilities().ack_deadline, Some(Duration::from_secs(5)));
    assert_eq!(s.capabilities().max_receive_batch, 10);
    s.shutdown().await.unwrap();
    for bad in [
        "redis://orders?group=",
        "redis://orders",
        "redis://orders?group=g&batch=0",
        "redis://orders?group=g&bogus=1",
        "redis://?group=g",
    ] {
        let e = registry.open_subscription(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
    for bad in ["redis://orders?maxlen=x", "redis://orders?bogus=1"] {
        let e = registry.open_topic(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_groups_are_created_when_asked() {
    let (connector, mut admin) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = unique("create");
    let sub = open_subscription(
        &connector,
        &stream,
        "g",
        SubscriptionConfig::default().with_create_group(),
        Default::default(),
    )
    .unwrap();
    // The group (and stream) exist once the subscription first reads.
    let early = tokio::time::timeout(Duration::from_millis(700), sub.receive()).await;
    assert!(early.is_err(), "nothing to receive yet");
    expire(&mut admin, &stream).await;
    let topic = open_topic(
        &connector,
        &stream,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    topic.send(Message::new("made")).await.unwrap();
    let m = recv(&sub).await;
    assert_eq!(m.body().as_ref(), b"made");
    m.ack();

    // Without the option, a missing stream is NotFound on send.
    let missing = open_topic(
        &connector,
        &unique("absent"),
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    let e = missing.send(Message::new("x")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let made = unique("made");
    let creating = open_topic(
        &connector,
        &made,
        TopicConfig::default().with_create_stream(),
        Default::default(),
    )
    .unwrap();
    creating.send(Message::new("x")).await.unwrap();
    expire(&mut admin, &made).await;
    for t in [topic, missing, creating] {
        let _ = t.shutdown().await;
    }
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_past_max_deliveries_go_to_the_dead_letter_stream() {
    let (connector, mut admin) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = unique("dlq");
    let dead = format!("{stream}-dead");
    common::create_stream(&mut admin, &stream).await.unwrap();
    common::create_group(&mut admin, &stream, "g")
        .await
        .unwrap();
    let config = SubscriptionConfig::default()
        .with_ack_deadline(Duration::from_millis(500))
        .with_max_deliveries(2, Some(dead.clone()));
    let sub = open_subscription(&connector, &stream, "g", config, Default::default()).unwrap();
    let topic: Topic = open_topic(
        &connector,
        &stream,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    topic
        .send(Message::new("poison").with_attribute("k", "v"))
        .await
        .unwrap();
    let first = recv(&sub).await;
    assert_eq!(first.delivery_attempt(), Some(1));
    first.nack();
    let second = recv(&sub).await;
    assert_eq!(second.body().as_ref(), b"poison");
    assert_eq!(
        second.delivery_attempt(),
        Some(2),
        "a nack does not count a delivery; the claim does"
    );
    second.nack();
    // The third claim finds it past the limit: moved and acked, not handed
    // out. A receive keeps the subscription reading meanwhile.
    let reader = sub.clone();
    let waiting = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(4), reader.receive())
            .await
            .map(|r| r.map(|m| m.body().clone()))
    });
    let mut moved = 0;
    for _ in 0..100 {
        moved = redis::cmd("XLEN")
            .arg(&dead)
            .query_async::<usize>(&mut admin)
            .await
            .unwrap();
        if moved > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expire(&mut admin, &dead).await;
    assert_eq!(moved, 1, "the entry reached the dead-letter stream");
    let handed = waiting.await.unwrap();
    assert!(handed.is_err(), "handed out past the limit: {handed:?}");
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query_async(&mut admin)
        .await
        .unwrap();
    let fields = &entries.ids[0].map;
    assert_eq!(
        fields["$body"],
        redis::Value::BulkString(b"poison".to_vec())
    );
    assert_eq!(fields["k"], redis::Value::BulkString(b"v".to_vec()));
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "the entry was acked in its group");
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxlen_trims_the_stream() {
    let (connector, mut admin) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = unique("trim");
    common::create_stream(&mut admin, &stream).await.unwrap();
    let topic = open_topic(
        &connector,
        &stream,
        TopicConfig::default().with_max_len(100),
        Default::default(),
    )
    .unwrap();
    for i in 0..1000 {
        topic.send(Message::new(format!("{i}"))).await.unwrap();
    }
    topic.shutdown().await.unwrap();
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut admin)
        .await
        .unwrap();
    // `MAXLEN ~` trims whole radix-tree nodes (100 entries by default).
    assert!((100..=300).contains(&len), "{len} entries left");
}

async fn consumers(admin: &mut ConnectionManager, stream: &str) -> Vec<String> {
    let info: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg("g")
        .query_async(admin)
        .await
        .unwrap();
    info.consumers.into_iter().map(|c| c.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_forgets_an_idle_consumer_and_keeps_one_holding_entries() {
    let (connector, mut admin) = common::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = unique("forget");
    common::create_stream(&mut admin, &stream).await.unwrap();
    common::create_group(&mut admin, &stream, "g")
        .await
        .unwrap();
    let topic = open_topic(
        &connector,
        &stream,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    let idle = open_subscription(
        &connector,
        &stream,
        "g",
        SubscriptionConfig::default().with_consumer("idle"),
        Default::default(),
    )
    .unwrap();
    topic.send(Message::new("one")).await.unwrap();
    recv(&idle).await.ack();
    idle.shutdown().await.unwrap();
    assert!(!consumers(&mut admin, &stream)
        .await
        .contains(&"idle".to_owned()));

    // A consumer whose read entries are still pending keeps them.
    let holding = Connector::new(&common::server()).unwrap();
    let mut conn = holding.connection().unwrap();
    topic.send(Message::new("two")).await.unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("holder")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let holder = open_subscription(
        &holding,
        &stream,
        "g",
        SubscriptionConfig::default().with_consumer("holder"),
        Default::default(),
    )
    .unwrap();
    holder.shutdown().await.unwrap();
    assert!(consumers(&mut admin, &stream)
        .await
        .contains(&"holder".to_owned()));
    topic.shutdown().await.unwrap();
}
