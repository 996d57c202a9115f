//! A runtime node's memory budget: out-of-memory invocations of a version deployed with
//! more `--memory × --concurrency` than the node's budget keep the node's resident memory
//! within the budget, what cannot start in time is answered `overloaded` and counted, and
//! the node goes on serving. Refused deploys: `--memory` outside 1..=512 MiB (including a
//! value whose byte count overflows).
//!
//! The gateway's HTTP functions reserve from a budget of their own the same way: what
//! cannot start within half its deadline is answered 503 and counted, and a version that
//! can never fit is not served.
//!
//! Uses the `misbehave` fixture (tests/components/misbehave/README.md): `oom` allocates
//! until its memory limit stops it; `request` sends a bus request and waits for the
//! answer, which the test holds back so that an instance keeps its reservation exactly as
//! long as the test wants (no timing involved).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_bus::reply::{ErrorKind, InvokeReply};
use patchbay_bus::{Bus, CloudEvent, Deadline, RequestOptions, SystemClock, Token};
use patchbay_tests::gateway::http_client;
use patchbay_tests::{
    Stack, component, eventually, free_port, http_get, metric_value, next_message, wait_ready,
};

const PATIENCE: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
/// The node's budget: two 256 MiB instances.
const BUDGET_MIB: u64 = 512;
/// Allowance above the budget for what is not guest memory: wasmtime's per-instance
/// stacks and tables, allocator slack, the JSON of replies.
const RSS_MARGIN_MIB: u64 = 192;

const INVOKED: [&str; 4] = [
    "--publish",
    "cc.v1.tests.>",
    "--config",
    "out=cc.v1.tests.out",
];

/// `VmRSS` or `VmHWM` of process `pid`, MiB.
fn proc_status_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib >> 10)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Invoke `name` with an event of `ty` and `data`, with an optional `patchbay-deadline`
/// sooner than the request's own 60 s timeout; every invocation must be answered.
async fn invoke(
    bus: &Bus,
    name: &str,
    ty: &str,
    data: serde_json::Value,
    deadline: Option<Duration>,
) -> InvokeReply {
    let subject = bus.subjects().fn_invoke(&Token::new(name).unwrap());
    let event = CloudEvent::new("/test", ty).json(&data).unwrap();
    let options = RequestOptions::timeout(Duration::from_secs(60))
        .deadline(deadline.map(|d| Deadline::after(&SystemClock, d)));
    let reply = bus
        .request(&subject, &event, options)
        .await
        .unwrap_or_else(|e| panic!("invoke {name} ({ty}) got no answer: {e}"));
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn metrics(addr: &str) -> String {
    http_get(addr, "/metrics").await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_invocations_stay_within_the_node_memory_budget_and_what_cannot_start_is_shed() {
    let stack = Stack::start().await;
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let budget = format!("{BUDGET_MIB}MiB");
    let mut node = stack.spawn_runtime_with_env(
        "node-1",
        &[
            ("PATCHBAY_ADMIN_LISTEN", admin_addr.as_str()),
            ("PATCHBAY_MEMORY_BUDGET", budget.as_str()),
        ],
    );
    wait_ready(&admin_addr, PATIENCE).await;
    let admin = stack.admin().await;

    // Each 256 MiB × 8 = 2 GiB, four times the budget: the node runs two at a time.
    let big = ["--memory", "256", "--concurrency", "8"];
    let _ = stack.deploy(
        "misbehave",
        "hog",
        &[&INVOKED[..], &big, &["--timeout", "60s"]].concat(),
    );
    let _ = stack.deploy(
        "misbehave",
        "gobbler",
        &[&INVOKED[..], &big, &["--timeout", "10s"]].concat(),
    );
    let _ = stack.deploy(
        "misbehave",
        "healthy",
        &[&INVOKED[..], &["--memory", "16"]].concat(),
    );
    let body = metrics(&admin_addr).await;
    for f in ["hog", "gobbler"] {
        let series = format!("patchbay_fn_concurrency_limit{{function=\"{f}\"}}");
        assert_eq!(metric_value(&body, &series), 2.0, "{series}\n{body}");
    }
    assert_eq!(
        metric_value(&body, "patchbay_runtime_memory_budget_bytes"),
        (BUDGET_MIB * MIB) as f64
    );
    assert!(
        node.log()
            .contains("concurrency capped by the node's memory budget"),
        "the cap is not logged"
    );

    // 1. Two hog instances hold the whole budget, waiting on requests the test holds.
    let mut held = admin.client().subscribe("cc.v1.tests.hold").await.unwrap();
    let mut hogs = tokio::task::JoinSet::new();
    for i in 0..2 {
        let bus = admin.clone();
        hogs.spawn(async move {
            let data = serde_json::json!({
                "subject": "cc.v1.tests.hold",
                "body": format!("hog {i}"),
                "timeout_ms": 50_000,
            });
            invoke(&bus, "hog", "request", data, None).await
        });
    }
    let mut requests = Vec::new();
    for _ in 0..2 {
        requests.push(next_message(&mut held, PATIENCE, "a hog's held request").await);
    }

    // 2. Meanwhile gobbler cannot start: each waits for memory until its deadline, then is
    //    answered overloaded (or, if its deadline passed while it queued for one of the
    //    version's two slots, deadline-exceeded) — never left hanging.
    let mut starved = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let bus = admin.clone();
        starved.spawn(async move {
            invoke(
                &bus,
                "gobbler",
                "oom",
                serde_json::json!({}),
                Some(Duration::from_millis(1500)),
            )
            .await
        });
    }
    let mut overloaded = 0;
    while let Some(reply) = starved.join_next().await {
        match reply.unwrap() {
            InvokeReply::Error {
                kind: ErrorKind::Overloaded,
                message,
                ..
            } => {
                assert!(message.contains("memory budget"), "{message}");
                overloaded += 1;
            }
            InvokeReply::Error {
                kind: ErrorKind::DeadlineExceeded,
                ..
            } => {}
            other => panic!("a starved invocation should not have run: {other:?}"),
        }
    }
    assert!(overloaded >= 2, "only {overloaded} shed for memory");
    let body = metrics(&admin_addr).await;
    assert_eq!(
        metric_value(
            &body,
            r#"patchbay_fn_shed_total{function="gobbler",reason="memory"}"#
        ),
        f64::from(overloaded),
        "{body}"
    );
    assert_eq!(
        metric_value(
            &body,
            r#"patchbay_fn_invocations_total{function="gobbler",outcome="overloaded",trigger="invoke",version="1"}"#
        ),
        f64::from(overloaded)
    );

    // Let the hogs go: they answer, and their memory comes back.
    for request in requests {
        admin
            .client()
            .publish(request.reply.unwrap(), "released".into())
            .await
            .unwrap();
    }
    while let Some(reply) = hogs.join_next().await {
        assert!(
            matches!(reply.unwrap(), InvokeReply::Ok { .. }),
            "a released hog did not succeed"
        );
    }
    eventually(PATIENCE, "the hogs' memory to be released", || async {
        (metric_value(
            &metrics(&admin_addr).await,
            "patchbay_runtime_memory_reserved_bytes",
        ) == 0.0)
            .then_some(())
    })
    .await;

    // 3. A burst of out-of-memory invocations, eight times what the budget holds at once.
    let pid = node.pid();
    let rss_before = proc_status_mib(pid, "VmRSS");
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(proc_status_mib(pid, "VmRSS"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let bus = admin.clone();
        burst.spawn(
            async move { invoke(&bus, "gobbler", "oom", serde_json::json!({}), None).await },
        );
    }
    let mut out_of_memory = 0;
    while let Some(reply) = burst.join_next().await {
        match reply.unwrap() {
            InvokeReply::Error {
                kind: ErrorKind::OutOfMemory,
                ..
            } => out_of_memory += 1,
            InvokeReply::Error {
                kind: ErrorKind::Overloaded,
                ..
            } => {}
            other => panic!("expected out-of-memory or overloaded, got {other:?}"),
        }
    }
    sampling.abort();
    let sampled_peak = peak.load(Ordering::Relaxed);
    let hwm = proc_status_mib(pid, "VmHWM");
    eprintln!(
        "runtime RSS: {rss_before} MiB before the burst, sampled peak {sampled_peak} MiB, \
         VmHWM {hwm} MiB; budget {BUDGET_MIB} MiB; {out_of_memory}/16 ran out of memory"
    );
    assert_eq!(
        out_of_memory, 16,
        "with a 60 s deadline every one gets its turn"
    );
    let ceiling = rss_before + BUDGET_MIB + RSS_MARGIN_MIB;
    assert!(
        sampled_peak < ceiling && hwm < ceiling,
        "RSS peaked at {sampled_peak} MiB (VmHWM {hwm} MiB), over {ceiling} MiB"
    );

    // 4. The node survived and serves a healthy function.
    assert!(node.is_running(), "the runtime node died");
    match invoke(&admin, "healthy", "ok", serde_json::json!({}), None).await {
        InvokeReply::Ok { outputs, .. } => assert_eq!(outputs.len(), 1),
        other => panic!("healthy did not answer ok: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_refuses_memory_outside_what_an_instance_may_have() {
    let stack = Stack::start().await;
    let path = component("misbehave");
    let path = path.to_str().unwrap();
    // 17592186044416 MiB is 2^64 bytes: unchecked, it used to wrap to a 0-byte limit.
    for memory in ["17592186044416", "513", "0"] {
        let out = stack
            .cli(&["fn", "deploy", path, "--name", "greedy", "--memory", memory])
            .failure();
        let stderr = out.stderr();
        assert!(
            stderr.contains(&format!("{memory} MiB is out of range"))
                && stderr.contains("1 to 512 MiB"),
            "--memory {memory}: {stderr}"
        );
    }
    let out = stack
        .cli(&[
            "fn",
            "deploy",
            path,
            "--name",
            "greedy",
            "--concurrency",
            "0",
        ])
        .failure();
    assert!(out.stderr().contains("--concurrency"), "{}", out.stderr());
    // Nothing was registered.
    let listed = stack.cli(&["fn", "ls", "--json"]).success();
    assert!(!listed.stdout().contains("greedy"), "{}", listed.stdout());
}

/// The value of the first `family` series whose labels include every one of `labels`
/// (whatever other labels the process adds), 0 when there is none.
fn series_value(body: &str, family: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_functions_reserve_from_the_gateway_memory_budget_and_what_cannot_start_is_shed_with_503()
 {
    let stack = Stack::start().await;
    // One 64 MiB instance fits, two do not.
    let gateway = stack
        .spawn_gateway_with_env(&[], "http", &[("PATCHBAY_MEMORY_BUDGET", "100MiB")])
        .await;
    let token = stack.token("admin", &["admin"], &[]);
    let client = http_client(None);
    let url = |path: &str| format!("{}{path}", gateway.url);
    let echo = component("http-echo");
    let deploy = |memory: &str| {
        let _ = stack
            .cli(&[
                "fn",
                "deploy",
                echo.to_str().unwrap(),
                "--name",
                "big",
                "--trigger",
                "http:/big/...",
                "--memory",
                memory,
                "--timeout",
                "60s",
            ])
            .success();
    };
    let hello = |timeout_ms: u64| {
        client
            .get(url("/big/hello"))
            .bearer_auth(&token)
            .header("request-timeout", timeout_ms.to_string())
            .send()
    };
    deploy("64");
    eventually(PATIENCE, "the gateway serves the HTTP function", || async {
        (hello(5_000).await.ok()?.status() == 200).then_some(())
    })
    .await;

    // 1. A streaming echo holds its instance (and its 64 MiB) while the test keeps the
    //    request body open.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(futures::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let held = client
        .post(url("/big/stream"))
        .bearer_auth(&token)
        .header("request-timeout", "30000")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let mut echoed = held.bytes_stream();
    tx.send(Ok(Bytes::from_static(b"ping"))).await.unwrap();
    let first = tokio::time::timeout(PATIENCE, echoed.next())
        .await
        .expect("the echo of the first chunk")
        .unwrap()
        .unwrap();
    assert_eq!(first, "ping");

    // 2. Meanwhile another request cannot start: it waits half its 1 s deadline, then is
    //    shed with 503 and counted — never left hanging, never run over the budget.
    let started = std::time::Instant::now();
    let shed = hello(1_000).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(shed.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = shed.json().await.unwrap();
    assert!(
        problem["type"].as_str().unwrap().ends_with("/overloaded")
            && problem["detail"]
                .as_str()
                .unwrap()
                .contains("memory budget"),
        "{problem}"
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    let body = metrics(&gateway.admin).await;
    assert_eq!(
        series_value(
            &body,
            "patchbay_fn_shed_total",
            &[r#"function="big""#, r#"reason="memory""#]
        ),
        1.0,
        "{body}"
    );

    // 3. The held request ends: its memory comes back and the next request runs.
    drop(tx);
    while let Some(chunk) = tokio::time::timeout(PATIENCE, echoed.next())
        .await
        .expect("the held response to end")
    {
        chunk.unwrap();
    }
    eventually(
        PATIENCE,
        "a request to run once the memory is back",
        || async { (hello(1_000).await.ok()?.status() == 200).then_some(()) },
    )
    .await;

    // 4. A version whose one instance exceeds the whole budget is not served; the one
    //    before it goes on serving.
    deploy("128");
    eventually(PATIENCE, "the gateway to refuse the version", || async {
        gateway
            .process
            .log()
            .contains("exceeds this gateway's whole memory budget")
            .then_some(())
    })
    .await;
    assert_eq!(hello(5_000).await.unwrap().status(), 200);
    assert_eq!(
        series_value(
            &metrics(&gateway.admin).await,
            "patchbay_fn_shed_total",
            &[r#"function="big""#, r#"reason="memory""#]
        ),
        1.0,
        "only the request that found no memory was shed"
    );
}
