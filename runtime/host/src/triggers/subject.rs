//! `subject` trigger: a core NATS queue group per function, at most once.

use std::sync::Arc;

use futures::StreamExt as _;
use patchbay_bus::Token;
use tokio_util::sync::CancellationToken;

use super::{TriggerLoop, handle_core};
use crate::node::Node;

/// Queue-subscribes `subject` as group `fn-<function>`; all nodes share the group, so
/// each message runs once somewhere.
pub(crate) struct SubjectTrigger {
    pub function: Token,
    pub subject: String,
}

impl TriggerLoop for SubjectTrigger {
    const KIND: &'static str = "subject";

    async fn run(self, node: Arc<Node>, stop: CancellationToken) -> Result<(), String> {
        let group = patchbay_registry::consumer_name(&self.function);
        let mut sub = node
            .bus
            .client()
            .queue_subscribe(self.subject.clone(), group)
            .await
            .map_err(|e| format!("subscribe {}: {e}", self.subject))?;
        node.refusals.confirm(&node.bus, &self.subject).await;
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            // The version is chosen per message, so a redeploy never needs a resubscribe.
            let Some(f) = node.function_for(self.function.as_str(), &msg) else {
                break;
            };
            node.tasks
                .spawn(handle_core(Arc::clone(&node), f, msg, Self::KIND));
        }
        // Drain: the server stops sending, and what is already buffered is still handled.
        let _ = sub.drain().await;
        while let Some(msg) = sub.next().await {
            if let Some(f) = node.function_for(self.function.as_str(), &msg) {
                node.tasks
                    .spawn(handle_core(Arc::clone(&node), f, msg, Self::KIND));
            }
        }
        Ok(())
    }
}
