//! `patchbay-node`: run any set of Patchbay services in one process — all of them (the
//! monolith, the default), the services of one process of a topology file, or a
//! `--services` list.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use patchbay_node::topology::{ServiceKind, Topologies, parse_services};
use patchbay_node::{NodePlan, launch};
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Run Patchbay services in one process, each with its own identity.
#[derive(Debug, Parser)]
#[command(name = "patchbay-node", version, about)]
struct Cli {
    /// The services to run, e.g. `gateway,routing` (default: every service).
    #[arg(
        long,
        env = "PATCHBAY_NODE_SERVICES",
        value_delimiter = ',',
        conflicts_with = "topology"
    )]
    services: Vec<String>,
    /// Run the services of process `--process` of this topology (from `--topology-file`).
    #[arg(long, env = "PATCHBAY_TOPOLOGY", requires = "process")]
    topology: Option<String>,
    /// The process of `--topology` this is.
    #[arg(long, env = "PATCHBAY_PROCESS", requires = "topology")]
    process: Option<String>,
    /// The topology file.
    #[arg(
        long,
        env = "PATCHBAY_TOPOLOGY_FILE",
        default_value = "deploy/topology.toml"
    )]
    topology_file: PathBuf,
    /// Directory of the workload certificates (`<kind>-<name>.crt|.key`, `ca.crt`): each
    /// service connects with the one of its own identity.
    #[arg(long, env = "PATCHBAY_CERTS_DIR", default_value = ".patchbay/certs")]
    certs_dir: PathBuf,
    /// A flag for one service, `<service>=<flag>`, e.g. `routing=--rules=deploy/routing.toml`
    /// or `gateway=--listen=0.0.0.0:8080` (repeatable). Each service also reads its usual
    /// `PATCHBAY_*` variables.
    #[arg(long = "service-arg", value_name = "SERVICE=FLAG")]
    service_args: Vec<String>,
    /// Fault injection: `<service>=<duration>` makes that service's first run panic after
    /// the duration (to watch supervision work).
    #[arg(long = "inject-panic", value_name = "SERVICE=DURATION", hide = true)]
    inject_panic: Vec<String>,
    /// Process name (logs, traces).
    #[arg(long, env = "PATCHBAY_NODE_NAME", default_value = "node")]
    name: String,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let kinds: Vec<ServiceKind> = match (&cli.topology, &cli.process) {
        (Some(topology), Some(process)) => Topologies::load(&cli.topology_file)?
            .services(topology, process)?
            .to_vec(),
        _ if cli.services.is_empty() => ServiceKind::ALL.to_vec(),
        _ => parse_services(&cli.name, cli.services.iter().map(String::as_str))?,
    };
    let service_args = launch::service_args(&cli.service_args)?;
    let mut plan = NodePlan::new(&kinds, &service_args, &cli.certs_dir)?;
    for fault in &cli.inject_panic {
        let (service, after) = fault
            .split_once('=')
            .with_context(|| format!("--inject-panic {fault:?} is not <service>=<duration>"))?;
        let after: Duration = humantime::parse_duration(after)
            .with_context(|| format!("--inject-panic {fault:?}: bad duration"))?;
        plan.faults.push((service.parse()?, after));
    }
    let started = cli
        .telemetry
        .start("patchbay-node", &cli.name, |k| std::env::var(k).ok())
        .await
        .context("failed to start telemetry")?;
    patchbay_node::run(plan, &started.metrics, &started.health, shutdown_signal()).await
}
