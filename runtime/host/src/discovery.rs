//! How a runtime node answers NATS micro discovery (`$SRV.PING|INFO|STATS`): as
//! `patchbay-runtime`, metadata `node` (and `identity`, added by the bus), one endpoint per
//! function it serves.
//!
//! A function endpoint is named after the function, on its invoke subject, with metadata
//! `function`, `version`, `trigger` and `digest` of the version served now, and
//! `failed` (`patchbay_bus::discovery::FAILED`, also the STATS `last_error`) with the
//! server's refusal when its trigger's subscription was refused (see
//! [`crate::triggers::status`]): the function is loaded but its trigger never fires. Its counters
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

use patchbay_bus::discovery::{
    self, Discovery, EndpointReport, Registration, counter_children, has, histogram_sums, seconds,
};

use crate::node::Node;

/// The micro service name of runtime nodes.
pub const SERVICE_NAME: &str = "patchbay-runtime";

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
            let mut metadata = BTreeMap::from([
                ("function".to_owned(), name.to_owned()),
                ("version".to_owned(), f.spec.version.to_string()),
                ("trigger".to_owned(), f.spec.trigger.to_string()),
                ("digest".to_owned(), f.spec.digest.clone()),
            ]);
            if let Some(why) = crate::triggers::status::trigger_failure(node, f) {
                metadata.insert(discovery::FAILED.to_owned(), why);
            }
            EndpointReport {
                name: name.to_owned(),
                subject: node.bus.subjects().fn_invoke(&f.name),
                queue_group: crate::triggers::invoke::QUEUE_GROUP.to_owned(),
                metadata,
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
