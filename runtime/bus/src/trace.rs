//! W3C trace context on NATS headers.
//!
//! `traceparent`, `tracestate` and `baggage` travel on every publish, request and
//! JetStream message, injected from the current `tracing` span (backed by OpenTelemetry
//! through `patchbay-telemetry`) and extracted into the `process` span of the receiver.
//! A message without context starts a root span. The propagators are fixed here rather
//! than taken from the global registry so the wire format never depends on set-up order.
//!
//! Redeliveries: every delivery of a JetStream message gets its own `process` span, a
//! child of the context the message carries, with the broker's delivery count in
//! [`DELIVERY_COUNT`] (1 for the first attempt). A redelivery (count > 1) also carries a
//! span link to that context, with link attributes [`DELIVERY_COUNT`] and
//! [`LINK_REASON`]` = "redelivery"`. The message is stored once and redelivered byte for
//! byte, so the one context every attempt can know is the one the first attempt was
//! processed under; the link names it explicitly, and the first attempt is the linked
//! context's `process` child with delivery count 1. A message that arrived without
//! context has nothing to link to: each attempt is its own root, and the attempts share
//! `messaging.message.id` (the `ce-id`). Consumers get all of this from
//! [`crate::Bus::process_delivery`].
//!
//! Edges: every message also carries its sender's identity in [`FROM`], so a receiver can
//! count who talks to whom ([`BusMetrics`]: `patchbay_bus_messages_published_total` and
//! `patchbay_bus_messages_received_total`, labelled by [`subject_class`]) and a service
//! graph can be drawn from metrics alone.

use std::sync::LazyLock;

use async_nats::HeaderMap;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use patchbay_telemetry::Metrics;
use prometheus::IntCounterVec;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::subject::{Subjects, Token};

/// Header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// Header carrying W3C baggage.
pub const BAGGAGE: &str = "baggage";
/// Header carrying the sender's workload identity as `kind/name` (e.g. `service/routing`),
/// from its certificate, set by every [`crate::Bus`] publish and request. Informational:
/// it labels edge metrics and is never used for access decisions (NATS permissions are).
pub const FROM: &str = "patchbay-from";
/// The `from`/`to` label when an identity is missing or malformed.
pub const UNKNOWN_IDENTITY: &str = "unknown";
/// Attribute of a `process` span and of its redelivery link: how many times the broker
/// has delivered the message, this delivery included (1 = first attempt). Only JetStream
/// consumers know it.
pub const DELIVERY_COUNT: &str = "messaging.message.delivery_count";
/// Attribute of a span link saying why the span links to another context
/// (`redelivery`).
pub const LINK_REASON: &str = "patchbay.link.reason";

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

/// Edge metrics: who published to whom, by subject class. Register once per registry and
/// give a clone to every [`crate::BusConfig`] (see [`crate::BusConfig::metrics`]); a `Bus`
/// without them counts nothing.
#[derive(Debug, Clone)]
pub struct BusMetrics {
    published: IntCounterVec,
    received: IntCounterVec,
    stored_per_commit: prometheus::HistogramVec,
}

/// Buckets of `patchbay_bus_stored_per_commit`: 1 to the largest atomic batch.
const PER_COMMIT_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
];

impl BusMetrics {
    /// Registers `patchbay_bus_messages_published_total{from,subject_class}` and
    /// `patchbay_bus_messages_received_total{from,to,subject_class}` in `metrics`.
    pub fn register(metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        Ok(Self {
            published: metrics.counter_vec(
                "patchbay_bus_messages_published_total",
                "Messages this process sent on the bus (publish, durable publish acknowledged \
                 by its stream, answered request), by sender identity and subject class.",
                &["from", "subject_class"],
            )?,
            received: metrics.counter_vec(
                "patchbay_bus_messages_received_total",
                "Messages this process took up for processing, by sender identity (the \
                 patchbay-from header), receiver identity and subject class.",
                &["from", "to", "subject_class"],
            )?,
            stored_per_commit: metrics.histogram_vec(
                "patchbay_bus_stored_per_commit",
                "Messages stored per commit to a stream, by how they were sent (single: one \
                 durable publish; pipelined: one of several acked one by one; atomic: one \
                 atomic batch). Under sync_interval: always each commit costs the server \
                 one fsync, so _sum / _count is messages per fsync.",
                &["mode"],
                &PER_COMMIT_BUCKETS,
            )?,
        })
    }

    pub(crate) fn stored_per_commit(&self, mode: &str, messages: usize) {
        self.stored_per_commit
            .with_label_values(&[mode])
            .observe(messages as f64);
    }

    pub(crate) fn published(&self, from: &str, subject_class: &str) {
        self.published
            .with_label_values(&[from, subject_class])
            .inc();
    }

    pub(crate) fn received(&self, from: &str, to: &str, subject_class: &str) {
        self.received
            .with_label_values(&[from, to, subject_class])
            .inc();
    }
}

/// `kind/name` of a SPIFFE identity, the form [`FROM`] carries.
pub(crate) fn identity_label(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The sender named by the [`FROM`] header, if it is a well-formed `kind/name` (two subject
/// tokens). Anything else — absent, garbled, oversized — is `None`, so a misbehaving client
/// cannot invent label values beyond the token grammar.
#[must_use]
pub fn sender(headers: Option<&HeaderMap>) -> Option<&str> {
    let value = headers?.get(FROM)?.as_str();
    let (kind, name) = value.split_once('/')?;
    (Token::new(kind).is_ok() && Token::new(name).is_ok()).then_some(value)
}

/// The bounded label a subject is counted under (the installation prefix removed):
///
/// * `patchbay.…` subjects are kept whole — the only variable token is a function name,
///   bounded by what is deployed (`patchbay.v1.fn.echo.invoke`);
/// * `_INBOX.…` reply subjects become `_INBOX.>`, `$…` system subjects `$<first token>.>`;
/// * every other subject of five or more tokens, `<domain>.<version>.<entity>.<id>.<rest…>`,
///   has its fourth token (an entity id) replaced by `*`: `cc.v1.calls.c-17.routed` →
///   `cc.v1.calls.*.routed`, `cc.v1.agents.a1.cmd.accept` → `cc.v1.agents.*.cmd.accept`;
///   shorter subjects (`cc.v1.customers.lookup`, `cc.v1.queues.stats`) are kept whole.
#[must_use]
pub fn subject_class(subjects: &Subjects, subject: &str) -> String {
    let tail = subjects.strip(subject).unwrap_or(subject);
    if tail.starts_with("_INBOX.") {
        return "_INBOX.>".to_owned();
    }
    if tail.starts_with('$') {
        let first = tail.split('.').next().unwrap_or(tail);
        return format!("{first}.>");
    }
    if tail.starts_with("patchbay.") {
        return tail.to_owned();
    }
    let tokens: Vec<&str> = tail.split('.').collect();
    if tokens.len() < 5 {
        return tail.to_owned();
    }
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| if i == 3 { "*" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// A consumer-side `process` span for a message on `subject`, following OpenTelemetry
/// messaging conventions, whose parent is the context the message carries (a root span
/// when it carries none). JetStream consumers add the delivery with [`record_delivery`].
#[must_use]
pub fn process_span(subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
    // The CloudEvent id (binary mode), which every delivery of the message shares.
    let message_id = headers.and_then(|h| h.get("ce-id")).map(|v| v.as_str());
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {subject}"),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
        messaging.message.delivery_count = tracing::field::Empty,
    );
    let _ = span.set_parent(extract(headers));
    span
}

/// Records on `span` (a [`process_span`] not yet entered) that it handles delivery number
/// `delivered` of a JetStream message carrying `headers`; a redelivery also gets a span
/// link to the message's context, the one its first attempt was processed under (see the
/// module documentation).
pub fn record_delivery(span: &tracing::Span, headers: Option<&HeaderMap>, delivered: u64) {
    span.record(DELIVERY_COUNT, delivered);
    if delivered > 1 {
        let cx = extract(headers);
        let first = cx.span().span_context().clone();
        // An invalid context (the message carried none) is ignored by `add_link`.
        span.add_link_with_attributes(
            first,
            vec![
                KeyValue::new(DELIVERY_COUNT, i64::try_from(delivered).unwrap_or(i64::MAX)),
                KeyValue::new(LINK_REASON, "redelivery"),
            ],
        );
    }
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
    fn subject_classes_collapse_entity_ids_and_keep_bounded_names() {
        let plain = Subjects::default();
        let prefixed = Subjects::new("acme.").unwrap_or_default();
        let cases = [
            ("cc.v1.calls.c-17.routed", "cc.v1.calls.*.routed"),
            ("cc.v1.agents.a1.cmd.accept", "cc.v1.agents.*.cmd.accept"),
            ("cc.v1.customers.lookup", "cc.v1.customers.lookup"),
            ("cc.v1.queues.stats", "cc.v1.queues.stats"),
            ("patchbay.v1.fn.echo.invoke", "patchbay.v1.fn.echo.invoke"),
            ("patchbay.v1.dlq.echo", "patchbay.v1.dlq.echo"),
            ("_INBOX.runtime.node-1.abc.def", "_INBOX.>"),
            ("$JS.API.STREAM.INFO.X", "$JS.>"),
        ];
        for (subject, class) in cases {
            assert_eq!(subject_class(&plain, subject), class, "{subject}");
            // Inboxes and `$` subjects are never prefixed on the wire.
            let wire = if subject.starts_with(['_', '$']) {
                subject.to_owned()
            } else {
                prefixed.full(subject)
            };
            assert_eq!(subject_class(&prefixed, &wire), class, "{wire}");
        }
    }

    #[test]
    fn sender_accepts_only_kind_slash_name() {
        let mut h = HeaderMap::new();
        assert_eq!(sender(None), None);
        assert_eq!(sender(Some(&h)), None);
        h.insert(FROM, "service/routing");
        assert_eq!(sender(Some(&h)), Some("service/routing"));
        for bad in ["routing", "service/routing/x", "a b/c", "/x", "x/"] {
            let mut h = HeaderMap::new();
            h.insert(FROM, bad);
            assert_eq!(sender(Some(&h)), None, "{bad}");
        }
    }

    #[test]
    fn messages_without_context_have_no_trace_id() {
        assert_eq!(trace_id(None), None);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, "garbage");
        assert_eq!(trace_id(Some(&h)), None);
    }
}
