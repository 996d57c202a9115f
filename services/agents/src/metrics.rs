//! The agents service's metrics, registered once in the process registry.
//!
//! Service health (`patchbay_agents_*`):
//!
//! | name | labels | what |
//! |---|---|---|
//! | `patchbay_agents_inputs_total` | `input` (`routed`, `hangup`, `closed`, `state`, `accept`, `reject`, `wrapup-done`, `other`), `outcome` (`applied`, `ignored`, `duplicate`, `rejected`) | consumed messages |
//! | `patchbay_agents_rejected_total` | `reason` (`subject`, `envelope`, `json`, `mismatch`, `hop-limit`, `panic`, or the engine's refusal: `unknown-agent`, `not-offered`, …) | inputs terminated as bad |
//! | `patchbay_agents_ignored_total` | `reason` (`duplicate-call`, `call-finished`, `no-change`, …, `closed-call`) | inputs that changed nothing (redeliveries, races) |
//! | `patchbay_agents_outputs_total` | `event` (`queued`, `offered`, …, `state-changed`, `missed`) | events published |
//! | `patchbay_agents_replayed_outputs_total` | — | outputs the stream already held when published again: the restored outbox after a crash, or a retried publish (harmless) |
//! | `patchbay_agents_replay_divergence_total` | — | freshly decided outputs whose id the stream already held: the engine went back behind what it had published and may contradict the stream; 0 in normal operation, crashes included |
//! | `patchbay_agents_output_commits_total` | — | stream commits that stored outputs: one per atomic batch (per stream and engine batch), one per output published singly; `outputs_total / output_commits_total` is outputs per fsync |
//! | `patchbay_agents_batch_inputs` | — | inputs per batch (histogram) |
//! | `patchbay_agents_batch_duration_seconds` | `stage` (`apply`, `publish`, `snapshot`) | batch time by stage |
//! | `patchbay_agents_snapshot_bytes` | `encoding` (`compressed`, `json`) | size of the last snapshot |
//!
//! Queues, refreshed every second and after each batch (`patchbay_cc_queue_*`, label `queue`):
//! `waiting`, `longest_wait_seconds`, `agents{state}`, `service_level{formula}`
//! (`answered-of-offered`, `answered-of-answered`, `answered-of-offered-less-short-abandons`;
//! absent until its denominator is non-zero), `asa_seconds`, `abandon_rate`, `occupancy`.

use patchbay_protocol::payload::AgentState;
use patchbay_telemetry::{DURATION_BUCKETS_SECONDS, Metrics};
use prometheus::{GaugeVec, HistogramVec, IntCounterVec};

use crate::stats::QueueStats;

const STATES: [AgentState; 7] = [
    AgentState::Offline,
    AgentState::Available,
    AgentState::Reserved,
    AgentState::Busy,
    AgentState::WrapUp,
    AgentState::NotResponding,
    AgentState::Break,
];

/// Handles on every agents metric.
#[derive(Debug, Clone)]
pub struct AgentsMetrics {
    /// Consumed messages by input kind and outcome.
    pub inputs: IntCounterVec,
    /// Terminated inputs by reason.
    pub rejected: IntCounterVec,
    /// Inputs that changed nothing, by reason.
    pub ignored: IntCounterVec,
    /// Published events by event.
    pub outputs: IntCounterVec,
    /// Outputs already in the stream when published again (outbox, retries).
    pub replayed: IntCounterVec,
    /// Fresh outputs whose id the stream already held.
    pub divergence: IntCounterVec,
    /// Stream commits of outputs (atomic batches, or single publishes).
    pub commits: IntCounterVec,
    /// Inputs per batch.
    pub batch_inputs: HistogramVec,
    /// Batch time by stage.
    pub batch_duration: HistogramVec,
    /// Last snapshot size by encoding.
    pub snapshot_bytes: GaugeVec,
    queue_waiting: GaugeVec,
    queue_longest_wait: GaugeVec,
    queue_agents: GaugeVec,
    queue_service_level: GaugeVec,
    queue_asa: GaugeVec,
    queue_abandon_rate: GaugeVec,
    queue_occupancy: GaugeVec,
}

impl AgentsMetrics {
    /// Register the agents metrics in `metrics`.
    pub fn register(metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        let queue = |name: &str, help: &str, extra: &[&str]| {
            let mut labels = vec!["queue"];
            labels.extend_from_slice(extra);
            metrics.gauge_vec(name, help, &labels)
        };
        Ok(Self {
            inputs: metrics.counter_vec(
                "patchbay_agents_inputs_total",
                "Messages consumed by the agents service, by input and outcome",
                &["input", "outcome"],
            )?,
            rejected: metrics.counter_vec(
                "patchbay_agents_rejected_total",
                "Inputs terminated as malformed or refused by the engine, by reason",
                &["reason"],
            )?,
            ignored: metrics.counter_vec(
                "patchbay_agents_ignored_total",
                "Inputs that changed nothing (redeliveries, races), by reason",
                &["reason"],
            )?,
            outputs: metrics.counter_vec(
                "patchbay_agents_outputs_total",
                "Events published by the agents service, by event",
                &["event"],
            )?,
            replayed: metrics.counter_vec(
                "patchbay_agents_replayed_outputs_total",
                "Outputs the stream already held when published again (the outbox restored after a crash, a retried publish)",
                &[],
            )?,
            divergence: metrics.counter_vec(
                "patchbay_agents_replay_divergence_total",
                "Freshly decided outputs whose id the stream already held (the engine went back behind what it had published)",
                &[],
            )?,
            commits: metrics.counter_vec(
                "patchbay_agents_output_commits_total",
                "Stream commits that stored the service's outputs: one per atomic batch, one per output published singly (each is one fsync under sync_interval: always)",
                &[],
            )?,
            batch_inputs: metrics.histogram_vec(
                "patchbay_agents_batch_inputs",
                "Inputs per batch",
                &[],
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )?,
            batch_duration: metrics.histogram_vec(
                "patchbay_agents_batch_duration_seconds",
                "Time spent per batch, by stage (apply, publish, snapshot)",
                &["stage"],
                DURATION_BUCKETS_SECONDS,
            )?,
            snapshot_bytes: metrics.gauge_vec(
                "patchbay_agents_snapshot_bytes",
                "Size of the last engine snapshot written, compressed and as JSON",
                &["encoding"],
            )?,
            queue_waiting: queue(
                "patchbay_cc_queue_waiting",
                "Calls waiting in the queue",
                &[],
            )?,
            queue_longest_wait: queue(
                "patchbay_cc_queue_longest_wait_seconds",
                "Longest current wait in the queue (since first queued)",
                &[],
            )?,
            queue_agents: queue(
                "patchbay_cc_queue_agents",
                "Agents serving the queue, by state",
                &["state"],
            )?,
            queue_service_level: queue(
                "patchbay_cc_queue_service_level",
                "Share of calls answered within the threshold, by formula",
                &["formula"],
            )?,
            queue_asa: queue(
                "patchbay_cc_queue_asa_seconds",
                "Average speed of answer of the queue",
                &[],
            )?,
            queue_abandon_rate: queue(
                "patchbay_cc_queue_abandon_rate",
                "Abandoned / (answered + abandoned) of the queue",
                &[],
            )?,
            queue_occupancy: queue(
                "patchbay_cc_queue_occupancy",
                "Occupied / staffed agents of the queue, right now",
                &[],
            )?,
        })
    }

    /// Set the queue gauges from `stats`.
    pub fn set_queues(&self, stats: &[QueueStats]) {
        for s in stats {
            let q = s.queue.as_str();
            self.queue_waiting
                .with_label_values(&[q])
                .set(s.waiting as f64);
            self.queue_longest_wait
                .with_label_values(&[q])
                .set(s.longest_wait_ms as f64 / 1000.0);
            for state in STATES {
                self.queue_agents
                    .with_label_values(&[q, state.as_str()])
                    .set(f64::from(s.agents.get(state)));
            }
            let sl = &s.service_level;
            for (formula, value) in [
                ("answered-of-offered", sl.of_offered),
                ("answered-of-answered", sl.of_answered),
                (
                    "answered-of-offered-less-short-abandons",
                    sl.of_offered_less_short_abandons,
                ),
            ] {
                set_or_clear(&self.queue_service_level, &[q, formula], value);
            }
            set_or_clear(&self.queue_asa, &[q], s.asa_secs);
            set_or_clear(&self.queue_abandon_rate, &[q], s.abandon_rate);
            set_or_clear(&self.queue_occupancy, &[q], s.occupancy);
        }
    }
}

/// A ratio without a denominator yet is no sample at all, rather than a misleading 0.
fn set_or_clear(gauge: &GaugeVec, labels: &[&str], value: Option<f64>) {
    match value {
        Some(v) => gauge.with_label_values(labels).set(v),
        None => {
            let _ = gauge.remove_label_values(labels);
        }
    }
}
