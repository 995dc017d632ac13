//! `pubsub`: send, receive and benchmark any backend by URL.
//!
//! ```text
//! pubsub send URL [--attr k=v]... [BODY | -]
//! pubsub receive URL [--count N] [--nack] [--json]
//! pubsub bench --topic URL --subscription URL [--messages N] [--size B]
//!              [--senders S] [--receivers R]
//! ```
//!
//! Drivers are compiled in through cargo features; `mem://` is always there
//! (useful for `bench`, whose topic and subscription live in one process).
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Parser, Subcommand};
use pubsub_core::{Message, Registry};

#[derive(Parser, Debug)]
#[command(
    name = "pubsub",
    version,
    about = "Send, receive and benchmark any pub/sub backend by URL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one message to a topic.
    Send {
        /// The topic URL, e.g. rabbit://orders.
        url: String,
        /// An attribute as KEY=VALUE; may be repeated.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
        /// The body; `-` or nothing reads standard input.
        body: Option<String>,
    },
    /// Receive messages from a subscription and print them.
    Receive {
        /// The subscription URL.
        url: String,
        /// Stop after this many messages (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds without a message.
        #[arg(long, value_name = "SECONDS")]
        idle: Option<f64>,
        /// Nack instead of ack, so the messages are redelivered.
        #[arg(long)]
        nack: bool,
        /// Print JSON lines: id, body (UTF-8) or body_base64, attributes.
        #[arg(long)]
        json: bool,
    },
    /// Measure end-to-end throughput and latency through a topic and a
    /// subscription to it.
    Bench {
        /// The topic URL.
        #[arg(long)]
        topic: String,
        /// The subscription URL; opened before sending starts.
        #[arg(long)]
        subscription: String,
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

fn parse_attr(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("attribute {s:?} must look like KEY=VALUE"),
    }
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
        Command::Send { url, attrs, body } => {
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
            for a in &attrs {
                let (k, v) = parse_attr(a)?;
                msg.attributes_mut().insert(k, v);
            }
            let topic = reg.open_topic(&url).await?;
            let sent = topic.send(msg).await;
            let closed = topic.shutdown().await;
            sent?;
            closed?;
        }
        Command::Receive {
            url,
            count,
            idle,
            nack,
            json,
        } => {
            let sub = reg.open_subscription(&url).await?;
            let mut out = std::io::stdout().lock();
            let mut n = 0u64;
            let result = loop {
                if count.is_some_and(|c| n >= c) {
                    break Ok(());
                }
                let next = match idle {
                    Some(secs) => {
                        match tokio::time::timeout(Duration::from_secs_f64(secs), sub.receive())
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => break Ok(()),
                        }
                    }
                    None => sub.receive().await,
                };
                let m = match next {
                    Ok(m) => m,
                    Err(e) => break Err(e),
                };
                if json {
                    writeln!(out, "{}", json_line(&m))?;
                } else {
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
            let closed = sub.shutdown().await;
            result?;
            closed?;
        }
        Command::Bench {
            topic,
            subscription,
            messages,
            size,
            senders,
            receivers,
        } => {
            if size < 8 {
                bail!("--size must be at least 8: the send time travels in the body");
            }
            let sub = reg.open_subscription(&subscription).await?;
            let topic = reg.open_topic(&topic).await?;
            let progress = Arc::new(AtomicU64::new(0));
            let bar = indicatif::ProgressBar::new(messages);
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
            let pairs = [(topic.clone(), sub.clone())];
            let report = pubsub_conformance::bench::end_to_end_with_progress(
                &pairs, senders, receivers, messages, size, &progress,
            )
            .await;
            ticker.abort();
            bar.finish_and_clear();
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
            topic.shutdown().await?;
            sub.shutdown().await?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
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
