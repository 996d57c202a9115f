//! Bus benchmark of a running agents service: N agents, M routed calls, offers accepted at
//! once; prints decisions per second and routed→offered latency percentiles.
//!
//! `source .patchbay/env && cargo run --release -p patchbay-agents --example bench_bus -- [agents] [calls]`
//!
//! Connects with the identity in `PATCHBAY_NATS_*` (the admin one in `.patchbay/env`),
//! logs in `agents` agents (default 50) for a fresh queue, publishes `calls` (default
//! 2,000) `routed` events durably as fast as the stream acks them, and plays every agent
//! desktop: accept each offer, hang up each assigned call, end wrap-up at once. A
//! *decision* is an `offered` event; its latency runs from the routed publish being acked
//! to the offer arriving on core NATS. Everything crosses the real bus with TLS, the
//! service persists a snapshot per batch, so this measures the service, not the engine
//! (see `bench_engine` for that).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use patchbay_bus::{Bus, BusConfig, CloudEvent};
use serde_json::json;
use tokio::sync::Mutex;

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set (source .patchbay/env)"))
}

async fn publish(
    bus: &Bus,
    subject: String,
    ty: &str,
    data: serde_json::Value,
) -> anyhow::Result<()> {
    let event = CloudEvent::new(bus.source(), ty).json(&data)?;
    bus.publish_durable(&subject, &event, None)
        .await
        .with_context(|| format!("cannot publish {subject}"))?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let calls: usize = args.next().map_or(Ok(2_000), |a| a.parse())?;
    let config = BusConfig::new(
        env("PATCHBAY_NATS_URL")?,
        env("PATCHBAY_NATS_CA")?,
        env("PATCHBAY_NATS_CERT")?,
        env("PATCHBAY_NATS_KEY")?,
    )
    .name("patchbay-agents-bench");
    let bus = patchbay_bus::connect(&config).await?;
    let run = uuid_ish();
    let queue = format!("bench-{run}");

    let mut offers = bus.client().subscribe("cc.v1.calls.*.offered").await?;
    let mut assigned = bus.client().subscribe("cc.v1.calls.*.assigned").await?;
    let mut ended = bus.client().subscribe("cc.v1.calls.*.ended").await?;
    let mut states = bus
        .client()
        .subscribe("cc.v1.agents.*.evt.state-changed")
        .await?;
    bus.client().flush().await?;

    let prefix = format!("b{run}");
    for a in 0..agents {
        let agent = format!("{prefix}-a{a}");
        let profile = json!({ "skills": [], "queues": [{ "queue": queue }] });
        publish(
            &bus,
            format!("cc.v1.agents.{agent}.cmd.state"),
            "cc.agent.set-state.v1",
            json!({ "agent_id": agent, "state": "available", "profile": profile }),
        )
        .await?;
    }
    let mut available = 0;
    let login_deadline = Instant::now() + Duration::from_secs(60);
    while available < agents {
        let msg = tokio::time::timeout_at(login_deadline.into(), states.next())
            .await
            .context("agents did not log in within 60 s (is patchbay-agents running?)")?;
        let Some(msg) = msg else {
            bail!("subscription closed")
        };
        if msg.subject.contains(&prefix)
            && String::from_utf8_lossy(&msg.payload).contains("\"to\":\"available\"")
        {
            available += 1;
        }
    }
    drop(states);
    eprintln!("{agents} agents available on {queue}; publishing {calls} calls");

    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    // Desktops: accept offers, hang up assigned calls, end wrap-up at once.
    let desktop = bus.clone();
    let prefix_c = prefix.clone();
    let answering = tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(msg) = assigned.next() => {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                    let call = v["call_id"].as_str().unwrap_or_default().to_owned();
                    if !call.starts_with(&prefix_c) { continue; }
                    let _ = publish(&desktop, format!("cc.v1.calls.{call}.hangup"), "cc.call.hangup.v1", json!({ "call_id": call })).await;
                }
                Some(msg) = ended.next() => {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                    let Some(agent) = v["agent"].as_str().map(str::to_owned) else { continue };
                    if !agent.starts_with(&prefix_c) { continue; }
                    let _ = publish(&desktop, format!("cc.v1.agents.{agent}.cmd.wrapup-done"), "cc.agent.wrapup-done.v1", json!({ "agent_id": agent })).await;
                }
                else => break,
            }
        }
    });
    let publisher = {
        let bus = bus.clone();
        let sent = Arc::clone(&sent);
        let queue = queue.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            for c in 0..calls {
                let call = format!("{prefix}-c{c}");
                let data = json!({
                    "call_id": call, "seq": 1, "queue": queue, "priority": 0, "requirements": [],
                    "channel": "voice", "customer_tier": "standard", "rule": "bench",
                    "lookup_ok": true, "routed_at_ms": 0
                });
                // From before the publish: storing the routed event is part of the path.
                sent.lock().await.insert(call.clone(), Instant::now());
                publish(
                    &bus,
                    format!("cc.v1.calls.{call}.routed"),
                    "cc.call.routed.v1",
                    data,
                )
                .await?;
            }
            anyhow::Ok(())
        })
    };

    let mut latencies = Vec::with_capacity(calls);
    let deadline = Instant::now() + Duration::from_secs(600);
    while latencies.len() < calls {
        let msg = tokio::time::timeout_at(deadline.into(), offers.next())
            .await
            .context("offers stopped arriving")?;
        let Some(msg) = msg else {
            bail!("subscription closed")
        };
        let at = Instant::now();
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
            continue;
        };
        let (Some(call), Some(agent)) = (v["call_id"].as_str(), v["agent"].as_str()) else {
            continue;
        };
        if !call.starts_with(&prefix) {
            continue;
        }
        let Some(t) = sent.lock().await.remove(call) else {
            continue;
        };
        latencies.push(at.saturating_duration_since(t));
        publish(
            &bus,
            format!("cc.v1.agents.{agent}.cmd.accept"),
            "cc.agent.accept.v1",
            json!({ "agent_id": agent, "call_id": call }),
        )
        .await?;
    }
    let elapsed = started.elapsed();
    publisher.await??;
    answering.abort();
    latencies.sort();
    println!(
        "agents {agents}, calls {calls}: {:.0} decisions/s over {:.2?}; routed→offered p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        calls as f64 / elapsed.as_secs_f64(),
        elapsed,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default(),
    );
    Ok(())
}

/// A short run id, so several runs never share call or agent ids.
fn uuid_ish() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}", nanos % 0xffff_ffff)
}
