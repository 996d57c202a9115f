//! Logs, traces, metrics and the admin listener for every Patchbay binary.
//!
//! This crate is the **only** place in Patchbay that configures observability:
//!
//! * [`init`] installs the global `tracing` subscriber (an [`EnvFilter`](tracing_subscriber::EnvFilter),
//!   human or JSON logs on stderr, and the `tracing-opentelemetry` layer), the OpenTelemetry
//!   tracer provider (OTLP/HTTP export when [`TelemetryConfig::otlp`] is set) and the global
//!   W3C `traceparent` + `baggage` propagator that `runtime/bus` uses through
//!   `opentelemetry::global` to carry trace context across NATS hops;
//! * [`Metrics`] wraps the process's Prometheus registry, holds the naming rules and encodes
//!   `/metrics` in the classic text format or OpenMetrics; [`ExemplarHistogramVec`] and
//!   [`ExemplarCounterVec`] add trace-id exemplars to the OpenMetrics output;
//! * [`TelemetryGuard::register_metrics`] exposes the span exporter's own counters
//!   (`patchbay_telemetry_spans_exported_total`, `patchbay_telemetry_spans_dropped_total`);
//! * [`ServiceContext`] is what a process hands each service it runs (its registry, its
//!   readiness checks), alone or sharing the process with others;
//! * [`Health`] collects readiness checks; [`admin_router`] and [`serve_admin`] serve
//!   `/metrics`, `/healthz` and `/readyz` on a separate admin listener.
//!
//! It does not decide *what* is measured: crates register their own metrics through
//! [`Metrics::counter_vec`] and friends and open their own spans with `tracing`. It does not
//! read the environment either: binaries build a [`TelemetryConfig`] from their flags and pass
//! `|k| std::env::var(k).ok()` to [`OtlpConfig::from_otel_env`] /
//! [`TelemetryConfig::with_otel_env`] to honour the standard `OTEL_*` variables. (The
//! OpenTelemetry SDK itself still reads a few `OTEL_*` variables at build time — see
//! [`init`].) Command-line parsing belongs to the binaries.

mod admin;
mod config;
mod exemplar;
mod health;
mod metrics;
mod service;
mod span_export;
mod traces;

#[cfg(feature = "cli")]
pub mod args;
pub use admin::{admin_router, serve_admin};
#[cfg(feature = "cli")]
pub use args::{Started, TelemetryArgs, shutdown_signal};
pub use config::{LogFormat, OtlpConfig, OtlpProtocol, TelemetryConfig};
pub use exemplar::{
    ExemplarCounter, ExemplarCounterVec, ExemplarHistogram, ExemplarHistogramVec, sampled_trace_id,
};
pub use health::{Health, ReadyFlag};
pub use metrics::{
    CLASSIC_TEXT_CONTENT_TYPE, DURATION_BUCKETS_SECONDS, METRIC_PREFIX, Metrics,
    OPENMETRICS_CONTENT_TYPE, SERVICE_LABEL,
};
pub use service::ServiceContext;
pub use traces::{SPAN_QUEUE_CAPACITY, TelemetryGuard, init};

/// What can go wrong while setting up or running telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `log_filter` is not a valid `EnvFilter` directive.
    #[error("invalid log filter {filter:?}")]
    InvalidLogFilter {
        /// The directive as given.
        filter: String,
        /// Why it was rejected.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A standard `OTEL_*` variable has a value Patchbay cannot use.
    #[error("invalid value {value:?} for {variable}: {reason}")]
    InvalidOtelEnv {
        /// The variable name, e.g. `OTEL_TRACES_SAMPLER_ARG`.
        variable: String,
        /// The value found.
        value: String,
        /// What is expected instead.
        reason: String,
    },
    /// The sampling ratio is outside `0.0..=1.0`.
    #[error("sampling ratio {ratio} is outside 0.0..=1.0")]
    InvalidSamplingRatio {
        /// The ratio as given.
        ratio: f64,
    },
    /// The OTLP endpoint cannot be used by this build.
    #[error("unsupported OTLP endpoint {endpoint:?}: {reason}")]
    UnsupportedOtlpEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it is not supported.
        reason: &'static str,
    },
    /// The OTLP span exporter could not be built.
    #[error("failed to build the OTLP exporter for {endpoint:?}")]
    OtlpExporter {
        /// The traces endpoint.
        endpoint: String,
        /// The SDK's reason.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global `tracing` subscriber or `log` logger is already installed (init ran twice).
    #[error("telemetry is already initialised in this process")]
    AlreadyInitialized {
        /// The subscriber's reason.
        #[source]
        source: tracing_subscriber::util::TryInitError,
    },
    /// Flushing or shutting down the tracer provider failed (spans may be lost).
    #[error("failed to shut down the tracer provider: {reason}")]
    Shutdown {
        /// The SDK's reason.
        reason: String,
    },
    /// A metric name breaks the naming rules in [`Metrics`].
    #[error("invalid metric name {name:?}: {reason}")]
    InvalidMetricName {
        /// The metric name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// Prometheus refused to create or register a metric (bad name or labels, or a duplicate).
    #[error("failed to register metric {name:?}")]
    MetricRegistration {
        /// The metric name.
        name: String,
        /// Prometheus' reason.
        #[source]
        source: prometheus::Error,
    },
    /// The admin listener failed.
    #[error("admin listener on {address} failed")]
    AdminServe {
        /// The local address of the listener (`unknown` if it could not be read).
        address: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`TelemetryError`].
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;
