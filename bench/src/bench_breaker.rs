//! `patchbay-bench --suite breaker`: routing's decision latency when the customer-lookup
//! dependency hangs, with and without a circuit breaker, beside a healthy lookup measured
//! in the same run.
//!
//! The real `patchbay-routing` binary (identity `service/routing`, mutual TLS) routes calls
//! published durably on CC_CALLS at a fixed rate; the benchmark measures each call from its
//! publish to its `routed` decision. The lookup is answered by a native responder (healthy)
//! or swallowed by a subscriber that never replies (hung). "Without a breaker" is the
//! routing service with no resilience policy: every call waits the lookup timeout. "With a
//! breaker" applies a lookup policy like `deploy/resilience.toml`'s: after five timeouts
//! routing stops asking and routes at once, probing once per cool-down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use patchbay_bus::CloudEvent;
use patchbay_bus::resilience::ResiliencePolicy;

use crate::bench_gateway::{Killed, free_port, http_get};
use crate::suites::{BenchArgs, Testbed, spawn_workload};

/// Calls per phase and their rate: 20 s of traffic at 25 calls/s.
const CALLS: usize = 500;
const RATE_PER_SEC: u64 = 25;
/// The routing service's own lookup timeout (its default).
const LOOKUP_TIMEOUT: &str = "250ms";

/// Rules that route every call to queue `general` around the clock, so a figure does not
/// depend on the hour the benchmark runs at (the topology suite uses them too).
pub(crate) const RULES: &str = r#"
default_tier = "standard"

[[schedules]]
name = "always"
tz = "UTC"
closed_treatment = "msg-closed"
hours = [{ days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], open = "00:00", close = "24:00" }]

[[queues]]
name = "general"

[default]
queue = "general"
schedule = "always"
"#;

/// The lookup policy of the "with a breaker" phase (as in deploy/resilience.toml, with
/// no retries so a hung lookup costs one timeout).
const LOOKUP_POLICY: &str = r#"
[targets."subject:cc.v1.customers.lookup"]
timeout = "250ms"
retry = { max_attempts = 1 }
breaker = { consecutive_failures = 5, failure_rate = 0.5, window = "10s", min_requests = 20, cool_down = "5s", half_open_probes = 1 }
"#;

/// How the lookup dependency behaves in a phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Healthy,
    Hung,
}

/// Latency percentiles of one phase, in milliseconds.
struct Phase {
    name: &'static str,
    p50: f64,
    p99: f64,
    max: f64,
    routed: usize,
}

/// Run the breaker benchmark and print its table.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    println!(
        "routing latency under a hung customer lookup: {CALLS} calls per phase at {RATE_PER_SEC}/s, publish → routed"
    );
    let bed = Testbed::start(args).await?;
    let rules = bed.dir.path().join("routing.toml");
    std::fs::write(&rules, RULES)?;
    let mut phases = Vec::new();
    for (name, lookup, breaker) in [
        ("healthy lookup", Lookup::Healthy, false),
        ("hung lookup, no breaker", Lookup::Hung, false),
        ("hung lookup, breaker", Lookup::Hung, true),
    ] {
        if breaker {
            apply_policy(&bed.admin).await?;
        }
        let responder = tokio::spawn(lookup_responder(bed.admin.clone(), lookup));
        // A fresh routing process per phase: its breaker starts closed.
        let admin_listen = format!("127.0.0.1:{}", free_port()?);
        let routing = spawn_routing(&bed, &admin_listen, &rules)?;
        wait_ready(&admin_listen).await?;
        let phase = measure(&bed.admin, name, phases.len()).await;
        drop(routing);
        responder.abort();
        phases.push(phase?);
    }
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>8}",
        "phase", "p50 ms", "p99 ms", "max ms", "routed"
    );
    for p in &phases {
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>9.1} {:>8}",
            p.name, p.p50, p.p99, p.max, p.routed
        );
    }
    Ok(())
}

async fn apply_policy(admin: &patchbay_bus::Bus) -> anyhow::Result<()> {
    let policy = ResiliencePolicy::from_toml(LOOKUP_POLICY)?;
    let store = patchbay_cli::resilience::open(admin).await?;
    patchbay_cli::resilience::apply(&store, &policy, false).await?;
    Ok(())
}

/// Answer (healthy) or swallow (hung) every lookup request.
async fn lookup_responder(admin: patchbay_bus::Bus, lookup: Lookup) {
    let Ok(mut requests) = admin.client().subscribe("cc.v1.customers.lookup").await else {
        return;
    };
    while let Some(msg) = requests.next().await {
        let Some(reply) = msg.reply else { continue };
        if lookup == Lookup::Hung {
            continue;
        }
        let Ok(event) = CloudEvent::new("/bench/crm", "cc.customer.found.v1")
            .json(&serde_json::json!({"tier": "gold", "known": true}))
        else {
            continue;
        };
        let mut headers = async_nats::HeaderMap::new();
        event.write_headers(&mut headers);
        let _ = admin
            .client()
            .publish_with_headers(reply, headers, event.data.clone())
            .await;
    }
}

fn spawn_routing(
    bed: &Testbed,
    admin_listen: &str,
    rules: &std::path::Path,
) -> anyhow::Result<Killed> {
    spawn_workload(
        bed,
        "patchbay-routing",
        ("service", "routing"),
        &[
            ("PATCHBAY_ADMIN_LISTEN", admin_listen),
            ("PATCHBAY_ROUTING_RULES", &rules.to_string_lossy()),
            ("PATCHBAY_ROUTING_LOOKUP_TIMEOUT", LOOKUP_TIMEOUT),
            ("PATCHBAY_LOG", "warn"),
        ],
    )
}

async fn wait_ready(admin_listen: &str) -> anyhow::Result<()> {
    let url = format!("http://{admin_listen}/readyz");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if http_get(&url, None).await.is_some_and(|(s, _)| s == 200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("routing did not become ready within 30 s")
}

/// Publish `CALLS` calls at `RATE_PER_SEC` and time each to its `routed` decision.
async fn measure(
    admin: &patchbay_bus::Bus,
    name: &'static str,
    phase: usize,
) -> anyhow::Result<Phase> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut routed = admin
        .client()
        .subscribe("cc.v1.calls.*.routed")
        .await
        .context("subscribe to decisions")?;
    admin.client().flush().await?;
    let publisher = {
        let (admin, sent) = (admin.clone(), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_SEC));
            for n in 0..CALLS {
                every.tick().await;
                let call = format!("bench-{phase}-{n}");
                let Ok(event) = CloudEvent::new("/bench/telephony", "cc.call.incoming.v1").json(
                    &serde_json::json!({
                        "call_id": call, "dialled": "+448000111222", "caller": "+442079460000"
                    }),
                ) else {
                    continue;
                };
                let event = event.partition_key(&call);
                sent.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(call.clone(), Instant::now());
                let subject = format!("cc.v1.calls.{call}.incoming");
                if let Err(e) = admin.publish_durable(&subject, &event, None).await {
                    eprintln!("cannot publish {subject}: {e}");
                }
            }
        })
    };
    let mut latencies = Vec::with_capacity(CALLS);
    let limit = Instant::now()
        + Duration::from_secs(CALLS as u64 / RATE_PER_SEC)
        + Duration::from_secs(CALLS as u64 / 2);
    while latencies.len() < CALLS && Instant::now() < limit {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), routed.next()).await
        else {
            continue;
        };
        let call = msg.subject.split('.').nth(3).unwrap_or_default().to_owned();
        if let Some(at) = sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&call)
        {
            latencies.push(at.elapsed().as_secs_f64() * 1000.0);
        }
    }
    publisher.abort();
    if latencies.is_empty() {
        bail!("{name}: no call was routed");
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(Phase {
        name,
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
        routed: latencies.len(),
    })
}
