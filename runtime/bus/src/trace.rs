//! W3C trace context on NATS headers.
//!
//! `traceparent`, `tracestate` and `baggage` travel on every publish, request and
//! JetStream message, injected from the current `tracing` span (backed by OpenTelemetry
//! through `patchbay-telemetry`) and extracted into the `process` span of the receiver.
//! A message without context starts a root span. The propagators are fixed here rather
//! than taken from the global registry so the wire format never depends on set-up order.

use std::sync::LazyLock;

use async_nats::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// Header carrying W3C baggage.
pub const BAGGAGE: &str = "baggage";

static PROPAGATOR: LazyLock<TextMapCompositePropagator> = LazyLock::new(|| {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
});

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.last())
            .map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(|(name, _)| AsRef::<str>::as_ref(name))
            .collect()
    }
}

/// Write the trace context of `cx` into `headers`.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    PROPAGATOR.inject_context(cx, &mut HeaderInjector(headers));
}

/// Write the trace context of `span` into `headers` (nothing when tracing is off).
pub fn inject_span(span: &tracing::Span, headers: &mut HeaderMap) {
    inject(&span.context(), headers);
}

/// The context carried by `headers`, or an empty one (so the receiver starts a root span).
#[must_use]
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => PROPAGATOR.extract(&HeaderExtractor(h)),
        None => Context::new(),
    }
}

/// The context carried by any other carrier (HTTP headers at the gateway), read with the
/// same propagators as NATS headers.
#[must_use]
pub fn extract_from(carrier: &dyn Extractor) -> Context {
    PROPAGATOR.extract(carrier)
}

/// Write the trace context of `cx` into any other carrier (HTTP response headers).
pub fn inject_into(cx: &Context, carrier: &mut dyn Injector) {
    PROPAGATOR.inject_context(cx, carrier);
}

/// The trace id carried by `headers` as 32 lower-case hex digits, if a valid
/// `traceparent` is present.
#[must_use]
pub fn trace_id(headers: Option<&HeaderMap>) -> Option<String> {
    let cx = extract(headers);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id of `span`, if it is being traced.
#[must_use]
pub fn span_trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A consumer-side `process` span for a message on `subject`, following OpenTelemetry
/// messaging conventions, whose parent is the context the message carries (a root span
/// when it carries none).
#[must_use]
pub fn process_span(subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {subject}"),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = subject,
    );
    let _ = span.set_parent(extract(headers));
    span
}

/// A producer-side `publish` span for a message to `subject`.
#[must_use]
pub fn publish_span(subject: &str, message_id: &str) -> tracing::Span {
    tracing::info_span!(
        "publish",
        otel.name = format!("publish {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn trace_context_survives_inject_and_extract() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap_or_default(),
        );
        let cx = Context::new().with_remote_span_context(sc);
        let mut headers = HeaderMap::new();
        inject(&cx, &mut headers);
        assert_eq!(
            headers.get(TRACEPARENT).map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            headers.get(TRACESTATE).map(|v| v.as_str()),
            Some("vendor=x")
        );
        assert_eq!(
            trace_id(Some(&headers)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn messages_without_context_have_no_trace_id() {
        assert_eq!(trace_id(None), None);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, "garbage");
        assert_eq!(trace_id(Some(&h)), None);
    }
}
