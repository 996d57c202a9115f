//! The agents service end to end: the real `patchbay-agents` binary as `service/agents` on
//! a real nats-server with mTLS, bound to the bootstrapped durable consumers `agents` on
//! CC_CALLS and CC_AGENT_CMDS, persisting to the `cc-agents` bucket.
//!
//! Routed calls, hang-ups and agent commands are published durably as `cli/admin`
//! (standing in for routing, telephony and agent desktops); what the service decides is
//! read off the bus. Engine timeouts are made short through the config file; waits are
//! bounded polls for an event, a metric or a consumer state, never sleeps. Crashes are
//! real `kill -9`s, and a restarted service uses another instance name, so an event's
//! CloudEvents `source` says which process decided it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use patchbay_bus::hops::{HOPS_HEADER, HopChain};
use patchbay_bus::{Bus, CloudEvent, RequestOptions};
use patchbay_protocol::payload::{AgentMissed, AgentStateChanged, CallUpdate};
use patchbay_tests::{
    Process, Stack, free_port, http_get, metric_sum, metric_value, publish_json, publish_raw_event,
    stored_count, stored_messages, wait_consumers_settled, wait_ready,
};
use serde_json::json;

/// Upper bound for readiness and for an event to arrive.
const READY: Duration = Duration::from_secs(60);

const CONSUMERS: [(&str, &str); 2] = [("CC_CALLS", "agents"), ("CC_AGENT_CMDS", "agents")];

/// A running agents service and where to reach its admin listener.
struct Agents {
    process: Process,
    admin: String,
}

impl Agents {
    /// Start `patchbay-agents` as `instance` with `engine_toml` as its config file, and wait
    /// until it is ready (snapshot loaded, consumers bound).
    async fn start(stack: &Stack, instance: &str, engine_toml: &str) -> Self {
        let agents = Self::spawn(stack, instance, engine_toml);
        wait_ready(&agents.admin, READY).await;
        agents
    }

    /// Like [`Agents::start`], with `extra_env` set too (e.g. `PATCHBAY_MAX_HOPS`).
    async fn start_with_env(
        stack: &Stack,
        instance: &str,
        engine_toml: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let agents = Self::spawn_with_env(stack, instance, engine_toml, extra_env);
        wait_ready(&agents.admin, READY).await;
        agents
    }

    /// Start `patchbay-agents` without waiting for it to be ready.
    fn spawn(stack: &Stack, instance: &str, engine_toml: &str) -> Self {
        Self::spawn_with_env(stack, instance, engine_toml, &[])
    }

    fn spawn_with_env(
        stack: &Stack,
        instance: &str,
        engine_toml: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let config = stack.state_dir().join(format!("{instance}.toml"));
        std::fs::write(&config, engine_toml).unwrap();
        let admin = format!("127.0.0.1:{}", free_port());
        let mut env = vec![
            ("PATCHBAY_AGENTS_CONFIG", config.to_str().unwrap()),
            ("PATCHBAY_AGENTS_INSTANCE", instance),
            ("PATCHBAY_ADMIN_LISTEN", admin.as_str()),
            ("PATCHBAY_LOG", "info,patchbay_agents=debug"),
        ];
        env.extend_from_slice(extra_env);
        let process = stack.spawn_binary("patchbay-agents", "service/agents", instance, &[], &env);
        Self { process, admin }
    }

    async fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").await.unwrap().1
    }

    async fn wait_for_metric(&self, series: &str, at_least: f64) {
        patchbay_tests::eventually(READY, series, || async {
            (metric_value(&self.metrics().await, series) >= at_least).then_some(())
        })
        .await;
    }
}

/// The CloudEvents source of events decided by `instance`.
fn source_of(instance: &str) -> String {
    format!("/patchbay/patchbay-agents/{instance}")
}

/// Every event the service publishes, seen on core NATS as `cli/admin`.
struct Events {
    sub: async_nats::Subscriber,
    backlog: Vec<Seen>,
}

/// One event as seen.
#[derive(Debug)]
struct Seen {
    subject: String,
    event: CloudEvent,
    headers: HeaderMap,
}

impl Seen {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        self.event.data_json().unwrap()
    }
}

impl Events {
    async fn subscribe(admin: &Bus) -> Self {
        let sub = admin.client().subscribe("cc.v1.>").await.unwrap();
        admin.client().flush().await.unwrap();
        Self {
            sub,
            backlog: Vec::new(),
        }
    }

    /// The first event not yet taken on a subject ending in `.<suffix>` about `id` (call
    /// or agent); others are kept for later calls, so the order of unrelated events does
    /// not matter.
    async fn next(&mut self, id: &str, suffix: &str) -> Seen {
        let wanted = |subject: &str| {
            subject.split('.').nth(3) == Some(id) && subject.ends_with(&format!(".{suffix}"))
        };
        if let Some(i) = self.backlog.iter().position(|s| wanted(&s.subject)) {
            return self.backlog.remove(i);
        }
        let what = format!("{suffix} about {id}");
        loop {
            let msg = patchbay_tests::next_message(&mut self.sub, READY, &what).await;
            let subject = msg.subject.to_string();
            let Ok(event) = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload) else {
                continue;
            };
            let seen = Seen {
                subject,
                event,
                headers: msg.headers.clone().unwrap_or_default(),
            };
            if wanted(&seen.subject) {
                return seen;
            }
            self.backlog.push(seen);
        }
    }

    async fn call(&mut self, call: &str, event: &str) -> (CallUpdate, Seen) {
        let seen = self.next(call, event).await;
        (seen.json(), seen)
    }

    /// The next state change of `agent` to `to`.
    async fn agent_state(&mut self, agent: &str, to: &str) -> AgentStateChanged {
        loop {
            let seen = self.next(agent, "state-changed").await;
            let change: AgentStateChanged = seen.json();
            if serde_json::to_value(change.to).unwrap() == json!(to) {
                return change;
            }
        }
    }
}

fn routed(call: &str, queue: &str) -> serde_json::Value {
    json!({
        "call_id": call, "seq": 1, "queue": queue, "priority": 0, "requirements": [],
        "channel": "voice", "customer_tier": "standard", "rule": "default",
        "lookup_ok": true, "routed_at_ms": 1
    })
}

async fn route(admin: &Bus, call: &str, queue: &str, traceparent: Option<&str>) {
    publish_json(
        admin,
        &format!("cc.v1.calls.{call}.routed"),
        "cc.call.routed.v1",
        &routed(call, queue),
        traceparent,
    )
    .await;
}

async fn hang_up(admin: &Bus, call: &str) {
    publish_json(
        admin,
        &format!("cc.v1.calls.{call}.hangup"),
        "cc.call.hangup.v1",
        &json!({ "call_id": call }),
        None,
    )
    .await;
}

async fn command(admin: &Bus, agent: &str, command: &str, data: serde_json::Value) {
    publish_json(
        admin,
        &format!("cc.v1.agents.{agent}.cmd.{command}"),
        "cc.agent.command.v1",
        &data,
        None,
    )
    .await;
}

/// Log `agent` in, available for `queue`.
async fn log_in(admin: &Bus, agent: &str, queue: &str) {
    let profile = json!({ "skills": [], "queues": [{ "queue": queue }] });
    command(
        admin,
        agent,
        "state",
        json!({ "agent_id": agent, "state": "available", "profile": profile }),
    )
    .await;
}

async fn accept(admin: &Bus, agent: &str, call: &str) {
    command(
        admin,
        agent,
        "accept",
        json!({ "agent_id": agent, "call_id": call }),
    )
    .await;
}

fn trace_id(headers: &HeaderMap) -> Option<String> {
    let tp = headers.get("traceparent")?.as_str();
    tp.split('-').nth(1).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_a_routed_call_to_the_available_agent_and_follows_it_through_wrap_up() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let mut agents = Agents::start(
        &stack,
        "agents-1",
        "offer_timeout_ms = 60000\nwrap_up_ms = 300\n",
    )
    .await;
    let mut events = Events::subscribe(&admin).await;

    log_in(&admin, "a-1", "sales").await;
    let change = events.agent_state("a-1", "available").await;
    assert_eq!(change.seq, 1);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    route(
        &admin,
        "c-1",
        "sales",
        Some(&format!("00-{trace}-00f067aa0ba902b7-01")),
    )
    .await;
    let (queued, _) = events.call("c-1", "queued").await;
    assert_eq!((queued.seq, queued.queue.as_str()), (2, "sales"));
    let (offered, seen) = events.call("c-1", "offered").await;
    assert_eq!(offered.seq, 3);
    assert_eq!(offered.agent.as_deref(), Some("a-1"));
    assert!(offered.offer_expires_ms.is_some());
    assert_eq!(seen.event.id, "call-c-1-3", "ids are deterministic");
    assert_eq!(seen.event.key(), Some("c-1"));
    assert_eq!(
        trace_id(&seen.headers).as_deref(),
        Some(trace),
        "the offer continues the routed call's trace"
    );
    events.agent_state("a-1", "reserved").await;

    accept(&admin, "a-1", "c-1").await;
    let (assigned, _) = events.call("c-1", "assigned").await;
    assert_eq!(assigned.agent.as_deref(), Some("a-1"));
    events.agent_state("a-1", "busy").await;

    hang_up(&admin, "c-1").await;
    let (ended, _) = events.call("c-1", "ended").await;
    assert_eq!(ended.agent.as_deref(), Some("a-1"));
    events.agent_state("a-1", "wrap-up").await;
    // The wrap-up timer (300 ms) ends it without any input.
    let back = events.agent_state("a-1", "available").await;
    assert_eq!(
        serde_json::to_value(back.from).unwrap(),
        json!("wrap-up"),
        "{back:?}"
    );

    agents
        .wait_for_metric(
            r#"patchbay_agents_inputs_total{input="accept",outcome="applied"}"#,
            1.0,
        )
        .await;
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    // Every output was stored in an atomic batch, and outputs of one input to one stream
    // shared a commit (the routed call's queued and offered: one fsync, not two).
    let body = agents.metrics().await;
    let outputs = metric_sum(&body, "patchbay_agents_outputs_total", "");
    let commits = metric_sum(&body, "patchbay_agents_output_commits_total", "");
    let stored = metric_sum(&body, "patchbay_bus_stored_per_commit_sum", "");
    assert!(outputs >= 9.0, "{outputs} outputs");
    assert_eq!(stored, outputs, "every output counted in a commit");
    assert!(commits < outputs, "{commits} commits for {outputs} outputs");
    assert!(
        agents.process.terminate(Duration::from_secs(20)),
        "SIGTERM must drain and exit 0:\n{}",
        agents.process.log()
    );
    let log = agents.process.log();
    assert!(log.contains("agents stopped"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_hanging_up_while_queued_abandons_the_call() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let agents = Agents::start(&stack, "agents-1", "").await;
    let mut events = Events::subscribe(&admin).await;

    route(&admin, "c-9", "billing", None).await;
    events.call("c-9", "queued").await;
    hang_up(&admin, "c-9").await;
    let (abandoned, _) = events.call("c-9", "abandoned").await;
    assert_eq!((abandoned.seq, abandoned.queue.as_str()), (3, "billing"));
    assert_eq!(abandoned.agent, None);
    agents
        .wait_for_metric(
            r#"patchbay_agents_inputs_total{input="hangup",outcome="applied"}"#,
            1.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_survive_kill_9_and_are_offered_in_fifo_order_exactly_once() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let mut first = Agents::start(&stack, "agents-1", "offer_timeout_ms = 60000\n").await;
    let mut events = Events::subscribe(&admin).await;

    for call in ["c-1", "c-2", "c-3"] {
        route(&admin, call, "sales", None).await;
        events.call(call, "queued").await;
    }
    // Acked means snapshotted (the service acks only after the snapshot is written).
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    first.process.kill9();

    let second = Agents::start(&stack, "agents-2", "offer_timeout_ms = 60000\n").await;
    for (agent, call) in [("a-1", "c-1"), ("a-2", "c-2"), ("a-3", "c-3")] {
        log_in(&admin, agent, "sales").await;
        let (offered, seen) = events.call(call, "offered").await;
        assert_eq!(offered.agent.as_deref(), Some(agent), "FIFO: {call} first");
        assert_eq!(seen.event.source, source_of("agents-2"));
    }
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.*.offered").await,
        3,
        "each call offered once"
    );
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.*.queued").await,
        3,
        "no call queued twice"
    );
    second
        .wait_for_metric(
            r#"patchbay_cc_queue_agents{queue="sales",state="reserved"}"#,
            3.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_deadline_survives_kill_9_and_times_out_after_restart() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    // Long enough for the kill and the restart to happen well before it expires; the
    // source of the `missed` event proves which process fired it.
    let config = "offer_timeout_ms = 6000\n";
    let mut first = Agents::start(&stack, "agents-1", config).await;
    let mut events = Events::subscribe(&admin).await;

    log_in(&admin, "a-1", "sales").await;
    events.agent_state("a-1", "available").await;
    route(&admin, "c-1", "sales", None).await;
    let (offered, _) = events.call("c-1", "offered").await;
    assert_eq!(offered.agent.as_deref(), Some("a-1"));
    log_in(&admin, "a-2", "sales").await;
    events.agent_state("a-2", "available").await;
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    first.process.kill9();

    let _second = Agents::start(&stack, "agents-2", config).await;
    let seen = events.next("a-1", "missed").await;
    assert_eq!(
        seen.event.source,
        source_of("agents-2"),
        "the deadline fired in the restarted process"
    );
    let missed: AgentMissed = seen.json();
    assert_eq!(
        (missed.call_id.as_str(), missed.reason.as_str()),
        ("c-1", "timeout")
    );
    events.agent_state("a-1", "not-responding").await;
    let (reoffered, seen) = events.call("c-1", "offered").await;
    assert_eq!(reoffered.agent.as_deref(), Some("a-2"));
    assert_eq!(seen.event.source, source_of("agents-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_dead_lettered_and_does_not_stop_the_next_good_one() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let agents = Agents::start(&stack, "agents-1", "").await;
    let mut events = Events::subscribe(&admin).await;

    // Not JSON.
    let bad = CloudEvent::new("/test", "cc.call.routed.v1").data("application/json", "{nope");
    publish_raw_event(
        &admin,
        "cc.v1.calls.x-1.routed",
        bad.to_headers(),
        bad.data,
        None,
    )
    .await;
    // Not a CloudEvent at all.
    publish_raw_event(
        &admin,
        "cc.v1.calls.x-2.hangup",
        HeaderMap::new(),
        bytes::Bytes::from_static(br#"{"call_id":"x-2"}"#),
        None,
    )
    .await;
    // The subject names another call than the body.
    publish_json(
        &admin,
        "cc.v1.calls.x-3.routed",
        "cc.call.routed.v1",
        &routed("x-4", "sales"),
        None,
    )
    .await;
    // Refused by the engine: an agent that never logged in.
    accept(&admin, "ghost", "x-5").await;
    route(&admin, "c-ok", "sales", None).await;
    events.call("c-ok", "queued").await;

    for reason in ["json", "envelope", "mismatch", "unknown-agent"] {
        agents
            .wait_for_metric(
                &format!(r#"patchbay_agents_rejected_total{{reason="{reason}"}}"#),
                1.0,
            )
            .await;
    }
    // Dead-lettered and terminated, not left to be redelivered.
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.*.queued").await,
        1,
        "nothing was queued for the bad messages"
    );
    // Each refused input is in the dead-letter stream with its reason.
    patchbay_tests::assert_dead_letters_with_reasons(&stack, "agents", 4);
}

/// Store `data` as a CloudEvent of `ty` on `subject`, carrying the hop chain `hops`.
async fn publish_with_hops(
    admin: &Bus,
    subject: &str,
    ty: &str,
    data: &serde_json::Value,
    hops: &[&str],
) {
    let event = CloudEvent::new("/test", ty).json(data).unwrap();
    let mut headers = event.to_headers();
    headers.insert(HOPS_HEADER, hops.join(",").as_str());
    publish_raw_event(admin, subject, headers, event.data, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_carry_their_inputs_hop_chain_one_longer_and_an_input_at_the_limit_is_dead_lettered()
 {
    const MAX_HOPS: &str = "4";
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let agents =
        Agents::start_with_env(&stack, "agents-1", "", &[("PATCHBAY_MAX_HOPS", MAX_HOPS)]).await;
    let mut events = Events::subscribe(&admin).await;

    // A log-in that has passed three handlers: what it decides carries four.
    let profile = json!({ "skills": [], "queues": [{ "queue": "sales" }] });
    publish_with_hops(
        &admin,
        "cc.v1.agents.a-1.cmd.state",
        "cc.agent.command.v1",
        &json!({ "agent_id": "a-1", "state": "available", "profile": profile }),
        &["gateway/desk", "fn/enrich", "fn/audit"],
    )
    .await;
    let seen = events.next("a-1", "state-changed").await;
    assert_eq!(
        HopChain::from_headers(Some(&seen.headers)).handlers(),
        ["gateway/desk", "fn/enrich", "fn/audit", "service/agents"]
    );
    // A call routed without a chain: its outputs start one.
    route(&admin, "c-1", "sales", None).await;
    let (_, seen) = events.call("c-1", "offered").await;
    assert_eq!(
        HopChain::from_headers(Some(&seen.headers)).handlers(),
        ["service/agents"]
    );

    // A hangup that has already passed four handlers is a loop: dead-lettered with the
    // chain, never applied — the call stays offered instead of being abandoned.
    publish_with_hops(
        &admin,
        "cc.v1.calls.c-1.hangup",
        "cc.call.hangup.v1",
        &json!({ "call_id": "c-1" }),
        &["fn/loop"; 4],
    )
    .await;
    agents
        .wait_for_metric(r#"patchbay_agents_rejected_total{reason="hop-limit"}"#, 1.0)
        .await;
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.c-1.abandoned").await,
        0,
        "the looping hangup was applied"
    );
    let listed = stack
        .cli(&["fn", "dlq", "ls", "agents", "--json"])
        .success();
    let letters = listed.json();
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let error = letters[0]["error"].as_str().unwrap();
    assert!(
        error.contains("hop limit of 4 exceeded")
            && error.contains("fn/loop,fn/loop,fn/loop,fn/loop,service/agents"),
        "{error}"
    );
    // The same call still goes on: an accept is applied, its events one hop long.
    accept(&admin, "a-1", "c-1").await;
    let (assigned, seen) = events.call("c-1", "assigned").await;
    assert_eq!(assigned.agent.as_deref(), Some("a-1"));
    assert_eq!(HopChain::from_headers(Some(&seen.headers)).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_queue_statistics_on_request_and_exports_them_as_gauges() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let agents = Agents::start(&stack, "agents-1", "").await;
    let mut events = Events::subscribe(&admin).await;

    log_in(&admin, "a-1", "sales").await;
    events.agent_state("a-1", "available").await;
    for call in ["s-1", "s-2"] {
        route(&admin, call, "support", None).await;
        events.call(call, "queued").await;
    }

    let request = CloudEvent::new("/test", "cc.queue.stats-request.v1");
    let reply = admin
        .request(
            "cc.v1.queues.stats",
            &request,
            RequestOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let event = CloudEvent::from_message(reply.headers.as_ref(), &reply.payload).unwrap();
    assert_eq!(event.ty, "cc.queue.stats.v1");
    let stats: Vec<patchbay_agents_stats::QueueStats> = event.data_json().unwrap();
    let support = stats.iter().find(|s| s.queue == "support").unwrap();
    assert_eq!(support.waiting, 2);
    let sales = stats.iter().find(|s| s.queue == "sales").unwrap();
    assert_eq!((sales.waiting, sales.agents.available), (0, 1));

    agents
        .wait_for_metric(r#"patchbay_cc_queue_waiting{queue="support"}"#, 2.0)
        .await;
    agents
        .wait_for_metric(
            r#"patchbay_cc_queue_agents{queue="sales",state="available"}"#,
            1.0,
        )
        .await;
}

/// Fresh decisions published under an id the stream already held (a restarted engine
/// contradicting what its predecessor published): must stay 0.
const DIVERGENCE: &str = "patchbay_agents_replay_divergence_total";

/// A call's place in its life, as the stream tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Waiting { offered_to: Option<String> },
    Assigned(String),
    Finished,
}

/// What CC_CALLS and CC_AGENTS say the agents service decided, replayed in stream order
/// and checked for contradictions.
///
/// Assumes offers end only by assignment or abandonment (no rejects, no offer timeouts, no
/// log-outs while offered), voice calls only: then an agent holds at most one call or
/// offer at a time, and every call event follows from the previous one.
#[derive(Debug, Default)]
struct Audit {
    /// Everything stored that a correct service cannot have decided.
    violations: Vec<String>,
    /// Per call: its phase after its last stored event.
    calls: BTreeMap<String, Phase>,
    /// Per agent: its last published state and sequence number.
    agents: BTreeMap<String, (String, u64)>,
}

impl Audit {
    async fn of_streams(admin: &Bus) -> Self {
        const DECIDED: [&str; 6] = [
            "queued",
            "offered",
            "assigned",
            "abandoned",
            "overflowed",
            "ended",
        ];
        let mut audit = Self::default();
        let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
        let mut holding: BTreeMap<String, String> = BTreeMap::new();
        for msg in stored_messages(admin, "CC_CALLS", "cc.v1.calls.>").await {
            let kind = msg
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            if !DECIDED.contains(&kind.as_str()) {
                continue;
            }
            let event = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload).unwrap();
            let update: CallUpdate = event.data_json().unwrap();
            let call = update.call_id.clone();
            let at = format!(
                "{kind} of {call} (seq {}, agent {:?}, from {})",
                update.seq, update.agent, event.source
            );
            if event.id != format!("call-{call}-{}", update.seq) {
                audit.violations.push(format!("{at}: id {}", event.id));
            }
            // Routed calls carry seq 1; the agents service continues from 2.
            let previous = last_seq.insert(call.clone(), update.seq).unwrap_or(1);
            if update.seq != previous + 1 {
                audit.violations.push(format!(
                    "{at}: follows seq {previous} (an event is missing)"
                ));
            }
            let agent = update.agent.clone().unwrap_or_default();
            let phase = audit.calls.get(&call).cloned();
            let next = match (kind.as_str(), phase) {
                ("queued", None) => Some(Phase::Waiting { offered_to: None }),
                ("offered", Some(Phase::Waiting { offered_to: None })) => {
                    if let Some(held) = holding.insert(agent.clone(), call.clone()) {
                        audit
                            .violations
                            .push(format!("{at}: {agent} still holds {held}"));
                    }
                    Some(Phase::Waiting {
                        offered_to: Some(agent),
                    })
                }
                (
                    "assigned",
                    Some(Phase::Waiting {
                        offered_to: Some(to),
                    }),
                ) if to == agent => Some(Phase::Assigned(agent)),
                ("ended", Some(Phase::Assigned(to))) if to == agent => {
                    if holding.get(&agent) == Some(&call) {
                        holding.remove(&agent);
                    }
                    Some(Phase::Finished)
                }
                ("abandoned", Some(Phase::Waiting { offered_to })) => {
                    if let Some(to) = offered_to
                        && holding.get(&to) == Some(&call)
                    {
                        holding.remove(&to);
                    }
                    Some(Phase::Finished)
                }
                ("overflowed", Some(waiting @ Phase::Waiting { offered_to: None })) => {
                    Some(waiting)
                }
                (_, phase) => {
                    audit
                        .violations
                        .push(format!("{at}: impossible after {phase:?}"));
                    None
                }
            };
            if let Some(next) = next {
                audit.calls.insert(call, next);
            }
        }
        for msg in stored_messages(admin, "CC_AGENTS", "cc.v1.agents.*.evt.>").await {
            let event = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload).unwrap();
            let data: serde_json::Value = event.data_json().unwrap();
            let agent = msg.subject.split('.').nth(3).unwrap_or_default().to_owned();
            let seq = data["seq"].as_u64().unwrap_or_default();
            let at = format!(
                "{} {} (seq {seq}, from {})",
                msg.subject, data, event.source
            );
            if event.id != format!("agent-{agent}-{seq}") {
                audit.violations.push(format!("{at}: id {}", event.id));
            }
            let (state, previous) = audit
                .agents
                .get(&agent)
                .cloned()
                .unwrap_or_else(|| ("offline".to_owned(), 0));
            if seq != previous + 1 {
                audit.violations.push(format!(
                    "{at}: follows seq {previous} (an event is missing)"
                ));
            }
            let state = if msg.subject.ends_with(".state-changed") {
                if data["from"] != json!(state) {
                    audit
                        .violations
                        .push(format!("{at}: the agent was {state}"));
                }
                data["to"].as_str().unwrap_or_default().to_owned()
            } else {
                state
            };
            audit.agents.insert(agent, (state, seq));
        }
        audit
    }

    /// Panic with every contradiction found (and `context`).
    fn assert_consistent(&self, context: &str) {
        assert!(
            self.violations.is_empty(),
            "{context}: the streams contradict themselves:\n{}",
            self.violations.join("\n")
        );
    }

    /// Calls the stream shows neither ended nor abandoned.
    fn unfinished(&self) -> Vec<(&str, &Phase)> {
        self.calls
            .iter()
            .filter(|(_, phase)| **phase != Phase::Finished)
            .map(|(call, phase)| (call.as_str(), phase))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_overtaking_a_redelivered_accept_after_a_crash_never_contradicts_the_stream() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let config = "offer_timeout_ms = 600000\nwrap_up_ms = 0\n";
    let mut first = Agents::start(&stack, "agents-1", config).await;
    let mut events = Events::subscribe(&admin).await;

    log_in(&admin, "a-1", "sales").await;
    events.agent_state("a-1", "available").await;
    route(&admin, "c-1", "sales", None).await;
    let (offered, _) = events.call("c-1", "offered").await;
    assert_eq!(offered.agent.as_deref(), Some("a-1"));
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;

    // The crash point "accept applied, snapshot not written", reached deterministically:
    // the admin writes the stored snapshot back unchanged, so its revision moves and
    // agents-1's next snapshot write is fenced; agents-1 stops there without acking, as a
    // kill -9 at that instant would. Its successor restores exactly the state before the
    // accept.
    let kv = admin.jetstream().get_key_value("cc-agents").await.unwrap();
    let before = kv.entry("engine").await.unwrap().unwrap().value;
    kv.put("engine", before).await.unwrap();
    accept(&admin, "a-1", "c-1").await;
    patchbay_tests::eventually(READY, "agents-1 to stop, fenced", || {
        let stopped = !first.process.is_running();
        async move { stopped.then_some(()) }
    })
    .await;
    assert!(
        first.process.log().contains("another instance"),
        "{}",
        first.process.log()
    );

    // The caller hangs up while no engine runs. After the restart the hangup is delivered
    // at once, the accept only after the consumer's ack_wait: the reported interleaving.
    hang_up(&admin, "c-1").await;
    let second = Agents::start(&stack, "agents-2", config).await;
    second
        .wait_for_metric(
            r#"patchbay_agents_inputs_total{input="hangup",outcome="applied"}"#,
            1.0,
        )
        .await;
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    // Whatever the engine now believes about a-1, the stream must agree: a new call is
    // offered to it only if the stream shows it free.
    route(&admin, "c-2", "sales", None).await;
    let (offered, _) = events.call("c-2", "offered").await;
    assert_eq!(offered.agent.as_deref(), Some("a-1"));
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;

    let audit = Audit::of_streams(&admin).await;
    audit.assert_consistent("after the restart");
    assert_eq!(
        audit.calls.get("c-1"),
        Some(&Phase::Finished),
        "the stream must show c-1 over: {audit:?}"
    );
    let stored: Vec<String> = stored_messages(&admin, "CC_CALLS", "cc.v1.calls.c-1.>")
        .await
        .iter()
        .map(|m| m.subject.rsplit('.').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        stored,
        ["routed", "queued", "offered", "hangup", "abandoned"],
        "the unpersisted accept was never published; the restarted engine's abandon is"
    );
    assert_eq!(metric_value(&second.metrics().await, DIVERGENCE), 0.0);
}

/// Iterations of the randomised crash test, each on a fresh stack with one kill -9.
const CRASH_ITERATIONS: usize = 5;
/// Agents logged in per iteration.
const CRASH_AGENTS: usize = 20;
/// Calls per iteration (300 over the whole test).
const CRASH_CALLS: usize = 60;
/// Bound on one iteration, from the stack's start to the last check.
const CRASH_ITERATION_LIMIT: Duration = Duration::from_secs(180);

/// Make both agents consumers redeliver after `ack_wait` (instead of the deployed 30 s), so
/// what a killed process held comes back within an iteration — still behind newer inputs.
async fn shorten_ack_wait(admin: &Bus, ack_wait: Duration) {
    use async_nats::jetstream::consumer;
    for (stream, name) in CONSUMERS {
        let stream = admin.jetstream().get_stream(stream).await.unwrap();
        let mut bound: consumer::Consumer<consumer::Config> =
            stream.get_consumer(name).await.unwrap();
        let mut config = bound.info().await.unwrap().config.clone();
        config.ack_wait = ack_wait;
        stream.update_consumer(config).await.unwrap();
    }
}

/// Agent desktops and callers: every offer is accepted, every assigned call is hung up,
/// each after a random pause (load, not a wait), until the task is aborted.
async fn desktops(bus: Bus) {
    let mut sub = bus.client().subscribe("cc.v1.calls.*.*").await.unwrap();
    bus.client().flush().await.unwrap();
    while let Some(msg) = futures::StreamExt::next(&mut sub).await {
        let subject = msg.subject.to_string();
        let Ok(event) = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload) else {
            continue;
        };
        let (accepting, hanging_up) = (
            subject.ends_with(".offered"),
            subject.ends_with(".assigned"),
        );
        if !accepting && !hanging_up {
            continue;
        }
        let Ok(update) = event.data_json::<CallUpdate>() else {
            continue;
        };
        let bus = bus.clone();
        tokio::spawn(async move {
            let pause = rand::random_range(0..if accepting { 30 } else { 120 });
            tokio::time::sleep(Duration::from_millis(pause)).await;
            match (accepting, update.agent) {
                (true, Some(agent)) => accept(&bus, &agent, &update.call_id).await,
                (false, _) => hang_up(&bus, &update.call_id).await,
                (true, None) => {}
            }
        });
    }
}

/// What one crash iteration measured on the restarted process.
#[derive(Debug)]
struct CrashReport {
    kill_after_calls: usize,
    divergence: f64,
    replayed: f64,
}

/// One iteration: 20 agents, 60 calls (a quarter of them abandoned at random moments), a
/// kill -9 of the service after a random number of calls, a restart under another name
/// while the load goes on, then the streams audited once everything is over.
async fn crash_iteration(iteration: usize) -> CrashReport {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    shorten_ack_wait(&admin, Duration::from_secs(3)).await;
    let config = "offer_timeout_ms = 600000\nwrap_up_ms = 100\n";
    let mut first = Agents::start(&stack, "agents-1", config).await;
    let load = tokio::spawn(desktops(stack.admin().await));
    for a in 0..CRASH_AGENTS {
        log_in(&admin, &format!("a-{a}"), "sales").await;
    }
    let kill_after_calls = rand::random_range(1..CRASH_CALLS);
    let mut second = None;
    for c in 0..CRASH_CALLS {
        if c == kill_after_calls {
            // A random instant within the batch in flight, then the restart; the load goes
            // on while it comes up.
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..15))).await;
            first.process.kill9();
            second = Some(Agents::spawn(&stack, "agents-2", config));
        }
        let call = format!("c-{c}");
        route(&admin, &call, "sales", None).await;
        if rand::random_bool(0.25) {
            let bus = admin.clone();
            tokio::spawn(async move {
                let pause = rand::random_range(0..400);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                hang_up(&bus, &call).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
    }
    let second = second.expect("the kill happens within the load");
    wait_ready(&second.admin, READY).await;

    // Bounded: every call over, every agent available again, or a contradiction found.
    let context = format!("iteration {iteration}, killed after {kill_after_calls} calls");
    let mut audit = Audit::of_streams(&admin).await;
    for _ in 0..240 {
        let over = audit.calls.len() == CRASH_CALLS
            && audit.unfinished().is_empty()
            && audit.agents.len() == CRASH_AGENTS
            && audit.agents.values().all(|(state, _)| state == "available");
        if over || !audit.violations.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        audit = Audit::of_streams(&admin).await;
    }
    load.abort();
    audit.assert_consistent(&context);
    assert_eq!(
        audit.calls.len(),
        CRASH_CALLS,
        "{context}: every routed call was queued"
    );
    assert!(
        audit.unfinished().is_empty(),
        "{context}: calls the stream never shows over: {:?}",
        audit.unfinished()
    );
    let busy: Vec<_> = audit
        .agents
        .iter()
        .filter(|(_, (state, _))| state != "available")
        .collect();
    assert!(
        busy.is_empty(),
        "{context}: agents not back to available: {busy:?}"
    );
    wait_consumers_settled(&admin, &CONSUMERS, READY).await;
    let metrics = second.metrics().await;
    CrashReport {
        kill_after_calls,
        divergence: metric_value(&metrics, DIVERGENCE),
        replayed: metric_value(&metrics, "patchbay_agents_replayed_outputs_total"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_under_load_never_loses_or_contradicts_a_decision() {
    for iteration in 0..CRASH_ITERATIONS {
        let report = tokio::time::timeout(CRASH_ITERATION_LIMIT, crash_iteration(iteration))
            .await
            .unwrap_or_else(|_| {
                panic!("iteration {iteration} took over {CRASH_ITERATION_LIMIT:?}")
            });
        eprintln!(
            "crash iteration {iteration}: killed after {} calls, divergence {}, outputs published again {}",
            report.kill_after_calls, report.divergence, report.replayed
        );
        assert_eq!(
            report.divergence, 0.0,
            "iteration {iteration}: the restarted engine contradicted the stream: {report:?}"
        );
    }
}

/// The parts of `patchbay_agents::QueueStats` these tests read (the tests package does not
/// depend on the service crate).
mod patchbay_agents_stats {
    #[derive(Debug, serde::Deserialize)]
    pub struct QueueStats {
        pub queue: String,
        pub waiting: u64,
        pub agents: Agents,
    }

    #[derive(Debug, serde::Deserialize)]
    pub struct Agents {
        pub available: u32,
    }
}
