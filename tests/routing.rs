//! The routing service end to end: the real `patchbay-routing` binary as
//! `service/routing` on a real nats-server with mTLS, bound to the bootstrapped durable
//! consumer `routing` on CC_CALLS; the real `customer-lookup` function on a real runtime
//! node where a test needs one.
//!
//! Calls are published as `cli/admin` (standing in for the telephony adapter) and the
//! decisions are read off the bus as they are stored; nothing depends on timing: waits
//! are bounded polls for an event, a metric or a consumer state.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::HeaderMap;
use patchbay_bus::{Bus, CloudEvent, RequestOptions};
use patchbay_protocol::payload::{CallClosed, CallIncoming, CallRouted};
use patchbay_tests::{
    Process, Stack, consumer_backlog, eventually, free_port, http_get, metric_value, next_message,
    stored_count, wait_until_serving,
};

/// Upper bound for readiness and for a decision to arrive.
const READY: Duration = Duration::from_secs(60);

/// Rules whose only schedule is open around the clock, with `default_queue` as the
/// default rule's queue, so the tests do not depend on the time they run at.
fn rules(default_queue: &str, holidays: &str) -> String {
    format!(
        r#"
default_tier = "standard"

[tier_boost]
gold = 20

[[schedules]]
name = "always"
tz = "UTC"
closed_treatment = "msg-closed"
hours = [{{ days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], open = "00:00", close = "24:00" }}]
holidays = [{holidays}]

[[queues]]
name = "general"
[[queues]]
name = "vip"
[[queues]]
name = "support"
overflow = [{{ after_secs = 120, queue = "general" }}]

[[rules]]
name = "vip"
match = {{ tier = "gold" }}
queue = "vip"
priority = 30
schedule = "always"

[[rules]]
name = "support"
match = {{ ivr = "2" }}
queue = "support"
priority = 10
skills = {{ support = 5 }}
relax = [{{ after_secs = 60, skills = {{ support = 3 }} }}]
schedule = "always"

[default]
queue = "{default_queue}"
schedule = "always"
"#
    )
}

/// A running routing service and where to reach its admin listener.
struct Routing {
    process: Process,
    admin: String,
    rules: PathBuf,
}

impl Routing {
    /// Start `patchbay-routing` with `rules_text` in a rules file under the stack's state
    /// directory, and wait until it is ready (bound to its consumer).
    async fn start(stack: &Stack, rules_text: &str) -> Self {
        let rules = stack.state_dir().join("routing.toml");
        std::fs::write(&rules, rules_text).unwrap();
        let admin = format!("127.0.0.1:{}", free_port());
        let process = stack.spawn_binary(
            "patchbay-routing",
            "service/routing",
            "routing",
            &["--rules", rules.to_str().unwrap()],
            &[
                ("PATCHBAY_ADMIN_LISTEN", admin.as_str()),
                ("PATCHBAY_ROUTING_RELOAD_INTERVAL", "100ms"),
                // Generous: the first invocation of a freshly deployed function may be
                // slow on a loaded machine; the fallback path has its own test.
                ("PATCHBAY_ROUTING_LOOKUP_TIMEOUT", "10s"),
                ("PATCHBAY_LOG", "info,patchbay_routing=debug"),
            ],
        );
        let routing = Self {
            process,
            admin,
            rules,
        };
        eventually(READY, "routing to be ready", || async {
            http_get(&routing.admin, "/readyz")
                .await
                .filter(|(status, _)| *status == 200)
        })
        .await;
        routing
    }

    async fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").await.unwrap().1
    }

    /// Wait until the metric `series` reaches `at_least`.
    async fn wait_for_metric(&self, series: &str, at_least: f64) {
        eventually(READY, series, || async {
            (metric_value(&self.metrics().await, series) >= at_least).then_some(())
        })
        .await;
    }
}

/// A W3C `traceparent` with a fresh trace id; `(traceparent, trace_id)`.
fn traceparent() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    (format!("00-{trace_id}-00f067aa0ba902b7-01"), trace_id)
}

/// Store an incoming-call message on `cc.v1.calls.<subject_call>.incoming` as the
/// telephony adapter would (durable, with a trace context); returns the event id.
async fn publish_raw(admin: &Bus, subject_call: &str, data: &str, traceparent: &str) -> String {
    let event = CloudEvent::new("/test/telephony", CallIncoming::TYPE)
        .data("application/json", data.to_owned())
        .partition_key(subject_call);
    let mut headers: HeaderMap = event.to_headers();
    headers.insert("traceparent", traceparent);
    headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    admin
        .jetstream()
        .publish_with_headers(
            format!("cc.v1.calls.{subject_call}.incoming"),
            headers,
            event.data.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    event.id
}

async fn publish_call(admin: &Bus, call: &CallIncoming) -> String {
    let data = serde_json::to_string(call).unwrap();
    publish_raw(admin, &call.call_id, &data, &traceparent().0).await
}

fn call(id: &str, caller: &str) -> CallIncoming {
    CallIncoming {
        call_id: id.into(),
        dialled: "+448000111222".into(),
        caller: caller.into(),
        ..CallIncoming::default()
    }
}

/// Subscribe to every decision about `call` (core NATS also sees what the stream stores).
async fn decisions(admin: &Bus, call: &str) -> async_nats::Subscriber {
    let sub = admin
        .client()
        .subscribe(format!("cc.v1.calls.{call}.*"))
        .await
        .unwrap();
    admin.client().flush().await.unwrap();
    sub
}

/// The next decision on `sub` (skipping the incoming message itself).
async fn next_decision(sub: &mut async_nats::Subscriber) -> (String, CloudEvent, HeaderMap) {
    loop {
        let msg = next_message(sub, READY, "a routing decision").await;
        if msg.subject.ends_with(".incoming") {
            continue;
        }
        let headers = msg.headers.clone().unwrap_or_default();
        let event = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload).unwrap();
        return (msg.subject.to_string(), event, headers);
    }
}

async fn next_routed(sub: &mut async_nats::Subscriber) -> (CallRouted, CloudEvent, HeaderMap) {
    let (subject, event, headers) = next_decision(sub).await;
    assert!(
        subject.ends_with(".routed"),
        "expected routed, got {subject}"
    );
    assert_eq!(event.ty, CallRouted::TYPE);
    (event.data_json().unwrap(), event, headers)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_a_call_with_the_tier_from_the_customer_lookup_function() {
    let stack = Stack::start().await;
    let _node = stack.spawn_runtime("node-1");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    let _ = stack.deploy_customer_lookup();
    wait_until_serving(&admin, &["node-1"], Some(("customer-lookup", 1)), READY).await;

    // Seed a gold customer through the function itself.
    let upsert = CloudEvent::new("/test", "cc.customer.upsert.v1")
        .json(&serde_json::json!({
            "phone": "+44 20 7946 0000", "customer_id": "cu-42", "tier": "gold",
            "name": "Ada", "language": "en"
        }))
        .unwrap();
    let reply = admin
        .request(
            "cc.v1.customers.lookup",
            &upsert,
            RequestOptions::timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("patchbay-outcome"))
            .map(|v| v.as_str()),
        Some("ok"),
        "upsert failed: {}",
        String::from_utf8_lossy(&reply.payload)
    );

    let routing = Routing::start(&stack, &rules("general", "")).await;
    let mut sub = decisions(&admin, "call-gold").await;
    let (tp, trace_id) = traceparent();
    let data = serde_json::to_string(&call("call-gold", "+44 20 7946 0000")).unwrap();
    let input_id = publish_raw(&admin, "call-gold", &data, &tp).await;

    let (routed, event, headers) = next_routed(&mut sub).await;
    assert_eq!(routed.queue, "vip");
    assert_eq!(routed.rule, "vip");
    assert_eq!(routed.customer_tier, "gold");
    assert_eq!(routed.customer_id.as_deref(), Some("cu-42"));
    assert!(routed.lookup_ok);
    assert_eq!(routed.priority, 30 + 20);
    assert_eq!(routed.seq, 1);
    assert_eq!(event.key(), Some("call-gold"));
    // The decision's id derives from the input's (source and id) and is its
    // de-duplication id too.
    let input = CloudEvent::new("/test/telephony", CallIncoming::TYPE).id(input_id);
    assert_eq!(event.id, input.output_dedup_id("routing", 0));
    assert_eq!(header(&headers, "Nats-Msg-Id"), Some(event.id.as_str()));
    // The trace continues: same trace id, a new parent span.
    let parent = header(&headers, "traceparent").expect("the decision carries a traceparent");
    assert!(
        parent.contains(&trace_id),
        "{parent} is not in trace {trace_id}"
    );
    assert!(
        !parent.contains("00f067aa0ba902b7"),
        "{parent} reuses the caller's span"
    );

    let metrics = routing.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"patchbay_routing_lookups_total{outcome="ok"}"#),
        1.0
    );
    // Counted once the ack is confirmed, just after the decision is visible.
    routing
        .wait_for_metric(
            r#"patchbay_routing_decisions_total{outcome="routed",rule="vip"}"#,
            1.0,
        )
        .await;
    eventually(READY, "the call to be acked", || async {
        (consumer_backlog(&admin, "CC_CALLS", "routing").await == (0, 0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_the_default_tier_when_no_lookup_function_answers() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let mut routing = Routing::start(&stack, &rules("general", "")).await;

    let mut sub = decisions(&admin, "call-anon").await;
    publish_call(&admin, &call("call-anon", "+44 20 7946 0000")).await;
    let (routed, _, _) = next_routed(&mut sub).await;
    assert!(!routed.lookup_ok);
    assert_eq!(routed.customer_tier, "standard");
    assert_eq!(routed.customer_id, None);
    assert_eq!(routed.queue, "general");
    assert_eq!(routed.rule, "default");

    // An IVR choice still routes by its rule, with skills, relaxation and overflow.
    let mut sub = decisions(&admin, "call-ivr").await;
    let mut ivr = call("call-ivr", "+44 20 7946 0001");
    ivr.ivr = Some("2".into());
    publish_call(&admin, &ivr).await;
    let (routed, _, _) = next_routed(&mut sub).await;
    assert_eq!(
        (routed.rule.as_str(), routed.queue.as_str()),
        ("support", "support")
    );
    assert_eq!(routed.requirements[0].min_level, 5);
    assert_eq!(routed.relaxation[0].after_secs, 60);
    assert_eq!(routed.overflow[0].queue, "general");

    let metrics = routing.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"patchbay_routing_lookups_total{outcome="no-responders"}"#
        ),
        2.0
    );
    assert_eq!(
        metric_value(&metrics, "patchbay_routing_lookup_fallbacks_total"),
        2.0
    );

    // SIGTERM: stop pulling, finish, exit cleanly.
    assert!(
        routing.process.terminate(Duration::from_secs(20)),
        "routing did not exit cleanly:\n{}",
        routing.process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_are_rejected_and_the_next_good_call_is_routed() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let mut routing = Routing::start(&stack, &rules("general", "")).await;
    let tp = traceparent().0;

    publish_raw(&admin, "bad-json", "{not json", &tp).await;
    publish_raw(&admin, "no-id", r#"{"caller":"+44"}"#, &tp).await;
    publish_raw(&admin, "mismatch", r#"{"call_id":"someone-else"}"#, &tp).await;
    // Not a CloudEvent at all.
    admin
        .jetstream()
        .publish("cc.v1.calls.naked.incoming", "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let mut sub = decisions(&admin, "call-good").await;
    publish_call(&admin, &call("call-good", "")).await;
    let (routed, _, _) = next_routed(&mut sub).await;
    assert_eq!(routed.call_id, "call-good");

    routing
        .wait_for_metric(
            r#"patchbay_routing_decisions_total{outcome="rejected",rule=""}"#,
            4.0,
        )
        .await;
    let metrics = routing.metrics().await;
    for (reason, n) in [
        ("json", 1.0),
        ("missing-call-id", 1.0),
        ("mismatch", 1.0),
        ("envelope", 1.0),
    ] {
        let series = format!(r#"patchbay_routing_bad_input_total{{reason="{reason}"}}"#);
        assert_eq!(metric_value(&metrics, &series), n, "{series}");
    }
    // Nothing is stuck or redelivered: every message was acked or terminated.
    eventually(READY, "the routing consumer to be drained", || async {
        (consumer_backlog(&admin, "CC_CALLS", "routing").await == (0, 0)).then_some(())
    })
    .await;
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.*.routed").await,
        1
    );
    // Each malformed call is in the dead-letter stream with its reason.
    patchbay_tests::assert_dead_letters_with_reasons(&stack, "routing", 4);
    assert!(routing.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holiday_gives_the_closed_treatment() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    // Yesterday, today and tomorrow (UTC) are holidays, whenever the test runs.
    let today = time::OffsetDateTime::now_utc().date();
    let holidays = [today.previous_day(), Some(today), today.next_day()]
        .into_iter()
        .flatten()
        .map(|d| format!(r#"{{ date = "{d}", name = "test-day" }}"#))
        .collect::<Vec<_>>()
        .join(", ");
    let _routing = Routing::start(&stack, &rules("general", &holidays)).await;

    let mut sub = decisions(&admin, "call-closed").await;
    publish_call(&admin, &call("call-closed", "")).await;
    let (subject, event, _) = next_decision(&mut sub).await;
    assert_eq!(subject, "cc.v1.calls.call-closed.closed");
    assert_eq!(event.ty, CallClosed::TYPE);
    let closed: CallClosed = event.data_json().unwrap();
    assert_eq!(closed.reason, "holiday:test-day");
    assert_eq!(closed.treatment, "msg-closed");
    assert_eq!(closed.rule, "default");
    assert_eq!(closed.seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rules_file_applies_to_the_next_call_and_a_broken_one_is_ignored() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let routing = Routing::start(&stack, &rules("general", "")).await;

    let mut sub = decisions(&admin, "call-before").await;
    publish_call(&admin, &call("call-before", "")).await;
    assert_eq!(next_routed(&mut sub).await.0.queue, "general");

    write(&routing.rules, &rules("support", ""));
    routing
        .wait_for_metric(r#"patchbay_routing_rules_reloads_total{outcome="ok"}"#, 1.0)
        .await;
    let mut sub = decisions(&admin, "call-after").await;
    publish_call(&admin, &call("call-after", "")).await;
    assert_eq!(next_routed(&mut sub).await.0.queue, "support");

    // A broken edit is refused and the rules in force stay.
    write(&routing.rules, &rules("nowhere", ""));
    routing
        .wait_for_metric(
            r#"patchbay_routing_rules_reloads_total{outcome="failed"}"#,
            1.0,
        )
        .await;
    let mut sub = decisions(&admin, "call-broken").await;
    publish_call(&admin, &call("call-broken", "")).await;
    assert_eq!(next_routed(&mut sub).await.0.queue, "support");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_input_stores_its_decision_once() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let routing = Routing::start(&stack, &rules("general", "")).await;

    // The same event (same ce-id) stored twice, as an adapter retrying with a new
    // Nats-Msg-Id would do: routing handles both, the stream keeps one decision.
    let event = CloudEvent::new("/test/telephony", CallIncoming::TYPE)
        .json(&call("call-twice", ""))
        .unwrap();
    for attempt in ["a", "b"] {
        let mut headers = event.to_headers();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}-{attempt}", event.id).as_str(),
        );
        admin
            .jetstream()
            .publish_with_headers(
                "cc.v1.calls.call-twice.incoming",
                headers,
                event.data.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    routing
        .wait_for_metric(
            r#"patchbay_routing_decisions_total{outcome="routed",rule="default"}"#,
            2.0,
        )
        .await;
    assert_eq!(
        stored_count(&admin, "CC_CALLS", "cc.v1.calls.call-twice.routed").await,
        1
    );
}

fn write(path: &Path, text: &str) {
    // Write a sibling and rename it, as editors and config management do, so the service
    // never reads a half-written file.
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The lookup's breaker, as `deploy/resilience.toml` would set it but small enough to
/// count: 3 consecutive failures open it, no retries (so every attempt is one request on
/// the wire), one probe after the cool-down.
const LOOKUP_POLICY: &str = r#"
[targets."subject:cc.v1.customers.lookup"]
timeout = "10s"
retry = { max_attempts = 1 }
breaker = { consecutive_failures = 3, failure_rate = 1.0, window = "1m", min_requests = 1000, cool_down = "4s", half_open_probes = 1 }
"#;
const LOOKUP_COOL_DOWN: Duration = Duration::from_secs(4);
const LOOKUP_BREAKER: &str =
    r#"patchbay_resilience_breaker_state{target="subject:cc.v1.customers.lookup"}"#;

/// Route `call_id` and return its decision.
async fn route_one(admin: &Bus, call_id: &str) -> CallRouted {
    let mut sub = decisions(admin, call_id).await;
    publish_call(admin, &call(call_id, "+44 20 7946 0999")).await;
    next_routed(&mut sub).await.0
}

/// Assert that exactly `expected` lookup requests reached the bus so far (a plain
/// subscriber sees every request the function's queue group would get): wait until that
/// many arrived, let a round trip flush anything still in flight, then count.
async fn assert_lookups_seen(admin: &Bus, seen: &std::sync::atomic::AtomicUsize, expected: usize) {
    let count = || seen.load(std::sync::atomic::Ordering::SeqCst);
    eventually(READY, "lookup requests", || async {
        (count() >= expected).then_some(())
    })
    .await;
    admin.client().flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count(), expected, "lookup requests on the wire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lookup_opens_the_breaker_routing_falls_back_and_a_probe_closes_it_on_recovery() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let stack = Stack::start().await;
    let _node = stack.spawn_runtime("node-1");
    let admin = stack.admin().await;
    wait_until_serving(&admin, &["node-1"], None, READY).await;
    // `misbehave` as customer-lookup: it dead-letters every lookup ("unknown type"), so
    // every answer is a failure reply — a function failing 100 %.
    let _ = stack.deploy(
        "misbehave",
        "customer-lookup",
        &["--trigger", "subject:cc.v1.customers.lookup"],
    );
    wait_until_serving(&admin, &["node-1"], Some(("customer-lookup", 1)), READY).await;
    let policy = stack.state_dir().join("resilience.toml");
    std::fs::write(&policy, LOOKUP_POLICY).unwrap();
    let _ = stack
        .cli(&["resilience", "apply", "--file", policy.to_str().unwrap()])
        .success();

    let seen = Arc::new(AtomicUsize::new(0));
    let mut wire = admin
        .client()
        .subscribe("cc.v1.customers.lookup")
        .await
        .unwrap();
    admin.client().flush().await.unwrap();
    tokio::spawn({
        let seen = Arc::clone(&seen);
        async move {
            use futures::StreamExt as _;
            while wire.next().await.is_some() {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let routing = Routing::start(&stack, &rules("general", "")).await;

    // Ten calls while the function fails: three reach it and open the breaker, the other
    // seven are routed without asking; every call is routed, all with the fallback tier.
    for n in 0..10 {
        let routed = route_one(&admin, &format!("call-down-{n}")).await;
        assert!(!routed.lookup_ok);
        assert_eq!(routed.customer_tier, "standard");
        assert_eq!(routed.queue, "general");
    }
    assert_lookups_seen(&admin, &seen, 3).await;
    let metrics = routing.metrics().await;
    assert_eq!(metric_value(&metrics, LOOKUP_BREAKER), 2.0, "breaker open");
    assert_eq!(
        metric_value(
            &metrics,
            r#"patchbay_routing_lookups_total{outcome="circuit-open"}"#
        ),
        7.0
    );

    // After the cool-down exactly one probe goes through; it fails, the breaker re-opens.
    tokio::time::sleep(LOOKUP_COOL_DOWN + Duration::from_millis(500)).await;
    for n in 0..3 {
        assert!(
            !route_one(&admin, &format!("call-probe-{n}"))
                .await
                .lookup_ok
        );
    }
    assert_lookups_seen(&admin, &seen, 4).await;
    assert_eq!(
        metric_value(&routing.metrics().await, LOOKUP_BREAKER),
        2.0,
        "a failed probe re-opens"
    );

    // The function recovers (the real customer-lookup as version 2). After the next
    // cool-down the probe succeeds, the breaker closes and every call asks again.
    let _ = stack.deploy_customer_lookup();
    wait_until_serving(&admin, &["node-1"], Some(("customer-lookup", 2)), READY).await;
    tokio::time::sleep(LOOKUP_COOL_DOWN + Duration::from_millis(500)).await;
    let routed = route_one(&admin, "call-recovered").await;
    assert!(routed.lookup_ok, "the probe reached the recovered function");
    assert_eq!(
        metric_value(&routing.metrics().await, LOOKUP_BREAKER),
        0.0,
        "a successful probe closes"
    );
    for n in 0..3 {
        assert!(route_one(&admin, &format!("call-up-{n}")).await.lookup_ok);
    }
    assert_lookups_seen(&admin, &seen, 8).await;
}
