//! Trace context across the in-memory broker (the `opentelemetry`
//! feature): the spans OpenTelemetry's SDK exports and the attributes the
//! messages carry.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use pubsub_core::mem::Broker;
use pubsub_core::trace::{TRACEPARENT, TRACESTATE};
use pubsub_core::{Message, SubscriptionOptions, TopicOptions};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Spans recorded on this thread go to an in-memory exporter. The tests
/// run on a current-thread runtime, so the core's tasks record there too.
struct Traced {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Traced {
    fn new() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let guard = tracing_subscriber::registry().with(layer).set_default();
        Traced {
            exporter,
            provider,
            _guard: guard,
        }
    }

    fn spans(&self) -> Vec<SpanData> {
        self.provider.force_flush().expect("flush");
        self.exporter.get_finished_spans().expect("spans")
    }
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn string(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(v) => v.as_str().into_owned(),
        None => panic!("span {:?} has no {key}: {:?}", span.name, span.attributes),
    }
}

fn by_kind(spans: &[SpanData], kind: SpanKind) -> Vec<&SpanData> {
    spans.iter().filter(|s| s.span_kind == kind).collect()
}

fn pair(b: &Broker, name: &str) -> (pubsub_core::Topic, pubsub_core::Subscription) {
    pair_with(
        b,
        name,
        TopicOptions::default(),
        SubscriptionOptions::default(),
    )
}

/// A topic and its one subscription, both named `name`.
fn pair_with(
    b: &Broker,
    name: &str,
    topic: TopicOptions,
    sub: SubscriptionOptions,
) -> (pubsub_core::Topic, pubsub_core::Subscription) {
    b.create_topic(name).unwrap();
    b.create_subscription(name, name, Duration::from_secs(30))
        .unwrap();
    (
        b.topic_with_options(name, topic),
        b.subscription_with_options(name, sub),
    )
}

/// Topic options that send no trace context, as a producer outside this
/// library would.
fn untraced() -> TopicOptions {
    TopicOptions::default().with_trace_context(false)
}

#[tokio::test(flavor = "current_thread")]
async fn one_trace_runs_from_the_producer_through_the_broker_to_the_consumer() {
    let t = Traced::new();
    let b = Broker::new();
    let (topic, sub) = pair(&b, "orders");

    let request = tracing::info_span!("request");
    let request_cx = request.context().span().span_context().clone();
    topic
        .send(Message::new("hello").with_attribute("k", "v"))
        .instrument(request.clone())
        .await
        .unwrap();

    let msg = sub.receive().await.unwrap();
    let id = msg.id().unwrap().to_owned();
    let traceparent = msg.attribute(TRACEPARENT).expect("traceparent").to_owned();
    assert_eq!(
        msg.attribute("k"),
        Some("v"),
        "the application's attributes stay"
    );
    assert_eq!(
        msg.attribute(TRACESTATE),
        None,
        "an empty tracestate is not sent"
    );
    let span = msg.span();
    async {
        tracing::info_span!("work").in_scope(|| {});
        msg.ack();
    }
    .instrument(span.clone())
    .await;
    drop(span);
    drop(request);

    let spans = t.spans();
    let producer = by_kind(&spans, SpanKind::Producer);
    let consumer = by_kind(&spans, SpanKind::Consumer);
    assert_eq!((producer.len(), consumer.len()), (1, 1), "{spans:#?}");
    let (producer, consumer) = (producer[0], consumer[0]);

    // The producer span: a child of the application's, named and
    // attributed as OpenTelemetry's messaging conventions say.
    assert_eq!(producer.name, "send orders");
    assert_eq!(producer.parent_span_id, request_cx.span_id());
    assert_eq!(producer.span_context.trace_id(), request_cx.trace_id());
    assert_eq!(string(producer, "messaging.system"), "mem");
    assert_eq!(string(producer, "messaging.destination.name"), "orders");
    assert_eq!(string(producer, "messaging.operation.name"), "send");
    assert_eq!(string(producer, "messaging.operation.type"), "send");
    assert_eq!(
        string(producer, "messaging.message.id"),
        id,
        "the producer span has the id the consumer sees"
    );
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            producer.span_context.trace_id(),
            producer.span_context.span_id()
        ),
        "the message carries the producer span's context"
    );

    // The consumer span: in the producer's trace, its child, linked to it.
    assert_eq!(consumer.name, "process orders");
    assert_eq!(
        consumer.span_context.trace_id(),
        request_cx.trace_id(),
        "one trace"
    );
    assert_eq!(consumer.parent_span_id, producer.span_context.span_id());
    assert_eq!(consumer.links.len(), 1);
    let link = &consumer.links[0].span_context;
    assert_eq!(
        (link.trace_id(), link.span_id()),
        (
            producer.span_context.trace_id(),
            producer.span_context.span_id()
        )
    );
    assert!(
        link.is_remote(),
        "the link is the context the message carried"
    );
    assert_eq!(string(consumer, "messaging.system"), "mem");
    assert_eq!(
        string(consumer, "messaging.destination.subscription.name"),
        "orders"
    );
    assert_eq!(string(consumer, "messaging.operation.name"), "process");
    assert_eq!(string(consumer, "messaging.message.id"), id);
    assert_eq!(string(consumer, "pubsub.settlement"), "ack");

    // Work done in the consumer span is part of the trace.
    let work = spans.iter().find(|s| s.name == "work").expect("work span");
    assert_eq!(work.parent_span_id, consumer.span_context.span_id());
    assert_eq!(work.span_context.trace_id(), request_cx.trace_id());

    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn every_message_handed_out_gets_its_own_span() {
    let t = Traced::new();
    let b = Broker::new();
    let (topic, sub) = pair(&b, "many");
    for i in 0..5 {
        topic.send(Message::new(i.to_string())).await.unwrap();
    }
    // The first receive fetches all five; the rest come from the queue.
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = sub.receive().await.unwrap();
        got.push(m.attribute(TRACEPARENT).expect("traceparent").to_owned());
        m.ack();
    }
    let spans = t.spans();
    let producers: HashMap<SpanId, &SpanData> = by_kind(&spans, SpanKind::Producer)
        .into_iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let consumers = by_kind(&spans, SpanKind::Consumer);
    assert_eq!((producers.len(), consumers.len()), (5, 5));
    for c in consumers {
        let p = producers
            .get(&c.parent_span_id)
            .expect("each consumer span's parent is a producer span");
        assert_eq!(c.span_context.trace_id(), p.span_context.trace_id());
    }
    let distinct: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), 5, "each send has its own producer span");
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_context_written_by_another_producer_is_continued() {
    let t = Traced::new();
    let b = Broker::new();

    // A producer in another language: its SDK's W3C propagator wrote the
    // attributes, and this side sends no context of its own.
    let (topic, sub) = pair_with(&b, "foreign", untraced(), SubscriptionOptions::default());
    let remote = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_str("vendor=x").unwrap(),
    );
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(
        &Context::new().with_remote_span_context(remote.clone()),
        &mut carrier,
    );
    topic
        .send(Message::new("from go").with_attributes(carrier))
        .await
        .unwrap();
    let msg = sub.receive().await.unwrap();
    assert_eq!(msg.attribute(TRACESTATE), Some("vendor=x"));
    let cx = msg.span().context();
    assert_eq!(cx.span().span_context().trace_id(), remote.trace_id());
    msg.nack();
    let again = sub.receive().await.unwrap();
    drop(again);

    let spans = t.spans();
    assert!(
        by_kind(&spans, SpanKind::Producer).is_empty(),
        "trace context off: no producer span"
    );
    let consumers = by_kind(&spans, SpanKind::Consumer);
    assert_eq!(consumers.len(), 2);
    for c in &consumers {
        assert_eq!(c.span_context.trace_id(), remote.trace_id());
        assert_eq!(c.parent_span_id, remote.span_id());
        assert_eq!(c.links[0].span_context.span_id(), remote.span_id());
    }
    let settled: Vec<String> = consumers
        .iter()
        .map(|c| string(c, "pubsub.settlement"))
        .collect();
    assert_eq!(settled, ["nack", "drop"]);
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn turned_off_it_adds_no_attributes_and_no_spans() {
    let t = Traced::new();
    let b = Broker::new();
    let (topic, sub) = pair_with(
        &b,
        "quiet",
        untraced(),
        SubscriptionOptions::default().with_trace_context(false),
    );
    topic
        .send(Message::new("x"))
        .instrument(tracing::info_span!("request"))
        .await
        .unwrap();
    let msg = sub.receive().await.unwrap();
    assert!(msg.attributes().is_empty(), "{:?}", msg.attributes());
    assert!(msg.span().is_disabled());
    msg.ack();
    let spans = t.spans();
    assert!(
        spans.iter().any(|s| s.name == "request"),
        "the application's span is exported: {spans:#?}"
    );
    assert!(
        spans.iter().all(|s| s.span_kind == SpanKind::Internal),
        "no producer or consumer spans: {spans:#?}"
    );
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn without_a_tracing_layer_nothing_is_added() {
    let b = Broker::new();
    let (topic, sub) = pair(&b, "untraced");
    topic.send(Message::new("x")).await.unwrap();
    let msg = sub.receive().await.unwrap();
    assert!(msg.attributes().is_empty(), "{:?}", msg.attributes());
    msg.ack();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn handlers_run_in_their_message_span() {
    let t = Traced::new();
    let b = Broker::new();
    let (topic, sub) = pair(&b, "handled");
    for i in 0..3 {
        topic.send(Message::new(i.to_string())).await.unwrap();
    }
    let done = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let worker = {
        let (sub, done) = (sub.clone(), done.clone());
        tokio::spawn(async move {
            sub.handle_concurrently(2, move |m| {
                let done = done.clone();
                async move {
                    tracing::info_span!("handler").in_scope(|| {});
                    m.ack();
                    done.add_permits(1);
                }
            })
            .await
        })
    };
    let _ = done.acquire_many(3).await.unwrap();
    sub.shutdown().await.unwrap();
    worker.await.unwrap().unwrap();
    topic.shutdown().await.unwrap();

    let spans = t.spans();
    let consumers: HashMap<SpanId, &SpanData> = by_kind(&spans, SpanKind::Consumer)
        .into_iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let handlers: Vec<&SpanData> = spans.iter().filter(|s| s.name == "handler").collect();
    assert_eq!((consumers.len(), handlers.len()), (3, 3));
    for h in handlers {
        let c = consumers
            .get(&h.parent_span_id)
            .expect("a handler runs in its message's consumer span");
        assert_eq!(h.span_context.trace_id(), c.span_context.trace_id());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_without_context_is_not_linked_to_the_ambient_span() {
    let t = Traced::new();
    let b = Broker::new();

    let (topic, sub) = pair_with(&b, "plain", untraced(), SubscriptionOptions::default());
    topic
        .send(Message::new("x").with_attribute("k", "v"))
        .await
        .unwrap();
    let worker = tracing::info_span!("worker");
    let worker_id = worker.context().span().span_context().span_id();
    async {
        // As code instrumented with the OpenTelemetry API directly makes
        // its span current.
        let _current = tracing::Span::current().context().attach();
        let msg = sub.receive().await.unwrap();
        msg.ack();
    }
    .instrument(worker.clone())
    .await;
    drop(worker);
    let spans = t.spans();
    let consumers = by_kind(&spans, SpanKind::Consumer);
    assert_eq!(consumers.len(), 1, "{spans:#?}");
    assert!(
        consumers[0].links.is_empty(),
        "no producer, so no link: {:?}",
        consumers[0].links
    );
    assert_eq!(
        consumers[0].parent_span_id, worker_id,
        "the receiving code's span is the parent"
    );
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_sent_on_carries_the_new_context_only() {
    let t = Traced::new();
    let b = Broker::new();
    for name in ["in", "out"] {
        b.create_topic(name).unwrap();
        b.create_subscription(name, name, Duration::from_secs(30))
            .unwrap();
    }
    // The first hop came from another SDK, with a tracestate.
    let foreign = b.topic_with_options("in", untraced());
    foreign
        .send(Message::new("x").with_attributes([
            (
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            (TRACESTATE, "vendor=x"),
        ]))
        .await
        .unwrap();
    let (inbound, out) = (b.subscription("in"), b.topic("out"));
    let msg = inbound.receive().await.unwrap();
    // Sent on in the message's own span: the second hop continues its
    // trace, tracestate included (a trace's state passes to its spans).
    let span = msg.span();
    let forwarded = msg.clone();
    async { out.send(forwarded).await.unwrap() }
        .instrument(span)
        .await;
    // Sent on from a trace of its own: nothing of the first trace stays.
    out.send(msg.clone())
        .instrument(tracing::info_span!("replay"))
        .await
        .unwrap();
    msg.ack();
    let out_sub = b.subscription("out");
    let (second, replayed) = (
        out_sub.receive().await.unwrap(),
        out_sub.receive().await.unwrap(),
    );
    let spans = t.spans();
    let producers = by_kind(&spans, SpanKind::Producer);
    assert_eq!(producers.len(), 2);
    let traceparent = |p: &SpanData| {
        format!(
            "00-{}-{}-01",
            p.span_context.trace_id(),
            p.span_context.span_id()
        )
    };
    assert_eq!(
        second.attribute(TRACEPARENT),
        Some(traceparent(producers[0]).as_str())
    );
    assert!(traceparent(producers[0]).starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert_eq!(second.attribute(TRACESTATE), Some("vendor=x"));
    assert_eq!(
        replayed.attribute(TRACEPARENT),
        Some(traceparent(producers[1]).as_str())
    );
    assert_ne!(
        producers[1].span_context.trace_id(),
        producers[0].span_context.trace_id()
    );
    assert_eq!(
        replayed.attribute(TRACESTATE),
        None,
        "the first trace's tracestate does not ride along with another trace's traceparent"
    );
    second.ack();
    replayed.ack();
    for t in [foreign, out] {
        t.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_at_the_size_limit_goes_without_its_context() {
    let _t = Traced::new();
    let b = Broker::with_max_message_bytes(64);
    let (topic, sub) = pair(&b, "full");
    // Exactly at the limit: accepted, and sent without the 66 bytes of
    // traceparent that would not fit.
    topic
        .send(Message::new(vec![b'x'; 64]))
        .instrument(tracing::info_span!("request"))
        .await
        .unwrap();
    let full = sub.receive().await.unwrap();
    assert!(full.attributes().is_empty(), "{:?}", full.attributes());
    full.ack();
    let e = topic.send(Message::new(vec![b'x'; 65])).await.unwrap_err();
    assert_eq!(e.kind(), pubsub_core::ErrorKind::InvalidArgument, "{e}");
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_subscriber_without_an_opentelemetry_layer_adds_nothing() {
    let _guard = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .set_default();
    let b = Broker::new();
    let (topic, sub) = pair(&b, "logged");
    topic
        .send(Message::new("x"))
        .instrument(tracing::info_span!("request"))
        .await
        .unwrap();
    let msg = sub.receive().await.unwrap();
    assert!(msg.attributes().is_empty(), "{:?}", msg.attributes());
    assert!(
        !msg.span().is_disabled(),
        "the span is there for the log lines"
    );
    msg.ack();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

/// A mem driver declaring the `messaging.system` a backend with a name in
/// OpenTelemetry's conventions declares.
mod named {
    use std::any::Any;
    use std::sync::Arc;
    use std::time::Duration;

    use pubsub_core::driver::{
        self, async_trait, AckId, BatchError, Capabilities, Deliveries, Nacked, OutgoingMessage,
        ReceivedMessage, Settlement,
    };
    use pubsub_core::mem::{SubscriptionDriver, TopicDriver};
    use pubsub_core::Result;

    pub const SYSTEM: &str = "rabbitmq";

    fn named(mut c: Capabilities) -> Capabilities {
        c.messaging_system = Some(SYSTEM);
        c
    }

    #[derive(Debug)]
    pub struct Topic(pub TopicDriver);

    #[async_trait]
    impl driver::Topic for Topic {
        fn driver_name(&self) -> &'static str {
            self.0.driver_name()
        }
        fn resource(&self) -> &str {
            self.0.resource()
        }
        fn capabilities(&self) -> Capabilities {
            named(self.0.capabilities())
        }
        async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
            self.0.send_batch(batch).await
        }
    }

    #[derive(Debug)]
    pub struct Subscription(pub SubscriptionDriver);

    #[async_trait]
    impl driver::Subscription for Subscription {
        fn driver_name(&self) -> &'static str {
            self.0.driver_name()
        }
        fn resource(&self) -> &str {
            self.0.resource()
        }
        fn capabilities(&self) -> Capabilities {
            named(self.0.capabilities())
        }
        async fn receive_batch(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
            self.0.receive_batch(max).await
        }
        fn send_acks<'a>(&'a self, ids: &'a [AckId]) -> Settlement<'a> {
            self.0.send_acks(ids)
        }
        fn send_nacks<'a>(&'a self, nacks: &'a [Nacked]) -> Settlement<'a> {
            self.0.send_nacks(nacks)
        }
        async fn extend_leases(&self, ids: &[AckId], by: Duration) -> Result<(), BatchError> {
            self.0.extend_leases(ids, by).await
        }
        async fn close(&self) -> Result<()> {
            self.0.close().await
        }
        fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
            self.0.raw()
        }
        fn deliveries(&self) -> Option<Arc<dyn Deliveries>> {
            self.0.deliveries()
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn spans_carry_the_messaging_system_a_driver_declares() {
    use pubsub_core::driver::{Subscription as _, Topic as _};
    let t = Traced::new();
    let b = Broker::new();
    b.create_topic("named").unwrap();
    b.create_subscription("named", "named", Duration::from_secs(30))
        .unwrap();
    let topic = pubsub_core::Topic::new(named::Topic(b.topic_driver("named")));
    let sub = pubsub_core::Subscription::new(named::Subscription(b.subscription_driver("named")));
    assert_eq!(named::Topic(b.topic_driver("named")).driver_name(), "mem");
    assert_eq!(
        named::Subscription(b.subscription_driver("named")).driver_name(),
        "mem"
    );

    topic.send(Message::new("hello")).await.unwrap();
    let msg = sub.receive().await.unwrap();
    msg.ack();
    sub.shutdown().await.unwrap();
    topic.shutdown().await.unwrap();

    let spans = t.spans();
    let producer = by_kind(&spans, SpanKind::Producer);
    let consumer = by_kind(&spans, SpanKind::Consumer);
    assert_eq!((producer.len(), consumer.len()), (1, 1), "{spans:#?}");
    assert_eq!(string(producer[0], "messaging.system"), named::SYSTEM);
    assert_eq!(string(consumer[0], "messaging.system"), named::SYSTEM);
}
