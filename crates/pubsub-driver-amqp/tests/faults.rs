//! Fault tests: 10,000 messages sent by several tasks while the broker
//! connection is forcibly closed, or while RabbitMQ is stopped and started.
//! Every message whose `send` succeeded must be received at least once.
//!
//! They drive the broker with `rabbitmqctl`, so they run one at a time.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Admin;
use pubsub_core::{Message, Subscription, Topic};
use pubsub_driver_amqp::{open_subscription, open_topic, SubscriptionConfig, TopicConfig};

const SENDERS: u64 = 5;
const PER_SENDER: u64 = 2_000;
const TOTAL: u64 = SENDERS * PER_SENDER;

/// Serializes the tests of this file: each disturbs the whole broker.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect(
            "rabbitmqctl must be on PATH to run the fault tests (it comes with rabbitmq-server)",
        );
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the broker application again if a test stops half way.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .status();
    }
}

struct Run {
    topic: Topic,
    sub: Subscription,
    sent: Arc<AtomicU64>,
    confirmed: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<HashMap<String, usize>>>,
}

async fn setup(name: &str) -> Run {
    let admin = Admin::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let x = format!("fault-{name}-{:08x}", fastrand::u32(..));
    let q = format!("{x}-q");
    admin.exchange(&x).await.unwrap();
    admin.queue(&x, &q).await.unwrap();
    let topic = open_topic(
        &admin.connector,
        &x,
        TopicConfig::default(),
        Default::default(),
    )
    .unwrap();
    let sub = open_subscription(
        &admin.connector,
        &q,
        SubscriptionConfig::default(),
        Default::default(),
    )
    .unwrap();
    Run {
        topic,
        sub,
        sent: Arc::default(),
        confirmed: Arc::default(),
        received: Arc::default(),
    }
}

impl Run {
    /// Starts the senders (paced so the faults land mid-stream) and one
    /// receiver; returns their tasks.
    fn start(&self) -> (tokio::task::JoinSet<()>, tokio::task::JoinHandle<()>) {
        let mut senders = tokio::task::JoinSet::new();
        for s in 0..SENDERS {
            let topic = self.topic.clone();
            let sent = self.sent.clone();
            let confirmed = self.confirmed.clone();
            senders.spawn(async move {
                for i in 0..PER_SENDER {
                    let body = format!("{s}-{i}");
                    match topic.send(Message::new(body.clone())).await {
                        Ok(()) => confirmed.lock().unwrap().push(body),
                        Err(e) => eprintln!("send {body} failed: {e}"),
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    // Paced, so the faults land while sending even when rabbitmqctl is slow.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
        let sub = self.sub.clone();
        let received = self.received.clone();
        let receiver = tokio::spawn(async move {
            loop {
                match sub.receive().await {
                    Ok(m) => {
                        let body = String::from_utf8(m.body().to_vec()).unwrap();
                        *received.lock().unwrap().entry(body).or_default() += 1;
                        m.ack();
                    }
                    Err(_) if sub.is_shut_down() => return,
                    Err(e) => panic!("receive failed for good: {e}"),
                }
            }
        });
        (senders, receiver)
    }

    async fn wait_sent(&self, n: u64) {
        while self.sent.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for every confirmed message, then reports and checks.
    async fn finish(
        self,
        what: &str,
        mut senders: tokio::task::JoinSet<()>,
        receiver: tokio::task::JoinHandle<()>,
    ) {
        while let Some(r) = senders.join_next().await {
            r.expect("sender");
        }
        let confirmed = self.confirmed.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let missing = {
                let got = self.received.lock().unwrap();
                confirmed.iter().filter(|b| !got.contains_key(*b)).count()
            };
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {missing} of {} confirmed messages never arrived",
                confirmed.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.sub.shutdown().await.expect("subscription shutdown");
        receiver.await.expect("receiver");
        self.topic.shutdown().await.expect("topic shutdown");
        let got = self.received.lock().unwrap();
        let duplicates: usize = got.values().map(|c| c - 1).sum();
        println!(
            "{what}: {} of {TOTAL} sends confirmed, all {} received at least once; {duplicates} duplicate deliveries",
            confirmed.len(),
            confirmed.len()
        );
        assert_eq!(
            confirmed.len() as u64,
            TOTAL,
            "the core retries through the outage, so every send succeeds"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_forcibly_closed_twice_lose_no_confirmed_message() {
    let _serial = BROKER.lock().await;
    let run = setup("close").await;
    let (senders, receiver) = run.start();
    for at in [TOTAL / 4, TOTAL / 2] {
        run.wait_sent(at).await;
        rabbitmqctl(&["close_all_connections", "fault test: forced close"]).await;
        let sent = run.sent.load(Ordering::Relaxed);
        assert!(
            sent < TOTAL,
            "the close must land while sending ({sent} sent)"
        );
        println!("closed every connection after {sent} sends");
    }
    run.finish("forced closes", senders, receiver).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_restarted_loses_no_confirmed_message() {
    let _serial = BROKER.lock().await;
    let run = setup("restart").await;
    let (senders, receiver) = run.start();
    run.wait_sent(TOTAL / 4).await;
    let _restart = StartAppOnDrop;
    rabbitmqctl(&["stop_app"]).await;
    let sent = run.sent.load(Ordering::Relaxed);
    println!("RabbitMQ stopped after {sent} sends");
    assert!(
        sent < TOTAL,
        "the stop must land while sending ({sent} sent)"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]).await;
    println!("RabbitMQ started again");
    run.finish("broker restart", senders, receiver).await;
}
