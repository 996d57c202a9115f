//! What a function may do besides compute: the `bus`, `kv`, `config` and `log` imports of
//! the `event-handler` world.
//!
//! The guest-facing side lives here: the publish allow-list ([`PublishAllowList`], NATS
//! wildcards), kv key validation, the invocation deadline applied to requests and the
//! per-invocation log budget. Those checks run in the host *before* anything reaches
//! [`HostCapabilities`], so a forbidden publish or a malformed key never touches the bus.
//!
//! The bus-facing side is the [`HostCapabilities`] trait. This crate ships only the
//! in-memory [`MemoryCapabilities`] (for tests and benchmarks); the NATS implementation
//! (core publish/request, the function's JetStream KV bucket, the logs subject) belongs to
//! the node that wires triggers to the engine, not to this module.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use patchbay_bus::pattern::{Pattern, PatternError};

use crate::world::{self, BusError, Event, KvError, Level};

/// The bus, kv and log services behind a function's imports, implemented by the node over
/// NATS (and by [`MemoryCapabilities`] in memory).
///
/// One value serves one function version; the host has already checked the publish
/// allow-list, kv key syntax and the invocation deadline before calling any method.
pub trait HostCapabilities: Send + Sync + 'static {
    /// Publish `event` on `event.subject` (fire and forget).
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusError>>;

    /// Send `event` as a request on `event.subject` and wait at most `timeout` for the
    /// reply. The host has already shortened `timeout` to the invocation's deadline.
    fn request(&self, event: Event, timeout: Duration) -> BoxFuture<'_, Result<Event, BusError>>;

    /// The current value of `key` in the function's bucket.
    fn kv_get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, KvError>>;

    /// Store `value` under `key`; returns the new revision.
    fn kv_set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<u64, KvError>>;

    /// Remove `key` (a no-op when absent).
    fn kv_delete(&self, key: String) -> BoxFuture<'_, Result<(), KvError>>;

    /// Keys currently in the bucket, in no particular order.
    fn kv_keys(&self) -> BoxFuture<'_, Result<Vec<String>, KvError>>;

    /// Record one log line of the function (an explicit `log` call, or a line the guest
    /// wrote to stdout (`Info`) or stderr (`Warn`)).
    fn log(&self, level: Level, message: String);
}

/// The subjects a function may publish and send requests to (its `--publish` list).
///
/// Patterns use NATS wildcards: `*` matches one token, `>` (last token only) matches one
/// or more. Cheap to clone: the patterns are shared.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PublishAllowList {
    patterns: Arc<[Pattern]>,
}

/// A `--publish` pattern that is not a valid NATS subject pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid publish pattern {pattern:?}: {reason}")]
pub struct InvalidPattern {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    #[source]
    pub reason: PatternError,
}

impl PublishAllowList {
    /// An allow-list that allows nothing: every publish and request is `forbidden`.
    #[must_use]
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// An allow-list of the given patterns, each checked for NATS syntax.
    pub fn new<I, S>(patterns: I) -> Result<Self, InvalidPattern>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let patterns = patterns
            .into_iter()
            .map(|pattern| {
                let pattern = pattern.into();
                Pattern::new(pattern.clone()).map_err(|reason| InvalidPattern { pattern, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            patterns: patterns.into(),
        })
    }

    /// Whether a function may publish (or send a request) on `subject`.
    #[must_use]
    pub fn allows(&self, subject: &str) -> bool {
        self.patterns.iter().any(|pattern| pattern.matches(subject))
    }

    /// The patterns, in the order given.
    #[must_use]
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }
}

impl fmt::Debug for PublishAllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.patterns.iter()).finish()
    }
}

/// Whether the NATS subject `subject` matches `pattern` (see [`patchbay_bus::pattern`]):
/// a subject that is not publishable — empty tokens, whitespace, control characters or
/// wildcards of its own — matches nothing, so it can never slip through an allow-list.
#[must_use]
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    patchbay_bus::pattern::matches(pattern, subject)
}

/// Check a kv key the way the WIT promises: letters, digits and `-_=.`, no leading or
/// trailing dot (and no empty token, which NATS would reject as a subject).
pub fn validate_kv_key(key: &str) -> Result<(), KvError> {
    let valid_chars = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=' | '.'));
    let valid_dots = !key.starts_with('.') && !key.ends_with('.') && !key.contains("..");
    if key.is_empty() || !valid_chars || !valid_dots {
        return Err(KvError::InvalidKey(key.to_owned()));
    }
    Ok(())
}

/// What the capability imports of one invocation see: the function's configuration and
/// allow-list, the bus behind it, the deadline and the log budget.
pub(crate) struct CallContext {
    pub(crate) deadline: Instant,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    pub(crate) publish: PublishAllowList,
    pub(crate) capabilities: Arc<dyn HostCapabilities>,
    /// Log records the guest may still write in this invocation.
    pub(crate) logs_left: u32,
    /// Log records refused because the budget was spent.
    pub(crate) logs_dropped: u32,
}

impl CallContext {
    /// Record a log line unless the budget is spent (a guest logging in a loop must not
    /// flood the logs subject).
    pub(crate) fn record_log(&mut self, level: Level, message: String) {
        if self.logs_left == 0 {
            self.logs_dropped = self.logs_dropped.saturating_add(1);
            return;
        }
        self.logs_left -= 1;
        self.capabilities.log(level, message);
    }
}

// The `types` interface has no functions; the linker still wants its (empty) trait.
impl world::types::Host for CallContext {}

impl world::bus::Host for CallContext {
    async fn publish(&mut self, e: Event) -> Result<(), BusError> {
        if !self.publish.allows(&e.subject) {
            return Err(BusError::Forbidden(e.subject));
        }
        self.capabilities.publish(e).await
    }

    async fn request(&mut self, e: Event, timeout_ms: u32) -> Result<Event, BusError> {
        if !self.publish.allows(&e.subject) {
            return Err(BusError::Forbidden(e.subject));
        }
        // Never wait past the invocation's own deadline (DESIGN: deadlines are never
        // extended downstream).
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = Duration::from_millis(u64::from(timeout_ms)).min(remaining);
        if timeout.is_zero() {
            return Err(BusError::Timeout);
        }
        self.capabilities.request(e, timeout).await
    }
}

impl world::kv::Host for CallContext {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, KvError> {
        validate_kv_key(&key)?;
        self.capabilities.kv_get(key).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<u64, KvError> {
        validate_kv_key(&key)?;
        self.capabilities.kv_set(key, value).await
    }

    async fn delete(&mut self, key: String) -> Result<(), KvError> {
        validate_kv_key(&key)?;
        self.capabilities.kv_delete(key).await
    }

    async fn keys(&mut self) -> Result<Vec<String>, KvError> {
        self.capabilities.kv_keys().await
    }
}

impl world::config::Host for CallContext {
    async fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    async fn get_all(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }
}

impl world::log::Host for CallContext {
    async fn log(&mut self, level: Level, message: String) {
        self.record_log(level, message);
    }
}

/// How [`MemoryCapabilities`] answers requests: given the request, the reply or an error.
pub type Responder = Box<dyn Fn(&Event) -> Result<Event, BusError> + Send + Sync>;

/// In-memory [`HostCapabilities`]: records publishes, requests and logs, keeps kv in a
/// map, and answers requests with a [`Responder`] (or `no-responders` without one).
/// For tests and benchmarks; nothing leaves the process.
#[derive(Default)]
pub struct MemoryCapabilities {
    state: Mutex<MemoryState>,
    responder: Option<Responder>,
}

#[derive(Default)]
struct MemoryState {
    published: Vec<Event>,
    requests: Vec<(Event, Duration)>,
    logs: Vec<(Level, String)>,
    kv: HashMap<String, Vec<u8>>,
    revision: u64,
}

impl MemoryCapabilities {
    /// Empty kv, nothing recorded, no responder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Like [`MemoryCapabilities::new`], answering every request with `responder`.
    #[must_use]
    pub fn with_responder(
        responder: impl Fn(&Event) -> Result<Event, BusError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            state: Mutex::default(),
            responder: Some(Box::new(responder)),
        }
    }

    /// Events published so far, in order.
    #[must_use]
    pub fn published(&self) -> Vec<Event> {
        self.lock().published.clone()
    }

    /// Requests sent so far with the timeout the host granted, in order.
    #[must_use]
    pub fn requests(&self) -> Vec<(Event, Duration)> {
        self.lock().requests.clone()
    }

    /// Log records so far, in order.
    #[must_use]
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.lock().logs.clone()
    }

    /// The value stored under `key`, if any.
    #[must_use]
    pub fn kv_value(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().kv.get(key).cloned()
    }

    /// Store `value` under `key` directly (to seed a test); returns the new revision.
    pub fn kv_insert(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> u64 {
        let mut state = self.lock();
        state.revision += 1;
        state.kv.insert(key.into(), value.into());
        state.revision
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A panic while holding this lock cannot leave the records half-written in a way
        // that matters to a test, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryCapabilities")
            .field("published", &state.published.len())
            .field("requests", &state.requests.len())
            .field("logs", &state.logs.len())
            .field("kv_keys", &state.kv.len())
            .field("responder", &self.responder.is_some())
            .finish()
    }
}

impl HostCapabilities for MemoryCapabilities {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusError>> {
        self.lock().published.push(event);
        Box::pin(async { Ok(()) })
    }

    fn request(&self, event: Event, timeout: Duration) -> BoxFuture<'_, Result<Event, BusError>> {
        let reply = match &self.responder {
            Some(responder) => responder(&event),
            None => Err(BusError::NoResponders),
        };
        self.lock().requests.push((event, timeout));
        Box::pin(async { reply })
    }

    fn kv_get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, KvError>> {
        let value = self.kv_value(&key);
        Box::pin(async { Ok(value) })
    }

    fn kv_set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<u64, KvError>> {
        let revision = self.kv_insert(key, value);
        Box::pin(async move { Ok(revision) })
    }

    fn kv_delete(&self, key: String) -> BoxFuture<'_, Result<(), KvError>> {
        self.lock().kv.remove(&key);
        Box::pin(async { Ok(()) })
    }

    fn kv_keys(&self) -> BoxFuture<'_, Result<Vec<String>, KvError>> {
        let keys = self.lock().kv.keys().cloned().collect();
        Box::pin(async { Ok(keys) })
    }

    fn log(&self, level: Level, message: String) {
        self.lock().logs.push((level, message));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn literal_pattern_matches_only_the_same_subject() {
        assert!(subject_matches("cc.v1.calls", "cc.v1.calls"));
        assert!(!subject_matches("cc.v1.calls", "cc.v1.call"));
        assert!(!subject_matches("cc.v1.calls", "cc.v1.calls.x"));
        assert!(!subject_matches("cc.v1.calls.x", "cc.v1.calls"));
    }

    #[test]
    fn star_matches_exactly_one_token() {
        assert!(subject_matches("cc.*.ended", "cc.42.ended"));
        assert!(!subject_matches("cc.*.ended", "cc.ended"));
        assert!(!subject_matches("cc.*.ended", "cc.4.2.ended"));
        assert!(subject_matches("*", "anything"));
        assert!(!subject_matches("*", "two.tokens"));
    }

    #[test]
    fn greater_than_matches_one_or_more_trailing_tokens() {
        assert!(subject_matches("cc.>", "cc.a"));
        assert!(subject_matches("cc.>", "cc.a.b.c"));
        assert!(!subject_matches("cc.>", "cc"));
        assert!(subject_matches(">", "a.b"));
        assert!(!subject_matches("cc.>", "dd.a"));
    }

    #[test]
    fn unpublishable_subjects_match_nothing() {
        for subject in [
            "", "cc..a", ".cc", "cc.", "cc.*", "cc.>", "cc.a b", "cc.\u{7}",
        ] {
            assert!(!subject_matches(">", subject), "{subject:?} matched `>`");
            assert!(
                !subject_matches("cc.*", subject),
                "{subject:?} matched `cc.*`"
            );
        }
    }

    #[test]
    fn allow_list_rejects_malformed_patterns() {
        for pattern in ["", "a..b", ".a", "a.", "a.>.b", "a.b*", "a.>x", "a b"] {
            let error = PublishAllowList::new([pattern]).unwrap_err();
            assert_eq!(error.pattern, pattern);
        }
    }

    #[test]
    fn allow_list_allows_any_matching_pattern_and_deny_all_allows_none() {
        let list = PublishAllowList::new(["cc.v1.calls.*.routed", "audit.>"]).unwrap();
        assert!(list.allows("cc.v1.calls.7.routed"));
        assert!(list.allows("audit.x.y"));
        assert!(!list.allows("cc.v1.calls.7.closed"));
        assert!(!PublishAllowList::deny_all().allows("audit.x"));
    }

    #[test]
    fn kv_keys_follow_the_wit_rules() {
        for key in ["a", "user-1", "a.b", "A_b=c", "0"] {
            assert_eq!(validate_kv_key(key), Ok(()), "{key:?}");
        }
        for key in ["", ".a", "a.", "a..b", "a/b", "a b", "a*", "ключ"] {
            assert_eq!(
                validate_kv_key(key),
                Err(KvError::InvalidKey(key.to_owned())),
                "{key:?}"
            );
        }
    }
}
