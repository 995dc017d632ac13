//! The conformance cases, each a plain async function over a [`Harness`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pubsub_core::driver::{self, AckId, BatchError, OutgoingMessage};
use pubsub_core::{
    BatchOptions, ErrorKind, Message, NackBackoff, Subscription, SubscriptionOptions, Topic,
    TopicOptions,
};

use crate::Harness;

/// How long one case may run before it counts as hung.
pub const CASE_TIME_LIMIT: Duration = Duration::from_secs(120);

/// The ack deadline of subscriptions in cases that do not test deadlines:
/// long enough that nothing is redelivered by accident.
const LONG_DEADLINE: Duration = Duration::from_secs(60);
/// The ack deadline of subscriptions in cases that wait for redelivery,
/// unless the backend's shortest is longer.
pub const SHORT_DEADLINE: Duration = Duration::from_secs(2);
/// How long to wait for a message that should arrive.
const ARRIVAL: Duration = Duration::from_secs(30);

/// A unique resource name for one case.
pub fn unique(case: &str) -> String {
    format!("conf-{case}-{:08x}", fastrand::u32(..))
}

/// A topic and a subscription to it, freshly created on the backend.
#[derive(Debug)]
pub struct Fixture {
    /// The topic's name.
    pub topic_name: String,
    /// The subscription's name.
    pub sub_name: String,
    /// The topic, with the options the case asked for.
    pub topic: Topic,
    /// The subscription, with the options the case asked for.
    pub sub: Subscription,
}

/// Creates a topic and one subscription and opens both.
pub async fn fixture<H: Harness>(
    h: &H,
    case: &str,
    ack_deadline: Duration,
    topic_opts: TopicOptions,
    sub_opts: SubscriptionOptions,
) -> Fixture {
    let topic_name = unique(case);
    let sub_name = format!("{topic_name}-sub");
    h.create_topic(&topic_name).await.expect("create topic");
    h.create_subscription(&topic_name, &sub_name, ack_deadline)
        .await
        .expect("create subscription");
    let topic = Topic::with_options(
        h.open_topic(&topic_name).await.expect("open topic"),
        topic_opts,
    );
    let sub = Subscription::with_options(
        h.open_subscription(&sub_name)
            .await
            .expect("open subscription"),
        sub_opts,
    );
    Fixture {
        topic_name,
        sub_name,
        topic,
        sub,
    }
}

async fn simple<H: Harness>(h: &H, case: &str) -> Fixture {
    fixture(
        h,
        case,
        LONG_DEADLINE,
        TopicOptions::default(),
        SubscriptionOptions::default(),
    )
    .await
}

/// Receives one message or panics after `within`.
pub async fn recv(sub: &Subscription, within: Duration) -> Message {
    match tokio::time::timeout(within, sub.receive()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => panic!("receive failed: {e}"),
        Err(_) => panic!("no message arrived within {within:?}"),
    }
}

/// Asserts that no message arrives within `within`, and then that the
/// subscription still delivers: a sentinel sent afterwards is the next
/// message. Without the sentinel a dead subscription would pass, and a
/// short wait alone proves little.
async fn expect_only_sentinel(topic: &Topic, sub: &Subscription, within: Duration) {
    if !within.is_zero() {
        expect_nothing(sub, within).await;
    }
    let sentinel = format!("sentinel-{:08x}", fastrand::u32(..));
    topic
        .send(Message::new(sentinel.clone()))
        .await
        .expect("send the sentinel");
    let m = recv(sub, ARRIVAL).await;
    assert_eq!(
        m.body().as_ref(),
        sentinel.as_bytes(),
        "a message arrived where none should have"
    );
    m.ack();
}

/// Asserts no message arrives within `within`; nacks nothing.
async fn expect_nothing(sub: &Subscription, within: Duration) {
    if let Ok(r) = tokio::time::timeout(within, sub.receive()).await {
        match r {
            Ok(m) => panic!("unexpected message {m:?} body {:?}", m.body()),
            Err(e) => panic!("receive failed: {e}"),
        }
    }
}

async fn finish(f: Fixture) {
    f.topic.shutdown().await.expect("topic shutdown");
    f.sub.shutdown().await.expect("subscription shutdown");
}

async fn round_trip(h: &impl Harness, case: &str, msg: Message) -> Message {
    let f = simple(h, case).await;
    f.topic.send(msg).await.expect("send");
    let got = recv(&f.sub, ARRIVAL).await;
    let copy = got.clone();
    got.ack();
    finish(f).await;
    copy
}

/// A message sent is received with the same body and attributes.
pub async fn send_receive(h: &impl Harness) {
    let f = simple(h, "send-receive").await;
    let mut want = HashSet::new();
    for i in 0..20 {
        let body = format!("message {i} {}", fastrand::u64(..));
        want.insert(body.clone());
        f.topic
            .send(Message::new(body).with_attribute("index", i.to_string()))
            .await
            .expect("send");
    }
    while !want.is_empty() {
        let m = recv(&f.sub, ARRIVAL).await;
        let body = String::from_utf8(m.body().to_vec()).expect("utf-8 body");
        assert!(want.remove(&body), "unexpected or duplicate body {body:?}");
        assert!(body.starts_with(&format!("message {} ", m.attribute("index").unwrap())));
        assert!(
            m.id().is_some_and(|id| !id.is_empty()),
            "received messages have an id"
        );
        m.ack();
    }
    finish(f).await;
}

/// A JSON body arrives byte for byte.
pub async fn json_body_unchanged(h: &impl Harness) {
    let body =
        r#"{"id":42,"name":"Zoë \"the\" tester","tags":["a","b"],"nested":{"x":null,"y":1.5e10}}"#;
    let got = round_trip(h, "json", Message::new(body)).await;
    assert_eq!(got.body().as_ref(), body.as_bytes());
}

/// A body that is not UTF-8 arrives byte for byte.
pub async fn non_utf8_body_byte_for_byte(h: &impl Harness) {
    let body: Vec<u8> = (0..=255u8)
        .rev()
        .chain([0xff, 0xfe, 0x00, 0xc3, 0x28])
        .collect();
    let got = round_trip(h, "binary", Message::new(body.clone())).await;
    assert_eq!(got.body().as_ref(), &body[..]);
}

/// An empty body with attributes arrives as such; a backend that needs a
/// body refuses it before any I/O (see
/// [`pubsub_core::Capabilities::empty_body`]).
pub async fn empty_body_with_attributes(h: &impl Harness) {
    if !h.capabilities().empty_body {
        let f = simple(h, "empty-body").await;
        let e = f
            .topic
            .send(Message::new(Vec::new()).with_attribute("only", "attributes"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        f.topic.send(Message::new("after")).await.expect("send");
        let m = recv(&f.sub, ARRIVAL).await;
        assert_eq!(
            m.body().as_ref(),
            b"after",
            "the refused message was not sent"
        );
        m.ack();
        expect_only_sentinel(&f.topic, &f.sub, Duration::ZERO).await;
        finish(f).await;
        return;
    }
    let got = round_trip(
        h,
        "empty-body",
        Message::new(Vec::new()).with_attribute("only", "attributes"),
    )
    .await;
    assert!(got.body().is_empty());
    assert_eq!(got.attribute("only"), Some("attributes"));
}

/// Attributes with awkward keys and values round-trip unchanged.
pub async fn awkward_attributes_round_trip(h: &impl Harness) {
    let printable: String = (0x20u8..0x7f).map(char::from).collect();
    let mut attrs = BTreeMap::new();
    for (k, v) in [
        ("a/b/c", "slash/value"),
        ("dotted.key.name", "v.1.2"),
        ("quote\"s'", "\"quoted\" 'value'"),
        ("with space", "value with spaces"),
        ("1leading-digit", "0"),
        ("ünïcödé-ключ", "値🎉"),
        ("colon:and=equals", "a=b;c:d"),
        ("__double_underscore__", "x"),
        ("UPPER_lower", "MiXeD"),
        ("empty-value", ""),
    ] {
        attrs.insert(k.to_owned(), v.to_owned());
    }
    attrs.insert("printable".to_owned(), printable.clone());
    // Every printable character in keys too, in keys short enough for
    // backends that escape most of them (SQS's names grow eightfold).
    for (i, part) in printable
        .replace(' ', "_")
        .as_bytes()
        .chunks(16)
        .enumerate()
    {
        attrs.insert(
            String::from_utf8(part.to_vec()).expect("ASCII"),
            format!("printable key part {i}"),
        );
    }
    if !h.capabilities().empty_attribute_values {
        // Refused before any I/O; the rest must still round-trip.
        let f = simple(h, "empty-value").await;
        let e = f
            .topic
            .send(Message::new("x").with_attribute("empty-value", ""))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        finish(f).await;
        attrs.remove("empty-value");
    }
    // In messages of as many attributes as the backend takes.
    let per_message = h.capabilities().max_attributes.unwrap_or(attrs.len());
    let all: Vec<(String, String)> = attrs.into_iter().collect();
    for chunk in all.chunks(per_message.max(1)) {
        let got = round_trip(
            h,
            "attributes",
            Message::new("attrs").with_attributes(chunk.iter().cloned()),
        )
        .await;
        for (k, v) in chunk {
            assert_eq!(got.attribute(k), Some(v.as_str()), "attribute {k:?}");
        }
        assert_eq!(got.attributes().len(), chunk.len());
    }
}

/// Attributes that cannot be carried are refused before any I/O.
pub async fn invalid_attributes_rejected(h: &impl Harness) {
    let f = simple(h, "invalid-attributes").await;
    let e = Message::new("x")
        .try_with_attribute_bytes(b"\xff\xfekey", b"v")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = Message::new("x")
        .try_with_attribute_bytes(b"key", b"\xc3\x28")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = f
        .topic
        .send(Message::new("x").with_attribute("", "empty key"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // Nothing was sent by the refused calls.
    f.topic.send(Message::new("valid")).await.expect("send");
    let m = recv(&f.sub, ARRIVAL).await;
    assert_eq!(m.body().as_ref(), b"valid");
    m.ack();
    expect_only_sentinel(&f.topic, &f.sub, Duration::ZERO).await;
    finish(f).await;
}

/// Wraps a real driver topic to record the size of each batch it is given.
#[derive(Debug)]
struct RecordingTopic {
    inner: Arc<dyn driver::Topic>,
    sizes: Mutex<Vec<usize>>,
}

#[async_trait]
impl driver::Topic for RecordingTopic {
    fn driver_name(&self) -> &'static str {
        self.inner.driver_name()
    }
    fn resource(&self) -> &str {
        self.inner.resource()
    }
    fn capabilities(&self) -> pubsub_core::Capabilities {
        self.inner.capabilities()
    }
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        self.sizes.lock().unwrap().push(batch.len());
        self.inner.send_batch(batch).await
    }
    async fn close(&self) -> pubsub_core::Result<()> {
        self.inner.close().await
    }
}

/// Sends form batches within the minimum and maximum size, and shutdown
/// flushes a final short batch.
pub async fn batching_respects_min_and_max(h: &impl Harness) {
    let topic_name = unique("batching");
    let sub_name = format!("{topic_name}-sub");
    h.create_topic(&topic_name).await.expect("create topic");
    h.create_subscription(&topic_name, &sub_name, LONG_DEADLINE)
        .await
        .expect("create subscription");
    let rec = Arc::new(RecordingTopic {
        inner: h.open_topic(&topic_name).await.expect("open topic"),
        sizes: Mutex::new(Vec::new()),
    });
    let caps = h.capabilities();
    let (min, max) = (2usize, 3usize.min(caps.send_batching.max_batch_size).max(2));
    let topic = Topic::with_options(
        rec.clone(),
        TopicOptions::default().with_batching(
            BatchOptions::default()
                .with_min_batch_size(min)
                .with_max_batch_size(max)
                .with_max_handlers(1),
        ),
    );
    let sub = open_sub(h.open_subscription(&sub_name).await.expect("open sub"));
    let n = 3 * max + 1;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..n {
        let t = topic.clone();
        sends.spawn(async move { t.send(Message::new(format!("b{i}"))).await });
    }
    // All but one can leave in batches of at least `min`; the straggler
    // waits for company until shutdown flushes it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    topic.shutdown().await.expect("shutdown flushes");
    while let Some(r) = sends.join_next().await {
        r.expect("join").expect("send");
    }
    let sizes = rec.sizes.lock().unwrap().clone();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        n,
        "every message sent once: {sizes:?}"
    );
    assert!(
        sizes.iter().all(|&s| s <= max),
        "max batch size {max}: {sizes:?}"
    );
    let below_min = sizes.iter().filter(|&&s| s < min).count();
    assert!(
        below_min <= 1,
        "only the flushed batch may be short: {sizes:?}"
    );
    let mut seen = HashSet::new();
    while seen.len() < n {
        let m = recv(&sub, ARRIVAL).await;
        seen.insert(m.body().clone());
        m.ack();
    }
    sub.shutdown().await.expect("sub shutdown");
}

fn open_sub(d: Arc<dyn driver::Subscription>) -> Subscription {
    Subscription::with_options(d, SubscriptionOptions::default())
}

async fn driver_receive_one(d: &dyn driver::Subscription) -> driver::ReceivedMessage {
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    loop {
        let mut got = d.receive_batch(1).await.expect("receive_batch");
        if let Some(m) = got.pop() {
            assert!(got.is_empty(), "receive_batch(1) returned more than one");
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "no message arrived");
    }
}

/// Acking one delivery twice at the driver level is harmless.
pub async fn driver_double_ack_is_harmless(h: &impl Harness) {
    let f = simple(h, "double-ack").await;
    f.topic.send(Message::new("once")).await.expect("send");
    let d = h.open_subscription(&f.sub_name).await.expect("open");
    let m = driver_receive_one(&*d).await;
    let ids: Vec<AckId> = vec![m.ack_id.clone()];
    d.send_acks(&ids).await.expect("first ack");
    d.send_acks(&ids).await.expect("second ack is harmless");
    d.close().await.expect("close");
    finish(f).await;
}

/// Nacks a delivery at the driver level, handing it back as delivered.
async fn driver_nack(d: &dyn driver::Subscription, m: &driver::ReceivedMessage, what: &str) {
    d.send_nacks(&[driver::Nacked::from_received(m)])
        .await
        .expect(what);
}

/// Nacking one delivery twice at the driver level is harmless.
pub async fn driver_double_nack_is_harmless(h: &impl Harness) {
    let f = simple(h, "double-nack").await;
    f.topic.send(Message::new("once")).await.expect("send");
    let d = h.open_subscription(&f.sub_name).await.expect("open");
    let m = driver_receive_one(&*d).await;
    let ids: Vec<AckId> = vec![m.ack_id.clone()];
    driver_nack(&*d, &m, "first nack").await;
    driver_nack(&*d, &m, "second nack is harmless").await;
    let again = driver_receive_one(&*d).await;
    assert_eq!(again.body, m.body);
    d.send_acks(std::slice::from_ref(&again.ack_id))
        .await
        .expect("ack");
    d.send_acks(&ids)
        .await
        .expect("acking the nacked delivery is harmless");
    d.close().await.expect("close");
    finish(f).await;
}

/// After shutdown every call on every clone fails with FailedPrecondition.
pub async fn send_and_receive_after_shutdown_fail(h: &impl Harness) {
    let f = simple(h, "closed").await;
    let topic2 = f.topic.clone();
    let sub2 = f.sub.clone();
    f.topic.shutdown().await.expect("first topic shutdown");
    f.sub.shutdown().await.expect("first subscription shutdown");
    for t in [&f.topic, &topic2] {
        let e = t.send(Message::new("late")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        let e = t.shutdown().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    }
    for s in [&f.sub, &sub2] {
        let e = s.receive().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        let e = s.shutdown().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    }
}

/// A send whose future is dropped before its batch leaves is withdrawn.
pub async fn cancelled_send_is_withdrawn(h: &impl Harness) {
    let f = fixture(
        h,
        "cancel-send",
        LONG_DEADLINE,
        TopicOptions::default().with_batching(
            BatchOptions::default()
                .with_min_batch_size(2)
                .with_max_handlers(1),
        ),
        SubscriptionOptions::default(),
    )
    .await;
    // Alone, it waits for a second message; we give up on it first.
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        f.topic.send(Message::new("withdrawn")),
    )
    .await;
    assert!(
        r.is_err(),
        "a lone message below the minimum batch size waits"
    );
    assert_eq!(
        send_two_and_receive_two(&f, "kept").await,
        HashSet::from(["kept-1".to_owned(), "kept-2".to_owned()])
    );
    // The withdrawn message never went: the next two to arrive are two
    // sent after it (two, since one alone would wait for company).
    assert_eq!(
        send_two_and_receive_two(&f, "after").await,
        HashSet::from(["after-1".to_owned(), "after-2".to_owned()]),
        "the withdrawn message arrived"
    );
    finish(f).await;
}

/// Sends `NAME-1` and `NAME-2` together and gives the bodies of the next
/// two messages received.
async fn send_two_and_receive_two(f: &Fixture, name: &str) -> HashSet<String> {
    let (a, b) = tokio::join!(
        f.topic.send(Message::new(format!("{name}-1"))),
        f.topic.send(Message::new(format!("{name}-2")))
    );
    a.expect("send");
    b.expect("send");
    let mut got = HashSet::new();
    for _ in 0..2 {
        let m = recv(&f.sub, ARRIVAL).await;
        got.insert(String::from_utf8(m.body().to_vec()).unwrap());
        m.ack();
    }
    got
}

/// A receive cancelled while waiting takes nothing with it.
pub async fn cancelled_receive_loses_nothing(h: &impl Harness) {
    let f = simple(h, "cancel-receive").await;
    let r = tokio::time::timeout(Duration::from_millis(300), f.sub.receive()).await;
    assert!(r.is_err(), "nothing to receive yet");
    f.topic.send(Message::new("after")).await.expect("send");
    let m = recv(&f.sub, ARRIVAL).await;
    assert_eq!(m.body().as_ref(), b"after");
    m.ack();
    // On a busy subscription, receives polled once and dropped while they
    // wait (for a fetch under way, for the queue) take nothing with them.
    let n = 50;
    let sender = trickle(&f.topic, "busy", n, (5, 4), Duration::from_millis(2));
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    let mut cancelled = 0;
    while seen.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {} of {n} with receives cancelled",
            seen.len()
        );
        // A zero timeout polls the receive once, then drops it if pending.
        match tokio::time::timeout(Duration::ZERO, f.sub.receive()).await {
            Ok(r) => {
                let m = r.expect("receive");
                seen.insert(m.body().clone());
                m.ack();
            }
            Err(_) => {
                cancelled += 1;
                tokio::task::yield_now().await;
            }
        }
    }
    sender.await.expect("sender");
    assert!(
        cancelled > 0,
        "no receive was cancelled: {:?}",
        f.sub.stats()
    );
    assert_nothing_dropped(&f.sub);
    finish(f).await;
}

/// Sends `PREFIXi` for i in `0..n` from a task of its own, pausing after
/// each send whose `i % every` is `at`.
fn trickle(
    topic: &Topic,
    prefix: &'static str,
    n: usize,
    (every, at): (usize, usize),
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let topic = topic.clone();
    tokio::spawn(async move {
        for i in 0..n {
            topic
                .send(Message::new(format!("{prefix}{i}")))
                .await
                .expect("send");
            if i % every == at {
                tokio::time::sleep(pause).await;
            }
        }
    })
}

/// Asserts that no message was handed out and then dropped or nacked: what
/// a receive that is not cancel-safe shows (the drop rule nacks what it
/// took, so it comes again and a count of arrivals alone cannot tell).
fn assert_nothing_dropped(sub: &Subscription) {
    let stats = sub.stats();
    assert_eq!(
        (stats.dropped_unsettled, stats.nacked),
        (0, 0),
        "a cancelled receive dropped messages it had taken: {stats:?}"
    );
}

/// Receive futures dropped at random moments while messages flow lose
/// none of them.
pub async fn dropped_receive_futures_lose_nothing(h: &impl Harness) {
    let f = simple(h, "drop-receive").await;
    let n = 200;
    let sender = trickle(&f.topic, "", n, (20, 0), Duration::from_millis(5));
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + ARRIVAL * 2;
    while seen.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lost messages: got {} of {n}",
            seen.len()
        );
        let wait = Duration::from_micros(fastrand::u64(0..3000));
        if let Ok(r) = tokio::time::timeout(wait, f.sub.receive()).await {
            let m = r.expect("receive");
            seen.insert(m.body().clone());
            m.ack();
        }
    }
    sender.await.expect("sender");
    assert_nothing_dropped(&f.sub);
    finish(f).await;
}

/// Sending to a topic that does not exist fails with NotFound.
pub async fn nonexistent_topic_is_not_found(h: &impl Harness) {
    let t = Topic::with_options(
        h.open_topic(&unique("missing-topic"))
            .await
            .expect("opening is lazy"),
        TopicOptions::default(),
    );
    let e = t.send(Message::new("nowhere")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let _ = t.shutdown().await;
}

/// Receiving from a subscription that does not exist fails with NotFound.
pub async fn nonexistent_subscription_is_not_found(h: &impl Harness) {
    let s = open_sub(
        h.open_subscription(&unique("missing-sub"))
            .await
            .expect("opening is lazy"),
    );
    let e = tokio::time::timeout(ARRIVAL, s.receive())
        .await
        .expect("fails promptly")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let _ = s.shutdown().await;
}

/// Shutdown sends what is queued before it returns.
pub async fn shutdown_flushes_sends(h: &impl Harness) {
    let f = fixture(
        h,
        "flush-sends",
        LONG_DEADLINE,
        TopicOptions::default().with_batching(BatchOptions::default().with_min_batch_size(1000)),
        SubscriptionOptions::default(),
    )
    .await;
    let n = 10;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..n {
        let t = f.topic.clone();
        sends.spawn(async move { t.send(Message::new(format!("f{i}"))).await });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.topic.shutdown().await.expect("shutdown");
    while let Some(r) = sends.join_next().await {
        r.expect("join").expect("queued sends succeed on shutdown");
    }
    let mut seen = HashSet::new();
    while seen.len() < n {
        let m = recv(&f.sub, ARRIVAL).await;
        seen.insert(m.body().clone());
        m.ack();
    }
    f.sub.shutdown().await.expect("sub shutdown");
}

/// Shutdown sends pending acks: a new handle on the same subscription gets
/// none of the acked messages again, even after the ack deadline.
pub async fn shutdown_flushes_acks(h: &impl Harness) {
    let f = fixture(
        h,
        "flush-acks",
        h.short_ack_deadline(),
        TopicOptions::default(),
        SubscriptionOptions::default()
            .with_ack_batching(BatchOptions::default().with_min_batch_size(1000)),
    )
    .await;
    let n = 10;
    for i in 0..n {
        f.topic
            .send(Message::new(format!("a{i}")))
            .await
            .expect("send");
    }
    for _ in 0..n {
        recv(&f.sub, ARRIVAL).await.ack();
    }
    f.sub.shutdown().await.expect("shutdown flushes acks");
    let again = open_sub(h.open_subscription(&f.sub_name).await.expect("reopen"));
    expect_only_sentinel(&f.topic, &again, h.short_ack_deadline() * 2).await;
    again.shutdown().await.expect("shutdown");
    f.topic.shutdown().await.expect("topic shutdown");
}

/// `Message::extend_lease` works where the backend can extend leases and
/// fails with Unimplemented where it cannot.
pub async fn extend_lease_matches_capability(h: &impl Harness) {
    let f = simple(h, "extend-capability").await;
    f.topic.send(Message::new("lease")).await.expect("send");
    let m = recv(&f.sub, ARRIVAL).await;
    let r = m.extend_lease(Duration::from_secs(30)).await;
    if h.capabilities().lease_extension {
        r.expect("extend lease");
    } else {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Unimplemented);
    }
    m.ack();
    finish(f).await;
}

/// Topic, subscription, message and error give typed access to the
/// backend's own values, and a before-send hook sees its record.
pub async fn escape_hatches(h: &impl Harness) {
    let f = simple(h, "escape").await;
    h.check_raw_topic(&f.topic).expect("Topic::as_raw");
    h.check_raw_subscription(&f.sub)
        .expect("Subscription::as_raw");
    let seen = Arc::new(AtomicUsize::new(0));
    let hook_seen = seen.clone();
    let is_record = h.before_send_record_check();
    f.topic
        .send(Message::new("raw").with_before_send(move |record| {
            if is_record(record) {
                hook_seen.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }))
        .await
        .expect("send");
    assert!(
        seen.load(Ordering::SeqCst) >= 1,
        "the before-send hook ran and saw the driver's documented record type"
    );
    let m = recv(&f.sub, ARRIVAL).await;
    h.check_raw_message(&m).expect("Message::as_raw");
    m.ack();
    let missing = Topic::with_options(
        h.open_topic(&unique("escape-missing")).await.expect("open"),
        TopicOptions::default(),
    );
    let e = missing.send(Message::new("x")).await.unwrap_err();
    h.check_raw_error(&e).expect("Error::source_as");
    let _ = missing.shutdown().await;
    finish(f).await;
}

/// Every accepted message's after-send hook runs with the driver's record
/// and an id, and that id is the one its receiver sees, so a sender's log
/// and a receiver's can be matched.
pub async fn sent_ids_are_the_ids_receivers_see(h: &impl Harness) {
    let f = simple(h, "sent-ids").await;
    let n = 20;
    let is_record = h.after_send_record_check();
    let sent: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let records = Arc::new(AtomicUsize::new(0));
    // Sent at once, so that drivers' batch paths run as well as lone sends.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (topic, sent, records) = (f.topic.clone(), sent.clone(), records.clone());
        let body = format!("sent-id-{i}");
        let key = body.clone();
        let message = Message::new(body).with_after_send(move |s| {
            if is_record(s) {
                records.fetch_add(1, Ordering::SeqCst);
            }
            let id = s.id().unwrap_or_default().to_owned();
            sent.lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .push(id);
            Ok(())
        });
        tasks.spawn(async move { topic.send(message).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("send task").expect("send");
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    assert_eq!(sent.len(), n, "an after-send hook ran for every message");
    assert_eq!(
        records.load(Ordering::SeqCst),
        sent.values().map(Vec::len).sum::<usize>(),
        "every after-send hook saw the driver's documented record type"
    );
    let ids: HashSet<&str> = sent.values().flatten().map(String::as_str).collect();
    assert!(!ids.contains(""), "every sent message has an id: {sent:?}");
    assert!(ids.len() >= n, "sent ids are distinct: {sent:?}");
    let mut seen = HashSet::new();
    while seen.len() < n {
        let m = recv(&f.sub, ARRIVAL).await;
        let body = String::from_utf8_lossy(m.body()).into_owned();
        let got = m.id().unwrap_or_default().to_owned();
        m.ack();
        let Some(ids) = sent.get(&body) else {
            panic!("received {body:?}, which this case did not send");
        };
        if h.sent_id_is_received_id() {
            assert!(
                ids.contains(&got),
                "{body:?} was sent as {ids:?} but received as {got:?}"
            );
        }
        seen.insert(body);
    }
    finish(f).await;
}

/// Ten senders of a thousand messages each and ten receivers: every message
/// arrives at least once; duplicates are counted and reported.
pub async fn concurrent_senders_and_receivers(h: &impl Harness) {
    let f = simple(h, "concurrent").await;
    let (senders, receivers) = (10, 10);
    let per_sender = h.concurrent_messages() / senders;
    let total = senders * per_sender;
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..senders {
        let t = f.topic.clone();
        tasks.spawn(async move {
            for i in 0..per_sender {
                t.send(Message::new(format!("{s}-{i}")))
                    .await
                    .expect("send");
            }
        });
    }
    let seen = Arc::new(Mutex::new(HashMap::<bytes::Bytes, usize>::new()));
    // A value, not a notification: a receiver busy with a message when the
    // last one arrives must still see that all is done once it looks.
    let (done, _) = tokio::sync::watch::channel(false);
    let mut recv_tasks = tokio::task::JoinSet::new();
    for _ in 0..receivers {
        let sub = f.sub.clone();
        let seen = seen.clone();
        let done = done.clone();
        let mut finished = done.subscribe();
        recv_tasks.spawn(async move {
            loop {
                tokio::select! {
                    r = sub.receive() => {
                        let m = r.expect("receive");
                        let complete = {
                            let mut s = seen.lock().unwrap();
                            *s.entry(m.body().clone()).or_default() += 1;
                            s.len() == total
                        };
                        m.ack();
                        if complete {
                            done.send_replace(true);
                            return;
                        }
                    }
                    _ = finished.wait_for(|all| *all) => return,
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("sender");
    }
    let wait = tokio::time::timeout(ARRIVAL * 3, async {
        while let Some(r) = recv_tasks.join_next().await {
            r.expect("receiver");
        }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!(
        "concurrent_senders_and_receivers: {} of {total} distinct messages received, {duplicates} duplicates",
        seen.len()
    );
    assert!(
        wait.is_ok(),
        "only {} of {total} messages arrived",
        seen.len()
    );
    assert_eq!(seen.len(), total);
    finish(f).await;
}

/// A nacked message comes back promptly, long before its ack deadline.
pub async fn nack_redelivers(h: &impl Harness) {
    let f = simple(h, "nack").await;
    f.topic.send(Message::new("again")).await.expect("send");
    let m = recv(&f.sub, ARRIVAL).await;
    let first_attempt = m.delivery_attempt();
    m.nack();
    let again = recv(&f.sub, LONG_DEADLINE / 4).await;
    assert_eq!(again.body().as_ref(), b"again");
    if let (Some(a), Some(b)) = (first_attempt, again.delivery_attempt()) {
        assert!(b > a, "delivery attempt grows: {a} then {b}");
    }
    again.ack();
    finish(f).await;
}

/// A nacked message comes back after the subscription's nack backoff and
/// not before it, and a nack with a delay of its own waits that delay
/// instead.
pub async fn nack_backoff_delays_redelivery(h: &impl Harness) {
    // What a clock read on each side of the backend may be off by.
    let slack = Duration::from_millis(100);
    let backoff = Duration::from_secs(2);
    let f = fixture(
        h,
        "nack-backoff",
        LONG_DEADLINE,
        TopicOptions::default(),
        SubscriptionOptions::default().with_nack_backoff(NackBackoff::fixed(backoff)),
    )
    .await;
    f.topic.send(Message::new("later")).await.expect("send");
    let m = recv(&f.sub, ARRIVAL).await;
    let nacked = std::time::Instant::now();
    m.nack();
    let again = recv(&f.sub, ARRIVAL).await;
    let waited = nacked.elapsed();
    assert_eq!(again.body().as_ref(), b"later");
    assert!(
        waited + slack >= backoff,
        "redelivered {waited:?} after the nack, before the backoff of {backoff:?}"
    );
    let own = Duration::from_secs(3);
    let nacked = std::time::Instant::now();
    again.nack_with_delay(own);
    let third = recv(&f.sub, ARRIVAL).await;
    let waited = nacked.elapsed();
    assert_eq!(third.body().as_ref(), b"later");
    assert!(
        waited + slack >= own,
        "a nack with its own delay of {own:?} was redelivered after {waited:?}"
    );
    third.ack();
    assert_eq!(f.sub.stats().nacked, 2);
    finish(f).await;
}

/// A received message dropped without ack or nack is nacked and counted.
pub async fn dropped_message_is_nacked(h: &impl Harness) {
    let f = simple(h, "drop-nacks").await;
    f.topic.send(Message::new("dropped")).await.expect("send");
    drop(recv(&f.sub, ARRIVAL).await);
    let again = recv(&f.sub, LONG_DEADLINE / 4).await;
    assert_eq!(again.body().as_ref(), b"dropped");
    again.ack();
    assert_eq!(f.sub.stats().dropped_unsettled, 1);
    finish(f).await;
}

/// Each of two subscriptions gets every message.
pub async fn two_subscriptions_each_get_every_message(h: &impl Harness) {
    let f = simple(h, "fan-out").await;
    let second = format!("{}-second", f.topic_name);
    h.create_subscription(&f.topic_name, &second, LONG_DEADLINE)
        .await
        .expect("create second subscription");
    let sub2 = open_sub(h.open_subscription(&second).await.expect("open"));
    let n = 10;
    for i in 0..n {
        f.topic
            .send(Message::new(format!("fan{i}")))
            .await
            .expect("send");
    }
    for sub in [&f.sub, &sub2] {
        let mut seen = HashSet::new();
        while seen.len() < n {
            let m = recv(sub, ARRIVAL).await;
            seen.insert(m.body().clone());
            m.ack();
        }
    }
    sub2.shutdown().await.expect("shutdown");
    finish(f).await;
}

/// A message neither acked nor nacked comes back after the ack deadline.
pub async fn redelivered_after_ack_deadline(h: &impl Harness) {
    let f = fixture(
        h,
        "deadline",
        h.short_ack_deadline(),
        TopicOptions::default(),
        SubscriptionOptions::default().with_max_lease_extension(Duration::ZERO),
    )
    .await;
    f.topic.send(Message::new("late")).await.expect("send");
    let held = recv(&f.sub, ARRIVAL).await;
    let started = tokio::time::Instant::now();
    let again = recv(&f.sub, h.short_ack_deadline() * 10).await;
    assert_eq!(again.body().as_ref(), b"late");
    assert!(
        started.elapsed() >= h.short_ack_deadline() / 2,
        "redelivered too early: {:?}",
        started.elapsed()
    );
    again.ack();
    held.ack();
    finish(f).await;
}

/// The subscription keeps a held message's lease alive past its deadline.
pub async fn held_message_lease_is_kept(h: &impl Harness) {
    let f = fixture(
        h,
        "lease-keeper",
        h.short_ack_deadline(),
        TopicOptions::default(),
        SubscriptionOptions::default(),
    )
    .await;
    f.topic.send(Message::new("held")).await.expect("send");
    let held = recv(&f.sub, ARRIVAL).await;
    expect_only_sentinel(&f.topic, &f.sub, h.short_ack_deadline() * 3).await;
    held.ack();
    finish(f).await;
}

/// An explicit lease extension keeps a message from redelivery.
pub async fn explicit_lease_extension(h: &impl Harness) {
    let f = fixture(
        h,
        "lease-explicit",
        h.short_ack_deadline(),
        TopicOptions::default(),
        SubscriptionOptions::default().with_max_lease_extension(Duration::ZERO),
    )
    .await;
    f.topic.send(Message::new("extended")).await.expect("send");
    let held = recv(&f.sub, ARRIVAL).await;
    held.extend_lease(h.short_ack_deadline() * 4)
        .await
        .expect("extend");
    expect_only_sentinel(&f.topic, &f.sub, h.short_ack_deadline() * 2).await;
    held.ack();
    finish(f).await;
}

/// A message over the backend's size limit is refused before any I/O.
pub async fn oversized_message_rejected(h: &impl Harness) {
    let max = h.capabilities().max_message_bytes.expect("declared");
    let f = simple(h, "oversized").await;
    let e = f
        .topic
        .send(Message::new(vec![b'x'; max + 1]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    f.topic.send(Message::new("fits")).await.expect("send");
    let m = recv(&f.sub, ARRIVAL).await;
    assert_eq!(m.body().as_ref(), b"fits");
    m.ack();
    finish(f).await;
}

/// Messages of each ordering key arrive in the order they were sent, with
/// several keys sent by concurrent senders.
pub async fn ordering_key_keeps_order(h: &impl Harness) {
    let f = simple(h, "ordering").await;
    // Four senders at once, each alternating between two keys of its own,
    // so batches carry several keys and keys interleave on the wire.
    let (senders, per_key) = (4, 25);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let topic = f.topic.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_key {
                for k in [2 * s, 2 * s + 1] {
                    topic
                        .send(Message::new(format!("{k}:{i}")).with_ordering_key(format!("k{k}")))
                        .await
                        .expect("send");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let total = senders * 2 * per_key;
    let mut next: HashMap<String, usize> = HashMap::new();
    for _ in 0..total {
        let m = recv(&f.sub, ARRIVAL).await;
        let body = String::from_utf8(m.body().to_vec()).expect("utf-8");
        let (k, i) = body.split_once(':').expect("key:index");
        let key = format!("k{k}");
        assert_eq!(m.ordering_key(), Some(key.as_str()));
        let want = next.entry(key.clone()).or_default();
        assert_eq!(
            i.parse::<usize>().expect("index"),
            *want,
            "key {key}: message {body} out of order"
        );
        *want += 1;
        m.ack();
    }
    assert!(next.values().all(|&n| n == per_key), "{next:?}");
    finish(f).await;
}
