//! `patchbay.v1.runtime.status`: every node answers (no queue group) with what it serves,
//! so `patchbay fn deploy` can wait until nodes have picked a version up.

use std::sync::Arc;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::node::Node;

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Functions served.
    pub functions: Vec<ServedFunction>,
}

/// A function as served by one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedFunction {
    /// Name.
    pub name: String,
    /// Version served.
    pub version: u32,
    /// Its digest.
    pub digest: String,
    /// Its trigger.
    pub trigger: String,
    /// The canary version this node also routes a share of the interactions to (none
    /// without a canary, or once an auto-rollback verdict stopped it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
}

/// Answer status requests until the node shuts down.
pub(crate) async fn run(node: Arc<Node>) {
    let subject = node.bus.subjects().runtime_status();
    let mut sub = match node.bus.client().subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => return tracing::error!(%subject, error = %e, "cannot serve status"),
    };
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply else { continue };
        let status = NodeStatus {
            node: node.name.clone(),
            functions: node
                .served()
                .iter()
                .map(|f| ServedFunction {
                    name: f.name.to_string(),
                    version: f.spec.version,
                    digest: f.spec.digest.clone(),
                    trigger: f.spec.trigger.to_string(),
                    canary: node.canaries.routing_version(f.name.as_str()),
                })
                .collect(),
        };
        if let Ok(body) = serde_json::to_vec(&status) {
            let _ = node.bus.client().publish(reply, body.into()).await;
        }
    }
}
