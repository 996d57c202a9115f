//! Hot reload of the rules file.
//!
//! The file is re-read every poll interval and re-validated whenever its content changes
//! (comparing content rather than mtime works on every file system, with editors that
//! replace the file, and with coarse timestamps; the file is small). A valid new version
//! replaces the rules atomically for the next call; an invalid one is logged with every
//! problem, counted, and ignored — the previous rules stay in force. The same broken
//! content is reported once, not at every poll.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::rules::{Rules, RulesError};

/// The rules in force, shared between the watcher and the call handlers.
#[derive(Debug, Clone)]
pub struct RulesHandle(Arc<RwLock<Arc<Rules>>>);

impl RulesHandle {
    /// A handle holding `rules`.
    #[must_use]
    pub fn new(rules: Rules) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(rules))))
    }

    /// The rules in force now (a snapshot: a reload does not change it under the caller).
    #[must_use]
    pub fn current(&self) -> Arc<Rules> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, rules: Rules) {
        // Writers only swap an Arc, so a poisoned lock still holds a whole value.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(rules);
    }
}

/// What one poll did.
#[derive(Debug)]
pub enum Reload {
    /// Content unchanged (or the same broken content as last time).
    Unchanged,
    /// New rules are in force.
    Reloaded,
    /// The new content is unusable; the previous rules stay.
    Failed(RulesError),
}

/// Watches one rules file and swaps the rules of a [`RulesHandle`].
#[derive(Debug)]
pub struct RulesWatcher {
    path: PathBuf,
    handle: RulesHandle,
    /// The content last looked at (valid or not), to act on changes only.
    seen: Option<String>,
}

impl RulesWatcher {
    /// Load `path` (it must be valid: the service does not start without rules) and watch
    /// it from now on.
    pub fn load(path: &Path) -> Result<(Self, RulesHandle), RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.to_owned(),
            source,
        })?;
        let handle = RulesHandle::new(Rules::parse(&text)?);
        let watcher = Self {
            path: path.to_owned(),
            handle: handle.clone(),
            seen: Some(text),
        };
        Ok((watcher, handle))
    }

    /// Look at the file once.
    pub async fn poll(&mut self) -> Reload {
        match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => self.apply(text),
            Err(source) => {
                // A missing file is often an editor replacing it: report it once, keep
                // the rules, and pick the new content up when it appears.
                let marker = format!("\0unreadable: {}", source.kind());
                if self.seen.as_deref() == Some(marker.as_str()) {
                    return Reload::Unchanged;
                }
                self.seen = Some(marker);
                Reload::Failed(RulesError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    fn apply(&mut self, text: String) -> Reload {
        if self.seen.as_deref() == Some(text.as_str()) {
            return Reload::Unchanged;
        }
        let parsed = Rules::parse(&text);
        self.seen = Some(text);
        match parsed {
            Ok(rules) => {
                self.handle.replace(rules);
                Reload::Reloaded
            }
            Err(e) => Reload::Failed(e),
        }
    }

    /// Poll every `interval` until `stop`, logging and counting each reload.
    pub async fn run(
        mut self,
        interval: Duration,
        reloads: prometheus::IntCounterVec,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.poll().await {
                Reload::Unchanged => {}
                Reload::Reloaded => {
                    reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(path = %self.path.display(), "rules reloaded");
                }
                Reload::Failed(error) => {
                    reloads.with_label_values(&["failed"]).inc();
                    tracing::error!(
                        path = %self.path.display(),
                        %error,
                        "rules reload failed; the previous rules stay in force"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules_text(queue: &str) -> String {
        format!("[[queues]]\nname = \"{queue}\"\n[default]\nqueue = \"{queue}\"\n")
    }

    #[tokio::test]
    async fn a_valid_edit_replaces_the_rules_and_a_broken_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.toml");
        std::fs::write(&path, rules_text("one")).unwrap();
        let (mut watcher, handle) = RulesWatcher::load(&path).unwrap();
        let before = handle.current();
        assert!(matches!(watcher.poll().await, Reload::Unchanged));

        std::fs::write(&path, rules_text("two")).unwrap();
        assert!(matches!(watcher.poll().await, Reload::Reloaded));
        assert_eq!(handle.current().default.action.queue, "two");
        // A snapshot taken before the reload is not changed under its holder.
        assert_eq!(before.default.action.queue, "one");

        std::fs::write(&path, "[default]\nqueue = \"nowhere\"\n").unwrap();
        match watcher.poll().await {
            Reload::Failed(e) => assert!(e.to_string().contains("queue 'nowhere' is not declared")),
            other => panic!("expected a failed reload, got {other:?}"),
        }
        assert_eq!(handle.current().default.action.queue, "two");
        // The same broken content is reported once.
        assert!(matches!(watcher.poll().await, Reload::Unchanged));

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            watcher.poll().await,
            Reload::Failed(RulesError::Read { .. })
        ));
        assert!(matches!(watcher.poll().await, Reload::Unchanged));
        std::fs::write(&path, rules_text("three")).unwrap();
        assert!(matches!(watcher.poll().await, Reload::Reloaded));
        assert_eq!(handle.current().default.action.queue, "three");
    }

    #[test]
    fn the_service_does_not_start_with_invalid_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.toml");
        std::fs::write(&path, "[default]\nqueue = \"nowhere\"\n").unwrap();
        assert!(matches!(
            RulesWatcher::load(&path),
            Err(RulesError::Invalid { .. })
        ));
    }
}
