//! Opening by URL and from an existing connection, routing keys, unroutable
//! messages, and keeping passwords out of errors.

mod common;

use std::time::Duration;

use common::{server_url, Admin};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use pubsub_core::{ErrorKind, Message, Registry};
use pubsub_driver_amqp::{
    lapin, open_subscription, open_topic, Connector, SubscriptionConfig, TopicConfig,
};

fn unique(what: &str) -> String {
    format!("open-{what}-{:08x}", fastrand::u32(..))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_open_topics_and_subscriptions_with_their_parameters() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (x, q) = (unique("x"), unique("q"));
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    std::env::set_var("RABBIT_SERVER_URL", server_url());
    let registry = Registry::with_defaults();
    pubsub_driver_amqp::register(&registry);
    assert!(registry.schemes().contains(&"rabbit".to_owned()));

    let sub = registry
        .open_subscription(&format!("rabbit://{q}?prefetch_count=7&key_name=route"))
        .await
        .unwrap();
    assert_eq!(sub.capabilities().max_receive_batch, 7);
    let topic = registry
        .open_topic(&format!("rabbit://{x}?key_name=route"))
        .await
        .unwrap();
    topic
        .send(Message::new("by url").with_attribute("route", "r1"))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.body().as_ref(), b"by url");
    assert_eq!(m.attributes().get("route").map(String::as_str), Some("r1"));
    m.ack();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();

    for bad in [
        format!("rabbit://{q}?prefetch_count=0"),
        format!("rabbit://{q}?prefetch_count=lots"),
        format!("rabbit://{q}?bogus=1"),
        "rabbit://".to_owned(),
    ] {
        let e = registry.open_subscription(&bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }
    let e = registry.open_topic("rabbit://x?nope=1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_key_comes_from_key_name_and_unroutable_is_not_found() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (x, q) = (unique("direct"), unique("q"));
    admin
        .channel
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    admin
        .channel
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    admin
        .channel
        .queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "eu".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let topic = open_topic(
        &admin.connector,
        &x,
        TopicConfig::default().with_key_name("region"),
        Default::default(),
    )
    .unwrap();
    topic
        .send(Message::new("routed").with_attribute("region", "eu"))
        .await
        .expect("bound routing key is routable");
    let e = topic
        .send(Message::new("lost?").with_attribute("region", "us"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("unroutable"), "{e}");
    // The channel survives an unroutable message.
    topic
        .send(Message::new("routed again").with_attribute("region", "eu"))
        .await
        .unwrap();
    topic.shutdown().await.unwrap();

    // As the Go CDK sends it: the key attribute is the routing key and not
    // also a header, and a subscription with the same key_name gets it back
    // from the routing key.
    let got = admin
        .channel
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the routed message");
    assert_eq!(got.delivery.routing_key.as_str(), "eu");
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(
        !headers.inner().contains_key("region"),
        "the key attribute is not a header: {headers:?}"
    );
    let sub = open_subscription(
        &admin.connector,
        &q,
        SubscriptionConfig::default().with_key_name("region"),
        Default::default(),
    )
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.receive())
        .await
        .expect("the second routed message")
        .unwrap();
    assert_eq!(m.body().as_ref(), b"routed again");
    assert_eq!(m.attributes().get("region").map(String::as_str), Some("eu"));
    m.ack();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_connection_can_be_used() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (x, q) = (unique("x"), unique("q"));
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    let conn = Connection::connect(&server_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let connector = Connector::from_connection(conn, None).unwrap();
    let topic = open_topic(&connector, &x, TopicConfig::default(), Default::default()).unwrap();
    topic.send(Message::new("mine")).await.unwrap();
    topic.shutdown().await.unwrap();
    connector.close().await.unwrap();
    // Without a URL to reconnect to, a closed connection is a clear,
    // permanent error rather than a retry loop.
    let topic = open_topic(&connector, &x, TopicConfig::default(), Default::default()).unwrap();
    let e = topic.send(Message::new("after close")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(!e.is_temporary(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_errors_or_debug() {
    // Nothing listens on port 1: the connection fails.
    let connector = Connector::new("amqp://user:s3cr3t-pw@127.0.0.1:1/%2f").unwrap();
    assert!(!format!("{connector:?}").contains("s3cr3t-pw"));
    let topic = open_topic(&connector, "x", TopicConfig::default(), Default::default()).unwrap();
    assert!(!format!("{topic:?}").contains("s3cr3t-pw"));
    let e = tokio::time::timeout(Duration::from_secs(2), topic.send(Message::new("x"))).await;
    // Sends retry a refused connection; the error is visible to the driver.
    assert!(
        e.is_err(),
        "a refused connection is retried, not failed at once"
    );
    let err = match pubsub_core::driver::Topic::send_batch(
        &pubsub_driver_amqp::AmqpTopic::new(connector.clone(), "x", TopicConfig::default())
            .unwrap(),
        &[pubsub_core::driver::OutgoingMessage::new("x")],
    )
    .await
    {
        Err(pubsub_core::driver::BatchError::All(e)) => e,
        other => panic!("expected a connection error, got {other:?}"),
    };
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.is_temporary());
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    assert!(shown.contains("user:***@127.0.0.1:1"), "{shown}");
}

/// A server that accepts the socket and never answers (as a broker that is
/// starting may) fails the dial as temporary within the time limit, with
/// the password redacted, instead of hanging every call behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_as_temporary() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            sockets.push(s);
        }
    });
    let connector = Connector::new(&format!("amqp://guest:s3cret@127.0.0.1:{port}/%2f")).unwrap();
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(30), connector.channel())
        .await
        .expect("the dial has a time limit")
        .unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(9), "gave up after {waited:?}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_temporary(), "{e}");
    assert!(!format!("{e} {e:?}").contains("s3cret"), "{e:?}");
    held.abort();
}
