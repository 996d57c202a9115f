//! Canary traffic: `fn deploy --canary`, sticky per interaction across two runtime nodes,
//! `fn rollback`, `fn promote`, and the nodes' automatic rollback of a failing canary.
//!
//! Real nats-server with mTLS, two real `patchbay-runtime` nodes, the real CLI and the
//! `echo` / `misbehave` fixtures. Every interaction (a `partitionkey`) sends its events as
//! core requests on a `subject:` trigger; the reply's `patchbay-fn-version` header says
//! which version handled each one. Counted, never timed: loads are bounded by a count and
//! a time limit, and a limit running out fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use patchbay_bus::reply::{InvokeReply, NODE_HEADER, VERSION_HEADER};
use patchbay_bus::{Bus, CloudEvent};
use patchbay_registry::canary::{Route, choose};
use patchbay_tests::{
    Process, Stack, eventually, free_port, http_get, metric_value, wait_ready, wait_until_serving,
};

/// Upper bound for readiness (nodes up, versions served, verdicts seen).
const READY: Duration = Duration::from_secs(60);
/// Upper bound for one load of interactions.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// Requests in flight at once.
const IN_FLIGHT: usize = 64;

/// What one event's reply said.
#[derive(Debug, Clone)]
struct Answer {
    interaction: String,
    version: u32,
    node: String,
    ok: bool,
}

/// Send `count` interactions keyed `<prefix>-<i>`, each `events` events one after the
/// other (like the events of one call), `IN_FLIGHT` interactions at a time; every event's
/// reply. Panics if any request goes unanswered or the load overruns its limit.
async fn send_interactions(
    bus: &Bus,
    subject: &str,
    prefix: &str,
    count: usize,
    events: usize,
    ty: &str,
) -> Vec<Answer> {
    let client = bus.client().clone();
    let run = futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let subject = subject.to_owned();
            let interaction = format!("{prefix}-{i}");
            let ty = ty.to_owned();
            async move {
                let mut answers = Vec::with_capacity(events);
                for e in 0..events {
                    let event = CloudEvent::new("/test/canary", ty.as_str())
                        .id(format!("{interaction}.{e}"))
                        .partition_key(interaction.clone())
                        .json(&serde_json::json!({ "event": e }))
                        .unwrap();
                    let reply = tokio::time::timeout(
                        Duration::from_secs(10),
                        client.request_with_headers(
                            subject.clone(),
                            event.to_headers(),
                            event.data.clone(),
                        ),
                    )
                    .await
                    .unwrap_or_else(|_| panic!("no reply to {interaction}.{e}"))
                    .unwrap_or_else(|err| panic!("request {interaction}.{e} failed: {err}"));
                    let header = |name: &str| {
                        reply
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(name))
                            .map(|v| v.as_str().to_owned())
                    };
                    let body: InvokeReply = serde_json::from_slice(&reply.payload)
                        .unwrap_or_else(|err| panic!("unreadable reply ({err})"));
                    answers.push(Answer {
                        interaction: interaction.clone(),
                        version: header(VERSION_HEADER)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or_else(|| panic!("reply without a version: {body:?}")),
                        node: header(NODE_HEADER).unwrap_or_default(),
                        ok: matches!(body, InvokeReply::Ok { .. }),
                    });
                }
                answers
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>();
    let answers: Vec<Answer> = tokio::time::timeout(LOAD_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("{count} interactions took longer than {LOAD_LIMIT:?}"))
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(answers.len(), count * events, "every event is answered");
    answers
}

/// The versions that answered each interaction.
fn versions_by_interaction(answers: &[Answer]) -> BTreeMap<&str, BTreeSet<u32>> {
    let mut by: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for a in answers {
        by.entry(&a.interaction).or_default().insert(a.version);
    }
    by
}

/// Start `node` with an admin listener; the listener's address.
fn spawn_node(stack: &Stack, node: &str) -> (Process, String) {
    let admin = format!("127.0.0.1:{}", free_port());
    let process = stack.spawn_runtime_with_env(node, &[("PATCHBAY_ADMIN_LISTEN", admin.as_str())]);
    (process, admin)
}

/// Wait until every node in `nodes` routes a share of `name` to canary `version`
/// (`Some`) or to no canary (`None`).
async fn wait_for_canary_routing(bus: &Bus, nodes: &[&str], name: &str, canary: Option<u32>) {
    eventually(
        READY,
        &format!("{nodes:?} to route {name} to canary {canary:?}"),
        || async {
            let statuses =
                patchbay_cli::function::node_statuses(bus, Duration::from_millis(300)).await;
            nodes
                .iter()
                .all(|node| {
                    statuses.iter().any(|s| {
                        s.node == *node
                            && s.functions
                                .iter()
                                .any(|f| f.name == name && f.canary == canary)
                    })
                })
                .then_some(())
        },
    )
    .await;
}

/// A node's /metrics body.
async fn scrape(admin: &str) -> String {
    let (status, body) = http_get(admin, "/metrics").await.expect("admin listener");
    assert_eq!(status, 200);
    body
}

fn deploy_flags<'a>(subject_trigger: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--trigger",
        subject_trigger,
        "--publish",
        "cc.v1.tests.>",
        "--config",
        "out=cc.v1.tests.canary.out",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// Two runtime nodes, serving and ready, with their admin listeners.
async fn two_nodes(stack: &Stack) -> [(Process, String); 2] {
    let nodes = [spawn_node(stack, "node-1"), spawn_node(stack, "node-2")];
    let bus = stack.admin().await;
    wait_until_serving(&bus, &["node-1", "node-2"], None, READY).await;
    for (_, admin) in &nodes {
        wait_ready(admin, READY).await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_percent_canary_gets_its_share_of_interactions_each_on_one_version_until_rolled_back()
{
    const NAME: &str = "canary-echo";
    const TRIGGER: &str = "subject:cc.v1.tests.canary.in";
    const SUBJECT: &str = "cc.v1.tests.canary.in";
    let stack = Stack::start().await;
    let [(_node1, admin1), (_node2, admin2)] = two_nodes(&stack).await;
    let bus = stack.admin().await;

    let stable = stack.deploy("echo", NAME, &deploy_flags(TRIGGER, &[]));
    assert_eq!(stable["version"], 1);
    wait_until_serving(&bus, &["node-1", "node-2"], Some((NAME, 1)), READY).await;
    // Same component, different config: a distinct version 2, as a 10 % canary.
    let canary = stack.deploy(
        "echo",
        NAME,
        &deploy_flags(TRIGGER, &["--config", "tag=canary", "--canary", "10"]),
    );
    assert_eq!(canary["version"], 2, "{canary}");
    assert_eq!(canary["active"], 1, "{canary}");
    assert_eq!(canary["canary"]["percent"], 10.0, "{canary}");
    wait_for_canary_routing(&bus, &["node-1", "node-2"], NAME, Some(2)).await;
    let listed = stack.cli(&["fn", "ls", "--json"]).success().json();
    assert_eq!(listed[0]["canary"]["version"], 2, "{listed}");
    assert!(listed[0]["canary"]["verdict"].is_null(), "{listed}");

    // 5,000 interactions × 2 events, across both nodes.
    let answers = send_interactions(&bus, SUBJECT, "call", 5_000, 2, "ok").await;
    assert!(answers.iter().all(|a| a.ok), "every event is handled");
    let nodes: BTreeSet<&str> = answers.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["node-1", "node-2"]),
        "both nodes took part"
    );
    let by_interaction = versions_by_interaction(&answers);
    let split: Vec<_> = by_interaction.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        split.is_empty(),
        "{} interactions were answered by both versions, e.g. {:?}",
        split.len(),
        &split[..split.len().min(5)]
    );
    let on_canary = by_interaction.values().filter(|v| v.contains(&2)).count();
    let share = on_canary as f64 / by_interaction.len() as f64 * 100.0;
    assert!(
        (7.0..=13.0).contains(&share),
        "the 10 % canary got {share:.2} % of {} interactions",
        by_interaction.len()
    );
    eprintln!(
        "canary share: {share:.2} % of {} interactions",
        by_interaction.len()
    );
    // Deterministic across nodes: each interaction went where the shared hash sends it.
    for (interaction, versions) in &by_interaction {
        let expected = match choose(10.0, interaction) {
            Route::Canary => 2,
            Route::Stable => 1,
        };
        assert_eq!(
            versions.iter().copied().collect::<Vec<_>>(),
            vec![expected],
            "{interaction}"
        );
    }

    // Both versions show up in the metrics by version, and the canary share as a gauge.
    let mut by_version = [0.0, 0.0];
    for admin in [&admin1, &admin2] {
        let body = scrape(admin).await;
        for (i, version) in ["1", "2"].iter().enumerate() {
            by_version[i] += metric_value(
                &body,
                &format!(
                    "patchbay_fn_invocations_total{{function=\"{NAME}\",outcome=\"ok\",trigger=\"subject\",version=\"{version}\"}}"
                ),
            );
        }
        assert_eq!(
            metric_value(
                &body,
                &format!("patchbay_fn_canary_percent{{function=\"{NAME}\",version=\"2\"}}")
            ),
            10.0,
            "{body}"
        );
    }
    let counted_canary = answers.iter().filter(|a| a.version == 2).count() as f64;
    assert_eq!(by_version[1], counted_canary);
    assert_eq!(by_version[0] + by_version[1], answers.len() as f64);

    // Rollback drops the canary: once it returns, all new traffic is on v1.
    let rolled = stack
        .cli(&["fn", "rollback", NAME, "--json"])
        .success()
        .json();
    assert_eq!(rolled["version"], 1, "{rolled}");
    assert_eq!(rolled["dropped_canary"], 2, "{rolled}");
    let after = send_interactions(&bus, SUBJECT, "call", 1_000, 2, "ok").await;
    let strays: Vec<_> = after.iter().filter(|a| a.version != 1).collect();
    assert!(
        strays.is_empty(),
        "{} events still reached the canary after rollback, e.g. {:?}",
        strays.len(),
        &strays[..strays.len().min(5)]
    );
    let listed = stack.cli(&["fn", "ls", "--json"]).success().json();
    assert!(listed[0]["canary"].is_null(), "{listed}");

    // A new canary, promoted: it takes all the traffic.
    let third = stack.deploy(
        "echo",
        NAME,
        &deploy_flags(TRIGGER, &["--config", "tag=third", "--canary", "10"]),
    );
    assert_eq!(third["version"], 3, "{third}");
    wait_for_canary_routing(&bus, &["node-1", "node-2"], NAME, Some(3)).await;
    let promoted = stack
        .cli(&["fn", "promote", NAME, "--json"])
        .success()
        .json();
    assert_eq!(promoted["version"], 3, "{promoted}");
    wait_until_serving(&bus, &["node-1", "node-2"], Some((NAME, 3)), READY).await;
    wait_for_canary_routing(&bus, &["node-1", "node-2"], NAME, None).await;
    let promoted_traffic = send_interactions(&bus, SUBJECT, "late", 500, 2, "ok").await;
    assert!(
        promoted_traffic.iter().all(|a| a.version == 3),
        "traffic outside the promoted version"
    );
    let _ = stack.cli(&["fn", "promote", NAME]).failure();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_beyond_the_margin_is_rolled_back_by_the_nodes_and_shows_in_metrics() {
    const NAME: &str = "canary-auto";
    const TRIGGER: &str = "subject:cc.v1.tests.canary.auto";
    const SUBJECT: &str = "cc.v1.tests.canary.auto";
    let stack = Stack::start().await;
    let [(_node1, admin1), (_node2, admin2)] = two_nodes(&stack).await;
    let bus = stack.admin().await;

    // Stable: echo answers every event. Canary: misbehave, which dead-letters events of
    // type `dead-letter` — a version whose events all fail.
    let _ = stack.deploy("echo", NAME, &deploy_flags(TRIGGER, &[]));
    wait_until_serving(&bus, &["node-1", "node-2"], Some((NAME, 1)), READY).await;
    let canary = stack.deploy(
        "misbehave",
        NAME,
        &deploy_flags(
            TRIGGER,
            &[
                "--canary",
                "50",
                "--auto-rollback-margin",
                "0.05",
                "--auto-rollback-min-events",
                "50",
            ],
        ),
    );
    assert_eq!(canary["version"], 2, "{canary}");
    wait_for_canary_routing(&bus, &["node-1", "node-2"], NAME, Some(2)).await;

    // Traffic until a node has judged: each node needs 50 canary events of its own.
    let mut sent = 0;
    let verdict = loop {
        let batch =
            send_interactions(&bus, SUBJECT, &format!("b{sent}"), 200, 1, "dead-letter").await;
        assert!(
            batch.iter().all(|a| a.ok == (a.version == 1)),
            "stable answers, the canary fails"
        );
        sent += 200;
        let listed = stack.cli(&["fn", "ls", "--json"]).success().json();
        let verdict = listed[0]["canary"]["verdict"].clone();
        if !verdict.is_null() {
            break verdict;
        }
        assert!(
            sent < 2_000,
            "no verdict after {sent} interactions: {listed}"
        );
    };
    assert_eq!(verdict["version"], 2, "{verdict}");
    assert_eq!(verdict["stable_version"], 1, "{verdict}");
    assert_eq!(verdict["canary_error_rate"], 1.0, "{verdict}");
    assert_eq!(verdict["stable_error_rate"], 0.0, "{verdict}");
    assert!(
        verdict["canary_events"].as_u64().unwrap() >= 50,
        "{verdict}"
    );
    let table = stack.cli(&["fn", "ls"]).success().stdout();
    assert!(table.contains("v2 50% rolled back by node-"), "{table}");
    let described = stack.cli(&["fn", "describe", NAME]).success().stdout();
    assert!(
        described.contains("canary v2 50% rolled back by node-"),
        "{described}"
    );

    // Every node stops routing to the canary; new traffic is all on the stable version.
    wait_for_canary_routing(&bus, &["node-1", "node-2"], NAME, None).await;
    let after = send_interactions(&bus, SUBJECT, "after", 500, 2, "dead-letter").await;
    assert!(
        after.iter().all(|a| a.version == 1 && a.ok),
        "traffic reached the canary after its verdict"
    );

    // In the metrics by version: the canary's failures, the stable version's successes,
    // and a canary share of 0 on every node.
    let (mut canary_failed, mut stable_ok) = (0.0, 0.0);
    for admin in [&admin1, &admin2] {
        let body = scrape(admin).await;
        canary_failed += metric_value(
            &body,
            &format!(
                "patchbay_fn_invocations_total{{function=\"{NAME}\",outcome=\"dead-letter\",trigger=\"subject\",version=\"2\"}}"
            ),
        );
        stable_ok += metric_value(
            &body,
            &format!(
                "patchbay_fn_invocations_total{{function=\"{NAME}\",outcome=\"ok\",trigger=\"subject\",version=\"1\"}}"
            ),
        );
        let gauge = format!("patchbay_fn_canary_percent{{function=\"{NAME}\",version=\"2\"}}");
        assert!(body.contains(&format!("{gauge} 0")), "{body}");
    }
    assert!(canary_failed >= 50.0, "{canary_failed}");
    assert!(stable_ok >= 1_000.0, "{stable_ok}");

    // The operator ends it: rollback drops the canary and its verdict.
    let rolled = stack
        .cli(&["fn", "rollback", NAME, "--json"])
        .success()
        .json();
    assert_eq!(rolled["dropped_canary"], 2, "{rolled}");
    let listed = stack.cli(&["fn", "ls", "--json"]).success().json();
    assert!(listed[0]["canary"].is_null(), "{listed}");
}
