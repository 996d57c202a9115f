//! `patchbay.v1.runtime.status`: every node answers (no queue group) with what it serves,
//! so `patchbay fn deploy` can wait until nodes have picked a version up.
//!
//! A `subject` trigger whose subscription the server refuses (the node's permissions do not
//! cover the subject) never fires, and the server reports the refusal only on the
//! connection (`Permissions Violation for Subscription to "<subject>"`). The status task
//! watches the connection's notices for those and reports each function whose trigger
//! subject was refused as `failed`, so `fn deploy` does not claim it is served.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt as _;
use patchbay_bus::BusNotice;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::node::Node;
use crate::registry::Trigger;

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
    /// Why the trigger does not work on this node (the server refused its subscription);
    /// none while it works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Subscriptions the server refused on this node: subject → the server's message.
type Refusals = Arc<Mutex<BTreeMap<String, String>>>;

/// Answer status requests until the node shuts down.
pub(crate) async fn run(node: Arc<Node>) {
    let refusals = Refusals::default();
    let watcher = tokio::spawn(watch_refusals(node.bus.notices(), Arc::clone(&refusals)));
    serve(&node, &refusals).await;
    watcher.abort();
}

async fn serve(node: &Arc<Node>, refusals: &Refusals) {
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
                    failed: match &f.spec.trigger {
                        Trigger::Subject { subject } => refusals
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get(&node.bus.subjects().full(subject))
                            .cloned(),
                        _ => None,
                    },
                })
                .collect(),
        };
        if let Ok(body) = serde_json::to_vec(&status) {
            let _ = node.bus.client().publish(reply, body.into()).await;
        }
    }
}

/// Record every subscription the server refuses, until the connection's notices end.
async fn watch_refusals(mut notices: broadcast::Receiver<BusNotice>, refusals: Refusals) {
    loop {
        match notices.recv().await {
            Ok(BusNotice(text)) => {
                if let Some(subject) = refused_subscription(&text) {
                    tracing::error!(%subject, notice = %text, "the server refused a trigger subscription");
                    refusals
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(subject.to_owned(), text.trim().to_owned());
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The subject of a server notice refusing a subscription — `Permissions Violation for
/// Subscription to "<subject>"`, optionally followed by ` using queue "<group>"` (any case).
fn refused_subscription(notice: &str) -> Option<&str> {
    const NEEDLE: &str = "permissions violation for subscription to \"";
    let start = notice.to_ascii_lowercase().find(NEEDLE)? + NEEDLE.len();
    let rest = notice.get(start..)?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::refused_subscription;

    #[test]
    fn reads_the_subject_of_a_refused_subscription_from_the_server_notice() {
        assert_eq!(
            refused_subscription(
                "Permissions Violation for Subscription to \"crm.v1.in\" using queue \"fn-x\""
            ),
            Some("crm.v1.in")
        );
        assert_eq!(
            refused_subscription("permissions violation for subscription to \"$SYS.>\""),
            Some("$SYS.>")
        );
        assert_eq!(
            refused_subscription("Permissions Violation for Publish to \"cc.v1.x\""),
            None
        );
        assert_eq!(refused_subscription("slow consumer"), None);
        assert_eq!(
            refused_subscription("permissions violation for subscription to \"unterminated"),
            None
        );
    }
}
