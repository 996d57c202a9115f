//! [`ResilienceWatch`]: the policies of the `patchbay-resilience` bucket, live in every
//! process. It loads every key, then follows a KV watch, so `patchbay resilience apply`
//! takes effect everywhere without a restart. Reads ([`ResilienceWatch::policy_for`]) are
//! a short read lock and an `Arc` clone; writers swap a whole snapshot.
//!
//! A value that does not decode (written by something other than `patchbay resilience
//! apply`) is logged and skipped; the previous policy of that target stays in force.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use thiserror::Error;
use tokio::task::JoinHandle;

use super::policy::{RESILIENCE_BUCKET, ResiliencePolicy, StoredTarget, Target, TargetPolicy};
use crate::client::Bus;

/// Why the watch could not start.
#[derive(Debug, Error)]
pub enum WatchError {
    /// A NATS operation failed (no bucket, no permission, no connection).
    #[error("failed to {operation} of bucket {RESILIENCE_BUCKET}: {reason}")]
    Nats {
        /// What was attempted.
        operation: &'static str,
        /// The client's message.
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Snapshot {
    /// By KV key (removals arrive as keys).
    by_key: HashMap<String, (Target, Arc<TargetPolicy>)>,
    exact: HashMap<Target, Arc<TargetPolicy>>,
    /// Subject patterns, most specific (most tokens, fewest wildcards) first.
    patterns: Vec<(Target, Arc<TargetPolicy>)>,
}

impl Snapshot {
    fn rebuild(by_key: HashMap<String, (Target, Arc<TargetPolicy>)>) -> Self {
        let mut exact = HashMap::new();
        let mut patterns = Vec::new();
        for (target, policy) in by_key.values() {
            if target.is_pattern() {
                patterns.push((target.clone(), Arc::clone(policy)));
            } else {
                exact.insert(target.clone(), Arc::clone(policy));
            }
        }
        patterns.sort_by_key(|(t, _)| {
            let text = t.to_string();
            let wildcards = text.split('.').filter(|p| *p == "*" || *p == ">").count();
            let tokens = text.split('.').count();
            (
                std::cmp::Reverse(tokens - wildcards),
                text.ends_with('>'),
                text,
            )
        });
        Self {
            by_key,
            exact,
            patterns,
        }
    }
}

#[derive(Debug)]
struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    default: Arc<TargetPolicy>,
    revision: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn apply(&self, entry: &kv::Entry) {
        let current = Arc::clone(&self.snapshot.read().unwrap_or_else(PoisonError::into_inner));
        let mut by_key = current.by_key.clone();
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<StoredTarget>(&entry.value) {
                Ok(stored) => match stored.policy.validate(&stored.target) {
                    Ok(()) => {
                        by_key.insert(entry.key.clone(), (stored.target, Arc::new(stored.policy)));
                    }
                    Err(e) => {
                        tracing::error!(key = %entry.key, error = %e, "ignoring invalid resilience policy")
                    }
                },
                Err(e) => {
                    tracing::error!(key = %entry.key, error = %e, "ignoring undecodable resilience policy")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                by_key.remove(&entry.key);
            }
        }
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(Snapshot::rebuild(by_key));
        self.revision.send_replace(entry.revision);
    }
}

/// The live resilience policies of the bus.
#[derive(Debug)]
pub struct ResilienceWatch {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Drop for ResilienceWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl ResilienceWatch {
    /// Load every policy of the bucket, then follow changes in the background (until
    /// dropped). Needs read access to the bucket (`kv_read` in deploy/access.toml).
    pub async fn start(bus: &Bus) -> Result<Self, WatchError> {
        let nats = |operation| {
            move |e: &dyn std::fmt::Display| WatchError::Nats {
                operation,
                reason: e.to_string(),
            }
        };
        let store = bus
            .jetstream()
            .get_key_value(RESILIENCE_BUCKET)
            .await
            .map_err(|e| nats("open")(&e))?;
        let stored = store
            .status()
            .await
            .map_err(|e| nats("read the status")(&e))?
            .values();
        let mut watch = store
            .watch_with_history(">")
            .await
            .map_err(|e| nats("watch")(&e))?;
        let shared = Arc::new(Shared {
            snapshot: RwLock::default(),
            default: Arc::new(TargetPolicy::default()),
            revision: tokio::sync::watch::Sender::new(0),
        });
        // The initial load: the latest value of every key, until the watch has caught up
        // (an empty bucket delivers nothing, hence the status check).
        if stored > 0 {
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| nats("load policies")(&e))?;
                shared.apply(&entry);
                if entry.delta == 0 {
                    break;
                }
            }
        }
        let follower = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                match entry {
                    Ok(entry) => follower.apply(&entry),
                    Err(e) => tracing::warn!(error = %e, "resilience watch error"),
                }
            }
            tracing::warn!("resilience watch ended; keeping the last policies");
        });
        Ok(Self {
            shared,
            task: Some(task),
        })
    }

    /// A fixed set of policies, not watched (tests, single-process tools).
    #[must_use]
    pub fn fixed(policy: &ResiliencePolicy) -> Self {
        let by_key = policy
            .targets
            .iter()
            .map(|(t, p)| (t.key(), (t.clone(), Arc::new(p.clone()))))
            .collect();
        Self {
            shared: Arc::new(Shared {
                snapshot: RwLock::new(Arc::new(Snapshot::rebuild(by_key))),
                default: Arc::new(TargetPolicy::default()),
                revision: tokio::sync::watch::Sender::new(0),
            }),
            task: None,
        }
    }

    /// The policy configured for `target` — exact, else the most specific subject pattern
    /// matching it — if any.
    #[must_use]
    pub fn configured(&self, target: &Target) -> Option<Arc<TargetPolicy>> {
        self.resolve(target).map(|(_, policy)| policy)
    }

    /// The configured target covering `target` (itself, or the most specific subject
    /// pattern matching it) with its policy. Per-target state (breakers, budgets) is kept
    /// per configured target, so `cc.v1.calls.*.incoming` has one breaker, not one per call.
    #[must_use]
    pub fn resolve(&self, target: &Target) -> Option<(Target, Arc<TargetPolicy>)> {
        let snapshot = self.snapshot();
        if let Some(policy) = snapshot.exact.get(target) {
            return Some((target.clone(), Arc::clone(policy)));
        }
        snapshot
            .patterns
            .iter()
            .find(|(pattern, _)| pattern.matches(target))
            .map(|(pattern, p)| (pattern.clone(), Arc::clone(p)))
    }

    /// The current snapshot (cheap: an `Arc` clone under a read lock).
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .shared
                .snapshot
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The policy for `target`: configured, or the defaults.
    #[must_use]
    pub fn policy_for(&self, target: &Target) -> Arc<TargetPolicy> {
        self.configured(target)
            .unwrap_or_else(|| Arc::clone(&self.shared.default))
    }

    /// Every configured target, sorted.
    #[must_use]
    pub fn targets(&self) -> Vec<Target> {
        let snapshot = self.snapshot();
        let mut targets: Vec<Target> = snapshot.by_key.values().map(|(t, _)| t.clone()).collect();
        targets.sort();
        targets
    }

    /// The KV revision of the last change applied; changes on every update, so holders of
    /// per-target state (breakers, budgets) know to rebuild it.
    #[must_use]
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn exact_targets_win_over_patterns_and_the_most_specific_pattern_wins() {
        let policy = ResiliencePolicy::from_toml(
            r#"
            [targets."subject:cc.v1.agents.>"]
            timeout = "3s"
            [targets."subject:cc.v1.agents.*.cmd.>"]
            timeout = "1s"
            [targets."subject:cc.v1.agents.a1.cmd.state"]
            timeout = "100ms"
            "#,
        )
        .unwrap();
        let watch = ResilienceWatch::fixed(&policy);
        let timeout = |t: &str| watch.policy_for(&t.parse().unwrap()).timeout;
        assert_eq!(
            timeout("subject:cc.v1.agents.a1.cmd.state"),
            Duration::from_millis(100)
        );
        assert_eq!(
            timeout("subject:cc.v1.agents.a2.cmd.state"),
            Duration::from_secs(1)
        );
        assert_eq!(
            timeout("subject:cc.v1.agents.a2.evt.missed"),
            Duration::from_secs(3)
        );
        assert_eq!(
            timeout("subject:cc.v1.calls.c1.incoming"),
            TargetPolicy::default().timeout
        );
        assert!(watch.configured(&"function:x".parse().unwrap()).is_none());
        assert_eq!(watch.targets().len(), 3);
    }
}
