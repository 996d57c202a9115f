//! [`init`]: the global `tracing` subscriber, the OpenTelemetry tracer provider (with or
//! without OTLP export) and the global W3C propagator; [`TelemetryGuard`] flushes on exit.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::resource::{ResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, OtlpConfig, OtlpProtocol, TelemetryConfig};
use crate::span_export::{BatchSettings, SpanExportMetrics, counting_batch_processor};
use crate::{Metrics, Result, TelemetryError};

/// Spans waiting for export. When the queue is full, finished spans are dropped instead of
/// blocking the code that ended them (the OpenTelemetry default size).
pub const SPAN_QUEUE_CAPACITY: usize = 2048;
/// Spans per export request (the OpenTelemetry default).
const EXPORT_BATCH_SIZE: usize = 512;
/// How often the batch processor exports when the queue is not yet a batch long.
const EXPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on the flush at shutdown, so a dead collector cannot hang process exit for long.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Instrumentation scope of the spans bridged from `tracing`.
const TRACER_NAME: &str = "patchbay";

/// Installs telemetry for the whole process. Call once, early in `main`, and keep the guard
/// alive until exit (dropping it flushes queued spans).
///
/// What it installs:
///
/// * a global `tracing` subscriber: `cfg.log_filter` (applies to logs *and* spans), a log
///   layer on stderr in `cfg.log_format`, and the `tracing-opentelemetry` layer, plus the
///   `log` → `tracing` bridge;
/// * a global OpenTelemetry tracer provider with resource attributes `service.name`,
///   `service.version`, `service.instance.id` and `telemetry.sdk.*`;
/// * the global text-map propagator: W3C TraceContext + Baggage, so `runtime/bus` can
///   inject/extract `traceparent`, `tracestate` and `baggage` via `opentelemetry::global`.
///
/// **Export on** (`cfg.otlp` is `Some`): spans go through a batch processor to OTLP/HTTP
/// (protobuf). The processor has its own thread and a bounded queue of
/// [`SPAN_QUEUE_CAPACITY`] spans; ending a span only tries to enqueue it, so a slow or dead
/// collector costs dropped spans, never latency on the hot path. Every span's fate is
/// counted — `patchbay_telemetry_spans_exported_total` and
/// `patchbay_telemetry_spans_dropped_total{reason="queue_full"|"export_failed"}` — once the
/// binary calls [`TelemetryGuard::register_metrics`] with its registry (both stay 0 with
/// export off).
/// New traces are sampled with `parentbased_traceidratio(sampling_ratio)`.
///
/// **Export off** (`cfg.otlp` is `None`): the same layer runs over a tracer provider with no
/// span processor and a `parentbased_always_on` sampler, so every span still gets real trace
/// and span ids, `Span::current()` carries an OpenTelemetry context, the bus can inject a
/// valid `traceparent`, and a later hop that does export sees a sampled parent instead of a
/// broken trace. The cost is the bookkeeping of each span that passes `log_filter`: the
/// bridge builds its OpenTelemetry span (ids, attributes, events), which is then discarded
/// when it ends — a few allocations per span, no I/O and no background thread. Raise the
/// filter level to cut it.
///
/// Not read from the environment here: everything in `cfg`. The SDK itself still honours
/// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` (added to `otlp.headers`),
/// `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION` and `OTEL_SPAN_*_COUNT_LIMIT` when building;
/// endpoint, protocol, timeout, sampler, batch sizes and resource come from `cfg` only.
///
/// Errors: a bad `log_filter`, a sampling ratio outside `0.0..=1.0`, an `https://` or
/// malformed endpoint (this build has no TLS client for OTLP), or a second call in the same
/// process ([`TelemetryError::AlreadyInitialized`]; nothing global is changed then).
pub fn init(cfg: &TelemetryConfig) -> Result<TelemetryGuard> {
    let filter =
        EnvFilter::try_new(&cfg.log_filter).map_err(|source| TelemetryError::InvalidLogFilter {
            filter: cfg.log_filter.clone(),
            source,
        })?;
    // The exporter's HTTP client (reqwest, built without a crypto provider of its own)
    // takes the process-wide rustls provider; this workspace builds rustls with ring
    // only, so make that the default unless the binary already chose one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let span_metrics = SpanExportMetrics::new()?;
    let provider = tracer_provider(cfg, &span_metrics)?;

    let (human, json) = match cfg.log_format {
        LogFormat::Human => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .with_span_list(false),
            ),
        ),
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(TRACER_NAME))
        // busy/idle nanosecond attributes on every span are noise for Patchbay's spans.
        .with_tracked_inactivity(false);

    // The subscriber goes first: if another one is already installed, fail before touching
    // the OpenTelemetry globals.
    tracing_subscriber::registry()
        .with(filter)
        .with(human)
        .with(json)
        .with(otel)
        .try_init()
        .map_err(|source| TelemetryError::AlreadyInitialized { source })?;

    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    opentelemetry::global::set_tracer_provider(provider.clone());

    Ok(TelemetryGuard {
        provider: Some(provider),
        exporting: cfg.otlp.is_some(),
        span_metrics,
    })
}

fn tracer_provider(
    cfg: &TelemetryConfig,
    span_metrics: &SpanExportMetrics,
) -> Result<SdkTracerProvider> {
    let resource = Resource::builder_empty()
        // telemetry.sdk.{name,language,version}; the env-reading detectors are left out.
        .with_attributes(
            TelemetryResourceDetector
                .detect()
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(cfg.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", cfg.service_version.clone()),
            KeyValue::new("service.instance.id", cfg.instance_id.clone()),
        ])
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(otlp) = &cfg.otlp else {
        return Ok(builder
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .build());
    };
    let ratio = otlp.sampling_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(TelemetryError::InvalidSamplingRatio { ratio });
    }
    // Each export request is bounded by the exporter's `otlp.timeout`.
    let processor = counting_batch_processor(
        span_exporter(otlp)?,
        BatchSettings {
            capacity: SPAN_QUEUE_CAPACITY,
            batch_size: EXPORT_BATCH_SIZE,
            interval: EXPORT_INTERVAL,
        },
        span_metrics.clone(),
    );
    Ok(builder
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .build())
}

fn span_exporter(otlp: &OtlpConfig) -> Result<opentelemetry_otlp::SpanExporter> {
    if !otlp.endpoint.starts_with("http://") {
        return Err(TelemetryError::UnsupportedOtlpEndpoint {
            endpoint: otlp.endpoint.clone(),
            reason: "expected an http:// URL (this build has no TLS client for OTLP; \
                     use a local collector)",
        });
    }
    let protocol = match otlp.protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
    };
    // The exporter percent-decodes header values; our values are already decoded, so a
    // literal '%' must survive that second pass.
    let headers: HashMap<String, String> = otlp
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace('%', "%25")))
        .collect();
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(otlp.endpoint.clone())
        .with_protocol(protocol)
        .with_timeout(otlp.timeout)
        .with_headers(headers)
        .build()
        .map_err(|source| TelemetryError::OtlpExporter {
            endpoint: otlp.endpoint.clone(),
            source,
        })
}

/// Keeps the tracer provider alive; dropping it flushes queued spans and shuts the provider
/// down (bounded by a 5 s timeout). Logs stay on after that; new spans get no trace ids.
#[derive(Debug)]
#[must_use = "dropping the guard shuts tracing down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
    span_metrics: SpanExportMetrics,
}

impl TelemetryGuard {
    /// Registers the span exporter's counters in `metrics` (the registry `/metrics`
    /// serves): `patchbay_telemetry_spans_exported_total` and
    /// `patchbay_telemetry_spans_dropped_total{reason}`. Call once per registry.
    pub fn register_metrics(&self, metrics: &Metrics) -> Result<()> {
        self.span_metrics.register(metrics)
    }

    /// Whether spans are exported over OTLP (`false`: trace context only).
    #[must_use]
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes and shuts down now, reporting failure (e.g. the collector was unreachable)
    /// instead of logging it as `Drop` does.
    pub fn shutdown(mut self) -> Result<()> {
        match self.provider.take() {
            Some(provider) => shutdown(&provider),
            None => Ok(()),
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = shutdown(&provider)
        {
            tracing::warn!(error = %err, "telemetry shutdown incomplete; some spans may be lost");
        }
    }
}

fn shutdown(provider: &SdkTracerProvider) -> Result<()> {
    provider
        .shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        .map_err(|err| TelemetryError::Shutdown {
            reason: err.to_string(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn rejects_https_endpoint_before_touching_globals() {
        let mut cfg = TelemetryConfig::new("t", "0", "i");
        cfg.otlp = Some(OtlpConfig::new("https://collector:4318/v1/traces"));
        let err = init(&cfg).unwrap_err();
        assert!(
            matches!(err, TelemetryError::UnsupportedOtlpEndpoint { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_sampling_ratio_out_of_range() {
        let mut cfg = TelemetryConfig::new("t", "0", "i");
        let mut otlp = OtlpConfig::new("http://127.0.0.1:4318/v1/traces");
        otlp.sampling_ratio = 2.0;
        cfg.otlp = Some(otlp);
        let err = init(&cfg).unwrap_err();
        assert!(
            matches!(err, TelemetryError::InvalidSamplingRatio { ratio } if ratio == 2.0),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_bad_log_filter() {
        let mut cfg = TelemetryConfig::new("t", "0", "i");
        cfg.log_filter = "info,=[".to_owned();
        let err = init(&cfg).unwrap_err();
        assert!(
            matches!(err, TelemetryError::InvalidLogFilter { .. }),
            "{err:?}"
        );
    }
}
