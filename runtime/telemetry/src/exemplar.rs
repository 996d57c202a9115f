//! Exemplars: the trace id of one recent observation, kept per histogram bucket (or per
//! counter series) so a dashboard can jump from a latency spike to a trace that caused it.
//!
//! `prometheus` 0.14 has no exemplar support, so [`ExemplarHistogramVec`] and
//! [`ExemplarCounterVec`] wrap its metric families and keep the latest exemplar of each
//! bucket in a small side table that [`Metrics::encode`](crate::Metrics::encode) reads when
//! it writes OpenMetrics. The classic text format never shows exemplars. Recording never
//! blocks: when another thread is writing the same series' exemplars at that instant, this
//! observation is counted as usual and simply not kept as an exemplar.
//!
//! Only sampled traces become exemplars — an exemplar pointing at a trace the backend never
//! received would be a dead link.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{TraceContextExt as _, TraceId};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The trace id of `span` when it belongs to a valid, sampled trace (what an exemplar may
/// point at); `None` otherwise, e.g. for a disabled span or an unsampled trace.
#[must_use]
pub fn sampled_trace_id(span: &tracing::Span) -> Option<TraceId> {
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id())
}

/// One remembered observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Exemplar {
    pub(crate) trace_id: TraceId,
    pub(crate) value: f64,
    /// Seconds since the Unix epoch.
    pub(crate) timestamp: f64,
}

impl Exemplar {
    fn now(trace_id: TraceId, value: f64) -> Self {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self {
            trace_id,
            value,
            timestamp,
        }
    }
}

/// The latest exemplar per slot of one series: one slot per histogram bucket (the last one
/// is `+Inf`), or a single slot for a counter.
#[derive(Debug)]
struct Slots(Mutex<Vec<Option<Exemplar>>>);

impl Slots {
    fn new(len: usize) -> Self {
        Self(Mutex::new(vec![None; len]))
    }

    /// Never waits: a contended lock means someone else is recording right now, and one
    /// exemplar per bucket is all that is kept anyway.
    fn record(&self, slot: usize, exemplar: Exemplar) {
        if let Ok(mut slots) = self.0.try_lock()
            && let Some(s) = slots.get_mut(slot)
        {
            *s = Some(exemplar);
        }
    }

    fn snapshot(&self) -> Vec<Option<Exemplar>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The exemplars of one metric family, keyed by label values in declaration order.
#[derive(Debug)]
pub(crate) struct ExemplarTable {
    label_names: Vec<String>,
    /// Histogram upper bounds without `+Inf`; empty for a counter.
    bounds: Vec<f64>,
    series: Mutex<HashMap<Vec<String>, Arc<Slots>>>,
}

impl ExemplarTable {
    pub(crate) fn new(label_names: &[&str], bounds: &[f64]) -> Self {
        Self {
            label_names: label_names.iter().map(|&n| n.to_owned()).collect(),
            bounds: bounds.to_vec(),
            series: Mutex::default(),
        }
    }

    fn slots(&self, label_values: &[&str]) -> Arc<Slots> {
        let key: Vec<String> = label_values.iter().map(|&v| v.to_owned()).collect();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            series
                .entry(key)
                .or_insert_with(|| Arc::new(Slots::new(self.bounds.len() + 1))),
        )
    }

    /// The exemplars of the series with these label pairs (any order, as the registry
    /// gathers them sorted by name), one entry per slot.
    pub(crate) fn lookup(&self, labels: &[(&str, &str)]) -> Option<Vec<Option<Exemplar>>> {
        let key = self
            .label_names
            .iter()
            .map(|name| {
                labels
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| (*v).to_owned())
            })
            .collect::<Option<Vec<String>>>()?;
        let slots = Arc::clone(
            self.series
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key)?,
        );
        Some(slots.snapshot())
    }

    /// The slot of the histogram bucket `value` falls in (`le` is inclusive).
    fn bucket_of(&self, value: f64) -> usize {
        self.bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len())
    }
}

/// A histogram family that keeps the trace id of a recent observation per bucket; made by
/// [`Metrics::histogram_vec_with_exemplars`](crate::Metrics::histogram_vec_with_exemplars).
#[derive(Clone, Debug)]
pub struct ExemplarHistogramVec {
    pub(crate) inner: HistogramVec,
    pub(crate) table: Arc<ExemplarTable>,
}

impl ExemplarHistogramVec {
    /// The series with these label values (in the order the labels were declared). Resolve
    /// it once and keep it where the hot path can reach it, as with `prometheus`.
    #[must_use]
    pub fn with_label_values(&self, label_values: &[&str]) -> ExemplarHistogram {
        ExemplarHistogram {
            inner: self.inner.with_label_values(label_values),
            slots: self.table.slots(label_values),
            table: Arc::clone(&self.table),
        }
    }
}

/// Reads (`collect`, label lookups) go to the plain family; observations made through it
/// carry no exemplar.
impl Deref for ExemplarHistogramVec {
    type Target = HistogramVec;

    fn deref(&self) -> &HistogramVec {
        &self.inner
    }
}

/// One series of an [`ExemplarHistogramVec`].
#[derive(Clone, Debug)]
pub struct ExemplarHistogram {
    inner: Histogram,
    slots: Arc<Slots>,
    table: Arc<ExemplarTable>,
}

impl ExemplarHistogram {
    /// Records `value` without an exemplar.
    pub fn observe(&self, value: f64) {
        self.inner.observe(value);
    }

    /// Records `value`; with a trace id it becomes its bucket's exemplar.
    pub fn observe_with_exemplar(&self, value: f64, trace_id: Option<TraceId>) {
        self.inner.observe(value);
        if let Some(trace_id) = trace_id {
            self.slots
                .record(self.table.bucket_of(value), Exemplar::now(trace_id, value));
        }
    }

    /// Records `value` with `span`'s trace as exemplar when that trace is sampled.
    pub fn observe_in(&self, value: f64, span: &tracing::Span) {
        self.observe_with_exemplar(value, sampled_trace_id(span));
    }
}

/// A counter family that keeps the trace id of a recent increment per series; made by
/// [`Metrics::counter_vec_with_exemplars`](crate::Metrics::counter_vec_with_exemplars).
#[derive(Clone, Debug)]
pub struct ExemplarCounterVec {
    pub(crate) inner: IntCounterVec,
    pub(crate) table: Arc<ExemplarTable>,
}

impl ExemplarCounterVec {
    /// The series with these label values (in the order the labels were declared).
    #[must_use]
    pub fn with_label_values(&self, label_values: &[&str]) -> ExemplarCounter {
        ExemplarCounter {
            inner: self.inner.with_label_values(label_values),
            slots: self.table.slots(label_values),
        }
    }
}

/// Reads (`collect`, label lookups) go to the plain family; increments made through it
/// carry no exemplar.
impl Deref for ExemplarCounterVec {
    type Target = IntCounterVec;

    fn deref(&self) -> &IntCounterVec {
        &self.inner
    }
}

/// One series of an [`ExemplarCounterVec`].
#[derive(Clone, Debug)]
pub struct ExemplarCounter {
    inner: IntCounter,
    slots: Arc<Slots>,
}

impl ExemplarCounter {
    /// Adds one without an exemplar.
    pub fn inc(&self) {
        self.inner.inc();
    }

    /// Adds one; with a trace id it becomes the series' exemplar.
    pub fn inc_with_exemplar(&self, trace_id: Option<TraceId>) {
        self.inner.inc();
        if let Some(trace_id) = trace_id {
            self.slots.record(0, Exemplar::now(trace_id, 1.0));
        }
    }

    /// Adds one with `span`'s trace as exemplar when that trace is sampled.
    pub fn inc_in(&self, span: &tracing::Span) {
        self.inc_with_exemplar(sampled_trace_id(span));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_bucket_whose_bound_includes_them() {
        let table = ExemplarTable::new(&[], &[0.1, 1.0]);
        assert_eq!(table.bucket_of(0.05), 0);
        assert_eq!(table.bucket_of(0.1), 0);
        assert_eq!(table.bucket_of(0.5), 1);
        assert_eq!(table.bucket_of(7.0), 2);
    }

    #[test]
    fn lookup_accepts_labels_in_any_order() {
        let table = ExemplarTable::new(&["function", "version"], &[1.0]);
        let trace_id = TraceId::from(7_u128);
        table
            .slots(&["echo", "1"])
            .record(1, Exemplar::now(trace_id, 2.0));
        let slots = table
            .lookup(&[("version", "1"), ("function", "echo")])
            .unwrap();
        assert_eq!(slots[0], None);
        assert_eq!(slots[1].map(|e| e.trace_id), Some(trace_id));
        assert!(
            table
                .lookup(&[("version", "2"), ("function", "echo")])
                .is_none()
        );
    }

    #[test]
    fn spans_outside_any_trace_give_no_exemplar() {
        assert_eq!(sampled_trace_id(&tracing::Span::none()), None);
    }
}
