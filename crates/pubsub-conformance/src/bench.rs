//! The benchmark harness: end-to-end throughput and latency of any driver,
//! and the plain-channel baseline to compare against.
//!
//! Benchmarks run as `harness = false` bench targets in release builds
//! (`cargo bench`), never as timed tests.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pubsub_core::{Message, Subscription, Topic};

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Messages delivered end to end.
    pub messages: u64,
    /// Wall time from the first send to the last receive.
    pub elapsed: Duration,
    /// Send-to-receive latencies, sorted; a sample when runs are large.
    pub latencies: Vec<Duration>,
}

impl Report {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0.5 for the median).
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i]
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>10.0} msg/s  p50 {:>8.1?}  p99 {:>8.1?}",
            self.rate(),
            self.latency(0.5),
            self.latency(0.99)
        )
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A body of `size` bytes (at least 8) that carries its send time, so the
/// receiver can measure latency without attributes.
pub fn stamped_body(size: usize) -> Bytes {
    let mut v = vec![b'x'; size.max(8)];
    let nanos = epoch().elapsed().as_nanos() as u64;
    v[..8].copy_from_slice(&nanos.to_le_bytes());
    Bytes::from(v)
}

/// The send-to-now latency of a [`stamped_body`].
pub fn latency_of(body: &[u8]) -> Option<Duration> {
    let stamp = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let now = epoch().elapsed().as_nanos() as u64;
    Some(Duration::from_nanos(now.saturating_sub(stamp)))
}

/// Keeps every `stride`-th latency so huge runs stay cheap to measure.
#[derive(Debug)]
struct Samples {
    stride: u64,
    count: AtomicU64,
    kept: std::sync::Mutex<Vec<Duration>>,
}

impl Samples {
    fn new(expected: u64) -> Self {
        Samples {
            stride: (expected / 100_000).max(1),
            count: AtomicU64::new(0),
            kept: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn record(&self, body: &[u8]) -> u64 {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n % self.stride == 0 {
            if let Some(l) = latency_of(body) {
                self.kept.lock().unwrap().push(l);
            }
        }
        n
    }

    fn into_sorted(self) -> Vec<Duration> {
        let mut v = self.kept.into_inner().unwrap();
        v.sort_unstable();
        v
    }
}

/// Sends `per_topic` messages of `size` bytes through each topic with
/// `senders` tasks per topic, and receives and acks them with `receivers`
/// tasks per subscription. Returns once every message was received.
/// Panics where [`try_end_to_end`] fails, with its error.
pub async fn end_to_end(
    pairs: &[(Topic, Subscription)],
    senders: usize,
    receivers: usize,
    per_topic: u64,
    size: usize,
) -> Report {
    let progress = Arc::default();
    let run = try_end_to_end(
        pairs,
        senders,
        receivers,
        per_topic,
        size,
        &progress,
        Duration::from_secs(120),
    );
    match run.await {
        Ok(report) => report,
        Err(e) => panic!("benchmark run failed: {e}"),
    }
}

/// [`end_to_end`] as a command line runs it: received messages are
/// counted in `progress` as they come, and instead of a panic it fails
/// with the first send or receive error, or with `DeadlineExceeded` when
/// nothing arrives for `stall` (a subscription not fed by its topic would
/// otherwise wait for ever).
pub async fn try_end_to_end(
    pairs: &[(Topic, Subscription)],
    senders: usize,
    receivers: usize,
    per_topic: u64,
    size: usize,
    progress: &Arc<AtomicU64>,
    stall: Duration,
) -> pubsub_core::Result<Report> {
    let total = per_topic * pairs.len() as u64;
    let samples = Arc::new(Samples::new(total));
    let started = Instant::now();
    let mut tasks: tokio::task::JoinSet<pubsub_core::Result<()>> = tokio::task::JoinSet::new();
    // Set once every topic's messages arrived. Receivers that still wait
    // in `receive` are then aborted (it is cancel-safe), so no timer is
    // armed around each receive.
    let done = Arc::new(tokio::sync::Notify::new());
    let topics_left = Arc::new(AtomicU64::new(pairs.len() as u64));
    for (topic, sub) in pairs {
        let received = Arc::new(AtomicU64::new(0));
        let senders = senders.max(1) as u64;
        for s in 0..senders {
            let t = topic.clone();
            let n = per_topic / senders + u64::from(s < per_topic % senders);
            tasks.spawn(async move {
                for _ in 0..n {
                    t.send(Message::new(stamped_body(size))).await?;
                }
                Ok(())
            });
        }
        for _ in 0..receivers.max(1) {
            let sub = sub.clone();
            let samples = samples.clone();
            let received = received.clone();
            let progress = progress.clone();
            let done = done.clone();
            let topics_left = topics_left.clone();
            tasks.spawn(async move {
                loop {
                    let m = sub.receive().await?;
                    samples.record(m.body());
                    progress.fetch_add(1, Ordering::Relaxed);
                    m.ack();
                    if received.fetch_add(1, Ordering::AcqRel) + 1 == per_topic {
                        if topics_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                            done.notify_one();
                        }
                        return Ok(());
                    }
                }
            });
        }
    }
    let mut finished = std::pin::pin!(done.notified());
    let mut seen = (progress.load(Ordering::Relaxed), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(stall));
    let outcome = loop {
        tokio::select! {
            _ = &mut finished => break Ok(started.elapsed()),
            Some(r) = tasks.join_next() => match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Err(e),
                Err(e) => break Err(pubsub_core::Error::internal(format!(
                    "a benchmark task failed: {e}"
                ))),
            },
            _ = tick.tick() => {
                let now = progress.load(Ordering::Relaxed);
                if now != seen.0 {
                    seen = (now, Instant::now());
                } else if seen.1.elapsed() >= stall {
                    break Err(pubsub_core::Error::new(
                        pubsub_core::ErrorKind::DeadlineExceeded,
                        format!(
                            "{now} of {total} messages arrived, then none for {stall:?}: \
                             is the subscription fed by the topic?"
                        ),
                    ));
                }
            }
        }
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let elapsed = outcome?;
    Ok(Report {
        messages: total,
        elapsed,
        latencies: Arc::try_unwrap(samples)
            .map_err(|_| pubsub_core::Error::internal("benchmark tasks outlived the run"))?
            .into_sorted(),
    })
}

/// The in-process limit: the same shape as [`end_to_end`] over plain
/// bounded `tokio::sync::mpsc` channels (one a topic, receivers sharing it),
/// with no batching, acks or redelivery.
pub async fn mpsc_baseline(
    topics: usize,
    senders: usize,
    receivers: usize,
    per_topic: u64,
    size: usize,
) -> Report {
    let total = per_topic * topics as u64;
    let samples = Arc::new(Samples::new(total));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..topics {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let received = Arc::new(AtomicU64::new(0));
        let senders = senders.max(1) as u64;
        for s in 0..senders {
            let tx = tx.clone();
            let n = per_topic / senders + u64::from(s < per_topic % senders);
            tasks.spawn(async move {
                for _ in 0..n {
                    tx.send(stamped_body(size)).await.expect("send");
                }
            });
        }
        drop(tx);
        for _ in 0..receivers.max(1) {
            let rx = rx.clone();
            let samples = samples.clone();
            let received = received.clone();
            tasks.spawn(async move {
                let mut buf = Vec::with_capacity(64);
                loop {
                    let n = rx.lock().await.recv_many(&mut buf, 64).await;
                    if n == 0 {
                        return;
                    }
                    for b in buf.drain(..) {
                        samples.record(&b);
                    }
                    received.fetch_add(n as u64, Ordering::AcqRel);
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("baseline task");
    }
    Report {
        messages: total,
        elapsed: started.elapsed(),
        latencies: Arc::try_unwrap(samples).expect("tasks done").into_sorted(),
    }
}

/// The latency of a lone send, receive and ack, one message at a time.
pub async fn round_trips(topic: &Topic, sub: &Subscription, n: usize, size: usize) -> Report {
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t0 = Instant::now();
        topic
            .send(Message::new(stamped_body(size)))
            .await
            .expect("send");
        let m = sub.receive().await.expect("receive");
        m.ack();
        latencies.push(t0.elapsed());
    }
    latencies.sort_unstable();
    Report {
        messages: n as u64,
        elapsed: started.elapsed(),
        latencies,
    }
}

/// This process's resident set size in bytes, where `/proc` tells.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints the header of a driver-against-raw-SDK table: `first` names the
/// row label's column, `raw` the raw SDK, `tries` how many tries each row
/// ran.
pub fn ratio_header(first: &str, raw: &str, tries: usize) {
    set_chart_section(first);
    println!(
        "| {first} | raw {raw} msg/s (best) | pubsub msg/s (best) | ratio of bests | median ratio of {tries} tries |"
    );
    println!("|---:|---:|---:|---:|---:|");
}

/// Prints one row of rates measured alternately, raw then driver, try by
/// try: the best of each side, the ratio of the bests and the median of the
/// per-try ratios. With `PUBSUB_BENCH_VERBOSE` set, each try as well.
pub fn ratio_row(label: &str, raws: &[f64], libs: &[f64]) {
    if std::env::var_os("PUBSUB_BENCH_VERBOSE").is_some() {
        for (i, (r, l)) in raws.iter().zip(libs).enumerate() {
            eprintln!(
                "{label} try {i}: raw {r:.0} msg/s, pubsub {l:.0} msg/s, ratio {:.2}",
                l / r
            );
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0f64, f64::max);
    let ratios = libs.iter().zip(raws).map(|(l, r)| l / r).collect();
    let (of_bests, median) = (best(libs) / best(raws), median(ratios));
    println!(
        "| {label} | {:>9.0} | {:>9.0} | {of_bests:.2} | {median:.2} |",
        best(raws),
        best(libs),
    );
    chart_row(label, of_bests, median);
}

/// A charted row: its label, the ratio of the bests, the median ratio.
type ChartRow = (String, f64, f64);

/// The section (the first column's name) new rows go under, and the rows
/// this process's benchmark has charted so far.
type Charted = (String, Vec<ChartRow>);

static CHART: Mutex<Charted> = Mutex::new((String::new(), Vec::new()));

fn chart_lock() -> std::sync::MutexGuard<'static, Charted> {
    CHART.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names the section later [`chart_row`]s belong to ("senders",
/// "backlog"); [`ratio_header`] sets it from its first column.
pub fn set_chart_section(section: &str) {
    chart_lock().0 = section.trim().to_owned();
}

/// Adds a row to the chart [`write_chart`] draws: the ratio of the bests
/// and the median of the per-try ratios. [`ratio_row`] adds its own.
pub fn chart_row(label: &str, of_bests: f64, median: f64) {
    let mut c = chart_lock();
    let label = match c.0.as_str() {
        "" => label.trim().to_owned(),
        section => format!("{section}: {}", label.trim()),
    };
    c.1.push((label, of_bests, median));
}

/// Draws the rows charted so far as `<charts dir>/<name>.svg` (see
/// [`crate::chart::charts_dir`]), reports where on standard error, and
/// starts a new chart. Nothing is written when no row was charted (a run
/// of only some of a benchmark's parts writes what they measured).
pub fn write_chart(name: &str, title: &str, baseline: &str) {
    write_chart_as(name, crate::chart::RatioChart::new(title, baseline));
}

/// [`write_chart`] into `chart` as made (one [`without_target`], say).
///
/// [`without_target`]: crate::chart::RatioChart::without_target
pub fn write_chart_as(name: &str, mut chart: crate::chart::RatioChart) {
    let rows = std::mem::take(&mut chart_lock().1);
    if rows.is_empty() {
        return;
    }
    for (label, of_bests, median) in rows {
        chart.row(label, of_bests, median);
    }
    chart.write_and_report(name);
}

/// CPU time this process has used so far, summed over its threads (from
/// Linux's `/proc/self/task/*/schedstat`, nanosecond-grained), or `None`
/// where that is not readable. Benchmarks against emulators that share the
/// machine's cores read it to tell the client's cost from the emulator's.
pub fn process_cpu() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        // A thread that ended between listing and reading is skipped.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}
