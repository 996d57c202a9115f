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
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use patchbay_agents::engine::EngineConfig;
use patchbay_agents::simulate::{self, Scenario};
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

/// `run`: the service flags and the telemetry ones.
#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    service: patchbay_agents::service::Args,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn serve(args: RunArgs) -> Result<()> {
    let started = args
        .telemetry
        .start("patchbay-agents", &args.service.instance, |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let context = started.alone("agents");
    patchbay_agents::service::serve(args.service, context, shutdown_signal()).await
}

fn simulate(args: SimulateArgs) -> Result<()> {
    if let Some(path) = &args.replay {
        let config = match &args.engine_config {
            Some(p) => patchbay_agents::service::load_engine_config(p)?,
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
