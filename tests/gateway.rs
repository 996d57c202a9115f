//! The HTTP gateway against a real nats-server with mTLS, a real runtime node and real
//! components: events in (both CloudEvents content modes), request-reply and function
//! invocation with every outcome mapped to a status, `wasi:http` functions with streaming
//! bodies, tokens, limits, TLS termination and the OpenAPI document.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_tests::gateway::{Gateway, http_client};
use patchbay_tests::{MISBEHAVE_ON_SUBJECT, Stack, eventually, next_message};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Every route of the OpenAPI document, each exercised below.
const DOCUMENTED_ROUTES: [&str; 4] = [
    "/openapi.json",
    "/v1/events/{subject}",
    "/v1/functions/{name}/invoke",
    "/v1/request/{subject}",
];

/// Echo publishes its output (the input) on a test subject it is allowed to publish.
const ECHO_FLAGS: &[&str] = &[
    "--config",
    "out=cc.v1.tests.echoed",
    "--publish",
    "cc.v1.tests.echoed",
];

struct Setup {
    stack: Stack,
    gateway: Gateway,
    admin_token: String,
    client: reqwest::Client,
    _runtime: patchbay_tests::Process,
}

async fn setup() -> Setup {
    let stack = Stack::start().await;
    let runtime = stack.spawn_runtime("node-1");
    let gateway = stack.spawn_gateway(&[]).await;
    let admin_token = stack.token("admin", &["admin"], &[]);
    Setup {
        stack,
        gateway,
        admin_token,
        client: http_client(None),
        _runtime: runtime,
    }
}

impl Setup {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.gateway.url))
            .bearer_auth(&self.admin_token)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.gateway.url))
            .bearer_auth(&self.admin_token)
    }

    /// Deploy an HTTP function and wait until the gateway serves it.
    async fn deploy_http(&self, name: &str, route: &str, probe: &str) {
        let trigger = format!("http:{route}");
        let _ = self
            .stack
            .cli(&[
                "fn",
                "deploy",
                patchbay_tests::component("http-echo").to_str().unwrap(),
                "--name",
                name,
                "--trigger",
                &trigger,
                "--json",
            ])
            .success();
        eventually(
            Duration::from_secs(20),
            "gateway serves the HTTP function",
            || async {
                let response = self.get(probe).send().await.ok()?;
                (response.status() == StatusCode::OK).then_some(())
            },
        )
        .await;
    }
}

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "{response:?}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{response:?}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    body
}

fn trace_id_of(headers: &reqwest::header::HeaderMap) -> String {
    let traceparent = headers["traceparent"].to_str().unwrap();
    traceparent.split('-').nth(1).unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_both_content_modes_reach_subscribers_with_the_callers_trace() {
    let s = setup().await;
    let admin = s.stack.admin().await;
    let mut core = admin
        .client()
        .subscribe("cc.v1.tests.events")
        .await
        .unwrap();
    let mut durable = admin
        .client()
        .subscribe("cc.v1.recordings.r-1.completed")
        .await
        .unwrap();

    // Binary mode on a core subject: 202.
    let response = s
        .post("/v1/events/cc.v1.tests.events")
        .header("ce-specversion", "1.0")
        .header("ce-id", "evt-binary-1")
        .header("ce-source", "/crm/acme")
        .header("ce-type", "com.acme.thing.v1")
        .header("ce-partitionkey", "call-9")
        .header("content-type", "application/json")
        .header("traceparent", TRACEPARENT)
        .header("request-timeout", "1500")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(trace_id_of(response.headers()), TRACE_ID);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["id"], "evt-binary-1");
    let message = next_message(&mut core, Duration::from_secs(5), "binary-mode event").await;
    let event =
        patchbay_bus::CloudEvent::from_message(message.headers.as_ref(), &message.payload).unwrap();
    assert_eq!(
        (event.id.as_str(), event.source.as_str(), event.ty.as_str()),
        ("evt-binary-1", "/crm/acme", "com.acme.thing.v1")
    );
    assert_eq!(event.key(), Some("call-9"));
    assert_eq!(&event.data[..], br#"{"n":1}"#);
    assert_eq!(
        patchbay_bus::trace::trace_id(message.headers.as_ref()).as_deref(),
        Some(TRACE_ID)
    );
    let deadline = patchbay_bus::Deadline::from_headers(message.headers.as_ref())
        .unwrap()
        .expect("the deadline travels with the event");
    let now = patchbay_bus::Clock::now_millis(&patchbay_bus::SystemClock);
    assert!(
        deadline.epoch_millis() > now && deadline.epoch_millis() <= now + 1500,
        "deadline {} not within Request-Timeout of {now}",
        deadline.epoch_millis()
    );

    // Structured mode on a subject a stream stores: 201 with the stream sequence.
    let structured = json!({
        "specversion": "1.0", "id": "evt-structured-1", "source": "/recorder",
        "type": "cc.recording.completed.v1", "datacontenttype": "application/json",
        "data": {"call_id": "r-1", "url": "s3://x"}
    });
    let response = s
        .post("/v1/events/cc.v1.recordings.r-1.completed")
        .header("content-type", "application/cloudevents+json")
        .header("traceparent", TRACEPARENT)
        .body(structured.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["stream"], "CC_RECORDINGS");
    assert!(answer["sequence"].as_u64().unwrap() >= 1, "{answer}");
    let message = next_message(
        &mut durable,
        Duration::from_secs(5),
        "structured-mode event",
    )
    .await;
    let event =
        patchbay_bus::CloudEvent::from_message(message.headers.as_ref(), &message.payload).unwrap();
    assert_eq!(
        (event.id.as_str(), event.source.as_str(), event.ty.as_str()),
        ("evt-structured-1", "/recorder", "cc.recording.completed.v1")
    );
    assert_eq!(
        patchbay_bus::trace::trace_id(message.headers.as_ref()).as_deref(),
        Some(TRACE_ID)
    );

    // The same event again is stored once.
    let again = s
        .post("/v1/events/cc.v1.recordings.r-1.completed")
        .header("content-type", "application/cloudevents+json")
        .body(structured.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.json::<Value>().await.unwrap()["duplicate"], true);

    // Not a CloudEvent, a batch, a wildcard subject.
    let missing_type = s
        .post("/v1/events/cc.v1.tests.events")
        .header("ce-specversion", "1.0")
        .header("ce-id", "x")
        .header("ce-source", "/x")
        .send()
        .await
        .unwrap();
    let body = problem(missing_type, StatusCode::BAD_REQUEST).await;
    assert!(body["detail"].as_str().unwrap().contains("type"), "{body}");
    let batch = s
        .post("/v1/events/cc.v1.tests.events")
        .header("content-type", "application/cloudevents-batch+json")
        .body("[]")
        .send()
        .await
        .unwrap();
    problem(batch, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let wildcard = s.post("/v1/events/cc.v1.*.x").send().await.unwrap();
    problem(wildcard, StatusCode::BAD_REQUEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_and_invocations_map_every_outcome_to_a_status() {
    let s = setup().await;
    let _ = s.stack.deploy("echo", "echo", ECHO_FLAGS);
    let _ = s
        .stack
        .deploy("misbehave", "misbehave", MISBEHAVE_ON_SUBJECT);

    // Invoke an event function: 200 with its outputs, the caller's trace continued.
    let response = s
        .post("/v1/functions/echo/invoke")
        .header("content-type", "application/json")
        .header("traceparent", TRACEPARENT)
        .body(r#"{"hello":"world"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(trace_id_of(response.headers()), TRACE_ID);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["outcome"], "ok");
    assert_eq!(reply["outputs"][0]["data"], json!({"hello": "world"}));

    // A request on a subject a function serves, as a binary-mode CloudEvent.
    let response = s
        .post("/v1/request/cc.v1.tests.in")
        .header("ce-specversion", "1.0")
        .header("ce-id", "req-1")
        .header("ce-source", "/tests")
        .header("ce-type", "ok")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap()["outputs"][0]["id"],
        "req-1"
    );

    let invoke = |ty: &'static str, timeout: Option<&'static str>| {
        let mut request = s
            .post("/v1/functions/misbehave/invoke")
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("inv-{ty}"))
            .header("ce-source", "/tests")
            .header("ce-type", ty);
        if let Some(ms) = timeout {
            request = request.header("request-timeout", ms);
        }
        request.send()
    };
    // The function's own failure: 422 with its reason.
    let body = problem(
        invoke("dead-letter", None).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("misbehave was asked to dead-letter"),
        "{body}"
    );
    problem(
        invoke("drop", None).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    // A trap: 500 without internals.
    let body = problem(
        invoke("trap", None).await.unwrap(),
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert!(!body.to_string().contains("unreachable"), "{body}");
    // A slow function past the caller's deadline: 504.
    problem(
        invoke("loop", Some("300")).await.unwrap(),
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await;
    // Unknown function: 404; nothing serving a subject: 503.
    let unknown = s
        .post("/v1/functions/nope/invoke")
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(unknown, StatusCode::NOT_FOUND).await;
    let nobody = s
        .post("/v1/request/cc.v1.nobody.home")
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(nobody, StatusCode::SERVICE_UNAVAILABLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_without_disturbing_concurrent_good_ones() {
    let s = setup().await;
    let _ = s.stack.deploy("echo", "echo", ECHO_FLAGS);
    let narrow = s.stack.token("narrow", &["publish:cc.v1.tests.>"], &[]);

    // Good invocations run throughout.
    let good = {
        let client = s.client.clone();
        let url = format!("{}/v1/functions/echo/invoke", s.gateway.url);
        let token = s.admin_token.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..60 {
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .body(format!("{{\"i\":{i}}}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                ok += 1;
            }
            ok
        })
    };
    for _ in 0..5 {
        let url = format!("{}/v1/events/cc.v1.tests.x", s.gateway.url);
        let missing = s.client.post(&url).body("{}").send().await.unwrap();
        let body = problem(missing, StatusCode::UNAUTHORIZED).await;
        assert!(
            body["detail"].as_str().unwrap().contains("Bearer"),
            "{body}"
        );
        let invalid = s
            .client
            .post(&url)
            .bearer_auth("pbt_00000000_not-a-real-secret")
            .body("{}")
            .send()
            .await
            .unwrap();
        problem(invalid, StatusCode::UNAUTHORIZED).await;
        let scoped = s
            .client
            .post(format!(
                "{}/v1/events/cc.v1.calls.c1.incoming",
                s.gateway.url
            ))
            .bearer_auth(&narrow)
            .body("{}")
            .send()
            .await
            .unwrap();
        problem(scoped, StatusCode::FORBIDDEN).await;
        let not_invoke = s
            .client
            .post(format!("{}/v1/functions/echo/invoke", s.gateway.url))
            .bearer_auth(&narrow)
            .body("{}")
            .send()
            .await
            .unwrap();
        problem(not_invoke, StatusCode::FORBIDDEN).await;
        let oversized = s
            .post("/v1/events/cc.v1.tests.x")
            .header("ce-specversion", "1.0")
            .header("ce-id", "big")
            .header("ce-source", "/t")
            .header("ce-type", "t")
            .body(vec![b'x'; (1 << 20) + 1])
            .send()
            .await
            .unwrap();
        problem(oversized, StatusCode::PAYLOAD_TOO_LARGE).await;
    }
    assert_eq!(good.await.unwrap(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_gets_429_with_retry_after() {
    let s = setup().await;
    let slow = s.stack.token(
        "slow",
        &["publish:cc.v1.tests.>"],
        &["--rate", "0.2", "--burst", "2"],
    );
    let send = || {
        s.client
            .post(format!("{}/v1/events/cc.v1.tests.rate", s.gateway.url))
            .bearer_auth(&slow)
            .header("ce-specversion", "1.0")
            .header("ce-id", uuid::Uuid::new_v4().to_string())
            .header("ce-source", "/t")
            .header("ce-type", "t")
            .send()
    };
    assert_eq!(send().await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(send().await.unwrap().status(), StatusCode::ACCEPTED);
    let limited = send().await.unwrap();
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    problem(limited, StatusCode::TOO_MANY_REQUESTS).await;
    // Another token is not affected.
    let other = s
        .post("/v1/events/cc.v1.tests.rate")
        .header("ce-specversion", "1.0")
        .header("ce-id", "other")
        .header("ce-source", "/t")
        .header("ce-type", "t")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_http_component_serves_its_route_with_status_and_headers() {
    let s = setup().await;
    s.deploy_http("hello", "/echo/...", "/echo/hello").await;

    let response = s
        .get("/echo/hello")
        .header("traceparent", TRACEPARENT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-fixture"], "http-echo");
    assert_eq!(trace_id_of(response.headers()), TRACE_ID);
    assert_eq!(response.text().await.unwrap(), "hello from wasi:http\n");
    let teapot = s.get("/echo/status?code=418").send().await.unwrap();
    assert_eq!(teapot.status(), StatusCode::IM_A_TEAPOT);

    // A trapping component: 500; a spinning one: 504 at the deadline; neither stops the next.
    problem(
        s.get("/echo/trap").send().await.unwrap(),
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    let spin = s
        .get("/echo/spin")
        .header("request-timeout", "300")
        .send()
        .await
        .unwrap();
    problem(spin, StatusCode::GATEWAY_TIMEOUT).await;
    assert_eq!(
        s.get("/echo/hello").send().await.unwrap().status(),
        StatusCode::OK
    );

    // Routes are authorised per function, and unknown paths are 404.
    let narrow = s.stack.token("narrow", &["invoke:other"], &[]);
    let refused = s
        .client
        .get(format!("{}/echo/hello", s.gateway.url))
        .bearer_auth(&narrow)
        .send()
        .await
        .unwrap();
    problem(refused, StatusCode::FORBIDDEN).await;
    problem(
        s.get("/elsewhere").send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    // An HTTP function is not invocable as an event function.
    let invoke = s
        .post("/v1/functions/hello/invoke")
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(invoke, StatusCode::NOT_FOUND).await;

    // The metrics count requests per function route.
    let (_, metrics) = patchbay_tests::http_get(&s.gateway.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"patchbay_gateway_requests_total{method="GET",route="fn:hello",status="200"}"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_and_large_bodies_pass_intact() {
    let s = setup().await;
    s.deploy_http("stream", "/s/...", "/s/hello").await;

    // Each chunk is sent only after the previous one came back: without streaming in both
    // directions this would never finish.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let response = s.post("/s/stream").body(body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut chunks = response.bytes_stream();
    for i in 0..5 {
        let chunk = format!("chunk-{i};");
        tx.send(Ok(Bytes::from(chunk.clone()))).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < chunk.len() {
            let next = tokio::time::timeout(Duration::from_secs(10), chunks.next())
                .await
                .expect("the echo of a chunk arrives before the next is sent")
                .unwrap()
                .unwrap();
            seen.extend_from_slice(&next);
        }
        assert_eq!(seen, chunk.as_bytes());
    }
    drop(tx);
    assert!(chunks.next().await.is_none());

    // 3 MiB up and back, 5 MiB down.
    let upload: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    let echoed = s
        .post("/s/stream")
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), StatusCode::OK);
    assert!(
        echoed.bytes().await.unwrap() == upload,
        "the echoed body differs"
    );
    let size = 5 << 20;
    let big = s.get(&format!("/s/big?bytes={size}")).send().await.unwrap();
    assert_eq!(big.status(), StatusCode::OK);
    let body = big.bytes().await.unwrap();
    assert_eq!(body.len(), size);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_validates_and_lists_exactly_the_exercised_routes() {
    let s = setup().await;
    let response = s
        .client
        .get(format!("{}/openapi.json", s.gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let paths: BTreeSet<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(paths, DOCUMENTED_ROUTES.into_iter().collect());
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());

    let file = s.stack.state_dir().join("openapi.json");
    std::fs::write(&file, document.to_string()).unwrap();
    let validator = patchbay_tests::repo_root().join(".tools/venv/bin/openapi-spec-validator");
    assert!(
        validator.exists(),
        "{} is missing: run `make test-tools`",
        validator.display()
    );
    let out = std::process::Command::new(validator)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_terminates_tls_when_given_a_certificate() {
    let stack = Stack::start().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_file = stack.state_dir().join("gateway-tls.crt");
    let key_file = stack.state_dir().join("gateway-tls.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let gateway = stack
        .spawn_gateway_with(
            &[
                "--tls-cert",
                cert_file.to_str().unwrap(),
                "--tls-key",
                key_file.to_str().unwrap(),
            ],
            "https",
        )
        .await;
    let client = http_client(Some(cert.pem().as_bytes()));
    let response = client
        .get(format!("{}/openapi.json", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Plain HTTP to the TLS port is not served.
    let plain = http_client(None)
        .get(gateway.url.replace("https://", "http://") + "/openapi.json")
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_streaming_request_finish_then_exits() {
    let mut s = setup().await;
    s.deploy_http("drain", "/d/...", "/d/hello").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let response = s
        .post("/d/stream")
        .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)))
        .send()
        .await
        .unwrap();
    let mut chunks = response.bytes_stream();
    tx.send(Ok(Bytes::from_static(b"before;"))).await.unwrap();
    assert_eq!(&chunks.next().await.unwrap().unwrap()[..], b"before;");

    let pid = s.gateway.process.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The gateway stops listening, but the request in flight goes on to its end.
    eventually(Duration::from_secs(10), "the listener closes", || async {
        let url = format!("{}/openapi.json", s.gateway.url);
        http_client(None)
            .get(url)
            .send()
            .await
            .is_err()
            .then_some(())
    })
    .await;
    tx.send(Ok(Bytes::from_static(b"after;"))).await.unwrap();
    assert_eq!(&chunks.next().await.unwrap().unwrap()[..], b"after;");
    drop(tx);
    assert!(chunks.next().await.is_none());
    assert!(
        s.gateway.process.terminate(Duration::from_secs(10)),
        "the gateway did not exit"
    );
}

/// A function whose deploy flags give it a breaker: once it has failed twice the gateway
/// stops calling it and answers 503 `circuit-open` with `Retry-After`, while nothing
/// reaches the bus. The flags' policy lives beside the file's: `resilience apply` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_function_opens_its_breaker_and_the_gateway_answers_503_with_retry_after() {
    let s = setup().await;
    // A policy that does not parse is refused before anything is deployed.
    let mut flags = MISBEHAVE_ON_SUBJECT.to_vec();
    flags.extend(["--resilience", r#"timeout = "soon""#]);
    let refused = s
        .stack
        .cli(
            &[
                &[
                    "fn",
                    "deploy",
                    patchbay_tests::component("misbehave").to_str().unwrap(),
                ][..],
                &["--name", "misbehave"],
                &flags,
            ]
            .concat(),
        )
        .failure();
    assert!(refused.stderr().contains("timeout"), "{refused:?}");

    let mut flags = MISBEHAVE_ON_SUBJECT.to_vec();
    flags.extend([
        "--resilience",
        r#"retry = { max_attempts = 1 }, breaker = { consecutive_failures = 2, failure_rate = 0.0, cool_down = "1m" }"#,
    ]);
    let _ = s.stack.deploy("misbehave", "misbehave", &flags);
    let admin = s.stack.admin().await;
    let mut wire = admin
        .client()
        .subscribe("patchbay.v1.fn.misbehave.invoke")
        .await
        .unwrap();
    admin.client().flush().await.unwrap();

    let invoke = |n: u32| {
        s.post("/v1/functions/misbehave/invoke")
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("breaker-{n}"))
            .header("ce-source", "/tests")
            .header("ce-type", "dead-letter")
            .send()
    };
    for n in 0..2 {
        problem(invoke(n).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY).await;
        next_message(&mut wire, Duration::from_secs(10), "the invocation").await;
    }
    for n in 2..5 {
        let response = invoke(n).await.unwrap();
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        let body = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(
            body["type"].as_str().unwrap().ends_with("circuit-open"),
            "{body}"
        );
    }
    // Nothing was sent while the breaker was open.
    admin.client().flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), wire.next())
            .await
            .is_err(),
        "an invocation reached the bus while the breaker was open"
    );

    // The deploy's policy survives an apply of the policy file.
    let file = patchbay_tests::repo_root().join("deploy/resilience.toml");
    let _ = s
        .stack
        .cli(&["resilience", "apply", "--file", file.to_str().unwrap()])
        .success();
    let shown = s
        .stack
        .cli(&["resilience", "show", "--json"])
        .success()
        .json();
    assert_eq!(
        shown["targets"]["function:misbehave"]["breaker"]["consecutive_failures"], 2,
        "{shown}"
    );
}

// ---------------------------------------------------------------------------------------
// Hardening (issue 12: connection exhaustion, refusals answered as success, request
// properties answered 503). Raw sockets where a well-behaved client cannot misbehave.

/// `host:port` of a gateway URL.
fn authority(gateway: &Gateway) -> String {
    gateway
        .url
        .strip_prefix("http://")
        .expect("plain HTTP gateway")
        .to_owned()
}

/// A connection from `source` (a loopback address) to `addr`.
async fn connect_from(source: std::net::Ipv4Addr, addr: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// Everything the peer sends until it closes, or what arrived within `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the peer closed `stream` within `limit`, and what it sent before.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    closed
        .is_ok()
        .then(|| String::from_utf8_lossy(&out).into_owned())
}

/// Send `request` on a new connection from `source` and read the answer (the gateway
/// closes after it: requests say `Connection: close`).
async fn exchange(source: std::net::Ipv4Addr, addr: &str, request: &str) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = connect_from(source, addr).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(15)).await
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

const LOCALHOST: std::net::Ipv4Addr = std::net::Ipv4Addr::LOCALHOST;
const OTHER_LOOPBACK: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);
/// The start of a request that never finishes its head.
const HALF_SENT: &str =
    "POST /v1/events/cc.v1.tests.slow HTTP/1.1\r\nHost: gateway\r\nContent-Length: 2\r\nce-id: x";

async fn refused_total(gateway: &Gateway, reason: &str) -> f64 {
    let (_, metrics) = patchbay_tests::http_get(&gateway.admin, "/metrics")
        .await
        .expect("admin /metrics answers");
    patchbay_tests::metric_value(
        &metrics,
        &format!("patchbay_gateway_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_requests_is_capped_and_timed_out_while_health_keeps_answering() {
    use tokio::io::AsyncWriteExt as _;
    const LIMIT: usize = 100;
    let stack = Stack::start().await;
    let gateway = stack
        .spawn_gateway(&[
            "--max-connections",
            &LIMIT.to_string(),
            "--max-connections-per-ip",
            "10000",
            "--header-timeout",
            "2s",
        ])
        .await;
    let addr = authority(&gateway);

    // LIMIT + 50 connections that send half a request head and then nothing.
    let mut flood = Vec::new();
    for _ in 0..LIMIT + 50 {
        let mut stream = connect_from(LOCALHOST, &addr).await;
        stream.write_all(HALF_SENT.as_bytes()).await.unwrap();
        flood.push(stream);
    }

    // The admin listener is another socket: it answers throughout.
    let (status, body) = patchbay_tests::http_get(&gateway.admin, "/healthz")
        .await
        .expect("admin /healthz answers during the flood");
    assert_eq!(status, 200, "{body}");

    // A complete request now is either refused clearly (the cap holds) or, if the header
    // timeout already dropped the slow ones, served.
    let request = "POST /v1/events/cc.v1.tests.x HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let answer = exchange(LOCALHOST, &addr, request).await;
    match status_of(&answer) {
        503 => {
            assert!(answer.contains("connection: close"), "{answer}");
            assert!(answer.contains("retry-after: 1"), "{answer}");
            assert!(answer.contains("application/problem+json"), "{answer}");
            assert!(answer.contains("connection-limit"), "{answer}");
        }
        401 => {}
        other => panic!("unexpected {other}: {answer}"),
    }

    // Every flood connection ends: past the cap with the 503 refusal, the others closed
    // by the header timeout without an answer.
    let (mut refused, mut timed_out) = (0, 0);
    for stream in &mut flood {
        let sent = closed_within(stream, Duration::from_secs(20))
            .await
            .expect("a half-sent connection was left open past the header timeout");
        if sent.is_empty() {
            timed_out += 1;
        } else {
            assert_eq!(status_of(&sent), 503, "{sent}");
            refused += 1;
        }
    }
    assert_eq!(refused + timed_out, LIMIT + 50);
    assert!(timed_out >= 1, "nothing was closed by the header timeout");
    assert!(refused >= 1, "nothing was refused");
    assert!(refused_total(&gateway, "connection-limit").await >= 1.0);
    assert!(refused_total(&gateway, "header-timeout").await >= 1.0);

    // With the slow connections gone, requests are served again.
    eventually(
        Duration::from_secs(20),
        "the gateway serves again",
        || async {
            let answer = exchange(LOCALHOST, &addr, request).await;
            (status_of(&answer) == 401).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_refused_before_authentication() {
    use tokio::io::AsyncWriteExt as _;
    let stack = Stack::start().await;
    let gateway = stack
        .spawn_gateway(&["--max-connections-per-ip", "5", "--header-timeout", "30s"])
        .await;
    let addr = authority(&gateway);
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = connect_from(LOCALHOST, &addr).await;
        stream.write_all(HALF_SENT.as_bytes()).await.unwrap();
        held.push(stream);
    }
    // No token: a refusal by address comes before authentication could answer 401.
    let request = "GET /openapi.json HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n";
    let answer = eventually(
        Duration::from_secs(10),
        "the sixth connection refused",
        || async {
            let answer = exchange(LOCALHOST, &addr, request).await;
            (status_of(&answer) == 429).then_some(answer)
        },
    )
    .await;
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("connection-limit-per-ip"), "{answer}");
    // Another address is not affected.
    let other = exchange(OTHER_LOOPBACK, &addr, request).await;
    assert_eq!(status_of(&other), 200, "{other}");
    assert!(refused_total(&gateway, "connection-limit-per-ip").await >= 1.0);

    drop(held);
    eventually(
        Duration::from_secs(10),
        "the address is let in again",
        || async {
            let answer = exchange(LOCALHOST, &addr, request).await;
            (status_of(&answer) == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_content_length_or_too_slow_is_answered_408() {
    use tokio::io::AsyncWriteExt as _;
    let stack = Stack::start().await;
    let gateway = stack
        .spawn_gateway(&["--body-idle-timeout", "500ms", "--body-timeout", "2s"])
        .await;
    let token = stack.token("admin", &["admin"], &[]);
    let addr = authority(&gateway);
    let head = |length: usize| {
        format!(
            "POST /v1/events/cc.v1.tests.short HTTP/1.1\r\nHost: gateway\r\n\
             Authorization: Bearer {token}\r\nce-specversion: 1.0\r\nce-id: short-1\r\n\
             ce-source: /t\r\nce-type: t\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n"
        )
    };

    // 10 of 100 bytes, then silence (the connection stays open).
    let mut stream = connect_from(LOCALHOST, &addr).await;
    stream.write_all(head(100).as_bytes()).await.unwrap();
    stream.write_all(b"{\"a\":\"bcd\"").await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(15)).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");

    // A trickle that never pauses for the idle time still has to finish within the body
    // timeout. The gateway may close while bytes are still arriving, which the kernel can
    // turn into a reset that eats the answer: the counter is the proof, the answer (when
    // it survives) must be the 408.
    let stream = connect_from(LOCALHOST, &addr).await;
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head(1000).as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(15), async {
        use tokio::io::AsyncReadExt as _;
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("the trickling request was not ended by the body timeout");
    if !answer.is_empty() {
        assert_eq!(status_of(&answer), 408, "{answer}");
    }
    trickle.abort();
    assert_eq!(refused_total(&gateway, "body-timeout").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_and_malformed_subjects_are_refused_instead_of_dropped_by_nats() {
    let s = setup().await;
    let event = |request: reqwest::RequestBuilder| {
        request
            .header("ce-specversion", "1.0")
            .header("ce-id", uuid::Uuid::new_v4().to_string())
            .header("ce-source", "/t")
            .header("ce-type", "t")
            .send()
    };
    for path in [
        "/v1/events/$JS.API.STREAM.DELETE.CC_CALLS",
        "/v1/events/_INBOX.x",
        "/v1/request/$SRV.PING",
        "/v1/request/_INBOX.gateway.gateway.x",
    ] {
        let body = problem(event(s.post(path)).await.unwrap(), StatusCode::FORBIDDEN).await;
        assert_eq!(
            body["type"], "https://patchbay.dev/problems/reserved-subject",
            "{path}: {body}"
        );
    }
    // The stream the first one would have deleted is still there.
    let admin = s.stack.admin().await;
    assert!(admin.jetstream().get_stream("CC_CALLS").await.is_ok());

    for (path, says) in [
        ("/v1/events/cc.v1.tests.a%00b", "control character U+0000"),
        ("/v1/events/cc.v1.tests.a%01b", "control character U+0001"),
        ("/v1/events/cc.v1.tests.a%20b", "white space"),
        ("/v1/events/cc.v1..x", "token 3 is empty"),
        ("/v1/events/cc.v1.tests.", "token 4 is empty"),
        ("/v1/events/cc.v1.*.x", "wildcard"),
        ("/v1/events/cc.v1.%3E", "wildcard"),
        ("/v1/request/cc.v1.tests.a%00b", "control character U+0000"),
        ("/v1/request/a.*", "wildcard"),
    ] {
        let body = problem(event(s.post(path)).await.unwrap(), StatusCode::BAD_REQUEST).await;
        assert!(
            body["detail"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_the_gateways_bus_identity_may_not_publish_is_403_not_a_timeout() {
    let s = setup().await;
    // `routed` belongs to the routing service (deploy/access.toml); CC_CALLS stores it.
    let started = std::time::Instant::now();
    let response = s
        .post("/v1/events/cc.v1.calls.c-403.routed")
        .header("request-timeout", "25000")
        .header("ce-specversion", "1.0")
        .header("ce-id", "routed-1")
        .header("ce-source", "/t")
        .header("ce-type", "t")
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::FORBIDDEN).await;
    assert_eq!(body["type"], "https://patchbay.dev/problems/bus-permission");
    // Well before the deadline it would otherwise have waited out.
    assert!(started.elapsed() < Duration::from_secs(20));

    let response = s
        .post("/v1/request/cc.v1.calls.c-403.routed")
        .header("request-timeout", "25000")
        .body("{}")
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::FORBIDDEN).await;
    assert_eq!(body["type"], "https://patchbay.dev/problems/bus-permission");
}

/// A binary-mode event with a fresh id, posted by `request`.
async fn send_event(request: reqwest::RequestBuilder) -> reqwest::Response {
    request
        .header("ce-specversion", "1.0")
        .header("ce-id", uuid::Uuid::new_v4().to_string())
        .header("ce-source", "/t")
        .header("ce-type", "t")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_publish_outside_the_gateways_bus_grants_is_403_and_reaches_nobody() {
    // Core subjects (no stream stores them) that the gateway's identity may not publish:
    // NATS drops such a publish without a word, so only the gateway's own check can say so.
    let s = setup().await;
    let admin = s.stack.admin().await;
    let mut refused = admin.client().subscribe("elsewhere.>").await.unwrap();
    let mut status = admin
        .client()
        .subscribe("patchbay.v1.runtime.status")
        .await
        .unwrap();
    let mut granted = admin
        .client()
        .subscribe("cc.v1.tests.granted")
        .await
        .unwrap();
    admin.client().flush().await.unwrap();

    for (path, subject) in [
        ("/v1/events/elsewhere.v1.x", "elsewhere.v1.x"),
        (
            "/v1/events/patchbay.v1.runtime.status",
            "patchbay.v1.runtime.status",
        ),
        ("/v1/request/elsewhere.v1.x", "elsewhere.v1.x"),
    ] {
        let started = std::time::Instant::now();
        let response = send_event(s.post(path).header("request-timeout", "25000")).await;
        let body = problem(response, StatusCode::FORBIDDEN).await;
        assert_eq!(
            body["type"], "https://patchbay.dev/problems/bus-permission",
            "{path}: {body}"
        );
        // Which permission is missing: what the identity may publish, and that this is not
        // the subject.
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains(r#"group "gateway""#) && detail.contains("cc.v1.>"),
            "{path}: {detail}"
        );
        assert!(
            detail.contains(&format!("{subject:?} is not covered")),
            "{path}: {detail}"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "{path} waited");
    }

    // A granted core subject still goes through, and is delivered: the check refuses
    // exactly what NATS would.
    let response = send_event(s.post("/v1/events/cc.v1.tests.granted")).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    next_message(&mut granted, Duration::from_secs(5), "the granted event").await;
    // Nothing of the refused ones reached a subscriber.
    for sub in [&mut refused, &mut status] {
        assert!(
            tokio::time::timeout(Duration::from_millis(500), sub.next())
                .await
                .is_err(),
            "a refused publish was delivered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_access_policy_stored_by_bootstrap_applies_to_a_running_gateway() {
    let s = setup().await;
    let ok = send_event(s.post("/v1/events/cc.v1.tests.narrowed")).await;
    assert_eq!(ok.status(), StatusCode::ACCEPTED);

    // The admin stores rules in which the gateway may publish less (what a bootstrap with
    // a narrower deploy/access.toml stores): the running gateway follows them.
    let admin = s.stack.admin().await;
    let store = admin
        .jetstream()
        .get_key_value("patchbay-access")
        .await
        .unwrap();
    let mut rules: Value =
        serde_json::from_slice(&store.get("host-rules").await.unwrap().unwrap()).unwrap();
    let publish = rules["hosts"]["gateway"]["publish"].as_array_mut().unwrap();
    publish.retain(|p| p != "cc.v1.>");
    store
        .put("host-rules", serde_json::to_vec(&rules).unwrap().into())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the gateway to refuse what the new rules refuse",
        || async {
            let response = send_event(s.post("/v1/events/cc.v1.tests.narrowed")).await;
            (response.status() == StatusCode::FORBIDDEN).then_some(())
        },
    )
    .await;
    // Subjects it still holds are unaffected.
    let response = send_event(s.post("/v1/events/cc.v1.calls.c-1.hangup")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_attributes_are_refused_as_the_callers_mistake_never_503() {
    let s = setup().await;
    let huge = "i".repeat(64 << 10);
    // Binary mode: the attribute is a header.
    let response = s
        .post("/v1/events/cc.v1.calls.big.incoming")
        .header("ce-specversion", "1.0")
        .header("ce-id", &huge)
        .header("ce-source", "/t")
        .header("ce-type", "t")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{response:?}"
    );
    // Structured mode: the attribute is in the body.
    let response = s
        .post("/v1/events/cc.v1.calls.big.incoming")
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": huge, "source": "/t", "type": "t"}).to_string())
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST).await;
    // Many attributes that are each acceptable, together larger than a head may be.
    let mut many = json!({"specversion": "1.0", "id": "many-1", "source": "/t", "type": "t"});
    for i in 0..20 {
        many[format!("ext{i}")] = Value::String("x".repeat(4000));
    }
    let response = s
        .post("/v1/events/cc.v1.calls.big.incoming")
        .header("content-type", "application/cloudevents+json")
        .body(many.to_string())
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::BAD_REQUEST).await;
    assert!(
        body["detail"].as_str().unwrap().contains("attributes"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_openapi_document_allows_is_accepted_and_every_refusal_is_documented() {
    let s = setup().await;
    let document: Value = s
        .client
        .get(format!("{}/openapi.json", s.gateway.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses = |path: &str| -> BTreeSet<String> {
        document["paths"][path]["post"]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{path} has no responses"))
            .keys()
            .cloned()
            .collect()
    };
    for (path, must) in [
        (
            "/v1/events/{subject}",
            &[
                "400", "401", "403", "408", "413", "415", "429", "431", "503", "504",
            ][..],
        ),
        (
            "/v1/request/{subject}",
            &[
                "400", "401", "403", "404", "408", "413", "415", "422", "429", "431", "500", "503",
                "504",
            ][..],
        ),
        (
            "/v1/functions/{name}/invoke",
            &[
                "400", "401", "403", "404", "408", "413", "415", "422", "429", "431", "500", "503",
                "504",
            ][..],
        ),
    ] {
        let documented = statuses(path);
        for status in must {
            assert!(
                documented.contains(*status),
                "{path} does not document {status}"
            );
        }
    }
    // An empty body is not a structured event, and the schema says so.
    let events = &document["paths"]["/v1/events/{subject}"]["post"]["requestBody"]["content"];
    let schema = &events["application/cloudevents+json"]["schema"];
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap();
            &document["components"]["schemas"][name]
        }
        None => schema,
    };
    assert_eq!(schema["type"], "object", "{schema}");
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["id", "source", "specversion", "type"].into());

    // The smallest event the schema allows is accepted…
    let response = s
        .post("/v1/events/cc.v1.tests.minimal")
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": "m-1", "source": "/t", "type": "t"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // …and so is an empty request body, which the request routes allow as data.
    let _ = s.stack.deploy("echo", "echo", ECHO_FLAGS);
    let response = s
        .post("/v1/functions/echo/invoke")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Schemathesis — an outside, property-based API tester — generates requests from the
/// gateway's own /openapi.json (valid ones and, for the negative checks, invalid ones) and
/// checks every answer against the same document: documented status codes, content types,
/// response schemas, no 5xx, valid data accepted. Bounded: a fixed seed and a few dozen
/// examples per operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_that_contradicts_the_openapi_document() {
    let s = setup().await;
    let _ = s.stack.deploy("echo", "echo", ECHO_FLAGS);
    let schemathesis = patchbay_tests::repo_root().join(".tools/venv/bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run `make test-tools`",
        schemathesis.display()
    );
    let auth = format!("Authorization: Bearer {}", s.admin_token);
    let spec = format!("{}/openapi.json", s.gateway.url);
    let mut run = tokio::process::Command::new(schemathesis);
    run.args([
        "run",
        &spec,
        "--url",
        &s.gateway.url,
        "-H",
        &auth,
        "--checks",
        "all",
        // 503 (no responders, open circuit) and 504 (deadline) are this API's documented
        // answers about what lies behind it, not server errors; every status is still
        // checked against the document by `status_code_conformance`.
        "--exclude-checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--seed",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
    ])
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), run.output())
        .await
        .expect("schemathesis finishes within 4 minutes")
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
}
