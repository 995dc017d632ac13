//! The driver against the raw `google-cloud-pubsub` clients doing the same
//! work in the same run, on Google's emulator (`PUBSUB_EMULATOR_HOST`,
//! default 127.0.0.1:8085; `scripts/backends up` starts it):
//! - sends of 100-byte bodies by 1, 10 and 100 concurrent senders, each
//!   awaiting its own send: the raw `Publisher` with the batching that did
//!   best for that many senders (tried in the warm-up among [`SETTINGS`]),
//!   against `Topic::send`;
//! - receive + ack of a backlog, through a fresh subscription each run:
//!   the raw `Subscriber` stream's `next` and `ack` of each message and
//!   then its shutdown (which sends the acks), against
//!   `Subscription::receive` and `ack` of each, then `shutdown`.
//!
//! The emulator is slow (a few hundred sends a second from one awaited
//! sender), so the runs are small; the absolute figures measure the
//! emulator, the ratios the driver. Each row warms both sides, then runs
//! [`TRIES`] tries of raw then driver, and prints the best rate of each,
//! the ratio of the bests and the median of the per-try ratios.
//!
//! `cargo bench -p pubsub-driver-gcp --bench gcp` runs everything; `-- 10`
//! only the sends by that many senders, `-- sends` every send row,
//! `-- receive` the receive row. `PUBSUB_BENCH_VERBOSE=1` prints each
//! try, and for sends the bench process's CPU time a message on each side;
//! `PUBSUB_BENCH_MAX_HANDLERS=N` runs the driver's topic with `N` send
//! batches in flight instead of its default.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pubsub_conformance::bench::{process_cpu, ratio_header, ratio_row as row};
use pubsub_core::{Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_gcp::google_cloud_pubsub::client::{Publisher, SubscriptionAdmin, TopicAdmin};
use pubsub_driver_gcp::google_cloud_pubsub::model;
use pubsub_driver_gcp::{
    open_subscription, open_topic, Clients, Endpoint, SubscriptionConfig, TopicConfig,
};

const BODY: usize = 100;
const TRIES: usize = 5;
/// Concurrent senders and the messages a measured run sends.
const SENDS: [(usize, usize); 3] = [(1, 1_500), (10, 20_000), (100, 100_000)];
/// The raw publisher's batching settings tried for each row: a message
/// count threshold of one (each message leaves at once), or of the number
/// of senders (a request leaves when every sender has a message in it), or
/// the default count with these delay thresholds.
const SETTINGS: [Raw; 6] = [
    Raw::Alone,
    Raw::Senders,
    Raw::Delay(Duration::ZERO),
    Raw::Delay(Duration::from_millis(1)),
    Raw::Delay(Duration::from_millis(5)),
    Raw::Delay(Duration::from_millis(10)),
];

#[derive(Clone, Copy, Debug)]
enum Raw {
    Alone,
    Senders,
    Delay(Duration),
}

impl Raw {
    fn publisher(self, clients: &Clients, topic: &str, senders: usize) -> Publisher {
        let b = clients.publisher.publisher(topic.to_owned());
        match self {
            Raw::Alone => b.set_message_count_threshold(1u32),
            Raw::Senders => b
                .set_message_count_threshold(senders as u32)
                .set_delay_threshold(Duration::from_millis(5)),
            Raw::Delay(d) => b.set_delay_threshold(d),
        }
        .build()
    }
}

/// The driver's topic options: its defaults, unless
/// `PUBSUB_BENCH_MAX_HANDLERS` sets how many send batches may be in flight.
fn topic_options() -> TopicOptions {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut batching = pubsub_core::BatchOptions::default();
    if let Some(n) = env("PUBSUB_BENCH_MAX_HANDLERS") {
        batching = batching.with_max_handlers(n as usize);
    }
    if let Some(ms) = env("PUBSUB_BENCH_LINGER_US") {
        batching = batching.with_linger(Duration::from_micros(ms));
    }
    if let Some(on) = env("PUBSUB_BENCH_REFILL") {
        batching = batching.with_refill(on != 0);
    }
    TopicOptions::default().with_batching(batching)
}
/// Messages in the receive backlog.
const BACKLOG: usize = 5_000;
const PROJECT: &str = "pubsub-rs-bench";

fn endpoint() -> Endpoint {
    match Endpoint::from_env() {
        Endpoint::Google => Endpoint::Emulator("127.0.0.1:8085".into()),
        e => e,
    }
}

fn unique(what: &str) -> String {
    format!(
        "bench-{what}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY])
}

struct Admin {
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
}

impl Admin {
    async fn topic(&self, name: &str) -> String {
        let path = format!("projects/{PROJECT}/topics/{name}");
        self.topics
            .create_topic()
            .set_name(&path)
            .send()
            .await
            .expect("create topic (is the emulator running? scripts/backends up)");
        path
    }

    async fn subscription(&self, topic: &str) -> String {
        let path = format!("projects/{PROJECT}/subscriptions/{}", unique("sub"));
        self.subscriptions
            .create_subscription()
            .set_name(&path)
            .set_topic(topic)
            .set_ack_deadline_seconds(60)
            .send()
            .await
            .unwrap();
        path
    }

    async fn delete_subscription(&self, path: &str) {
        let _ = self
            .subscriptions
            .delete_subscription()
            .set_subscription(path)
            .send()
            .await;
    }
}

async fn raw_sends(publisher: &Publisher, senders: usize, total: usize) -> f64 {
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let publisher = publisher.clone();
        tasks.spawn(async move {
            let body = body();
            for _ in 0..per {
                publisher
                    .publish(model::Message::new().set_data(body.clone()))
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

async fn driver_sends(clients: &Clients, topic: &str, senders: usize, total: usize) -> f64 {
    let topic =
        Arc::new(open_topic(clients, topic, TopicConfig::default(), topic_options()).unwrap());
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

/// With `PUBSUB_BENCH_VERBOSE` set, prints this process's CPU time a
/// message on each side of a try: the emulator shares the cores, so a side
/// that costs more CPU leaves the emulator less.
fn cpu_per_message(
    start: Option<Duration>,
    mid: Option<Duration>,
    end: Option<Duration>,
    messages: usize,
) {
    if std::env::var_os("PUBSUB_BENCH_VERBOSE").is_none() {
        return;
    }
    if let (Some(start), Some(mid), Some(end)) = (start, mid, end) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / messages as f64;
        eprintln!(
            "  client CPU a message: raw {:.2} µs, pubsub {:.2} µs",
            per(mid - start),
            per(end - mid)
        );
    }
}

fn header(first: &str) {
    ratio_header(first, "google-cloud-pubsub", TRIES);
}

async fn sends(clients: &Clients, admin: &Admin, only: &[usize]) {
    // Nobody subscribes: the emulator keeps nothing, so runs do not slow
    // each other down.
    let topic = admin.topic(&unique("send")).await;
    println!("Sends awaiting Pub/Sub's message id, {BODY}-byte bodies, one emulator");
    header("senders");
    for (senders, total) in SENDS {
        if !only.is_empty() && !only.contains(&senders) {
            continue;
        }
        // The raw side's best batching for this many senders.
        let mut best = (0.0, SETTINGS[0]);
        for setting in SETTINGS {
            let rate = raw_sends(
                &setting.publisher(clients, &topic, senders),
                senders,
                total / 5,
            )
            .await;
            if rate > best.0 {
                best = (rate, setting);
            }
        }
        let raw = best.1.publisher(clients, &topic, senders);
        let _ = driver_sends(clients, &topic, senders, total / 5).await;
        let (mut raws, mut libs) = (Vec::new(), Vec::new());
        for _ in 0..TRIES {
            let cpu = process_cpu();
            raws.push(raw_sends(&raw, senders, total).await);
            let mid = process_cpu();
            libs.push(driver_sends(clients, &topic, senders, total).await);
            cpu_per_message(cpu, mid, process_cpu(), total);
        }
        row(&format!("{senders:>3} (raw {:?})", best.1), &raws, &libs);
    }
}

/// A fresh subscription holding the backlog.
async fn loaded(clients: &Clients, admin: &Admin, topic: &str) -> String {
    let sub = admin.subscription(topic).await;
    let p = clients.publisher.publisher(topic.to_owned()).build();
    let body = body();
    let futures: Vec<_> = (0..BACKLOG)
        .map(|_| p.publish(model::Message::new().set_data(body.clone())))
        .collect();
    for f in futures {
        f.await.unwrap();
    }
    sub
}

async fn raw_receive(clients: &Clients, sub: &str) -> f64 {
    let mut stream = clients.subscriber.subscribe(sub.to_owned()).build();
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..BACKLOG {
        let (m, h) = stream.next().await.expect("the stream goes on").unwrap();
        bytes += m.data.len();
        h.ack();
    }
    stream.shutdown_token().shutdown().await;
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    assert_eq!(bytes, BACKLOG * BODY);
    rate
}

async fn driver_receive(clients: &Clients, sub: &str) -> f64 {
    let sub = open_subscription(
        clients,
        sub,
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..BACKLOG {
        let m = sub.receive().await.unwrap();
        bytes += m.body().len();
        m.ack();
    }
    sub.shutdown().await.unwrap();
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    assert_eq!(bytes, BACKLOG * BODY);
    rate
}

async fn receive(clients: &Clients, admin: &Admin) {
    let topic = admin.topic(&unique("receive")).await;
    println!(
        "\nReceive + ack of a {BACKLOG}-message backlog ({BODY}-byte bodies), a fresh subscription each run"
    );
    header("backlog");
    let sub = loaded(clients, admin, &topic).await;
    let _ = raw_receive(clients, &sub).await;
    admin.delete_subscription(&sub).await;
    let sub = loaded(clients, admin, &topic).await;
    let _ = driver_receive(clients, &sub).await;
    admin.delete_subscription(&sub).await;
    let (mut raws, mut libs) = (Vec::new(), Vec::new());
    for _ in 0..TRIES {
        let sub = loaded(clients, admin, &topic).await;
        raws.push(raw_receive(clients, &sub).await);
        admin.delete_subscription(&sub).await;
        let sub = loaded(clients, admin, &topic).await;
        libs.push(driver_receive(clients, &sub).await);
        admin.delete_subscription(&sub).await;
    }
    row(&BACKLOG.to_string(), &raws, &libs);
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
        let endpoint = endpoint();
        let clients = pubsub_driver_gcp::connect(&endpoint).await.unwrap();
        let admin = Admin {
            topics: pubsub_driver_gcp::topic_admin(&endpoint).await.unwrap(),
            subscriptions: pubsub_driver_gcp::subscription_admin(&endpoint)
                .await
                .unwrap(),
        };
        if want_sends {
            sends(&clients, &admin, &only).await;
        }
        if want_receive {
            receive(&clients, &admin).await;
        }
    });
    pubsub_conformance::bench::write_chart(
        "gcp",
        "Google Cloud Pub/Sub (emulator): pubsub against google-cloud-pubsub",
        "raw google-cloud-pubsub",
    );
}
