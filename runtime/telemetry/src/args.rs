//! Command-line flags for logging and the admin listener, shared by every Patchbay binary
//! (feature `cli`). Each flag is also read from a `PATCHBAY_*` environment variable; the
//! OTLP exporter is configured by the standard `OTEL_EXPORTER_OTLP_*` variables, which
//! the binary passes in with [`TelemetryArgs::config`].

use std::net::SocketAddr;

use crate::config::{LogFormat, TelemetryConfig};

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
        config.with_otel_env(lookup)
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
