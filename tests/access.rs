//! The deny matrix: every example identity of `deploy/access.toml` against a live
//! nats-server rendered from that same file.
//!
//! For each identity the policy's own [`Expectations`] say which subjects it must be able
//! to publish and subscribe and which the server must refuse. The test proves both sides
//! on the wire:
//!
//! * **refused** — the server reports `permissions violation for publish to "<subject>"`
//!   (or `… for subscription to …`) on the connection's notices;
//! * **allowed** — no such report, *and* the operation has its effect: an admin observer
//!   subscribed to `>` receives the published message, and a probe the admin publishes on
//!   the subscribed subject reaches the identity's subscription.
//!
//! async-nats's `flush` does not wait for the server, so "no violation" is only meaningful
//! up to a barrier: after each chunk of operations the identity publishes a sentinel
//! subject it may not publish, and the test waits for the sentinel's violation. The server
//! answers one connection in order, so every violation for the chunk has arrived by then.
//! Chunks are small because async-nats drops server errors when its event queue (128) is
//! full. `cli/admin` may do everything, so it has no sentinel; its checks rest on the
//! positive proofs alone.
//!
//! Every failure for every identity is collected and reported at once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use futures::StreamExt as _;
use patchbay_bus::{Bus, BusNotice};
use patchbay_control::access::{AccessPolicy, Expectations, Undeclared};
use patchbay_control::certs::Identity;
use patchbay_control::streams::Declaration;
use patchbay_tests::{Stack, repo_root};
use tokio::sync::broadcast;

/// Bound on each wait; nothing here waits without one.
const LIMIT: Duration = Duration::from_secs(10);
/// Operations between two sentinels (well under async-nats's 128-event queue).
const CHUNK: usize = 16;

fn policy() -> AccessPolicy {
    AccessPolicy::load(&repo_root().join("deploy/access.toml")).expect("deploy/access.toml loads")
}

/// One check of the matrix.
#[derive(Debug, Clone)]
enum Op {
    Publish { subject: String, allowed: bool },
    Subscribe { subject: String, allowed: bool },
}

impl Op {
    /// The violation text the server sends when it refuses this operation (lower case).
    fn violation(&self) -> String {
        match self {
            Self::Publish { subject, .. } => {
                format!(
                    "permissions violation for publish to \"{}\"",
                    subject.to_lowercase()
                )
            }
            Self::Subscribe { subject, .. } => format!(
                "permissions violation for subscription to \"{}\"",
                subject.to_lowercase()
            ),
        }
    }

    fn allowed(&self) -> bool {
        match self {
            Self::Publish { allowed, .. } | Self::Subscribe { allowed, .. } => *allowed,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, subject, allowed) = match self {
            Self::Publish { subject, allowed } => ("publish", subject, allowed),
            Self::Subscribe { subject, allowed } => ("subscribe", subject, allowed),
        };
        let expected = if *allowed { "allowed" } else { "refused" };
        write!(f, "{what} {subject:?} (expected {expected})")
    }
}

fn ops(e: &Expectations) -> Vec<Op> {
    let publish = |list: &[String], allowed| {
        list.iter()
            .map(move |s| Op::Publish {
                subject: s.clone(),
                allowed,
            })
            .collect::<Vec<_>>()
    };
    let subscribe = |list: &[String], allowed| {
        list.iter()
            .map(move |s| Op::Subscribe {
                subject: s.clone(),
                allowed,
            })
            .collect::<Vec<_>>()
    };
    let mut out = publish(&e.publish_allowed, true);
    out.extend(publish(&e.publish_refused, false));
    out.extend(subscribe(&e.subscribe_allowed, true));
    out.extend(subscribe(&e.subscribe_refused, false));
    out
}

/// A literal subject matched by `pattern` (wildcards replaced by a probe token).
fn literal(pattern: &str) -> String {
    pattern
        .split('.')
        .map(|t| if t == "*" || t == ">" { "probe" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// Payload of the matrix's publish of `subject` by `who`, unique per check.
fn marker(who: &Identity, subject: &str) -> String {
    format!("deny-matrix {who} publish {subject}")
}

/// Wait for a notice containing `needle`, collecting every permission violation seen
/// on the way (lower case). `None` when it does not come within [`LIMIT`].
async fn until_notice(
    notices: &mut broadcast::Receiver<BusNotice>,
    needle: &str,
    seen: &mut Vec<String>,
) -> Option<()> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let notice = match tokio::time::timeout_at(deadline, notices.recv()).await {
            Err(_) => return None,
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                seen.push(format!("<{n} notices lost: chunk too large>"));
                continue;
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            Ok(Ok(notice)) => notice.0.to_lowercase(),
        };
        let done = notice.contains(needle);
        if notice.contains("permissions violation") {
            seen.push(notice);
        }
        if done {
            return Some(());
        }
    }
}

/// Run the matrix for one identity; returns what went wrong.
async fn check_identity(
    stack: &Stack,
    observer: &Bus,
    who: &Identity,
    e: &Expectations,
) -> Vec<String> {
    let mut failures = Vec::new();
    let perms = policy().permissions_for(who).expect("identity has a group");
    let is_admin = *who == Identity::admin();
    let bus = stack.connect(&who.to_string()).await;
    let mut notices = bus.notices();
    // Everything this identity publishes, as the admin sees it.
    let mut observed = observer.client().subscribe(">").await.unwrap();
    barrier(observer).await;

    let all = ops(e);
    let mut seen: Vec<String> = Vec::new();
    let mut subscriptions = Vec::new();
    // Whether the sentinel barrier is available (see the module docs).
    let mut sentinels = !is_admin;
    for (n, chunk) in all.chunks(CHUNK).enumerate() {
        for op in chunk {
            match op {
                Op::Publish { subject, .. } => {
                    if let Err(err) = bus
                        .client()
                        .publish(subject.clone(), marker(who, subject).into())
                        .await
                    {
                        failures.push(format!("{who}: {op}: client refused to send: {err}"));
                    }
                }
                Op::Subscribe { subject, allowed } => {
                    match bus.client().subscribe(subject.clone()).await {
                        Ok(sub) => {
                            if *allowed {
                                subscriptions.push((subject.clone(), sub));
                            }
                        }
                        Err(err) => failures
                            .push(format!("{who}: {op}: client refused to subscribe: {err}")),
                    }
                }
            }
        }
        if !sentinels {
            continue;
        }
        let sentinel = format!("patchbay-tests.sentinel.{n}");
        if perms.allows_publish(&sentinel) {
            failures.push(format!(
                "{who}: the policy allows the sentinel {sentinel:?}; the matrix falls back to a weaker barrier"
            ));
            sentinels = false;
            continue;
        }
        bus.client()
            .publish(sentinel.clone(), "sentinel".into())
            .await
            .unwrap();
        let needle = format!("publish to \"{sentinel}\"");
        if until_notice(&mut notices, &needle, &mut seen)
            .await
            .is_none()
        {
            failures.push(format!(
                "{who}: no violation for the sentinel {sentinel:?} within {LIMIT:?} (is the server enforcing permissions at all?)"
            ));
            sentinels = false;
        }
    }
    if !sentinels {
        // The admin (or a broken server): the best barrier left is a round trip the server
        // answers; violations reported before it are, at worst, still in async-nats's event
        // task. For the admin every operation is also proven by its effect below.
        barrier(&bus).await;
        while let Ok(notice) = notices.try_recv() {
            let notice = notice.0.to_lowercase();
            if notice.contains("permissions violation") {
                seen.push(notice);
            }
        }
    }

    // Violations: exactly the refused operations.
    for op in &all {
        let needle = op.violation();
        let reported = seen.iter().any(|s| s.contains(&needle));
        match (op.allowed(), reported) {
            (true, true) => failures.push(format!("{who}: {op}: the server refused it")),
            (false, false) => failures.push(format!("{who}: {op}: the server did not refuse it")),
            _ => {}
        }
    }

    // Allowed publishes reached the admin observer.
    let mut missing: BTreeSet<String> = all
        .iter()
        .filter_map(|op| match op {
            Op::Publish {
                subject,
                allowed: true,
            } => Some(marker(who, subject)),
            _ => None,
        })
        .collect();
    let refused: BTreeSet<String> = all
        .iter()
        .filter_map(|op| match op {
            Op::Publish {
                subject,
                allowed: false,
            } => Some(marker(who, subject)),
            _ => None,
        })
        .collect();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, observed.next()).await {
            Ok(Some(msg)) => {
                let payload = String::from_utf8_lossy(&msg.payload).into_owned();
                missing.remove(&payload);
                if refused.contains(&payload) {
                    failures.push(format!("{who}: refused publish was delivered: {payload}"));
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    for payload in missing {
        failures.push(format!(
            "{who}: allowed publish never reached a subscriber: {payload}"
        ));
    }

    // Allowed subscriptions receive what the admin publishes on them.
    for (pattern, mut sub) in subscriptions {
        let probe = literal(&pattern);
        let body = format!("deny-matrix probe for {who} on {pattern}");
        observer
            .client()
            .publish(probe.clone(), body.clone().into())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + LIMIT;
        let got = loop {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(msg)) if msg.payload == body.as_bytes() => break true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break false,
            }
        };
        if !got {
            failures.push(format!(
                "{who}: subscription {pattern:?} did not receive the admin's probe on {probe:?}"
            ));
        }
    }
    failures
}

/// A request the server itself answers on `bus`'s connection: every operation sent
/// before it has been processed when it returns.
async fn barrier(bus: &Bus) {
    tokio::time::timeout(LIMIT, bus.jetstream().query_account())
        .await
        .expect("JetStream answers in time")
        .expect("the barrier request is allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_gets_exactly_what_the_access_policy_grants() {
    let policy = policy();
    let stack = Stack::start().await;
    let observer = stack.admin().await;
    let mut failures = Vec::new();
    for who in policy.identities() {
        let e = policy
            .expectations(who)
            .expect("example identity has expectations");
        eprintln!(
            "{who}: {} publish allowed, {} refused; {} subscribe allowed, {} refused",
            e.publish_allowed.len(),
            e.publish_refused.len(),
            e.subscribe_allowed.len(),
            e.subscribe_refused.len()
        );
        failures.extend(check_identity(&stack, &observer, who, &e).await);
    }
    assert!(
        failures.is_empty(),
        "{} deny-matrix failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// JetStream administration subjects for every declared asset: what only the admin
/// bootstrap may do.
fn administration_subjects() -> Vec<String> {
    let decl = Declaration::load(&repo_root().join("deploy/streams.toml")).unwrap();
    let mut streams: Vec<String> = decl.streams.iter().map(|s| s.name.clone()).collect();
    streams.extend(decl.key_values.iter().map(|kv| kv.stream_name()));
    streams.extend(decl.object_stores.iter().map(|o| o.stream_name()));
    let mut subjects = Vec::new();
    for stream in &streams {
        for verb in ["CREATE", "UPDATE", "DELETE", "PURGE"] {
            subjects.push(format!("$JS.API.STREAM.{verb}.{stream}"));
        }
    }
    for c in &decl.consumers {
        subjects.push(format!("$JS.API.CONSUMER.DELETE.{}.{}", c.stream, c.name));
        subjects.push(format!(
            "$JS.API.CONSUMER.DURABLE.CREATE.{}.{}",
            c.stream, c.name
        ));
    }
    subjects
}

#[test]
fn the_matrix_refuses_every_identity_the_subjects_of_every_other_and_jetstream_administration() {
    let policy = policy();
    let expectations: Vec<Expectations> = policy
        .identities()
        .iter()
        .map(|id| policy.expectations(id).unwrap())
        .collect();
    let mut gaps = Vec::new();
    for e in expectations
        .iter()
        .filter(|e| e.identity != Identity::admin())
    {
        for other in expectations.iter().filter(|o| o.identity != e.identity) {
            let publish = other
                .publish_allowed
                .iter()
                .filter(|s| e.publish_refused.contains(s))
                .count();
            let subscribe = other
                .subscribe_allowed
                .iter()
                .filter(|s| e.subscribe_refused.contains(s))
                .count();
            if publish + subscribe == 0 {
                gaps.push(format!(
                    "{} is refused none of the subjects {} is allowed",
                    e.identity, other.identity
                ));
            }
        }
        // Stream, KV-bucket and object-store creation and deletion, and consumer creation.
        for prefix in [
            "$JS.API.STREAM.CREATE.",
            "$JS.API.STREAM.DELETE.",
            "$JS.API.STREAM.CREATE.KV_",
            "$JS.API.STREAM.DELETE.KV_",
            "$JS.API.STREAM.CREATE.OBJ_",
            "$JS.API.STREAM.DELETE.OBJ_",
            "$JS.API.CONSUMER.CREATE.",
            "$JS.API.CONSUMER.DELETE.",
        ] {
            if !e.publish_refused.iter().any(|s| s.starts_with(prefix)) {
                gaps.push(format!("{} has no refused {prefix}… subject", e.identity));
            }
        }
        if !e.subscribe_refused.iter().any(|s| s == ">") {
            gaps.push(format!(
                "{} is not expected to be refused \">\"",
                e.identity
            ));
        }
    }
    assert!(
        gaps.is_empty(),
        "the deny matrix has gaps:\n{}",
        gaps.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workload_may_create_or_delete_any_declared_stream_bucket_or_consumer() {
    // Beyond the policy's examples: every declared asset, every non-admin identity. The
    // same sentinel barrier as the matrix; a refused request does nothing on the server.
    let policy = policy();
    let subjects = administration_subjects();
    let stack = Stack::start().await;
    let observer = stack.admin().await;
    let mut failures = Vec::new();
    for who in policy
        .identities()
        .iter()
        .filter(|id| **id != Identity::admin())
    {
        let e = Expectations {
            identity: who.clone(),
            publish_allowed: Vec::new(),
            publish_refused: subjects.clone(),
            subscribe_allowed: Vec::new(),
            subscribe_refused: Vec::new(),
        };
        failures.extend(check_identity(&stack, &observer, who, &e).await);
    }
    // The assets are all still there.
    let js = observer.jetstream();
    let decl = Declaration::load(&repo_root().join("deploy/streams.toml")).unwrap();
    for stream in &decl.streams {
        if js.get_stream(&stream.name).await.is_err() {
            failures.push(format!("stream {} is gone", stream.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A JetStream read as `bus`, answered within a short bound: the reply's payload, or `None`
/// (refused requests get no reply).
async fn read_as(bus: &Bus, subject: String, body: serde_json::Value) -> Option<String> {
    let request = bus.client().request(subject, body.to_string().into());
    match tokio::time::timeout(Duration::from_secs(2), request).await {
        Ok(Ok(reply)) => Some(String::from_utf8_lossy(&reply.payload).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_streams_and_buckets_the_admin_creates_are_out_of_every_workloads_reach() {
    // The admin creates what nobody declared (`[undeclared]` in deploy/access.toml) and
    // stores a secret in each. Every non-admin identity — the function hosts included, whose
    // function state is now one declared bucket instead of a glob — is refused every probe:
    // stream info, unnamed and named consumer creation, direct and classic gets, KV writes.
    let policy = policy();
    let undeclared = policy.undeclared().clone();
    assert!(!undeclared.streams.is_empty() && !undeclared.key_values.is_empty());
    let stack = Stack::start().await;
    let observer = stack.admin().await;
    let js = observer.jetstream();
    const SECRET: &str = "undeclared secret";
    for name in &undeclared.streams {
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![Undeclared::stream_subjects(name)],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish(Undeclared::stream_message_subject(name), SECRET.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for bucket in &undeclared.key_values {
        let store = js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        store.put("deny-matrix", SECRET.into()).await.unwrap();
    }
    let probes = undeclared.probes();
    let mut failures = Vec::new();
    for who in policy
        .identities()
        .iter()
        .filter(|id| **id != Identity::admin())
    {
        let full = policy.expectations(who).unwrap();
        if let Some(missing) = probes.iter().find(|p| !full.publish_refused.contains(p)) {
            failures.push(format!(
                "{who}: the policy does not expect {missing} refused"
            ));
        }
        let e = Expectations {
            identity: who.clone(),
            publish_allowed: Vec::new(),
            publish_refused: probes.clone(),
            subscribe_allowed: Vec::new(),
            subscribe_refused: Vec::new(),
        };
        failures.extend(check_identity(&stack, &observer, who, &e).await);

        // And by effect: the stored messages cannot be fetched by classic or direct get.
        let bus = stack.connect(&who.to_string()).await;
        let mut reads = Vec::new();
        for name in &undeclared.streams {
            let stored = Undeclared::stream_message_subject(name);
            reads.push(read_as(
                &bus,
                format!("$JS.API.STREAM.MSG.GET.{name}"),
                serde_json::json!({ "last_by_subj": stored }),
            ));
            reads.push(read_as(
                &bus,
                format!("$JS.API.DIRECT.GET.{name}.{stored}"),
                serde_json::json!({}),
            ));
        }
        for bucket in &undeclared.key_values {
            reads.push(read_as(
                &bus,
                format!("$JS.API.STREAM.MSG.GET.KV_{bucket}"),
                serde_json::json!({ "last_by_subj": format!("$KV.{bucket}.deny-matrix") }),
            ));
            reads.push(read_as(
                &bus,
                format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.deny-matrix"),
                serde_json::json!({}),
            ));
        }
        for reply in futures::future::join_all(reads).await.into_iter().flatten() {
            // MSG.GET answers base64 data; DIRECT.GET the raw message.
            if reply.contains(SECRET) || reply.contains("dW5kZWNsYXJlZCBzZWNyZXQ=") {
                failures.push(format!("{who} read an undeclared asset: {reply}"));
            }
        }
        // Not even the configuration: stream info gets no answer.
        let stores = undeclared
            .streams
            .iter()
            .cloned()
            .chain(undeclared.key_values.iter().map(|b| format!("KV_{b}")));
        for stream in stores.clone() {
            let info = format!("$JS.API.STREAM.INFO.{stream}");
            if let Some(reply) = read_as(&bus, info, serde_json::json!({})).await {
                failures.push(format!("{who} read the info of {stream}: {reply}"));
            }
        }
        // Nor an ephemeral push consumer delivering the whole stream to its own inbox.
        for stream in stores {
            let inbox = format!("{}.undeclared-{stream}", who.inbox_prefix());
            let mut delivered = bus.client().subscribe(inbox.clone()).await.unwrap();
            let create = read_as(
                &bus,
                format!("$JS.API.CONSUMER.CREATE.{stream}"),
                serde_json::json!({
                    "stream_name": stream,
                    "config": {
                        "deliver_subject": inbox,
                        "deliver_policy": "all",
                        "ack_policy": "none",
                    },
                }),
            )
            .await;
            if let Some(reply) = create {
                failures.push(format!("{who} created a consumer on {stream}: {reply}"));
            }
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(500), delivered.next()).await
            {
                failures.push(format!(
                    "{who} was delivered {stream}'s {:?}",
                    String::from_utf8_lossy(&m.payload)
                ));
            }
        }
    }
    // The admin itself can read them (the probes are meaningful).
    let admin_read = read_as(
        &observer,
        format!("$JS.API.STREAM.MSG.GET.{}", undeclared.streams[0]),
        serde_json::json!({
            "last_by_subj": Undeclared::stream_message_subject(&undeclared.streams[0])
        }),
    )
    .await
    .unwrap_or_default();
    assert!(
        admin_read.contains("dW5kZWNsYXJlZCBzZWNyZXQ="),
        "the admin cannot read its own stream: {admin_read}"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Invoke the `misbehave` fixture deployed as `name` with an event of type `ty`.
async fn invoke_fixture(
    bus: &Bus,
    name: &str,
    ty: &str,
    data: serde_json::Value,
) -> patchbay_bus::reply::InvokeReply {
    let event = patchbay_bus::CloudEvent::new("/test", ty)
        .json(&data)
        .unwrap();
    let subject = bus
        .subjects()
        .fn_invoke(&patchbay_bus::Token::new(name).unwrap());
    let reply = bus
        .request(
            &subject,
            &event,
            patchbay_bus::RequestOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap_or_else(|e| panic!("invoke {name} ({ty}) failed: {e}"));
    serde_json::from_slice(&reply.payload).unwrap()
}

/// What `name`'s `kv.get(key)` returns: the value, or `None` when the function says the
/// key is absent.
async fn fixture_get(bus: &Bus, name: &str, key: &str) -> Option<String> {
    use base64::Engine as _;
    use patchbay_bus::reply::{FailureReply, InvokeReply};
    match invoke_fixture(bus, name, "kv-get", serde_json::json!({ "key": key })).await {
        InvokeReply::Ok { outputs, .. } => Some(match outputs[0]["data_base64"].as_str() {
            Some(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                String::from_utf8(bytes).unwrap()
            }
            None => outputs[0]["data"].as_str().unwrap_or_default().to_owned(),
        }),
        InvokeReply::Failure {
            failure: FailureReply::Drop { .. },
            ..
        } => None,
        other => panic!("{name} kv-get {key}: {other:?}"),
    }
}

/// `name`'s own `kv.keys()`, sorted.
async fn fixture_keys(bus: &Bus, name: &str) -> serde_json::Value {
    match invoke_fixture(bus, name, "kv-keys", serde_json::json!({})).await {
        patchbay_bus::reply::InvokeReply::Ok { outputs, .. } => {
            let data = &outputs[0]["data"];
            match data {
                serde_json::Value::String(text) => serde_json::from_str(text).unwrap(),
                json => json.clone(),
            }
        }
        other => panic!("{name} kv-keys: {other:?}"),
    }
}

async fn fixture_set(bus: &Bus, name: &str, key: &str, value: &str) {
    let reply = invoke_fixture(
        bus,
        name,
        "kv-set",
        serde_json::json!({ "key": key, "value": value }),
    )
    .await;
    assert!(
        matches!(reply, patchbay_bus::reply::InvokeReply::Ok { .. }),
        "{name} kv-set {key}: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_reads_and_lists_only_its_own_keys_of_the_shared_state_bucket() {
    // Two functions whose names share a prefix ("tenant" is a prefix of "tenant-x"), one
    // declared bucket. Each key is stored under `<function>.`, so neither a key with dots
    // nor a name that starts like another's reaches the other function's state.
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let _node = stack.spawn_runtime("node-1");
    let flags = [
        "--publish",
        "cc.v1.tests.>",
        "--config",
        "out=cc.v1.tests.out",
    ];
    let _ = stack.deploy("misbehave", "tenant", &flags);
    let _ = stack.deploy("misbehave", "tenant-x", &flags);

    fixture_set(&admin, "tenant", "secret", "of tenant").await;
    // An attempt to write into tenant-x's keys: stored as `tenant.tenant-x.secret`.
    fixture_set(&admin, "tenant", "tenant-x.secret", "forged").await;
    assert_eq!(fixture_get(&admin, "tenant-x", "secret").await, None);
    assert_eq!(
        fixture_keys(&admin, "tenant-x").await,
        serde_json::json!([])
    );
    fixture_set(&admin, "tenant-x", "secret", "of tenant-x").await;

    assert_eq!(
        fixture_get(&admin, "tenant", "secret").await.as_deref(),
        Some("of tenant")
    );
    assert_eq!(
        fixture_get(&admin, "tenant-x", "secret").await.as_deref(),
        Some("of tenant-x")
    );
    assert_eq!(
        fixture_keys(&admin, "tenant").await,
        serde_json::json!(["secret", "tenant-x.secret"])
    );
    assert_eq!(
        fixture_keys(&admin, "tenant-x").await,
        serde_json::json!(["secret"])
    );
    // The bucket really holds them under each function's name.
    let state = admin
        .jetstream()
        .get_key_value(patchbay_registry::FUNCTION_STATE_BUCKET)
        .await
        .unwrap();
    assert_eq!(
        state.get("tenant-x.secret").await.unwrap().as_deref(),
        Some(&b"of tenant-x"[..])
    );
    assert_eq!(
        state
            .get("tenant.tenant-x.secret")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"forged"[..])
    );
    // The CLI agrees.
    let ls = stack
        .cli(&["fn", "kv", "ls", "tenant-x", "--json"])
        .success()
        .json();
    assert_eq!(ls, serde_json::json!(["secret"]));

    // `fn rm --purge` takes the function's own keys, and nobody else's.
    let _ = stack.cli(&["fn", "rm", "tenant", "--purge"]).success();
    assert_eq!(state.get("tenant.secret").await.unwrap(), None);
    assert_eq!(state.get("tenant.tenant-x.secret").await.unwrap(), None);
    let gone = stack.cli(&["fn", "kv", "ls", "tenant"]).failure();
    assert!(
        gone.stderr().contains("function tenant is not deployed"),
        "{gone:?}"
    );
    assert_eq!(
        fixture_get(&admin, "tenant-x", "secret").await.as_deref(),
        Some("of tenant-x")
    );
}
