//! The function host's Prometheus metrics (names are stable and documented in README).

use patchbay_telemetry::{
    DURATION_BUCKETS_SECONDS, ExemplarHistogram, ExemplarHistogramVec, Metrics,
};
use prometheus::{Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec};

/// Buckets for instantiation, which takes microseconds, not milliseconds.
const INSTANTIATE_BUCKETS_SECONDS: &[f64] = &[
    1e-6, 2e-6, 4e-6, 6e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2,
];

/// Every metric the host records.
#[derive(Clone, Debug)]
pub struct HostMetrics {
    /// `patchbay_fn_invocations_total{function,version,trigger,outcome}`: outcome is `ok`,
    /// `retry`, `dead-letter`, `drop` or an error kind (`trap`, `timeout`, …).
    pub invocations: IntCounterVec,
    /// `patchbay_fn_duration_seconds{function,version}`: instantiate + call; OpenMetrics
    /// carries the invocation's trace id as exemplar.
    pub duration: ExemplarHistogramVec,
    /// `patchbay_fn_instantiate_seconds{function,version}`.
    pub instantiate: HistogramVec,
    /// `patchbay_fn_inflight{function}`: invocations running now on this node.
    pub inflight: GaugeVec,
    /// `patchbay_fn_bad_input_total{function,trigger}`: messages refused before running.
    pub bad_input: IntCounterVec,
    /// `patchbay_fn_dead_letters_total{function,version}`.
    pub dead_letters: IntCounterVec,
    /// `patchbay_fn_loaded{function,version}`: 1 for the version this node serves.
    pub loaded: GaugeVec,
    /// `patchbay_fn_canary_percent{function,version}`: the share of interactions this node
    /// routes to a canary version; 0 once an auto-rollback verdict stopped it, absent when
    /// no canary runs.
    pub canary_percent: GaugeVec,
    /// `patchbay_fn_consumer_pending{function,stream}`: messages of a `stream`/`schedule`
    /// trigger's durable consumer not yet delivered (the consumer lag), sampled every 5 s.
    pub consumer_pending: GaugeVec,
    /// `patchbay_fn_consumer_ack_pending{function,stream}`: delivered, not yet acked.
    pub consumer_ack_pending: GaugeVec,
    /// `patchbay_runtime_instances{kind}`: pooling-allocator slots in use now
    /// (`component`, `core`, `memory`), sampled every second.
    pub instances: GaugeVec,
    /// `patchbay_fn_shed_total{function,reason}`: invocations refused before they started
    /// because the node could not take them in time; `reason="memory"`: the node's memory
    /// budget stayed full until the event's deadline (or, without one, for the version's
    /// timeout). Each is also answered (and counted in `patchbay_fn_invocations_total`) as
    /// `overloaded`.
    pub shed: IntCounterVec,
    /// `patchbay_fn_concurrency_limit{function}`: invocations of the served version this
    /// node runs at once — its `--concurrency`, capped by how many of its memory
    /// reservations fit in the node's memory budget.
    pub concurrency_limit: GaugeVec,
    /// `patchbay_runtime_memory_budget_bytes`: the node's memory budget.
    pub memory_budget: Gauge,
    /// `patchbay_runtime_memory_reserved_bytes`: how much of it running invocations hold,
    /// sampled every second.
    pub memory_reserved: Gauge,
}

impl HostMetrics {
    /// Register the host metrics in `metrics`.
    pub fn register(metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        Ok(Self {
            invocations: metrics.counter_vec(
                "patchbay_fn_invocations_total",
                "Function invocations by outcome.",
                &["function", "version", "trigger", "outcome"],
            )?,
            duration: metrics.histogram_vec_with_exemplars(
                "patchbay_fn_duration_seconds",
                "Time from instantiation to the handler's return.",
                &["function", "version"],
                DURATION_BUCKETS_SECONDS,
            )?,
            instantiate: metrics.histogram_vec(
                "patchbay_fn_instantiate_seconds",
                "Time to instantiate a fresh component instance.",
                &["function", "version"],
                INSTANTIATE_BUCKETS_SECONDS,
            )?,
            inflight: metrics.gauge_vec(
                "patchbay_fn_inflight",
                "Invocations running on this node.",
                &["function"],
            )?,
            bad_input: metrics.counter_vec(
                "patchbay_fn_bad_input_total",
                "Trigger messages refused before the function ran (malformed, too late).",
                &["function", "trigger"],
            )?,
            dead_letters: metrics.counter_vec(
                "patchbay_fn_dead_letters_total",
                "Events moved to PATCHBAY_DLQ.",
                &["function", "version"],
            )?,
            loaded: metrics.gauge_vec(
                "patchbay_fn_loaded",
                "1 for the function version this node serves.",
                &["function", "version"],
            )?,
            canary_percent: metrics.gauge_vec(
                "patchbay_fn_canary_percent",
                "Share of interactions (percent) routed to a canary version; 0 after an auto rollback.",
                &["function", "version"],
            )?,
            consumer_pending: metrics.gauge_vec(
                "patchbay_fn_consumer_pending",
                "Messages of a trigger's durable consumer not yet delivered (lag).",
                &["function", "stream"],
            )?,
            consumer_ack_pending: metrics.gauge_vec(
                "patchbay_fn_consumer_ack_pending",
                "Messages of a trigger's durable consumer delivered but not yet acked.",
                &["function", "stream"],
            )?,
            instances: metrics.gauge_vec(
                "patchbay_runtime_instances",
                "Pooling-allocator slots in use: component instances, core instances, memories.",
                &["kind"],
            )?,
            shed: metrics.counter_vec(
                "patchbay_fn_shed_total",
                "Invocations refused before they started because the node could not take them in time.",
                &["function", "reason"],
            )?,
            concurrency_limit: metrics.gauge_vec(
                "patchbay_fn_concurrency_limit",
                "Invocations of the served version run at once: its concurrency, capped by the memory budget.",
                &["function"],
            )?,
            memory_budget: metrics
                .gauge_vec(
                    "patchbay_runtime_memory_budget_bytes",
                    "Linear memory all invocations on this node may reserve together.",
                    &[],
                )?
                .with_label_values::<&str>(&[]),
            memory_reserved: metrics
                .gauge_vec(
                    "patchbay_runtime_memory_reserved_bytes",
                    "Linear memory reserved by running invocations.",
                    &[],
                )?
                .with_label_values::<&str>(&[]),
        })
    }
}

/// The metric children of one function version, resolved once at deploy time so the
/// per-event path does no label lookups for them.
#[derive(Clone, Debug)]
pub(crate) struct VersionMetrics {
    pub inflight: Gauge,
    pub duration: ExemplarHistogram,
    pub instantiate: Histogram,
    /// `patchbay_fn_shed_total{function,reason="memory"}`.
    pub shed_memory: IntCounter,
}

impl VersionMetrics {
    pub(crate) fn new(metrics: &HostMetrics, function: &str, version: u32) -> Self {
        let version = version.to_string();
        Self {
            inflight: metrics.inflight.with_label_values(&[function]),
            duration: metrics.duration.with_label_values(&[function, &version]),
            instantiate: metrics.instantiate.with_label_values(&[function, &version]),
            shed_memory: metrics.shed.with_label_values(&[function, "memory"]),
        }
    }
}
