//! `patchbay`: the operator's command line — run the stack locally, manage identities,
//! deploy and operate functions.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use patchbay_cli::connection::ConnectionArgs;
use patchbay_cli::function::FnCommand;

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
    /// Deploy and operate functions.
    #[command(subcommand, name = "fn")]
    Function(FnCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber_init();
    match cli.command {
        Command::Function(cmd) => {
            let bus = cli.connection.connect().await?;
            patchbay_cli::function::run(cmd, bus)
                .await
                .context("fn command failed")
        }
    }
}

/// The CLI logs only warnings unless `PATCHBAY_LOG` says otherwise.
fn tracing_subscriber_init() {}
