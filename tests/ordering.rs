//! Per-key ordering of `stream` triggers (`patchbay fn deploy --ordered`, issue 7).
//!
//! Real nats-server with mTLS, real `patchbay-runtime` nodes, the real CLI and the
//! `misbehave` fixture (tests/components/misbehave: an `ok` event comes back as one output,
//! equal to the input but on the subject of config `out`). Order is read from what the bus
//! stored — outputs in stream order, de-duplicated by `Nats-Msg-Id` — and from consumer
//! and stream state; loops are bounded by counts and time limits, and a limit running out
//! fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use patchbay_bus::{Bus, CloudEvent};
use patchbay_tests::{
    Stack, eventually, free_port, http_get, stored_count, wait_consumers_settled,
    wait_until_serving,
};

/// Upper bound for readiness (nodes up, versions served, work finished).
const READY: Duration = Duration::from_secs(90);
const ORDERED: &str = "PATCHBAY_ORDERED";

/// Sum of `patchbay_fn_invocations_total` for `function` on the node whose admin listener
/// is `addr` (0 while it does not answer).
async fn invocations(addr: &str, function: &str) -> f64 {
    let Some((200, body)) = http_get(addr, "/metrics").await else {
        return 0.0;
    };
    let label = format!("function=\"{function}\"");
    body.lines()
        .filter(|l| l.starts_with("patchbay_fn_invocations_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every message `stream` stores under `subject`, in stream order, as (headers, data).
async fn stored(
    admin: &Bus,
    stream: &str,
    subject: &str,
) -> Vec<(async_nats::HeaderMap, serde_json::Value)> {
    patchbay_tests::stored_messages(admin, stream, subject)
        .await
        .into_iter()
        .map(|msg| {
            let data = serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null);
            (msg.headers.clone().unwrap_or_default(), data)
        })
        .collect()
}

fn header(headers: &async_nats::HeaderMap, name: &str) -> String {
    patchbay_tests::header_value(Some(headers), name)
}

/// Consumer names `fn-<function>-p0 …` on PATCHBAY_ORDERED, sorted.
async fn partition_consumers(admin: &Bus, function: &str) -> Vec<String> {
    use futures::TryStreamExt as _;
    let stream = admin.jetstream().get_stream(ORDERED).await.unwrap();
    let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    names.retain(|n| n.starts_with(&format!("fn-{function}-p")));
    names.sort();
    names
}

/// The source transforms of PATCHBAY_ORDERED as (origin stream, src, dest).
async fn sources(admin: &Bus) -> Vec<(String, String, String)> {
    let mut stream = admin.jetstream().get_stream(ORDERED).await.unwrap();
    let info = stream.info().await.unwrap();
    info.config
        .sources
        .clone()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| {
            s.subject_transforms
                .into_iter()
                .map(move |t| (s.name.clone(), t.source, t.destination))
        })
        .collect()
}

async fn messages_in(admin: &Bus, stream: &str) -> u64 {
    let mut stream = admin.jetstream().get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_calls_events_are_handled_strictly_in_order_across_two_nodes_even_when_one_is_killed_midway()
 {
    const FUNCTION: &str = "ordered";
    const CALLS: usize = 200;
    const EVENTS: usize = 10;
    const TOTAL: usize = CALLS * EVENTS;
    const OUT: &str = "cc.v1.calls.ordering.handled";
    let stack = Stack::start().await;
    let admin_1 = format!("127.0.0.1:{}", free_port());
    let admin_2 = format!("127.0.0.1:{}", free_port());
    let mut node1 =
        stack.spawn_runtime_with_env("node-1", &[("PATCHBAY_ADMIN_LISTEN", admin_1.as_str())]);
    let _node2 =
        stack.spawn_runtime_with_env("node-2", &[("PATCHBAY_ADMIN_LISTEN", admin_2.as_str())]);
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1", "node-2"], None, READY).await;
    // The key is the first `*`: the call id. `>` carries the rest of the subject through.
    let out_config = format!("out={OUT}");
    let deployed = stack.deploy(
        "misbehave",
        FUNCTION,
        &[
            "--trigger",
            "stream:CC_RECORDINGS:cc.v1.recordings.*.>",
            "--ordered",
            "--publish",
            "cc.v1.calls.>",
            "--config",
            &out_config,
            "--timeout",
            "1s",
        ],
    );
    assert_eq!(
        deployed["trigger"],
        "stream:CC_RECORDINGS:cc.v1.recordings.*.> (ordered by key, 16 partitions)"
    );
    wait_until_serving(&admin, &["node-1", "node-2"], Some((FUNCTION, 1)), READY).await;
    let partitions = partition_consumers(&admin, FUNCTION).await;
    assert_eq!(
        partitions.len(),
        16,
        "default partition count: {partitions:?}"
    );

    // Interleave the calls: event 0 of every call, then event 1 of every call, … Sent on one
    // connection without waiting for each acknowledgement (so the stream order is the send
    // order), then every acknowledgement is awaited: the nodes face a backlog in every
    // partition and are busy when one of them dies.
    let js = admin.jetstream();
    let mut acks = Vec::with_capacity(TOTAL);
    for seq in 0..EVENTS {
        for call in 0..CALLS {
            let key = format!("call-{call:03}");
            let event = CloudEvent::new("/test/ordering", "ok")
                .id(format!("{key}-{seq}"))
                .partition_key(key.clone())
                .json(&serde_json::json!({ "call": call, "seq": seq }))
                .unwrap();
            let mut headers = event.to_headers();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
            let subject = format!("cc.v1.recordings.{key}.step.{seq}");
            acks.push(
                js.publish_with_headers(subject, headers, event.data.clone())
                    .await
                    .unwrap(),
            );
        }
    }
    for ack in acks {
        ack.await.expect("input stored");
    }

    // Kill node-1 (SIGKILL, no drain) once about half of the outputs are stored and both
    // nodes have handled events.
    let node1_handled = eventually(READY, "half the outputs, from both nodes", || async {
        let outputs = stored_count(&admin, "CC_CALLS", OUT).await;
        let (on_1, on_2) = (
            invocations(&admin_1, FUNCTION).await,
            invocations(&admin_2, FUNCTION).await,
        );
        (outputs >= TOTAL / 2 && on_1 > 0.0 && on_2 > 0.0).then_some(on_1)
    })
    .await;
    node1.kill9();
    let outputs_at_kill = stored_count(&admin, "CC_CALLS", OUT).await;

    // Whatever node-1 held comes back to node-2 after ack_wait (3 s), ahead of anything
    // later in its partition.
    eventually(READY, "every output stored", || async {
        (stored_count(&admin, "CC_CALLS", OUT).await >= TOTAL).then_some(())
    })
    .await;
    let consumers: Vec<(&str, &str)> = partitions.iter().map(|c| (ORDERED, c.as_str())).collect();
    wait_consumers_settled(&admin, &consumers, READY).await;

    // Each call's outputs, in the order the stream stored them (= the order they were
    // handled: an event's output is stored before it is acked, and its partition's next
    // event is only delivered after that ack).
    let outputs = stored(&admin, "CC_CALLS", OUT).await;
    let mut per_call: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut ids = std::collections::BTreeSet::new();
    let mut duplicates = 0;
    for (headers, data) in &outputs {
        let id = header(headers, "ce-id");
        // De-duplicated per (function, input source and id, output index).
        let input = CloudEvent::new("/test/ordering", "ok").id(id.clone());
        assert_eq!(
            header(headers, "Nats-Msg-Id"),
            input.output_dedup_id(FUNCTION, 0)
        );
        if !ids.insert(id) {
            duplicates += 1;
            continue;
        }
        per_call
            .entry(data["call"].as_u64().unwrap())
            .or_default()
            .push(data["seq"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (0..EVENTS as u64).collect();
    let out_of_order: Vec<_> = per_call
        .iter()
        .filter(|(_, seqs)| **seqs != expected)
        .collect();
    assert_eq!(per_call.len(), CALLS, "calls with outputs");
    assert!(
        out_of_order.is_empty(),
        "calls handled out of order or incompletely: {out_of_order:?}"
    );
    assert_eq!(ids.len(), TOTAL, "distinct outputs");
    assert_eq!(duplicates, 0, "outputs stored twice");
    assert_eq!(
        messages_in(&admin, ORDERED).await,
        0,
        "copies left unhandled"
    );
    assert_eq!(messages_in(&admin, "PATCHBAY_DLQ").await, 0, "dead letters");
    // Every delivery counts in a consumer's sequence: beyond one per event, redeliveries.
    let mut deliveries = 0;
    for c in &partitions {
        let info = js
            .get_stream(ORDERED)
            .await
            .unwrap()
            .consumer_info(c)
            .await
            .unwrap();
        deliveries += info.delivered.consumer_sequence;
    }
    eprintln!(
        "node-1 handled {node1_handled} before the kill at {outputs_at_kill}/{TOTAL} outputs; \
         node-2 handled {} in all; {} redelivered",
        invocations(&admin_2, FUNCTION).await,
        deliveries - TOTAL as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_trigger_keeps_its_source_across_bootstrap_dead_letters_and_moves_on_and_is_removed_with_the_function()
 {
    const FUNCTION: &str = "ordered-life";
    const OUT: &str = "cc.v1.calls.ordering.life";
    let stack = Stack::start().await;
    let _node = stack.spawn_runtime("node-1");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    let path = patchbay_tests::component("misbehave");
    let path = path.to_str().unwrap();

    // No `*` to take the key from: refused before anything is stored.
    let refused = stack
        .cli(&[
            "fn",
            "deploy",
            path,
            "--name",
            FUNCTION,
            "--trigger",
            "stream:CC_RECORDINGS:cc.v1.recordings.>",
            "--ordered",
        ])
        .failure();
    assert!(refused.stderr().contains("first `*` token"), "{refused:?}");
    assert!(sources(&admin).await.is_empty());

    let out_config = format!("out={OUT}");
    let flags = [
        "--trigger",
        "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
        "--ordered",
        "--partitions",
        "4",
        "--publish",
        "cc.v1.calls.>",
        "--config",
        &out_config,
        "--max-deliver",
        "2",
    ];
    let first = stack.deploy("misbehave", FUNCTION, &flags);
    assert_eq!(first["version"], 1);
    let expected_source = (
        "CC_RECORDINGS".to_owned(),
        "cc.v1.recordings.*.completed".to_owned(),
        format!(
            "patchbay.v1.ordered.{FUNCTION}.{{{{partition(4,1)}}}}.cc.v1.recordings.{{{{wildcard(1)}}}}.completed"
        ),
    );
    assert_eq!(
        sources(&admin).await,
        std::slice::from_ref(&expected_source)
    );
    let consumers = partition_consumers(&admin, FUNCTION).await;
    assert_eq!(
        consumers,
        (0..4)
            .map(|p| format!("fn-{FUNCTION}-p{p}"))
            .collect::<Vec<_>>()
    );
    let info = admin
        .jetstream()
        .get_stream(ORDERED)
        .await
        .unwrap()
        .consumer_info(&consumers[0])
        .await
        .unwrap();
    assert_eq!(info.config.max_ack_pending, 1);

    // Bootstrapping again (as `patchbay up` does) keeps the source `fn deploy` added, and
    // so does deploying the same thing again.
    patchbay_control::local::bootstrap(&admin, &stack.prepared.deploy_dir)
        .await
        .unwrap();
    assert_eq!(
        sources(&admin).await,
        std::slice::from_ref(&expected_source)
    );
    let again = stack.deploy("misbehave", FUNCTION, &flags);
    assert_eq!(again["unchanged"], true);
    assert_eq!(sources(&admin).await, [expected_source]);

    // A dead-lettered event does not block its key: the next one is handled after it. The
    // dead letter names the subject the event was published on, not its partition copy.
    for (seq, ty) in [(0, "dead-letter"), (1, "ok")] {
        let event = CloudEvent::new("/test/ordering", ty)
            .id(format!("life-{seq}"))
            .partition_key("call-life")
            .json(&serde_json::json!({ "seq": seq }))
            .unwrap();
        admin
            .publish_durable("cc.v1.recordings.call-life.completed", &event, None)
            .await
            .unwrap();
    }
    eventually(READY, "the event after the dead letter handled", || async {
        (stored_count(&admin, "CC_CALLS", OUT).await == 1).then_some(())
    })
    .await;
    let dead = stored(&admin, "PATCHBAY_DLQ", "patchbay.v1.dlq.>").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0].0, patchbay_bus::dlq::SUBJECT),
        "cc.v1.recordings.call-life.completed"
    );
    let handled = stored(&admin, "CC_CALLS", OUT).await;
    assert_eq!(header(&handled[0].0, "ce-id"), "life-1");

    // Removing the function removes its source and partition consumers.
    let _ = stack.cli(&["fn", "rm", FUNCTION]).success();
    assert!(sources(&admin).await.is_empty());
    assert!(partition_consumers(&admin, FUNCTION).await.is_empty());
}
