//! `patchbay-runtime`: one runtime node. It connects with its own identity
//! (`runtime/<node>`), serves every deployed function and drains on SIGTERM.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use patchbay_bus::args::BusArgs;
use patchbay_bus::trace::BusMetrics;
use patchbay_host::{EngineConfig, NodeConfig};
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Run a Patchbay runtime node.
#[derive(Debug, Parser)]
#[command(name = "patchbay-runtime", version, about)]
struct Args {
    /// Node name; its certificate must carry `spiffe://<trust-domain>/runtime/<node>`.
    #[arg(long, env = "PATCHBAY_NODE", default_value = "node-1")]
    node: String,
    /// How long SIGTERM waits for in-flight invocations.
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Instance slots in the pooling allocator (concurrent invocations across functions).
    #[arg(long, env = "PATCHBAY_MAX_INSTANCES", default_value_t = 256)]
    max_instances: u32,
    /// Linear memory all invocations on this node may hold together, e.g. `2GiB`, `512MiB`
    /// (a bare number is MiB). Each invocation reserves its version's whole `--memory`
    /// before it starts; what does not fit waits until its deadline (or, without one, for
    /// its timeout) and is then refused as overloaded. A version runs at most
    /// budget / memory invocations at once; one whose memory exceeds the budget is not
    /// served. Leave room for the runtime itself (~150 MiB) within the host's memory.
    #[arg(long, env = "PATCHBAY_MEMORY_BUDGET", default_value = "4GiB", value_parser = parse_budget)]
    memory_budget: u64,
    /// Directory for compiled components (keyed by digest and engine), so a restarted
    /// node skips compilation. Unset: compile into memory only.
    #[arg(long, env = "PATCHBAY_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = args
        .telemetry
        .start("patchbay-runtime", &args.node, "registry", |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let (metrics, ready) = (&started.metrics, started.ready.clone());

    let engine = EngineConfig {
        max_concurrent_instances: args.max_instances,
        memory_budget_bytes: args.memory_budget,
        cache_dir: args.cache_dir,
        ..EngineConfig::default()
    };
    let config = NodeConfig {
        bus: args
            .bus
            .config(format!("patchbay-runtime/{}", args.node))
            .context("invalid subject prefix")?
            .metrics(BusMetrics::register(metrics).context("failed to register bus metrics")?),
        node: args.node,
        engine,
        drain_timeout: args.drain_timeout,
    };
    patchbay_host::run(config, metrics, ready, shutdown_signal())
        .await
        .context("runtime node failed")
}

/// `--memory-budget`: a memory size of at least 1 MiB.
fn parse_budget(text: &str) -> Result<u64, String> {
    let bytes = patchbay_host::limits::parse_memory_size(text).map_err(|e| e.to_string())?;
    if bytes < 1 << 20 {
        return Err(format!(
            "a memory budget must be at least 1 MiB, not {text:?}"
        ));
    }
    Ok(bytes)
}
