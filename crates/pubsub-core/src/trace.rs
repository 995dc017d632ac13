//! Trace context across the broker, with the `opentelemetry` feature.
//!
//! A send runs in a producer span (`send <topic>`, kind producer), whose
//! context goes into the message's attributes as W3C Trace Context:
//! [`TRACEPARENT`] and [`TRACESTATE`], the names OpenTelemetry's
//! propagators in every language read. A received message gets a consumer
//! span (`process <subscription>`, kind consumer) that is a child of the
//! producer's span and links to it, so one trace runs from the producer
//! through the broker to the consumer; it closes once the message is
//! settled and no clone of it is held (the span ends at its last exit);
//! [`crate::Message::span`] gives it, for the work on the message to run
//! in, and [`crate::Subscription::handle_concurrently`] runs each handler
//! in it. Both spans carry OpenTelemetry's messaging attributes
//! (`messaging.system`, `messaging.destination.name` or
//! `messaging.destination.subscription.name`, `messaging.operation.name`,
//! `messaging.operation.type`, and `messaging.message.id`: on send, the id
//! the backend gave the message, where it gives one).
//!
//! The spans are `tracing` spans at `INFO` with target `pubsub_core::trace`;
//! they become OpenTelemetry spans through a `tracing-opentelemetry` layer
//! the application installs. Without one nothing is injected: there is no
//! trace to carry. (A subscriber that records these spans without such a
//! layer, a `fmt` one at `INFO` say, still makes them: its log lines inside
//! a handler then show the message's id.) The context is written and read
//! with the application's global propagator when it has set one
//! (`opentelemetry::global::set_text_map_propagator`), else as W3C Trace
//! Context. The attributes count toward a backend's limits, so they are
//! added only after the application's message passed its checks, and only
//! where they still fit (else the message goes without them); a message
//! that already carries trace attributes (one received and sent on) has
//! them replaced.
//! [`crate::TopicOptions::trace_context`] and
//! [`crate::SubscriptionOptions::trace_context`] turn it off.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{open_subscription, open_topic, Message};
//! use tracing::Instrument;
//!
//! let sub = open_subscription("mem://traced").await?;
//! let topic = open_topic("mem://traced").await?;
//! topic.send(Message::new("hello")).await?;
//!
//! let msg = sub.receive().await?;
//! // The work on a message runs in its consumer span.
//! let span = msg.span();
//! async move { msg.ack() }.instrument(span).await;
//! # topic.shutdown().await?;
//! # sub.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::str::FromStr;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::driver::Attributes;

/// The attribute holding a W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The attribute holding a W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// Writes the context of `span` into `attributes`, if it has one.
pub fn inject(span: &Span, attributes: &mut Attributes) {
    if span.is_disabled() {
        return;
    }
    inject_context(&span.context(), attributes);
}

/// The attributes that carry `span`'s context, if it has one.
pub(crate) fn context_attributes(span: &Span) -> Option<Attributes> {
    let mut extra = Attributes::new();
    inject(span, &mut extra);
    (!extra.is_empty()).then_some(extra)
}

/// Runs `f` on the attribute names trace context may travel in: W3C's and
/// those of the global propagator, which a message sent on should not keep
/// from before. Allocates only where the application set a propagator.
pub(crate) fn with_context_fields<R>(mut f: impl FnMut(&[&str]) -> R) -> R {
    opentelemetry::global::get_text_map_propagator(|p| {
        if is_set(p) {
            let mut names = vec![TRACEPARENT, TRACESTATE];
            names.extend(p.fields());
            f(&names)
        } else {
            f(&[TRACEPARENT, TRACESTATE])
        }
    })
}

/// Whether a subscriber could take the library's spans: the check their
/// macro makes first, made before anything a span needs is read (without
/// a subscriber, that reading was a fiftieth of a delivery).
#[inline]
pub(crate) fn spans_wanted() -> bool {
    tracing::Level::INFO <= tracing::level_filters::LevelFilter::current()
}

/// The name of the spans of one topic's sends or one subscription's
/// deliveries (`send orders`), where `on`: made once, not a message.
pub(crate) fn span_name(on: bool, operation: &str, resource: &str) -> Option<Box<str>> {
    on.then(|| format!("{operation} {resource}").into_boxed_str())
}

/// Writes `cx` into `attributes` with the global propagator if one is set,
/// else as W3C Trace Context. Writes nothing for a context without a valid
/// span, and no empty value (some backends refuse them; an empty
/// `tracestate` says nothing).
pub fn inject_context(cx: &Context, attributes: &mut Attributes) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut carrier = Carrier(attributes);
    let global = opentelemetry::global::get_text_map_propagator(|p| {
        let set = is_set(p);
        if set {
            p.inject_context(cx, &mut carrier);
        }
        set
    });
    if !global {
        W3c.inject_context(cx, &mut carrier);
    }
}

/// The context `attributes` carry (the producer's), if any, read with the
/// global propagator if one is set, else as W3C Trace Context.
pub fn extract(attributes: &Attributes) -> Option<Context> {
    let carrier = Reader(attributes);
    // From an empty context, not the current one: a message without trace
    // context must not come out with the ambient span as its producer.
    let cx = opentelemetry::global::get_text_map_propagator(|p| {
        is_set(p).then(|| p.extract_with_context(&Context::new(), &carrier))
    })
    .unwrap_or_else(|| W3c.extract_with_context(&Context::new(), &carrier));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Whether the application set `p`: the default global propagator
/// declares no fields.
fn is_set(p: &dyn TextMapPropagator) -> bool {
    p.fields().next().is_some()
}

/// The producer span of one send, named `name` (see [`span_name`]).
pub(crate) fn producer_span(name: &str, system: &'static str, topic: &str) -> Span {
    let span = tracing::info_span!(
        "send",
        otel.name = tracing::field::Empty,
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = system,
        messaging.destination.name = topic,
        messaging.operation.name = "send",
        messaging.operation.type = "send",
        messaging.message.id = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if !span.is_disabled() {
        span.record("otel.name", name);
    }
    span
}

/// Marks a producer span failed.
pub(crate) fn failed(span: &Span, kind: &'static str) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", kind);
}

/// The consumer span of one delivery, named `name` (see [`span_name`]): a
/// child of the producer's span that `attributes` carry (and linked to it),
/// else of the current span.
pub(crate) fn consumer_span(
    name: &str,
    system: &'static str,
    subscription: &str,
    attributes: &Attributes,
    id: impl FnOnce() -> String,
) -> Span {
    let span = tracing::info_span!(
        "process",
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.subscription.name = subscription,
        messaging.operation.name = "process",
        messaging.operation.type = "process",
        messaging.message.id = tracing::field::Empty,
        pubsub.settlement = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    span.record("otel.name", name);
    span.record("messaging.message.id", id());
    if attributes.is_empty() {
        return span;
    }
    if let Some(cx) = extract(attributes) {
        let producer = cx.span().span_context().clone();
        // Fails where no OpenTelemetry layer records the span (nothing to
        // link then); it has not started, so it takes the parent otherwise.
        if span.set_parent(cx).is_ok() {
            span.add_link(producer);
        }
    }
    span
}

/// Records how a delivery was settled on its consumer span.
pub(crate) fn settled(span: &Span, how: &'static str) {
    span.record("pubsub.settlement", how);
}

struct Carrier<'a>(&'a mut Attributes);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.insert(key.to_owned(), value);
        }
    }
}

struct Reader<'a>(&'a Attributes);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// W3C Trace Context (<https://www.w3.org/TR/trace-context/>): written as
/// `opentelemetry_sdk`'s `TraceContextPropagator` writes it, and read as the
/// specification says (a little stricter than the SDK, which also takes
/// short ids); the tests hold the two to each other.
#[derive(Debug)]
struct W3c;

impl TextMapPropagator for W3c {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        injector.set(TRACEPARENT, traceparent(sc));
        injector.set(TRACESTATE, sc.trace_state().header());
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match parse(extractor) {
            Some(sc) => cx.with_remote_span_context(sc),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        // Declares none, so that it is never taken for a propagator the
        // application set.
        opentelemetry::propagation::text_map_propagator::FieldIter::new(&[])
    }
}

/// `00-<trace id>-<span id>-<flags>`, in lower-case hex: written by hand,
/// as it is for every message sent, where formatting machinery costs more
/// than the writing.
fn traceparent(sc: &SpanContext) -> String {
    fn hex(out: &mut String, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    hex(&mut out, &sc.trace_id().to_bytes());
    out.push('-');
    hex(&mut out, &sc.span_id().to_bytes());
    out.push('-');
    hex(
        &mut out,
        &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
    );
    out
}

fn parse(extractor: &dyn Extractor) -> Option<SpanContext> {
    let header = extractor.get(TRACEPARENT)?.trim();
    // The first four parts, and whether more follow, without collecting.
    let mut split = header.split_terminator('-');
    let mut parts = [""; 4];
    for part in &mut parts {
        *part = split.next()?;
    }
    let more = split.next().is_some();
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(parts[0], 2) || !lower_hex(parts[1], 32) || !lower_hex(parts[2], 16) {
        return None;
    }
    if !lower_hex(parts[3], 2) {
        return None;
    }
    let version = u8::from_str_radix(parts[0], 16).ok()?;
    // Version 255 is invalid; version 0 has exactly four parts; later
    // versions may add parts after these four.
    if version == 0xff || (version == 0 && more) {
        return None;
    }
    let trace_id = TraceId::from_hex(parts[1]).ok()?;
    let span_id = SpanId::from_hex(parts[2]).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(parts[3], 16).ok()?) & TraceFlags::SAMPLED;
    let state = extractor
        .get(TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, flags, true, state);
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn context(flags: TraceFlags, state: &str) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            flags,
            true,
            TraceState::from_str(state).unwrap(),
        ))
    }

    #[test]
    fn writes_what_the_sdk_propagator_writes() {
        for (flags, state) in [
            (TraceFlags::SAMPLED, "vendor=a,other=b"),
            (TraceFlags::default(), "k=v"),
        ] {
            let cx = context(flags, state);
            let (mut ours, mut sdk) = (Attributes::new(), Attributes::new());
            W3c.inject_context(&cx, &mut Carrier(&mut ours));
            TraceContextPropagator::new().inject_context(&cx, &mut Carrier(&mut sdk));
            assert_eq!(ours, sdk);
        }
        let mut a = Attributes::new();
        W3c.inject_context(&context(TraceFlags::SAMPLED, ""), &mut Carrier(&mut a));
        assert_eq!(
            a,
            attrs(&[(
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            )]),
            "an empty tracestate is left out (the carrier drops empty values)"
        );
        let mut none = Attributes::new();
        W3c.inject_context(&Context::new(), &mut Carrier(&mut none));
        assert!(none.is_empty(), "no span, nothing written");
    }

    #[test]
    fn reads_what_the_sdk_propagator_reads() {
        let valid = [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
            "02-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-XYZxsf09",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
        ];
        let invalid = [
            "0000-00000000000000000000000000000000-0000000000000000-01",
            "00-ab00000000000000000000000000000000-cd00000000000000-01",
            "00-ab000000000000000000000000000000-cd0000000000000000-01",
            "00-ab000000000000000000000000000000-cd00000000000000-0100",
            "qw-00000000000000000000000000000000-0000000000000000-01",
            "00-AB000000000000000000000000000000-cd00000000000000-01",
            "00-ab000000000000000000000000000000-cd00000000000000-A1",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ];
        let sdk = TraceContextPropagator::new();
        for header in valid.iter().chain(&invalid) {
            let a = attrs(&[(TRACEPARENT, header), (TRACESTATE, "foo=bar")]);
            let ours = W3c.extract(&Reader(&a));
            let theirs = sdk.extract(&Reader(&a));
            assert_eq!(
                ours.span().span_context(),
                theirs.span().span_context(),
                "{header:?}"
            );
            assert_eq!(
                ours.span().span_context().is_valid(),
                valid.contains(header),
                "{header:?}"
            );
        }
        let sc = W3c.extract(&Reader(&attrs(&[(TRACEPARENT, valid[0])])));
        assert!(sc.span().span_context().is_remote());
        assert!(sc.span().span_context().is_sampled());
    }

    #[test]
    fn nothing_to_read_is_no_context() {
        assert!(extract(&Attributes::new()).is_none());
        assert!(extract(&attrs(&[(TRACEPARENT, "garbage")])).is_none());
    }
}
