//! `patchbay-bench --suite topology`: the same call load against the two layouts of
//! `deploy/topology.toml` — `monolith` (one `patchbay-node` running the gateway, routing,
//! agents and a runtime node) and `split` (a process per service, the baseline) — each on
//! a fresh local stack (nats-server with mutual TLS and JetStream in a temporary state
//! directory, bootstrapped), started exactly as `patchbay up --topology …` starts them
//! ([`patchbay_cli::up::workloads`]).
//!
//! Per layout: every process's `/readyz` answers 200, the `customer-lookup` example
//! function is deployed (routing asks it about every call, so the runtime service is on the
//! measured path too), [`AGENTS`] agents log in to queue `general`, then [`CALLS`] calls are
//! published durably on `cc.v1.calls.<id>.incoming` as `cli/admin` at [`RATE_PER_SEC`]
//! (after [`WARM_UP_CALLS`] unmeasured ones). Each call is timed from its publish to its
//! `cc.v1.calls.<id>.offered`; the offer is accepted and the call hung up at once (no
//! wrap-up), so agents free up and the load never queues. The gateway runs but is not on
//! the measured path. After the load, the resident memory (`VmRSS`, and the peak `VmHWM`)
//! of the layout's processes is summed; the nats-server is the same in both and excluded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use patchbay_bus::{Bus, CloudEvent};
use patchbay_control::certs::Identity;

use crate::bench_gateway::{free_port, http_get};
use crate::suites::{BenchArgs, Testbed};
use patchbay_cli::function::{DeployArgs, FnCommand};
use patchbay_cli::up::UpTopology;

/// Measured calls per layout, and their rate: 20 s of traffic.
const CALLS: usize = 200;
const RATE_PER_SEC: u64 = 10;
/// Unmeasured calls first: connections, the lookup function's instance pool, caches.
const WARM_UP_CALLS: usize = 20;
/// Agents logged in to `general`; far more than the calls alive at any moment.
const AGENTS: usize = 20;
/// How long each process has to become ready, and the deploy to be served.
const READY: Duration = Duration::from_secs(90);

/// Offers never expire during the run; a hung-up agent is free at once.
const AGENTS_CONFIG: &str = "offer_timeout_ms = 60000\nwrap_up_ms = 0\n";

/// What one layout measured.
struct Measured {
    name: &'static str,
    processes: usize,
    p50: f64,
    p99: f64,
    max: f64,
    offered: usize,
    /// Summed `VmRSS` and `VmHWM`, KiB.
    rss_kib: u64,
    peak_kib: u64,
}

/// Run the topology benchmark and print monolith beside split.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    println!(
        "topology bench: a fresh stack per layout, {AGENTS} agents on `general`, {CALLS} calls at \
         {RATE_PER_SEC}/s (after {WARM_UP_CALLS} warm-up calls) published durably as cli/admin, \
         publish incoming → offered (routing with the customer-lookup function, then agents; \
         each offer accepted and hung up); RSS summed over the layout's processes after the \
         load, nats-server excluded"
    );
    let lookup = crate::suites::component(args, "customer-lookup")?;
    let monolith = layout(args, UpTopology::Monolith, "monolith", &lookup).await?;
    let split = layout(args, UpTopology::Split, "split (baseline)", &lookup).await?;
    println!();
    println!(
        "{:<18} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "layout", "processes", "p50 ms", "p99 ms", "max ms", "offered", "RSS MiB", "peak MiB"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    for m in [&monolith, &split] {
        println!(
            "{:<18} {:>9} {:>8.1} {:>8.1} {:>8.1} {:>8} {:>9.1} {:>9.1}",
            m.name,
            m.processes,
            m.p50,
            m.p99,
            m.max,
            m.offered,
            mib(m.rss_kib),
            mib(m.peak_kib)
        );
    }
    println!();
    println!(
        "monolith vs split: p50 {:+.1} ms ({:.2}×), p99 {:+.1} ms ({:.2}×), RSS {:+.1} MiB \
         ({:.2}×), peak {:+.1} MiB ({:.2}×)",
        monolith.p50 - split.p50,
        monolith.p50 / split.p50,
        monolith.p99 - split.p99,
        monolith.p99 / split.p99,
        mib(monolith.rss_kib) - mib(split.rss_kib),
        monolith.rss_kib as f64 / split.rss_kib.max(1) as f64,
        mib(monolith.peak_kib) - mib(split.peak_kib),
        monolith.peak_kib as f64 / split.peak_kib.max(1) as f64,
    );
    for m in [&monolith, &split] {
        if m.offered < CALLS {
            println!(
                "warning: {}: only {} of {CALLS} calls were offered in time",
                m.name, m.offered
            );
        }
    }
    Ok(())
}

/// Start `topology` on a fresh stack, load it, measure it, stop it.
async fn layout(
    args: &BenchArgs,
    topology: UpTopology,
    name: &'static str,
    lookup: &std::path::Path,
) -> anyhow::Result<Measured> {
    let bed = Testbed::start(args).await?;
    let config_dir = bed.dir.path().join("config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("routing.toml"), crate::bench_breaker::RULES)?;
    std::fs::write(config_dir.join("agents.toml"), AGENTS_CONFIG)?;
    let nodes = [Identity::new("runtime", "node-1")?];
    let mut workloads = patchbay_cli::up::workloads(topology, free_port()?, &config_dir, &nodes)?;
    let mut children = Vec::new();
    for workload in &mut workloads {
        workload.admin = format!("127.0.0.1:{}", free_port()?);
        workload.env.push(("PATCHBAY_DRAIN_TIMEOUT", "1s".into()));
        children.push(workload.spawn(&bed.prepared.state, &bed.nats.url)?.0);
    }
    let result = async {
        for workload in &workloads {
            wait_ready(&workload.admin, &workload.label).await?;
        }
        deploy_lookup(&bed.admin, lookup).await?;
        log_in(&bed.admin).await?;
        let warm = drive(&bed.admin, "warm", WARM_UP_CALLS).await?;
        eprintln!("  {name}: warmed up ({} calls offered)", warm.len());
        let mut latencies = drive(&bed.admin, "call", CALLS).await?;
        if latencies.is_empty() {
            bail!("{name}: no call was offered");
        }
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        let (mut rss_kib, mut peak_kib) = (0, 0);
        for child in &children {
            let (rss, peak) = memory(child.pid())?;
            rss_kib += rss;
            peak_kib += peak;
        }
        eprintln!(
            "  {name}: p50 {:.1} ms, p99 {:.1} ms, RSS {:.1} MiB over {} process(es)",
            at(0.5),
            at(0.99),
            rss_kib as f64 / 1024.0,
            children.len()
        );
        Ok(Measured {
            name,
            processes: children.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
            offered: latencies.len(),
            rss_kib,
            peak_kib,
        })
    }
    .await;
    if result.is_err() {
        eprintln!(
            "  {name}: logs are in {} (kept)",
            bed.prepared.state.logs().display()
        );
        // Keep the directory for the logs.
        drop(children);
        let _ = bed.dir.keep();
        return result;
    }
    // The services stop (SIGTERM, drain) before the nats-server and its directory go.
    drop(children);
    drop(bed);
    result
}

/// Wait until `GET http://<admin>/readyz` answers 200.
pub(crate) async fn wait_ready(admin: &str, label: &str) -> anyhow::Result<()> {
    let url = format!("http://{admin}/readyz");
    let started = Instant::now();
    while started.elapsed() < READY {
        if http_get(&url, None).await.is_some_and(|(s, _)| s == 200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{label} did not become ready within {READY:?}")
}

/// Deploy the `customer-lookup` example as `patchbay up` does; waits until a node serves it.
async fn deploy_lookup(admin: &Bus, file: &std::path::Path) -> anyhow::Result<()> {
    let deploy = DeployArgs {
        publish: vec!["cc.v1.customers.lookup.reply".into()],
        config: vec![("default_tier".into(), "standard".into())],
        wait: READY,
        json: true,
        ..DeployArgs::new(
            file.to_owned(),
            "customer-lookup",
            "subject:cc.v1.customers.lookup",
        )
    };
    patchbay_cli::function::run(FnCommand::Deploy(deploy), admin.clone())
        .await
        .context("cannot deploy customer-lookup")
}

/// Publish `data` durably on `subject` as the admin identity.
async fn publish(admin: &Bus, subject: &str, ty: &str, data: &serde_json::Value) {
    let event = match CloudEvent::new("/bench/topology", ty).json(data) {
        Ok(event) => event,
        Err(e) => {
            eprintln!("cannot encode {subject}: {e}");
            return;
        }
    };
    if let Err(e) = admin.publish_durable(subject, &event, None).await {
        eprintln!("cannot publish {subject}: {e}");
    }
}

fn agent_id(n: usize) -> String {
    format!("bench-agent-{n}")
}

/// Log [`AGENTS`] agents in to `general` and wait until the agents service has applied
/// every log-in (its `state-changed` event), at most 60 s.
async fn log_in(admin: &Bus) -> anyhow::Result<()> {
    let mut changes = admin
        .client()
        .subscribe("cc.v1.agents.*.evt.state-changed")
        .await
        .context("subscribe to agent state changes")?;
    admin.client().flush().await?;
    let profile = serde_json::json!({ "skills": [], "queues": [{ "queue": "general" }] });
    for n in 0..AGENTS {
        let agent = agent_id(n);
        publish(
            admin,
            &format!("cc.v1.agents.{agent}.cmd.state"),
            "cc.agent.command.v1",
            &serde_json::json!({ "agent_id": agent, "state": "available", "profile": profile }),
        )
        .await;
    }
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < AGENTS {
        match tokio::time::timeout_at(deadline, changes.next()).await {
            Ok(Some(msg)) => {
                if let Some(agent) = msg.subject.split('.').nth(3) {
                    seen.insert(agent.to_owned());
                }
            }
            Ok(None) | Err(_) => bail!("only {} of {AGENTS} agents logged in", seen.len()),
        }
    }
    Ok(())
}

/// Publish `count` calls `<prefix>-<n>` at [`RATE_PER_SEC`]; accept each offer and hang up
/// once assigned, until every call is offered and hung up or the rate's duration plus 30 s
/// has passed. The latency of each call's first offer, in milliseconds; calls not offered
/// by then are left out.
async fn drive(admin: &Bus, prefix: &str, count: usize) -> anyhow::Result<Vec<f64>> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut events = admin
        .client()
        .subscribe("cc.v1.calls.*.*")
        .await
        .context("subscribe to call events")?;
    admin.client().flush().await?;
    let publisher = {
        let (admin, sent, prefix) = (admin.clone(), Arc::clone(&sent), prefix.to_owned());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_SEC));
            for n in 0..count {
                every.tick().await;
                let call = format!("{prefix}-{n}");
                let data = serde_json::json!({
                    "call_id": call, "dialled": "+442079460000", "caller": "+44 20 7946 0000"
                });
                let Ok(event) = CloudEvent::new("/bench/telephony", "cc.call.incoming.v1")
                    .json(&data)
                    .map(|e| e.partition_key(&call))
                else {
                    continue;
                };
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
    let mut latencies = Vec::with_capacity(count);
    let mut follow_ups = Vec::new();
    let mut hung_up = 0;
    let limit = Instant::now()
        + Duration::from_millis(count as u64 * 1000 / RATE_PER_SEC)
        + Duration::from_secs(30);
    while (latencies.len() < count || hung_up < count) && Instant::now() < limit {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(1), events.next()).await
        else {
            continue;
        };
        let mut parts = msg.subject.split('.');
        let (Some(call), Some(what)) = (parts.nth(3), parts.next()) else {
            continue;
        };
        if !call.starts_with(prefix) || !matches!(what, "offered" | "assigned") {
            continue;
        }
        let call = call.to_owned();
        if what == "assigned" {
            hung_up += 1;
        }
        if what == "offered"
            && let Some(at) = sent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&call)
        {
            latencies.push(at.elapsed().as_secs_f64() * 1000.0);
        }
        let data: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        let Some(agent) = data["agent"].as_str().map(str::to_owned) else {
            continue;
        };
        // Off the receiving loop, so a publish's acknowledgement never delays the clock of
        // the next offer.
        let (admin, offered) = (admin.clone(), what == "offered");
        follow_ups.push(tokio::spawn(async move {
            if offered {
                publish(
                    &admin,
                    &format!("cc.v1.agents.{agent}.cmd.accept"),
                    "cc.agent.command.v1",
                    &serde_json::json!({ "agent_id": agent, "call_id": call }),
                )
                .await;
            } else {
                publish(
                    &admin,
                    &format!("cc.v1.calls.{call}.hangup"),
                    "cc.call.hangup.v1",
                    &serde_json::json!({ "call_id": call }),
                )
                .await;
            }
        }));
    }
    publisher.abort();
    for task in follow_ups {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(latencies)
}

/// `VmRSS` and `VmHWM` of process `pid`, KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
