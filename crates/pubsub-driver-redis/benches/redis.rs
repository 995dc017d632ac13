//! The driver against raw `redis` doing the same work in the same run, on
//! the server at `REDIS_URL` (default `redis://127.0.0.1:6379`):
//! - sends of 100-byte attribute-free bodies by 1, 10 and 100 concurrent
//!   senders, each awaiting its own send: raw `XADD stream NOMKSTREAM *
//!   $id <hex> $body <bytes>` (the entry the driver writes) on one shared
//!   `ConnectionManager`, against `Topic::send`;
//! - receive + ack of a pre-loaded backlog through a fresh consumer group
//!   each run: raw `XREADGROUP GROUP g c COUNT 256 BLOCK 500 STREAMS s >`
//!   in a loop with one `XACK` of each batch read, against
//!   `Subscription::receive` and `ack` of each, then `shutdown` (which
//!   sends the acks still queued). Both are timed until every ack is in.
//!
//! Each side has connections of its own, made as the driver makes its
//! (10 s response timeout). Each row warms both sides once, then runs
//! [`TRIES`] tries of raw then driver; it prints the best rate of each, the
//! ratio of the bests and the median of the per-try ratios.
//!
//! `cargo bench -p pubsub-driver-redis --bench redis` runs everything;
//! `-- 10` only the sends by that many senders (several numbers may be
//! given), `-- sends` every send row, `-- receive` the receive row.
//! `PUBSUB_BENCH_VERBOSE=1` also prints each try to stderr with the CPU
//! time and context switches a message of this process (the client side);
//! `PUBSUB_BENCH_MAX_HANDLERS=N` runs the driver's topic with `N` send
//! batches in flight instead of its default, to try a setting without
//! editing the driver.
//!
//! The streams are named `bench-redis-...` uniquely to the run, expire
//! within the hour, and are deleted at the end (also when a run panics).
//! Nothing else on the server is touched.

use pubsub_conformance::bench::{chart_row, median, set_chart_section, write_chart};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pubsub_core::{BatchOptions, Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_redis::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use pubsub_driver_redis::redis::streams::{StreamPendingReply, StreamReadReply};
use pubsub_driver_redis::redis::{self, Value};
use pubsub_driver_redis::{
    open_subscription, open_topic, Connector, SubscriptionConfig, TopicConfig,
};

const BODY: usize = 100;
/// Alternating tries of each side a row.
const TRIES: usize = 5;
/// Concurrent senders and the messages a measured run sends.
const SENDS: [(usize, usize); 3] = [(1, 20_000), (10, 100_000), (100, 200_000)];
/// Messages in the receive backlog.
const BACKLOG: usize = 100_000;
/// Entries a read asks for, the driver's default too.
const READ_BATCH: usize = 256;
/// Seconds before the streams expire should the bench die before deleting
/// them.
const EXPIRE_SECS: u64 = 3600;

fn server() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique(what: &str) -> String {
    format!(
        "bench-redis-{what}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// A random 128-bit id in hex, as the driver makes from a message's unique
/// id.
fn msg_id() -> String {
    format!("{:032x}", fastrand::u128(..))
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

/// A connection manager configured as the driver's shared one.
async fn manager(client: &redis::Client) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    let mut conn = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .expect("Redis must be running: scripts/backends up");
    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    conn
}

/// An empty stream that expires within the hour.
async fn create_stream(conn: &mut ConnectionManager, name: &str) {
    redis::pipe()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(name)
        .arg("bench-probe")
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("XGROUP")
        .arg("DESTROY")
        .arg(name)
        .arg("bench-probe")
        .ignore()
        .cmd("EXPIRE")
        .arg(name)
        .arg(EXPIRE_SECS)
        .ignore()
        .query_async::<()>(conn)
        .await
        .unwrap();
}

/// The `XADD` the driver sends for an attribute-free message.
fn xadd(stream: &str, body: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("NOMKSTREAM")
        .arg("*")
        .arg("$id")
        .arg(msg_id())
        .arg("$body")
        .arg(body);
    cmd
}

async fn raw_sends(conn: &ConnectionManager, stream: &str, senders: usize, total: usize) -> Run {
    let per = total / senders;
    let stream: Arc<str> = stream.into();
    let clock = Clock::start();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        tasks.spawn(async move {
            let body = vec![b'x'; BODY];
            for _ in 0..per {
                let id: Option<String> = xadd(&stream, &body).query_async(&mut conn).await.unwrap();
                assert!(id.is_some(), "the stream exists");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    clock.stop(per * senders)
}

async fn driver_sends(connector: &Connector, stream: &str, senders: usize, total: usize) -> Run {
    let topic =
        Arc::new(open_topic(connector, stream, TopicConfig::default(), topic_options()).unwrap());
    let per = total / senders;
    let clock = Clock::start();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let topic = topic.clone();
        tasks.spawn(async move {
            let body = Bytes::from(vec![b'x'; BODY]);
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

/// Empties the stream (keeping it and its expiry), having checked that it
/// holds what was sent.
async fn check_and_trim(conn: &mut ConnectionManager, stream: &str, sent: usize) {
    let len: usize = redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(len, sent, "{stream} holds every message sent");
    let _: usize = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MAXLEN")
        .arg(0)
        .query_async(conn)
        .await
        .unwrap();
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
        "| {first} | raw redis msg/s (best) | pubsub msg/s (best) | ratio of bests | median ratio of {TRIES} tries |"
    );
    println!("|---:|---:|---:|---:|---:|");
}

async fn sends(raw: &ConnectionManager, connector: &Connector, stream: &str, only: &[usize]) {
    println!(
        "Sends awaiting each XADD, {BODY}-byte bodies with a $id, one shared connection a side"
    );
    header("senders");
    let mut admin = raw.clone();
    for (senders, total) in SENDS {
        if !only.is_empty() && !only.contains(&senders) {
            continue;
        }
        // Warm both paths, then alternate, so drift in the server hits
        // both alike; each try is one run of each.
        let _ = raw_sends(raw, stream, senders, total / 10).await;
        let _ = driver_sends(connector, stream, senders, total / 10).await;
        check_and_trim(&mut admin, stream, 2 * (total / 10 / senders * senders)).await;
        let (mut raws, mut libs) = (Vec::new(), Vec::new());
        let sent = total / senders * senders;
        for _ in 0..TRIES {
            raws.push(raw_sends(raw, stream, senders, total).await);
            check_and_trim(&mut admin, stream, sent).await;
            libs.push(driver_sends(connector, stream, senders, total).await);
            check_and_trim(&mut admin, stream, sent).await;
        }
        row(&format!("{senders:>3}"), &raws, &libs);
    }
}

/// Fills the stream with the backlog, a thousand adds a pipeline.
async fn preload(conn: &mut ConnectionManager, stream: &str) {
    let body = vec![b'x'; BODY];
    let mut left = BACKLOG;
    while left > 0 {
        let n = left.min(1000);
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.add_command(xadd(stream, &body)).ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
        left -= n;
    }
    let len: usize = redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(len, BACKLOG);
}

/// A fresh group reading the stream from its start.
async fn create_group(conn: &mut ConnectionManager, stream: &str) -> String {
    let group = format!("g-{:08x}", fastrand::u32(..));
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(&group)
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
    group
}

/// Checks that the group read the whole stream and holds nothing unacked,
/// then destroys it.
async fn check_and_destroy_group(conn: &mut ConnectionManager, stream: &str, group: &str) {
    let pending: StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "group {group} acked everything");
    let groups: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    let info = groups
        .iter()
        .find(|g| matches!(g.get("name"), Some(Value::BulkString(n)) if n == group.as_bytes()))
        .expect("the group exists");
    assert_eq!(
        info.get("entries-read"),
        Some(&Value::Int(BACKLOG as i64)),
        "group {group} read every entry"
    );
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
}

async fn raw_receive(conn: &ConnectionManager, stream: &str, group: &str) -> Run {
    let mut conn = conn.clone();
    let clock = Clock::start();
    let (mut received, mut acked, mut bytes) = (0, 0, 0);
    while received < BACKLOG {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some(reply) = reply else { continue };
        let mut ids = Vec::with_capacity(READ_BATCH);
        for key in reply.keys {
            for entry in key.ids {
                if let Some(Value::BulkString(b)) = entry.map.get("$body") {
                    bytes += b.len();
                }
                ids.push(entry.id);
            }
        }
        if ids.is_empty() {
            continue;
        }
        received += ids.len();
        let n: usize = redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
        acked += n;
    }
    let run = clock.stop(BACKLOG);
    assert_eq!((received, acked, bytes), (BACKLOG, BACKLOG, BACKLOG * BODY));
    run
}

async fn driver_receive(connector: &Connector, stream: &str, group: &str) -> Run {
    let sub = open_subscription(
        connector,
        stream,
        group,
        SubscriptionConfig::default().with_batch(READ_BATCH),
        SubscriptionOptions::default(),
    )
    .unwrap();
    let clock = Clock::start();
    let mut bytes = 0;
    for _ in 0..BACKLOG {
        let m = sub.receive().await.unwrap();
        bytes += m.body().len();
        m.ack();
    }
    // Sends the acks still queued, as the raw side awaits its last XACK.
    sub.shutdown().await.unwrap();
    let run = clock.stop(BACKLOG);
    assert_eq!(bytes, BACKLOG * BODY);
    run
}

async fn receive(raw: &ConnectionManager, connector: &Connector, stream: &str) {
    let mut admin = raw.clone();
    preload(&mut admin, stream).await;
    println!(
        "\nReceive + ack of a {BACKLOG}-entry backlog ({BODY}-byte bodies), a fresh group each run, reads of {READ_BATCH}"
    );
    header("backlog");
    // Each run reads through a group of its own, made before the clock
    // starts and checked and destroyed after it stops.
    let raw_run = || {
        let mut admin = raw.clone();
        async move {
            let group = create_group(&mut admin, stream).await;
            let r = raw_receive(raw, stream, &group).await;
            check_and_destroy_group(&mut admin, stream, &group).await;
            r
        }
    };
    let lib_run = || {
        let mut admin = raw.clone();
        async move {
            let group = create_group(&mut admin, stream).await;
            let r = driver_receive(connector, stream, &group).await;
            check_and_destroy_group(&mut admin, stream, &group).await;
            r
        }
    };
    let _ = raw_run().await;
    let _ = lib_run().await;
    let (mut raws, mut libs) = (Vec::new(), Vec::new());
    for _ in 0..TRIES {
        raws.push(raw_run().await);
        libs.push(lib_run().await);
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
        let client = redis::Client::open(server()).expect("a valid REDIS_URL");
        let raw = manager(&client).await;
        let connector = Connector::new(&server()).unwrap();
        let send_stream = unique("send");
        let receive_stream = unique("receive");
        let mut admin = raw.clone();
        let mut created = Vec::new();
        if want_sends {
            create_stream(&mut admin, &send_stream).await;
            created.push(send_stream.clone());
        }
        if want_receive {
            create_stream(&mut admin, &receive_stream).await;
            created.push(receive_stream.clone());
        }
        // In a task of its own, so that the streams are deleted even when
        // a run panics.
        let work = {
            let (raw, connector) = (raw.clone(), connector.clone());
            tokio::spawn(async move {
                if want_sends {
                    sends(&raw, &connector, &send_stream, &only).await;
                }
                if want_receive {
                    receive(&raw, &connector, &receive_stream).await;
                }
            })
        };
        let outcome = work.await;
        for name in &created {
            let deleted: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(name).query_async(&mut admin).await;
            if let Err(e) = deleted {
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
        "redis",
        "Redis Streams: pubsub against redis-rs",
        "raw redis-rs",
    );
}
