//! The driver against raw `async-nats` JetStream doing the same work in the
//! same run, on the server at `NATS_SERVER_URL` (default
//! `nats://127.0.0.1:4222`, JetStream enabled):
//! - sends of 100-byte attribute-free bodies by 1, 10 and 100 concurrent
//!   senders, each awaiting its own send: raw `Context::send_publish` with
//!   a random 128-bit hex `Nats-Msg-Id` (as the driver sets) and then the
//!   ack, against `Topic::send`;
//! - receive + ack of a pre-loaded backlog through a fresh durable pull
//!   consumer each run: raw `consumer.stream().max_messages_per_batch(256)`
//!   and `ack()` of each message, then a flush, against
//!   `Subscription::receive` and `ack` of each, then `shutdown` (which
//!   flushes the acks). Both are timed until every ack is written out.
//!
//! Each side has a connection of its own. Each row warms both sides once,
//! then runs [`TRIES`] tries of raw then driver; it prints the best rate of
//! each, the ratio of the bests and the median of the per-try ratios.
//!
//! `cargo bench -p pubsub-driver-nats --bench nats` runs everything;
//! `-- 10` only the sends by that many senders (several numbers may be
//! given), `-- sends` every send row, `-- receive` the receive row.
//! `PUBSUB_BENCH_VERBOSE=1` also prints each try to stderr with the CPU
//! time and context switches a message of this process (the client side);
//! `PUBSUB_BENCH_MAX_HANDLERS=N` runs the driver's topic with `N` send
//! batches in flight instead of its default, to try a setting without
//! editing the driver.
//!
//! The streams are in memory, named `bench-nats-...` uniquely to the run,
//! expire their messages within the hour, and are deleted at the end (also
//! when a run panics). Nothing else on the server is touched.

use pubsub_conformance::bench::{chart_row, median, set_chart_section, write_chart};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use pubsub_core::{BatchOptions, Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_nats::async_nats::header::NATS_MESSAGE_ID;
use pubsub_driver_nats::async_nats::jetstream::consumer::{pull, DeliverPolicy, PullConsumer};
use pubsub_driver_nats::async_nats::jetstream::context::PublishAckFuture;
use pubsub_driver_nats::async_nats::jetstream::message::PublishMessage;
use pubsub_driver_nats::async_nats::jetstream::{self, stream};
use pubsub_driver_nats::async_nats::{HeaderMap, Subject};
use pubsub_driver_nats::{open_subscription, open_topic, SubscriptionConfig};

const BODY: usize = 100;
/// Alternating tries of each side a row.
const TRIES: usize = 5;
/// Concurrent senders and the messages a measured run sends.
const SENDS: [(usize, usize); 3] = [(1, 8_000), (10, 40_000), (100, 100_000)];
/// Messages in the receive backlog.
const BACKLOG: usize = 50_000;
/// Messages a pull asks for, the driver's default too.
const PULL_BATCH: usize = 256;

fn server() -> String {
    std::env::var("NATS_SERVER_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn unique(what: &str) -> String {
    format!(
        "bench-nats-{what}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// A random 128-bit id in hex, as the driver makes from a message's unique
/// id.
fn msg_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY])
}

/// CPU seconds this process has used, all threads, from /proc (10 ms
/// resolution; 0 where there is no /proc).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // utime and stime are the 14th and 15th fields of the line, the 12th
    // and 13th after the parenthesised command name.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Context switches of this process's threads so far (voluntary ones
/// mostly: a worker thread parking for want of work), from /proc.
fn context_switches() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut n = 0.0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    n
}

/// One measured run: messages a second, and the CPU time and context
/// switches a message this process (the client side) spent.
#[derive(Clone, Copy)]
struct Run {
    rate: f64,
    cpu_us: f64,
    switches: f64,
}

/// Where a measured run started.
struct Clock {
    started: Instant,
    cpu: f64,
    switches: f64,
}

impl Clock {
    fn start() -> Self {
        Clock {
            started: Instant::now(),
            cpu: cpu_seconds(),
            switches: context_switches(),
        }
    }

    fn stop(&self, messages: usize) -> Run {
        let n = messages as f64;
        Run {
            rate: n / self.started.elapsed().as_secs_f64(),
            cpu_us: (cpu_seconds() - self.cpu) * 1e6 / n,
            switches: (context_switches() - self.switches) / n,
        }
    }
}

/// The driver's topic options: its defaults, unless
/// `PUBSUB_BENCH_MAX_HANDLERS` sets how many send batches may be in flight
/// (to try another setting without editing the driver).
fn topic_options() -> TopicOptions {
    let handlers = std::env::var("PUBSUB_BENCH_MAX_HANDLERS").ok();
    match handlers.and_then(|v| v.parse().ok()) {
        Some(n) => {
            TopicOptions::default().with_batching(BatchOptions::default().with_max_handlers(n))
        }
        None => TopicOptions::default(),
    }
}

async fn connect() -> jetstream::Context {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        pubsub_driver_nats::connect(&server()),
    )
    .await
    .expect("connecting to NATS timed out")
    .expect("NATS with JetStream must be running: scripts/backends up");
    jetstream::new(client)
}

/// A stream capturing the one subject `name`, in memory, expiring its
/// messages after an hour should the bench die before deleting it.
async fn create_stream(js: &jetstream::Context, name: &str) {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![name.to_owned()],
        storage: stream::StorageType::Memory,
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .expect("creating a JetStream stream (is JetStream enabled?)");
}

/// One publish as the driver makes it: the body and a `Nats-Msg-Id`.
async fn publish(js: &jetstream::Context, subject: &Subject, body: &Bytes) -> PublishAckFuture {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, msg_id().as_str());
    let m = PublishMessage::build()
        .payload(body.clone())
        .headers(headers);
    js.send_publish(subject.clone(), m).await.unwrap()
}

async fn raw_sends(js: &jetstream::Context, subject: &str, senders: usize, total: usize) -> Run {
    let per = total / senders;
    let subject = Subject::from(subject);
    let clock = Clock::start();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (js, subject) = (js.clone(), subject.clone());
        tasks.spawn(async move {
            let body = body();
            for _ in 0..per {
                publish(&js, &subject, &body).await.await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    clock.stop(per * senders)
}

async fn driver_sends(js: &jetstream::Context, subject: &str, senders: usize, total: usize) -> Run {
    let topic = Arc::new(open_topic(js, subject, topic_options()).unwrap());
    let per = total / senders;
    let clock = Clock::start();
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
    let run = clock.stop(per * senders);
    topic.shutdown().await.unwrap();
    run
}

/// Empties the stream, having checked that it holds what was sent.
async fn check_and_purge(js: &jetstream::Context, name: &str, sent: usize) {
    let stream = js.get_stream(name).await.unwrap();
    assert_eq!(
        stream.cached_info().state.messages,
        sent as u64,
        "{name} holds every message sent, once"
    );
    stream.purge().await.unwrap();
}

fn best(v: &[Run]) -> f64 {
    v.iter().map(|r| r.rate).fold(0f64, f64::max)
}

/// A table row from the rates of both sides, try by try. With
/// `PUBSUB_BENCH_VERBOSE` set, each try's rates go to stderr too.
fn row(label: &str, raws: &[Run], libs: &[Run]) {
    if std::env::var_os("PUBSUB_BENCH_VERBOSE").is_some() {
        for (i, (r, l)) in raws.iter().zip(libs).enumerate() {
            eprintln!(
                "{label} try {i}: raw {:.0} msg/s {:.1} cpu-us/msg {:.2} cs/msg, \
                 pubsub {:.0} msg/s {:.1} cpu-us/msg {:.2} cs/msg, ratio {:.2}",
                r.rate,
                r.cpu_us,
                r.switches,
                l.rate,
                l.cpu_us,
                l.switches,
                l.rate / r.rate
            );
        }
    }
    let ratios = libs
        .iter()
        .zip(raws)
        .map(|(l, r)| l.rate / r.rate)
        .collect();
    let (of_bests, median) = (best(libs) / best(raws), median(ratios));
    println!(
        "| {label} | {:>9.0} | {:>9.0} | {of_bests:.2} | {median:.2} |",
        best(raws),
        best(libs),
    );
    chart_row(label, of_bests, median);
}

fn header(first: &str) {
    set_chart_section(first);
    println!(
        "| {first} | raw async-nats msg/s (best) | pubsub msg/s (best) | ratio of bests | median ratio of {TRIES} tries |"
    );
    println!("|---:|---:|---:|---:|---:|");
}

async fn sends(
    raw_js: &jetstream::Context,
    lib_js: &jetstream::Context,
    name: &str,
    only: &[usize],
) {
    println!(
        "Sends awaiting JetStream's ack, {BODY}-byte bodies with a Nats-Msg-Id, memory stream, one connection a side"
    );
    header("senders");
    for (senders, total) in SENDS {
        if !only.is_empty() && !only.contains(&senders) {
            continue;
        }
        // Warm both paths, then alternate, so drift in the server hits
        // both alike; each try is one run of each.
        let _ = raw_sends(raw_js, name, senders, total / 10).await;
        let _ = driver_sends(lib_js, name, senders, total / 10).await;
        check_and_purge(raw_js, name, 2 * (total / 10 / senders * senders)).await;
        let (mut raws, mut libs) = (Vec::new(), Vec::new());
        let sent = total / senders * senders;
        for _ in 0..TRIES {
            raws.push(raw_sends(raw_js, name, senders, total).await);
            check_and_purge(raw_js, name, sent).await;
            libs.push(driver_sends(lib_js, name, senders, total).await);
            check_and_purge(raw_js, name, sent).await;
        }
        row(&format!("{senders:>3}"), &raws, &libs);
    }
}

/// Fills the stream with the backlog, publishes pipelined a thousand at a
/// time.
async fn preload(js: &jetstream::Context, name: &str) {
    let subject = Subject::from(name);
    let body = body();
    let mut left = BACKLOG;
    while left > 0 {
        let n = left.min(1000);
        let mut acks = Vec::with_capacity(n);
        for _ in 0..n {
            acks.push(publish(js, &subject, &body).await.into_future());
        }
        for ack in futures_util::future::join_all(acks).await {
            ack.unwrap();
        }
        left -= n;
    }
    let stream = js.get_stream(name).await.unwrap();
    assert_eq!(stream.cached_info().state.messages, BACKLOG as u64);
}

/// A fresh durable pull consumer of the whole stream.
async fn create_consumer(js: &jetstream::Context, stream: &str) -> String {
    let name = format!("c-{:08x}", fastrand::u32(..));
    js.get_stream(stream)
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: BACKLOG as i64,
            ..Default::default()
        })
        .await
        .unwrap();
    name
}

/// Checks that the consumer delivered and had acked every message (acks
/// are plain messages the server takes in its own time), then deletes it.
async fn check_and_delete_consumer(js: &jetstream::Context, stream: &str, name: &str) {
    let stream = js.get_stream(stream).await.unwrap();
    let mut consumer: PullConsumer = stream.get_consumer(name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            assert_eq!(info.ack_floor.stream_sequence, BACKLOG as u64);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer {name}: {} unacked, {} undelivered",
            info.num_ack_pending,
            info.num_pending
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream.delete_consumer(name).await.unwrap();
}

async fn raw_receive(js: &jetstream::Context, stream: &str, name: &str) -> Run {
    let consumer: PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer(name)
        .await
        .unwrap();
    let clock = Clock::start();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH)
        .messages()
        .await
        .unwrap();
    let mut bytes = 0;
    for _ in 0..BACKLOG {
        let m = messages.next().await.expect("the pull goes on").unwrap();
        bytes += m.payload.len();
        m.ack().await.unwrap();
    }
    js.client().flush().await.unwrap();
    let run = clock.stop(BACKLOG);
    drop(messages);
    assert_eq!(bytes, BACKLOG * BODY);
    run
}

async fn driver_receive(js: &jetstream::Context, stream: &str, name: &str) -> Run {
    let sub = open_subscription(
        js,
        stream,
        name,
        SubscriptionConfig::default().with_batch(PULL_BATCH),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let clock = Clock::start();
    let mut bytes = 0;
    for _ in 0..BACKLOG {
        let m = sub.receive().await.unwrap();
        bytes += m.body().len();
        m.ack();
    }
    // Writes out the acks still queued, as the raw side's flush does.
    sub.shutdown().await.unwrap();
    let run = clock.stop(BACKLOG);
    assert_eq!(bytes, BACKLOG * BODY);
    run
}

async fn receive(raw_js: &jetstream::Context, lib_js: &jetstream::Context, name: &str) {
    preload(raw_js, name).await;
    println!(
        "\nReceive + ack of a {BACKLOG}-message backlog ({BODY}-byte bodies), a fresh durable pull consumer each run, pulls of {PULL_BATCH}"
    );
    header("backlog");
    let raw = |c: String| async move {
        let r = raw_receive(raw_js, name, &c).await;
        check_and_delete_consumer(raw_js, name, &c).await;
        r
    };
    let lib = |c: String| async move {
        let r = driver_receive(lib_js, name, &c).await;
        check_and_delete_consumer(raw_js, name, &c).await;
        r
    };
    let _ = raw(create_consumer(raw_js, name).await).await;
    let _ = lib(create_consumer(raw_js, name).await).await;
    let (mut raws, mut libs) = (Vec::new(), Vec::new());
    for _ in 0..TRIES {
        raws.push(raw(create_consumer(raw_js, name).await).await);
        libs.push(lib(create_consumer(raw_js, name).await).await);
    }
    row(&BACKLOG.to_string(), &raws, &libs);
}

fn main() {
    // `cargo bench` passes `--bench`; the rest are filters.
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
        let raw_js = connect().await;
        let lib_js = connect().await;
        let send_stream = unique("send");
        let receive_stream = unique("receive");
        let mut created = Vec::new();
        if want_sends {
            create_stream(&raw_js, &send_stream).await;
            created.push(send_stream.clone());
        }
        if want_receive {
            create_stream(&raw_js, &receive_stream).await;
            created.push(receive_stream.clone());
        }
        // In a task of its own, so that the streams are deleted even when
        // a run panics.
        let work = {
            let (raw_js, lib_js) = (raw_js.clone(), lib_js.clone());
            tokio::spawn(async move {
                if want_sends {
                    sends(&raw_js, &lib_js, &send_stream, &only).await;
                }
                if want_receive {
                    receive(&raw_js, &lib_js, &receive_stream).await;
                }
            })
        };
        let outcome = work.await;
        for name in &created {
            if let Err(e) = raw_js.delete_stream(name).await {
                eprintln!("could not delete stream {name}: {e}");
            }
        }
        if let Err(e) = outcome {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            panic!("{e}");
        }
    });
    write_chart(
        "nats",
        "NATS JetStream: pubsub against async-nats",
        "raw async-nats",
    );
}
