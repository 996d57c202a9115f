//! Counting the fate of every finished span: exported, or dropped (queue full, export
//! failed). The OpenTelemetry SDK (0.33) keeps its own dropped count private, so
//! [`CountingProcessor`] wraps its `BatchSpanProcessor` and holds the bound itself.
//!
//! The bound: a span counts as *pending* from `on_end` until the batch thread hands it to
//! the exporter. `on_end` admits a span only while fewer than `capacity` are pending, and
//! the wrapped processor's own queue has the same capacity, so the SDK never drops a span
//! this module did not count. Admission is one atomic add; `on_end` never waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::{Metrics, Result, TelemetryError};

const EXPORTED: &str = "patchbay_telemetry_spans_exported_total";
const DROPPED: &str = "patchbay_telemetry_spans_dropped_total";

/// The exporter's counters, created by `init` before any registry exists and registered
/// later by [`crate::TelemetryGuard::register_metrics`].
#[derive(Clone, Debug)]
pub(crate) struct SpanExportMetrics {
    exported: IntCounter,
    dropped: IntCounterVec,
    queue_full: IntCounter,
    export_failed: IntCounter,
}

impl SpanExportMetrics {
    pub(crate) fn new() -> Result<Self> {
        let exported = IntCounter::with_opts(Opts::new(
            EXPORTED,
            "Finished spans the OTLP exporter accepted.",
        ))
        .map_err(|source| registration(EXPORTED, source))?;
        let dropped = IntCounterVec::new(
            Opts::new(
                DROPPED,
                "Finished spans lost instead of exported, by reason (queue_full: the export \
                 queue was full when the span ended; export_failed: the collector refused or \
                 did not answer).",
            ),
            &["reason"],
        )
        .map_err(|source| registration(DROPPED, source))?;
        Ok(Self {
            queue_full: dropped.with_label_values(&["queue_full"]),
            export_failed: dropped.with_label_values(&["export_failed"]),
            exported,
            dropped,
        })
    }

    pub(crate) fn register(&self, metrics: &Metrics) -> Result<()> {
        metrics.register_checked(EXPORTED, true, self.exported.clone())?;
        metrics.register_checked(DROPPED, true, self.dropped.clone())?;
        Ok(())
    }
}

fn registration(name: &str, source: prometheus::Error) -> TelemetryError {
    TelemetryError::MetricRegistration {
        name: name.to_owned(),
        source,
    }
}

/// What the processor and its exporter share.
#[derive(Debug)]
struct Queue {
    /// Spans admitted by `on_end` and not yet handed to the exporter.
    pending: AtomicUsize,
    capacity: usize,
    metrics: SpanExportMetrics,
}

/// A batch span processor whose queue bound and outcomes are counted.
#[derive(Debug)]
pub(crate) struct CountingProcessor<P> {
    inner: P,
    queue: Arc<Queue>,
}

/// Batch settings for [`counting_batch_processor`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchSettings {
    /// Spans waiting for export at most.
    pub(crate) capacity: usize,
    /// Spans per export request.
    pub(crate) batch_size: usize,
    /// Export at least this often.
    pub(crate) interval: Duration,
}

/// A `BatchSpanProcessor` over `exporter` with `settings`, counted into `metrics`.
pub(crate) fn counting_batch_processor<E>(
    exporter: E,
    settings: BatchSettings,
    metrics: SpanExportMetrics,
) -> CountingProcessor<BatchSpanProcessor>
where
    E: SpanExporter + 'static,
{
    let queue = Arc::new(Queue {
        pending: AtomicUsize::new(0),
        capacity: settings.capacity,
        metrics,
    });
    let exporter = CountingExporter {
        inner: exporter,
        queue: Arc::clone(&queue),
    };
    let inner = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            // Sizes set explicitly: the builder's defaults read OTEL_BSP_* variables.
            BatchConfigBuilder::default()
                .with_max_queue_size(settings.capacity)
                .with_max_export_batch_size(settings.batch_size)
                .with_scheduled_delay(settings.interval)
                .build(),
        )
        .build();
    CountingProcessor { inner, queue }
}

impl<P: SpanProcessor> SpanProcessor for CountingProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let queue = &self.queue;
        if queue.pending.fetch_add(1, Ordering::AcqRel) >= queue.capacity {
            queue.pending.fetch_sub(1, Ordering::AcqRel);
            queue.metrics.queue_full.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter side: releases queue places and counts each batch's outcome.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queue: Arc<Queue>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        // The batch has left the processor's queue: make room before the (slow) export.
        self.queue.pending.fetch_sub(n, Ordering::AcqRel);
        let export = self.inner.export(batch);
        let queue = Arc::clone(&self.queue);
        async move {
            let result = export.await;
            let counter = if result.is_ok() {
                &queue.metrics.exported
            } else {
                &queue.metrics.export_failed
            };
            counter.inc_by(n as u64);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// Accepts (or refuses) every batch at once.
    #[derive(Debug)]
    struct Collector {
        accept: bool,
    }

    impl SpanExporter for Collector {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            if self.accept {
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure("collector down".into()))
            }
        }
    }

    /// A provider whose batch thread only exports on flush (long interval, batches larger
    /// than the queue), so what fits in the queue is deterministic.
    fn provider(accept: bool, capacity: usize) -> (SdkTracerProvider, SpanExportMetrics) {
        let metrics = SpanExportMetrics::new().unwrap();
        let settings = BatchSettings {
            capacity,
            batch_size: capacity + 1,
            interval: Duration::from_secs(3600),
        };
        let processor = counting_batch_processor(Collector { accept }, settings, metrics.clone());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        (provider, metrics)
    }

    fn end_spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("test");
        for _ in 0..n {
            tracer.start("work").end();
        }
    }

    #[test]
    fn spans_beyond_the_queue_capacity_are_counted_as_dropped() {
        let (provider, metrics) = provider(true, 4);
        end_spans(&provider, 10);
        // The SDK caps its batch size at the queue size, so its export thread may take a
        // full queue away while spans are still ending: how many are dropped depends on
        // that thread's timing, but every span is either exported or counted as dropped,
        // and never more than the queue's capacity waits at once.
        let dropped = metrics.queue_full.get();
        assert!(
            dropped <= 6,
            "at least the capacity is admitted: {dropped} dropped"
        );
        provider.force_flush().unwrap();
        assert_eq!(metrics.exported.get() + dropped, 10);
        // Exporting freed the queue: the next spans are admitted again.
        let exported = metrics.exported.get();
        end_spans(&provider, 2);
        provider.force_flush().unwrap();
        assert_eq!(metrics.exported.get(), exported + 2);
        assert_eq!(metrics.queue_full.get(), dropped);
        provider.shutdown().unwrap();
    }

    #[test]
    fn spans_the_collector_refuses_are_counted_as_export_failures() {
        let (provider, metrics) = provider(false, 8);
        end_spans(&provider, 3);
        assert!(provider.force_flush().is_err());
        assert_eq!(metrics.export_failed.get(), 3);
        assert_eq!(metrics.exported.get(), 0);
        let _ = provider.shutdown();
    }

    #[test]
    fn counters_register_under_their_documented_names() {
        let registry = Metrics::new();
        SpanExportMetrics::new()
            .unwrap()
            .register(&registry)
            .unwrap();
        let (_, body) = registry.encode(None);
        assert!(
            body.contains("patchbay_telemetry_spans_exported_total 0\n"),
            "{body}"
        );
        assert!(
            body.contains("patchbay_telemetry_spans_dropped_total{reason=\"queue_full\"} 0\n"),
            "{body}"
        );
    }
}
