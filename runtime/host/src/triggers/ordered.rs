//! `stream` trigger with per-key ordering: one pull loop per partition consumer.
//!
//! The partitions and why they give per-key order are described in [`patchbay_registry::ordering`].
//! Here each partition consumer `fn-<name>-p<i>` on PATCHBAY_ORDERED gets its own loop that
//! pulls one message at a time (one pull request per message) and handles it to the end (outputs stored, then acked, nak'ed
//! with a delay, or dead-lettered and terminated — the same [`super::stream`] handling as an
//! unordered trigger) before taking the next. The consumer's `max_ack_pending = 1` is what
//! enforces the order across nodes; the loop only avoids asking for more than it can use.
//!
//! Every node runs every partition's loop, so any node may take a partition's next event:
//! there is no assignment to rebalance. A node that dies holding an event costs that
//! partition one `ack_wait`, after which the server redelivers the event to a survivor
//! before anything later in the partition.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt as _;
use patchbay_bus::Token;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::TriggerLoop;
use crate::node::Node;
use patchbay_registry::ordering::{ORDERED_STREAM, partition_consumer};

/// Consumes the partition consumers `fn-<name>-p0 … p<partitions-1>` on PATCHBAY_ORDERED.
pub(crate) struct OrderedTrigger {
    pub function: Token,
    pub partitions: u32,
}

impl TriggerLoop for OrderedTrigger {
    const KIND: &'static str = "stream";

    async fn run(self, node: Arc<Node>, stop: CancellationToken) -> Result<(), String> {
        let js = node.bus.jetstream();
        let mut consumers = Vec::new();
        for partition in 0..self.partitions {
            let name = partition_consumer(&self.function, partition);
            let consumer: PullConsumer =
                js.get_consumer_from_stream(&name, ORDERED_STREAM)
                    .await
                    .map_err(|e| format!("consumer {name} on {ORDERED_STREAM}: {e}"))?;
            consumers.push(consumer);
        }
        let lag = tokio::spawn(sample_lag(
            Arc::clone(&node),
            consumers.clone(),
            self.function.to_string(),
        ));
        let mut loops = JoinSet::new();
        for consumer in consumers {
            loops.spawn(partition(
                Arc::clone(&node),
                self.function.clone(),
                consumer,
                stop.clone(),
            ));
        }
        // Each loop retries its own pull failures; it ends only when `stop` fires.
        let mut result = Ok(());
        while let Some(done) = loops.join_next().await {
            if let Err(e) = done {
                tracing::error!(function = %self.function, error = %e, "ordered partition loop failed");
                result = Err(format!("partition loop failed: {e}"));
            }
        }
        lag.abort();
        for gauge in [
            &node.metrics.consumer_pending,
            &node.metrics.consumer_ack_pending,
        ] {
            let _ = gauge.remove_label_values(&[self.function.as_str(), ORDERED_STREAM]);
        }
        result
    }
}

/// Pull and handle one partition's events one at a time until `stop` fires.
async fn partition(
    node: Arc<Node>,
    function: Token,
    consumer: PullConsumer,
    stop: CancellationToken,
) {
    let consumer_name = consumer.cached_info().name.clone();
    loop {
        // A fresh one-message pull request each time, not a long-lived pull stream: the
        // stream's request accounting can count a request the server has already answered
        // when a batch is a single message, and then stalls the partition until the request
        // would have expired. The server would not deliver a second message before the
        // first is acked anyway (max_ack_pending = 1).
        let pull = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(30))
            .heartbeat(Duration::from_secs(5))
            .messages();
        let pulled = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            batch = pull => match batch {
                Ok(mut batch) => tokio::select! {
                    biased;
                    () = stop.cancelled() => {
                        patchbay_bus::pull::release_unstarted(&mut batch).await;
                        break;
                    }
                    msg = batch.next() => match msg {
                        Some(Ok(msg)) => Ok(msg),
                        Some(Err(e)) => Err(e.to_string()),
                        // The request expired with nothing to deliver.
                        None => continue,
                    },
                },
                Err(e) => Err(e.to_string()),
            },
        };
        let msg = match pulled {
            Ok(msg) => msg,
            Err(e) => {
                // A consumer being replaced or removed, or the connection down: try again
                // in a moment rather than spin.
                tracing::warn!(consumer = %consumer_name, error = %e, "pull failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let Some(f) = node.function_for(function.as_str(), &msg) else {
            // Removed while the message was in flight: hand it back rather than lose it.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            break;
        };
        // Handled to the end before the next pull; tracked with the node's other work so a
        // drain waits for it.
        let handled = node
            .tasks
            .spawn(super::stream::handle(Arc::clone(&node), f, msg, "stream"));
        if let Err(e) = handled.await {
            tracing::error!(consumer = %consumer_name, error = %e, "handling task failed; the event comes back after ack_wait");
        }
    }
}

/// Every 5 s, the function's lag and unacked count summed over its partitions, as the
/// same gauges an unordered trigger reports (stream label PATCHBAY_ORDERED).
async fn sample_lag(node: Arc<Node>, mut consumers: Vec<PullConsumer>, function: String) {
    let pending = node
        .metrics
        .consumer_pending
        .with_label_values(&[&function, ORDERED_STREAM]);
    let unacked = node
        .metrics
        .consumer_ack_pending
        .with_label_values(&[&function, ORDERED_STREAM]);
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        let (mut lag, mut inflight) = (0u64, 0u64);
        for consumer in &mut consumers {
            match consumer.info().await {
                Ok(info) => {
                    lag += info.num_pending;
                    inflight += info.num_ack_pending as u64;
                }
                Err(e) => tracing::debug!(%function, error = %e, "cannot read consumer info"),
            }
        }
        pending.set(lag as f64);
        unacked.set(inflight as f64);
    }
}
