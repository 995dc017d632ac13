//! `pubsub`: send, receive and benchmark any backend by URL.
//!
//! ```text
//! pubsub send URL [--attr k=v]... [--ordering-key K] [--timeout T] [BODY | -]
//! pubsub send URL --lines | --json-lines   (a message a line of stdin)
//! pubsub receive URL [--count N] [--idle T] [--timeout T] [--nack] [--json]
//! pubsub bench --topic URL (--subscription URL | --sends-only) [--messages N]
//!              [--size B] [--senders S] [--receivers R] [--stall T] [--json]
//! pubsub schemes
//! ```
//!
//! Drivers are compiled in through cargo features; `mem://` is always there
//! (useful for `bench`, whose topic and subscription live in one process).
//! Durations (`T`) are seconds (`1.5`) or a number with a unit (`500ms`,
//! `1m30s`).
//!
//! `receive` stops taking messages at the first Ctrl-C, sends the acks of
//! what it printed, closes the subscription and exits 0; a second Ctrl-C
//! exits at once (130), leaving what was not acked to be redelivered.
//!
//! `send` and `receive` export their producer and consumer spans over OTLP
//! (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` names a collector.
//!
//! An error is printed once, on standard error; the exit code says what
//! kind it was ([`EXIT_CODES`], shown by `pubsub --help`).
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

use std::io::{BufRead, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Parser, Subcommand};
use pubsub_core::{Error, ErrorKind, Message, Registry};

/// What each exit code means, for `--help`; [`exit_code`] maps errors.
const EXIT_CODES: &str = "\
Exit codes:
    0    done
    1    any failure not listed below
    2    bad command line: an unknown flag, a malformed --attr or duration,
         an OTLP protocol other than http/protobuf
    3    the topic or subscription does not exist (NotFound)
    4    the backend refused the credentials (PermissionDenied)
    5    the request is wrong for this backend: a malformed or unknown URL, an
         unknown parameter, a message over its limits (InvalidArgument,
         FailedPrecondition, AlreadyExists, Unimplemented)
    6    the backend is unreachable or overloaded; try again (Unavailable,
         ResourceExhausted)
    7    --timeout ran out, or the backend timed out (DeadlineExceeded)
    130  Ctrl-C twice: receive left without closing its subscription

Durations are seconds (1.5) or a number with a unit (500ms, 1m30s).";

#[derive(Parser, Debug)]
#[command(
    name = "pubsub",
    version,
    about = "Send, receive and benchmark any pub/sub backend by URL",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send a message to a topic, or one a line of standard input, and
    /// print each sent message's id (the id receivers see) on a line of its
    /// own, in input order.
    Send {
        /// The topic URL, e.g. rabbit://orders.
        url: String,
        /// An attribute as KEY=VALUE; may be repeated.
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
        attrs: Vec<(String, String)>,
        /// The message's ordering key (for backends that keep order by key).
        #[arg(long, value_name = "KEY")]
        ordering_key: Option<String>,
        /// Send each non-empty line of standard input as a message.
        #[arg(long, conflicts_with_all = ["json_lines", "body"])]
        lines: bool,
        /// Send each non-empty line of standard input as a message given in
        /// `receive --json`'s form: `body` or `body_base64`, `attributes`,
        /// `ordering_key` (`--attr` and `--ordering-key` fill in what a line
        /// lacks; `id` is ignored).
        #[arg(long, conflicts_with = "body")]
        json_lines: bool,
        /// Give up (exit 7) when opening, sending and closing take longer.
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        timeout: Option<Duration>,
        /// Send no trace context. By default each message is sent in a
        /// producer span of its own, whose W3C context goes into the
        /// `traceparent` attribute, so a consumer's trace begins there.
        #[arg(long)]
        no_trace: bool,
        /// The body; `-` or nothing reads standard input.
        body: Option<String>,
    },
    /// Receive messages from a subscription and print each: a line
    /// `id=ID [ordering_key="K"] name="value"...`, then the body. Ctrl-C
    /// stops, acks what was printed and closes (exit 0); twice, exits at
    /// once (130).
    Receive {
        /// The subscription URL.
        url: String,
        /// Stop after this many messages (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long without a message.
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        idle: Option<Duration>,
        /// Stop after this long in all; with `--count`, fewer messages by
        /// then is a failure (exit 7).
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        timeout: Option<Duration>,
        /// Nack instead of ack, so the messages are redelivered.
        #[arg(long)]
        nack: bool,
        /// Print JSON lines: id, body (UTF-8) or body_base64, attributes.
        #[arg(long)]
        json: bool,
    },
    /// List the URL schemes this binary opens, each with its URL forms.
    Schemes,
    /// Measure end-to-end throughput and latency through a topic and a
    /// subscription to it.
    Bench {
        /// The topic URL.
        #[arg(long)]
        topic: String,
        /// The subscription URL; opened before sending starts. Not with
        /// `--sends-only`.
        #[arg(
            long,
            required_unless_present = "sends_only",
            conflicts_with = "sends_only"
        )]
        subscription: Option<String>,
        /// Measure sends alone: each sender awaits each send; nothing is
        /// received.
        #[arg(long)]
        sends_only: bool,
        /// Fail (exit 7) when no message arrives for this long, as when
        /// the subscription is not fed by the topic.
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds, default_value = "30s")]
        stall: Duration,
        /// Print the results as one JSON object.
        #[arg(long)]
        json: bool,
        /// Messages to send.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Body size in bytes (at least 8: the send time travels in it).
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Concurrent senders.
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Concurrent receivers.
        #[arg(long, default_value_t = 10)]
        receivers: usize,
    },
}

/// Registers the drivers compiled into this binary.
fn registry() -> Registry {
    let registry = Registry::with_defaults();
    #[cfg(feature = "amqp")]
    pubsub_driver_amqp::register(&registry);
    #[cfg(feature = "kafka")]
    pubsub_driver_kafka::register(&registry);
    #[cfg(feature = "nats")]
    pubsub_driver_nats::register(&registry);
    #[cfg(feature = "redis")]
    pubsub_driver_redis::register(&registry);
    #[cfg(feature = "gcp")]
    pubsub_driver_gcp::register(&registry);
    #[cfg(feature = "aws")]
    pubsub_driver_aws::register(&registry);
    registry
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("attribute {s:?} must look like KEY=VALUE")),
    }
}

/// A duration as seconds (`1.5`) or with a unit (`500ms`, `1m30s`). NaN,
/// infinities and negative or absurdly large figures are refused here
/// rather than panicking later in `Duration`.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.trim().parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| {
            format!("{s:?} is not a duration: give a finite number of seconds, 0 or more")
        });
    }
    pubsub_core::parse_duration(s.trim()).map_err(|e| e.to_string())
}

/// The exit code for an error, as [`EXIT_CODES`] lists them.
fn exit_code(e: &anyhow::Error) -> u8 {
    let Some(kind) = e
        .chain()
        .find_map(|c| c.downcast_ref::<Error>().map(Error::kind))
    else {
        return 1;
    };
    match kind {
        ErrorKind::NotFound => 3,
        ErrorKind::PermissionDenied => 4,
        ErrorKind::InvalidArgument
        | ErrorKind::FailedPrecondition
        | ErrorKind::AlreadyExists
        | ErrorKind::Unimplemented => 5,
        ErrorKind::Unavailable | ErrorKind::ResourceExhausted => 6,
        ErrorKind::DeadlineExceeded => 7,
        _ => 1,
    }
}

/// `bench --sends-only`: `senders` tasks send `messages` in all, each
/// awaiting each send; the first failure ends the run.
async fn send_only(
    topic: &pubsub_core::Topic,
    senders: usize,
    messages: u64,
    size: usize,
    progress: &Arc<AtomicU64>,
) -> pubsub_core::Result<pubsub_conformance::bench::Report> {
    let senders = senders.max(1) as u64;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..senders {
        let (topic, progress) = (topic.clone(), progress.clone());
        let n = messages / senders + u64::from(s < messages % senders);
        tasks.spawn(async move {
            for _ in 0..n {
                topic
                    .send(Message::new(pubsub_conformance::bench::stamped_body(size)))
                    .await?;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            pubsub_core::Result::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(Error::internal(format!("a sender failed: {e}"))),
        }
    }
    Ok(pubsub_conformance::bench::Report {
        messages,
        elapsed: started.elapsed(),
        latencies: Vec::new(),
    })
}

/// Sends read ahead of their results, so a stream of lines is not one
/// round trip a message.
const SEND_WINDOW: usize = 64;

/// Sends each non-empty line of standard input, in order, with up to
/// [`SEND_WINDOW`] in flight. After a failure no more lines are read, the
/// sends in flight are awaited, and the first failure is returned naming
/// its line.
async fn send_lines(
    topic: &pubsub_core::Topic,
    json: bool,
    attrs: &[(String, String)],
    ordering_key: Option<&str>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    // Standard input is read on a thread of its own: a read waiting for
    // input must not hold up the sends in flight.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(SEND_WINDOW);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    let mut number = 0u64;
    let mut reading = true;
    let mut first_error: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            line = rx.recv(), if reading && in_flight.len() < SEND_WINDOW => {
                let Some(line) = line else {
                    reading = false;
                    continue;
                };
                number += 1;
                let line = line.context("reading standard input")?;
                if line.trim().is_empty() {
                    continue;
                }
                let parsed = if json {
                    message_from_json(&line)
                } else {
                    Ok(Message::new(line.into_bytes()))
                };
                let mut msg = match parsed {
                    Ok(m) => m,
                    Err(e) => {
                        first_error = Some(anyhow::Error::from(e).context(format!("line {number}")));
                        reading = false;
                        continue;
                    }
                };
                for (k, v) in attrs {
                    msg.attributes_mut().entry(k.clone()).or_insert_with(|| v.clone());
                }
                if let (Some(key), None) = (ordering_key, msg.ordering_key()) {
                    msg = msg.with_ordering_key(key);
                }
                let topic = topic.clone();
                in_flight.push_back(async move { (number, send_for_id(&topic, msg).await) });
            }
            Some((line, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let printed = match &result {
                    Ok(id) => print_sent(id.as_deref()),
                    Err(_) => print_not_sent(),
                };
                printed.context("writing a sent message's id")?;
                match result {
                    Ok(_) => {}
                    Err(_) if first_error.is_some() => reading = false,
                    Err(e) => {
                        first_error = Some(anyhow::Error::from(e)
                            .context(format!("the message on line {line} was not sent")));
                        reading = false;
                    }
                }
            }
            else => break,
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Sends `msg` and returns the id the backend gave it (the id its receivers
/// see), where the backend gives one.
async fn send_for_id(
    topic: &pubsub_core::Topic,
    msg: Message,
) -> pubsub_core::Result<Option<String>> {
    let id = Arc::new(std::sync::Mutex::new(None));
    let slot = id.clone();
    let msg = msg.with_after_send(move |sent| {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = sent.id().map(str::to_owned);
        Ok(())
    });
    topic.send(msg).await?;
    let id = id.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(id)
}

/// Prints a sent message's id, one line a message (`-` where the backend
/// gave none), so the lines match the messages in order. A closed standard
/// output is an error, not a panic that would drop the sends in flight.
fn print_sent(id: Option<&str>) -> std::io::Result<()> {
    print_line(id.unwrap_or("-"))
}

/// Prints `!` in a failed send's place, so the lines still match the
/// messages sent before and after it while it was in flight.
fn print_not_sent() -> std::io::Result<()> {
    print_line("!")
}

fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// A message in `receive --json`'s form.
fn message_from_json(line: &str) -> Result<Message, Error> {
    let bad = |what: String| Error::invalid_argument(what);
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad("a JSON line must be an object".into()))?;
    let body = match (object.get("body"), object.get("body_base64")) {
        (Some(serde_json::Value::String(s)), None) => s.clone().into_bytes(),
        (None, Some(serde_json::Value::String(s))) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| bad(format!("body_base64 is not base64: {e}")))?,
        (None, None) => Vec::new(),
        _ => {
            return Err(bad(
                "give one of body (a string) or body_base64 (a base64 string)".into(),
            ))
        }
    };
    let mut msg = Message::new(body);
    match object.get("attributes") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(attrs)) => {
            for (k, v) in attrs {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(format!("attribute {k:?} must be a string")))?;
                msg.attributes_mut().insert(k.clone(), v.to_owned());
            }
        }
        Some(_) => return Err(bad("attributes must be an object of strings".into())),
    }
    match object.get("ordering_key") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(k)) => msg = msg.with_ordering_key(k.clone()),
        Some(_) => return Err(bad("ordering_key must be a string".into())),
    }
    Ok(msg)
}

/// `what` ran past `--timeout`.
fn timed_out(what: &str, limit: Duration) -> anyhow::Error {
    Error::new(
        ErrorKind::DeadlineExceeded,
        format!("{what} did not finish within --timeout {limit:?}"),
    )
    .into()
}

/// The plain form of a received message: a line with its id, ordering key
/// and attributes (values quoted, sorted by name), then its body.
fn plain_header(m: &Message) -> String {
    let mut line = format!("id={}", m.id().unwrap_or("-"));
    if let Some(k) = m.ordering_key() {
        line.push_str(&format!(" ordering_key={k:?}"));
    }
    let mut attrs: Vec<_> = m.attributes().iter().collect();
    attrs.sort();
    for (k, v) in attrs {
        line.push_str(&format!(" {k}={v:?}"));
    }
    line
}

fn json_line(m: &Message) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), m.id().unwrap_or_default().into());
    match std::str::from_utf8(m.body()) {
        Ok(s) => o.insert("body".into(), s.into()),
        Err(_) => o.insert(
            "body_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(m.body())
                .into(),
        ),
    };
    let attrs: serde_json::Map<_, _> = m
        .attributes()
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    o.insert("attributes".into(), attrs.into());
    if let Some(k) = m.ordering_key() {
        o.insert("ordering_key".into(), k.into());
    }
    serde_json::Value::Object(o)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let reg = registry();
    match cli.command {
        Command::Send {
            url,
            attrs,
            ordering_key,
            lines,
            json_lines,
            timeout,
            body,
            no_trace: _,
        } => {
            let single = if lines || json_lines {
                None
            } else {
                let body = match body.as_deref() {
                    None | Some("-") => {
                        let mut b = Vec::new();
                        std::io::stdin()
                            .read_to_end(&mut b)
                            .context("reading the body from standard input")?;
                        b
                    }
                    Some(s) => s.as_bytes().to_vec(),
                };
                let mut msg = Message::new(body);
                msg.attributes_mut().extend(attrs.iter().cloned());
                if let Some(key) = &ordering_key {
                    msg = msg.with_ordering_key(key.clone());
                }
                Some(msg)
            };
            let send = async {
                let topic = reg.open_topic(&url).await?;
                let sent = match single {
                    Some(msg) => match send_for_id(&topic, msg).await {
                        Ok(id) => {
                            print_sent(id.as_deref()).context("writing the sent message's id")
                        }
                        Err(e) => Err(e.into()),
                    },
                    None => send_lines(&topic, json_lines, &attrs, ordering_key.as_deref()).await,
                };
                let closed = topic.shutdown().await;
                sent?;
                closed?;
                anyhow::Ok(())
            };
            match timeout {
                Some(limit) => tokio::time::timeout(limit, send)
                    .await
                    .map_err(|_| timed_out("the send", limit))??,
                None => send.await?,
            }
        }
        Command::Receive {
            url,
            count,
            idle,
            timeout,
            nack,
            json,
        } => {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let opened = reg.open_subscription(&url);
            let sub = match deadline {
                Some(at) => tokio::time::timeout_at(at, opened).await.map_err(|_| {
                    timed_out("opening the subscription", timeout.unwrap_or_default())
                })??,
                None => opened.await?,
            };
            let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
            let mut out = std::io::stdout().lock();
            let mut n = 0u64;
            let result = loop {
                if count.is_some_and(|c| n >= c) {
                    break Ok(());
                }
                // The first of: a message, --idle without one, the end of
                // --timeout, Ctrl-C. A receive cut short loses nothing.
                let wait_until = [
                    idle.map(|t| (tokio::time::Instant::now() + t, false)),
                    deadline.map(|at| (at, true)),
                ]
                .into_iter()
                .flatten()
                .min_by_key(|(at, _)| *at);
                let next = tokio::select! {
                    r = sub.receive() => r,
                    _ = &mut interrupted => break Ok(()),
                    overall = async {
                        match wait_until {
                            Some((at, overall)) => {
                                tokio::time::sleep_until(at).await;
                                overall
                            }
                            None => std::future::pending().await,
                        }
                    } => {
                        if overall && count.is_some() {
                            break Err(Error::new(
                                ErrorKind::DeadlineExceeded,
                                format!(
                                    "received {n} of --count {} messages within --timeout {:?}",
                                    count.unwrap_or_default(),
                                    timeout.unwrap_or_default()
                                ),
                            ));
                        }
                        break Ok(());
                    }
                };
                let m = match next {
                    Ok(m) => m,
                    Err(e) => break Err(e),
                };
                if json {
                    writeln!(out, "{}", json_line(&m))?;
                } else {
                    writeln!(out, "{}", plain_header(&m))?;
                    out.write_all(m.body())?;
                    writeln!(out)?;
                }
                out.flush()?;
                n += 1;
                if nack {
                    m.nack();
                } else {
                    m.ack();
                }
            };
            // Closing sends the acks of what was printed. Ctrl-C again
            // leaves at once: the broker redelivers what was not acked.
            let closed = tokio::select! {
                closed = sub.shutdown() => closed,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted again: exiting without closing the subscription");
                    std::process::exit(130);
                }
            };
            result?;
            closed?;
        }
        Command::Schemes => {
            let mut out = std::io::stdout().lock();
            for scheme in reg.schemes() {
                writeln!(out, "{scheme}")?;
                let forms = reg.url_forms(&scheme);
                if forms.is_empty() {
                    writeln!(out, "    (its driver describes no URL forms)")?;
                }
                for form in forms {
                    writeln!(out, "    {form}")?;
                }
            }
        }
        Command::Bench {
            topic,
            subscription,
            sends_only,
            stall,
            json,
            messages,
            size,
            senders,
            receivers,
        } => {
            if size < 8 {
                bail!("--size must be at least 8: the send time travels in the body");
            }
            let sub = match &subscription {
                Some(url) if !sends_only => Some(reg.open_subscription(url).await?),
                _ => None,
            };
            let topic = reg.open_topic(&topic).await?;
            let progress = Arc::new(AtomicU64::new(0));
            let bar = if json {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(messages)
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} messages {per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            let ticker = {
                let bar = bar.clone();
                let progress = progress.clone();
                tokio::spawn(async move {
                    loop {
                        bar.set_position(progress.load(Ordering::Relaxed));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            };
            let run = match &sub {
                Some(sub) => {
                    let pairs = [(topic.clone(), sub.clone())];
                    pubsub_conformance::bench::try_end_to_end(
                        &pairs, senders, receivers, messages, size, &progress, stall,
                    )
                    .await
                }
                None => send_only(&topic, senders, messages, size, &progress).await,
            };
            ticker.abort();
            bar.finish_and_clear();
            let closed = topic.shutdown().await;
            let sub_closed = match &sub {
                Some(sub) => sub.shutdown().await,
                None => Ok(()),
            };
            let report = run?;
            closed?;
            sub_closed?;
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            if json {
                let mut o = serde_json::json!({
                    "messages": report.messages,
                    "size": size,
                    "senders": senders,
                    "seconds": report.elapsed.as_secs_f64(),
                    "msg_per_s": report.rate(),
                });
                if sub.is_some() {
                    o["receivers"] = receivers.into();
                    o["latency_us"] = serde_json::json!({
                        "p50": us(report.latency(0.5)),
                        "p90": us(report.latency(0.9)),
                        "p99": us(report.latency(0.99)),
                        "max": us(report.latency(1.0)),
                    });
                }
                println!("{o}");
            } else if sub.is_some() {
                println!(
                    "{} messages of {size} bytes, {senders} senders, {receivers} receivers, in {:.2?}",
                    report.messages, report.elapsed
                );
                println!("throughput: {:.0} msg/s", report.rate());
                println!(
                    "latency: p50 {:.1?}  p90 {:.1?}  p99 {:.1?}  max {:.1?}",
                    report.latency(0.5),
                    report.latency(0.9),
                    report.latency(0.99),
                    report.latency(1.0)
                );
            } else {
                println!(
                    "{} messages of {size} bytes sent by {senders} senders in {:.2?}",
                    report.messages, report.elapsed
                );
                println!("throughput: {:.0} msg/s", report.rate());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let spans = match &cli.command {
        Command::Send { no_trace, .. } => Spans::Producer { on: !no_trace },
        Command::Receive { .. } => Spans::Consumer,
        _ => Spans::None,
    };
    let tracer = match init_tracing(spans) {
        Ok(tracer) => tracer,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    if let Some(tracer) = tracer {
        tracer.finish();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Which of the core's spans a command makes.
#[derive(Clone, Copy, Debug)]
enum Spans {
    /// `send`: a producer span a message, whose context the message
    /// carries (unless `--no-trace`), exported where OTLP is configured.
    Producer {
        on: bool,
    },
    /// `receive`: a consumer span a message, made only to be exported.
    Consumer,
    None,
}

/// The OTLP endpoint the standard variables name, if any: the traces one,
/// else the general one.
fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
}

/// Refuses an OTLP protocol other than `http/protobuf`, the one this
/// binary speaks (and OpenTelemetry's default).
fn check_otlp_protocol() -> anyhow::Result<()> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(p) = std::env::var(var) {
            let p = p.trim();
            if !p.is_empty() && p != "http/protobuf" {
                bail!(
                    "{var}={p:?}: this pubsub exports spans over OTLP as http/protobuf only \
                     (a collector's port 4318); unset it or set http/protobuf"
                );
            }
            // The traces variable, where set, overrides the general one.
            if !p.is_empty() {
                break;
            }
        }
    }
    Ok(())
}

/// The tracer provider behind the command's spans, kept to end them.
struct Tracer {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
    /// The collector's endpoint, where spans are exported.
    endpoint: Option<String>,
}

impl Tracer {
    /// Sends what spans are left before the process exits; a collector
    /// that did not take them is worth a warning, not a failed command.
    fn finish(self) {
        if let Some(endpoint) = &self.endpoint {
            if let Err(e) = self.provider.force_flush() {
                eprintln!(
                    "warning: spans not exported over OTLP: {}",
                    without_password(&e.to_string(), endpoint)
                );
            }
        }
        let _ = self.provider.shutdown();
    }
}

/// `text` with the password of `endpoint`, if it has one, masked: the
/// HTTP client's errors show the URL they were sent to.
fn without_password(text: &str, endpoint: &str) -> String {
    match pubsub_core::Url::parse(endpoint.trim()) {
        Ok(url) => match url.password() {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_owned(),
        },
        Err(_) => text.to_owned(),
    }
}

/// The SDK's resource (from `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`), named `pubsub` where they name no service.
fn resource() -> opentelemetry_sdk::Resource {
    let detected = opentelemetry_sdk::Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        opentelemetry_sdk::Resource::builder()
            .with_service_name("pubsub")
            .build()
    }
}

/// Logs to standard error as `RUST_LOG` says, and makes the core's spans
/// OpenTelemetry spans where `spans` asks for them. They are exported over
/// OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` names a collector; the exporter's
/// other standard variables (headers, timeout) and the SDK's (sampler,
/// `OTEL_SERVICE_NAME`, default `pubsub`) apply. Without a collector,
/// `send`'s spans are still made, for the context the messages carry.
fn init_tracing(spans: Spans) -> anyhow::Result<Option<Tracer>> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::from_default_env());
    let endpoint = otlp_endpoint();
    let wanted = match spans {
        Spans::Producer { on } => on,
        Spans::Consumer => endpoint.is_some(),
        Spans::None => false,
    };
    let tracer = if wanted {
        let mut builder = opentelemetry_sdk::trace::SdkTracerProvider::builder();
        if endpoint.is_some() {
            check_otlp_protocol()?;
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build()
                .context("setting up the OTLP exporter")?;
            builder = builder
                .with_batch_exporter(exporter)
                .with_resource(resource());
        }
        Some(Tracer {
            provider: builder.build(),
            endpoint,
        })
    } else {
        None
    };
    let otel = tracer.as_ref().map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.provider.tracer("pubsub"))
            // The core's producer and consumer spans only.
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("pubsub_core::trace", tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(tracer)
}

/// The error and its causes on one line. A `pubsub_core::Error` already
/// shows its own causes, so the chain stops there rather than print them
/// twice.
fn describe(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        parts.push(cause.to_string());
        if cause.downcast_ref::<pubsub_core::Error>().is_some() {
            break;
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_error_kind_through_context() {
        let wrapped =
            |kind| anyhow::Error::from(Error::new(kind, "x")).context("opening the subscription");
        assert_eq!(exit_code(&wrapped(ErrorKind::NotFound)), 3);
        assert_eq!(exit_code(&wrapped(ErrorKind::InvalidArgument)), 5);
        assert_eq!(exit_code(&wrapped(ErrorKind::Unavailable)), 6);
        assert_eq!(exit_code(&timed_out("the send", Duration::from_secs(1))), 7);
        assert_eq!(exit_code(&anyhow::anyhow!("stdout closed")), 1);
    }

    #[test]
    fn an_export_warning_shows_no_password() {
        let endpoint = "http://user:s3cret@collector:4318";
        let text = "error sending request for url (http://user:s3cret@collector:4318/v1/traces)";
        let shown = without_password(text, endpoint);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("user:***@collector"), "{shown}");
        assert_eq!(
            without_password("refused", "http://collector:4318"),
            "refused"
        );
    }

    #[test]
    fn errors_print_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by peer");
        let e = pubsub_core::Error::unavailable("cannot connect").with_source(io);
        let e = anyhow::Error::new(e).context("sending to rabbit://x");
        let text = describe(&e);
        assert_eq!(text.matches("refused by peer").count(), 1, "{text}");
        assert!(
            text.starts_with("sending to rabbit://x: unavailable: cannot connect"),
            "{text}"
        );
        // The chain before a pubsub error is kept whole.
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&plain), "outer: inner");
    }

    #[test]
    fn json_lines_carry_text_or_base64_bodies() {
        let text = json_line(&Message::new("héllo").with_attribute("k", "v"));
        assert_eq!(text["body"], "héllo");
        assert_eq!(text["attributes"]["k"], "v");
        assert!(text.get("body_base64").is_none());
        let bin = json_line(&Message::new(vec![0xff, 0x00, 0xfe]));
        assert_eq!(bin["body_base64"], "/wD+");
        assert!(bin.get("body").is_none());
    }

    #[test]
    fn attributes_parse_at_the_first_equals() {
        assert_eq!(parse_attr("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_attr("=v").is_err());
        assert!(parse_attr("k").is_err());
    }
}
