//! [`Health`]: readiness checks registered by the parts of a process (bus connection,
//! registry watch, …) and read by `/readyz`. Liveness (`/healthz`) needs no state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A cheap clonable set of named readiness checks. The process is ready when every
/// registered check is ready; with no checks it is ready.
#[derive(Clone, Debug, Default)]
pub struct Health {
    checks: Arc<Mutex<Vec<ReadyFlag>>>,
}

impl Health {
    /// An empty set (ready).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check named `name` (e.g. `"nats"`), initially **not ready**, and returns the
    /// flag its owner flips. Registering a name twice adds a second, independent check.
    pub fn register(&self, name: impl Into<String>) -> ReadyFlag {
        let flag = ReadyFlag {
            name: name.into().into(),
            ready: Arc::new(AtomicBool::new(false)),
        };
        self.lock().push(flag.clone());
        flag
    }

    /// The check named `name`, registered if there is none, and set **not ready** either
    /// way: what a service restarted inside its process calls, so that its checks are
    /// the same ones `/readyz` already lists, not stale twins.
    pub fn check(&self, name: &str) -> ReadyFlag {
        let mut checks = self.lock();
        if let Some(flag) = checks.iter().find(|flag| flag.name() == name) {
            flag.set_ready(false);
            return flag.clone();
        }
        let flag = ReadyFlag {
            name: name.into(),
            ready: Arc::new(AtomicBool::new(false)),
        };
        checks.push(flag.clone());
        flag
    }

    /// Marks every check whose name starts with `prefix` not ready (a service whose task
    /// ended: its checks stay listed, unready, until it is running again).
    pub fn set_unready_below(&self, prefix: &str) {
        for flag in self
            .lock()
            .iter()
            .filter(|flag| flag.name().starts_with(prefix))
        {
            flag.set_ready(false);
        }
    }

    /// Names of the checks that are not ready, in registration order.
    #[must_use]
    pub fn not_ready(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|flag| !flag.is_ready())
            .map(|flag| flag.name().to_owned())
            .collect()
    }

    /// Every check with its state, in registration order.
    #[must_use]
    pub fn checks(&self) -> Vec<(String, bool)> {
        self.lock()
            .iter()
            .map(|flag| (flag.name().to_owned(), flag.is_ready()))
            .collect()
    }

    /// Whether every check is ready.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.lock().iter().all(ReadyFlag::is_ready)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReadyFlag>> {
        // The list is only ever pushed to, so a panic elsewhere cannot leave it half-written.
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One readiness check; clones share the same state.
#[derive(Clone, Debug)]
pub struct ReadyFlag {
    name: Arc<str>,
    ready: Arc<AtomicBool>,
}

impl ReadyFlag {
    /// Marks the check ready or not (e.g. on bus connect / disconnect).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the check is ready.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The name given at registration.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_is_ready() {
        let health = Health::new();
        assert!(health.is_ready(), "no checks means ready");
        let nats = health.register("nats");
        let registry = health.register("registry");
        assert_eq!(health.not_ready(), ["nats", "registry"]);
        nats.set_ready(true);
        assert_eq!(health.not_ready(), ["registry"]);
        assert!(!health.is_ready());
        registry.clone().set_ready(true);
        assert!(health.is_ready());
        nats.set_ready(false);
        assert_eq!(health.clone().not_ready(), ["nats"]);
    }
}
