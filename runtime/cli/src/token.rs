//! `patchbay token …`: create, list and revoke the API tokens HTTP callers present to the
//! gateway. The token is printed once, at creation; the bucket keeps only its hash, so
//! `ls` can show names, scopes and expiry but never a secret.
//!
//! The store itself (format, hashing, scopes, caching) is `patchbay_gateway::token`; this
//! module is the operator's side of it, plus [`create_token`] for `patchbay up`'s dev
//! token.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use patchbay_bus::{Bus, Clock as _, SystemClock};
use serde_json::json;

pub use patchbay_gateway::token::{
    AuthError, NewToken, Scope, TOKENS_BUCKET, TokenRecord, TokenStore, token_key,
};

/// `patchbay token` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create an API token and print it — once: only its hash is stored.
    Create(CreateArgs),
    /// List API tokens (ids, names, scopes, expiry; never secrets).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token by id; gateways refuse it within about a second.
    Revoke {
        /// The token id (the `<id>` in `pbt_<id>_<secret>`, shown by `token ls`).
        id: String,
    },
}

/// `patchbay token create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// A label for people (`crm`, `dashboard`).
    #[arg(long)]
    pub name: String,
    /// What the token allows: `publish:<subject-pattern>` (NATS wildcards `*`, `>`),
    /// `invoke:<function>` (`invoke:*` for all) or `admin`. Repeat for several.
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    pub scopes: Vec<Scope>,
    /// Lifetime, e.g. `30d`, `12h` (default: never expires).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires: Option<Duration>,
    /// Requests per second (default: the gateway's).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Burst size in requests (default: the gateway's).
    #[arg(long)]
    pub burst: Option<u32>,
    /// Print JSON: `{"token", "id", "name", "scopes", "expires_at_ms"}`.
    #[arg(long)]
    pub json: bool,
}

/// Run a `patchbay token` command.
pub async fn run(command: TokenCommand, bus: Bus) -> anyhow::Result<()> {
    let store = open(&bus).await?;
    match command {
        TokenCommand::Create(args) => create(&store, args).await,
        TokenCommand::Ls { json } => ls(&store, json).await,
        TokenCommand::Revoke { id } => {
            if !store
                .revoke(&id)
                .await
                .with_context(|| format!("failed to revoke token {id:?}"))?
            {
                bail!("no token with id {id:?} (see `patchbay token ls`)");
            }
            println!("revoked token {id}");
            Ok(())
        }
    }
}

/// Create a token on `bus` (which needs write access to the token bucket — the admin
/// identity) and return it; for `patchbay up`'s dev token.
pub async fn create_token(
    bus: &Bus,
    name: &str,
    scopes: Vec<Scope>,
    expires: Option<Duration>,
) -> anyhow::Result<String> {
    let store = open(bus).await?;
    let mut spec = NewToken::new(name, scopes);
    spec.expires_in = expires;
    let (token, _) = store
        .create(spec, SystemClock.now_millis())
        .await
        .with_context(|| format!("failed to create token {name:?}"))?;
    Ok(token)
}

async fn open(bus: &Bus) -> anyhow::Result<TokenStore> {
    TokenStore::open(bus)
        .await
        .context("failed to open the token store (did `patchbay up` bootstrap it?)")
}

async fn create(store: &TokenStore, args: CreateArgs) -> anyhow::Result<()> {
    let spec = NewToken {
        name: args.name,
        scopes: args.scopes,
        expires_in: args.expires,
        rate_per_sec: args.rate,
        burst: args.burst,
    };
    let name = spec.name.clone();
    let (token, record) = store
        .create(spec, SystemClock.now_millis())
        .await
        .with_context(|| format!("failed to create token {name:?}"))?;
    if args.json {
        println!(
            "{}",
            json!({ "token": token, "id": record.id, "name": record.name,
                    "scopes": record.scopes, "expires_at_ms": record.expires_at_ms })
        );
        return Ok(());
    }
    println!("{token}");
    println!();
    println!("id:      {}", record.id);
    println!("name:    {}", record.name);
    println!("scopes:  {}", scopes_text(&record.scopes));
    println!("expires: {}", expiry_text(record.expires_at_ms));
    println!("This is the only time the token is shown; only its hash is stored.");
    Ok(())
}

async fn ls(store: &TokenStore, json: bool) -> anyhow::Result<()> {
    let records = store.list().await.context("failed to list tokens")?;
    if json {
        println!("{}", serde_json::to_string(&records)?);
        return Ok(());
    }
    let now = SystemClock.now_millis();
    println!(
        "{:<8} {:<20} {:<24} {:<24} SCOPES",
        "ID", "NAME", "CREATED", "EXPIRES"
    );
    for r in &records {
        let expires = match r.expires_at_ms {
            Some(_) if r.is_expired(now) => format!("{} (expired)", expiry_text(r.expires_at_ms)),
            _ => expiry_text(r.expires_at_ms),
        };
        println!(
            "{:<8} {:<20} {:<24} {:<24} {}",
            r.id,
            r.name,
            rfc3339(r.created_at_ms),
            expires,
            scopes_text(&r.scopes)
        );
    }
    Ok(())
}

fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn expiry_text(expires_at_ms: Option<u64>) -> String {
    expires_at_ms.map_or_else(|| "never".to_owned(), rfc3339)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Whether `token` is still accepted (known, not revoked, not expired): `patchbay up`
/// keeps the dev token of an earlier run while it works.
pub async fn is_valid(bus: &Bus, token: &str) -> bool {
    match open(bus).await {
        Ok(store) => store
            .authenticate(token, SystemClock.now_millis())
            .await
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_and_no_expiry_as_never() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(expiry_text(Some(86_400_000)), "1970-01-02T00:00:00Z");
        assert_eq!(expiry_text(None), "never");
    }

    #[test]
    fn scope_flags_parse_and_refuse_with_the_scope_error() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            token: TokenCommand,
        }
        let ok = Cli::try_parse_from([
            "t",
            "create",
            "--name",
            "crm",
            "--scope",
            "publish:cc.v1.>",
            "--scope",
            "invoke:*",
            "--expires",
            "30d",
        ])
        .unwrap();
        match ok.token {
            TokenCommand::Create(args) => {
                assert_eq!(args.scopes.len(), 2);
                assert_eq!(args.expires, Some(Duration::from_secs(30 * 86_400)));
            }
            other => panic!("{other:?}"),
        }
        let err = Cli::try_parse_from(["t", "create", "--name", "crm", "--scope", "publish:"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scope \"publish:\" has an empty subject pattern"),
            "{err}"
        );
    }
}
