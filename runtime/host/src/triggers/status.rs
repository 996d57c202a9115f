//! `patchbay.v1.runtime.status`: every node answers (no queue group) with what it serves,
//! so `patchbay fn deploy` can wait until nodes have picked a version up.
//!
//! A `subject` trigger whose subscription the server refuses (the node's permissions do not
//! cover the subject) never fires, and the server reports the refusal only on the
//! connection (`Permissions Violation for Subscription to "<subject>"`). [`Refusals`]
//! watches the connection's notices for those from before the node subscribes anything,
//! and [`trigger_failure`] names each function whose trigger subject was refused as
//! failed, with the server's text — here as `failed`, so `fn deploy`, `fn ls` and
//! `fn describe` do not claim it is served, and in the node's `$SRV` endpoints
//! (`crate::discovery`), so `patchbay status` does not either. A new connection
//! (reconnect) replays every subscription, so what was refused before is forgotten then
//! and recorded again if the server refuses it again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt as _;
use patchbay_bus::{Bus, BusNotice};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::node::{Deployed, Node};
use patchbay_registry::Trigger;

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

/// How long [`Refusals::confirm`] gives a refusal notice to reach the watcher after the
/// flush that proved the server processed the subscription.
const NOTICE_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Refused subscriptions by subject (as sent, prefix included) → the server's message.
type Refused = BTreeMap<String, String>;

/// The subscriptions the server refused on this node's connection, recorded from its
/// notices while the value lives.
pub(crate) struct Refusals {
    refused: Arc<Mutex<Refused>>,
    /// Subjects whose subscription the server has processed (see [`Refusals::confirm`]).
    confirmed: Mutex<std::collections::BTreeSet<String>>,
    watcher: JoinHandle<()>,
}

impl Refusals {
    /// Start recording `bus`'s refusals; call it before anything subscribes, so that no
    /// refusal is missed.
    pub(crate) fn watch(bus: &Bus) -> Self {
        let refused = Arc::<Mutex<Refused>>::default();
        let watcher = tokio::spawn(watch_refusals(bus.notices(), Arc::clone(&refused)));
        Self {
            refused,
            confirmed: Mutex::default(),
            watcher,
        }
    }

    /// Wait until the server has processed the subscription to `subject` just made (a
    /// flush: the server answers the PING after the SUB, so its refusal, if any, comes
    /// first), let the refusal's notice reach the watcher, and record the subject as
    /// settled. Until then status does not report the function at all, so `fn deploy`
    /// never sees "serving" for a subscription the server is about to refuse.
    pub(crate) async fn confirm(&self, bus: &Bus, subject: &str) {
        if let Err(e) = bus.client().flush().await {
            tracing::warn!(subject, error = %e, "cannot confirm a subscription");
        }
        // The notice travels from the connection through the event callback and a
        // broadcast channel to the watcher: a moment, not a round trip.
        tokio::time::sleep(NOTICE_SETTLE).await;
        self.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(subject.to_owned());
    }

    fn is_confirmed(&self, subject: &str) -> bool {
        self.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(subject)
    }

    /// The server's message refusing a subscription to `subject`, if it did.
    fn of(&self, subject: &str) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(subject)
            .cloned()
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Why `f`'s trigger does not work on `node` (the server's refusal of its subscription),
/// none while it works.
/// Whether `f`'s trigger is still being set up on this node: a subject trigger whose
/// subscription the server has neither processed nor refused yet.
pub(crate) fn trigger_pending(node: &Node, f: &Deployed) -> bool {
    match &f.spec.trigger {
        Trigger::Subject { subject } => {
            let full = node.bus.subjects().full(subject);
            node.refusals.of(&full).is_none() && !node.refusals.is_confirmed(&full)
        }
        _ => false,
    }
}

pub(crate) fn trigger_failure(node: &Node, f: &Deployed) -> Option<String> {
    match &f.spec.trigger {
        Trigger::Subject { subject } => node.refusals.of(&node.bus.subjects().full(subject)),
        _ => None,
    }
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
                .filter(|f| !trigger_pending(&node, f))
                .map(|f| ServedFunction {
                    name: f.name.to_string(),
                    version: f.spec.version,
                    digest: f.spec.digest.clone(),
                    trigger: f.spec.trigger.to_string(),
                    canary: node.canaries.routing_version(f.name.as_str()),
                    failed: trigger_failure(&node, f),
                })
                .collect(),
        };
        if let Ok(body) = serde_json::to_vec(&status) {
            let _ = node.bus.client().publish(reply, body.into()).await;
        }
    }
}

/// Record every subscription the server refuses, until the connection's notices end.
async fn watch_refusals(mut notices: broadcast::Receiver<BusNotice>, refused: Arc<Mutex<Refused>>) {
    loop {
        match notices.recv().await {
            Ok(BusNotice(text)) => {
                record(
                    &mut refused.lock().unwrap_or_else(PoisonError::into_inner),
                    &text,
                );
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// What one connection notice changes: a refused subscription is recorded with the
/// server's text; a new connection (which subscribes everything again) forgets them all.
fn record(refused: &mut Refused, notice: &str) {
    if notice.trim() == CONNECTED {
        refused.clear();
    } else if let Some(subject) = refused_subscription(notice) {
        tracing::error!(%subject, %notice, "the server refused a trigger subscription");
        refused.insert(subject.to_owned(), notice.trim().to_owned());
    }
}

/// The notice of a (re)established connection (`async_nats::Event::Connected`).
const CONNECTED: &str = "connected";

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
    use super::{Refused, record, refused_subscription};

    #[test]
    fn refusals_are_kept_with_the_server_text_until_a_new_connection_subscribes_again() {
        let mut refused = Refused::new();
        record(
            &mut refused,
            "server error: Permissions Violation for Subscription to \"crm.v1.in\" using queue \"fn-x\"\n",
        );
        record(&mut refused, "slow consumers for subscription 3");
        record(&mut refused, "disconnected");
        assert_eq!(
            refused.get("crm.v1.in").map(String::as_str),
            Some(
                "server error: Permissions Violation for Subscription to \"crm.v1.in\" using queue \"fn-x\""
            )
        );
        assert_eq!(refused.len(), 1, "{refused:?}");
        // Reconnected: every subscription is sent again, and only what is refused again counts.
        record(&mut refused, "connected");
        assert!(refused.is_empty(), "{refused:?}");
        record(
            &mut refused,
            "server error: permissions violation for subscription to \"crm.v1.other\"",
        );
        assert_eq!(refused.keys().collect::<Vec<_>>(), ["crm.v1.other"]);
    }

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
