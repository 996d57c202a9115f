//! `stream` trigger: a shared durable pull consumer, at least once.
//!
//! Each message is acked once, after its outputs are stored (outputs carry a
//! `Nats-Msg-Id` derived from the input, so a redelivery after a crash stores them once).
//! `retry` and platform errors nak with a delay that grows per attempt; on the last
//! allowed delivery, or on `dead-letter`, the message goes to PATCHBAY_DLQ with its
//! context and is terminated; `drop` acks and counts. A malformed message is
//! dead-lettered at once: nothing vanishes. The consumer itself belongs to `fn deploy`
//! (admin), so nodes only need to consume and ack.
//!
//! Drain: a message is taken off the pull stream only when it can start, so on stop the
//! ones in flight finish and ack while the ones pulled but not started are nak'ed at once
//! for another node (see [`crate::node::run`] for the deadline).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use patchbay_bus::Token;
use patchbay_bus::pull::Next;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{TriggerLoop, decode, publish_durable};
use crate::dlq::DeadLetter;
use crate::node::{Deployed, Node, Outcome};
use crate::reply::FailureReply;

/// Consumes the function's durable consumer `fn-<name>` on `stream`.
pub(crate) struct StreamTrigger {
    pub function: Token,
    pub stream: String,
    /// `stream`, or `schedule` when fed by schedule ticks.
    pub kind: &'static str,
}

impl TriggerLoop for StreamTrigger {
    const KIND: &'static str = "stream";

    async fn run(self, node: Arc<Node>, stop: CancellationToken) -> Result<(), String> {
        let consumer_name = patchbay_registry::consumer_name(&self.function);
        let consumer: PullConsumer = node
            .bus
            .jetstream()
            .get_consumer_from_stream(&consumer_name, &self.stream)
            .await
            .map_err(|e| format!("consumer {consumer_name} on {}: {e}", self.stream))?;
        let batch = node
            .function(self.function.as_str())
            .map_or(16, |f| f.concurrency.clamp(1, 256) as usize);
        let lag = tokio::spawn(sample_lag(
            Arc::clone(&node),
            consumer.clone(),
            self.function.to_string(),
            self.stream.clone(),
        ));
        let mut messages = patchbay_bus::pull::messages(&consumer, batch)
            .await
            .map_err(|e| format!("pull from {consumer_name}: {e}"))?;
        let function = self.function.as_str();
        let kind = self.kind;
        patchbay_bus::pull::serve(
            &consumer_name,
            &mut messages,
            batch,
            &stop,
            // Nothing starts before the node's memory budget has room for it.
            || node.wait_for_memory(function),
            |msg, slot| {
                let node = Arc::clone(&node);
                async move {
                    let Some(f) = node.function_for(function, &msg) else {
                        // Removed while the message was in flight: let another node or a
                        // later deploy have it instead of losing it.
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return Next::Stop;
                    };
                    let handled = handle(Arc::clone(&node), f, msg, kind);
                    node.tasks.spawn(async move {
                        handled.await;
                        drop(slot);
                    });
                    Next::Continue
                }
            },
        )
        .await;
        drop(messages);
        lag.abort();
        for gauge in [
            &node.metrics.consumer_pending,
            &node.metrics.consumer_ack_pending,
        ] {
            let _ = gauge.remove_label_values(&[self.function.as_str(), &self.stream]);
        }
        Ok(())
    }
}

pub(super) async fn handle(
    node: Arc<Node>,
    f: Arc<Deployed>,
    msg: async_nats::jetstream::Message,
    kind: &'static str,
) {
    let (delivered, source) = match msg.info() {
        Ok(info) => (
            u64::try_from(info.delivered).unwrap_or(1),
            format!("{}:{}", info.stream, info.stream_sequence),
        ),
        Err(_) => (1, String::new()),
    };
    // An ordered trigger's copy names its partition; the function sees the original.
    let subject =
        patchbay_registry::ordering::original_subject(node.bus.subjects(), &f.name, &msg.subject)
            .to_owned();
    let span = node.bus.process_delivery(&msg);
    async move {
        // An event that has passed through too many handlers is a loop: stop it here,
        // with the chain that shows where it went.
        let chain = match super::enter_hop(&node, &f, msg.headers.as_ref()) {
            Ok(chain) => chain,
            Err(reason) => {
                tracing::warn!(%reason, "refused an event at the hop limit");
                return dead_letter(&node, &f, &msg, delivered, &reason, &source).await;
            }
        };
        let handled = patchbay_bus::pull::contain_panic(patchbay_bus::hops::scope(
            chain,
            handle_delivery(&node, &f, &msg, kind, delivered, &subject, &source),
        ))
        .await;
        if let Err(reason) = handled {
            tracing::error!(%reason, "handling a delivery panicked");
            dead_letter(&node, &f, &msg, delivered, &reason, &source).await;
        }
    }
    .instrument(span)
    .await;
}

/// One delivery from decode to ack, nak or dead letter.
async fn handle_delivery(
    node: &Arc<Node>,
    f: &Arc<Deployed>,
    msg: &async_nats::jetstream::Message,
    kind: &'static str,
    delivered: u64,
    subject: &str,
    source: &str,
) {
    let max_deliver = u64::from(f.spec.limits.max_deliver.max(1));
    let (event, deadline) = match decode(msg) {
        Ok(decoded) => decoded,
        Err(reason) => {
            node.metrics
                .bad_input
                .with_label_values(&[f.name.as_str(), kind])
                .inc();
            return dead_letter(node, f, msg, delivered, &reason, source).await;
        }
    };
    // What names the input in its outputs' de-dup ids; the data is not needed.
    let input = patchbay_bus::CloudEvent {
        data: bytes::Bytes::new(),
        ..event.clone()
    };
    let outcome = node.invoke(f, subject, event, deadline, kind).await;
    // What is left after the outcomes that end here: a retry (requested delay, reason).
    let (requested_ms, reason) = match outcome {
        Outcome::Ok(outputs) => match publish_durable(node, f, &input, &outputs, deadline).await {
            Ok(()) => {
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(error = %e, "ack not confirmed; the message may be redelivered (outputs are de-duplicated)");
                }
                return;
            }
            Err(e) => (0, format!("cannot publish outputs: {e}")),
        },
        Outcome::Failure(FailureReply::Drop { reason }) => {
            tracing::info!(%reason, "function dropped the event");
            let _ = msg.double_ack().await;
            return;
        }
        Outcome::Failure(FailureReply::DeadLetter { reason }) => {
            return dead_letter(node, f, msg, delivered, &reason, source).await;
        }
        Outcome::Failure(FailureReply::Retry { after_ms, reason }) => (after_ms, reason),
        Outcome::Error(kind, message) => {
            (0, format!("{}: {message}", crate::node::error_label(kind)))
        }
    };
    if delivered >= max_deliver {
        let reason = format!("gave up after {delivered} attempts: {reason}");
        return dead_letter(node, f, msg, delivered, &reason, source).await;
    }
    let delay =
        patchbay_bus::pull::redelivery_backoff(delivered, Duration::from_millis(requested_ms));
    tracing::info!(%reason, attempt = delivered, ?delay, "will retry");
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
    }
}

/// Every 5 s, the consumer's lag (not yet delivered) and unacked count as gauges, so an
/// operator sees a trigger falling behind before its stream fills.
async fn sample_lag(node: Arc<Node>, mut consumer: PullConsumer, function: String, stream: String) {
    let pending = node
        .metrics
        .consumer_pending
        .with_label_values(&[&function, &stream]);
    let unacked = node
        .metrics
        .consumer_ack_pending
        .with_label_values(&[&function, &stream]);
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        match consumer.info().await {
            Ok(info) => {
                pending.set(info.num_pending as f64);
                unacked.set(info.num_ack_pending as f64);
            }
            Err(e) => tracing::debug!(%function, error = %e, "cannot read consumer info"),
        }
    }
}

/// Move `msg` to PATCHBAY_DLQ with its context, then terminate it (nak instead when the
/// dead letter cannot be stored, so it is never lost).
async fn dead_letter(
    node: &Node,
    f: &Deployed,
    msg: &async_nats::jetstream::Message,
    attempts: u64,
    reason: &str,
    source: &str,
) {
    let subject =
        patchbay_registry::ordering::original_subject(node.bus.subjects(), &f.name, &msg.subject)
            .to_owned();
    let record = DeadLetter {
        function: f.name.as_str(),
        version: Some(f.spec.version),
        digest: Some(&f.spec.digest),
        attempts,
        error: reason,
        subject: &subject,
        source: (!source.is_empty()).then(|| source.to_owned()),
        node: &node.name,
        time_millis: node.bus.clock().now_millis(),
    };
    if patchbay_bus::dlq::dead_letter(&node.bus, &f.name, msg, &record).await {
        node.metrics
            .dead_letters
            .with_label_values(&[f.name.as_str(), &f.spec.version.to_string()])
            .inc();
        tracing::warn!(%reason, attempts, "dead-lettered");
    }
}
