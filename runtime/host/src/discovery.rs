//! How a runtime node answers NATS micro discovery (`$SRV.PING|INFO|STATS`): as
//! `patchbay-runtime`, metadata `node` (and `identity`, added by the bus), one endpoint per
//! function it serves.
//!
//! A function endpoint is named after the function, on its invoke subject, with metadata
//! `function`, `version`, `trigger` and `digest` of the version served now. Its counters
//! cover every invocation of the function on this node since the node started, whatever
//! the trigger or version: `num_requests` = invocations + messages refused as bad input,
//! `num_errors` = those that failed — every outcome but `ok` and the function's own `drop`
//! (a deliberate "not for me", not an error) — plus bad input; `data` breaks them down by
//! outcome. They are
//! read from the node's Prometheus metrics when asked, so discovery adds nothing to the
//! invocation path.
//!
//! Not here: the protocol itself (`patchbay_bus::discovery`), the
//! `patchbay.v1.runtime.status` query `fn deploy` waits on (`triggers::status`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use patchbay_bus::discovery::{self, Discovery, EndpointReport, Registration};
use prometheus::core::Collector as _;
use prometheus::{HistogramVec, IntCounterVec};

use crate::node::Node;

/// The micro service name of runtime nodes.
pub const SERVICE_NAME: &str = "patchbay-runtime";

/// Labels of one metric child.
pub type Labels = BTreeMap<String, String>;

/// Every child of a counter vector with its labels and value.
#[must_use]
pub fn counter_children(vec: &IntCounterVec) -> Vec<(Labels, u64)> {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| {
            // Counters are integers kept as f64 by the exposition model.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let value = m.get_counter().get_value().max(0.0) as u64;
            (labels(m), value)
        })
        .collect()
}

/// Every child of a histogram vector with its labels and sum of observations, in seconds.
#[must_use]
pub fn histogram_sums(vec: &HistogramVec) -> Vec<(Labels, f64)> {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| (labels(m), m.get_histogram().get_sample_sum()))
        .collect()
}

fn labels(m: &prometheus::proto::Metric) -> Labels {
    m.get_label()
        .iter()
        .map(|l| (l.name().to_owned(), l.value().to_owned()))
        .collect()
}

/// Whether a child's `label` is `value`.
#[must_use]
pub fn has(labels: &Labels, label: &str, value: &str) -> bool {
    labels.get(label).is_some_and(|v| v == value)
}

/// Seconds as a duration, clamping what a histogram sum cannot mean (negative, NaN).
#[must_use]
pub fn seconds(total: f64) -> Duration {
    Duration::try_from_secs_f64(total).unwrap_or_default()
}

/// Start answering discovery for `node` (a warning, not a failure, when that is refused).
pub(crate) async fn register(node: &Arc<Node>) -> Option<Discovery> {
    let registration = Registration::new(
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "Patchbay runtime node: runs WebAssembly functions",
    )
    .meta("node", node.name.clone());
    let reported = Arc::clone(node);
    discovery::register(&node.bus, registration, move || endpoints(&reported)).await
}

/// One endpoint per function served, with its counters now.
fn endpoints(node: &Node) -> Vec<EndpointReport> {
    let invocations = counter_children(&node.metrics.invocations);
    let bad_input = counter_children(&node.metrics.bad_input);
    let durations = histogram_sums(&node.metrics.duration);
    node.served()
        .iter()
        .map(|f| {
            let name = f.name.as_str();
            let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
            for (labels, value) in &invocations {
                if has(labels, "function", name) {
                    let outcome = labels.get("outcome").map_or("unknown", String::as_str);
                    *outcomes.entry(outcome).or_default() += value;
                }
            }
            let refused: u64 = bad_input
                .iter()
                .filter(|(labels, _)| has(labels, "function", name))
                .map(|(_, value)| value)
                .sum();
            let total: u64 = outcomes.values().sum();
            let ok = outcomes.get("ok").copied().unwrap_or(0);
            let dropped = outcomes.get("drop").copied().unwrap_or(0);
            let time: f64 = durations
                .iter()
                .filter(|(labels, _)| has(labels, "function", name))
                .map(|(_, sum)| sum)
                .sum();
            EndpointReport {
                name: name.to_owned(),
                subject: node.bus.subjects().fn_invoke(&f.name),
                queue_group: crate::triggers::invoke::QUEUE_GROUP.to_owned(),
                metadata: BTreeMap::from([
                    ("function".to_owned(), name.to_owned()),
                    ("version".to_owned(), f.spec.version.to_string()),
                    ("trigger".to_owned(), f.spec.trigger.to_string()),
                    ("digest".to_owned(), f.spec.digest.clone()),
                ]),
                requests: total + refused,
                errors: total - ok - dropped + refused,
                processing_time: seconds(time),
                data: Some(serde_json::json!({
                    "version": f.spec.version,
                    "outcomes": outcomes,
                    "bad_input": refused,
                })),
            }
        })
        .collect()
}
