//! The routing service's metrics, registered once in the process registry.
//!
//! | name | labels | what |
//! |---|---|---|
//! | `patchbay_routing_decisions_total` | `outcome` (`routed`, `closed`, `rejected`), `rule` | calls decided (rejected: bad input, terminated) |
//! | `patchbay_routing_bad_input_total` | `reason` | malformed incoming messages, by kind |
//! | `patchbay_routing_decision_duration_seconds` | `outcome` | from receipt to the decision stored |
//! | `patchbay_routing_lookups_total` | `outcome` (`ok`, `timeout`, `no-responders`, `error`, `skipped`) | customer lookups |
//! | `patchbay_routing_lookup_fallbacks_total` | — | decisions made with the default tier (lookup failed or skipped) |
//! | `patchbay_routing_lookup_duration_seconds` | `outcome` | customer lookup latency |
//! | `patchbay_routing_publish_errors_total` | — | decisions that could not be stored (message retried) |
//! | `patchbay_routing_rules_reloads_total` | `outcome` (`ok`, `failed`) | rules file reloads |

use patchbay_telemetry::{DURATION_BUCKETS_SECONDS, Metrics};
use prometheus::{HistogramVec, IntCounterVec};

/// Handles on every routing metric.
#[derive(Debug, Clone)]
pub struct RoutingMetrics {
    /// Decisions by outcome and rule.
    pub decisions: IntCounterVec,
    /// Bad input by reason.
    pub bad_input: IntCounterVec,
    /// Handling time by outcome.
    pub decision_duration: HistogramVec,
    /// Lookups by outcome.
    pub lookups: IntCounterVec,
    /// Decisions made with the default tier.
    pub lookup_fallbacks: IntCounterVec,
    /// Lookup latency by outcome.
    pub lookup_duration: HistogramVec,
    /// Failed publishes of decisions.
    pub publish_errors: IntCounterVec,
    /// Rules reloads by outcome.
    pub reloads: IntCounterVec,
}

impl RoutingMetrics {
    /// Register the routing metrics in `metrics`.
    pub fn register(metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        Ok(Self {
            decisions: metrics.counter_vec(
                "patchbay_routing_decisions_total",
                "Calls decided by the routing service, by outcome and rule",
                &["outcome", "rule"],
            )?,
            bad_input: metrics.counter_vec(
                "patchbay_routing_bad_input_total",
                "Malformed incoming call messages, by reason",
                &["reason"],
            )?,
            decision_duration: metrics.histogram_vec(
                "patchbay_routing_decision_duration_seconds",
                "Time from receiving an incoming call to storing the decision",
                &["outcome"],
                DURATION_BUCKETS_SECONDS,
            )?,
            lookups: metrics.counter_vec(
                "patchbay_routing_lookups_total",
                "Customer lookups by outcome",
                &["outcome"],
            )?,
            lookup_fallbacks: metrics.counter_vec(
                "patchbay_routing_lookup_fallbacks_total",
                "Calls decided with the default tier because the customer lookup failed or was skipped",
                &[],
            )?,
            lookup_duration: metrics.histogram_vec(
                "patchbay_routing_lookup_duration_seconds",
                "Customer lookup latency by outcome",
                &["outcome"],
                DURATION_BUCKETS_SECONDS,
            )?,
            publish_errors: metrics.counter_vec(
                "patchbay_routing_publish_errors_total",
                "Decisions that could not be stored (the call is retried)",
                &[],
            )?,
            reloads: metrics.counter_vec(
                "patchbay_routing_rules_reloads_total",
                "Rules file reloads by outcome",
                &["outcome"],
            )?,
        })
    }
}
