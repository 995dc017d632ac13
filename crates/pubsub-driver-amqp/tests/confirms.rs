//! Publisher confirms must name the message the broker took.
//!
//! lapin numbers a publish when it is registered and the broker numbers it
//! when its frames arrive; concurrent batches on one channel must not let
//! the two orders differ, or a broker ack lands on the wrong message. That
//! shows as a message reported sent that the broker never took, which a
//! connection cut at the wrong moment turns into a lost message.
//!
//! A queue of bounded length that rejects publishes past it (`x-overflow:
//! reject-publish`) makes the broker's order visible: it acks exactly the
//! first `LIMIT` messages to arrive and nacks the rest, so the messages the
//! driver reports as sent must be exactly the messages the queue holds.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::Admin;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use pubsub_core::driver::{BatchError, OutgoingMessage, Topic as _};
use pubsub_driver_amqp::{lapin, AmqpTopic, TopicConfig};

/// Messages the queue takes before it rejects publishes.
const LIMIT: usize = 300;
/// Concurrent senders, each sending batches of `BATCH` in a loop.
const SENDERS: usize = 8;
const BATCH: usize = 25;
/// Messages sent a round: well past the limit, so the boundary falls while
/// every sender is publishing.
const PER_ROUND: usize = 3 * LIMIT;
const ROUNDS: usize = 10;

async fn bounded_queue(admin: &Admin, exchange: &str, queue: &str) {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    args.insert("x-max-length".into(), AMQPValue::LongInt(LIMIT as i32));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    admin
        .channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    admin
        .channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Sends `PER_ROUND` messages from concurrent batches on one topic and
/// returns the bodies the driver reported as confirmed.
async fn send_round(topic: Arc<AmqpTopic>, round: usize) -> HashSet<String> {
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..SENDERS {
        let topic = topic.clone();
        senders.spawn(async move {
            let mut confirmed = Vec::new();
            let mut i = 0;
            while i < PER_ROUND / SENDERS {
                let bodies: Vec<String> = (i..(i + BATCH).min(PER_ROUND / SENDERS))
                    .map(|n| format!("{round}-{s}-{n}"))
                    .collect();
                i += bodies.len();
                let batch: Vec<OutgoingMessage> = bodies
                    .iter()
                    .map(|b| OutgoingMessage::new(b.clone()))
                    .collect();
                let failed: HashSet<usize> = match topic.send_batch(&batch).await {
                    Ok(()) => HashSet::new(),
                    Err(BatchError::Items(items)) => items.into_iter().map(|(i, _)| i).collect(),
                    Err(BatchError::All(e)) => panic!("a whole batch failed: {e}"),
                };
                confirmed.extend(
                    bodies
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| !failed.contains(i))
                        .map(|(_, b)| b),
                );
            }
            confirmed
        });
    }
    let mut confirmed = HashSet::new();
    while let Some(r) = senders.join_next().await {
        confirmed.extend(r.expect("sender"));
    }
    confirmed
}

async fn drain(admin: &Admin, queue: &str) -> HashSet<String> {
    let mut held = HashSet::new();
    while let Some(m) = admin
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        held.insert(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_name_the_messages_the_broker_took() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let exchange = format!("confirms-{:08x}", fastrand::u32(..));
    admin.exchange(&exchange).await.unwrap();
    let topic = Arc::new(
        AmqpTopic::new(admin.connector.clone(), &exchange, TopicConfig::default()).unwrap(),
    );
    let mut wrong = Vec::new();
    for round in 0..ROUNDS {
        let queue = format!("{exchange}-{round}");
        bounded_queue(&admin, &exchange, &queue).await;
        let confirmed = send_round(topic.clone(), round).await;
        // Unbind, so the next round's messages reach only the next queue.
        admin
            .channel
            .queue_unbind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = drain(&admin, &queue).await;
        assert_eq!(
            held.len(),
            LIMIT,
            "round {round}: the queue holds its limit"
        );
        let reported_not_held: Vec<_> = confirmed.difference(&held).cloned().collect();
        let held_not_reported: Vec<_> = held.difference(&confirmed).cloned().collect();
        if !reported_not_held.is_empty() || !held_not_reported.is_empty() {
            wrong.push(format!(
                "round {round}: reported sent but rejected {reported_not_held:?}; taken but reported failed {held_not_reported:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "confirms landed on the wrong messages:\n{}",
        wrong.join("\n")
    );
}

/// The broker returns a mandatory message no queue takes just before it
/// acks it, and acks in ranges (`multiple`); each message must still get
/// its own outcome, not the outcome of another message acked in the same
/// range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_name_the_unroutable_messages() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let exchange = format!("returns-{:08x}", fastrand::u32(..));
    admin
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = format!("{exchange}-q");
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    admin
        .channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    admin
        .channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "routed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let topic = Arc::new(
        AmqpTopic::new(
            admin.connector.clone(),
            &exchange,
            TopicConfig::default().with_key_name("key"),
        )
        .unwrap(),
    );
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..SENDERS {
        let topic = topic.clone();
        senders.spawn(async move {
            let mut wrong = Vec::new();
            for b in 0..20 {
                // Every seventh message has no queue.
                let batch: Vec<OutgoingMessage> = (0..BATCH)
                    .map(|n| {
                        let key = if (s + b + n) % 7 == 0 {
                            "nowhere"
                        } else {
                            "routed"
                        };
                        let mut m = OutgoingMessage::new(format!("{s}-{b}-{n}"));
                        m.attributes.insert("key".into(), key.into());
                        m
                    })
                    .collect();
                let failed: std::collections::HashMap<usize, String> =
                    match topic.send_batch(&batch).await {
                        Ok(()) => Default::default(),
                        Err(BatchError::Items(items)) => {
                            items.into_iter().map(|(i, e)| (i, e.to_string())).collect()
                        }
                        Err(BatchError::All(e)) => panic!("a whole batch failed: {e}"),
                    };
                for (i, m) in batch.iter().enumerate() {
                    let unroutable = m.attributes["key"] == "nowhere";
                    match (unroutable, failed.get(&i)) {
                        (true, Some(e)) if e.contains("unroutable") && e.contains("nowhere") => {}
                        (false, None) => {}
                        (_, outcome) => wrong.push(format!(
                            "{:?} (key {}): {outcome:?}",
                            m.body, m.attributes["key"]
                        )),
                    }
                }
            }
            wrong
        });
    }
    let mut wrong = Vec::new();
    while let Some(r) = senders.join_next().await {
        wrong.extend(r.expect("sender"));
    }
    assert!(
        wrong.is_empty(),
        "{} messages got another message's outcome, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// The core sends a message again when its confirm was lost; the resend
/// must carry the first send's message id, so that receivers (and the
/// driver's own `Message::id`) can tell the duplicate.
#[tokio::test]
async fn a_resend_carries_the_first_sends_message_id() {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let exchange = format!("resend-{:08x}", fastrand::u32(..));
    let queue = format!("{exchange}-q");
    admin.exchange(&exchange).await.unwrap();
    admin.queue(&exchange, &queue).await.unwrap();
    let topic = AmqpTopic::new(admin.connector.clone(), &exchange, TopicConfig::default()).unwrap();
    let batch = [OutgoingMessage::new("once"), OutgoingMessage::new("twice")];
    topic.send_batch(&batch).await.unwrap();
    topic.send_batch(&batch).await.unwrap();
    let mut ids: std::collections::HashMap<String, Vec<String>> = Default::default();
    for _ in 0..4 {
        let m = admin
            .channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("four messages queued");
        let id = m
            .delivery
            .properties
            .message_id()
            .clone()
            .expect("a message id");
        ids.entry(String::from_utf8(m.delivery.data.clone()).unwrap())
            .or_default()
            .push(id.to_string());
    }
    for (body, ids) in &ids {
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], ids[1], "both sends of {body:?} carry one id");
    }
    assert_ne!(ids["once"][0], ids["twice"][0], "two messages, two ids");
}
