//! Nothing lost: what outside clients broke, kept fixed at the mechanism.
//!
//! Real nats-server with mTLS, real `patchbay-runtime` nodes and the `misbehave` fixture.
//! Each test feeds the platform an input that once lost data or a connection — colliding
//! de-duplication ids, line breaks in CloudEvents attributes, a header block the client
//! could not parse (sent over a raw TLS socket, as a non-Rust client could), an event
//! loop — and asserts, by counting what the bus stored or answered, that every input
//! ends somewhere visible: stored, answered or dead-lettered with its reason.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_bus::CloudEvent;
use patchbay_tests::{
    Stack, dead_letter_count, eventually, publish_raw_event, stored_count, stored_messages,
    wait_until_serving,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

const READY: Duration = Duration::from_secs(60);
const INPUT: &str = "stream:CC_RECORDINGS:cc.v1.recordings.*.completed";

fn deploy_stream_copy(stack: &Stack, name: &str, out: &str) {
    let config = format!("out={out}");
    let flags = [
        "--trigger",
        INPUT,
        "--publish",
        "cc.v1.calls.>",
        "--config",
        &config,
    ];
    tokio::task::block_in_place(|| stack.deploy("misbehave", name, &flags));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stream_functions_fed_the_same_input_each_store_every_output() {
    const N: usize = 40;
    let stack = Stack::start().await;
    let _node = stack.spawn_runtime("node-1");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    // Both write to the same stream (CC_CALLS): their outputs share one de-dup window.
    deploy_stream_copy(&stack, "copy-a", "cc.v1.calls.dedup-a.analyzed");
    deploy_stream_copy(&stack, "copy-b", "cc.v1.calls.dedup-b.analyzed");
    for i in 0..N {
        let event = CloudEvent::new("/test/recorder", "ok").id(format!("rec-{i}"));
        admin
            .publish_durable(&format!("cc.v1.recordings.r{i}.completed"), &event, None)
            .await
            .unwrap();
    }
    for out in [
        "cc.v1.calls.dedup-a.analyzed",
        "cc.v1.calls.dedup-b.analyzed",
    ] {
        eventually(READY, &format!("{N} outputs on {out}"), || async {
            (stored_count(&admin, "CC_CALLS", out).await >= N).then_some(())
        })
        .await;
    }
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.dedup-a.analyzed").await
            + stored_count(&admin, "CC_CALLS", "cc.v1.calls.dedup-b.analyzed").await,
        2 * N,
        "each function stores each of its outputs exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_the_same_id_from_different_sources_are_both_stored_and_a_retry_is_not() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let subject = "cc.v1.recordings.same-id.completed";
    let from_a = CloudEvent::new("/telephony/a", "t").id("call-1");
    let from_b = CloudEvent::new("/telephony/b", "t").id("call-1");
    let first = admin.publish_durable(subject, &from_a, None).await.unwrap();
    let second = admin.publish_durable(subject, &from_b, None).await.unwrap();
    let retry = admin.publish_durable(subject, &from_a, None).await.unwrap();
    assert!(!first.duplicate && !second.duplicate);
    assert!(
        retry.duplicate,
        "the same event (source and id) again is a duplicate"
    );
    assert_eq!(stored_count(&admin, "CC_RECORDINGS", subject).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attribute_with_a_line_break_is_dead_lettered_with_the_reason_and_never_panics() {
    let stack = Stack::start().await;
    let mut node = stack.spawn_runtime("node-1");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    deploy_stream_copy(&stack, "guard", "cc.v1.calls.crlf.analyzed");

    // Publishing such an event through the bus is refused up front, with the reason.
    let bad = CloudEvent::new("/test", "ok").id("bad\r\nNats-Msg-Id: x");
    let refused = admin
        .publish_durable("cc.v1.recordings.crlf.completed", &bad, None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("control character"),
        "{refused}"
    );

    // An outside client can still store one in structured mode; each attribute is tried.
    for (n, attribute) in ["id", "source", "type"].iter().enumerate() {
        let mut body = serde_json::json!({
            "specversion": "1.0", "id": format!("e{n}"), "source": "/s", "type": "ok",
        });
        body[*attribute] = format!("line\nbreak-{n}").into();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/cloudevents+json");
        publish_raw_event(
            &admin,
            &format!("cc.v1.recordings.crlf{n}.completed"),
            headers,
            Bytes::from(body.to_string()),
            None,
        )
        .await;
    }
    // A good event after them is still handled.
    let good = CloudEvent::new("/test", "ok").id("after-the-bad-ones");
    admin
        .publish_durable("cc.v1.recordings.good.completed", &good, None)
        .await
        .unwrap();
    eventually(READY, "three dead letters", || async {
        (dead_letter_count(&admin).await >= 3).then_some(())
    })
    .await;
    eventually(READY, "the good event's output", || async {
        (stored_count(&admin, "CC_CALLS", "cc.v1.calls.crlf.analyzed").await == 1).then_some(())
    })
    .await;
    let letters = stored_messages(&admin, "PATCHBAY_DLQ", "patchbay.v1.dlq.guard").await;
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        let error = patchbay_tests::header_value(letter.headers.as_ref(), "patchbay-dlq-error");
        assert!(error.contains("control character"), "{error}");
    }
    assert!(node.is_running(), "the node must survive:\n{}", node.log());
    assert!(!node.log().contains("panicked"), "{}", node.log());
}

/// A NATS client speaking the protocol by hand over TLS, as any non-Rust client does: it
/// can send bytes the Rust client would never produce.
struct RawClient {
    stream: BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl RawClient {
    async fn connect(stack: &Stack, identity: &str) -> Self {
        let config = patchbay_bus::client::tls_client_config(&stack.bus_config(identity)).unwrap();
        let addr = stack.url().trim_start_matches("tls://").to_owned();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut plain = BufReader::new(tcp);
        let mut info = String::new();
        plain.read_line(&mut info).await.unwrap();
        assert!(info.starts_with("INFO "), "{info}");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name =
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let tls = connector.connect(name, plain.into_inner()).await.unwrap();
        let mut client = Self {
            stream: BufReader::new(tls),
        };
        client
            .send(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":true,\"headers\":true,\"protocol\":1,\"echo\":false}\r\n")
            .await;
        client.ping().await;
        client
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    /// `HPUB` with a hand-made header block.
    async fn hpub(&mut self, subject: &str, reply: Option<&str>, header: &[u8], payload: &[u8]) {
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        let head = format!(
            "HPUB {subject}{reply} {} {}\r\n",
            header.len(),
            header.len() + payload.len()
        );
        let mut frame = head.into_bytes();
        frame.extend_from_slice(header);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame).await;
    }

    /// PING and wait for PONG: everything sent before is processed by the server.
    async fn ping(&mut self) {
        self.send(b"PING\r\n").await;
        let mut line = String::new();
        loop {
            line.clear();
            tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut line))
                .await
                .expect("PONG within 10 s")
                .unwrap();
            assert!(!line.starts_with("-ERR"), "server refused: {line}");
            if line.starts_with("PONG") {
                return;
            }
        }
    }

    /// The payload of the next `MSG`/`HMSG` (within 30 s).
    async fn next_payload(&mut self) -> Vec<u8> {
        let mut line = String::new();
        loop {
            line.clear();
            tokio::time::timeout(Duration::from_secs(30), self.stream.read_line(&mut line))
                .await
                .expect("a message within 30 s")
                .unwrap();
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (header_len, total) = match parts.first().copied() {
                Some("HMSG") => (
                    parts[parts.len() - 2].parse::<usize>().unwrap(),
                    parts[parts.len() - 1].parse::<usize>().unwrap(),
                ),
                Some("MSG") => (0, parts[parts.len() - 1].parse::<usize>().unwrap()),
                Some("PING") => {
                    self.send(b"PONG\r\n").await;
                    continue;
                }
                _ => continue,
            };
            let mut frame = vec![0; total + 2];
            self.stream.read_exact(&mut frame).await.unwrap();
            return frame[header_len..total].to_vec();
        }
    }
}

/// Header blocks async-nats could not parse: each once dropped the receiving connection.
const UNREADABLE: [&[u8]; 3] = [
    b"NATS/1.0\r\nce-id: \xff\xfe\r\n\r\n",
    b"NATS/1.0\r\nce-specversion: 1.0\r\na line without a colon\r\n\r\n",
    b"NATS/1.0\r\nce-\x01bad: x\r\n\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_an_unreadable_header_block_costs_only_itself() {
    let stack = Stack::start().await;
    let mut node = stack.spawn_runtime("node-1");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    deploy_stream_copy(&stack, "headers", "cc.v1.calls.headers.analyzed");
    let mut raw = RawClient::connect(&stack, "cli/admin").await;

    // On a stream: each is dead-lettered with the reason (before, every delivery cut the
    // node's connection until the server gave up on the message, leaving no trace).
    for (n, block) in UNREADABLE.iter().enumerate() {
        raw.hpub(
            &format!("cc.v1.recordings.raw{n}.completed"),
            None,
            block,
            b"{}",
        )
        .await;
    }
    raw.ping().await;
    // On a request: the caller hears why, on the same connection as everything else.
    raw.send(b"SUB _INBOX.cli.admin.raw 1\r\n").await;
    raw.hpub(
        "patchbay.v1.fn.headers.invoke",
        Some("_INBOX.cli.admin.raw"),
        UNREADABLE[0],
        b"{}",
    )
    .await;
    let reply: serde_json::Value = serde_json::from_slice(&raw.next_payload().await).unwrap();
    assert_eq!(reply["outcome"], "error", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("malformed NATS headers"),
        "{reply}"
    );

    eventually(READY, "three dead letters", || async {
        (dead_letter_count(&admin).await >= 3).then_some(())
    })
    .await;
    let letters = stored_messages(&admin, "PATCHBAY_DLQ", "patchbay.v1.dlq.headers").await;
    assert_eq!(letters.len(), 3);
    // And the node still serves good events, on a connection that never dropped.
    let good = CloudEvent::new("/test", "ok").id("good");
    admin
        .publish_durable("cc.v1.recordings.good.completed", &good, None)
        .await
        .unwrap();
    eventually(READY, "the good event's output", || async {
        (stored_count(&admin, "CC_CALLS", "cc.v1.calls.headers.analyzed").await == 1).then_some(())
    })
    .await;
    let log = node.log();
    assert!(node.is_running(), "{log}");
    assert!(
        !log.to_lowercase().contains("disconnected"),
        "the node's connection dropped:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_whose_output_triggers_itself_stops_at_the_hop_limit() {
    const MAX_HOPS: usize = 5;
    const LOOP: &str = "cc.v1.loop.ping";
    let stack = Stack::start().await;
    let max = MAX_HOPS.to_string();
    let node = stack.spawn_runtime_with_env("node-1", &[("PATCHBAY_MAX_HOPS", &max)]);
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    let trigger = format!("subject:{LOOP}");
    let out = format!("out={LOOP}");
    let flags = ["--trigger", &trigger, "--publish", LOOP, "--config", &out];
    tokio::task::block_in_place(|| stack.deploy("misbehave", "looper", &flags));

    let mut seen = admin.client().subscribe(LOOP.to_owned()).await.unwrap();
    admin.client().flush().await.unwrap();
    admin
        .publish(LOOP, &CloudEvent::new("/test", "ok"), None)
        .await
        .unwrap();
    // The first event, then one output per allowed hop.
    let mut chains = Vec::new();
    for _ in 0..=MAX_HOPS {
        let msg = tokio::time::timeout(Duration::from_secs(30), seen.next())
            .await
            .expect("the loop's next message within 30 s")
            .unwrap();
        chains.push(patchbay_bus::hops::HopChain::from_headers(
            msg.headers.as_ref(),
        ));
    }
    let lengths: Vec<usize> = chains.iter().map(|c| c.len()).collect();
    assert_eq!(lengths, (0..=MAX_HOPS).collect::<Vec<_>>());
    assert!(chains[MAX_HOPS].handlers().iter().all(|h| h == "fn/looper"));
    // Nothing after the limit (bounded wait: the loop ran at ~400/s before).
    let more = tokio::time::timeout(Duration::from_secs(2), seen.next()).await;
    assert!(more.is_err(), "the loop went on past the hop limit");
    assert!(node.log().contains("hop limit"), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_an_http_function_continues_its_hop_chain_and_is_refused_at_the_limit() {
    let stack = Stack::start().await;
    let gateway = stack
        .spawn_gateway_with_env(&[], "http", &[("PATCHBAY_MAX_HOPS", "3")])
        .await;
    let token = stack.token("admin", &["admin"], &[]);
    let client = patchbay_tests::gateway::http_client(None);
    let echo = patchbay_tests::component("http-echo");
    let _ = stack
        .cli(&[
            "fn",
            "deploy",
            echo.to_str().unwrap(),
            "--name",
            "hello",
            "--trigger",
            "http:/hello",
        ])
        .success();
    let get = |hops: Option<&str>| {
        let mut request = client
            .get(format!("{}/hello", gateway.url))
            .bearer_auth(&token);
        if let Some(hops) = hops {
            request = request.header(patchbay_bus::hops::HOPS_HEADER, hops);
        }
        request.send()
    };
    eventually(READY, "the gateway serves the HTTP function", || async {
        (get(None).await.ok()?.status() == 200).then_some(())
    })
    .await;

    // Two handlers before it: the function is the third, within the limit of three.
    let within = get(Some("gateway/desk,fn/enrich")).await.unwrap();
    assert_eq!(within.status(), 200);
    // Three before it: the fourth is a loop, refused before the function runs.
    let refused = get(Some("fn/a,fn/b,fn/a")).await.unwrap();
    assert_eq!(refused.status(), 508);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["status"], 508, "{problem}");
    assert!(
        problem["type"].as_str().unwrap().ends_with("/hop-limit"),
        "{problem}"
    );
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("hop limit of 3 exceeded") && detail.contains("fn/a,fn/b,fn/a,fn/hello"),
        "{detail}"
    );
    let (_, metrics) = patchbay_tests::http_get(&gateway.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("patchbay_gateway_refused_total{")
                && l.contains(r#"reason="hop-limit""#)
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // And the gateway goes on serving.
    assert_eq!(get(None).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_through_the_gateway_carries_its_hop_chain_on_and_is_refused_at_the_limit() {
    let stack = Stack::start().await;
    let gateway = stack
        .spawn_gateway_with_env(&[], "http", &[("PATCHBAY_MAX_HOPS", "3")])
        .await;
    let token = stack.token("admin", &["admin"], &[]);
    let client = patchbay_tests::gateway::http_client(None);
    let admin = stack.admin().await;
    let mut seen = admin.client().subscribe("cc.v1.tests.hops").await.unwrap();
    let post = |hops: &'static str| {
        client
            .post(format!("{}/v1/events/cc.v1.tests.hops", gateway.url))
            .bearer_auth(&token)
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("hops-{}", hops.len()))
            .header("ce-source", "/webhook")
            .header("ce-type", "test.hops.v1")
            .header(patchbay_bus::hops::HOPS_HEADER, hops)
            .body("{}")
            .send()
    };

    // A webhook that a function called: its chain goes on, one longer, onto the bus.
    assert_eq!(post("fn/a").await.unwrap().status(), 202);
    let message = tokio::time::timeout(READY, futures::StreamExt::next(&mut seen))
        .await
        .unwrap()
        .unwrap();
    let chain = patchbay_bus::hops::HopChain::from_headers(message.headers.as_ref());
    assert_eq!(chain.handlers(), ["fn/a", "gateway"]);

    // At the limit: refused before anything is published.
    let refused = post("fn/a,fn/b,fn/a").await.unwrap();
    assert_eq!(refused.status(), 508);
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("fn/a,fn/b,fn/a,gateway"),
        "{problem}"
    );
    let nothing = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut seen),
    )
    .await;
    assert!(nothing.is_err(), "a refused event reached the bus");
}
