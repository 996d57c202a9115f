//! The function registry: specs in the `patchbay-functions` KV bucket, components in the
//! `patchbay-artifacts` object store keyed by sha256.
//!
//! A [`FunctionSpec`] keeps every deployed version (with its trigger, allow-list, config
//! and limits) and which one is active, so `rollback` needs no re-upload and every node
//! resolves the same version. Writers update with revision compare-and-set, so two
//! concurrent deploys cannot silently overwrite each other. Runtime nodes only read and
//! watch; the CLI (admin identity) writes.
//!
//! Beside the specs: [`canary`] (the pure canary choice and verdict rule), [`ordering`]
//! (per-key ordered stream triggers: partitions, names, the subject transform) and
//! [`schedule`] (cron). This crate decides and stores; it runs nothing — the runtime node
//! (`patchbay-host`) and the gateway watch it and serve what it says.

pub mod canary;
pub mod ordering;
pub mod schedule;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_bus::Token;
use patchbay_bus::subject::is_valid_pattern;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// KV bucket holding one [`FunctionSpec`] per function name.
pub const FUNCTIONS_BUCKET: &str = "patchbay-functions";
/// Object store holding components by sha256 digest.
pub const ARTIFACTS_BUCKET: &str = "patchbay-artifacts";
/// Stream carrying schedule ticks (`patchbay.v1.fn.<name>.tick`), de-duplicated per tick.
pub const TICKS_STREAM: &str = "PATCHBAY_TICKS";
/// Stream holding dead letters.
pub const DLQ_STREAM: &str = "PATCHBAY_DLQ";
/// Stream holding function log records.
pub const LOGS_STREAM: &str = "PATCHBAY_LOGS";

/// The one KV bucket (declared in deploy/streams.toml) holding every function's state,
/// each function's keys under its own name: `<function>.<key>`.
///
/// One declared bucket rather than one per function, so that the access policy grants the
/// function hosts a bucket *by name*: a bucket per function needed a glob, and a glob over
/// JetStream asset names reaches streams nobody declared (NATS cannot match the stream token
/// of `$JS.API…` subjects by prefix).
pub const FUNCTION_STATE_BUCKET: &str = "patchbay-fn-state";

/// The key prefix of function `name` in [`FUNCTION_STATE_BUCKET`], `<name>.`. A function
/// name is a [`Token`] (no dot), so the prefix ends at the first dot of a stored key and
/// no key of one function — whatever dots it holds — is ever under another's prefix.
#[must_use]
pub fn state_prefix(name: &Token) -> String {
    format!("{name}.")
}

/// The stored key of function `name`'s key `key` (already checked against the WIT rules:
/// letters, digits and `-_=.`, no empty token).
#[must_use]
pub fn state_key(name: &Token, key: &str) -> String {
    format!("{name}.{key}")
}

/// The keys function `name` currently holds in `store` ([`FUNCTION_STATE_BUCKET`]),
/// without its prefix, sorted; deleted and purged keys left out.
///
/// Only the function's own subjects are read: one ordered, headers-only consumer filtered
/// on `$KV.<bucket>.<name>.>`, last message per key (what async-nats `keys()` does for a
/// whole bucket), delivered to an inbox of `client`. Bounded by `limit`: a listing that does
/// not complete in time is an error, never a hang.
pub async fn state_keys(
    client: &async_nats::Client,
    store: &kv::Store,
    name: &Token,
    limit: Duration,
) -> Result<Vec<String>, String> {
    use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
    let filter = format!("{}{}>", store.prefix, state_prefix(name));
    let strip = format!("{}{}", store.prefix, state_prefix(name));
    let list = async {
        let consumer = store
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                description: Some(format!("keys of function {name}")),
                filter_subject: filter,
                headers_only: true,
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot list the keys of function {name}: {e}"))?;
        let mut live: BTreeMap<String, bool> = BTreeMap::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(live);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| format!("cannot list the keys of function {name}: {e}"))?;
        while let Some(message) = messages.next().await {
            let message =
                message.map_err(|e| format!("cannot list the keys of function {name}: {e}"))?;
            let info = message
                .info()
                .map_err(|e| format!("cannot list the keys of function {name}: {e}"))?;
            let pending = info.pending;
            let removed = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            if let Some(key) = message.subject.as_str().strip_prefix(&strip) {
                live.insert(key.to_owned(), !removed);
            }
            if pending == 0 {
                break;
            }
        }
        Ok::<_, String>(live)
    };
    let live = tokio::time::timeout(limit, list)
        .await
        .map_err(|_| format!("listing the keys of function {name} took longer than {limit:?}"))??;
    Ok(live
        .into_iter()
        .filter_map(|(key, live)| live.then_some(key))
        .collect())
}

/// Remove every key of function `name` from `js`'s [`FUNCTION_STATE_BUCKET`] (admin: a
/// purge of the stream filtered on the function's subjects). Returns how many messages went.
pub async fn purge_state(js: &jetstream::Context, name: &Token) -> Result<u64, String> {
    let stream = js
        .get_stream(format!("KV_{FUNCTION_STATE_BUCKET}"))
        .await
        .map_err(|e| format!("cannot open bucket {FUNCTION_STATE_BUCKET}: {e}"))?;
    let purged = stream
        .purge()
        .filter(format!(
            "$KV.{FUNCTION_STATE_BUCKET}.{}>",
            state_prefix(name)
        ))
        .await
        .map_err(|e| format!("cannot purge the state of function {name}: {e}"))?;
    Ok(purged.purged)
}

/// The durable consumer that feeds a function's `stream` or `schedule` trigger.
#[must_use]
pub fn consumer_name(name: &Token) -> String {
    format!("fn-{name}")
}

/// The subject carrying schedule ticks of function `name` (stream PATCHBAY_TICKS).
#[must_use]
pub fn tick_subject(subjects: &patchbay_bus::Subjects, name: &Token) -> String {
    subjects.full(&format!("patchbay.v1.fn.{name}.tick"))
}

/// Why a registry operation failed.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The function does not exist.
    #[error("unknown function {name:?}")]
    UnknownFunction {
        /// The name asked for.
        name: String,
    },
    /// The version does not exist.
    #[error("function {name:?} has no version {version}")]
    UnknownVersion {
        /// The function.
        name: String,
        /// The version asked for.
        version: u32,
    },
    /// Nothing to roll back to.
    #[error("function {name:?} has no version before {version} to roll back to")]
    NothingToRollBack {
        /// The function.
        name: String,
        /// Its active version.
        version: u32,
    },
    /// A canary must keep the stable version's trigger.
    #[error(
        "function {name:?}: a canary must keep the stable version's trigger ({stable}), not \
         {canary}: two triggers cannot split one stream of events"
    )]
    CanaryTrigger {
        /// The function.
        name: String,
        /// The active version's trigger.
        stable: String,
        /// The canary's trigger.
        canary: String,
    },
    /// `promote` without a canary.
    #[error("function {name:?} has no canary to promote")]
    NoCanary {
        /// The function.
        name: String,
    },
    /// Someone else changed the spec between our read and write.
    #[error("function {name:?} changed concurrently; retry")]
    Conflict {
        /// The function.
        name: String,
    },
    /// A spec is invalid.
    #[error("invalid function spec: {0}")]
    Invalid(String),
    /// A stored spec could not be decoded.
    #[error("stored spec of {name:?} is corrupt: {reason}")]
    Corrupt {
        /// The function.
        name: String,
        /// The decode error.
        reason: String,
    },
    /// The artifact is missing or its bytes do not match its digest.
    #[error("artifact {digest} is {problem}")]
    Artifact {
        /// The digest.
        digest: String,
        /// What is wrong.
        problem: String,
    },
    /// NATS / JetStream failed.
    #[error("{operation} failed: {reason}")]
    Nats {
        /// What was being done.
        operation: &'static str,
        /// The underlying message.
        reason: String,
    },
}

/// Result alias for registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

fn nats(operation: &'static str) -> impl FnOnce(&dyn fmt::Display) -> RegistryError {
    move |e| RegistryError::Nats {
        operation,
        reason: e.to_string(),
    }
}

/// What makes a function run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Trigger {
    /// Core NATS queue group on `subject` (may contain wildcards): at most once, lowest
    /// latency; a message with a reply inbox gets the outputs as its reply.
    Subject {
        /// Subject or pattern, without the installation prefix.
        subject: String,
    },
    /// Shared durable consumer on `stream` filtered to `subject`: at least once, acked
    /// once, outputs de-duplicated, retries and dead letters handled by the runtime.
    Stream {
        /// The stream name.
        stream: String,
        /// Filter subject, without the installation prefix.
        subject: String,
        /// Per-key ordering (`--ordered`): events with the same first `*` token of the
        /// subject are handled one at a time, in order (see [`crate::ordering`]).
        /// (`default`: specs stored before ordering existed decode unchanged.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ordered: Option<crate::ordering::Ordered>,
    },
    /// Cron schedule (with seconds), one run per tick across all nodes.
    Schedule {
        /// Cron expression, e.g. `*/5 * * * * *`.
        cron: String,
    },
    /// Only direct invocation (`patchbay.v1.fn.<name>.invoke`); every function has it.
    Invoke,
    /// An HTTP route of the gateway: a `wasi:http/proxy` component run inside every
    /// gateway process (no bus hop). `route` is an absolute path (`/hello`); a final
    /// `/...` matches any path below it (`/api/...`). Runtime nodes do not serve these.
    Http {
        /// The route, e.g. `/hello` or `/crm/...`.
        route: String,
    },
}

/// Paths the gateway keeps for itself; no HTTP function route may lie under them (a
/// catch-all `/...` may, and only gets what the gateway's own routes do not match).
pub const RESERVED_HTTP_PREFIXES: [&str; 2] = ["/v1/", "/openapi.json"];

/// The wildcard suffix of a prefix route.
pub const HTTP_ROUTE_WILDCARD: &str = "/...";

impl Trigger {
    /// Parse the CLI form: `subject:<s>`, `stream:<stream>:<subject>`, `schedule:<cron>`,
    /// `invoke`.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |why: &str| RegistryError::Invalid(format!("trigger {text:?}: {why}"));
        let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
        let trigger = match kind {
            "subject" => Self::Subject {
                subject: rest.to_owned(),
            },
            "stream" => {
                let (stream, subject) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid("expected stream:<stream>:<subject>"))?;
                Self::Stream {
                    stream: stream.to_owned(),
                    subject: subject.to_owned(),
                    ordered: None,
                }
            }
            "schedule" => Self::Schedule {
                cron: rest.to_owned(),
            },
            "invoke" if rest.is_empty() => Self::Invoke,
            "http" => Self::Http {
                route: rest.to_owned(),
            },
            _ => {
                return Err(invalid(
                    "expected subject:<subject>, stream:<stream>:<subject>, schedule:<cron>, \
                     http:<route> or invoke",
                ));
            }
        };
        trigger.validate()?;
        Ok(trigger)
    }

    /// Check the trigger's own fields.
    pub fn validate(&self) -> Result<()> {
        let invalid = |why: String| Err(RegistryError::Invalid(why));
        match self {
            Self::Subject { subject } | Self::Stream { subject, .. }
                if !is_valid_pattern(subject) =>
            {
                invalid(format!("{subject:?} is not a valid subject"))
            }
            Self::Stream { stream, .. }
                if stream.is_empty()
                    || !stream
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                invalid(format!("{stream:?} is not a valid stream name"))
            }
            Self::Stream {
                subject,
                ordered: Some(ordered),
                ..
            } => ordered.validate(subject).map_err(RegistryError::Invalid),
            Self::Schedule { cron } => crate::schedule::Schedule::parse(cron)
                .map(|_| ())
                .map_err(|e| RegistryError::Invalid(e.to_string())),
            Self::Http { route } => validate_route(route).map_err(RegistryError::Invalid),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Subject { subject } => write!(f, "subject:{subject}"),
            Self::Stream {
                stream,
                subject,
                ordered,
            } => {
                write!(f, "stream:{stream}:{subject}")?;
                match ordered {
                    Some(o) => write!(f, " (ordered by key, {} partitions)", o.partitions),
                    None => Ok(()),
                }
            }
            Self::Schedule { cron } => write!(f, "schedule:{cron}"),
            Self::Invoke => f.write_str("invoke"),
            Self::Http { route } => write!(f, "http:{route}"),
        }
    }
}

impl Trigger {
    /// This `stream` trigger with per-key ordering (`fn deploy --ordered`); refused for
    /// any other kind of trigger, or when the subject has no `*` token to key on.
    pub fn with_ordering(self, ordered: crate::ordering::Ordered) -> Result<Self> {
        let Self::Stream {
            stream, subject, ..
        } = self
        else {
            return Err(RegistryError::Invalid(format!(
                "only a stream trigger can be ordered, not {self}"
            )));
        };
        let trigger = Self::Stream {
            stream,
            subject,
            ordered: Some(ordered),
        };
        trigger.validate()?;
        Ok(trigger)
    }

    /// Whether the function behind this trigger is a `wasi:http` component (run by
    /// gateways) rather than an event handler (run by runtime nodes).
    #[must_use]
    pub fn is_http(&self) -> bool {
        matches!(self, Self::Http { .. })
    }
}

/// Check an HTTP route: absolute, plain path characters, no empty or dot segments, a
/// wildcard only as the final `/...`, and outside the gateway's own prefixes.
fn validate_route(route: &str) -> std::result::Result<(), String> {
    let why = |reason: &str| Err(format!("route {route:?} {reason}"));
    let base = route.strip_suffix(HTTP_ROUTE_WILDCARD).unwrap_or(route);
    if !route.starts_with('/') {
        return why("must start with '/'");
    }
    if base.contains("...") {
        return why("may use '...' only as its final segment ('/api/...')");
    }
    let segments: Vec<&str> = base.split('/').skip(1).collect();
    if base.len() > 1
        && segments
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return why("has an empty, '.' or '..' segment");
    }
    if !base
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
    {
        return why("may only use letters, digits, '/', '-', '_', '.' and '~'");
    }
    // The gateway's own routes win anyway; refusing overlaps makes that visible at deploy.
    if let Some(reserved) = RESERVED_HTTP_PREFIXES.iter().find(|p| {
        let own = p.trim_end_matches('/');
        base == own || base.starts_with(*p)
    }) {
        return why(&format!("lies under the gateway's own {reserved}"));
    }
    Ok(())
}

/// Resource limits of one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock limit per invocation, milliseconds (epoch deadline).
    pub timeout_ms: u64,
    /// Linear memory cap per instance, bytes.
    pub memory_bytes: u64,
    /// Invocations in flight per node.
    pub max_concurrency: u32,
    /// Deliveries of one stream message before it is dead-lettered.
    pub max_deliver: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 1_000,
            memory_bytes: 64 << 20,
            max_concurrency: 64,
            max_deliver: 5,
        }
    }
}

impl Limits {
    /// The timeout as a duration.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// One deployed version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSpec {
    /// 1, 2, 3… in deploy order.
    pub version: u32,
    /// sha256 of the component, lower-case hex; the artifact's object name.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// When it was deployed (RFC 3339).
    pub deployed_at: String,
    /// What makes it run.
    pub trigger: Trigger,
    /// Subjects (patterns) the function may publish or request on.
    pub publish: Vec<String>,
    /// Configuration values, visible through the `config` import.
    pub config: BTreeMap<String, String>,
    /// Resource limits.
    pub limits: Limits,
    /// Subject filters of every stream that existed at deploy time. Workloads may not
    /// list streams, so `fn deploy` resolves them for the nodes: a `stream` or `schedule`
    /// output on a subject one of them matches is stored durably (de-duplicated), any
    /// other is published with core NATS.
    #[serde(default)]
    pub stream_subjects: Vec<String>,
}

/// A function and its versions, as stored under its name in [`FUNCTIONS_BUCKET`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The function name (a subject token).
    pub name: String,
    /// The version serving traffic (the stable one while a canary runs).
    pub active: u32,
    /// Every version deployed, oldest first.
    pub versions: Vec<VersionSpec>,
    /// A version receiving a sticky share of the traffic beside `active`, if any.
    /// (`default`: specs stored before canaries existed decode unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
}

/// A canary: `version` gets `percent` % of the interactions (chosen by the stable hash of
/// their key, see [`crate::canary::choose`]), the active version the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    /// The canary version (deployed after the active one, same trigger).
    pub version: u32,
    /// Its share of interactions, strictly between 0 and 100.
    pub percent: f64,
    /// Stop routing to the canary when its error rate exceeds the stable one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<AutoRollback>,
    /// When the canary started (RFC 3339).
    pub started_at: String,
}

/// When runtime nodes give up on a canary by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AutoRollback {
    /// Allowed excess of the canary's error rate over the stable one's, as a fraction
    /// (0.05 = 5 percentage points).
    pub margin: f64,
    /// Events the canary must have handled on a node before that node judges it.
    pub min_events: u64,
}

impl Canary {
    /// Check the percentage and the auto-rollback settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.percent > 0.0 && self.percent < 100.0) {
            return Err(RegistryError::Invalid(format!(
                "canary percent {} must be strictly between 0 and 100",
                self.percent
            )));
        }
        if let Some(rule) = &self.auto_rollback {
            if !(rule.margin >= 0.0 && rule.margin < 1.0) {
                return Err(RegistryError::Invalid(format!(
                    "auto-rollback margin {} must be a fraction in [0, 1) (0.05 = 5 points)",
                    rule.margin
                )));
            }
            if rule.min_events == 0 {
                return Err(RegistryError::Invalid(
                    "auto-rollback min events must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

impl FunctionSpec {
    /// The active version.
    pub fn active_version(&self) -> Result<&VersionSpec> {
        self.version(self.active)
    }

    /// Version `version`.
    pub fn version(&self, version: u32) -> Result<&VersionSpec> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| RegistryError::UnknownVersion {
                name: self.name.clone(),
                version,
            })
    }

    /// Add `version` (numbered after the newest) and make it active. A running canary is
    /// dropped: the new version takes all the traffic at once.
    pub fn push(&mut self, version: VersionSpec) -> u32 {
        let next = self.append(version);
        self.active = next;
        self.canary = None;
        next
    }

    /// Store `version` under the next number without routing anything to it.
    fn append(&mut self, mut version: VersionSpec) -> u32 {
        let next = self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        version.version = next;
        self.versions.push(version);
        next
    }

    /// Add `version` as a canary beside the active one, replacing any running canary.
    /// `canary.version` is ignored (the new version's number is returned). Refused when
    /// there is no active version, when the canary's trigger differs from the active
    /// version's (one stream of events cannot be split across two triggers), for HTTP
    /// functions (gateways do not split traffic), or when the settings are invalid.
    pub fn start_canary(&mut self, version: VersionSpec, canary: Canary) -> Result<u32> {
        canary.validate()?;
        let stable = self.active_version().map_err(|_| {
            RegistryError::Invalid(format!(
                "function {:?} has no active version to run a canary beside",
                self.name
            ))
        })?;
        if stable.trigger != version.trigger {
            return Err(RegistryError::CanaryTrigger {
                name: self.name.clone(),
                stable: stable.trigger.to_string(),
                canary: version.trigger.to_string(),
            });
        }
        if version.trigger.is_http() {
            return Err(RegistryError::Invalid(format!(
                "function {:?}: canaries are for event functions; HTTP functions take a \
                 plain deploy",
                self.name
            )));
        }
        let next = self.append(version);
        self.canary = Some(Canary {
            version: next,
            ..canary
        });
        Ok(next)
    }

    /// Make the canary the active version and end the canary.
    pub fn promote(&mut self) -> Result<u32> {
        let canary = self.canary.take().ok_or_else(|| RegistryError::NoCanary {
            name: self.name.clone(),
        })?;
        self.active = canary.version;
        Ok(canary.version)
    }

    /// With a canary running: drop it (all new traffic back to the active version), and
    /// activate `to` if given. Without: make `to` active, or the version deployed before
    /// the active one.
    pub fn rollback(&mut self, to: Option<u32>) -> Result<u32> {
        if self.canary.take().is_some() {
            if let Some(v) = to {
                self.active = self.version(v)?.version;
            }
            return Ok(self.active);
        }
        let target = match to {
            Some(v) => self.version(v)?.version,
            None => self
                .versions
                .iter()
                .map(|v| v.version)
                .filter(|v| *v < self.active)
                .max()
                .ok_or_else(|| RegistryError::NothingToRollBack {
                    name: self.name.clone(),
                    version: self.active,
                })?,
        };
        self.active = target;
        Ok(target)
    }
}

/// sha256 of `bytes` as lower-case hex.
#[must_use]
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Read and write access to the registry over JetStream.
#[derive(Clone)]
pub struct Registry {
    specs: kv::Store,
    artifacts: jetstream::object_store::ObjectStore,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// One change [`Registry::changes`] reports.
#[derive(Debug, Clone)]
pub enum Change {
    /// A function's spec was stored (deployed, promoted, rolled back, ...).
    Stored(FunctionSpec),
    /// A function was removed.
    Removed(String),
}

impl Registry {
    /// Open the registry buckets (created by the admin bootstrap).
    pub async fn open(js: &jetstream::Context) -> Result<Self> {
        let specs = js
            .get_key_value(FUNCTIONS_BUCKET)
            .await
            .map_err(|e| nats("open the function registry")(&e))?;
        let artifacts = js
            .get_object_store(ARTIFACTS_BUCKET)
            .await
            .map_err(|e| nats("open the artifact store")(&e))?;
        Ok(Self { specs, artifacts })
    }

    /// The spec store, for watching.
    #[must_use]
    pub fn specs(&self) -> &kv::Store {
        &self.specs
    }

    /// The spec of `name` with its KV revision, if deployed.
    pub async fn get(&self, name: &str) -> Result<Option<(FunctionSpec, u64)>> {
        let entry = self
            .specs
            .entry(name)
            .await
            .map_err(|e| nats("read a function spec")(&e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode(name, &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Every change to the registry from now on, after the current specs (the watch every
    /// reader — runtime nodes, gateways — follows): a spec stored, or a function removed.
    /// A watch error or a corrupt spec is logged and skipped; the stream ends when the
    /// watch does.
    pub async fn changes(&self) -> Result<impl futures::Stream<Item = Change> + Send + 'static> {
        let watch = self
            .specs
            .watch_with_history(">")
            .await
            .map_err(|e| nats("watch the function registry")(&e))?;
        Ok(watch.filter_map(|entry| async move {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(error = %e, "registry watch error");
                    return None;
                }
            };
            match entry.operation {
                kv::Operation::Put => match decode(&entry.key, &entry.value) {
                    Ok(spec) => Some(Change::Stored(spec)),
                    Err(e) => {
                        tracing::error!(error = %e, "ignoring corrupt function spec");
                        None
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => Some(Change::Removed(entry.key)),
            }
        }))
    }

    /// Every deployed function, sorted by name.
    pub async fn list(&self) -> Result<Vec<FunctionSpec>> {
        let mut keys = self
            .specs
            .keys()
            .await
            .map_err(|e| nats("list functions")(&e))?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(|e| nats("list functions")(&e))?);
        }
        names.sort();
        let mut specs = Vec::new();
        for name in names {
            if let Some((spec, _)) = self.get(&name).await? {
                specs.push(spec);
            }
        }
        Ok(specs)
    }

    /// Read-modify-write `name` with compare-and-set on its revision; `change` gets the
    /// current spec (or `None`) and returns the new one. Retries a few times on conflict.
    pub async fn update<F>(&self, name: &str, mut change: F) -> Result<FunctionSpec>
    where
        F: FnMut(Option<FunctionSpec>) -> Result<FunctionSpec>,
    {
        for _ in 0..5 {
            let current = self.get(name).await?;
            let revision = current.as_ref().map(|(_, r)| *r);
            let spec = change(current.map(|(s, _)| s))?;
            let value = Bytes::from(
                serde_json::to_vec(&spec).map_err(|e| RegistryError::Invalid(e.to_string()))?,
            );
            let written = match revision {
                Some(r) => self
                    .specs
                    .update(name, value, r)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None => self
                    .specs
                    .create(name, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
            };
            match written {
                Ok(()) => return Ok(spec),
                Err((true, _)) => continue,
                Err((false, reason)) => {
                    return Err(RegistryError::Nats {
                        operation: "write a function spec",
                        reason,
                    });
                }
            }
        }
        Err(RegistryError::Conflict {
            name: name.to_owned(),
        })
    }

    /// Remove `name` from the registry.
    pub async fn remove(&self, name: &str) -> Result<()> {
        if self.get(name).await?.is_none() {
            return Err(RegistryError::UnknownFunction {
                name: name.to_owned(),
            });
        }
        self.specs
            .delete(name)
            .await
            .map_err(|e| nats("delete a function spec")(&e))
    }

    /// Store `bytes` under their digest unless already present; returns the digest.
    pub async fn put_artifact(&self, bytes: &[u8]) -> Result<String> {
        let digest = digest(bytes);
        if self.artifacts.info(&digest).await.is_ok() {
            return Ok(digest);
        }
        let mut reader = bytes;
        self.artifacts
            .put(digest.as_str(), &mut reader)
            .await
            .map_err(|e| nats("upload the component")(&e))?;
        Ok(digest)
    }

    /// The component with `digest`, checked against it.
    pub async fn get_artifact(&self, digest: &str) -> Result<Vec<u8>> {
        use tokio::io::AsyncReadExt as _;
        let mut object = self
            .artifacts
            .get(digest)
            .await
            .map_err(|e| RegistryError::Artifact {
                digest: digest.to_owned(),
                problem: format!("unavailable: {e}"),
            })?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| nats("download the component")(&e))?;
        if self::digest(&bytes) != digest {
            return Err(RegistryError::Artifact {
                digest: digest.to_owned(),
                problem: "corrupt: its bytes do not match the digest".into(),
            });
        }
        Ok(bytes)
    }
}

/// Decode a stored spec.
pub fn decode(name: &str, value: &[u8]) -> Result<FunctionSpec> {
    serde_json::from_slice(value).map_err(|e| RegistryError::Corrupt {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// A version for unit tests: `trigger`, a digest derived from `tag`, defaults elsewhere.
#[cfg(test)]
impl VersionSpec {
    #[allow(clippy::unwrap_used)]
    pub(crate) fn for_test(trigger: &str, tag: &str) -> Self {
        Self {
            version: 0,
            digest: digest(tag.as_bytes()),
            size: 1,
            deployed_at: "2026-01-01T00:00:00Z".into(),
            trigger: Trigger::parse(trigger).unwrap(),
            publish: vec![],
            config: BTreeMap::new(),
            limits: Limits::default(),
            stream_subjects: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn version(trigger: &str) -> VersionSpec {
        VersionSpec::for_test(trigger, "x")
    }

    #[test]
    fn triggers_parse_from_their_cli_form_and_print_back() {
        for text in [
            "subject:cc.v1.calls.*.ended",
            "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
            "schedule:*/5 * * * * *",
            "invoke",
            "http:/hello",
            "http:/crm/...",
            "http:/...",
        ] {
            assert_eq!(Trigger::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn malformed_triggers_are_refused_with_the_reason() {
        for bad in [
            "subject:",
            "subject:a..b",
            "stream:NOSUBJECT",
            "stream:bad name:x",
            "schedule:not cron",
            "webhook:x",
            "http:hello",
            "http:/a//b",
            "http:/a/../b",
            "http:/a...b",
            "http:/v1/events",
            "http:/v1",
            "http:/openapi.json",
            "http:/has space",
        ] {
            assert!(Trigger::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ordered_stream_triggers_need_a_key_token_and_old_specs_still_decode() {
        use crate::ordering::Ordered;
        let ordered = Trigger::parse("stream:CC_CALLS:cc.v1.calls.*.>")
            .unwrap()
            .with_ordering(Ordered { partitions: 8 })
            .unwrap();
        assert_eq!(
            ordered.to_string(),
            "stream:CC_CALLS:cc.v1.calls.*.> (ordered by key, 8 partitions)"
        );
        let json = serde_json::to_string(&ordered).unwrap();
        assert_eq!(serde_json::from_str::<Trigger>(&json).unwrap(), ordered);
        // A spec stored before ordering existed has no `ordered` field.
        let old: Trigger =
            serde_json::from_str(r#"{"kind":"stream","stream":"S","subject":"a.*"}"#).unwrap();
        assert_eq!(old, Trigger::parse("stream:S:a.*").unwrap());
        assert!(!serde_json::to_string(&old).unwrap().contains("ordered"));
        for (trigger, why) in [
            ("stream:CC_CALLS:cc.v1.calls.>", "first `*` token"),
            ("subject:cc.v1.calls.*.>", "only a stream trigger"),
        ] {
            let err = Trigger::parse(trigger)
                .unwrap()
                .with_ordering(Ordered::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{trigger}: {err}");
        }
    }

    #[test]
    fn versions_are_numbered_in_order_and_rollback_steps_back() {
        let mut spec = FunctionSpec {
            name: "f".into(),
            active: 0,
            versions: vec![],
            canary: None,
        };
        assert_eq!(spec.push(version("invoke")), 1);
        assert_eq!(spec.push(version("invoke")), 2);
        assert_eq!(spec.push(version("invoke")), 3);
        assert_eq!(spec.rollback(None).unwrap(), 2);
        assert_eq!(spec.rollback(None).unwrap(), 1);
        assert!(matches!(
            spec.rollback(None),
            Err(RegistryError::NothingToRollBack { .. })
        ));
        assert_eq!(spec.rollback(Some(3)).unwrap(), 3);
        assert!(matches!(
            spec.rollback(Some(9)),
            Err(RegistryError::UnknownVersion { version: 9, .. })
        ));
        // A deploy after a rollback gets a fresh number, never reusing one.
        spec.rollback(Some(1)).unwrap();
        assert_eq!(spec.push(version("invoke")), 4);
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest::proptest! {
        /// Whatever two functions and two valid keys: the stored keys differ unless both
        /// function and key are the same, and a stored key is under a function's prefix
        /// exactly when it is that function's — so one function never gets, sets, deletes
        /// or lists another's key (`tenant` vs `tenant-x`, keys with dots, included).
        #[test]
        fn a_stored_state_key_belongs_to_exactly_one_function_and_key(
            a in "[a-z]{1,3}(-[a-z]{1,2})?",
            b in "[a-z]{1,3}(-[a-z]{1,2})?",
            k in "[a-z=_-]{1,3}(\\.[a-z0-9=_-]{1,3}){0,2}",
            l in "[a-z=_-]{1,3}(\\.[a-z0-9=_-]{1,3}){0,2}",
        ) {
            let (ta, tb) = (Token::new(a.as_str()).unwrap(), Token::new(b.as_str()).unwrap());
            for key in [&k, &l] {
                proptest::prop_assert!(patchbay_engine::capabilities::validate_kv_key(key).is_ok());
            }
            let (ka, lb) = (state_key(&ta, &k), state_key(&tb, &l));
            proptest::prop_assert_eq!(ka == lb, a == b && k == l);
            proptest::prop_assert_eq!(ka.starts_with(&state_prefix(&tb)), a == b);
            proptest::prop_assert_eq!(ka.strip_prefix(&state_prefix(&ta)), Some(k.as_str()));
            // A valid NATS subject tail: no empty token, no wildcard.
            proptest::prop_assert!(ka.split('.').all(|t| !t.is_empty() && t != "*" && t != ">"));
        }
    }
}
