//! Function capabilities and failures: kv, config, logs, retries, dead letters, misbehaving components, refused deploys.
//!
//! Every test deploys the `misbehave` fixture (its event `type` picks the behaviour, see
//! tests/components/misbehave/README.md) with the real CLI onto real runtime nodes.
//! Stream-triggered tests feed `cc.v1.recordings.<id>.completed` events published by
//! `cli/admin` into CC_RECORDINGS, one of the streams runtime nodes may consume; their
//! outputs go to `cc.v1.recordings.<id>.indexed`, which the same stream stores, so an
//! output can be looked up afterwards instead of having to be caught live.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use base64::Engine as _;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use patchbay_bus::reply::{ErrorKind, FailureReply, InvokeReply};
use patchbay_bus::{Bus, CloudEvent, RequestOptions, Token};
use patchbay_tests::{Stack, eventually};

/// Readiness bound for anything asynchronous (deliveries, retries, exports).
const PATIENCE: Duration = Duration::from_secs(30);
/// The stream the stream-triggered tests feed.
const RECORDINGS: &str = "CC_RECORDINGS";
/// Deploy flags for directly invoked functions: outputs go to a subject they may use.
const INVOKED: [&str; 4] = [
    "--publish",
    "cc.v1.tests.>",
    "--config",
    "out=cc.v1.tests.out",
];

// ---------------------------------------------------------------------------------------
// Helpers

/// Invoke `name` directly with `event` and decode the reply.
async fn invoke_event(bus: &Bus, name: &str, event: &CloudEvent) -> InvokeReply {
    let subject = bus.subjects().fn_invoke(&Token::new(name).unwrap());
    let reply = bus
        .request(
            &subject,
            event,
            RequestOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap_or_else(|e| panic!("invoke {name} ({}) failed: {e}", event.ty));
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Invoke `name` with an event of type `ty` carrying `data` as JSON.
async fn invoke(bus: &Bus, name: &str, ty: &str, data: serde_json::Value) -> InvokeReply {
    let event = CloudEvent::new("/test", ty).json(&data).unwrap();
    invoke_event(bus, name, &event).await
}

/// The outputs of a successful reply, with the version that produced them.
fn outputs(reply: InvokeReply) -> (u32, Vec<serde_json::Value>) {
    match reply {
        InvokeReply::Ok {
            version, outputs, ..
        } => (version, outputs),
        other => panic!("expected outputs, got {other:?}"),
    }
}

/// The data bytes of a structured-mode output (`data` as JSON or text, or `data_base64`).
fn output_data(output: &serde_json::Value) -> Vec<u8> {
    if let Some(b64) = output["data_base64"].as_str() {
        return base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
    }
    match &output["data"] {
        serde_json::Value::String(text) => text.clone().into_bytes(),
        serde_json::Value::Null => vec![],
        json => serde_json::to_vec(json).unwrap(),
    }
}

/// The nodes serving `version` of `name`.
async fn serving(bus: &Bus, name: &str, version: u32) -> Vec<String> {
    patchbay_cli::function::serving_nodes(bus, name, version, Duration::from_millis(300)).await
}

/// A W3C `traceparent` with a fresh, known trace id; returns `(traceparent, trace_id)`.
fn traceparent() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    (format!("00-{trace_id}-00f067aa0ba902b7-01"), trace_id)
}

/// Store `event` on `subject` in its stream as `cli/admin` would, with a `traceparent`;
/// returns the stream sequence.
async fn publish_input(admin: &Bus, subject: &str, event: &CloudEvent, traceparent: &str) -> u64 {
    let mut headers: HeaderMap = event.to_headers();
    headers.insert("traceparent", traceparent);
    headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    admin
        .jetstream()
        .publish_with_headers(subject.to_owned(), headers, event.data.clone())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// The trigger consumer of function `name` on CC_RECORDINGS: `(ack pending, pending)`.
async fn consumer_backlog(admin: &Bus, name: &str) -> (usize, u64) {
    let stream = admin.jetstream().get_stream(RECORDINGS).await.unwrap();
    let mut consumer: PullConsumer = stream.get_consumer(&format!("fn-{name}")).await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending)
}

/// The last message CC_RECORDINGS holds on `subject`, as `(ce-id, body)`.
async fn stored_output(admin: &Bus, subject: &str) -> Option<(String, Vec<u8>)> {
    let stream = admin.jetstream().get_stream(RECORDINGS).await.unwrap();
    let msg = stream.get_last_raw_message_by_subject(subject).await.ok()?;
    let id = msg
        .headers
        .get("ce-id")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some((id, msg.payload.to_vec()))
}

/// `patchbay fn dlq ls <name> --json`.
fn dlq_rows(stack: &Stack, name: &str) -> Vec<serde_json::Value> {
    let rows = stack
        .cli(&["fn", "dlq", "ls", name, "--json"])
        .success()
        .json();
    rows.as_array().unwrap().clone()
}

/// `patchbay fn ls --json`.
fn fn_ls(stack: &Stack) -> serde_json::Value {
    stack.cli(&["fn", "ls", "--json"]).success().json()
}

/// The string form of an OTLP attribute value.
fn any_value_text(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| any_value_text(kv.value.as_ref()))
}

/// A tiny OTLP/HTTP trace receiver on 127.0.0.1 that keeps every span it is sent.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Self {
        use axum::body::Bytes;
        use axum::http::StatusCode;
        use prost::Message as _;

        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let sink = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let sink = Arc::clone(&sink);
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut sink = sink.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            sink.extend(scope.spans);
                        }
                    }
                    // An empty body is an empty ExportTraceServiceResponse: all accepted.
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_are_visible_from_another_node_and_from_the_cli() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let mut node1 = stack.spawn_runtime("node-1");
    let _ = stack.deploy("misbehave", "kvstore", &INVOKED);

    // Only node-1 runs yet, so node-1 writes.
    let (_, out) = outputs(
        invoke(
            &admin,
            "kvstore",
            "kv-set",
            serde_json::json!({"key": "greeting", "value": "hello from node-1"}),
        )
        .await,
    );
    let written: serde_json::Value = serde_json::from_slice(&output_data(&out[0])).unwrap();
    let revision = written["revision"].as_u64().unwrap();
    assert!(revision > 0, "kv-set reported no revision: {written}");

    // node-2 joins; once it serves the function, node-1 leaves, so node-2 must answer.
    let _node2 = stack.spawn_runtime("node-2");
    eventually(PATIENCE, "node-2 to serve kvstore", || async {
        serving(&admin, "kvstore", 1)
            .await
            .contains(&"node-2".to_owned())
            .then_some(())
    })
    .await;
    assert!(
        node1.terminate(Duration::from_secs(15)),
        "node-1 did not stop cleanly"
    );
    let (_, out) = outputs(
        invoke(
            &admin,
            "kvstore",
            "kv-get",
            serde_json::json!({"key": "greeting"}),
        )
        .await,
    );
    assert_eq!(output_data(&out[0]), b"hello from node-1");
    // An absent key is the function's own `drop`, not an error.
    match invoke(
        &admin,
        "kvstore",
        "kv-get",
        serde_json::json!({"key": "absent"}),
    )
    .await
    {
        InvokeReply::Failure {
            failure: FailureReply::Drop { reason },
            ..
        } => assert_eq!(reason, "no such key: absent"),
        other => panic!("expected a drop for an absent key, got {other:?}"),
    }

    // The CLI reads the same bucket.
    let got = stack
        .cli(&["fn", "kv", "get", "kvstore", "greeting", "--json"])
        .success()
        .json();
    assert_eq!(got["function"], "kvstore");
    assert_eq!(got["key"], "greeting");
    assert_eq!(got["value"], "hello from node-1");
    assert_eq!(got["revision"].as_u64(), Some(revision));
    let plain = stack
        .cli(&["fn", "kv", "get", "kvstore", "greeting"])
        .success();
    assert_eq!(plain.stdout(), "hello from node-1\n");
    let keys = stack
        .cli(&["fn", "kv", "ls", "kvstore", "--json"])
        .success()
        .json();
    assert_eq!(keys, serde_json::json!(["greeting"]));
    let missing = stack
        .cli(&["fn", "kv", "get", "kvstore", "absent"])
        .failure();
    assert!(
        missing.stderr().contains("no key \"absent\""),
        "unclear error for a missing key: {missing:?}"
    );
    let unknown = stack.cli(&["fn", "kv", "ls", "nobody"]).failure();
    assert!(
        unknown.stderr().contains("function nobody is not deployed"),
        "unclear error for a function that was never deployed: {unknown:?}"
    );

    // The function and the CLI agree on the key set, before and after a delete.
    let (_, out) = outputs(invoke(&admin, "kvstore", "kv-keys", serde_json::json!({})).await);
    let seen_by_function: serde_json::Value =
        serde_json::from_slice(&output_data(&out[0])).unwrap();
    assert_eq!(seen_by_function, keys);
    let _ = outputs(
        invoke(
            &admin,
            "kvstore",
            "kv-delete",
            serde_json::json!({"key": "greeting"}),
        )
        .await,
    );
    let keys = stack
        .cli(&["fn", "kv", "ls", "kvstore", "--json"])
        .success()
        .json();
    assert_eq!(keys, serde_json::json!([]));
    let deleted = stack
        .cli(&["fn", "kv", "get", "kvstore", "greeting"])
        .failure();
    assert!(
        deleted.stderr().contains("no key \"greeting\""),
        "a deleted key still reads: {deleted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_values_differ_between_two_versions_and_rollback_restores_them() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime("node-1");

    let colour = |out: &[serde_json::Value]| -> String {
        let config: serde_json::Value = serde_json::from_slice(&output_data(&out[0])).unwrap();
        config["colour"].as_str().unwrap_or_default().to_owned()
    };

    let v1 = stack.deploy(
        "misbehave",
        "painter",
        &[&INVOKED[..], &["--config", "colour=red"]].concat(),
    );
    assert_eq!(v1["version"], 1);
    let (version, out) = outputs(invoke(&admin, "painter", "config", serde_json::json!({})).await);
    assert_eq!((version, colour(&out).as_str()), (1, "red"));

    let v2 = stack.deploy(
        "misbehave",
        "painter",
        &[&INVOKED[..], &["--config", "colour=blue"]].concat(),
    );
    assert_eq!(v2["version"], 2);
    let (version, out) = outputs(invoke(&admin, "painter", "config", serde_json::json!({})).await);
    assert_eq!((version, colour(&out).as_str()), (2, "blue"));

    let rolled = stack
        .cli(&["fn", "rollback", "painter", "--json"])
        .success()
        .json();
    assert_eq!(rolled["version"], 1);
    let (version, out) = outputs(invoke(&admin, "painter", "config", serde_json::json!({})).await);
    assert_eq!((version, colour(&out).as_str()), (1, "red"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_call_shows_in_fn_logs_and_as_a_span_event_of_the_invocation() {
    const MESSAGE: &str = "hello from misbehave";
    let collector = Collector::start().await;
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let endpoint = collector.endpoint();
    let _node = stack.spawn_runtime_with_env(
        "node-1",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
    );
    let _ = stack.deploy("misbehave", "misbehave", &INVOKED);

    let event = CloudEvent::new("/test", "log")
        .json(&serde_json::json!({}))
        .unwrap();
    let (_, out) = outputs(invoke_event(&admin, "misbehave", &event).await);
    assert_eq!(out.len(), 1);

    // `fn logs` reads PATCHBAY_LOGS.
    let record = eventually(PATIENCE, "the log record in `fn logs`", || async {
        let out = stack.cli(&["fn", "logs", "misbehave", "--json"]).success();
        out.stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["event_id"] == event.id.as_str())
    })
    .await;
    assert_eq!(record["message"], MESSAGE);
    assert_eq!(record["level"], "info");
    assert_eq!(record["function"], "misbehave");
    assert_eq!(record["version"], 1);
    assert_eq!(record["node"], "node-1");
    let log_trace_id = record["trace_id"]
        .as_str()
        .expect("a traced invocation's log record carries its trace id")
        .to_owned();

    // The exporter sends batches every few seconds; wait for the invocation's span.
    let span = eventually(PATIENCE, "the `invoke misbehave` span", || async {
        collector.spans().into_iter().find(|s| {
            s.name == "invoke misbehave"
                && attribute(&s.attributes, "faas.invocation_id").as_deref()
                    == Some(event.id.as_str())
        })
    })
    .await;
    assert_eq!(
        attribute(&span.attributes, "faas.name").as_deref(),
        Some("misbehave")
    );
    assert_eq!(hex_id(&span.trace_id), log_trace_id);
    // tracing-opentelemetry turns an event's `message` field into the span event's name
    // (the level and target become attributes); accept the message as the name or as an
    // attribute value, so either export shape passes but a missing event does not.
    let event = span
        .events
        .iter()
        .find(|e| {
            e.name == MESSAGE
                || e.attributes
                    .iter()
                    .any(|kv| any_value_text(kv.value.as_ref()).as_deref() == Some(MESSAGE))
        })
        .unwrap_or_else(|| {
            panic!(
                "no event of the invoke span carries {MESSAGE:?}: {:?}",
                span.events
            )
        });
    assert_eq!(
        attribute(&event.attributes, "level").as_deref(),
        Some("INFO")
    );
}

fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_stream_event_succeeds_on_its_second_delivery_and_is_acked() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime("node-1");
    let out_subject = "cc.v1.recordings.retried.indexed";
    let _ = stack.deploy(
        "misbehave",
        "retrier",
        &[
            "--trigger",
            "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
            "--publish",
            "cc.v1.recordings.*.indexed",
            "--config",
            &format!("out={out_subject}"),
            "--config",
            "succeed_after=2",
        ],
    );

    let event = CloudEvent::new("/test", "retry")
        .json(&serde_json::json!({"call": "r1"}))
        .unwrap();
    let (tp, _) = traceparent();
    publish_input(&admin, "cc.v1.recordings.r1.completed", &event, &tp).await;

    let (id, body) = eventually(PATIENCE, "the retried event's output", || {
        stored_output(&admin, out_subject)
    })
    .await;
    assert_eq!(id, event.id, "the output is the input re-addressed");
    assert_eq!(body, event.data.to_vec());
    eventually(PATIENCE, "the consumer to have nothing pending", || async {
        (consumer_backlog(&admin, "retrier").await == (0, 0)).then_some(())
    })
    .await;

    // It took exactly two attempts (the function counts them in its KV bucket) ...
    let attempts = stack
        .cli(&[
            "fn",
            "kv",
            "get",
            "retrier",
            &format!("attempts-{}", event.id),
            "--json",
        ])
        .success()
        .json();
    assert_eq!(attempts["value"], "2");
    // ... and nothing was dead-lettered.
    assert_eq!(dlq_rows(&stack, "retrier"), Vec::<serde_json::Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_exhausted_retries_land_in_the_dlq_with_context_and_replay() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime("node-1");
    let out_subject = "cc.v1.recordings.replayed.indexed";
    let deploy_flags = |succeed_after: &str| {
        vec![
            "--trigger".to_owned(),
            "stream:CC_RECORDINGS:cc.v1.recordings.*.completed".to_owned(),
            "--publish".to_owned(),
            "cc.v1.recordings.*.indexed".to_owned(),
            "--config".to_owned(),
            format!("out={out_subject}"),
            "--config".to_owned(),
            format!("succeed_after={succeed_after}"),
            "--max-deliver".to_owned(),
            "3".to_owned(),
        ]
    };
    let flags = deploy_flags("100");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _ = stack.deploy("misbehave", "dlq-demo", &flags);

    let doomed = CloudEvent::new("/test", "dead-letter")
        .json(&serde_json::json!({"call": "dl1"}))
        .unwrap();
    let (doomed_tp, doomed_trace) = traceparent();
    let doomed_subject = "cc.v1.recordings.dl1.completed";
    publish_input(&admin, doomed_subject, &doomed, &doomed_tp).await;
    let stubborn = CloudEvent::new("/test", "retry")
        .json(&serde_json::json!({"call": "rt1"}))
        .unwrap();
    let (stubborn_tp, stubborn_trace) = traceparent();
    let stubborn_subject = "cc.v1.recordings.rt1.completed";
    publish_input(&admin, stubborn_subject, &stubborn, &stubborn_tp).await;

    let rows = eventually(PATIENCE, "two dead letters", || async {
        let rows = dlq_rows(&stack, "dlq-demo");
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let row_of = |id: &str| {
        rows.iter()
            .find(|r| r["event_id"] == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {rows:?}"))
            .clone()
    };

    let dl = row_of(&doomed.id);
    assert_eq!(dl["function"], "dlq-demo");
    assert_eq!(dl["version"], "1");
    assert_eq!(dl["attempts"], "1");
    assert_eq!(dl["error"], "misbehave was asked to dead-letter");
    assert_eq!(dl["trace_id"], doomed_trace.as_str());
    assert_eq!(dl["subject"], doomed_subject);

    let rt = row_of(&stubborn.id);
    assert_eq!(rt["function"], "dlq-demo");
    assert_eq!(rt["attempts"], "3");
    assert_eq!(rt["trace_id"], stubborn_trace.as_str());
    assert_eq!(rt["subject"], stubborn_subject);
    let error = rt["error"].as_str().unwrap();
    assert!(
        error.starts_with("gave up after 3 attempts") && error.contains("attempt 3 of 100"),
        "unexpected error for exhausted retries: {error:?}"
    );
    let seq = rt["seq"].as_u64().unwrap().to_string();

    // `show` has the original body and headers.
    let shown = stack
        .cli(&["fn", "dlq", "show", &seq, "--json"])
        .success()
        .json();
    assert_eq!(
        shown["body"].as_str().unwrap().as_bytes(),
        stubborn.data.as_ref()
    );
    assert_eq!(shown["headers"]["ce-id"], stubborn.id.as_str());
    assert_eq!(shown["headers"]["ce-type"], "retry");
    assert_eq!(shown["headers"]["traceparent"], stubborn_tp.as_str());
    assert_eq!(shown["headers"]["patchbay-dlq-attempts"], "3");
    assert_eq!(
        stored_output(&admin, out_subject).await,
        None,
        "nothing succeeded yet"
    );

    // A version that succeeds, then replay: the event is processed and leaves the DLQ.
    let flags = deploy_flags("0");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let v2 = stack.deploy("misbehave", "dlq-demo", &flags);
    assert_eq!(v2["version"], 2);
    let replayed = stack.cli(&["fn", "dlq", "replay", &seq]).success();
    assert!(replayed.stdout().contains(stubborn_subject), "{replayed:?}");
    let (id, _) = eventually(PATIENCE, "the replayed event's output", || {
        stored_output(&admin, out_subject)
    })
    .await;
    assert_eq!(id, stubborn.id);
    let rows = dlq_rows(&stack, "dlq-demo");
    assert_eq!(
        rows.len(),
        1,
        "only the dead-lettered event is left: {rows:?}"
    );
    assert_eq!(rows[0]["event_id"], doomed.id.as_str());
    let gone = stack.cli(&["fn", "dlq", "show", &seq]).failure();
    assert!(
        gone.stderr()
            .contains(&format!("no dead letter with sequence {seq}")),
        "{gone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_stream_message_is_dead_lettered_at_once_with_the_reason() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime("node-1");
    let _ = stack.deploy(
        "misbehave",
        "strict",
        &[
            "--trigger",
            "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
            "--publish",
            "cc.v1.recordings.*.indexed",
            "--config",
            "out=cc.v1.recordings.strict.indexed",
        ],
    );

    // No CloudEvent headers and not structured mode: not an event at all.
    let subject = "cc.v1.recordings.garbled.completed";
    admin
        .jetstream()
        .publish(subject, "not a cloud event".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let rows = eventually(PATIENCE, "the malformed message's dead letter", || async {
        let rows = dlq_rows(&stack, "strict");
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["attempts"], "1", "malformed input is not retried");
    assert_eq!(rows[0]["subject"], subject);
    let error = rows[0]["error"].as_str().unwrap();
    assert!(error.starts_with("malformed event"), "{error:?}");
    // It came without trace context, so it names the trace the node started for it.
    let trace_id = rows[0]["trace_id"].as_str().unwrap_or_default();
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "no trace id recorded: {:?}",
        rows[0]
    );
    let seq = rows[0]["seq"].as_u64().unwrap().to_string();
    let shown = stack
        .cli(&["fn", "dlq", "show", &seq, "--json"])
        .success()
        .json();
    assert_eq!(shown["body"], "not a cloud event");
    eventually(PATIENCE, "the consumer to have nothing pending", || async {
        (consumer_backlog(&admin, "strict").await == (0, 0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_components_fail_only_their_own_invocation() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let mut node = stack.spawn_runtime("node-1");
    // Two functions on one node: `spinner` only ever loops, so its short timeout is what
    // ends it; `unruly` gets a small memory cap and a timeout generous enough that a
    // starved CPU never turns another outcome into a timeout.
    let _ = stack.deploy(
        "misbehave",
        "spinner",
        &[&INVOKED[..], &["--timeout", "200ms"]].concat(),
    );
    let _ = stack.deploy(
        "misbehave",
        "unruly",
        &[&INVOKED[..], &["--timeout", "10s", "--memory", "16"]].concat(),
    );

    const BAD: [&str; 5] = ["trap", "panic", "loop", "oom", "forbidden-publish"];
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..3 {
        for bad in BAD {
            // Interleave a good invocation with every bad one.
            for ty in ["ok", bad] {
                let bus = admin.clone();
                let function = if ty == "loop" { "spinner" } else { "unruly" };
                tasks.spawn(async move {
                    let data = serde_json::json!({ "round": round });
                    (ty, invoke(&bus, function, ty, data).await)
                });
            }
        }
    }
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    while let Some(joined) = tasks.join_next().await {
        let (ty, reply) = joined.unwrap();
        *seen.entry(ty).or_default() += 1;
        let error_kind = |reply: &InvokeReply| match reply {
            InvokeReply::Error { kind, message, .. } => (*kind, message.clone()),
            other => panic!("{ty}: expected an error, got {other:?}"),
        };
        match ty {
            "ok" => {
                let (_, out) = outputs(reply);
                assert_eq!(out.len(), 1);
            }
            "trap" => assert_eq!(error_kind(&reply).0, ErrorKind::Trap),
            "panic" => {
                let (kind, message) = error_kind(&reply);
                assert_eq!(kind, ErrorKind::Trap);
                assert!(
                    message.contains("misbehave was asked to panic"),
                    "the panic message is not quoted: {message:?}"
                );
            }
            "loop" => assert_eq!(error_kind(&reply).0, ErrorKind::Timeout),
            "oom" => assert_eq!(error_kind(&reply).0, ErrorKind::OutOfMemory),
            "forbidden-publish" => match reply {
                InvokeReply::Failure {
                    failure: FailureReply::DeadLetter { reason },
                    ..
                } => assert_eq!(reason, "publish failed: forbidden: forbidden.subject"),
                other => panic!("forbidden-publish: expected a dead letter, got {other:?}"),
            },
            other => unreachable!("{other}"),
        }
    }
    assert_eq!(seen["ok"], 15);
    for ty in BAD {
        assert_eq!(seen[ty], 3, "{ty}");
    }

    // The node survived all of it and still serves.
    assert!(node.is_running(), "the runtime node died");
    let (_, out) = outputs(invoke(&admin, "unruly", "ok", serde_json::json!({})).await);
    assert_eq!(out.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deploys_change_nothing() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"this is certainly not a component").unwrap();
    // One byte over the engine's 64 MiB limit; sparse, so it costs no disk.
    let huge = dir.path().join("huge.wasm");
    let max = patchbay_engine::EngineConfig::default().max_component_bytes as u64;
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(max + 1)
        .unwrap();
    let core = patchbay_tests::component("core-module");
    let other = patchbay_tests::component("other-world");
    let max_text = max.to_string();
    let refused: [(&std::path::Path, &[&str]); 4] = [
        (&junk, &["not a WebAssembly"]),
        (&core, &["core WebAssembly module, not a component"]),
        (&other, &["patchbay:function/handler@0.1.0"]),
        (&huge, &["over the", max_text.as_str()]),
    ];

    let try_all = |expect_ls: &serde_json::Value| {
        for (file, words) in &refused {
            let out = stack
                .cli(&[
                    "fn",
                    "deploy",
                    file.to_str().unwrap(),
                    "--name",
                    "target",
                    "--wait",
                    "0s",
                ])
                .failure();
            for word in *words {
                assert!(
                    out.stderr().contains(word),
                    "refusing {} does not say {word:?}: {out:?}",
                    file.display()
                );
            }
            assert_eq!(
                &fn_ls(&stack),
                expect_ls,
                "refusing {} changed the registry",
                file.display()
            );
        }
    };

    // On an empty registry ...
    try_all(&serde_json::json!([]));
    // ... and over a good version, which stays active and alone.
    let good = stack
        .cli(&[
            "fn",
            "deploy",
            patchbay_tests::component("misbehave").to_str().unwrap(),
            "--name",
            "target",
            "--wait",
            "0s",
            "--json",
        ])
        .success()
        .json();
    let before = fn_ls(&stack);
    assert_eq!(before[0]["version"], 1);
    assert_eq!(before[0]["digest"], good["digest"]);
    try_all(&before);
    let described = stack
        .cli(&["fn", "describe", "target", "--json"])
        .success()
        .json();
    assert_eq!(described["versions"].as_array().unwrap().len(), 1);
}
