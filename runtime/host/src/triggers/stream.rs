//! `stream` trigger: a shared durable pull consumer, at least once.
//!
//! Each message is acked once, after its outputs are stored (outputs carry a
//! `Nats-Msg-Id` derived from the input, so a redelivery after a crash stores them once).
//! `retry` and platform errors nak with a delay that grows per attempt; on the last
//! allowed delivery, or on `dead-letter`, the message goes to PATCHBAY_DLQ with its
//! context and is terminated; `drop` acks and counts. A malformed message is
//! dead-lettered at once: nothing vanishes. The consumer itself belongs to `fn deploy`
//! (admin), so nodes only need to consume and ack.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt as _;
use patchbay_bus::Token;
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
        let consumer_name = crate::registry::consumer_name(&self.function);
        let consumer: PullConsumer = node
            .bus
            .jetstream()
            .get_consumer_from_stream(&consumer_name, &self.stream)
            .await
            .map_err(|e| format!("consumer {consumer_name} on {}: {e}", self.stream))?;
        let batch = node
            .function(self.function.as_str())
            .map_or(16, |f| f.spec.limits.max_concurrency.clamp(1, 256) as usize);
        let lag = tokio::spawn(sample_lag(
            Arc::clone(&node),
            consumer.clone(),
            self.function.to_string(),
            self.stream.clone(),
        ));
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| format!("pull from {consumer_name}: {e}"))?;
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => break,
                msg = messages.next() => match msg {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::warn!(consumer = %consumer_name, error = %e, "pull error");
                        continue;
                    }
                    None => break,
                },
            };
            let Some(f) = node.function(self.function.as_str()) else {
                // Removed while the message was in flight: let another node or a later
                // deploy have it instead of losing it.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                break;
            };
            node.tasks
                .spawn(handle(Arc::clone(&node), f, msg, self.kind));
        }
        // Messages pulled but not started are left unacked: the server redelivers them
        // after ack_wait, to this node or another.
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

/// Delay before the next attempt: the function's request, at least 100 ms doubling per
/// delivery, at most 30 s.
fn backoff(delivered: u64, requested_ms: u64) -> Duration {
    let exp = 100u64.saturating_mul(1 << delivered.saturating_sub(1).min(10));
    Duration::from_millis(requested_ms.max(exp).min(30_000))
}

async fn handle(
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
    let subject = msg.subject.to_string();
    let span = node.bus.process_delivery(&msg);
    async move {
        let max_deliver = u64::from(f.spec.limits.max_deliver.max(1));
        let (event, deadline) = match decode(&msg) {
            Ok(decoded) => decoded,
            Err(reason) => {
                node.metrics
                    .bad_input
                    .with_label_values(&[f.name.as_str(), kind])
                    .inc();
                return dead_letter(&node, &f, &msg, delivered, &reason, &source).await;
            }
        };
        let input_id = event.id.clone();
        let outcome = node.invoke(&f, &subject, event, deadline, kind).await;
        // What is left after the outcomes that end here: a retry (requested delay, reason).
        let (requested_ms, reason) = match outcome {
            Outcome::Ok(outputs) => match publish_durable(&node, &f, &input_id, &outputs, deadline).await {
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
                return dead_letter(&node, &f, &msg, delivered, &reason, &source).await;
            }
            Outcome::Failure(FailureReply::Retry { after_ms, reason }) => (after_ms, reason),
            Outcome::Error(kind, message) => (0, format!("{}: {message}", crate::node::error_label(kind))),
        };
        if delivered >= max_deliver {
            let reason = format!("gave up after {delivered} attempts: {reason}");
            return dead_letter(&node, &f, &msg, delivered, &reason, &source).await;
        }
        let delay = backoff(delivered, requested_ms);
        tracing::info!(%reason, attempt = delivered, ?delay, "will retry");
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
        }
    }
    .instrument(span)
    .await;
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
    let subject = msg.subject.to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_delivery_within_bounds_and_honours_requests() {
        assert_eq!(backoff(1, 0), Duration::from_millis(100));
        assert_eq!(backoff(2, 0), Duration::from_millis(200));
        assert_eq!(backoff(4, 0), Duration::from_millis(800));
        assert_eq!(backoff(1, 5_000), Duration::from_millis(5_000));
        assert_eq!(backoff(40, 0), Duration::from_secs(30));
        assert_eq!(backoff(1, u64::MAX), Duration::from_secs(30));
    }
}
