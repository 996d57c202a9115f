//! CloudEvents, trace context and deadlines on a real bus: what one workload sends is what
//! another receives, malformed events are refused with the reason, and requests honour
//! their deadline.
//!
//! The trace test goes through the real path — `patchbay_telemetry::init` (no OTLP export)
//! installs the `tracing` → OpenTelemetry bridge, and `Bus::publish` injects the context of
//! the current span — so it can run only once per process; [`telemetry`] guards that.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use opentelemetry::baggage::BaggageExt as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use patchbay_bus::deadline::DEADLINE_HEADER;
use patchbay_bus::event::STRUCTURED_CONTENT_TYPE;
use patchbay_bus::reply::{ErrorKind, InvokeReply};
use patchbay_bus::{
    Clock as _, CloudEvent, Deadline, EventError, ManualClock, RequestErrorKind, RequestOptions,
    SystemClock, trace,
};
use patchbay_telemetry::{TelemetryConfig, TelemetryGuard};
use patchbay_tests::{Stack, next_message};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const LIMIT: Duration = Duration::from_secs(10);
const REMOTE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Install telemetry once for this test binary; the guard lives until the process exits.
fn telemetry() {
    static GUARD: OnceLock<TelemetryGuard> = OnceLock::new();
    GUARD.get_or_init(|| {
        let mut cfg = TelemetryConfig::new("patchbay-tests", env!("CARGO_PKG_VERSION"), "events");
        // Spans are filtered like logs: keep the bus's publish spans and this test's own.
        cfg.log_filter =
            "warn,patchbay_bus[publish]=info,patchbay_bus[process]=info,events=info".into();
        patchbay_telemetry::init(&cfg).expect("telemetry initialises once per process")
    });
}

/// An upstream context as a caller's `traceparent`/`tracestate`/`baggage` would carry it.
fn upstream_context() -> Context {
    let sc = SpanContext::new(
        TraceId::from_hex(REMOTE_TRACE).unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "x")]).unwrap(),
    );
    Context::new()
        .with_remote_span_context(sc)
        .with_baggage([KeyValue::new("tenant", "t1")])
}

/// An event with every attribute set.
fn full_event(call: &str) -> CloudEvent {
    let mut event = CloudEvent::new("/patchbay/routing", "cc.call.routed.v1")
        .json(&serde_json::json!({"call": call, "queue": "support", "n": 1}))
        .unwrap()
        .partition_key(call)
        .extension("tenant", "t1");
    event.subject = Some(format!("calls/{call}"));
    event.data_schema = Some("https://patchbay.local/schemas/routed.json".into());
    event
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_event_published_with_trace_context_arrives_with_the_same_trace_id_and_all_attributes()
 {
    telemetry();
    let stack = Stack::start().await;
    let routing = stack.connect("service/routing").await;
    let node = stack.connect("runtime/node-1").await;
    let mut inbox = node.client().subscribe("cc.v1.calls.>").await.unwrap();
    // The node's subscription is registered before routing publishes.
    node.jetstream().query_account().await.unwrap();

    let call = format!("c-{}", uuid::Uuid::now_v7());
    let subject = format!("cc.v1.calls.{call}.routed");
    let sent = full_event(&call);
    let span = tracing::info_span!("route call");
    span.set_parent(upstream_context()).unwrap();
    let sender_trace = trace::span_trace_id(&span).expect("the span is traced");
    assert_eq!(
        sender_trace, REMOTE_TRACE,
        "the span joins the upstream trace"
    );
    routing
        .publish(&subject, &sent, None)
        .instrument(span.clone())
        .await
        .unwrap();

    let msg = next_message(&mut inbox, LIMIT, "the routed event").await;
    assert_eq!(msg.subject.as_str(), subject);
    let got = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload).unwrap();
    assert_eq!(got, sent, "every attribute, extension and the data survive");
    assert_eq!(got.time, sent.time);
    assert_eq!(got.key(), Some(call.as_str()));
    assert_eq!(
        trace::trace_id(msg.headers.as_ref()).as_deref(),
        Some(sender_trace.as_str()),
        "the receiver continues the sender's trace"
    );
    let traceparent = header(msg.headers.as_ref(), trace::TRACEPARENT).unwrap();
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the parent is the publish span, not the upstream one: {traceparent}"
    );
    assert_eq!(
        header(msg.headers.as_ref(), trace::TRACESTATE),
        Some("vendor=x")
    );
    assert_eq!(
        header(msg.headers.as_ref(), trace::BAGGAGE),
        Some("tenant=t1")
    );
    // The receiver's process span joins the same trace.
    let process = trace::process_span(&msg.subject, msg.headers.as_ref());
    assert_eq!(
        trace::span_trace_id(&process).as_deref(),
        Some(REMOTE_TRACE)
    );
    assert_eq!(
        process
            .context()
            .baggage()
            .get("tenant")
            .map(|v| v.as_str().to_owned()),
        Some("t1".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_mode_message_is_accepted_on_receipt() {
    let stack = Stack::start().await;
    let gateway = stack.connect("gateway/gateway").await;
    let node = stack.connect("runtime/node-1").await;
    let mut inbox = node.client().subscribe("cc.v1.calls.>").await.unwrap();
    node.jetstream().query_account().await.unwrap();

    let call = format!("c-{}", uuid::Uuid::now_v7());
    let mut sent = full_event(&call);
    sent.source = "/patchbay/gateway".into();
    sent.ty = "cc.call.incoming.v1".into();
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
    let body = serde_json::to_vec(&sent.to_structured()).unwrap();
    gateway
        .client()
        .publish_with_headers(format!("cc.v1.calls.{call}.incoming"), headers, body.into())
        .await
        .unwrap();

    let msg = next_message(&mut inbox, LIMIT, "the structured event").await;
    let got = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload).unwrap();
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_rejected_with_a_reason() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;

    // On the bus: a message that lacks ce-id decodes to an error naming it.
    let node = stack.connect("runtime/node-1").await;
    let mut inbox = node.client().subscribe("cc.v1.tests.raw").await.unwrap();
    node.jetstream().query_account().await.unwrap();
    let mut headers = CloudEvent::new("/test", "ok").to_headers();
    headers.insert("ce-id", "");
    admin
        .client()
        .publish_with_headers("cc.v1.tests.raw", headers, "{}".into())
        .await
        .unwrap();
    let msg = next_message(&mut inbox, LIMIT, "the malformed message").await;
    assert_eq!(
        CloudEvent::from_message(msg.headers.as_ref(), &msg.payload),
        Err(EventError::MissingAttribute { attribute: "id" })
    );

    // End to end: a subject-triggered function answers a malformed request with BadInput.
    let _runtime = stack.spawn_runtime("node-1");
    let _ = stack.deploy(
        "misbehave",
        "misbehave",
        patchbay_tests::MISBEHAVE_ON_SUBJECT,
    );
    let raw_request = |headers: Option<HeaderMap>| {
        let client = admin.client().clone();
        async move {
            let request = async_nats::Request::new()
                .payload("{\"n\": 1}".into())
                .timeout(Some(LIMIT));
            let request = match headers {
                Some(h) => request.headers(h),
                None => request,
            };
            let reply = client
                .send_request("cc.v1.tests.in".to_owned(), request)
                .await
                .expect("the function replies");
            serde_json::from_slice::<InvokeReply>(&reply.payload)
                .unwrap_or_else(|e| panic!("reply is not an InvokeReply ({e}): {reply:?}"))
        }
    };
    let bad_input = |reply: InvokeReply| match reply {
        InvokeReply::Error {
            kind: ErrorKind::BadInput,
            message,
            ..
        } => message,
        other => panic!("expected a BadInput error, got {other:?}"),
    };

    // A body and no ce-* headers at all.
    let message = bad_input(raw_request(None).await);
    eprintln!("no ce-* headers: {message}");
    assert!(
        message.contains("ce-*"),
        "the reason says what is missing: {message}"
    );
    // ce-* headers without ce-id.
    let mut headers = CloudEvent::new("/test", "ok").to_headers();
    headers.insert("ce-id", "");
    let message = bad_input(raw_request(Some(headers)).await);
    eprintln!("no ce-id: {message}");
    assert!(
        message.contains("\"id\""),
        "the reason names the attribute: {message}"
    );

    // A good event right after still runs, in binary and in structured mode.
    let good = CloudEvent::new("/test", "ok")
        .json(&serde_json::json!({"n": 2}))
        .unwrap();
    let reply = admin
        .request("cc.v1.tests.in", &good, RequestOptions::timeout(LIMIT))
        .await
        .unwrap();
    match serde_json::from_slice::<InvokeReply>(&reply.payload).unwrap() {
        InvokeReply::Ok { outputs, .. } => {
            assert_eq!(outputs.len(), 1);
            assert_eq!(outputs[0]["id"], good.id.as_str());
        }
        other => panic!("the good event failed: {other:?}"),
    }
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
    let structured = CloudEvent::new("/test", "ok");
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(
            serde_json::to_vec(&structured.to_structured())
                .unwrap()
                .into(),
        )
        .timeout(Some(LIMIT));
    let reply = admin
        .client()
        .send_request("cc.v1.tests.in".to_owned(), request)
        .await
        .unwrap();
    match serde_json::from_slice::<InvokeReply>(&reply.payload).unwrap() {
        InvokeReply::Ok { outputs, .. } => assert_eq!(outputs[0]["id"], structured.id.as_str()),
        other => panic!("the structured event failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_honours_the_deadline() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let subject = "cc.v1.tests.deadline";
    let mut listener = admin.client().subscribe(subject).await.unwrap();

    // A deadline that has already passed: refused before anything is sent.
    let clock = ManualClock::at(SystemClock.now_millis());
    let bus = admin.clone().with_clock(Arc::new(clock.clone()));
    let deadline = Deadline::after(&clock, Duration::from_secs(1));
    clock.advance(Duration::from_secs(2));
    let event = CloudEvent::new("/test", "ok");
    let err = bus
        .request(
            subject,
            &event,
            RequestOptions::timeout(LIMIT).deadline(Some(deadline)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, RequestErrorKind::DeadlineExceeded, "{err}");
    // Nothing went out: the next message the listener sees is the sentinel published after.
    admin
        .client()
        .publish(subject, "sentinel".into())
        .await
        .unwrap();
    let first = next_message(&mut listener, LIMIT, "the sentinel").await;
    assert_eq!(
        first.payload.as_ref(),
        b"sentinel",
        "the expired request was sent: {first:?}"
    );

    // A live deadline travels with the request and is never extended by a longer timeout.
    let deadline = Deadline::after(&SystemClock, Duration::from_secs(5));
    let responder = {
        let client = admin.client().clone();
        tokio::spawn(async move {
            let msg = next_message(&mut listener, LIMIT, "the request").await;
            let seen = header(msg.headers.as_ref(), DEADLINE_HEADER).map(str::to_owned);
            client
                .publish(
                    msg.reply.expect("a request has a reply subject"),
                    "pong".into(),
                )
                .await
                .unwrap();
            seen
        })
    };
    let reply = admin
        .request(
            subject,
            &event,
            RequestOptions::timeout(Duration::from_secs(60)).deadline(Some(deadline)),
        )
        .await
        .unwrap();
    assert_eq!(reply.payload.as_ref(), b"pong");
    assert_eq!(
        responder.await.unwrap(),
        Some(deadline.epoch_millis().to_string()),
        "the responder sees the caller's deadline, not 60 s from now"
    );

    // Nobody listening: told so at once, not after the timeout.
    let err = admin
        .request(
            "cc.v1.tests.nobody",
            &event,
            RequestOptions::timeout(Duration::from_secs(60)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, RequestErrorKind::NoResponders, "{err}");
}
