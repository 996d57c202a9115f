//! Command-line flags for a bus connection, shared by every Patchbay binary (feature
//! `cli`). Each flag is also read from a `PATCHBAY_*` environment variable.

use std::path::PathBuf;

use crate::client::BusConfig;
use crate::subject::{SubjectError, Subjects};

/// Where NATS is and which identity to present.
#[derive(Debug, Clone, clap::Args)]
pub struct BusArgs {
    /// NATS server URL(s), comma-separated, e.g. `tls://127.0.0.1:4222`.
    #[arg(long = "nats", env = "PATCHBAY_NATS_URL", value_delimiter = ',')]
    pub nats: Vec<String>,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long = "nats-ca", env = "PATCHBAY_NATS_CA")]
    pub ca: PathBuf,
    /// This workload's client certificate (PEM), carrying its SPIFFE id.
    #[arg(long = "nats-cert", env = "PATCHBAY_NATS_CERT")]
    pub cert: PathBuf,
    /// This workload's private key (PEM).
    #[arg(long = "nats-key", env = "PATCHBAY_NATS_KEY")]
    pub key: PathBuf,
    /// Prefix prepended to every application subject, e.g. `acme.`.
    #[arg(
        long = "subject-prefix",
        env = "PATCHBAY_SUBJECT_PREFIX",
        default_value = ""
    )]
    pub subject_prefix: String,
    /// Most handlers one event may pass through (functions, services) before it is
    /// refused as a loop: dead-lettered on streams, an error reply on core subjects.
    #[arg(long = "max-hops", env = "PATCHBAY_MAX_HOPS", default_value_t = crate::hops::DEFAULT_MAX_HOPS)]
    pub max_hops: usize,
    /// How often to look for a renewed certificate and key in the files above and
    /// reconnect with them (`0s`: never), e.g. `30s`.
    #[arg(long = "cert-reload-interval", env = "PATCHBAY_CERT_RELOAD_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cert_reload_interval: std::time::Duration,
}

/// Why [`BusArgs::service_config`] could not build a service's connection.
#[derive(Debug, thiserror::Error)]
pub enum ServiceConfigError {
    /// `--subject-prefix` is not a valid prefix.
    #[error("invalid subject prefix")]
    Prefix(#[from] SubjectError),
    /// The bus metrics could not be registered.
    #[error("failed to register bus metrics")]
    Metrics(#[from] patchbay_telemetry::TelemetryError),
}

impl BusArgs {
    /// A service's connection: named `<binary>/<instance>` (what the server's connection
    /// list and the CloudEvents `source` show), its bus metrics registered in `metrics`.
    /// What every service's entry point starts with.
    pub fn service_config(
        &self,
        binary: &str,
        instance: &str,
        metrics: &patchbay_telemetry::Metrics,
    ) -> Result<BusConfig, ServiceConfigError> {
        Ok(self
            .config(format!("{binary}/{instance}"))?
            .metrics(crate::trace::BusMetrics::register(metrics)?))
    }

    /// The connection configuration, named `name`.
    pub fn config(&self, name: impl Into<String>) -> Result<BusConfig, SubjectError> {
        let mut config = BusConfig::new("", &self.ca, &self.cert, &self.key)
            .name(name)
            .subjects(Subjects::new(self.subject_prefix.clone())?)
            .max_hops(self.max_hops)
            .cert_reload(Some(self.cert_reload_interval).filter(|d| !d.is_zero()));
        config.servers.clone_from(&self.nats);
        Ok(config)
    }
}
