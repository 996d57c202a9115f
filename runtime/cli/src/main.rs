//! `patchbay`: the operator's command line — run the stack locally, manage identities,
//! bootstrap JetStream, deploy and operate functions.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use patchbay_cli::connection::ConnectionArgs;
use patchbay_cli::function::FnCommand;
use patchbay_cli::resilience::ResilienceCommand;
use patchbay_cli::token::TokenCommand;
use patchbay_cli::up::UpArgs;
use patchbay_control::certs::{CertAuthority, Identity, Validity};
use patchbay_control::local::{self, StateDir};

/// Patchbay: one NATS bus for core services and WebAssembly functions.
#[derive(Debug, Parser)]
#[command(name = "patchbay", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system locally (nats-server, bootstrap, runtime nodes, examples).
    Up(UpArgs),
    /// Dev certificate authority and workload certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Create or update the JetStream assets of deploy/streams.toml (admin).
    Bootstrap {
        /// Directory with `streams.toml`.
        #[arg(long, default_value = "deploy")]
        deploy_dir: PathBuf,
    },
    /// Deploy and operate functions.
    #[command(subcommand, name = "fn")]
    Function(FnCommand),
    /// API tokens for the HTTP gateway: create, list, revoke (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Timeouts, retries, budgets, breakers and limits per target: apply
    /// deploy/resilience.toml, show what is stored (admin).
    #[command(subcommand)]
    Resilience(ResilienceCommand),
    /// Every running service, runtime node and gateway ($SRV discovery) and every
    /// function, with versions, health, rates and errors.
    Status(patchbay_cli::status::StatusArgs),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the dev CA (idempotent).
    Init {
        /// SPIFFE trust domain.
        #[arg(long, default_value = patchbay_control::certs::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a workload certificate, e.g. `runtime/node-3`.
    Issue {
        /// `kind/name`.
        identity: Identity,
        /// Validity in days.
        #[arg(long, default_value_t = patchbay_control::certs::DEFAULT_VALIDITY_DAYS)]
        days: i64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    let state = StateDir(cli.connection.state_dir.clone());
    match cli.command {
        Command::Up(args) => patchbay_cli::up::run(args, &cli.connection.state_dir).await,
        Command::Certs(CertsCommand::Init { trust_domain }) => {
            let ca = CertAuthority::init(
                &state.certs(),
                &trust_domain,
                Validity::days(patchbay_control::certs::DEFAULT_CA_VALIDITY_DAYS),
            )
            .context("failed to create the CA")?;
            println!("CA for {trust_domain} at {}", ca.cert_path().display());
            Ok(())
        }
        Command::Certs(CertsCommand::Issue { identity, days }) => {
            let ca = CertAuthority::load(&state.certs())
                .context("no CA yet: run `patchbay certs init` first")?;
            let issued = ca
                .issue(&identity, &state.certs(), Validity::days(days))
                .with_context(|| format!("failed to issue a certificate for {identity}"))?;
            println!(
                "{} ({}) → {} + {}",
                identity,
                identity.spiffe_id(ca.trust_domain()),
                issued.cert.display(),
                issued.key.display()
            );
            Ok(())
        }
        Command::Bootstrap { deploy_dir } => {
            let bus = cli.connection.connect().await?;
            let report = local::bootstrap(&bus, &deploy_dir).await?;
            println!("{report}");
            Ok(())
        }
        Command::Function(cmd) => {
            let bus = cli.connection.connect().await?;
            patchbay_cli::function::run(cmd, bus)
                .await
                .context("fn command failed")
        }
        Command::Token(cmd) => {
            let bus = cli.connection.connect().await?;
            patchbay_cli::token::run(cmd, bus)
                .await
                .context("token command failed")
        }
        Command::Resilience(cmd) => {
            let bus = cli.connection.connect().await?;
            patchbay_cli::resilience::run(cmd, bus)
                .await
                .context("resilience command failed")
        }
        Command::Status(args) => {
            let bus = cli.connection.connect().await?;
            patchbay_cli::status::run(args, bus)
                .await
                .context("status failed")
        }
    }
}

/// Warnings only, unless `PATCHBAY_LOG` says otherwise: the CLI's output is its answer.
fn init_logging() {
    let filter = std::env::var("PATCHBAY_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}
