//! How the CLI reaches NATS: flags, then `PATCHBAY_*` variables, then `.patchbay/env`
//! (written by `patchbay up`), always with the admin identity unless told otherwise.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use patchbay_bus::{Bus, BusConfig, Subjects};

use crate::envfile::{self, EnvFile};

/// Connection flags of every command that talks to the bus.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// NATS URL(s), comma-separated. Default: `PATCHBAY_NATS_URL` from `.patchbay/env`.
    #[arg(long = "nats", env = envfile::NATS_URL, global = true)]
    pub nats: Option<String>,
    /// CA certificate (PEM). Default: from `.patchbay/env`.
    #[arg(long = "nats-ca", env = envfile::NATS_CA, global = true)]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM). Default: the admin identity from `.patchbay/env`.
    #[arg(long = "nats-cert", env = envfile::NATS_CERT, global = true)]
    pub nats_cert: Option<PathBuf>,
    /// Client key (PEM). Default: the admin identity from `.patchbay/env`.
    #[arg(long = "nats-key", env = envfile::NATS_KEY, global = true)]
    pub nats_key: Option<PathBuf>,
    /// Prefix prepended to application subjects.
    #[arg(
        long = "subject-prefix",
        env = "PATCHBAY_SUBJECT_PREFIX",
        default_value = "",
        global = true
    )]
    pub subject_prefix: String,
    /// Local state directory (certificates, config, env file).
    #[arg(
        long = "state-dir",
        env = "PATCHBAY_STATE_DIR",
        default_value = ".patchbay",
        global = true
    )]
    pub state_dir: PathBuf,
}

impl ConnectionArgs {
    /// The connection configuration: flags and variables first, the env file second.
    pub fn bus_config(&self) -> anyhow::Result<BusConfig> {
        let env_path = self.state_dir.join("env");
        let file = EnvFile::load(&env_path)
            .with_context(|| format!("failed to read {}", env_path.display()))?;
        let pick = |flag: &Option<PathBuf>, name: &str| -> anyhow::Result<PathBuf> {
            match (flag, file.get(name)) {
                (Some(p), _) => Ok(p.clone()),
                (None, Some(v)) => Ok(PathBuf::from(v)),
                (None, None) => bail!(
                    "{name} is not set: run `make up` (it writes {}) or pass the flag",
                    env_path.display()
                ),
            }
        };
        let url = match (&self.nats, file.get(envfile::NATS_URL)) {
            (Some(u), _) => u.clone(),
            (None, Some(u)) => u.to_owned(),
            (None, None) => bail!(
                "no NATS URL: run `make up` (it writes {}) or pass --nats",
                env_path.display()
            ),
        };
        let mut config = BusConfig::new(
            "",
            pick(&self.nats_ca, envfile::NATS_CA)?,
            pick(&self.nats_cert, envfile::NATS_CERT)?,
            pick(&self.nats_key, envfile::NATS_KEY)?,
        )
        .name("patchbay-cli")
        .subjects(Subjects::new(self.subject_prefix.clone()).context("invalid subject prefix")?);
        config.servers = url.split(',').map(str::to_owned).collect();
        Ok(config)
    }

    /// Connect.
    pub async fn connect(&self) -> anyhow::Result<Bus> {
        let config = self.bus_config()?;
        patchbay_bus::connect(&config)
            .await
            .with_context(|| format!("failed to connect to NATS at {}", config.servers.join(",")))
    }
}
