//! A global propagator the application sets is the one that writes and
//! reads the trace context (its own test binary: the propagator is
//! process-wide).

use std::time::Duration;

use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use pubsub_core::mem::Broker;
use pubsub_core::trace::TRACEPARENT;
use pubsub_core::Message;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Writes `x-trace: <trace id>:<span id>`, as a vendor's propagator might.
#[derive(Debug)]
struct Vendor(Vec<String>);

impl TextMapPropagator for Vendor {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        injector.set("x-trace", format!("{}:{}", sc.trace_id(), sc.span_id()));
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let Some((t, s)) = extractor.get("x-trace").and_then(|v| v.split_once(':')) else {
            return cx.clone();
        };
        let (Ok(t), Ok(s)) = (TraceId::from_hex(t), SpanId::from_hex(s)) else {
            return cx.clone();
        };
        cx.with_remote_span_context(SpanContext::new(
            t,
            s,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&self.0)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_global_propagator_carries_the_context() {
    opentelemetry::global::set_text_map_propagator(Vendor(vec!["x-trace".into()]));
    let provider = SdkTracerProvider::builder().build();
    let _guard = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .set_default();

    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let (topic, sub) = (b.topic("t"), b.subscription("s"));
    let request = tracing::info_span!("request");
    let trace_id = request.context().span().span_context().trace_id();
    topic
        .send(Message::new("x"))
        .instrument(request)
        .await
        .unwrap();
    let msg = sub.receive().await.unwrap();
    assert_eq!(msg.attribute(TRACEPARENT), None, "{:?}", msg.attributes());
    let carried = msg.attribute("x-trace").expect("the vendor's attribute");
    assert!(carried.starts_with(&trace_id.to_string()), "{carried}");
    assert_eq!(
        msg.span().context().span().span_context().trace_id(),
        trace_id,
        "read back with the same propagator"
    );
    msg.ack();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}
