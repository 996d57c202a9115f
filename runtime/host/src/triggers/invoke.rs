//! Direct invocation: `patchbay.v1.fn.<name>.invoke`, request-reply, for every function.

use std::sync::Arc;

use futures::StreamExt as _;
use patchbay_bus::subject::PlatformSubject;

use super::{TriggerLoop, handle_core, send_reply};
use crate::node::Node;
use crate::reply::{ErrorKind, InvokeReply};

/// Queue group shared by every node for direct invocation.
pub(crate) const QUEUE_GROUP: &str = "patchbay-runtime";

/// One subscription for all functions; the function is named by the subject.
pub(crate) struct InvokeTrigger;

impl TriggerLoop for InvokeTrigger {
    const KIND: &'static str = "invoke";

    async fn run(
        self,
        node: Arc<Node>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), String> {
        let pattern = node.bus.subjects().fn_invoke_all();
        let mut sub = node
            .bus
            .client()
            .queue_subscribe(pattern.clone(), QUEUE_GROUP.into())
            .await
            .map_err(|e| format!("subscribe {pattern}: {e}"))?;
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            dispatch(&node, msg).await;
        }
        // Drain: the server stops sending (the queue group's other members get the next
        // requests), and what is already buffered is still answered.
        let _ = sub.drain().await;
        while let Some(msg) = sub.next().await {
            dispatch(&node, msg).await;
        }
        Ok(())
    }
}

/// Hand one invocation request to the function it names (or refuse an unknown one).
async fn dispatch(node: &Arc<Node>, msg: async_nats::Message) {
    let name = match node.bus.subjects().parse(&msg.subject) {
        Ok(PlatformSubject::FnInvoke { function }) => function,
        _ => return,
    };
    match node.function_for(name.as_str(), &msg) {
        Some(f) => {
            node.tasks
                .spawn(handle_core(Arc::clone(node), f, msg, InvokeTrigger::KIND));
        }
        None => {
            if let Some(reply) = &msg.reply {
                let body = InvokeReply::Error {
                    function: name.to_string(),
                    version: None,
                    kind: ErrorKind::UnknownFunction,
                    message: format!("unknown function {:?}", name.as_str()),
                };
                send_reply(node, reply, &body).await;
            }
        }
    }
}

/// Serve direct invocation until the node shuts down.
pub(crate) async fn run(node: Arc<Node>) {
    let stop = node.shutdown.clone();
    if let Err(e) = InvokeTrigger.run(node, stop).await {
        tracing::error!(error = %e, "invoke trigger stopped");
    }
}
