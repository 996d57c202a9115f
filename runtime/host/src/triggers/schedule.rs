//! `schedule` trigger: cron ticks, one run per tick across all nodes.
//!
//! Every node publishes each tick into PATCHBAY_TICKS with `Nats-Msg-Id`
//! `<function>:<tick ms>`; the stream stores the first copy and drops the rest, and the
//! function's shared durable consumer hands the stored tick to exactly one node — the
//! same path as a `stream` trigger, retries and dead letters included. No leader
//! election: when a node dies, the others' ticks still arrive.

use std::sync::Arc;
use std::time::Duration;

use patchbay_bus::{CloudEvent, Token};
use tokio_util::sync::CancellationToken;

use super::TriggerLoop;
use super::stream::StreamTrigger;
use crate::node::Node;
use patchbay_registry::schedule::Schedule;
use patchbay_registry::{TICKS_STREAM, tick_subject};

/// Publishes ticks of `cron` and consumes them.
pub(crate) struct ScheduleTrigger {
    pub function: Token,
    pub cron: String,
}

impl TriggerLoop for ScheduleTrigger {
    const KIND: &'static str = "schedule";

    async fn run(self, node: Arc<Node>, stop: CancellationToken) -> Result<(), String> {
        let schedule = Schedule::parse(&self.cron).map_err(|e| e.to_string())?;
        let ticker = tokio::spawn(tick(
            Arc::clone(&node),
            self.function.clone(),
            schedule,
            stop.clone(),
        ));
        let consumed = StreamTrigger {
            function: self.function,
            stream: TICKS_STREAM.into(),
            kind: Self::KIND,
        }
        .run(node, stop)
        .await;
        ticker.abort();
        consumed
    }
}

async fn tick(node: Arc<Node>, function: Token, schedule: Schedule, stop: CancellationToken) {
    let subject = tick_subject(node.bus.subjects(), &function);
    let mut after = node.bus.clock().now_millis();
    loop {
        let Some(next) = schedule.next_after(after) else {
            return tracing::warn!(%function, "schedule has no future ticks");
        };
        let wait = Duration::from_millis(next.saturating_sub(node.bus.clock().now_millis()));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let event = CloudEvent::new(
            format!("/patchbay/schedule/{function}"),
            "patchbay.schedule.tick.v1",
        )
        .id(format!("{function}:{next}"))
        .with_time_millis(Some(next))
        .json(&serde_json::json!({ "scheduled_at_ms": next }));
        match event {
            Ok(event) => {
                if let Err(e) = node.bus.publish_durable(&subject, &event, None).await {
                    tracing::warn!(%function, error = %e, "cannot publish schedule tick");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode schedule tick"),
        }
        after = next;
    }
}
