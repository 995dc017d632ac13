//! The driver against the raw `aws-sdk-sns` and `aws-sdk-sqs` clients doing
//! the same work in the same run, on moto (127.0.0.1:5000; `scripts/backends
//! up` starts it):
//! - sends of 100-byte bodies to an SNS topic by 1, 10 and 100 concurrent
//!   senders, each awaiting its own send: the raw client's `Publish` of
//!   each message, against `Topic::send`;
//! - receive + ack of a backlog on a fresh SQS queue each run: the raw
//!   client's `ReceiveMessage` of up to ten and `DeleteMessageBatch` of
//!   them, in as many concurrent loops as did best in the warm-up (1, 4 or
//!   16), against `Subscription::receive` and `ack` of each, then
//!   `shutdown`, with `SubscriptionOptions::max_receive_batch` allowing as
//!   many ReceiveMessage calls at once as did best for it in the same
//!   warm-up (1, 4 or 16), the two sides' warm-up runs alternating. Both count distinct message ids to the backlog, as moto
//!   can hand one message to two concurrent receives.
//!
//! moto is slow (about a hundred calls a second), so the runs are small;
//! the absolute figures measure moto, the ratios the driver. Nobody
//! subscribes to the send topic, so moto keeps nothing and runs do not
//! slow each other down. Each row warms both sides, then runs [`TRIES`]
//! tries of raw then driver.
//!
//! `cargo bench -p pubsub-driver-aws --bench aws` runs everything; `-- 10`
//! only the sends by that many senders, `-- sends` every send row,
//! `-- receive` the receive row. `PUBSUB_BENCH_VERBOSE=1` prints each try.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pubsub_conformance::bench::{ratio_header, ratio_row};
use pubsub_core::{Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_aws::aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry,
};
use pubsub_driver_aws::{
    aws_sdk_sqs, open_sns_topic, open_subscription, AwsParams, Clients, SubscriptionConfig,
    TopicConfig,
};

const BODY: usize = 100;
const TRIES: usize = 5;
/// Concurrent senders and the messages a measured run sends.
const SENDS: [(usize, usize); 3] = [(1, 200), (10, 1_000), (100, 2_000)];
/// Messages in the receive backlog.
const BACKLOG: usize = 1_000;
/// Concurrent raw receive loops tried in the warm-up.
const RAW_LOOPS: [usize; 3] = [1, 4, 16];

fn body() -> String {
    "x".repeat(BODY)
}

fn unique(what: &str) -> String {
    format!("bench-{what}-{:08x}", fastrand::u32(..))
}

async fn clients() -> Clients {
    let config = AwsParams::default()
        .with_region("us-east-1")
        .with_endpoint("http://127.0.0.1:5000")
        .load(None)
        .await
        .to_builder()
        .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
            aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "bench"),
        ))
        .build();
    Clients::from_config(&config)
}

async fn raw_sends(c: &Clients, arn: &str, senders: usize, total: usize) -> f64 {
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (sns, arn) = (c.sns.clone(), arn.to_owned());
        tasks.spawn(async move {
            let body = body();
            for _ in 0..per {
                sns.publish()
                    .topic_arn(&arn)
                    .message(&body)
                    .send()
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    (per * senders) as f64 / started.elapsed().as_secs_f64()
}

async fn driver_sends(c: &Clients, arn: &str, senders: usize, total: usize) -> f64 {
    let topic = Arc::new(
        open_sns_topic(
            c.sns.clone(),
            arn,
            TopicConfig::default(),
            TopicOptions::default(),
        )
        .unwrap(),
    );
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let topic = topic.clone();
        tasks.spawn(async move {
            let body = body();
            for _ in 0..per {
                topic.send(Message::new(body.clone())).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let rate = (per * senders) as f64 / started.elapsed().as_secs_f64();
    topic.shutdown().await.unwrap();
    rate
}

async fn sends(c: &Clients, only: &[usize]) {
    let arn = c
        .sns
        .create_topic()
        .name(unique("send"))
        .send()
        .await
        .expect("create topic (is moto running? scripts/backends up)")
        .topic_arn
        .unwrap();
    println!("Sends to SNS awaiting acceptance, {BODY}-byte bodies, one moto");
    ratio_header("senders", "aws-sdk-sns Publish", TRIES);
    for (senders, total) in SENDS {
        if !only.is_empty() && !only.contains(&senders) {
            continue;
        }
        let _ = raw_sends(c, &arn, senders, total / 5).await;
        let _ = driver_sends(c, &arn, senders, total / 5).await;
        let (mut raws, mut libs) = (Vec::new(), Vec::new());
        for _ in 0..TRIES {
            raws.push(raw_sends(c, &arn, senders, total).await);
            libs.push(driver_sends(c, &arn, senders, total).await);
        }
        ratio_row(&format!("{senders:>3}"), &raws, &libs);
    }
}

/// A fresh queue holding the backlog.
async fn loaded(c: &Clients) -> String {
    let url = c
        .sqs
        .create_queue()
        .queue_name(unique("recv"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let body = body();
    let mut calls = Vec::new();
    for chunk in 0..BACKLOG / 10 {
        let entries = (0..10)
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(format!("{chunk}-{i}"))
                    .message_body(&body)
                    .build()
                    .unwrap()
            })
            .collect();
        calls.push(
            c.sqs
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send(),
        );
        if calls.len() == 16 {
            for r in futures_util::future::join_all(std::mem::take(&mut calls)).await {
                r.unwrap();
            }
        }
    }
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    url
}

async fn drop_queue(c: &Clients, url: &str) {
    let _ = c.sqs.delete_queue().queue_url(url).send().await;
}

/// Message ids seen, counting to the backlog: moto can hand one message
/// to two concurrent receives, so both sides stop at distinct messages.
#[derive(Default)]
struct Seen(std::sync::Mutex<std::collections::HashSet<String>>);

impl Seen {
    fn add(&self, id: &str) {
        self.0.lock().unwrap().insert(id.to_owned());
    }

    fn all(&self) -> bool {
        self.0.lock().unwrap().len() >= BACKLOG
    }
}

async fn raw_receive(c: &Clients, url: &str, loops: usize) -> f64 {
    let started = Instant::now();
    let seen = Arc::new(Seen::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..loops {
        let (sqs, url, seen) = (c.sqs.clone(), url.to_owned(), seen.clone());
        tasks.spawn(async move {
            let mut bytes = 0;
            while !seen.all() {
                let out = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .unwrap();
                let messages = out.messages.unwrap_or_default();
                if messages.is_empty() {
                    continue;
                }
                let entries = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        bytes += m.body.as_deref().map_or(0, str::len);
                        seen.add(m.message_id.as_deref().unwrap_or_default());
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle.clone().unwrap())
                            .build()
                            .unwrap()
                    })
                    .collect();
                sqs.delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .unwrap();
            }
            bytes
        });
    }
    let mut bytes = 0;
    while let Some(r) = tasks.join_next().await {
        bytes += r.unwrap();
    }
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    assert!(bytes >= BACKLOG * BODY);
    rate
}

async fn driver_receive(c: &Clients, url: &str, loops: usize) -> f64 {
    let mut options = SubscriptionOptions::default();
    // As many ReceiveMessage calls at once as the raw side's loops.
    options.max_receive_batch = Some(loops * 10);
    let sub = open_subscription(
        c.sqs.clone(),
        url,
        SubscriptionConfig::default()
            .with_raw(true)
            .with_wait_time(Duration::from_secs(1)),
        options,
    )
    .await
    .unwrap();
    let started = Instant::now();
    let seen = Seen::default();
    let mut bytes = 0;
    while !seen.all() {
        let m = sub.receive().await.unwrap();
        bytes += m.body().len();
        seen.add(m.id().unwrap_or_default());
        m.ack();
    }
    sub.shutdown().await.unwrap();
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    assert!(bytes >= BACKLOG * BODY);
    rate
}

async fn receive(c: &Clients) {
    println!(
        "\nReceive + ack of a {BACKLOG}-message SQS backlog ({BODY}-byte bodies), a fresh queue each run"
    );
    // Each side's best concurrency, tried alternately.
    let mut best = (0.0, RAW_LOOPS[0]);
    let mut best_driver = (0.0, RAW_LOOPS[0]);
    for loops in RAW_LOOPS {
        let url = loaded(c).await;
        let rate = raw_receive(c, &url, loops).await;
        drop_queue(c, &url).await;
        if rate > best.0 {
            best = (rate, loops);
        }
        let url = loaded(c).await;
        let rate = driver_receive(c, &url, loops).await;
        drop_queue(c, &url).await;
        if rate > best_driver.0 {
            best_driver = (rate, loops);
        }
    }
    ratio_header("backlog", "aws-sdk-sqs", TRIES);
    let (mut raws, mut libs) = (Vec::new(), Vec::new());
    for _ in 0..TRIES {
        let url = loaded(c).await;
        raws.push(raw_receive(c, &url, best.1).await);
        drop_queue(c, &url).await;
        let url = loaded(c).await;
        libs.push(driver_receive(c, &url, best_driver.1).await);
        drop_queue(c, &url).await;
    }
    ratio_row(
        &format!(
            "{BACKLOG} (raw {} loops, driver {} calls)",
            best.1, best_driver.1
        ),
        &raws,
        &libs,
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let only: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let want_sends = args.is_empty() || !only.is_empty() || args.iter().any(|a| a == "sends");
    let want_receive = args.is_empty() || args.iter().any(|a| a == "receive");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = clients().await;
        if want_sends {
            sends(&c, &only).await;
        }
        if want_receive {
            receive(&c).await;
        }
    });
    pubsub_conformance::bench::write_chart(
        "aws",
        "AWS SNS and SQS (moto): pubsub against aws-sdk-sns / aws-sdk-sqs",
        "raw AWS SDK",
    );
}
