//! The driver against raw rdkafka doing the same work in the same run, on
//! the broker at `KAFKA_BROKERS` (default: tansu on 127.0.0.1:9092, started
//! by `scripts/backends up`):
//! - sends of 100-byte messages by 1, 10 and 100 concurrent senders, each
//!   awaiting its delivery report; the raw `FutureProducer` runs with every
//!   `linger.ms` in `LINGERS` and keeps its best, the driver with its one
//!   default;
//! - receive + ack of a backlog (500,000 messages, or `KAFKA_BENCH_BACKLOG`):
//!   the raw `StreamConsumer` stores each message's offset
//!   (`store_offset_from_message`) and lets librdkafka auto-commit, once
//!   reading each body and its headers in place as an application would,
//!   once detaching each message (an owned copy, as an application that
//!   hands messages to other tasks must) and once reading nothing; each try it runs with librdkafka's default
//!   `fetch.queue.backoff.ms` and with the driver's and keeps its best. The
//!   driver acks each message, and runs as often as the raw consumer that
//!   reads in place (twice a try, keeping the better). The sides take
//!   turns, try by try (`KAFKA_BENCH_TRIES`, default 6), so that drift in
//!   the machine's speed falls on both alike.
//!
//! `cargo bench -p pubsub-driver-kafka --bench kafka [-- sends|receive]`;
//! `-- receive driver` runs the driver side alone and `-- receive raw` the
//! raw consumer that reads (for a profiler); `KAFKA_BENCH_RT=current` runs
//! either on a current-thread runtime, everything on one thread;
//! `-- receive fill` only fills a topic and prints its name, which
//! `KAFKA_BENCH_TOPIC` then reads instead of a fresh one, so that a
//! profiler (`valgrind --tool=callgrind`) sees the reading alone.

use pubsub_conformance::bench::{chart_row, median, set_chart_section, write_chart};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubsub_core::{Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use pubsub_driver_kafka::rdkafka::client::DefaultClientContext;
use pubsub_driver_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use pubsub_driver_kafka::rdkafka::message::Headers as _;
use pubsub_driver_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use pubsub_driver_kafka::rdkafka::util::Timeout;
use pubsub_driver_kafka::rdkafka::{ClientConfig, Message as _};
use pubsub_driver_kafka::{
    open_subscription, open_topic, KafkaConfig, StartOffset, SubscriptionConfig, TopicConfig,
};

const BODY: usize = 100;
const LINGERS: [&str; 2] = ["0", "5"];
/// `fetch.queue.backoff.ms` for the raw consumer: librdkafka's default and
/// the driver's.
const QUEUE_BACKOFFS: [&str; 2] = ["1000", "20"];
/// Messages in the receive backlog: large enough that the steady fetch
/// rate, not draining librdkafka's prefetched queue, decides the figure.
/// `KAFKA_BENCH_BACKLOG` overrides it.
fn backlog() -> usize {
    std::env::var("KAFKA_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000)
}

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn unique(what: &str) -> String {
    format!("bench-{what}-{:08x}", fastrand::u32(..))
}

async fn create(name: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let t = NewTopic::new(name, 3, TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&t], &AdminOptions::new())
        .await
        .expect("a Kafka-protocol broker must be running: scripts/backends up")
    {
        r.expect("topic created");
    }
}

async fn raw_sends(topic: &str, senders: usize, total: usize, linger: &str) -> f64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", linger)
        .set("acks", "all")
        .create()
        .unwrap();
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let p = producer.clone();
        let topic = topic.to_owned();
        tasks.spawn(async move {
            let body = [b'x'; BODY];
            for _ in 0..per {
                let rec: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic).payload(&body[..]);
                p.send(rec, Timeout::Never).await.expect("delivered");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    (per * senders) as f64 / started.elapsed().as_secs_f64()
}

async fn driver_sends(settings: &KafkaConfig, topic: &str, senders: usize, total: usize) -> f64 {
    let t = Arc::new(
        open_topic(
            settings,
            topic,
            TopicConfig::default(),
            TopicOptions::default(),
        )
        .unwrap(),
    );
    // The first send checks the topic's existence once; keep it out of the
    // measurement as a long-running service would.
    t.send(Message::new(vec![b'x'; BODY])).await.unwrap();
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let t = t.clone();
        tasks.spawn(async move {
            let body = bytes::Bytes::from(vec![b'x'; BODY]);
            for _ in 0..per {
                t.send(Message::new(body.clone())).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let rate = (per * senders) as f64 / started.elapsed().as_secs_f64();
    t.shutdown().await.unwrap();
    rate
}

async fn sends() {
    let settings = KafkaConfig::new(&brokers());
    println!("\nSends, {BODY}-byte bodies, each sender awaiting its delivery report");
    set_chart_section("senders");
    println!("| senders | raw rdkafka msg/s (best linger.ms) | pubsub msg/s | ratio |");
    println!("|---:|---:|---:|---:|");
    for (senders, total) in [(1, 3_000), (10, 20_000), (100, 100_000)] {
        // A fresh topic a run, so no side pays for the broker's growing log;
        // two rounds, alternating sides, each keeping its best.
        let (mut best_raw, mut best_linger, mut lib) = (0f64, "", 0f64);
        for _ in 0..2 {
            for linger in LINGERS {
                let topic = unique("sends");
                create(&topic).await;
                let _ = raw_sends(&topic, senders, total / 10, linger).await;
                let r = raw_sends(&topic, senders, total, linger).await;
                if r > best_raw {
                    (best_raw, best_linger) = (r, linger);
                }
            }
            let topic = unique("sends");
            create(&topic).await;
            let _ = driver_sends(&settings, &topic, senders, total / 10).await;
            lib = lib.max(driver_sends(&settings, &topic, senders, total).await);
        }
        println!(
            "| {senders:>3} | {best_raw:>9.0} (linger {best_linger}) | {lib:>9.0} | {:.2} |",
            lib / best_raw
        );
        // One figure a row: the best of each side over two rounds.
        chart_row(&format!("{senders:>3}"), lib / best_raw, lib / best_raw);
    }
}

async fn fill(topic: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .unwrap();
    let body = [b'x'; BODY];
    let backlog = backlog();
    let mut pending = Vec::with_capacity(backlog);
    for _ in 0..backlog {
        let rec: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).payload(&body[..]);
        pending.push(producer.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// CPU seconds this process has used (all threads, librdkafka's too), from
/// /proc: 10 ms resolution, fine over a run of a few hundred ms.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// A receive run: messages a second, and CPU microseconds a message.
#[derive(Clone, Copy, Default)]
struct Run {
    rate: f64,
    cpu_us: f64,
}

impl Run {
    fn measure(backlog: usize, started: Instant, cpu_at_start: f64) -> Run {
        Run {
            rate: backlog as f64 / started.elapsed().as_secs_f64(),
            cpu_us: (cpu_seconds() - cpu_at_start) * 1e6 / backlog as f64,
        }
    }

    fn best(self, other: Run) -> Run {
        if other.rate > self.rate {
            other
        } else {
            self
        }
    }
}

fn consumer_config(group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000");
    c
}

/// What the raw consumer does with each message besides storing its
/// offset.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// Nothing at all.
    Nothing,
    /// Looks at the body and the headers in place, as an application that
    /// handles each message on the polling task does.
    InPlace,
    /// Detaches it (an owned copy of body, headers and key), as an
    /// application that hands messages to other tasks must.
    Detach,
}

/// Time from the first message to the last, so the group join is excluded.
async fn raw_receive(topic: &str, queue_backoff: &str, read: Read) -> Run {
    let consumer: StreamConsumer = consumer_config(&unique("raw"))
        .set("fetch.queue.backoff.ms", queue_backoff)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let backlog = backlog();
    let mut started = None;
    let mut cpu = 0.0;
    let mut seen = 0usize;
    for _ in 0..backlog {
        let m = consumer.recv().await.unwrap();
        if started.is_none() {
            cpu = cpu_seconds();
        }
        match read {
            Read::Nothing => {}
            Read::InPlace => {
                seen += m.payload().map_or(0, <[u8]>::len);
                if let Some(h) = m.headers() {
                    seen += h.iter().count();
                }
            }
            Read::Detach => {
                let owned = std::hint::black_box(m.detach());
                seen += owned.payload().map_or(0, <[u8]>::len);
            }
        }
        started.get_or_insert_with(Instant::now);
        // The cheapest store: no lookup of the topic by name.
        consumer.store_offset_from_message(&m).unwrap();
    }
    assert!(
        read == Read::Nothing || seen >= backlog,
        "the raw consumer read every body"
    );
    Run::measure(backlog, started.unwrap(), cpu)
}

async fn driver_receive(settings: &KafkaConfig, topic: &str) -> Run {
    let sub = open_subscription(
        settings,
        &unique("lib"),
        &[topic],
        SubscriptionConfig::default().with_offset(StartOffset::Oldest),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let backlog = backlog();
    let mut started = None;
    let mut cpu = 0.0;
    for _ in 0..backlog {
        let m = sub.receive().await.unwrap();
        if started.is_none() {
            cpu = cpu_seconds();
            started = Some(Instant::now());
        }
        m.ack();
    }
    let run = Run::measure(backlog, started.unwrap(), cpu);
    sub.shutdown().await.unwrap();
    run
}

/// The driver alone, without the core: batches straight from
/// `receive_batch`, acked with `send_acks`. Shows where the time goes.
async fn driver_only_receive(settings: &KafkaConfig, topic: &str) -> f64 {
    use pubsub_core::driver::Subscription as _;
    let d = pubsub_driver_kafka::KafkaSubscription::new(
        settings,
        &unique("drv"),
        &[topic],
        SubscriptionConfig::default().with_offset(StartOffset::Oldest),
    )
    .unwrap();
    let backlog = backlog();
    let mut started = None;
    let mut n = 0;
    while n < backlog {
        let batch = d.receive_batch(1000).await.unwrap();
        if batch.is_empty() {
            continue;
        }
        started.get_or_insert_with(Instant::now);
        n += batch.len();
        let ids: Vec<_> = batch.into_iter().map(|m| m.ack_id).collect();
        d.send_acks(&ids).await.unwrap();
    }
    let rate = backlog as f64 / started.unwrap().elapsed().as_secs_f64();
    d.close().await.unwrap();
    rate
}

/// The raw consumer with each `fetch.queue.backoff.ms` in turn, its
/// better run.
async fn raw_best(topic: &str, read: Read) -> Run {
    let mut best = Run::default();
    for backoff in QUEUE_BACKOFFS {
        best = best.best(raw_receive(topic, backoff, read).await);
    }
    best
}

fn tries() -> usize {
    std::env::var("KAFKA_BENCH_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

async fn receive() {
    // An existing topic of at least the backlog, for profilers that
    // should see the reading alone.
    let topic = match std::env::var("KAFKA_BENCH_TOPIC") {
        Ok(t) => t,
        Err(_) => {
            let t = unique("receive");
            create(&t).await;
            fill(&t).await;
            t
        }
    };
    if std::env::args().any(|a| a == "fill") {
        println!("filled {topic}");
        return;
    }
    let settings = KafkaConfig::new(&brokers()).set("session.timeout.ms", "6000");
    let backlog = backlog();
    if std::env::args().any(|a| a == "driver") {
        for _ in 0..tries() {
            let r = driver_receive(&settings, &topic).await;
            println!("pubsub: {:.0} msg/s, {:.2} CPU µs/msg", r.rate, r.cpu_us);
        }
        return;
    }
    if std::env::args().any(|a| a == "raw") {
        for _ in 0..tries() {
            let r = raw_receive(&topic, QUEUE_BACKOFFS[1], Read::InPlace).await;
            println!("raw: {:.0} msg/s, {:.2} CPU µs/msg", r.rate, r.cpu_us);
        }
        return;
    }
    const MODES: [(Read, &str); 3] = [
        (Read::InPlace, "reads each body and its headers in place"),
        (Read::Detach, "detaches each message (an owned copy)"),
        (Read::Nothing, "reads nothing"),
    ];
    let mut raw = [Run::default(); 3];
    let mut lib = Run::default();
    // Each try's driver rate over the raw rates of the same try, measured
    // next to it.
    let mut ratios: [Vec<f64>; 3] = Default::default();
    for _ in 0..tries() {
        // The raw consumer keeps the better of its two runs (one for each
        // `fetch.queue.backoff.ms`), so the driver runs twice too and keeps
        // its better: the best of two noisy runs beats one run by itself.
        // The two sides alternate, so drift falls on both alike.
        let mut r = [Run::default(); 3];
        let mut l = Run::default();
        for backoff in QUEUE_BACKOFFS {
            r[0] = r[0].best(raw_receive(&topic, backoff, MODES[0].0).await);
            l = l.best(driver_receive(&settings, &topic).await);
        }
        r[1] = raw_best(&topic, MODES[1].0).await;
        r[2] = raw_best(&topic, MODES[2].0).await;
        println!(
            "try: raw in place {:.0}, pubsub {:.0}, raw detaching {:.0}, raw reading nothing {:.0} msg/s",
            r[0].rate, l.rate, r[1].rate, r[2].rate
        );
        for i in 0..3 {
            ratios[i].push(l.rate / r[i].rate);
            raw[i] = raw[i].best(r[i]);
        }
        lib = lib.best(l);
    }
    println!(
        "\nReceive + ack of a {backlog}-message backlog, one consumer, new group each run, {} tries",
        tries()
    );
    println!(
        "| raw rdkafka | raw msg/s | pubsub msg/s | ratio (best/best) | ratio (median of tries) | raw CPU µs/msg | pubsub CPU µs/msg |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    set_chart_section("receive vs raw");
    for (i, (_, what)) in MODES.iter().enumerate() {
        let r = raw[i];
        let median = median(std::mem::take(&mut ratios[i]));
        println!(
            "| {what} | {:>9.0} | {:>9.0} | {:.2} | {median:.2} | {:.2} | {:.2} |",
            r.rate,
            lib.rate,
            lib.rate / r.rate,
            r.cpu_us,
            lib.cpu_us
        );
        let short = ["in place", "detaching", "reading nothing"];
        chart_row(short[i], lib.rate / r.rate, median);
    }
    if std::env::args().any(|a| a == "driver-only") {
        let d = driver_only_receive(&settings, &topic).await;
        println!("driver alone (no core): {d:.0} msg/s");
    }
}

fn main() {
    let what: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |w: &str| what.is_empty() || what.iter().any(|a| a == w);
    let rt = if std::env::var("KAFKA_BENCH_RT").is_ok_and(|v| v == "current") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    rt.block_on(async {
        if want("sends") {
            sends().await;
        }
        if want("receive") {
            receive().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    write_chart("kafka", "Kafka: pubsub against rdkafka", "raw rdkafka");
}
