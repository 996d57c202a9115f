//! Durable batch publish against a real nats-server (mTLS, JetStream, `sync_interval:
//! always`): what `patchbay_bus::batch` promises — a batch stored whole with one commit,
//! a retried batch stored once, long lists split at the server's limit, streams without
//! `allow_atomic` served message by message, and every refusal reported with the server's
//! reason, nothing stored of it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use async_nats::HeaderMap;
use async_nats::jetstream::stream;
use patchbay_bus::batch::{BatchError, BatchPublisher, Durable, MAX_BATCH};
use patchbay_bus::{Bus, CloudEvent};
use patchbay_tests::{Stack, header_value, stored_count, stored_messages};

/// A call event for `call`, headers as the platform builds them (CloudEvent attributes,
/// the trace context of a span of its own, the sender).
fn call_event(bus: &Bus, run: &str, call: usize) -> Durable {
    let event = CloudEvent::new(bus.source(), "cc.call.test.v1")
        .json(&serde_json::json!({ "call": call }))
        .unwrap();
    let span = tracing::info_span!("publish");
    let mut headers = Bus::headers(&event, &span, None);
    bus.stamp_sender(&mut headers);
    Durable {
        subject: format!("cc.v1.calls.c{call}.b{run}"),
        headers,
        payload: event.data.clone(),
        id: format!("{run}-{call}"),
    }
}

fn events(bus: &Bus, run: &str, calls: std::ops::Range<usize>) -> Vec<Durable> {
    calls.map(|c| call_event(bus, run, c)).collect()
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_whole_with_one_commit_each_message_with_its_own_headers() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let run = run_id();
    let batch = events(&admin, &run, 0..5);

    let stored = BatchPublisher::new(&admin)
        .publish("CC_CALLS", &batch)
        .await
        .unwrap();

    assert_eq!((stored.commits, stored.atomic, stored.pipelined), (1, 5, 0));
    assert!(stored.duplicates.is_empty());
    let filter = format!("cc.v1.calls.*.b{run}");
    assert_eq!(stored_count(&admin, "CC_CALLS", &filter).await, 5);
    let messages = stored_messages(&admin, "CC_CALLS", &filter).await;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    let expected: Vec<String> = batch.iter().map(|d| d.subject.clone()).collect();
    assert_eq!(subjects, expected, "stored in the order given");
    for (message, sent) in messages.iter().zip(&batch) {
        let headers = message.headers.as_ref();
        assert_eq!(header_value(headers, "Nats-Msg-Id"), sent.id);
        assert_eq!(
            header_value(headers, "ce-id"),
            header_value(Some(&sent.headers), "ce-id"),
            "each message keeps its own CloudEvent headers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_stores_nothing_twice_and_names_what_was_already_stored() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let run = run_id();
    let publisher = BatchPublisher::new(&admin);
    publisher
        .publish("CC_CALLS", &events(&admin, &run, 0..3))
        .await
        .unwrap();

    // The same three (a commit whose ack was lost, retried) plus two new ones.
    let retry = events(&admin, &run, 0..5);
    let stored = publisher.publish("CC_CALLS", &retry).await.unwrap();

    assert_eq!(stored.duplicates, vec![0, 1, 2]);
    assert_eq!(
        stored.pipelined, 5,
        "a batch holding stored ids goes message by message"
    );
    let filter = format!("cc.v1.calls.*.b{run}");
    assert_eq!(stored_count(&admin, "CC_CALLS", &filter).await, 5);

    let again = publisher.publish("CC_CALLS", &retry).await.unwrap();
    assert_eq!(again.duplicates, vec![0, 1, 2, 3, 4]);
    assert_eq!(stored_count(&admin, "CC_CALLS", &filter).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_longer_than_the_servers_limit_is_stored_as_consecutive_batches_in_order() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let run = run_id();
    let total = MAX_BATCH * 2 + 17;
    let list = events(&admin, &run, 0..total);

    let stored = BatchPublisher::new(&admin)
        .publish("CC_CALLS", &list)
        .await
        .unwrap();

    assert_eq!((stored.commits, stored.atomic), (3, total));
    let filter = format!("cc.v1.calls.*.b{run}");
    let messages = stored_messages(&admin, "CC_CALLS", &filter).await;
    let ids: Vec<String> = messages
        .iter()
        .map(|m| header_value(m.headers.as_ref(), "Nats-Msg-Id"))
        .collect();
    let expected: Vec<String> = list.iter().map(|d| d.id.clone()).collect();
    assert!(
        ids == expected,
        "{} stored, not in the order given",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_batch_limit_splits_every_batch_at_it() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let run = run_id();

    let stored = BatchPublisher::new(&admin)
        .max_batch(4)
        .publish("CC_CALLS", &events(&admin, &run, 0..10))
        .await
        .unwrap();

    assert_eq!((stored.commits, stored.atomic), (3, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_atomic_publish_gets_the_messages_one_by_one() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let run = run_id();
    let subject = format!("plain.{run}");
    admin
        .jetstream()
        .create_stream(stream::Config {
            name: format!("PLAIN_{run}"),
            subjects: vec![format!("{subject}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let list: Vec<Durable> = (0..4)
        .map(|i| Durable {
            subject: format!("{subject}.{i}"),
            headers: HeaderMap::new(),
            payload: format!("m{i}").into(),
            id: format!("{run}-{i}"),
        })
        .collect();
    let publisher = BatchPublisher::new(&admin);

    let first = publisher
        .publish(&format!("PLAIN_{run}"), &list)
        .await
        .unwrap();
    let second = publisher
        .publish(&format!("PLAIN_{run}"), &list)
        .await
        .unwrap();

    assert_eq!((first.commits, first.atomic, first.pipelined), (4, 0, 4));
    assert!(first.duplicates.is_empty());
    assert_eq!(second.duplicates, vec![0, 1, 2, 3], "de-duplicated by id");
    let stream_name = format!("PLAIN_{run}");
    assert_eq!(
        stored_count(&admin, &stream_name, &format!("{subject}.>")).await,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_server_refuses_is_reported_with_its_reason_and_nothing_of_it_is_stored() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let run = run_id();
    let mut list = events(&admin, &run, 0..3);
    // Not allowed inside an atomic batch (ADR-50).
    list[1]
        .headers
        .insert("Nats-Expected-Last-Msg-Id", "anything");

    let refused = BatchPublisher::new(&admin)
        .publish("CC_CALLS", &list)
        .await
        .unwrap_err();

    match &refused {
        BatchError::Refused {
            stream,
            messages,
            code,
            description,
        } => {
            assert_eq!((stream.as_str(), *messages, *code), ("CC_CALLS", 3, 10177));
            assert!(
                description.contains("Nats-Expected-Last-Msg-Id"),
                "{description}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let filter = format!("cc.v1.calls.*.b{run}");
    assert_eq!(stored_count(&admin, "CC_CALLS", &filter).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_stream_captures_is_an_error_naming_it() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let list = vec![Durable {
        subject: "nowhere.at.all".into(),
        headers: HeaderMap::new(),
        payload: "x".into(),
        id: "x".into(),
    }];

    let error = BatchPublisher::new(&admin)
        .publish("NONE", &list)
        .await
        .unwrap_err();

    assert!(
        matches!(&error, BatchError::NoStream { subject } if subject == "nowhere.at.all"),
        "{error:?}"
    );
}

/// `N` recordings stored at once, a stream-triggered copy function on one node: every
/// input has its one output stored, once, and every output went through the node's group
/// commit (atomic batches), whatever size the batches happened to have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_triggers_outputs_are_group_committed_each_stored_once() {
    const N: usize = 300;
    const OUT: &str = "cc.v1.calls.grouped.copied";
    let stack = Stack::start().await;
    let admin_listen = format!("127.0.0.1:{}", patchbay_tests::free_port());
    let _node = stack.spawn_runtime_with_env("node-1", &[("PATCHBAY_ADMIN_LISTEN", &admin_listen)]);
    let admin = stack.admin().await;
    let ready = std::time::Duration::from_secs(60);
    patchbay_tests::wait_until_serving(&admin, &["node-1"], None, ready).await;
    let config = format!("out={OUT}");
    let flags = [
        "--trigger",
        "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
        "--publish",
        "cc.v1.calls.>",
        "--config",
        &config,
        "--concurrency",
        "32",
    ];
    tokio::task::block_in_place(|| stack.deploy("misbehave", "copier", &flags));
    patchbay_tests::wait_until_serving(&admin, &["node-1"], Some(("copier", 1)), ready).await;

    let inputs: Vec<Durable> = (0..N)
        .map(|i| {
            let event = CloudEvent::new("/test/recorder", "ok")
                .id(format!("rec-{i}"))
                .json(&serde_json::json!({ "recording": i }))
                .unwrap();
            let subject = format!("cc.v1.recordings.rec-{i}.completed");
            admin
                .durable(
                    &subject,
                    &event,
                    &event.dedup_id(),
                    &tracing::Span::none(),
                    None,
                )
                .unwrap()
        })
        .collect();
    BatchPublisher::new(&admin)
        .publish("CC_RECORDINGS", &inputs)
        .await
        .unwrap();

    patchbay_tests::wait_consumers_settled(&admin, &[("CC_RECORDINGS", "fn-copier")], ready).await;
    let outputs = stored_messages(&admin, "CC_CALLS", OUT).await;
    let mut ids: Vec<String> = outputs
        .iter()
        .map(|m| header_value(m.headers.as_ref(), "Nats-Msg-Id"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (outputs.len(), ids.len()),
        (N, N),
        "one output per input, each once"
    );
    let (_, body) = patchbay_tests::http_get(&admin_listen, "/metrics")
        .await
        .unwrap();
    let atomic = patchbay_tests::metric_sum(
        &body,
        "patchbay_bus_stored_per_commit_sum",
        r#"mode="atomic""#,
    );
    assert_eq!(atomic, N as f64, "every output stored by an atomic batch");
}
