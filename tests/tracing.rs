//! Distributed tracing end to end: every binary exports its spans over OTLP/HTTP to a
//! receiver the test starts (tests/common/otlp.rs), and the tests assert what arrives —
//! trace ids, span names, parent span ids and links — across real processes on a real
//! nats-server with mTLS.
//!
//! * One call, HTTP to assignment: the gateway, routing (with the `customer-lookup`
//!   function answering its request), the agents service and a function triggered by the
//!   `assigned` event all join the trace the caller's `traceparent` names, with
//!   `tracestate` and `baggage` intact. The offer is answered by a second HTTP request
//!   (the agent desktop's accept); it carries the `traceparent` of the `offered` event the
//!   desktop was shown, so the assignment half continues the same trace — that is what
//!   "one trace per call" means here.
//! * A message without trace context starts a root `process` span, and its dead letter
//!   names that root's trace.
//! * A redelivered JetStream message gets a second `process` span that links to the
//!   context its first attempt was processed under (see runtime/bus/src/trace.rs).
//!
//! Spans are exported in batches every few seconds, so every wait for them is a bounded
//! poll of the receiver, never a sleep.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use async_nats::HeaderMap;
use patchbay_protocol::payload::{AgentState, CallIncoming, OfferAnswer, SetAgentState};
use patchbay_tests::gateway::http_client;
use patchbay_tests::otlp::{Collector, Exported, attribute};
use patchbay_tests::{
    Process, Stack, eventually, free_port, next_message, publish_json, wait_ready,
    wait_until_serving,
};
use serde_json::json;

/// Bound for readiness, deliveries and span export (batches leave every 5 s).
const PATIENCE: Duration = Duration::from_secs(60);

/// The parent span id the tests' callers put in their `traceparent`.
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A fresh trace id and the `traceparent` naming it with [`CALLER_SPAN`] as parent.
fn traceparent() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    (format!("00-{trace_id}-{CALLER_SPAN}-01"), trace_id)
}

/// `OTEL_*` settings that make a binary export every span to `collector`.
fn otel_env(endpoint: &str) -> [(&str, &str); 2] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_TRACES_SAMPLER", "always_on"),
    ]
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

/// One line per span, for failure messages.
fn listing(spans: &[Exported]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {:<18} {:<48} span {} parent {:?} path {:?}",
                s.service,
                s.name(),
                s.span_id(),
                s.parent_id(),
                s.attribute("url.path")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The only span of `service` named `name` (and, when given, with `url.path` = `path`).
fn one<'a>(spans: &'a [Exported], service: &str, name: &str, path: Option<&str>) -> &'a Exported {
    let found: Vec<&Exported> = spans
        .iter()
        .filter(|s| {
            s.service == service
                && s.name() == name
                && path.is_none_or(|p| s.attribute("url.path").as_deref() == Some(p))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {service} span {name:?} (path {path:?}) in:\n{}",
        listing(spans)
    );
    found[0]
}

/// Whether `spans` hold one of `service` named `name` (and `url.path` = `path`).
fn has(spans: &[Exported], service: &str, name: &str, path: Option<&str>) -> bool {
    spans.iter().any(|s| {
        s.service == service
            && s.name() == name
            && path.is_none_or(|p| s.attribute("url.path").as_deref() == Some(p))
    })
}

fn assert_child(child: &Exported, parent: &Exported, spans: &[Exported]) {
    assert_eq!(
        child.parent_id().as_deref(),
        Some(parent.span_id().as_str()),
        "{} ({}) should be a child of {} ({}):\n{}",
        child.name(),
        child.service,
        parent.name(),
        parent.service,
        listing(spans)
    );
}

/// Start `bin` as `identity` with `env` and wait until its admin listener is ready.
async fn start_service(
    stack: &Stack,
    bin: &str,
    identity: &str,
    name: &str,
    env: &[(&str, &str)],
) -> Process {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut all = vec![("PATCHBAY_ADMIN_LISTEN", admin.as_str())];
    all.extend_from_slice(env);
    let process = stack.spawn_binary(bin, identity, name, &[], &all);
    wait_ready(&admin, PATIENCE).await;
    process
}

/// Routing rules with no schedule (always open): every call goes to `general`, needing
/// `english` at level 3 or better.
const RULES: &str = r#"
default_tier = "standard"

[[queues]]
name = "general"

[default]
queue = "general"
skills = { english = 3 }
"#;

/// Waits for the next message on `sub` whose subject is `subject`.
async fn next_on(sub: &mut async_nats::Subscriber, subject: &str) -> async_nats::Message {
    loop {
        let msg = next_message(sub, PATIENCE, subject).await;
        if msg.subject.as_str() == subject {
            return msg;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_from_http_to_assignment_is_one_trace_across_every_hop() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let otel = otel_env(&endpoint);
    let stack = Stack::start().await;
    let admin = stack.admin().await;

    let _node = stack.spawn_runtime_with_env("node-1", &otel);
    wait_until_serving(&admin, &["node-1"], None, PATIENCE).await;
    let _ = stack.deploy_customer_lookup();
    // Downstream of the assignment: a function on the stored `assigned` events.
    let _ = stack.deploy(
        "echo",
        "assigned-echo",
        &[
            "--trigger",
            "stream:CC_CALLS:cc.v1.calls.*.assigned",
            "--publish",
            "cc.v1.tests.>",
            "--config",
            "out=cc.v1.tests.assigned",
        ],
    );

    let rules = stack.state_dir().join("routing.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut routing_env = vec![
        ("PATCHBAY_ROUTING_RULES", rules.to_str().unwrap()),
        // Generous: a freshly deployed function's first call may be slow on a busy machine.
        ("PATCHBAY_ROUTING_LOOKUP_TIMEOUT", "10s"),
    ];
    routing_env.extend_from_slice(&otel);
    let _routing = start_service(
        &stack,
        "patchbay-routing",
        "service/routing",
        "routing",
        &routing_env,
    )
    .await;
    let agents_config = stack.state_dir().join("agents.toml");
    std::fs::write(&agents_config, "offer_timeout_ms = 120000\n").unwrap();
    let mut agents_env = vec![
        ("PATCHBAY_AGENTS_CONFIG", agents_config.to_str().unwrap()),
        ("PATCHBAY_AGENTS_INSTANCE", "agents-1"),
    ];
    agents_env.extend_from_slice(&otel);
    let _agents = start_service(
        &stack,
        "patchbay-agents",
        "service/agents",
        "agents",
        &agents_env,
    )
    .await;
    let gateway = stack.spawn_gateway_with_env(&[], "http", &otel).await;
    let token = stack.token(
        "desk",
        &[
            "publish:cc.v1.calls.*.incoming",
            "publish:cc.v1.agents.*.cmd.>",
        ],
        &[],
    );
    let client = http_client(None);
    let post = |subject: &str, ty: &str, data: serde_json::Value| {
        client
            .post(format!("{}/v1/events/{subject}", gateway.url))
            .bearer_auth(&token)
            .header("ce-specversion", "1.0")
            .header("ce-id", uuid::Uuid::new_v4().to_string())
            .header("ce-source", "/tests/desk")
            .header("ce-type", ty)
            .header("content-type", "application/json")
            .body(data.to_string())
    };
    let mut events = admin.client().subscribe("cc.v1.>").await.unwrap();
    admin.client().flush().await.unwrap();

    // An agent logs in (a trace of its own).
    let login = SetAgentState {
        agent_id: "a1".into(),
        state: AgentState::Available,
        profile: Some(
            serde_json::from_value(json!({
                "skills": [{ "skill": "english", "level": 5 }],
                "queues": [{ "queue": "general" }]
            }))
            .unwrap(),
        ),
    };
    let response = post(
        "cc.v1.agents.a1.cmd.state",
        SetAgentState::TYPE,
        serde_json::to_value(&login).unwrap(),
    )
    .send()
    .await
    .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let _ = next_on(&mut events, "cc.v1.agents.a1.evt.state-changed").await;

    // The call comes in over HTTP with the caller's trace context.
    let (tp, trace_id) = traceparent();
    let call = CallIncoming {
        call_id: "c1".into(),
        dialled: "+448000111222".into(),
        caller: "+44 20 7946 0000".into(),
        ..CallIncoming::default()
    };
    let response = post(
        "cc.v1.calls.c1.incoming",
        CallIncoming::TYPE,
        serde_json::to_value(&call).unwrap(),
    )
    .header("traceparent", &tp)
    .header("tracestate", "vendor=x")
    .header("baggage", "tenant=acme")
    .send()
    .await
    .unwrap();
    assert!(response.status().is_success(), "{response:?}");

    // The offer reaches the desktop with the call's trace, state and baggage.
    let offered = next_on(&mut events, "cc.v1.calls.c1.offered").await;
    let offered_headers = offered.headers.clone().unwrap_or_default();
    assert_eq!(
        patchbay_bus::trace::trace_id(Some(&offered_headers)).as_deref(),
        Some(trace_id.as_str()),
        "the offer continues the call's trace"
    );
    assert_eq!(header(&offered_headers, "tracestate"), Some("vendor=x"));
    assert!(
        header(&offered_headers, "baggage").is_some_and(|b| b.contains("tenant=acme")),
        "baggage lost on the way to the offer: {offered_headers:?}"
    );

    // The desktop accepts, continuing the trace of the offer it was shown.
    let offer_parent = header(&offered_headers, "traceparent").unwrap().to_owned();
    let answer = OfferAnswer {
        agent_id: "a1".into(),
        call_id: "c1".into(),
    };
    let response = post(
        "cc.v1.agents.a1.cmd.accept",
        OfferAnswer::ACCEPT,
        serde_json::to_value(&answer).unwrap(),
    )
    .header("traceparent", &offer_parent)
    .header("tracestate", "vendor=x")
    .header("baggage", "tenant=acme")
    .send()
    .await
    .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let assigned = next_on(&mut events, "cc.v1.calls.c1.assigned").await;
    assert_eq!(
        patchbay_bus::trace::trace_id(assigned.headers.as_ref()).as_deref(),
        Some(trace_id.as_str())
    );
    // The function downstream of `assigned` publishes within the same trace, baggage kept.
    let echoed = next_on(&mut events, "cc.v1.tests.assigned").await;
    let echoed_headers = echoed.headers.clone().unwrap_or_default();
    assert_eq!(
        patchbay_bus::trace::trace_id(Some(&echoed_headers)).as_deref(),
        Some(trace_id.as_str())
    );
    assert!(
        header(&echoed_headers, "baggage").is_some_and(|b| b.contains("tenant=acme")),
        "baggage lost on the way to the downstream function: {echoed_headers:?}"
    );

    // Every hop's spans, as exported.
    const GW: &str = "patchbay-gateway";
    const ROUTING: &str = "patchbay-routing";
    const RUNTIME: &str = "patchbay-runtime";
    const AGENTS: &str = "patchbay-agents";
    const HTTP: &str = "POST /v1/events/{subject}";
    let incoming_path = Some("/v1/events/cc.v1.calls.c1.incoming");
    let accept_path = Some("/v1/events/cc.v1.agents.a1.cmd.accept");
    let expected: [(&str, &str, Option<&str>); 16] = [
        (GW, HTTP, incoming_path),
        (GW, "publish cc.v1.calls.c1.incoming", None),
        (ROUTING, "process cc.v1.calls.c1.incoming", None),
        (ROUTING, "publish cc.v1.customers.lookup", None),
        (RUNTIME, "process cc.v1.customers.lookup", None),
        (RUNTIME, "invoke customer-lookup", None),
        (ROUTING, "publish cc.v1.calls.c1.routed", None),
        (AGENTS, "process cc.v1.calls.c1.routed", None),
        (AGENTS, "publish cc.v1.calls.c1.offered", None),
        (GW, HTTP, accept_path),
        (GW, "publish cc.v1.agents.a1.cmd.accept", None),
        (AGENTS, "process cc.v1.agents.a1.cmd.accept", None),
        (AGENTS, "publish cc.v1.calls.c1.assigned", None),
        (RUNTIME, "process cc.v1.calls.c1.assigned", None),
        (RUNTIME, "invoke assigned-echo", None),
        (RUNTIME, "publish cc.v1.tests.assigned", None),
    ];
    let spans = eventually(PATIENCE, "every hop's spans of the call", || async {
        let spans = collector.trace(&trace_id);
        expected
            .iter()
            .all(|(service, name, path)| has(&spans, service, name, *path))
            .then_some(spans)
    })
    .await;
    let s: Vec<&Exported> = expected
        .iter()
        .map(|(service, name, path)| one(&spans, service, name, *path))
        .collect();

    // Parentage, hop by hop: the caller → gateway → routing → lookup function, routing →
    // agents → offer; the offer → (desktop) gateway → agents → assignment → function.
    assert_eq!(s[0].parent_id().as_deref(), Some(CALLER_SPAN));
    for (child, parent) in [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
        (5, 4),
        (6, 2),
        (7, 6),
        (8, 7),
        (9, 8),
        (10, 9),
        (11, 10),
        (12, 11),
        (13, 12),
        (14, 13),
        (15, 13),
    ] {
        assert_child(s[child], s[parent], &spans);
    }
    // Every span of the trace keeps the caller's tracestate.
    for span in &spans {
        assert_eq!(
            span.span.trace_state,
            "vendor=x",
            "{} ({}) lost the tracestate",
            span.name(),
            span.service
        );
    }
    // JetStream deliveries say which attempt they were; the offer's own delivery too.
    for i in [2, 7, 11, 13] {
        assert_eq!(
            s[i].attribute("messaging.message.delivery_count")
                .as_deref(),
            Some("1"),
            "{}",
            s[i].name()
        );
        assert!(s[i].span.links.is_empty(), "a first delivery links nowhere");
    }
}

/// `fn deploy` flags for the `misbehave` fixture on stored recordings events.
fn on_recordings(extra: &[&'static str]) -> Vec<&'static str> {
    let mut flags = vec![
        "--trigger",
        "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
        "--publish",
        "cc.v1.recordings.*.indexed",
        "--config",
        "out=cc.v1.recordings.traced.indexed",
    ];
    flags.extend_from_slice(extra);
    flags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_context_starts_a_root_span_and_dead_letters_carry_their_trace_id() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime_with_env("node-1", &otel_env(&endpoint));
    let _ = stack.deploy("misbehave", "refuser", &on_recordings(&[]));

    let bare = publish_json(
        &admin,
        "cc.v1.recordings.bare.completed",
        "dead-letter",
        &json!({}),
        None,
    )
    .await;
    let (tp, trace_id) = traceparent();
    let traced = publish_json(
        &admin,
        "cc.v1.recordings.traced.completed",
        "dead-letter",
        &json!({}),
        Some(&tp),
    )
    .await;

    let rows = eventually(PATIENCE, "both dead letters", || async {
        let rows = stack
            .cli(&["fn", "dlq", "ls", "refuser", "--json"])
            .success()
            .json();
        let rows = rows.as_array().cloned().unwrap_or_default();
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let trace_of = |event_id: &str| -> String {
        let row = rows
            .iter()
            .find(|r| r["event_id"] == event_id)
            .unwrap_or_else(|| panic!("no dead letter for {event_id}: {rows:?}"));
        row["trace_id"]
            .as_str()
            .unwrap_or_else(|| panic!("dead letter without a trace id: {row}"))
            .to_owned()
    };
    // With context: the dead letter names the sender's trace.
    assert_eq!(trace_of(&traced), trace_id);
    // Without: it names the root trace the message was processed in ...
    let root_trace = trace_of(&bare);
    assert_ne!(root_trace, trace_id);
    let spans = eventually(PATIENCE, "the bare message's spans", || async {
        let spans = collector.trace(&root_trace);
        (has(
            &spans,
            "patchbay-runtime",
            "process cc.v1.recordings.bare.completed",
            None,
        ) && has(&spans, "patchbay-runtime", "invoke refuser", None))
        .then_some(spans)
    })
    .await;
    // ... whose process span is a root, with the function's invocation under it.
    let process = one(
        &spans,
        "patchbay-runtime",
        "process cc.v1.recordings.bare.completed",
        None,
    );
    assert_eq!(process.parent_id(), None, "{}", listing(&spans));
    assert_eq!(
        process.attribute("messaging.message.id").as_deref(),
        Some(bare.as_str())
    );
    let invoke = one(&spans, "patchbay-runtime", "invoke refuser", None);
    assert_child(invoke, process, &spans);

    // The traced message's process span continues the sender's span instead.
    let spans = eventually(PATIENCE, "the traced message's process span", || async {
        let spans = collector.trace(&trace_id);
        has(
            &spans,
            "patchbay-runtime",
            "process cc.v1.recordings.traced.completed",
            None,
        )
        .then_some(spans)
    })
    .await;
    let process = one(
        &spans,
        "patchbay-runtime",
        "process cc.v1.recordings.traced.completed",
        None,
    );
    assert_eq!(process.parent_id().as_deref(), Some(CALLER_SPAN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_links_its_process_span_to_the_first_attempts_context() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime_with_env("node-1", &otel_env(&endpoint));
    // `retry` asks for a retry on the first delivery and succeeds on the second.
    let _ = stack.deploy(
        "misbehave",
        "retrier",
        &on_recordings(&["--config", "succeed_after=2"]),
    );

    let (tp, trace_id) = traceparent();
    let _ = publish_json(
        &admin,
        "cc.v1.recordings.traced.completed",
        "retry",
        &json!({}),
        Some(&tp),
    )
    .await;

    const PROCESS: &str = "process cc.v1.recordings.traced.completed";
    let attempts = eventually(PATIENCE, "both attempts' process spans", || async {
        let spans = collector.trace(&trace_id);
        let attempts: Vec<Exported> = spans
            .iter()
            .filter(|s| s.name() == PROCESS)
            .cloned()
            .collect();
        let invokes = spans
            .iter()
            .filter(|s| s.name() == "invoke retrier")
            .count();
        (attempts.len() == 2 && invokes == 2).then_some((attempts, spans))
    })
    .await;
    let (attempts, spans) = attempts;
    let attempt = |n: &str| {
        attempts
            .iter()
            .find(|s| s.attribute("messaging.message.delivery_count").as_deref() == Some(n))
            .unwrap_or_else(|| panic!("no attempt {n}:\n{}", listing(&spans)))
    };
    let (first, second) = (attempt("1"), attempt("2"));
    // Both deliveries continue the sender's span ...
    assert_eq!(first.parent_id().as_deref(), Some(CALLER_SPAN));
    assert_eq!(second.parent_id().as_deref(), Some(CALLER_SPAN));
    assert!(first.span.links.is_empty(), "{:?}", first.span.links);
    // ... and the redelivery links to the context the first attempt was processed under.
    assert_eq!(second.span.links.len(), 1, "{:?}", second.span.links);
    let link = &second.span.links[0];
    assert_eq!(patchbay_tests::otlp::hex(&link.trace_id), trace_id);
    assert_eq!(
        patchbay_tests::otlp::hex(&link.span_id),
        first.parent_id().unwrap()
    );
    assert_eq!(
        attribute(&link.attributes, "patchbay.link.reason").as_deref(),
        Some("redelivery")
    );
    assert_eq!(
        attribute(&link.attributes, "messaging.message.delivery_count").as_deref(),
        Some("2")
    );
    // Each attempt ran the function once, under its own process span.
    for process in [first, second] {
        let invokes: Vec<&Exported> = spans
            .iter()
            .filter(|s| {
                s.name() == "invoke retrier"
                    && s.parent_id().as_deref() == Some(process.span_id().as_str())
            })
            .collect();
        assert_eq!(invokes.len(), 1, "{}", listing(&spans));
    }
}
