//! What the SNS and SQS driver does beyond the conformance suite: URLs
//! through the registry, limits checked before any I/O with nothing else
//! lost, requests split to AWS's limits, FIFO order under concurrent sends,
//! nacklazy, the visibility timeout read at open, delivery attempts.

mod common;

use std::time::Duration;

use pubsub_core::{ErrorKind, Message, Registry, SubscriptionOptions, TopicOptions};
use pubsub_driver_aws::{
    open_sqs_topic, open_subscription, AwsOpener, SubscriptionConfig, TopicConfig,
};

async fn backend() -> common::Backend {
    common::Backend::connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn name(what: &str) -> String {
    format!("beh-{what}-{:08x}", fastrand::u32(..))
}

async fn recv(sub: &pubsub_core::Subscription) -> pubsub_core::Message {
    tokio::time::timeout(Duration::from_secs(30), sub.receive())
        .await
        .expect("a message arrives")
        .expect("receive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_cdk_urls_open_through_the_registry() {
    let b = backend().await;
    let topic = name("url");
    let arn = b.create_topic(&topic).await.unwrap();
    let queue = b
        .create_queue(&format!("{topic}-q"), Duration::from_secs(30))
        .await
        .unwrap();
    b.subscribe(&arn, &queue, false).await.unwrap();
    let registry = Registry::new();
    registry.register("awssns", AwsOpener::with_clients(b.clients.clone()));
    registry.register("awssqs", AwsOpener::with_clients(b.clients.clone()));

    let t = registry
        .open_topic(&format!("awssns:///{arn}"))
        .await
        .unwrap();
    let host_path = queue.split_once("://").unwrap().1;
    let s = registry
        .open_subscription(&format!(
            "awssqs://{host_path}?snstopicarn={arn}&waittime=1s"
        ))
        .await
        .unwrap();
    t.send(Message::new("via urls").with_attribute("k", "v"))
        .await
        .unwrap();
    let m = recv(&s).await;
    assert_eq!(m.body().as_ref(), b"via urls");
    assert_eq!(m.attribute("k"), Some("v"));
    m.ack();

    // Sending straight to the queue through an awssqs:// topic.
    let t2 = registry
        .open_topic(&format!("awssqs://{host_path}"))
        .await
        .unwrap();
    t2.send(Message::new("direct")).await.unwrap();
    let m = recv(&s).await;
    assert_eq!(m.body().as_ref(), b"direct");
    m.ack();
    for t in [t, t2] {
        t.shutdown().await.unwrap();
    }
    s.shutdown().await.unwrap();

    // Clients the application built take no AWS parameters.
    let e = registry
        .open_subscription(&format!("awssqs://{host_path}?region=eu-west-1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = registry
        .open_topic("awssns:///not-an-arn")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_refused_before_io_and_nothing_else_is_lost() {
    let b = backend().await;
    let queue = b
        .create_queue(&name("limits"), Duration::from_secs(30))
        .await
        .unwrap();
    let t = open_sqs_topic(
        b.clients.sqs.clone(),
        &queue,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    let ten: Vec<(String, String)> = (0..10).map(|i| (format!("k{i}"), "v".into())).collect();
    let eleven: Vec<(String, String)> = (0..11).map(|i| (format!("k{i}"), "v".into())).collect();
    let bad = vec![
        // Eleven attributes.
        Message::new("x").with_attributes(eleven),
        // Ten, and the base64 marker a binary body needs.
        Message::new(vec![0xffu8, 0xfe]).with_attributes(ten.clone()),
        // Under the limit as sent, over it once base64-encoded.
        Message::new(vec![0xffu8; 200 * 1024]),
        // A key AWS takes only unescaped up to 256 bytes.
        Message::new("x").with_attribute("/".repeat(40), "v"),
    ];
    let good: Vec<Message> = (0..5)
        .map(|i| Message::new(format!("good {i}")).with_attributes(ten.clone()))
        .collect();
    // All at once, so the bad ones share batches with the good.
    let sends = bad
        .into_iter()
        .map(|m| (false, m))
        .chain(good.into_iter().map(|m| (true, m)))
        .map(|(ok, m)| {
            let t = t.clone();
            async move { (ok, t.send(m).await) }
        });
    for (ok, r) in futures_util::future::join_all(sends).await {
        if ok {
            r.expect("a good message is sent");
        } else {
            let e = r.expect_err("a bad message is refused");
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        }
    }
    t.shutdown().await.unwrap();
    let s = open_subscription(
        b.clients.sqs.clone(),
        &queue,
        SubscriptionConfig::default().with_raw(true),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = recv(&s).await;
        got.push(String::from_utf8(m.body().to_vec()).unwrap());
        assert_eq!(m.attributes().len(), 10);
        m.ack();
    }
    got.sort();
    assert_eq!(got, (0..5).map(|i| format!("good {i}")).collect::<Vec<_>>());
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_a_request_are_split_to_awss_limits() {
    let b = backend().await;
    let queue = b
        .create_queue(&name("split"), Duration::from_secs(30))
        .await
        .unwrap();
    let t = open_sqs_topic(
        b.clients.sqs.clone(),
        &queue,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    // Ten of 100 KiB: one batch for the core, four requests for SQS.
    let sends = (0..10).map(|i| {
        let t = t.clone();
        async move {
            let body = format!("{i:02}{}", "x".repeat(100 * 1024));
            t.send(Message::new(body)).await
        }
    });
    for r in futures_util::future::join_all(sends).await {
        r.expect("send");
    }
    t.shutdown().await.unwrap();
    let s = open_subscription(
        b.clients.sqs.clone(),
        &queue,
        SubscriptionConfig::default().with_raw(true),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let m = recv(&s).await;
        assert_eq!(m.body().len(), 2 + 100 * 1024);
        seen.push(m.body()[..2].to_vec());
        m.ack();
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_order_per_key_holds_for_sends_not_awaited_one_by_one() {
    let b = backend().await;
    let queue = b
        .create_queue(&format!("{}.fifo", name("fifo")), Duration::from_secs(30))
        .await
        .unwrap();
    let t = open_sqs_topic(
        b.clients.sqs.clone(),
        &queue,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    let e = t.send(Message::new("no group")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // Queued in order, all in flight together: the core may batch them as
    // it likes, and the order per key must hold.
    let n = 60;
    let sends = (0..n).map(|i| {
        let t = t.clone();
        async move {
            let key = if i % 2 == 0 { "even" } else { "odd" };
            t.send(Message::new(i.to_string()).with_ordering_key(key))
                .await
        }
    });
    for r in futures_util::future::join_all(sends).await {
        r.expect("send");
    }
    t.shutdown().await.unwrap();
    let s = open_subscription(
        b.clients.sqs.clone(),
        &queue,
        SubscriptionConfig::default().with_raw(true),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let (mut even, mut odd) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let m = recv(&s).await;
        let i: usize = std::str::from_utf8(m.body()).unwrap().parse().unwrap();
        match m.ordering_key() {
            Some("even") => even.push(i),
            Some("odd") => odd.push(i),
            other => panic!("unexpected key {other:?}"),
        }
        m.ack();
    }
    assert_eq!(even, (0..n).step_by(2).collect::<Vec<_>>());
    assert_eq!(odd, (1..n).step_by(2).collect::<Vec<_>>());
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_read_at_open_nacklazy_and_delivery_attempts() {
    let b = backend().await;
    let queue = b
        .create_queue(&name("lazy"), Duration::from_secs(2))
        .await
        .unwrap();
    let t = open_sqs_topic(
        b.clients.sqs.clone(),
        &queue,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    t.send(Message::new("again")).await.unwrap();
    t.shutdown().await.unwrap();
    let s = open_subscription(
        b.clients.sqs.clone(),
        &queue,
        SubscriptionConfig::default()
            .with_raw(true)
            .with_nack_lazy(true),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(s.capabilities().ack_deadline, Some(Duration::from_secs(2)));
    let m = recv(&s).await;
    assert_eq!(m.delivery_attempt(), Some(1));
    let first = std::time::Instant::now();
    m.nack();
    let m = recv(&s).await;
    assert!(
        first.elapsed() >= Duration::from_millis(1500),
        "a lazy nack waits for the visibility timeout, not {:?}",
        first.elapsed()
    );
    assert_eq!(m.delivery_attempt(), Some(2));
    m.ack();
    s.shutdown().await.unwrap();
}
