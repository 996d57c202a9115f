//! `patchbay-agents`: the agent-assignment service binary.
//!
//! `run` (also what runs without a subcommand) is the service: it connects as
//! `service/agents`, restores the engine from the `cc-agents` bucket, binds the durable
//! consumers `agents` on CC_CALLS and CC_AGENT_CMDS, serves /metrics, /healthz and
//! /readyz on its admin listener and drains on SIGTERM (finishing the batch in hand).
//! `simulate` drives the real engine with a simulated clock — from a scenario (Poisson
//! arrivals, replications, Erlang C beside the results) or from a recorded input log.

use std::ffi::OsString;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use patchbay_agents::AgentsConfig;
use patchbay_agents::engine::EngineConfig;
use patchbay_agents::simulate::{self, Scenario};
use patchbay_bus::args::BusArgs;
use patchbay_bus::trace::BusMetrics;
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

#[derive(Parser)]
#[command(
    name = "patchbay-agents",
    version,
    about = "Patchbay agent-assignment service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default without a subcommand).
    Run(Box<RunArgs>),
    /// Run the real engine under a simulated clock and report statistics.
    Simulate(SimulateArgs),
}

/// The subcommands; anything else on the command line is `run`'s flags.
const SUBCOMMANDS: [&str; 5] = ["run", "simulate", "help", "--help", "-h"];

#[derive(Args)]
struct RunArgs {
    /// Engine settings (TOML with the fields of `EngineConfig`, see deploy/agents.toml);
    /// defaults without it.
    #[arg(long, env = "PATCHBAY_AGENTS_CONFIG")]
    config: Option<PathBuf>,
    /// Most inputs applied per batch (one snapshot is written per batch).
    #[arg(long, env = "PATCHBAY_AGENTS_MAX_BATCH", default_value_t = 256)]
    max_batch: usize,
    /// How often queue gauges are refreshed (they are also refreshed after each batch).
    #[arg(long, env = "PATCHBAY_AGENTS_STATS_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    stats_interval: Duration,
    /// How long SIGTERM may spend finishing the batch in hand (its inputs are redelivered
    /// if it runs out).
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Instance name (logs, traces, connection name, CloudEvents source).
    #[arg(long, env = "PATCHBAY_AGENTS_INSTANCE", default_value = "agents-1")]
    instance: String,
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[derive(Args)]
struct SimulateArgs {
    /// A scenario (TOML): arrivals, handle times, staffing, replications.
    #[arg(long, env = "PATCHBAY_AGENTS_SCENARIO", conflicts_with = "replay")]
    scenario: Option<PathBuf>,
    /// A recorded log (JSON lines of {"at_ms":…, "input":…}) to replay instead.
    #[arg(long, env = "PATCHBAY_AGENTS_REPLAY")]
    replay: Option<PathBuf>,
    /// Engine settings (TOML) for --replay; scenarios carry their own [engine] table.
    #[arg(long, env = "PATCHBAY_AGENTS_ENGINE_CONFIG", requires = "replay")]
    engine_config: Option<PathBuf>,
    /// Override the scenario's number of replications.
    #[arg(long)]
    replications: Option<u32>,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let first = argv.get(1).and_then(|a| a.to_str());
    let version = matches!(first, Some("--version" | "-V"));
    if !version && !first.is_some_and(|a| SUBCOMMANDS.contains(&a)) {
        argv.insert(1.min(argv.len()), "run".into());
    }
    match Cli::parse_from(argv).command {
        Command::Run(args) => serve(*args),
        Command::Simulate(args) => simulate(args),
    }
}

fn engine_config(path: &Path) -> Result<EngineConfig> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("failed to read engine config {}", path.display()))?;
    toml::from_str::<EngineConfig>(&text)
        .with_context(|| format!("failed to parse engine config {}", path.display()))
}

#[tokio::main]
async fn serve(args: RunArgs) -> Result<()> {
    let started = args
        .telemetry
        .start("patchbay-agents", &args.instance, "agents-consumers", |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let (metrics, ready) = (&started.metrics, started.ready.clone());

    let engine = match &args.config {
        Some(path) => engine_config(path)?,
        None => EngineConfig::default(),
    };
    tracing::info!(config = ?args.config, ?engine, "engine settings");

    let bus = args
        .bus
        .config(format!("patchbay-agents/{}", args.instance))
        .context("invalid subject prefix")?
        .metrics(BusMetrics::register(metrics).context("failed to register bus metrics")?);
    let mut config = AgentsConfig::new(bus, engine);
    config.max_batch = args.max_batch;
    config.stats_interval = args.stats_interval;
    config.drain_timeout = args.drain_timeout;
    patchbay_agents::run(config, metrics, ready, shutdown_signal())
        .await
        .context("agents service failed")
}

fn simulate(args: SimulateArgs) -> Result<()> {
    if let Some(path) = &args.replay {
        let config = match &args.engine_config {
            Some(p) => engine_config(p)?,
            None => EngineConfig::default(),
        };
        let file = fs::File::open(path)
            .with_context(|| format!("failed to open recorded log {}", path.display()))?;
        let report = simulate::replay(config, BufReader::new(file))
            .with_context(|| format!("failed to replay {}", path.display()))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{report}");
        }
        return Ok(());
    }
    let Some(path) = &args.scenario else {
        bail!("simulate needs --scenario <file.toml> or --replay <log.jsonl>");
    };
    let text = fs::read_to_string(path)
        .with_context(|| format!("failed to read scenario {}", path.display()))?;
    let mut scenario = Scenario::from_toml(&text)
        .with_context(|| format!("failed to load scenario {}", path.display()))?;
    if let Some(r) = args.replications {
        scenario.replications = r;
    }
    if let Some(s) = args.seed {
        scenario.seed = s;
    }
    if scenario.name.is_empty() {
        scenario.name = path.display().to_string();
    }
    let report = simulate::run(&scenario).context("simulation failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
