//! Command-line flags for logging and the admin listener, shared by every Patchbay binary
//! (feature `cli`). Each flag is also read from a `PATCHBAY_*` environment variable; the
//! OTLP exporter is configured by the standard `OTEL_EXPORTER_OTLP_*` variables, which
//! the binary passes in with [`TelemetryArgs::config`], or by `--otlp-endpoint` and
//! `--trace-sampling`, which override them.

use std::net::SocketAddr;

use crate::config::{LogFormat, TelemetryConfig};
use crate::{
    Health, Metrics, ServiceContext, TelemetryError, TelemetryGuard, admin_router, serve_admin,
};

/// Logging and admin-listener flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log format: `human` or `json`.
    #[arg(long, env = "PATCHBAY_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,patchbay_host=debug`.
    #[arg(long, env = "PATCHBAY_LOG", default_value = "info")]
    pub log: String,
    /// Address of the admin listener serving /metrics, /healthz and /readyz.
    #[arg(long, env = "PATCHBAY_ADMIN_LISTEN", default_value = "127.0.0.1:0")]
    pub admin_listen: SocketAddr,
    /// Export traces over OTLP/HTTP to this base URL (`/v1/traces` is appended), e.g.
    /// `http://127.0.0.1:4318`. Overrides `OTEL_EXPORTER_OTLP_ENDPOINT`; the other
    /// `OTEL_EXPORTER_OTLP_*` variables (headers, timeout) still apply.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces to sample, `0.0..=1.0` (parent-based). Overrides
    /// `OTEL_TRACES_SAMPLER_ARG`.
    #[arg(long)]
    pub trace_sampling: Option<f64>,
}

impl TelemetryArgs {
    /// The telemetry configuration for `service` (instance `instance`), with OTLP export
    /// taken from the `OTEL_*` variables `lookup` returns.
    pub fn config(
        &self,
        service: &str,
        instance: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> crate::Result<TelemetryConfig> {
        let mut config = TelemetryConfig::new(service, env!("CARGO_PKG_VERSION"), instance);
        config.log_format = if self.log_format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Human
        };
        config.log_filter.clone_from(&self.log);
        // Flags win over the standard variables: present them to the same parser as if
        // they were those variables, so both paths validate alike.
        let endpoint = self.otlp_endpoint.clone();
        let sampling = self.trace_sampling.map(|r| r.to_string());
        config.with_otel_env(|key| match key {
            "OTEL_EXPORTER_OTLP_ENDPOINT" if endpoint.is_some() => endpoint.clone(),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if endpoint.is_some() => None,
            "OTEL_TRACES_SAMPLER_ARG" if sampling.is_some() => sampling.clone(),
            _ => lookup(key),
        })
    }
}

/// What every binary starts with: telemetry installed (keep `guard` alive until exit), the
/// process's metrics registry (with the span-export counters) and its readiness checks.
#[derive(Debug)]
pub struct Started {
    /// Flushes queued spans when dropped.
    pub guard: TelemetryGuard,
    /// The process's registry, served on `/metrics`.
    pub metrics: Metrics,
    /// The process's readiness checks, served on `/readyz` (none yet: the service
    /// registers its own through [`Started::alone`]).
    pub health: Health,
}

impl Started {
    /// The context of `service` as the only service of this process.
    #[must_use]
    pub fn alone(&self, service: &str) -> ServiceContext {
        ServiceContext::alone(service, self.metrics.clone(), self.health.clone())
    }
}

impl TelemetryArgs {
    /// The start-up every Patchbay binary shares: install telemetry for `service`
    /// (instance `instance`, OTLP from the `OTEL_*` variables `lookup` returns and the
    /// flags), create the metrics registry and the readiness checks, and serve `/metrics`, `/healthz` and `/readyz` on `--admin-listen` until SIGINT/SIGTERM.
    pub async fn start(
        &self,
        service: &str,
        instance: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> crate::Result<Started> {
        let guard = crate::init(&self.config(service, instance, lookup)?)?;
        let metrics = Metrics::new();
        guard.register_metrics(&metrics)?;
        let health = Health::new();
        let admin_error = |source| TelemetryError::AdminServe {
            address: self.admin_listen.to_string(),
            source,
        };
        let admin = tokio::net::TcpListener::bind(self.admin_listen)
            .await
            .map_err(admin_error)?;
        let address = admin.local_addr().map_err(admin_error)?;
        tracing::info!(%address, "admin listener (/metrics, /healthz, /readyz)");
        tokio::spawn(serve_admin(
            admin,
            admin_router(metrics.clone(), health.clone()),
            shutdown_signal(),
        ));
        Ok(Started {
            guard,
            metrics,
            health,
        })
    }
}

/// Resolves on SIGINT or SIGTERM: the shutdown signal every binary drains on.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        telemetry: TelemetryArgs,
    }

    fn env(key: &str) -> Option<String> {
        match key {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://from-env:4318".into()),
            "OTEL_TRACES_SAMPLER_ARG" => Some("0.5".into()),
            _ => None,
        }
    }

    #[test]
    fn otlp_flags_override_the_standard_variables() {
        let cli = Cli::parse_from([
            "bin",
            "--otlp-endpoint",
            "http://from-flag:4318",
            "--trace-sampling",
            "0.25",
        ]);
        let otlp = cli.telemetry.config("svc", "i", env).unwrap().otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://from-flag:4318/v1/traces");
        assert!((otlp.sampling_ratio - 0.25).abs() < f64::EPSILON);
    }

    #[test]
    fn without_flags_the_standard_variables_apply() {
        let cli = Cli::parse_from(["bin"]);
        let otlp = cli.telemetry.config("svc", "i", env).unwrap().otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://from-env:4318/v1/traces");
        assert!((otlp.sampling_ratio - 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn an_out_of_range_sampling_flag_is_refused() {
        let cli = Cli::parse_from(["bin", "--trace-sampling", "1.5"]);
        assert!(cli.telemetry.config("svc", "i", env).is_err());
    }
}
