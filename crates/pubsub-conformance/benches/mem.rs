//! End-to-end benchmark of the in-memory driver against a plain
//! `tokio::sync::mpsc` pipeline of the same shape.
//!
//! `cargo bench -p pubsub-conformance --bench mem [-- backlog|latency|matrix]`;
//! `-- row TOPICS SENDERS RECEIVERS` runs one row of the matrix (for a
//! profiler). With `PUBSUB_BENCH_RECORDER=1` a metrics recorder
//! (metrics-util's in-memory one) is installed first, to measure what
//! recording costs; with `PUBSUB_BENCH_TRACER=R` a `tracing-opentelemetry`
//! layer over an OpenTelemetry SDK tracer that samples a ratio R of traces
//! (1: every one) and exports none, to measure what tracing costs (each
//! send a producer span and a `traceparent`, each delivery a consumer
//! span); `PUBSUB_BENCH_TRACER_LAYER=lean` sets that layer up lean (the
//! core's spans only, without the layer's per-span extras).

use std::time::{Duration, Instant};

use bytes::Bytes;
use pubsub_conformance::bench::{
    chart_row, end_to_end, mpsc_baseline, resident_bytes, round_trips, write_chart_as, Report,
};
use pubsub_conformance::chart::RatioChart;
use pubsub_core::mem::Broker;
use pubsub_core::{Message, Subscription, Topic};

const BODY: usize = 100;

fn pairs(broker: &Broker, topics: usize, tag: &str) -> Vec<(Topic, Subscription)> {
    (0..topics)
        .map(|i| {
            let t = format!("{tag}-t{i}");
            let s = format!("{tag}-s{i}");
            broker.create_topic(&t).unwrap();
            broker
                .create_subscription(&s, &t, Duration::from_secs(60))
                .unwrap();
            (broker.topic(&t), broker.subscription(&s))
        })
        .collect()
}

async fn shutdown(pairs: Vec<(Topic, Subscription)>) {
    for (t, s) in pairs {
        t.shutdown().await.unwrap();
        s.shutdown().await.unwrap();
    }
}

fn row(topics: usize, senders: usize, receivers: usize, lib: &Report, raw: &Report) {
    let ratio = lib.rate() / raw.rate();
    // One run a row: its ratio is both figures.
    chart_row(
        &format!("{topics} topic(s), {senders} sender(s), {receivers} receiver(s)"),
        ratio,
        ratio,
    );
    println!(
        "| {topics:>3} | {senders:>3} | {receivers:>3} | {:>9.0} | {:>8.1?} | {:>9.0} | {:>8.1?} | {:>5.2} |",
        lib.rate(),
        lib.latency(0.5),
        raw.rate(),
        raw.latency(0.5),
        lib.rate() / raw.rate()
    );
}

async fn one(topics: usize, senders: usize, receivers: usize, total: u64) {
    let per_topic = (total / topics as u64).max(1);
    let broker = Broker::new();
    let tag = format!("m{topics}-{senders}-{receivers}");
    let p = pairs(&broker, topics, &tag);
    // Warm up the batch sizing and the allocator, as a running service is.
    let _ = end_to_end(&p, senders, receivers, per_topic / 10 + 1, BODY).await;
    let lib = end_to_end(&p, senders, receivers, per_topic, BODY).await;
    shutdown(p).await;
    let raw = mpsc_baseline(topics, senders, receivers, per_topic, BODY).await;
    row(topics, senders, receivers, &lib, &raw);
}

async fn matrix() {
    println!(
        "\nEnd to end: send + receive + ack, {BODY}-byte bodies, senders and receivers per topic"
    );
    println!("| topics | senders | receivers | pubsub msg/s | p50 | mpsc msg/s | p50 | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for topics in [1, 10, 100] {
        for conc in [1, 10, 100] {
            let total = if conc == 1 && topics == 1 {
                200_000
            } else {
                1_000_000
            };
            one(topics, conc, conc, total).await;
        }
    }
    one(1, 100, 10, 2_000_000).await;
    write_chart_as(
        "mem",
        RatioChart::new(
            "In-memory driver end to end: pubsub against a bare tokio mpsc pipeline",
            "tokio mpsc",
        )
        .without_target(),
    );
}

async fn latency() {
    let broker = Broker::new();
    let p = pairs(&broker, 1, "lat");
    let (t, s) = &p[0];
    let _ = round_trips(t, s, 1000, BODY).await;
    let r = round_trips(t, s, 20_000, BODY).await;
    println!(
        "\nLone round trip (send, receive, ack), {BODY}-byte body: p50 {:?}, p90 {:?}, p99 {:?}",
        r.latency(0.5),
        r.latency(0.9),
        r.latency(0.99)
    );
    shutdown(p).await;
}

async fn backlog() {
    let n = 1_000_000u64;
    let before = resident_bytes().unwrap_or(0);
    let broker = Broker::new();
    let p = pairs(&broker, 1, "backlog");
    let (t, _s) = &p[0];
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..100u64 {
        let t = t.clone();
        tasks.spawn(async move {
            let mut i = w;
            while i < n {
                // A distinct allocation per body, as real messages have.
                let mut body = vec![b'x'; BODY];
                body[..8].copy_from_slice(&i.to_le_bytes());
                t.send(Message::new(Bytes::from(body))).await.unwrap();
                i += 100;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let after = resident_bytes().unwrap_or(0);
    assert_eq!(broker.backlog("backlog-s0").unwrap() as u64, n);
    println!(
        "\nBacklog: {n} unacked {BODY}-byte messages in one subscription, sent in {:.2?}: \
         resident {:.0} MB (process), {:.0} MB more than before",
        started.elapsed(),
        after as f64 / 1e6,
        after.saturating_sub(before) as f64 / 1e6
    );
    // The same backlog drained by one receiver that acks each message:
    // the core's own cost a message, receive side, with a driver that
    // answers from memory.
    let s = &p[0].1;
    let started = Instant::now();
    for _ in 0..n {
        s.receive().await.unwrap().ack();
    }
    let took = started.elapsed();
    println!(
        "- Drained by one receiver, acking each: {:.0} msg/s, {:.0} ns a message",
        n as f64 / took.as_secs_f64(),
        took.as_nanos() as f64 / n as f64
    );
    shutdown(p).await;
}

fn main() {
    if std::env::var_os("PUBSUB_BENCH_RECORDER").is_some_and(|v| v == "1") {
        metrics_util::debugging::DebuggingRecorder::new()
            .install()
            .expect("no recorder was installed before");
        eprintln!("metrics recorder installed");
    }
    let sampled = std::env::var("PUBSUB_BENCH_TRACER")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|r| *r > 0.0);
    if let Some(ratio) = sampled {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::Sampler;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let sampler = if ratio >= 1.0 {
            Sampler::AlwaysOn
        } else {
            Sampler::TraceIdRatioBased(ratio)
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_sampler(sampler)
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("bench"));
        // `lean`: only the core's producer and consumer spans, without the
        // layer's extras (thread, source location, target and busy/idle
        // time, each paid a span); otherwise the layer as it comes.
        let lean = std::env::var("PUBSUB_BENCH_TRACER_LAYER").is_ok_and(|v| v == "lean");
        let layer = if lean {
            use tracing_subscriber::Layer as _;
            layer
                .with_threads(false)
                .with_location(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(tracing_subscriber::filter::Targets::new().with_target(
                    "pubsub_core::trace",
                    tracing_subscriber::filter::LevelFilter::INFO,
                ))
                .boxed()
        } else {
            tracing_subscriber::Layer::boxed(layer)
        };
        tracing_subscriber::registry()
            .with(layer)
            .try_init()
            .expect("no subscriber was installed before");
        eprintln!(
            "tracing-opentelemetry layer installed ({}), sampling {ratio}",
            if lean { "lean" } else { "as it comes" }
        );
    }
    let what: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if what.first().is_some_and(|w| w == "row") {
        let n: Vec<usize> = what[1..].iter().filter_map(|a| a.parse().ok()).collect();
        let [topics, senders, receivers] = n[..] else {
            panic!("usage: mem row TOPICS SENDERS RECEIVERS");
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(one(topics, senders, receivers, 2_000_000));
        return;
    }
    let all = what.is_empty();
    let want = |w: &str| all || what.iter().any(|a| a == w);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Measured first, so no earlier run's freed memory is counted.
        if want("backlog") {
            backlog().await;
        }
        if want("latency") {
            latency().await;
        }
        if want("matrix") {
            matrix().await;
        }
    });
}
