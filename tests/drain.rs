//! Graceful drain: SIGTERM under load loses nothing and handles nothing twice.
//!
//! Real nats-server with mTLS, real `patchbay-runtime` nodes and `patchbay-routing`
//! instances, the `misbehave` fixture. Work takes real time: the function and routing
//! each make a bus request that this test answers after a short delay, so SIGTERM lands
//! while invocations are in flight and more are buffered.
//!
//! Duplicates are counted on core NATS, not in the stream: a core subscriber sees every
//! publish, including the ones JetStream would drop as duplicates by `Nats-Msg-Id`, so a
//! message handled twice shows up even though the stream stores it once. Everything is a
//! count; waits are bounded polls for a state, never timing assertions.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt as _;
use patchbay_bus::resilience::{Resilience, ResilienceWatch};
use patchbay_bus::{Bus, CloudEvent};
use patchbay_protocol::payload::{CallIncoming, CustomerInfo};
use patchbay_tests::{
    Process, Stack, consumer_backlog, eventually, free_port, http_get, stored_count,
    wait_until_serving,
};

/// Upper bound for readiness and for the work to settle (it includes one `ack_wait` for
/// anything the server sent a terminated process just before it unsubscribed).
const SETTLE: Duration = Duration::from_secs(120);
/// The drain timeout given to the process that is terminated.
const DRAIN: &str = "30s";
/// How long `Process::terminate` waits for the exit: the drain timeout plus a margin.
const EXIT_LIMIT: Duration = Duration::from_secs(45);
/// How long the test's responders take to answer one request: the work in flight.
const WORK: Duration = Duration::from_millis(50);
/// Time between two published inputs (a steady, bounded rate).
const PACE: Duration = Duration::from_millis(2);

/// Answer every request on `subject` after [`WORK`] with `reply(request)`, each in its own
/// task, until the returned handle is aborted.
async fn responder(
    bus: &Bus,
    subject: &str,
    reply: fn(&async_nats::Message) -> (HeaderMap, bytes::Bytes),
) -> tokio::task::JoinHandle<()> {
    let mut sub = bus.client().subscribe(subject.to_owned()).await.unwrap();
    bus.client().flush().await.unwrap();
    let client = bus.client().clone();
    tokio::spawn(async move {
        while let Some(request) = sub.next().await {
            let Some(inbox) = request.reply.clone() else {
                continue;
            };
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(WORK).await;
                let (headers, payload) = reply(&request);
                let _ = client.publish_with_headers(inbox, headers, payload).await;
            });
        }
    })
}

/// Two runtime nodes serving: node-1 (to be terminated) with its admin listener and the
/// drain timeout [`DRAIN`], node-2 left running.
async fn two_nodes(stack: &Stack) -> (Process, String, Process) {
    let node1_admin = format!("127.0.0.1:{}", free_port());
    let node1 = stack.spawn_runtime_with_env(
        "node-1",
        &[
            ("PATCHBAY_ADMIN_LISTEN", node1_admin.as_str()),
            ("PATCHBAY_DRAIN_TIMEOUT", DRAIN),
        ],
    );
    let node2 = stack.spawn_runtime("node-2");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1", "node-2"], None, SETTLE).await;
    (node1, node1_admin, node2)
}

/// Count every core publish on `subject` by the key `key_of` reads from it.
async fn count_publishes(
    bus: &Bus,
    subject: &str,
    key_of: fn(&async_nats::Message) -> Option<String>,
) -> (
    Arc<Mutex<BTreeMap<String, usize>>>,
    tokio::task::JoinHandle<()>,
) {
    let mut sub = bus.client().subscribe(subject.to_owned()).await.unwrap();
    bus.client().flush().await.unwrap();
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let counter = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(key) = key_of(&msg) {
                *counter.lock().unwrap().entry(key).or_default() += 1;
            }
        }
    });
    (seen, task)
}

/// Publish `n` inputs, one per [`PACE`], built by `publish(bus, i)`.
fn publish_paced<F, Fut>(bus: &Bus, n: usize, publish: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Bus, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let bus = bus.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PACE);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..n {
            every.tick().await;
            publish(bus.clone(), i).await;
        }
    })
}

/// The sum of every sample of the metric family `name` whose labels contain `label`.
fn metric_sum(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(admin_addr: &str) -> String {
    http_get(admin_addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// SIGTERM `process` (from a blocking section, so the publishers keep running) and
/// report whether it exited 0 within [`EXIT_LIMIT`].
fn terminate(process: &mut Process) -> bool {
    tokio::task::block_in_place(|| process.terminate(EXIT_LIMIT))
}

/// Inputs published but never seen, and inputs seen more than once.
/// Assert that `seen` (publishes per key) holds every one of `expected` exactly once
/// and nothing else; `what` names the publishes ("outputs", "decisions").
fn assert_each_exactly_once(seen: &BTreeMap<String, usize>, expected: &[String], what: &str) {
    let missing: Vec<_> = expected.iter().filter(|k| !seen.contains_key(*k)).collect();
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "inputs without {what}: {missing:?}");
    assert!(
        duplicated.is_empty(),
        "inputs handled more than once ({what} published twice): {duplicated:?}"
    );
    assert_eq!(
        seen.len(),
        expected.len(),
        "{what} for inputs never published: {seen:?}"
    );
}

/// The lines of a process log about its drain (printed for whoever reads the output).
fn drain_lines(log: &str) -> String {
    log.lines()
        .filter(|l| {
            ["shutting down", "handed back", "drained", "drain timeout"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// Runtime node

const FUNCTION: &str = "misbehave";
const WORK_SUBJECT: &str = "cc.v1.tests.drain.work";
const OUT: &str = "cc.v1.calls.drain.analyzed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_runtime_node_under_stream_load_loses_no_event_and_handles_none_twice() {
    const N: usize = 2_000;
    let stack = Stack::start().await;
    let (mut node1, node1_admin, mut node2) = two_nodes(&stack).await;
    let admin = stack.admin().await;
    // Each input asks the test's responder for its own id back (taking WORK), and the
    // function publishes the answer on OUT: one output per input, carrying the input id.
    // A 5 s timeout makes ack_wait 10 s, far above what one message waits on a node.
    let out_config = format!("out={OUT}");
    let flags = [
        "--trigger",
        "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
        "--publish",
        WORK_SUBJECT,
        "--publish",
        OUT,
        "--config",
        &out_config,
        "--timeout",
        "5s",
        "--concurrency",
        "8",
    ];
    let _ = tokio::task::block_in_place(|| stack.deploy("misbehave", FUNCTION, &flags));
    wait_until_serving(&admin, &["node-1", "node-2"], Some((FUNCTION, 1)), SETTLE).await;

    let answers = responder(&admin, WORK_SUBJECT, |request| {
        (HeaderMap::new(), request.payload.clone())
    })
    .await;
    // Outputs are published with their data in the payload: the input id.
    let (seen, counting) = count_publishes(&admin, OUT, |msg| {
        Some(String::from_utf8_lossy(&msg.payload).into_owned())
    })
    .await;

    let publisher = publish_paced(&admin, N, |bus, i| async move {
        let id = format!("rec-{i}");
        let event = CloudEvent::new("/test/recorder", "request")
            .id(id.clone())
            .json(&serde_json::json!({
                "subject": WORK_SUBJECT, "body": id, "timeout_ms": 4_000
            }))
            .unwrap();
        bus.publish_durable(&format!("cc.v1.recordings.{id}.completed"), &event, None)
            .await
            .unwrap();
    });

    // SIGTERM node-1 once it is busy and a quarter of the outputs are out.
    eventually(
        SETTLE,
        "node-1 to handle events and a quarter to be done",
        || async {
            let handled = metric_sum(
                &metrics(&node1_admin).await,
                "patchbay_fn_invocations_total",
                r#"outcome="ok""#,
            );
            (handled >= 10.0 && seen.lock().unwrap().len() >= N / 4).then_some(())
        },
    )
    .await;
    assert!(
        terminate(&mut node1),
        "node-1 did not exit 0 within its drain timeout:\n{}",
        node1.log()
    );
    let node1_log = node1.log();
    assert!(
        node1_log.contains("drained: every in-flight invocation finished"),
        "node-1 abandoned in-flight invocations:\n{node1_log}"
    );
    publisher.await.unwrap();

    // Node-2 takes the rest: what node-1 handed back at once, and after ack_wait anything
    // the server had already sent it.
    eventually(SETTLE, "every input acknowledged", || async {
        (consumer_backlog(&admin, "CC_RECORDINGS", &format!("fn-{FUNCTION}")).await == (0, 0)
            && seen.lock().unwrap().len() >= N)
            .then_some(())
    })
    .await;
    // Every output was published before its input was acked, and the subscriber shares
    // the connection that saw the consumer settle: a flush leaves nothing in transit.
    admin.client().flush().await.unwrap();
    answers.abort();
    counting.abort();

    let seen = seen.lock().unwrap().clone();
    let inputs: Vec<String> = (0..N).map(|i| format!("rec-{i}")).collect();
    assert_each_exactly_once(&seen, &inputs, "an output");
    assert_eq!(stored_count(&admin, "CC_CALLS", OUT).await, N);
    assert_eq!(
        patchbay_tests::dead_letter_count(&admin).await,
        0,
        "inputs were dead-lettered"
    );
    assert!(node2.is_running());
    eprintln!("node-1 at SIGTERM:\n{}", drain_lines(&node1_log));
}

/// Core NATS path (subject trigger and direct invoke), at most once by design: the node
/// leaves its queue groups and answers what it took, its peer takes the rest. One request
/// the server routed to the node while its UNSUB was in flight can still vanish
/// (async-nats 0.51 forgets a drained subscription before the server's PONG fences it), so
/// the callers here do what the platform offers callers for that: a resilience policy
/// retrying on timeout. With it, every request gets exactly one `ok` reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_runtime_node_answers_every_request_it_took_and_its_peer_takes_the_rest() {
    const SENDERS: usize = 24;
    const PER_SENDER: usize = 25;
    const INPUT: &str = "cc.v1.tests.drain.in";
    let stack = Stack::start().await;
    let (mut node1, _, mut node2) = two_nodes(&stack).await;
    let admin = stack.admin().await;
    let trigger = format!("subject:{INPUT}");
    let flags = [
        "--trigger",
        &trigger,
        "--publish",
        "cc.v1.tests.drain.>",
        "--config",
        "out=cc.v1.tests.drain.out",
        "--timeout",
        "5s",
        "--concurrency",
        "8",
    ];
    let _ = tokio::task::block_in_place(|| stack.deploy("misbehave", FUNCTION, &flags));
    wait_until_serving(&admin, &["node-1", "node-2"], Some((FUNCTION, 1)), SETTLE).await;
    let answers = responder(&admin, WORK_SUBJECT, |request| {
        (HeaderMap::new(), request.payload.clone())
    })
    .await;
    let policy = stack.state_dir().join("drain-resilience.toml");
    let retry = r#"timeout = "2s"
retry = { max_attempts = 3, backoff_base = "10ms", retry_on = ["timeout", "no-responders"] }
budget = { ratio = 1.0, min_per_sec = 10.0 }
breaker = { consecutive_failures = 0, failure_rate = 0.0 }
"#;
    std::fs::write(
        &policy,
        format!(
            "[targets.\"subject:{INPUT}\"]\n{retry}\n[targets.\"function:{FUNCTION}\"]\n{retry}"
        ),
    )
    .unwrap();
    let _ = stack
        .cli(&["resilience", "apply", "--file", policy.to_str().unwrap()])
        .success();
    let resilience = Arc::new(Resilience::new(
        ResilienceWatch::start(&admin).await.unwrap(),
        admin.shared_clock(),
    ));

    // Senders alternate between the subject trigger's queue group and direct invocation,
    // each waiting for its reply (at most the client's request timeout) before the next.
    // Replies per request id: (outcome, node).
    let replies: Arc<Mutex<Replies>> = Arc::default();
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (bus, replies, resilience) =
                (admin.clone(), Arc::clone(&replies), Arc::clone(&resilience));
            tokio::spawn(async move {
                for seq in 0..PER_SENDER {
                    let id = format!("req-{sender}-{seq}");
                    let subject = if seq % 2 == 0 {
                        INPUT.to_owned()
                    } else {
                        format!("patchbay.v1.fn.{FUNCTION}.invoke")
                    };
                    let event = CloudEvent::new("/test/sender", "request")
                        .id(id.clone())
                        .json(&serde_json::json!({
                            "subject": WORK_SUBJECT, "body": id, "timeout_ms": 4_000
                        }))
                        .unwrap();
                    let reply = bus
                        .request_resilient(
                            &resilience,
                            &subject,
                            &event,
                            Duration::from_secs(5),
                            None,
                        )
                        .await;
                    let entry = match reply {
                        Ok(msg) => {
                            let header =
                                |name| patchbay_tests::header_value(msg.headers.as_ref(), name);
                            (header("patchbay-outcome"), header("patchbay-node"))
                        }
                        Err(e) => (format!("no reply: {e:?}"), String::new()),
                    };
                    replies.lock().unwrap().entry(id).or_default().push(entry);
                }
            })
        })
        .collect();

    eventually(
        SETTLE,
        "node-1 to answer requests and a quarter to be done",
        || async {
            let replies = replies.lock().unwrap();
            (served_by_in(&replies, "node-1") >= 10 && replies.len() >= SENDERS * PER_SENDER / 4)
                .then_some(())
        },
    )
    .await;
    assert!(
        terminate(&mut node1),
        "node-1 did not exit 0 within its drain timeout:\n{}",
        node1.log()
    );
    let node1_log = node1.log();
    assert!(
        node1_log.contains("drained: every in-flight invocation finished"),
        "node-1 abandoned in-flight invocations:\n{node1_log}"
    );
    for s in senders {
        s.await.unwrap();
    }
    answers.abort();

    let replies = replies.lock().unwrap().clone();
    assert_eq!(replies.len(), SENDERS * PER_SENDER);
    let not_ok: Vec<_> = replies
        .iter()
        .filter(|(_, r)| r.len() != 1 || r[0].0 != "ok")
        .collect();
    assert!(
        not_ok.is_empty(),
        "requests without exactly one ok reply: {not_ok:?}"
    );
    assert!(
        served_by_in(&replies, "node-2") > 0,
        "node-2 answered nothing"
    );
    assert!(node2.is_running());
    eprintln!(
        "node-1 answered {}, node-2 {}; at SIGTERM:\n{}",
        served_by_in(&replies, "node-1"),
        served_by_in(&replies, "node-2"),
        drain_lines(&node1_log)
    );
}

/// Replies per request id: `(outcome header or why none came, node header)` each.
type Replies = BTreeMap<String, Vec<(String, String)>>;

fn served_by_in(replies: &Replies, node: &str) -> usize {
    replies
        .values()
        .flatten()
        .filter(|(_, n)| n == node)
        .count()
}

// ---------------------------------------------------------------------------------------
// Routing service

/// Rules with one queue and no schedule: every call is routed to `general`.
const RULES: &str = r#"
[[queues]]
name = "general"

[default]
queue = "general"
"#;

fn spawn_routing(stack: &Stack, instance: &str, admin_addr: &str) -> Process {
    let rules = stack.state_dir().join("drain-routing.toml");
    std::fs::write(&rules, RULES).unwrap();
    stack.spawn_binary(
        "patchbay-routing",
        "service/routing",
        instance,
        &["--rules", rules.to_str().unwrap()],
        &[
            ("PATCHBAY_ADMIN_LISTEN", admin_addr),
            ("PATCHBAY_ROUTING_INSTANCE", instance),
            ("PATCHBAY_ROUTING_LOOKUP_TIMEOUT", "10s"),
            // Few calls at once, so a backlog forms and some are buffered at SIGTERM.
            ("PATCHBAY_ROUTING_MAX_IN_FLIGHT", "4"),
            ("PATCHBAY_DRAIN_TIMEOUT", DRAIN),
            ("PATCHBAY_LOG", "info"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_one_of_two_routing_instances_under_load_leaves_every_call_with_exactly_one_decision()
 {
    const N: usize = 1_000;
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let addrs = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let mut routing1 = spawn_routing(&stack, "routing-1", &addrs[0]);
    let mut routing2 = spawn_routing(&stack, "routing-2", &addrs[1]);
    for addr in &addrs {
        eventually(SETTLE, "routing to be ready", || async {
            http_get(addr, "/readyz")
                .await
                .filter(|(status, _)| *status == 200)
        })
        .await;
    }

    // The customer lookup answers after WORK, so calls are in flight when SIGTERM lands.
    let lookups = responder(&admin, "cc.v1.customers.lookup", |_| {
        let info = CloudEvent::new("/test/customer-lookup", CustomerInfo::TYPE)
            .json(&serde_json::json!({ "tier": "standard", "known": false }))
            .unwrap();
        (info.to_headers(), info.data.clone())
    })
    .await;
    // Decisions (routed or closed) per call, as published.
    let (seen, counting) = count_publishes(&admin, "cc.v1.calls.*.*", |msg| {
        let mut tokens = msg.subject.split('.');
        let call = tokens.nth(3)?;
        matches!(tokens.next(), Some("routed" | "closed")).then(|| call.to_owned())
    })
    .await;

    let publisher = publish_paced(&admin, N, |bus, i| async move {
        let call = CallIncoming {
            call_id: format!("drain-{i}"),
            dialled: "+448000111222".into(),
            caller: format!("+44 20 7946 {i:04}"),
            ..CallIncoming::default()
        };
        let event = CloudEvent::new("/test/telephony", CallIncoming::TYPE)
            .json(&call)
            .unwrap()
            .partition_key(call.call_id.as_str());
        bus.publish_durable(
            &format!("cc.v1.calls.{}.incoming", call.call_id),
            &event,
            None,
        )
        .await
        .unwrap();
    });

    eventually(
        SETTLE,
        "routing-1 to decide calls and a quarter to be decided",
        || async {
            let decided = metric_sum(
                &metrics(&addrs[0]).await,
                "patchbay_routing_decisions_total",
                "outcome=",
            );
            (decided >= 10.0 && seen.lock().unwrap().len() >= N / 4).then_some(())
        },
    )
    .await;
    assert!(
        terminate(&mut routing1),
        "routing-1 did not exit 0 within its drain timeout:\n{}",
        routing1.log()
    );
    let log = routing1.log();
    assert!(
        !log.contains("abandoned unacked"),
        "routing-1 abandoned calls in flight:\n{log}"
    );
    publisher.await.unwrap();

    eventually(SETTLE, "every call decided and acknowledged", || async {
        (consumer_backlog(&admin, "CC_CALLS", "routing").await == (0, 0)
            && seen.lock().unwrap().len() >= N)
            .then_some(())
    })
    .await;
    admin.client().flush().await.unwrap();
    lookups.abort();
    counting.abort();

    let seen = seen.lock().unwrap().clone();
    let calls: Vec<String> = (0..N).map(|i| format!("drain-{i}")).collect();
    assert_each_exactly_once(&seen, &calls, "a decision");
    let stored = stored_count(&admin, "CC_CALLS", "cc.v1.calls.*.routed").await
        + stored_count(&admin, "CC_CALLS", "cc.v1.calls.*.closed").await;
    assert_eq!(stored, N);
    assert_eq!(
        patchbay_tests::dead_letter_count(&admin).await,
        0,
        "calls were dead-lettered"
    );
    assert!(routing2.is_running());
    eprintln!("routing-1 at SIGTERM:\n{}", drain_lines(&log));
}
