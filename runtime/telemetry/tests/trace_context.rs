//! `init` with export off still gives every span a real OpenTelemetry context and installs
//! the W3C TraceContext + Baggage propagator, so a hop can inject `traceparent` and the next
//! hop can continue the trace. Its own test binary, because `init` sets process globals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use opentelemetry::KeyValue;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::trace::TraceContextExt;
use patchbay_telemetry::{TelemetryConfig, TelemetryError, init};
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[test]
fn spans_carry_trace_context_across_a_hop_without_export() {
    let cfg = TelemetryConfig::new("patchbay-test", "0.0.0", "node-a");
    let guard = init(&cfg).unwrap();
    assert!(!guard.is_exporting());

    // Publisher side: the bus injects the current span's context into message headers.
    let publish = tracing::info_span!("publish");
    let sent = publish.context().span().span_context().clone();
    assert!(sent.is_valid(), "span has no trace id: {sent:?}");
    assert!(
        sent.is_sampled(),
        "root spans are sampled so exporting hops keep them"
    );
    let cx = publish
        .context()
        .with_baggage(vec![KeyValue::new("tenant", "acme")]);
    let mut headers = HashMap::<String, String>::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut headers));
    assert_eq!(
        headers.get("traceparent"),
        Some(&format!("00-{}-{}-01", sent.trace_id(), sent.span_id()))
    );
    assert_eq!(
        headers.get("baggage").map(String::as_str),
        Some("tenant=acme")
    );

    // Consumer side: extract and continue the same trace.
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&headers));
    assert_eq!(
        parent.baggage().get("tenant").map(|v| v.to_string()),
        Some("acme".to_owned())
    );
    let process = tracing::info_span!("process");
    process.set_parent(parent).unwrap();
    let received = process.context().span().span_context().clone();
    assert_eq!(received.trace_id(), sent.trace_id());
    assert_ne!(received.span_id(), sent.span_id());

    let again = init(&cfg).unwrap_err();
    assert!(
        matches!(again, TelemetryError::AlreadyInitialized { .. }),
        "{again:?}"
    );
    guard.shutdown().unwrap();
}
