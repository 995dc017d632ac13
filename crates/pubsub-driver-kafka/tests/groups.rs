//! Consumer-group behaviour on both brokers: offsets committed only for the
//! contiguously acked prefix survive a restart, two consumers in one group
//! split the partitions, a rebalance drops the queued messages of revoked
//! partitions, one subscription reads several topics, a new group at
//! `newest` misses nothing sent after its subscription opens, one held
//! message pauses its partition at the pending limit, and a commit refused
//! for good fails the subscription.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Broker, Kafka};
use pubsub_core::{ErrorKind, Message, Subscription, SubscriptionOptions, Topic, TopicOptions};
use pubsub_driver_kafka::rdkafka::consumer::Consumer;
use pubsub_driver_kafka::rdkafka::message::OwnedMessage;
use pubsub_driver_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use pubsub_driver_kafka::rdkafka::Message as _;
use pubsub_driver_kafka::{
    open_subscription, open_topic, KafkaConsumer, StartOffset, SubscriptionConfig, TopicConfig,
};

fn unique(what: &str) -> String {
    format!("groups-{what}-{:08x}", fastrand::u32(..))
}

async fn topic_with(k: &Kafka, name: &str, partitions: i32) -> Topic {
    k.create_topic_with(name, partitions)
        .await
        .expect("create topic");
    open_topic(
        &k.settings,
        name,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap()
}

async fn subscription(k: &Kafka, group: &str, topic: &str) -> Subscription {
    open_subscription(
        &k.settings,
        group,
        &[topic],
        SubscriptionConfig::default().with_offset(StartOffset::Oldest),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap()
}

fn place(m: &Message) -> (i32, i64) {
    let raw = m.as_raw::<OwnedMessage>().expect("raw message");
    (raw.partition(), raw.offset())
}

async fn send_all(topic: &Topic, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..10 {
        let t = topic.clone();
        tasks.spawn(async move {
            for i in (s..n).step_by(10) {
                t.send(Message::new(format!("{i}"))).await.expect("send");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// A consumer acks most of 10,000 messages, out of order and with gaps, and
/// shuts down; a new consumer in the same group gets every unacked message
/// again and none of the contiguously acked ones.
async fn restart_resumes_after_the_acked_prefix(k: Kafka) {
    let n = 10_000;
    let name = unique("restart");
    let topic = topic_with(&k, &name, 3).await;
    send_all(&topic, n).await;
    topic.shutdown().await.unwrap();

    let group = format!("{name}-group");
    let first = subscription(&k, &group, &name).await;
    let mut received = Vec::with_capacity(n);
    while received.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(60), first.receive())
            .await
            .expect("all messages arrive")
            .expect("receive");
        received.push(m);
    }
    // Per partition, ack the first 60% of offsets, then every other one
    // after a gap; and ack all of them in shuffled order.
    let mut by_part: BTreeMap<i32, Vec<Message>> = BTreeMap::new();
    for m in received {
        by_part.entry(place(&m).0).or_default().push(m);
    }
    let mut acked: HashMap<(i32, i64), bool> = HashMap::new();
    let mut to_ack = Vec::new();
    let mut held = Vec::new();
    for (_, mut msgs) in by_part {
        msgs.sort_by_key(|m| place(m).1);
        let cut = msgs.len() * 6 / 10;
        for (i, m) in msgs.into_iter().enumerate() {
            let ack = i < cut || (i - cut) % 2 == 1;
            acked.insert(place(&m), ack);
            if ack {
                to_ack.push(m);
            } else {
                held.push(m);
            }
        }
    }
    fastrand::shuffle(&mut to_ack);
    for m in to_ack {
        m.ack();
    }
    first
        .shutdown()
        .await
        .expect("shutdown commits the acked prefix");
    // Dropped after shutdown: nothing is settled, as after a crash.
    drop(held);

    // Per partition, offsets up to the first unacked one were acked in a
    // contiguous run: those must never come back.
    let mut by_partition: BTreeMap<i32, Vec<(i64, bool)>> = BTreeMap::new();
    for (&(p, o), &a) in &acked {
        by_partition.entry(p).or_default().push((o, a));
    }
    let mut prefix = HashSet::new();
    let mut unacked = HashSet::new();
    for (p, mut offsets) in by_partition {
        offsets.sort_unstable();
        let mut in_prefix = true;
        for (o, a) in offsets {
            in_prefix &= a;
            if in_prefix {
                prefix.insert((p, o));
            }
            if !a {
                unacked.insert((p, o));
            }
        }
    }

    let second = subscription(&k, &group, &name).await;
    let mut again = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !unacked.is_subset(&again) {
        assert!(
            Instant::now() < deadline,
            "{} of {} unacked messages came back",
            unacked.intersection(&again).count(),
            unacked.len()
        );
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), second.receive()).await {
            let m = r.expect("receive");
            let at = place(&m);
            assert!(
                !prefix.contains(&at),
                "message at {at:?} was in the contiguously acked prefix, yet came back"
            );
            again.insert(at);
            m.ack();
        }
    }
    println!(
        "restart: {} acked in the prefix, {} unacked all redelivered, {} acked-but-after-a-gap redelivered too",
        prefix.len(),
        unacked.len(),
        again.len() - unacked.len()
    );
    second.shutdown().await.unwrap();
}

/// Acks reach the group's committed offsets while the subscription stays
/// open: stored shortly after they settle, sent by the auto-commit.
async fn acks_are_committed_while_open(k: Kafka) {
    let n = 300;
    let name = unique("committed");
    let topic = topic_with(&k, &name, 3).await;
    send_all(&topic, n).await;
    topic.shutdown().await.unwrap();
    let sub = subscription(&k, &format!("{name}-group"), &name).await;
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(60), sub.receive())
            .await
            .expect("all messages arrive")
            .expect("receive")
            .ack();
    }
    let consumer = sub.as_raw::<KafkaConsumer>().expect("raw consumer");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let committed = tokio::task::block_in_place(|| consumer.committed(Duration::from_secs(5)))
            .expect("read committed offsets");
        let total: i64 = committed
            .elements()
            .iter()
            .filter_map(|e| e.offset().to_raw())
            .filter(|o| *o > 0)
            .sum();
        if total == n as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets add up to {total}, not {n}, 20 s after every message was acked"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.shutdown().await.unwrap();
}

/// Two subscriptions in one group split the partitions and together get
/// every message.
async fn two_consumers_split_the_partitions(k: Kafka) {
    let n = 2_000;
    let name = unique("split");
    let topic = topic_with(&k, &name, 4).await;
    let group = format!("{name}-group");
    let subs = [
        subscription(&k, &group, &name).await,
        subscription(&k, &group, &name).await,
    ];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, sub) in subs.iter().enumerate() {
        let sub = sub.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(m) = sub.receive().await {
                let _ = tx.send((i, m.body().clone(), place(&m).0));
                m.ack();
            }
        }));
    }
    // Both must have joined and hold partitions before anything is sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<usize> = subs.iter().map(|s| assigned(s).len()).collect();
        if counts.iter().all(|&c| c > 0) && counts.iter().sum::<usize>() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never settled: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send_all(&topic, n).await;
    let mut seen = HashSet::new();
    let mut per_consumer = [0usize; 2];
    let mut partitions = [HashSet::new(), HashSet::new()];
    while seen.len() < n {
        let (i, body, p) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("every message arrives")
            .unwrap();
        seen.insert(body);
        per_consumer[i] += 1;
        partitions[i].insert(p);
    }
    println!("split: consumers got {per_consumer:?} messages from partitions {partitions:?}");
    assert!(
        per_consumer.iter().all(|&c| c > 0),
        "both consumers worked: {per_consumer:?}"
    );
    assert!(
        partitions[0].is_disjoint(&partitions[1]),
        "a partition belongs to one consumer: {partitions:?}"
    );
    for s in &subs {
        s.shutdown().await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    topic.shutdown().await.unwrap();
}

/// The partitions a consumer holds, as librdkafka has them now.
fn assigned(sub: &Subscription) -> HashSet<i32> {
    let consumer = sub.as_raw::<KafkaConsumer>().expect("the raw consumer");
    let assignment = consumer.assignment().expect("assignment");
    assignment
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect()
}

/// A consumer whose queue holds messages of every partition loses half the
/// partitions to a second consumer. From the moment it holds its new
/// assignment, it hands out no message of a partition it lost: those
/// messages are dropped from its queue unacked (and counted as revoked), and
/// the new owner reads them. Together the two get every message.
async fn a_rebalance_drops_queued_messages_of_revoked_partitions(k: Kafka) {
    let n = 4_000;
    let name = unique("revoke");
    let topic = topic_with(&k, &name, 4).await;
    send_all(&topic, n).await;
    let group = format!("{name}-group");
    let first = subscription(&k, &group, &name).await;
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    // Read a while, so that receive batches grow and the queue holds much
    // of the backlog.
    for _ in 0..1_000 {
        let m = tokio::time::timeout(Duration::from_secs(60), first.receive())
            .await
            .expect("the first consumer receives")
            .unwrap();
        deliveries += 1;
        seen.insert(m.body().clone());
        m.ack();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.stats().queued < 300 {
        assert!(
            Instant::now() < deadline,
            "the queue never filled: {:?}",
            first.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = first.stats().queued;

    let second = subscription(&k, &group, &name).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = {
        let second = second.clone();
        tokio::spawn(async move {
            while let Ok(m) = second.receive().await {
                let _ = tx.send(m.body().clone());
                m.ack();
            }
        })
    };
    // The first consumer goes on, slowly until it holds its share: its
    // consumer is polled, and its revocation served, only as its queue
    // drains. (A broker may also give everything to the second consumer
    // while the first is not polled, and the first learn that it lost its
    // partitions only then.)
    let mut settled: Option<HashSet<i32>> = None;
    let mut after_settling = 0;
    let mut stale = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < n || settled.is_none() {
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages arrived; first consumer {:?}, holding {:?}",
            seen.len(),
            first.stats(),
            assigned(&first)
        );
        while let Ok(body) = rx.try_recv() {
            deliveries += 1;
            seen.insert(body);
        }
        if settled.is_none() {
            let now = assigned(&first);
            if now.len() == 2 {
                settled = Some(now);
            }
        }
        let Ok(m) = tokio::time::timeout(Duration::from_millis(200), first.receive()).await else {
            continue;
        };
        let m = m.unwrap();
        if let Some(held) = &settled {
            after_settling += 1;
            let (partition, offset) = place(&m);
            if !held.contains(&partition) {
                stale.push((partition, offset));
            }
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        deliveries += 1;
        seen.insert(m.body().clone());
        m.ack();
    }
    let stats = first.stats();
    let again = deliveries - seen.len();
    println!(
        "revoke: {queued} queued before the second consumer joined; the first then held {settled:?}, handed out {after_settling} more; {again} delivered again; {stats:?}"
    );
    assert!(
        stale.is_empty(),
        "the first consumer handed out {} messages of partitions it no longer held, e.g. {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    assert!(
        stats.revoked > 0,
        "queued messages of the revoked partitions were dropped: {stats:?}"
    );
    // Revocation commits the acked prefix, so the new owner reads again
    // only the message the first consumer held unacked at the time. (The
    // mock cluster goes on without a member that rejoins later than its
    // session timeout, and then refuses that member's commits, so there
    // its acks since the last auto-commit come back too.)
    if matches!(k.broker, common::Broker::Tcp(_)) {
        assert!(again <= 1, "{again} acked messages were delivered again");
    }
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    reader.await.unwrap();
    topic.shutdown().await.unwrap();
}

/// One subscription over two topics gets every message of both, each
/// named by its own topic, and acks, nacks and redelivery work across them.
async fn one_subscription_reads_two_topics(k: Kafka) {
    let names = [unique("two-a"), unique("two-b")];
    let a = topic_with(&k, &names[0], 2).await;
    let b = topic_with(&k, &names[1], 2).await;
    send_all(&a, 100).await;
    send_all(&b, 100).await;
    let sub = open_subscription(
        &k.settings,
        &unique("two-group"),
        &[names[0].as_str(), names[1].as_str()],
        SubscriptionConfig::default().with_offset(StartOffset::Oldest),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let mut got: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let mut nacked = HashSet::new();
    let mut redelivered = 0;
    while got.values().map(HashSet::len).sum::<usize>() < 200 {
        let m = tokio::time::timeout(Duration::from_secs(60), sub.receive())
            .await
            .expect("every message arrives")
            .unwrap();
        let raw = m.as_raw::<OwnedMessage>().expect("raw message");
        let (topic, partition, offset) = (raw.topic().to_owned(), raw.partition(), raw.offset());
        assert_eq!(
            m.id(),
            Some(format!("{topic}/{partition}/{offset}").as_str())
        );
        let body = String::from_utf8(m.body().to_vec()).unwrap();
        // Nack the first message of each topic once; it must come back.
        if nacked.insert(topic.clone()) {
            m.nack();
            continue;
        }
        match m.delivery_attempt() {
            Some(2) => redelivered += 1,
            // Kafka keeps no delivery count: a first read cannot know
            // whether another consumer (or this one before a restart)
            // read the offset already.
            None => {}
            other => panic!("a first read reports no attempt, not {other:?}"),
        }
        got.entry(topic).or_default().insert(body);
        m.ack();
    }
    let counts: Vec<(String, usize)> = got.iter().map(|(t, b)| (t.clone(), b.len())).collect();
    let mut want = vec![(names[0].clone(), 100), (names[1].clone(), 100)];
    want.sort();
    assert_eq!(counts, want);
    assert_eq!(redelivered, 2, "both nacked messages came back");
    sub.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A new group at `newest` gets what is sent once its subscription is
/// open, before its first receive: opening joins the group (the Go CDK's
/// `WaitForJoin`), so the group's start is not the end of the log as it
/// is at some later first receive.
async fn a_new_group_at_newest_gets_what_is_sent_after_open(k: Kafka) {
    let name = unique("newest");
    let topic = topic_with(&k, &name, 3).await;
    let sub = open_subscription(
        &k.settings,
        &unique("newest-group"),
        &[name.as_str()],
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let n = 6;
    for i in 0..n {
        topic.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let mut got = HashSet::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.receive())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} messages sent after the open arrived",
                    got.len()
                )
            })
            .unwrap();
        got.insert(String::from_utf8(m.body().to_vec()).unwrap());
        m.ack();
    }
    sub.shutdown().await.unwrap();
    topic.shutdown().await.unwrap();
}

/// One message held unacked while the rest are acked pauses its partition
/// once `max_pending` deliveries wait to be committed behind it; acking it
/// resumes the partition, and everything arrives.
async fn a_held_message_pauses_its_partition_at_the_pending_limit(k: Kafka) {
    let name = unique("pending");
    let topic = topic_with(&k, &name, 1).await;
    let (n, limit, batch) = (3000, 200, 50);
    send_all(&topic, n).await;
    let sub = open_subscription(
        &k.settings,
        &unique("pending-group"),
        &[name.as_str()],
        SubscriptionConfig::default()
            .with_offset(StartOffset::Oldest)
            .with_max_pending(limit),
        SubscriptionOptions::default().with_max_receive_batch(batch),
    )
    .await
    .unwrap();
    let wait = Duration::from_secs(30);
    let held = tokio::time::timeout(wait, sub.receive())
        .await
        .expect("a first message")
        .unwrap();
    let mut seen = 1;
    // Everything flows until the partition pauses; then nothing comes.
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(5), sub.receive()).await {
        m.unwrap().ack();
        seen += 1;
        assert!(seen < n, "all {n} messages came while the first was held");
    }
    assert!(
        (limit..=limit + 2 * batch).contains(&seen),
        "{seen} messages handed out while one was held; the limit is {limit} waiting, fetched {batch} at a time"
    );
    held.ack();
    while seen < n {
        tokio::time::timeout(wait, sub.receive())
            .await
            .unwrap_or_else(|_| panic!("only {seen} of {n} arrived after the held one was acked"))
            .unwrap()
            .ack();
        seen += 1;
    }
    sub.shutdown().await.unwrap();
    topic.shutdown().await.unwrap();
}

/// A commit the broker refuses for good (here: not authorized for the
/// group) fails the subscription as a failed ack would: its receives and
/// its shutdown report it, instead of acks that silently never commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_a_commit_refused_for_good_fails_the_subscription() {
    let k = Kafka::mock();
    let name = unique("refused");
    let topic = topic_with(&k, &name, 1).await;
    send_all(&topic, 10).await;
    let Broker::Mock(mock) = &k.broker else {
        unreachable!("a mock cluster");
    };
    mock.with(|c| {
        c.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 20],
        )
    });
    let sub = subscription(&k, &unique("refused-group"), &name).await;
    let failed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match sub.receive().await {
                Ok(m) => m.ack(),
                Err(e) => break e,
            }
        }
    })
    .await
    .expect("the refused commit fails the subscription's receives");
    assert_eq!(failed.kind(), ErrorKind::PermissionDenied, "{failed}");
    assert_eq!(failed.context("operation"), Some("commit"), "{failed}");
    let e = sub.shutdown().await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::PermissionDenied,
        "shutdown reports it too: {e}"
    );
    topic.shutdown().await.unwrap();
}

/// One test a broker for each case: `CASE::mock` on librdkafka's mock
/// cluster, `CASE::tansu` on the tansu broker.
macro_rules! on_both_brokers {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn mock() {
                    super::$case(super::Kafka::mock()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tansu() {
                    let k = super::Kafka::tansu().await.unwrap_or_else(|e| panic!("{e}"));
                    super::$case(k).await;
                }
            }
        )*
    };
}

on_both_brokers!(
    a_new_group_at_newest_gets_what_is_sent_after_open,
    a_held_message_pauses_its_partition_at_the_pending_limit,
    one_subscription_reads_two_topics,
    restart_resumes_after_the_acked_prefix,
    two_consumers_split_the_partitions,
    a_rebalance_drops_queued_messages_of_revoked_partitions,
    acks_are_committed_while_open,
);
