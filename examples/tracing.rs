//! One trace from a producer through the broker to a consumer, exported to
//! standard output by OpenTelemetry's stdout exporter: first across the
//! in-memory broker, then across RabbitMQ.
//!
//! ```text
//! cargo run -p pubsub-examples --example tracing
//! RABBIT_SERVER_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run -p pubsub-examples --example tracing
//! ```
//! The core's `opentelemetry` feature makes each send run in a producer
//! span whose W3C context travels in the message's `traceparent`
//! attribute, and gives each received message a consumer span that is the
//! producer span's child. The application only installs a
//! `tracing-opentelemetry` layer and runs its work in `msg.span()`.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use pubsub_core::{Message, Subscription, SubscriptionOptions, Topic, TopicOptions};
use pubsub_driver_amqp::lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use pubsub_driver_amqp::lapin::types::{AMQPValue, FieldTable};
use pubsub_driver_amqp::lapin::ExchangeKind;
use pubsub_driver_amqp::{Connector, SubscriptionConfig, TopicConfig};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(opentelemetry_stdout::SpanExporter::default())
        .build();
    tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("pubsub-example"))
                // The core's producer and consumer spans, and this
                // program's own; not the core's internal debug spans.
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("pubsub_core::trace", tracing::Level::INFO)
                        .with_target("shop", tracing::Level::INFO),
                ),
        )
        .init();

    // The in-memory broker.
    let sub = pubsub_core::open_subscription("mem://checkout").await?;
    let topic = pubsub_core::open_topic("mem://checkout").await?;
    round_trip("mem", &topic, &sub).await?;
    topic.shutdown().await?;
    sub.shutdown().await?;

    // RabbitMQ: an exchange and a queue bound to it, declared here as an
    // application would.
    let server = std::env::var("RABBIT_SERVER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let connector = Connector::new(&server)?;
    // Named for this run, so a message an interrupted run left is not read.
    let name = format!("tracing-example-{}", std::process::id());
    declare(&connector, &name).await?;
    let sub = pubsub_driver_amqp::open_subscription(
        &connector,
        &name,
        SubscriptionConfig::default(),
        SubscriptionOptions::default(),
    )?;
    let topic = pubsub_driver_amqp::open_topic(
        &connector,
        &name,
        TopicConfig::default(),
        TopicOptions::default(),
    )?;
    round_trip("RabbitMQ", &topic, &sub).await?;
    topic.shutdown().await?;
    sub.shutdown().await?;
    connector.close().await?;

    provider.shutdown()?;
    Ok(())
}

/// Sends an order inside a `checkout` span and handles it inside the
/// received message's span; prints the trace both ends are in.
async fn round_trip(
    broker: &str,
    topic: &Topic,
    sub: &Subscription,
) -> Result<(), Box<dyn std::error::Error>> {
    let checkout = tracing::info_span!(target: "shop", "checkout", broker);
    let trace_id = checkout.context().span().span_context().trace_id();
    topic
        .send(Message::new("order 42"))
        .instrument(checkout)
        .await?;

    let msg = sub.receive().await?;
    let span = msg.span();
    let consumer_trace = span.context().span().span_context().trace_id();
    println!(
        "{broker}: sent in trace {trace_id}, received with traceparent {} in trace {consumer_trace}",
        msg.attribute(pubsub_core::trace::TRACEPARENT).unwrap_or("-"),
    );
    async move {
        let _work = tracing::info_span!(target: "shop", "handle order").entered();
        msg.ack();
    }
    .instrument(span)
    .await;
    if consumer_trace != trace_id {
        return Err(format!("{broker}: the consumer is not in the producer's trace").into());
    }
    Ok(())
}

/// Declares a fanout exchange and a queue bound to it, both named `name`;
/// the broker removes the queue a minute after it was last used, and the
/// exchange with it.
async fn declare(connector: &Connector, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let ch = connector.channel().await?;
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
        .await?;
    ch.queue_bind(
        name.into(),
        name.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}
