//! What the NATS driver does beyond the conformance suite: URLs, creating a
//! consumer, nack delay and delivery counts.

mod common;

use std::time::{Duration, Instant};

use pubsub_core::{ErrorKind, Message, NackBackoff, Registry, Subscription, SubscriptionOptions};
use pubsub_driver_nats::async_nats::jetstream::consumer::pull;
use pubsub_driver_nats::{open_subscription, open_topic, NatsOpener, SubscriptionConfig};

fn unique(what: &str) -> String {
    format!("behaviour-{what}-{:08x}", fastrand::u32(..))
}

async fn recv(sub: &Subscription) -> pubsub_core::Message {
    tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive")
}

#[tokio::test]
async fn urls_open_and_bad_ones_are_invalid_argument() {
    let js = common::jetstream().await.unwrap_or_else(|e| panic!("{e}"));
    let registry = Registry::new();
    registry.register("nats", NatsOpener::with_client(js.client()));
    for good in [
        "nats://orders.created",
        "nats://orders?natsv2",
        "nats://orders?natsv2=true",
    ] {
        let t = registry.open_topic(good).await.unwrap();
        t.shutdown().await.unwrap();
    }
    let s = registry
        .open_subscription("nats://ORDERS?consumer=billing&batch=10")
        .await
        .unwrap();
    assert_eq!(s.capabilities().max_receive_batch, 10);
    s.shutdown().await.unwrap();
    for bad in [
        "nats://orders?natsv2=false",
        "nats://orders?queue=q",
        "nats://a.*",
    ] {
        let e = registry.open_topic(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
    for bad in [
        "nats://ORDERS",
        "nats://ORDERS?consumer=",
        "nats://ORDERS?consumer=c&batch=0",
        "nats://ORDERS?consumer=c&bogus=1",
        "nats://OR.DERS?consumer=c",
    ] {
        let e = registry.open_subscription(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_consumer_is_created_when_asked_and_its_ack_wait_is_the_deadline() {
    let js = common::jetstream().await.unwrap_or_else(|e| panic!("{e}"));
    let name = unique("create");
    common::create_stream(&js, &name).await.unwrap();
    let config = SubscriptionConfig::default().with_create(pull::Config {
        ack_wait: Duration::from_secs(7),
        ..Default::default()
    });
    let sub = open_subscription(&js, &name, "made", config, Default::default())
        .await
        .unwrap();
    assert_eq!(
        sub.capabilities().ack_deadline,
        Some(Duration::from_secs(7))
    );
    // The consumer appears on the first receive; it delivers from the start
    // of the stream (the configuration's default policy), so a message sent
    // before it is there arrives.
    let topic = open_topic(&js, &name, Default::default()).unwrap();
    topic.send(Message::new("made")).await.unwrap();
    let m = recv(&sub).await;
    assert_eq!(m.body().as_ref(), b"made");
    m.ack();
    let info = js
        .get_stream(&name)
        .await
        .unwrap()
        .consumer_info("made")
        .await
        .unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));

    // Without the option, a missing consumer is NotFound on receive.
    let missing = open_subscription(
        &js,
        &name,
        "absent",
        SubscriptionConfig::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let e = missing.receive().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
    let _ = js.delete_stream(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_delay_holds_redelivery_back_and_attempts_are_counted() {
    let js = common::jetstream().await.unwrap_or_else(|e| panic!("{e}"));
    let name = unique("nakdelay");
    common::create_stream(&js, &name).await.unwrap();
    common::create_consumer(&js, &name, "c", Duration::from_secs(30))
        .await
        .unwrap();
    let config = SubscriptionConfig::default().with_nack_delay(Duration::from_secs(1));
    // The configured delay is for nacks the core's backoff gives none.
    let options = SubscriptionOptions::default().with_nack_backoff(NackBackoff::none());
    let sub = open_subscription(&js, &name, "c", config, options)
        .await
        .unwrap();
    let topic = open_topic(&js, &name, Default::default()).unwrap();
    topic.send(Message::new("again")).await.unwrap();
    let first = recv(&sub).await;
    assert_eq!(first.delivery_attempt(), Some(1));
    let nacked = Instant::now();
    first.nack();
    let second = recv(&sub).await;
    assert!(
        nacked.elapsed() >= Duration::from_millis(900),
        "redelivered after {:?}, before the 1 s delay",
        nacked.elapsed()
    );
    assert_eq!(second.delivery_attempt(), Some(2));
    second.ack();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
    let _ = js.delete_stream(&name).await;
}
