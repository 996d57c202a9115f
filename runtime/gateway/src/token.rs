//! API tokens: what a gateway caller presents (`Authorization: Bearer pbt_<id>_<secret>`),
//! what it may do ([`Scope`]), and where tokens live (the JetStream KV bucket
//! [`TOKENS_BUCKET`]).
//!
//! A token is `pbt_` + an 8-hex-digit id + `_` + 64 hex digits of secret (32 random bytes).
//! The bucket stores a [`TokenRecord`] (name, scopes, expiry, rate) under the key
//! `hex(sha256(token))` — never the token itself, so reading the bucket (the gateway's only
//! right on it) does not reveal a usable token. The id is not secret: it names the token
//! in listings, revocation and rate limiting.
//!
//! [`TokenStore::authenticate`] caches lookups in memory, positive and negative, and keeps
//! the cache honest with a KV watch that evicts a key on every change to it: a revoked
//! token is refused as soon as the delete reaches the gateway, and a freshly created one
//! works at once. While the watch is down, lookups bypass the cache.
//!
//! This module does not answer HTTP callers (the gateway maps [`AuthError`] through
//! [`AuthError::problem`]), rate-limit ([`crate::ratelimit`]) or parse command lines (the
//! `patchbay token` commands live in the CLI).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::{StreamExt as _, TryStreamExt as _};
use patchbay_bus::Bus;
use patchbay_bus::subject::{Token, is_valid_pattern, matches};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::problem::Problem;

/// The KV bucket holding token records (created by the admin bootstrap).
pub const TOKENS_BUCKET: &str = "patchbay-tokens";

/// Every token starts with this, so a leaked one is recognisable (secret scanners).
pub const TOKEN_PREFIX: &str = "pbt_";

/// Hex digits in a token id.
const ID_HEX: usize = 8;
/// Hex digits in a token secret (32 bytes).
const SECRET_HEX: usize = 64;
/// How long "no such token" is remembered. The watch evicts the entry as soon as the key is
/// written, so this only bounds memory churn, not correctness.
const NEGATIVE_TTL_MS: u64 = 30_000;
/// Most "no such token" answers remembered: random garbage must not grow memory.
const MAX_NEGATIVE: usize = 10_000;
/// Longest token name.
const MAX_NAME_LEN: usize = 128;

/// Errors of the token store (admin operations and setup).
#[derive(Debug, Error)]
pub enum TokenError {
    /// The bucket could not be opened (missing bootstrap, or no right to read it).
    #[error("failed to open KV bucket {bucket:?}: {reason}")]
    Open {
        /// The bucket.
        bucket: &'static str,
        /// Why.
        reason: String,
    },
    /// A read or write on the bucket failed.
    #[error("failed to {operation} in KV bucket {TOKENS_BUCKET:?}: {reason}")]
    Store {
        /// What was being done (`list keys`, `read key …`, `write key …`, `delete key …`).
        operation: String,
        /// Why.
        reason: String,
    },
    /// A value in the bucket is not a token record.
    #[error("KV bucket {TOKENS_BUCKET:?} key {key:?} does not hold a token record: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A new token's settings are invalid.
    #[error("invalid token {field}: {reason}")]
    Invalid {
        /// The setting (`name`, `scopes`, `rate`, `burst`, `expiry`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result alias for token store operations.
pub type Result<T, E = TokenError> = std::result::Result<T, E>;

/// Why a request's token was refused. The first four are the caller's fault (401); their
/// messages are safe to send. [`AuthError::Store`] is the gateway's problem (503).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// No `Authorization` header, or an empty token.
    #[error("no API token: send `Authorization: Bearer <token>`")]
    Missing,
    /// Not a bearer token of the form `pbt_<id>_<secret>`.
    #[error("malformed API token: expected `Authorization: Bearer pbt_<id>_<secret>`")]
    Malformed,
    /// Well-formed, but not (or no longer) in the store.
    #[error("unknown or revoked API token")]
    Unknown,
    /// Known, but past its expiry.
    #[error("API token {id} has expired")]
    Expired {
        /// The token's id (not secret).
        id: String,
    },
    /// The store could not be read; the caller may retry.
    #[error("token store unavailable: {reason}")]
    Store {
        /// Why (for the log, not for the caller).
        reason: String,
    },
}

impl AuthError {
    /// The answer for the caller: 401 with this error's message for the caller's own
    /// mistakes, a generic 503 for a store failure (whose reason belongs in the log).
    #[must_use]
    pub fn problem(&self) -> Problem {
        match self {
            Self::Store { .. } => Problem::service_unavailable(
                "the API token could not be checked right now; retry shortly",
            ),
            _ => Problem::unauthorized(self.to_string()),
        }
    }
}

/// Why a scope string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScopeError {
    /// `publish:` with nothing after it.
    #[error("scope {scope:?} has an empty subject pattern")]
    EmptyPattern {
        /// The scope as given.
        scope: String,
    },
    /// `publish:<pattern>` where the pattern is not a NATS subject pattern.
    #[error(
        "scope {scope:?}: {pattern:?} is not a valid subject pattern (dot-separated tokens without spaces; `*` matches one token, a final `>` the rest)"
    )]
    InvalidPattern {
        /// The scope as given.
        scope: String,
        /// The pattern.
        pattern: String,
    },
    /// `invoke:` with nothing after it.
    #[error("scope {scope:?} has an empty function name (use \"invoke:*\" for every function)")]
    EmptyFunction {
        /// The scope as given.
        scope: String,
    },
    /// `invoke:<name>` where the name is not a function name.
    #[error("scope {scope:?}: {function:?} is not a valid function name ({reason})")]
    InvalidFunction {
        /// The scope as given.
        scope: String,
        /// The function name.
        function: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither `publish:…`, `invoke:…` nor `admin`.
    #[error(
        "unknown scope {scope:?}: expected publish:<subject-pattern>, invoke:<function> or admin"
    )]
    UnknownKind {
        /// The scope as given.
        scope: String,
    },
}

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `publish:<pattern>` — publish events on subjects matching the NATS pattern (`*` one
    /// token, a final `>` the rest).
    Publish(String),
    /// `invoke:<function>` — invoke that function; `invoke:*` any function.
    Invoke(String),
    /// `admin` — everything.
    Admin,
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(text: &str) -> Result<Self, ScopeError> {
        let scope = || text.to_owned();
        if text == "admin" {
            return Ok(Self::Admin);
        }
        if let Some(pattern) = text.strip_prefix("publish:") {
            if pattern.is_empty() {
                return Err(ScopeError::EmptyPattern { scope: scope() });
            }
            if !is_valid_pattern(pattern) {
                return Err(ScopeError::InvalidPattern {
                    scope: scope(),
                    pattern: pattern.to_owned(),
                });
            }
            return Ok(Self::Publish(pattern.to_owned()));
        }
        if let Some(function) = text.strip_prefix("invoke:") {
            if function.is_empty() {
                return Err(ScopeError::EmptyFunction { scope: scope() });
            }
            if function != "*" {
                Token::new(function).map_err(|e| ScopeError::InvalidFunction {
                    scope: scope(),
                    function: function.to_owned(),
                    reason: match e {
                        patchbay_bus::subject::SubjectError::InvalidToken { reason, .. } => {
                            reason.to_owned()
                        }
                        other => other.to_string(),
                    },
                })?;
            }
            return Ok(Self::Invoke(function.to_owned()));
        }
        Err(ScopeError::UnknownKind { scope: scope() })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Publish(pattern) => write!(f, "publish:{pattern}"),
            Self::Invoke(function) => write!(f, "invoke:{function}"),
            Self::Admin => f.write_str("admin"),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What the store keeps about a token (everything but the token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's public id (the `<id>` in `pbt_<id>_<secret>`).
    pub id: String,
    /// A label for people (`crm`, `dev`).
    pub name: String,
    /// What the token allows.
    pub scopes: Vec<Scope>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Expiry, milliseconds since the Unix epoch; `None` never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Requests per second this token may make (the gateway default if `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<f64>,
    /// Requests this token may make in a burst (the gateway default if `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl TokenRecord {
    /// Whether the token may publish on the concrete `subject`.
    #[must_use]
    pub fn allows_publish(&self, subject: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Admin => true,
            Scope::Publish(pattern) => matches(pattern, subject),
            Scope::Invoke(_) => false,
        })
    }

    /// Whether the token may invoke `function`.
    #[must_use]
    pub fn allows_invoke(&self, function: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Admin => true,
            Scope::Invoke(name) => name == "*" || name == function,
            Scope::Publish(_) => false,
        })
    }

    /// Whether the token has the `admin` scope.
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether the token has expired at `now_ms` (expiry is exclusive: a token expiring at
    /// `t` is refused from `t` on).
    #[must_use]
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }
}

/// The settings of a token to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewToken {
    /// A label for people.
    pub name: String,
    /// What the token allows (at least one).
    pub scopes: Vec<Scope>,
    /// Lifetime from creation; `None` never expires.
    pub expires_in: Option<Duration>,
    /// Requests per second (gateway default if `None`).
    pub rate_per_sec: Option<f64>,
    /// Burst size (gateway default if `None`).
    pub burst: Option<u32>,
}

impl NewToken {
    /// A token called `name` with `scopes`, no expiry and the gateway's default rate.
    #[must_use]
    pub fn new(name: impl Into<String>, scopes: Vec<Scope>) -> Self {
        Self {
            name: name.into(),
            scopes,
            expires_in: None,
            rate_per_sec: None,
            burst: None,
        }
    }

    /// Expire `after` the creation time.
    #[must_use]
    pub fn expires_in(mut self, after: Duration) -> Self {
        self.expires_in = Some(after);
        self
    }

    /// Allow `per_sec` requests per second.
    #[must_use]
    pub fn rate_per_sec(mut self, per_sec: f64) -> Self {
        self.rate_per_sec = Some(per_sec);
        self
    }

    /// Allow bursts of `burst` requests.
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| {
            Err(TokenError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.name.trim().is_empty() {
            return invalid("name", "must not be empty");
        }
        if self.name.len() > MAX_NAME_LEN || self.name.chars().any(char::is_control) {
            return invalid(
                "name",
                "must be at most 128 bytes without control characters",
            );
        }
        if self.scopes.is_empty() {
            return invalid(
                "scopes",
                "at least one scope is required (publish:<pattern>, invoke:<function> or admin)",
            );
        }
        if self
            .rate_per_sec
            .is_some_and(|r| !r.is_finite() || r <= 0.0)
        {
            return invalid(
                "rate",
                "must be a finite number of requests per second above 0",
            );
        }
        if self.burst == Some(0) {
            return invalid("burst", "must be at least 1");
        }
        if self.expires_in == Some(Duration::ZERO) {
            return invalid("expiry", "must be longer than zero");
        }
        Ok(())
    }
}

/// A fresh token and its id. The token is shown to its owner once and never stored.
#[must_use]
pub fn new_token() -> (String, String) {
    // `rand::rng()` is a CSPRNG (ChaCha, seeded from the OS), suitable for secrets.
    let mut rng = rand::rng();
    let mut id = [0_u8; ID_HEX / 2];
    let mut secret = [0_u8; SECRET_HEX / 2];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let token = format!("{TOKEN_PREFIX}{id}_{}", hex::encode(secret));
    (token, id)
}

/// The KV key of `token`: `hex(sha256(token))`.
#[must_use]
pub fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The id of a well-formed token (`pbt_<8 hex>_<64 hex>`, lowercase).
fn token_id(token: &str) -> Result<&str, AuthError> {
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let (id, secret) = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .ok_or(AuthError::Malformed)?;
    if is_hex(id, ID_HEX) && is_hex(secret, SECRET_HEX) {
        Ok(id)
    } else {
        Err(AuthError::Malformed)
    }
}

/// The bearer token of a request's `Authorization` header.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?.trim();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    // The scheme is case-insensitive (RFC 9110 §11.1).
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err(AuthError::Malformed),
    }
}

/// The in-memory view of the bucket, kept honest by the watch task.
#[derive(Debug, Default)]
struct Cache {
    /// Whether a watch is running; without one nothing is cached.
    live: bool,
    /// Bumped on every change the watch reports, so a lookup that raced a change does not
    /// cache what it read before it.
    generation: u64,
    /// Records by key.
    known: HashMap<String, TokenRecord>,
    /// Keys known to be absent, until the given time (ms).
    unknown: HashMap<String, u64>,
}

impl Cache {
    fn forget(&mut self, key: Option<&str>) {
        self.generation += 1;
        match key {
            Some(key) => {
                self.known.remove(key);
                self.unknown.remove(key);
            }
            None => {
                self.known.clear();
                self.unknown.clear();
            }
        }
    }

    fn remember_unknown(&mut self, key: String, now_ms: u64) {
        if self.unknown.len() >= MAX_NEGATIVE {
            self.unknown.retain(|_, until| *until > now_ms);
            if self.unknown.len() >= MAX_NEGATIVE {
                self.unknown.clear();
            }
        }
        self.unknown
            .insert(key, now_ms.saturating_add(NEGATIVE_TTL_MS));
    }
}

type SharedCache = Arc<Mutex<Cache>>;

fn lock(cache: &SharedCache) -> MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stops the watch task when the last clone of the store goes.
#[derive(Debug)]
struct WatchTask(tokio::task::AbortHandle);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The token bucket: admin operations for the CLI, cached authentication for the gateway.
/// Cheap to clone; clones share the cache and the watch.
#[derive(Clone)]
pub struct TokenStore {
    kv: kv::Store,
    cache: SharedCache,
    _watch: Arc<WatchTask>,
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cache = lock(&self.cache);
        f.debug_struct("TokenStore")
            .field("bucket", &TOKENS_BUCKET)
            .field("live", &cache.live)
            .field("cached", &cache.known.len())
            .finish_non_exhaustive()
    }
}

impl TokenStore {
    /// Open [`TOKENS_BUCKET`] on `bus` and start watching it (needs a Tokio runtime).
    pub async fn open(bus: &Bus) -> Result<Self> {
        let kv = bus
            .jetstream()
            .get_key_value(TOKENS_BUCKET)
            .await
            .map_err(|e| TokenError::Open {
                bucket: TOKENS_BUCKET,
                reason: e.to_string(),
            })?;
        Self::from_kv(kv).await
    }

    /// Use an already opened bucket and start watching it.
    pub async fn from_kv(kv: kv::Store) -> Result<Self> {
        // The first watch is created before returning, so the cache is trustworthy from
        // the first lookup on.
        let watch = kv.watch_all().await.map_err(|e| TokenError::Open {
            bucket: TOKENS_BUCKET,
            reason: format!("cannot watch it: {e}"),
        })?;
        let cache: SharedCache = Arc::new(Mutex::new(Cache {
            live: true,
            ..Cache::default()
        }));
        let task = tokio::spawn(watch_changes(kv.clone(), Arc::clone(&cache), watch));
        Ok(Self {
            kv,
            cache,
            _watch: Arc::new(WatchTask(task.abort_handle())),
        })
    }

    /// Create a token: store its record under its hash and return the token (to show
    /// once) with the record.
    pub async fn create(&self, spec: NewToken, now_ms: u64) -> Result<(String, TokenRecord)> {
        spec.validate()?;
        let taken: Vec<String> = self.list().await?.into_iter().map(|r| r.id).collect();
        // Ids are 32 random bits: a clash is unlikely but would make `revoke <id>`
        // ambiguous, so draw again.
        let (token, id) = loop {
            let (token, id) = new_token();
            if !taken.contains(&id) {
                break (token, id);
            }
        };
        let expires_at_ms = match spec.expires_in {
            Some(after) => Some(
                u64::try_from(after.as_millis())
                    .ok()
                    .and_then(|ms| now_ms.checked_add(ms))
                    .ok_or_else(|| TokenError::Invalid {
                        field: "expiry",
                        reason: format!("{after:?} is too far in the future"),
                    })?,
            ),
            None => None,
        };
        let record = TokenRecord {
            id,
            name: spec.name,
            scopes: spec.scopes,
            created_at_ms: now_ms,
            expires_at_ms,
            rate_per_sec: spec.rate_per_sec,
            burst: spec.burst,
        };
        let key = token_key(&token);
        let value = serde_json::to_vec(&record).map_err(|e| TokenError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        // `create` refuses an existing key: never overwrite a record.
        self.kv
            .create(&key, value.into())
            .await
            .map_err(|e| TokenError::Store {
                operation: format!("write key {key}"),
                reason: e.to_string(),
            })?;
        Ok((token, record))
    }

    /// Every token record (records that do not decode are logged and skipped, so one bad
    /// value does not hide the others).
    pub async fn list(&self) -> Result<Vec<TokenRecord>> {
        let mut records: Vec<TokenRecord> =
            self.entries().await?.into_iter().map(|(_, r)| r).collect();
        records.sort_by(|a, b| {
            (a.created_at_ms, &a.id, &a.name).cmp(&(b.created_at_ms, &b.id, &b.name))
        });
        Ok(records)
    }

    /// Revoke every token with this id; `false` if there was none.
    pub async fn revoke(&self, id: &str) -> Result<bool> {
        let mut found = false;
        for (key, record) in self.entries().await? {
            if record.id == id {
                self.kv.delete(&key).await.map_err(|e| TokenError::Store {
                    operation: format!("delete key {key}"),
                    reason: e.to_string(),
                })?;
                found = true;
            }
        }
        Ok(found)
    }

    /// The record of the token `bearer` (the token string, without `Bearer `), if it is
    /// well-formed, known and not expired at `now_ms`.
    pub async fn authenticate(
        &self,
        bearer: &str,
        now_ms: u64,
    ) -> std::result::Result<TokenRecord, AuthError> {
        let token = bearer.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let id = token_id(token)?;
        let key = token_key(token);

        let generation = {
            let cache = lock(&self.cache);
            if cache.live {
                if let Some(record) = cache.known.get(&key) {
                    return check_expiry(record.clone(), now_ms);
                }
                if cache.unknown.get(&key).is_some_and(|until| *until > now_ms) {
                    return Err(AuthError::Unknown);
                }
            }
            cache.generation
        };

        let found = self
            .kv
            .get(key.as_str())
            .await
            .map_err(|e| AuthError::Store {
                reason: format!("reading key {key}: {e}"),
            })?;
        let record = match found {
            Some(bytes) => Some(decode(&key, &bytes).map_err(|e| AuthError::Store {
                reason: e.to_string(),
            })?),
            None => None,
        };
        {
            // Cache only if nothing changed in the bucket since before the read; otherwise
            // the answer is still right for this request but may be stale for the next.
            let mut cache = lock(&self.cache);
            if cache.live && cache.generation == generation {
                match &record {
                    Some(record) => {
                        cache.known.insert(key, record.clone());
                    }
                    None => cache.remember_unknown(key, now_ms),
                }
            }
        }
        match record {
            // The id is part of the hashed token, so a mismatch means a tampered record.
            Some(record) if record.id == id => check_expiry(record, now_ms),
            _ => Err(AuthError::Unknown),
        }
    }

    /// Every (key, record) in the bucket.
    async fn entries(&self) -> Result<Vec<(String, TokenRecord)>> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| TokenError::Store {
                operation: "list keys".into(),
                reason: e.to_string(),
            })?
            .try_collect()
            .await
            .map_err(|e| TokenError::Store {
                operation: "list keys".into(),
                reason: e.to_string(),
            })?;
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let value = self
                .kv
                .get(key.as_str())
                .await
                .map_err(|e| TokenError::Store {
                    operation: format!("read key {key}"),
                    reason: e.to_string(),
                })?;
            // Deleted between listing and reading.
            let Some(value) = value else { continue };
            match decode(&key, &value) {
                Ok(record) => entries.push((key, record)),
                Err(e) => tracing::warn!(error = %e, "skipping corrupt token record"),
            }
        }
        Ok(entries)
    }
}

fn check_expiry(record: TokenRecord, now_ms: u64) -> std::result::Result<TokenRecord, AuthError> {
    if record.is_expired(now_ms) {
        Err(AuthError::Expired { id: record.id })
    } else {
        Ok(record)
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<TokenRecord> {
    serde_json::from_slice(bytes).map_err(|e| TokenError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Evict every key the bucket reports a change for. If the watch fails, forget
/// everything (a change may have been missed); if it ends, stop caching until a new watch
/// is running.
async fn watch_changes(kv: kv::Store, cache: SharedCache, mut watch: kv::Watch) {
    loop {
        while let Some(change) = watch.next().await {
            match change {
                Ok(entry) => lock(&cache).forget(Some(&entry.key)),
                Err(e) => {
                    tracing::warn!(error = %e, "token watch error; clearing the token cache");
                    lock(&cache).forget(None);
                }
            }
        }
        {
            let mut c = lock(&cache);
            c.live = false;
            c.forget(None);
        }
        tracing::warn!(
            "token watch ended; checking every token against the store until it is back"
        );
        let mut backoff = Duration::from_millis(250);
        watch = loop {
            tokio::time::sleep(backoff).await;
            match kv.watch_all().await {
                Ok(watch) => break watch,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the token bucket yet");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        let mut c = lock(&cache);
        c.forget(None);
        c.live = true;
        tracing::info!("token watch re-established");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record(scopes: &[&str]) -> TokenRecord {
        TokenRecord {
            id: "0123abcd".into(),
            name: "t".into(),
            scopes: scopes.iter().map(|s| s.parse().unwrap()).collect(),
            created_at_ms: 1_000,
            expires_at_ms: None,
            rate_per_sec: None,
            burst: None,
        }
    }

    #[test]
    fn scopes_round_trip_through_their_string_form() {
        for text in [
            "publish:cc.v1.calls.*.incoming",
            "publish:cc.v1.>",
            "publish:>",
            "invoke:recording-index",
            "invoke:*",
            "admin",
        ] {
            let scope: Scope = text.parse().unwrap();
            assert_eq!(scope.to_string(), text);
        }
    }

    #[test]
    fn invalid_scopes_say_what_is_wrong() {
        let error = |text: &str| text.parse::<Scope>().unwrap_err().to_string();
        assert_eq!(
            error("publish:"),
            "scope \"publish:\" has an empty subject pattern"
        );
        assert!(error("publish:cc..x").contains("is not a valid subject pattern"));
        assert!(error("publish:cc.>.x").contains("is not a valid subject pattern"));
        assert!(error("publish:cc.a*").contains("is not a valid subject pattern"));
        assert!(error("invoke:").contains("empty function name"));
        assert!(error("invoke:a.b").contains("is not a valid function name"));
        assert!(error("invoke:a.b").contains("only ASCII letters"));
        assert_eq!(
            error("subscribe:x"),
            "unknown scope \"subscribe:x\": expected publish:<subject-pattern>, invoke:<function> or admin"
        );
        assert!(error("Admin").starts_with("unknown scope"));
    }

    #[test]
    fn publish_scopes_match_subjects_with_nats_wildcards() {
        let r = record(&["publish:cc.v1.calls.*.incoming", "publish:cc.v1.agents.>"]);
        assert!(r.allows_publish("cc.v1.calls.c1.incoming"));
        assert!(r.allows_publish("cc.v1.agents.a1.cmd.accept"));
        assert!(!r.allows_publish("cc.v1.calls.c1.routed"));
        assert!(!r.allows_publish("cc.v1.agents"));
        assert!(!r.allows_invoke("anything"));
        assert!(!r.is_admin());
    }

    #[test]
    fn invoke_scopes_name_one_function_or_all() {
        let one = record(&["invoke:recording-index"]);
        assert!(one.allows_invoke("recording-index"));
        assert!(!one.allows_invoke("other"));
        assert!(!one.allows_publish("cc.v1.calls.c1.incoming"));
        let all = record(&["invoke:*"]);
        assert!(all.allows_invoke("other"));
        assert!(!all.allows_publish("cc.v1.calls.c1.incoming"));
    }

    #[test]
    fn admin_allows_everything() {
        let r = record(&["admin"]);
        assert!(r.is_admin());
        assert!(r.allows_publish("cc.v1.calls.c1.routed"));
        assert!(r.allows_invoke("anything"));
    }

    #[test]
    fn expiry_is_exclusive() {
        let mut r = record(&["admin"]);
        assert!(!r.is_expired(u64::MAX));
        r.expires_at_ms = Some(5_000);
        assert!(!r.is_expired(4_999));
        assert!(r.is_expired(5_000));
    }

    #[test]
    fn records_serialise_scopes_as_strings_and_refuse_bad_ones() {
        let mut r = record(&["publish:cc.v1.>", "invoke:*"]);
        r.rate_per_sec = Some(2.5);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["scopes"],
            serde_json::json!(["publish:cc.v1.>", "invoke:*"])
        );
        assert!(json.get("expires_at_ms").is_none());
        let back: TokenRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);

        let bad = serde_json::json!({"id": "0123abcd", "name": "t", "scopes": ["root"],
                                     "created_at_ms": 1});
        let e = serde_json::from_value::<TokenRecord>(bad).unwrap_err();
        assert!(e.to_string().contains("unknown scope \"root\""), "{e}");
    }

    #[test]
    fn new_tokens_are_well_formed_distinct_and_carry_their_id() {
        let (a, id_a) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_PREFIX.len() + ID_HEX + 1 + SECRET_HEX);
        assert_eq!(token_id(&a), Ok(id_a.as_str()));
        assert!(a.starts_with(&format!("pbt_{id_a}_")));
    }

    #[test]
    fn token_key_is_the_sha256_hex_of_the_whole_token() {
        assert_eq!(
            token_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (token, _) = new_token();
        let key = token_key(&token);
        assert_eq!(key.len(), 64);
        assert!(!key.contains(&token[TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_lookup() {
        let (good, _) = new_token();
        for bad in [
            "abc".to_owned(),
            good.replacen("pbt_", "pbx_", 1),
            good.to_uppercase(),
            format!("{good}0"),
            good[..good.len() - 1].to_owned(),
            "pbt_0123abcd".to_owned(),
            "pbt_0123abc_".to_owned() + &"0".repeat(65),
        ] {
            assert_eq!(token_id(&bad), Err(AuthError::Malformed), "{bad}");
        }
    }

    #[test]
    fn bearer_header_parsing_distinguishes_missing_from_malformed() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), Err(AuthError::Missing));
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer  pbt_x ".parse().unwrap(),
        );
        assert_eq!(bearer_token(&headers), Ok("pbt_x"));
        headers.insert(http::header::AUTHORIZATION, "bearer pbt_y".parse().unwrap());
        assert_eq!(bearer_token(&headers), Ok("pbt_y"));
        headers.insert(
            http::header::AUTHORIZATION,
            "Basic dXNlcg==".parse().unwrap(),
        );
        assert_eq!(bearer_token(&headers), Err(AuthError::Malformed));
        headers.insert(http::header::AUTHORIZATION, "".parse().unwrap());
        assert_eq!(bearer_token(&headers), Err(AuthError::Missing));
    }

    #[test]
    fn auth_errors_map_to_401_with_safe_details_and_store_failures_to_503() {
        for e in [
            AuthError::Missing,
            AuthError::Malformed,
            AuthError::Unknown,
            AuthError::Expired {
                id: "0123abcd".into(),
            },
        ] {
            let p = e.problem();
            assert_eq!(p.status, http::StatusCode::UNAUTHORIZED);
            assert_eq!(p.detail.as_deref(), Some(e.to_string().as_str()));
        }
        let p = AuthError::Store {
            reason: "nats: connection refused to 10.0.0.7".into(),
        }
        .problem();
        assert_eq!(p.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(!p.detail.unwrap_or_default().contains("10.0.0.7"));
    }

    #[test]
    fn new_token_settings_are_validated() {
        let admin = vec![Scope::Admin];
        let field = |spec: NewToken| match spec.validate() {
            Err(TokenError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        };
        assert_eq!(field(NewToken::new(" ", admin.clone())), "name");
        assert_eq!(field(NewToken::new("n", vec![])), "scopes");
        assert_eq!(
            field(NewToken::new("n", admin.clone()).rate_per_sec(0.0)),
            "rate"
        );
        assert_eq!(field(NewToken::new("n", admin.clone()).burst(0)), "burst");
        assert_eq!(
            field(NewToken::new("n", admin.clone()).expires_in(Duration::ZERO)),
            "expiry"
        );
        assert!(
            NewToken::new("dev", admin)
                .rate_per_sec(10.0)
                .burst(20)
                .expires_in(Duration::from_secs(60))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn negative_cache_stays_bounded() {
        let mut cache = Cache::default();
        for i in 0..(MAX_NEGATIVE + 10) {
            cache.remember_unknown(format!("k{i}"), 0);
        }
        assert!(cache.unknown.len() <= MAX_NEGATIVE);
    }
}
