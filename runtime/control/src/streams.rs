//! `deploy/streams.toml` and the admin bootstrap that makes JetStream match it.
//!
//! The declaration lists the streams, KV buckets, object stores and durable consumers of
//! docs/architecture.md ("Streams and buckets"). [`bootstrap`] creates what is missing and updates what
//! differs, idempotently: a second run changes nothing and its [`BootstrapReport`] says so.
//! Only the admin identity runs it (`patchbay up` / `patchbay bootstrap`); workloads are never
//! granted stream, bucket or consumer administration (see [`crate::access`]).
//!
//! KV buckets and object stores are created as the streams async-nats itself would create
//! (`KV_<bucket>` with `$KV.<bucket>.>`, rollup, direct get, `discard: new`; `OBJ_<store>`
//! with `$O.<store>.C.>` / `$O.<store>.M.>`), so `get_key_value` / `get_object_store` work on
//! them unchanged. Comparison is by the fields the declaration manages, overlaid on what the
//! server reports, so server-side defaults and metadata never count as drift. Function state
//! is one declared bucket (`patchbay-fn-state`, keys `<function>.<key>`), so that every grant
//! names a declared asset; function trigger consumers are not declared here: `patchbay fn
//! deploy` creates them.
//!
//! This module does not decide who may use the assets (that is [`crate::access`]).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde::{Deserialize, Deserializer};

use crate::access::{apply_prefix, check_subject, covers, overlaps};

/// De-duplication window used when neither the declaration nor a stream sets one.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Largest KV history JetStream supports.
pub const MAX_KV_HISTORY: i64 = 64;
/// nats-server's ack wait when none is configured.
const SERVER_DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// nats-server's max ack pending when none is configured.
const SERVER_DEFAULT_MAX_ACK_PENDING: i64 = 1000;

/// Errors loading a declaration or bootstrapping it.
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    /// The file cannot be read.
    #[error("failed to read streams declaration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape.
    #[error("streams declaration {origin} is not valid: {source}")]
    Toml {
        /// File name or `<string>`.
        origin: String,
        /// The parser's message (line and column included).
        #[source]
        source: toml::de::Error,
    },
    /// A name JetStream would refuse.
    #[error("{kind} name {name:?} must match [A-Za-z0-9_-]+{extra}")]
    InvalidName {
        /// `stream`, `kv bucket`, `object store` or `consumer`.
        kind: &'static str,
        /// The name.
        name: String,
        /// Additional constraint, if any.
        extra: &'static str,
    },
    /// Two assets with one name (KV and object stores count as their backing streams).
    #[error("{kind} {name:?} is declared twice")]
    Duplicate {
        /// The kind of asset.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A stream or filter subject that is not a valid subject.
    #[error("{asset}: subject {subject:?} is not valid: {reason}")]
    InvalidSubject {
        /// The stream or consumer.
        asset: String,
        /// The subject.
        subject: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two streams whose subjects overlap (JetStream refuses that).
    #[error("streams {first:?} and {second:?} overlap on {subject:?}")]
    OverlappingStreams {
        /// One stream.
        first: String,
        /// The other.
        second: String,
        /// One of the overlapping subjects.
        subject: String,
    },
    /// A consumer of an undeclared stream.
    #[error("consumer {consumer:?} names stream {stream:?}, which is not declared")]
    UnknownStream {
        /// The consumer.
        consumer: String,
        /// The stream.
        stream: String,
    },
    /// A consumer filter outside its stream's subjects.
    #[error(
        "consumer {consumer:?}: filter {filter:?} is not within the subjects of stream {stream:?}"
    )]
    FilterOutsideStream {
        /// The consumer.
        consumer: String,
        /// The filter.
        filter: String,
        /// The stream.
        stream: String,
    },
    /// A value outside its allowed range.
    #[error("{asset}: {field} {value} is out of range ({expected})")]
    OutOfRange {
        /// The asset.
        asset: String,
        /// The field.
        field: &'static str,
        /// The value, rendered.
        value: String,
        /// The allowed range.
        expected: &'static str,
    },
    /// The subject prefix is not a literal subject.
    #[error("subject prefix {prefix:?} must be empty or a literal subject without wildcards")]
    BadPrefix {
        /// What was given.
        prefix: String,
    },
    /// A JetStream request failed.
    #[error("failed to {action} {asset}")]
    JetStream {
        /// What was being done.
        action: &'static str,
        /// The asset.
        asset: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result of declaration operations.
pub type Result<T, E = StreamsError> = std::result::Result<T, E>;

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk (survives restarts).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// When a stream drops messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// By the limits (age, bytes, count) only.
    #[default]
    Limits,
    /// Once every consumer has acknowledged.
    Interest,
    /// Once one consumer has acknowledged.
    WorkQueue,
}

/// What a full stream discards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// The oldest messages.
    #[default]
    Old,
    /// The new message (the publish fails).
    New,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// The first message still in the stream.
    #[default]
    All,
    /// Messages published after the consumer is created.
    New,
    /// The last message.
    Last,
}

/// One stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name (`CC_CALLS`).
    pub name: String,
    /// What it holds.
    #[serde(default)]
    pub description: Option<String>,
    /// Subjects it captures, before the subject prefix.
    pub subjects: Vec<String>,
    /// Storage backend.
    #[serde(default)]
    pub storage: Storage,
    /// Retention policy.
    #[serde(default)]
    pub retention: Retention,
    /// Discard policy when a limit is hit.
    #[serde(default)]
    pub discard: Discard,
    /// Oldest message kept (none: unlimited).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
    /// Total size kept, in bytes (`"1GiB"` or an integer; none: unlimited).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_bytes: Option<i64>,
    /// Number of messages kept (none: unlimited).
    #[serde(default)]
    pub max_msgs: Option<i64>,
    /// Largest message accepted, in bytes (none: the server's max payload).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_msg_size: Option<i64>,
    /// Replicas in a cluster.
    #[serde(default = "one")]
    pub replicas: usize,
    /// De-duplication window by `Nats-Msg-Id` (none: the declaration's default).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub duplicate_window: Option<Duration>,
    /// Accept atomic batch publishes (`allow_atomic`, nats-server ≥ 2.12): what
    /// `patchbay_bus::batch` stores a whole batch with in one commit.
    #[serde(default)]
    pub allow_atomic: bool,
}

/// One KV bucket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSpec {
    /// Bucket name (`patchbay-functions`).
    pub bucket: String,
    /// What it holds.
    #[serde(default)]
    pub description: Option<String>,
    /// Values kept per key (1..=64).
    #[serde(default = "one_i64")]
    pub history: i64,
    /// Oldest value kept (none: unlimited).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
    /// Total size, in bytes (none: unlimited).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_bytes: Option<i64>,
    /// Largest value, in bytes (none: the server's max payload).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_value_size: Option<i64>,
    /// Storage backend.
    #[serde(default)]
    pub storage: Storage,
    /// Replicas in a cluster.
    #[serde(default = "one")]
    pub replicas: usize,
}

impl KvSpec {
    /// The backing stream, `KV_<bucket>`.
    #[must_use]
    pub fn stream_name(&self) -> String {
        format!("KV_{}", self.bucket)
    }
}

/// One object store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreSpec {
    /// Store name (`patchbay-artifacts`).
    pub bucket: String,
    /// What it holds.
    #[serde(default)]
    pub description: Option<String>,
    /// Oldest object kept (none: unlimited).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
    /// Total size, in bytes (none: unlimited).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_bytes: Option<i64>,
    /// Storage backend.
    #[serde(default)]
    pub storage: Storage,
    /// Replicas in a cluster.
    #[serde(default = "one")]
    pub replicas: usize,
}

impl ObjectStoreSpec {
    /// The backing stream, `OBJ_<bucket>`.
    #[must_use]
    pub fn stream_name(&self) -> String {
        format!("OBJ_{}", self.bucket)
    }
}

/// One durable pull consumer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// The stream it reads.
    pub stream: String,
    /// Durable name (`routing`).
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Subjects it receives, before the subject prefix (none: the whole stream).
    #[serde(default)]
    pub filter_subjects: Vec<String>,
    /// Where it starts when first created.
    #[serde(default)]
    pub start_at: StartAt,
    /// Redelivery delay for unacknowledged messages (none: 30s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ack_wait: Option<Duration>,
    /// Deliveries before a message is given up on (none: unlimited).
    #[serde(default)]
    pub max_deliver: Option<i64>,
    /// Unacknowledged messages in flight (none: 1000).
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
}

/// The JetStream assets of `deploy/streams.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// Default de-duplication window of every stream.
    #[serde(default = "default_duplicate_window", deserialize_with = "de_duration")]
    pub duplicate_window: Duration,
    /// Streams.
    #[serde(default)]
    pub streams: Vec<StreamSpec>,
    /// KV buckets.
    #[serde(default, rename = "kv")]
    pub key_values: Vec<KvSpec>,
    /// Object stores.
    #[serde(default)]
    pub object_stores: Vec<ObjectStoreSpec>,
    /// Durable consumers.
    #[serde(default)]
    pub consumers: Vec<ConsumerSpec>,
}

impl Declaration {
    /// Reads and validates a declaration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| StreamsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a declaration from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::parse(text, "<string>")
    }

    fn parse(text: &str, origin: &str) -> Result<Self> {
        let decl: Self = toml::from_str(text).map_err(|source| StreamsError::Toml {
            origin: origin.to_owned(),
            source,
        })?;
        decl.validate()?;
        Ok(decl)
    }

    /// The stream a consumer reads, if declared.
    #[must_use]
    pub fn stream(&self, name: &str) -> Option<&StreamSpec> {
        self.streams.iter().find(|s| s.name == name)
    }

    fn validate(&self) -> Result<()> {
        positive(
            "declaration",
            "duplicate_window",
            self.duplicate_window.as_nanos(),
        )?;
        let mut stream_names = BTreeSet::new();
        let mut insert_stream = |name: String| {
            if stream_names.insert(name.clone()) {
                Ok(())
            } else {
                Err(StreamsError::Duplicate {
                    kind: "stream",
                    name,
                })
            }
        };
        for stream in &self.streams {
            check_name("stream", &stream.name)?;
            if stream.name.starts_with("KV_") || stream.name.starts_with("OBJ_") {
                return Err(StreamsError::InvalidName {
                    kind: "stream",
                    name: stream.name.clone(),
                    extra: " and not start with KV_ or OBJ_ (reserved for buckets)",
                });
            }
            insert_stream(stream.name.clone())?;
            if stream.subjects.is_empty() {
                return Err(StreamsError::InvalidSubject {
                    asset: stream.name.clone(),
                    subject: String::new(),
                    reason: "a stream needs at least one subject",
                });
            }
            for subject in &stream.subjects {
                check_stream_subject(&stream.name, subject)?;
            }
            check_limits(
                &stream.name,
                stream.max_bytes,
                stream.max_msgs,
                stream.replicas,
            )?;
            if let Some(size) = stream.max_msg_size {
                positive(&stream.name, "max_msg_size", size)?;
                in_i32(&stream.name, "max_msg_size", size)?;
            }
            let window = stream.duplicate_window.unwrap_or(self.duplicate_window);
            positive(&stream.name, "duplicate_window", window.as_nanos())?;
            if let Some(max_age) = stream.max_age {
                positive(&stream.name, "max_age", max_age.as_nanos())?;
                if window > max_age {
                    return Err(StreamsError::OutOfRange {
                        asset: stream.name.clone(),
                        field: "duplicate_window",
                        value: humantime::format_duration(window).to_string(),
                        expected: "at most max_age",
                    });
                }
            }
        }
        for (i, a) in self.streams.iter().enumerate() {
            for b in &self.streams[i + 1..] {
                for subject in &a.subjects {
                    if b.subjects.iter().any(|other| overlaps(subject, other)) {
                        return Err(StreamsError::OverlappingStreams {
                            first: a.name.clone(),
                            second: b.name.clone(),
                            subject: subject.clone(),
                        });
                    }
                }
            }
        }
        for kv in &self.key_values {
            check_name("kv bucket", &kv.bucket)?;
            insert_stream(kv.stream_name()).map_err(|_| StreamsError::Duplicate {
                kind: "kv bucket",
                name: kv.bucket.clone(),
            })?;
            if !(1..=MAX_KV_HISTORY).contains(&kv.history) {
                return Err(StreamsError::OutOfRange {
                    asset: kv.bucket.clone(),
                    field: "history",
                    value: kv.history.to_string(),
                    expected: "1..=64",
                });
            }
            check_limits(&kv.bucket, kv.max_bytes, None, kv.replicas)?;
            if let Some(size) = kv.max_value_size {
                positive(&kv.bucket, "max_value_size", size)?;
                in_i32(&kv.bucket, "max_value_size", size)?;
            }
        }
        for store in &self.object_stores {
            check_name("object store", &store.bucket)?;
            insert_stream(store.stream_name()).map_err(|_| StreamsError::Duplicate {
                kind: "object store",
                name: store.bucket.clone(),
            })?;
            check_limits(&store.bucket, store.max_bytes, None, store.replicas)?;
        }
        let mut consumers = BTreeSet::new();
        for c in &self.consumers {
            check_name("consumer", &c.name)?;
            let Some(stream) = self.stream(&c.stream) else {
                return Err(StreamsError::UnknownStream {
                    consumer: c.name.clone(),
                    stream: c.stream.clone(),
                });
            };
            if !consumers.insert((c.stream.clone(), c.name.clone())) {
                return Err(StreamsError::Duplicate {
                    kind: "consumer",
                    name: format!("{}/{}", c.stream, c.name),
                });
            }
            for filter in &c.filter_subjects {
                check_subject(filter).map_err(|reason| StreamsError::InvalidSubject {
                    asset: c.name.clone(),
                    subject: filter.clone(),
                    reason,
                })?;
                if !stream.subjects.iter().any(|s| covers(s, filter)) {
                    return Err(StreamsError::FilterOutsideStream {
                        consumer: c.name.clone(),
                        filter: filter.clone(),
                        stream: c.stream.clone(),
                    });
                }
            }
            if let Some(max_deliver) = c.max_deliver
                && max_deliver != -1
                && max_deliver < 1
            {
                return Err(StreamsError::OutOfRange {
                    asset: c.name.clone(),
                    field: "max_deliver",
                    value: max_deliver.to_string(),
                    expected: "-1 (unlimited) or at least 1",
                });
            }
            if let Some(pending) = c.max_ack_pending {
                positive(&c.name, "max_ack_pending", pending)?;
            }
            if let Some(wait) = c.ack_wait {
                positive(&c.name, "ack_wait", wait.as_nanos())?;
            }
        }
        Ok(())
    }
}

/// What kind of asset a report line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// A stream.
    Stream,
    /// A KV bucket.
    KeyValue,
    /// An object store.
    ObjectStore,
    /// A durable consumer.
    Consumer,
}

impl fmt::Display for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stream => "stream",
            Self::KeyValue => "kv bucket",
            Self::ObjectStore => "object store",
            Self::Consumer => "consumer",
        })
    }
}

/// What bootstrap did to one asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist and was created.
    Created,
    /// It existed with other settings and was updated.
    Updated,
    /// It already matched the declaration.
    Unchanged,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        })
    }
}

/// One line of a [`BootstrapReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportEntry {
    /// The kind of asset.
    pub kind: AssetKind,
    /// Its name (`CC_CALLS`, `patchbay-functions`, `CC_CALLS/routing`).
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
}

/// What [`bootstrap`] did, asset by asset, in declaration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapReport {
    /// One entry per declared asset.
    pub entries: Vec<ReportEntry>,
}

impl BootstrapReport {
    /// Whether anything was created or updated.
    #[must_use]
    pub fn changed(&self) -> bool {
        self.entries.iter().any(|e| e.outcome != Outcome::Unchanged)
    }

    /// How many assets had `outcome`.
    #[must_use]
    pub fn count(&self, outcome: Outcome) -> usize {
        self.entries.iter().filter(|e| e.outcome == outcome).count()
    }

    fn push(&mut self, kind: AssetKind, name: String, outcome: Outcome) {
        self.entries.push(ReportEntry {
            kind,
            name,
            outcome,
        });
    }
}

impl fmt::Display for BootstrapReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for entry in &self.entries {
            writeln!(f, "{} {}: {}", entry.kind, entry.name, entry.outcome)?;
        }
        if self.changed() {
            write!(
                f,
                "{} created, {} updated, {} unchanged",
                self.count(Outcome::Created),
                self.count(Outcome::Updated),
                self.count(Outcome::Unchanged)
            )
        } else {
            write!(
                f,
                "no change: all {} assets already match",
                self.entries.len()
            )
        }
    }
}

/// Creates or updates every asset of `decl` through `js` (which must be an admin
/// connection), with `prefix` prepended to stream and filter subjects. Idempotent.
pub async fn bootstrap(
    js: &jetstream::Context,
    decl: &Declaration,
    prefix: &str,
) -> Result<BootstrapReport> {
    let prefix = normalize_prefix(prefix)?;
    let mut report = BootstrapReport::default();
    for spec in &decl.streams {
        let outcome = ensure_stream(js, stream_config(spec, decl, &prefix)).await?;
        report.push(AssetKind::Stream, spec.name.clone(), outcome);
    }
    for spec in &decl.key_values {
        let outcome = ensure_stream(js, kv_stream_config(spec)).await?;
        report.push(AssetKind::KeyValue, spec.bucket.clone(), outcome);
    }
    for spec in &decl.object_stores {
        let outcome = ensure_stream(js, object_stream_config(spec)).await?;
        report.push(AssetKind::ObjectStore, spec.bucket.clone(), outcome);
    }
    for spec in &decl.consumers {
        let outcome = ensure_consumer(js, spec, &prefix).await?;
        report.push(
            AssetKind::Consumer,
            format!("{}/{}", spec.stream, spec.name),
            outcome,
        );
    }
    Ok(report)
}

/// The desired configuration of a declared stream.
#[must_use]
pub fn stream_config(spec: &StreamSpec, decl: &Declaration, prefix: &str) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        description: spec.description.clone(),
        subjects: spec
            .subjects
            .iter()
            .map(|s| apply_prefix(prefix, s))
            .collect(),
        storage: storage(spec.storage),
        retention: match spec.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        discard: match spec.discard {
            Discard::Old => stream::DiscardPolicy::Old,
            Discard::New => stream::DiscardPolicy::New,
        },
        max_age: spec.max_age.unwrap_or_default(),
        max_bytes: spec.max_bytes.unwrap_or(-1),
        max_messages: spec.max_msgs.unwrap_or(-1),
        max_messages_per_subject: -1,
        max_message_size: msg_size(spec.max_msg_size),
        num_replicas: spec.replicas,
        duplicate_window: spec.duplicate_window.unwrap_or(decl.duplicate_window),
        allow_atomic_publish: spec.allow_atomic,
        ..Default::default()
    }
}

/// The stream backing a KV bucket, as async-nats `create_key_value` would configure it.
#[must_use]
pub fn kv_stream_config(spec: &KvSpec) -> stream::Config {
    stream::Config {
        name: spec.stream_name(),
        description: spec.description.clone(),
        subjects: vec![format!("$KV.{}.>", spec.bucket)],
        max_messages_per_subject: spec.history,
        max_bytes: spec.max_bytes.unwrap_or(-1),
        max_messages: -1,
        max_age: spec.max_age.unwrap_or_default(),
        max_message_size: msg_size(spec.max_value_size),
        storage: storage(spec.storage),
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: spec.replicas,
        discard: stream::DiscardPolicy::New,
        // Zero: the server's default (2 minutes, or max_age if shorter), kept on compare.
        duplicate_window: Duration::ZERO,
        ..Default::default()
    }
}

/// The stream backing an object store, as async-nats `create_object_store` would configure
/// it.
#[must_use]
pub fn object_stream_config(spec: &ObjectStoreSpec) -> stream::Config {
    stream::Config {
        name: spec.stream_name(),
        description: spec.description.clone(),
        subjects: vec![
            format!("$O.{}.C.>", spec.bucket),
            format!("$O.{}.M.>", spec.bucket),
        ],
        max_messages_per_subject: -1,
        max_messages: -1,
        max_bytes: spec.max_bytes.unwrap_or(-1),
        max_age: spec.max_age.unwrap_or_default(),
        max_message_size: -1,
        storage: storage(spec.storage),
        num_replicas: spec.replicas,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        duplicate_window: Duration::ZERO,
        ..Default::default()
    }
}

/// The desired configuration of a declared durable consumer.
#[must_use]
pub fn consumer_config(spec: &ConsumerSpec, prefix: &str) -> consumer::Config {
    let mut filters: Vec<String> = spec
        .filter_subjects
        .iter()
        .map(|s| apply_prefix(prefix, s))
        .collect();
    // One filter goes in `filter_subject`, which every server version understands and which
    // is what the server reports back for a single filter.
    let (filter_subject, filter_subjects) = if filters.len() == 1 {
        (filters.remove(0), Vec::new())
    } else {
        (String::new(), filters)
    };
    consumer::Config {
        durable_name: Some(spec.name.clone()),
        name: Some(spec.name.clone()),
        description: spec.description.clone(),
        deliver_policy: match spec.start_at {
            StartAt::All => consumer::DeliverPolicy::All,
            StartAt::New => consumer::DeliverPolicy::New,
            StartAt::Last => consumer::DeliverPolicy::Last,
        },
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait.unwrap_or(SERVER_DEFAULT_ACK_WAIT),
        max_deliver: spec.max_deliver.unwrap_or(-1),
        max_ack_pending: spec
            .max_ack_pending
            .unwrap_or(SERVER_DEFAULT_MAX_ACK_PENDING),
        filter_subject,
        filter_subjects,
        ..Default::default()
    }
}

async fn ensure_stream(js: &jetstream::Context, desired: stream::Config) -> Result<Outcome> {
    let name = desired.name.clone();
    let existing = match js.get_stream(&name).await {
        Ok(stream) => stream.cached_info().config.clone(),
        Err(err) if is_stream_not_found(&err) => {
            js.create_stream(desired)
                .await
                .map_err(|e| js_error("create stream", &name, e))?;
            return Ok(Outcome::Created);
        }
        Err(err) => return Err(js_error("look up stream", &name, err)),
    };
    let merged = overlay_stream(&existing, &desired);
    if merged == existing {
        return Ok(Outcome::Unchanged);
    }
    js.update_stream(merged)
        .await
        .map_err(|e| js_error("update stream", &name, e))?;
    Ok(Outcome::Updated)
}

/// `existing` with every field the declaration manages replaced by its desired value.
fn overlay_stream(existing: &stream::Config, desired: &stream::Config) -> stream::Config {
    let mut merged = existing.clone();
    merged.description.clone_from(&desired.description);
    merged.subjects.clone_from(&desired.subjects);
    merged.storage = desired.storage;
    merged.retention = desired.retention;
    merged.discard = desired.discard;
    merged.max_age = desired.max_age;
    merged.max_bytes = desired.max_bytes;
    merged.max_messages = desired.max_messages;
    merged.max_messages_per_subject = desired.max_messages_per_subject;
    merged.max_message_size = desired.max_message_size;
    merged.num_replicas = desired.num_replicas;
    merged.allow_rollup = desired.allow_rollup;
    merged.deny_delete = desired.deny_delete;
    merged.deny_purge = desired.deny_purge;
    merged.allow_direct = desired.allow_direct;
    merged.allow_atomic_publish = desired.allow_atomic_publish;
    if !desired.duplicate_window.is_zero() {
        merged.duplicate_window = desired.duplicate_window;
    }
    merged
}

async fn ensure_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    prefix: &str,
) -> Result<Outcome> {
    let asset = format!("{}/{}", spec.stream, spec.name);
    let desired = consumer_config(spec, prefix);
    let stream = js
        .get_stream_no_info(&spec.stream)
        .await
        .map_err(|e| js_error("look up stream of consumer", &asset, e))?;
    let existing = match stream.consumer_info(&spec.name).await {
        Ok(info) => info.config,
        Err(err)
            if err.kind() == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
        {
            stream
                .create_consumer(desired)
                .await
                .map_err(|e| js_error("create consumer", &asset, e))?;
            return Ok(Outcome::Created);
        }
        Err(err) => return Err(js_error("look up consumer", &asset, err)),
    };
    let merged = overlay_consumer(&existing, &desired);
    if merged == existing {
        return Ok(Outcome::Unchanged);
    }
    stream
        .update_consumer(merged)
        .await
        .map_err(|e| js_error("update consumer", &asset, e))?;
    Ok(Outcome::Updated)
}

fn overlay_consumer(existing: &consumer::Config, desired: &consumer::Config) -> consumer::Config {
    let mut merged = existing.clone();
    merged.description.clone_from(&desired.description);
    merged.deliver_policy = desired.deliver_policy;
    merged.ack_policy = desired.ack_policy;
    merged.ack_wait = desired.ack_wait;
    merged.max_deliver = desired.max_deliver;
    merged.max_ack_pending = desired.max_ack_pending;
    merged.filter_subject.clone_from(&desired.filter_subject);
    merged.filter_subjects.clone_from(&desired.filter_subjects);
    merged
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn js_error(
    action: &'static str,
    asset: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> StreamsError {
    StreamsError::JetStream {
        action,
        asset: asset.to_owned(),
        source: Box::new(source),
    }
}

fn storage(storage: Storage) -> stream::StorageType {
    match storage {
        Storage::File => stream::StorageType::File,
        Storage::Memory => stream::StorageType::Memory,
    }
}

/// Validation guarantees the value fits; -1 is the server's "no limit".
fn msg_size(size: Option<i64>) -> i32 {
    size.and_then(|s| i32::try_from(s).ok()).unwrap_or(-1)
}

fn normalize_prefix(prefix: &str) -> Result<String> {
    crate::access::normalize_prefix(prefix).ok_or_else(|| StreamsError::BadPrefix {
        prefix: prefix.to_owned(),
    })
}

fn check_name(kind: &'static str, name: &str) -> Result<()> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Ok(())
    } else {
        Err(StreamsError::InvalidName {
            kind,
            name: name.to_owned(),
            extra: "",
        })
    }
}

fn check_stream_subject(stream: &str, subject: &str) -> Result<()> {
    check_subject(subject).map_err(|reason| StreamsError::InvalidSubject {
        asset: stream.to_owned(),
        subject: subject.to_owned(),
        reason,
    })?;
    if subject.starts_with('$') || subject.starts_with("_INBOX") || subject.starts_with(['*', '>'])
    {
        return Err(StreamsError::InvalidSubject {
            asset: stream.to_owned(),
            subject: subject.to_owned(),
            reason: "streams capture application subjects only (no $…, _INBOX… or leading wildcard)",
        });
    }
    Ok(())
}

fn check_limits(
    asset: &str,
    max_bytes: Option<i64>,
    max_msgs: Option<i64>,
    replicas: usize,
) -> Result<()> {
    if let Some(bytes) = max_bytes {
        positive(asset, "max_bytes", bytes)?;
    }
    if let Some(msgs) = max_msgs {
        positive(asset, "max_msgs", msgs)?;
    }
    if !(1..=5).contains(&replicas) {
        return Err(StreamsError::OutOfRange {
            asset: asset.to_owned(),
            field: "replicas",
            value: replicas.to_string(),
            expected: "1..=5",
        });
    }
    Ok(())
}

fn positive<T: PartialOrd + Default + fmt::Display>(
    asset: &str,
    field: &'static str,
    value: T,
) -> Result<()> {
    if value > T::default() {
        Ok(())
    } else {
        Err(StreamsError::OutOfRange {
            asset: asset.to_owned(),
            field,
            value: value.to_string(),
            expected: "greater than zero",
        })
    }
}

fn in_i32(asset: &str, field: &'static str, value: i64) -> Result<()> {
    if i32::try_from(value).is_ok() {
        Ok(())
    } else {
        Err(StreamsError::OutOfRange {
            asset: asset.to_owned(),
            field,
            value: value.to_string(),
            expected: "below 2 GiB",
        })
    }
}

fn one() -> usize {
    1
}

fn one_i64() -> i64 {
    1
}

fn default_duplicate_window() -> Duration {
    DEFAULT_DUPLICATE_WINDOW
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<i64>, D::Error> {
    match RawSize::deserialize(d)? {
        RawSize::Bytes(n) => Ok(Some(n)),
        RawSize::Text(text) => parse_size(&text)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!(
                "invalid size {text:?}: use bytes or a number with B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ))),
    }
}

/// `"256MiB"` → 268435456. Binary and decimal units; no fractions.
fn parse_size(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number.replace('_', "").parse().ok()?;
    let factor: i64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::test_nats::TestNats;

    fn deploy_decl() -> Declaration {
        Declaration::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/streams.toml"))
            .unwrap()
    }

    const MINI: &str = r#"
duplicate_window = "2m"

[[streams]]
name = "EVENTS"
subjects = ["app.events.>"]
max_age = "1h"
max_bytes = "1MiB"

[[kv]]
bucket = "state"
history = 4

[[object_stores]]
bucket = "blobs"

[[consumers]]
stream = "EVENTS"
name = "worker"
filter_subjects = ["app.events.*.created"]
max_deliver = 5
"#;

    fn mini_with(find: &str, replace: &str) -> Result<Declaration> {
        assert!(MINI.contains(find), "{find:?} not in MINI");
        Declaration::from_toml_str(&MINI.replacen(find, replace, 1))
    }

    #[test]
    fn deploy_declaration_has_the_design_assets() {
        let decl = deploy_decl();
        let streams: Vec<&str> = decl.streams.iter().map(|s| s.name.as_str()).collect();
        for name in [
            "CC_CALLS",
            "CC_AGENT_CMDS",
            "CC_AGENTS",
            "CC_RECORDINGS",
            "PATCHBAY_LOGS",
            "PATCHBAY_DLQ",
        ] {
            assert!(streams.contains(&name), "{name}");
        }
        let buckets: Vec<&str> = decl.key_values.iter().map(|k| k.bucket.as_str()).collect();
        assert_eq!(
            buckets,
            [
                "patchbay-functions",
                "patchbay-tokens",
                "patchbay-resilience",
                "cc-agents",
                "patchbay-canary-verdicts",
                "patchbay-fn-state",
                "patchbay-access"
            ]
        );
        let functions = &decl.key_values[0];
        assert_eq!(functions.history, 16);
        // The one bucket of every function's state, where the host looks for it.
        let state = decl
            .key_values
            .iter()
            .find(|k| k.bucket == patchbay_registry::FUNCTION_STATE_BUCKET)
            .expect("the function state bucket is declared");
        assert_eq!(state.history, 1);
        assert_eq!(decl.object_stores[0].bucket, "patchbay-artifacts");
        let logs = decl.stream("PATCHBAY_LOGS").unwrap();
        assert!(
            logs.max_age.is_some() && logs.max_bytes.is_some(),
            "logs are bounded"
        );
        assert_eq!(decl.duplicate_window, Duration::from_secs(120));
    }

    #[test]
    fn parses_sizes_and_durations() {
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size("1_000"), Some(1000));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("1.5GiB"), None);
        assert_eq!(parse_size("12 parsecs"), None);
        let decl = Declaration::from_toml_str(MINI).unwrap();
        assert_eq!(decl.streams[0].max_bytes, Some(1 << 20));
        assert_eq!(decl.streams[0].max_age, Some(Duration::from_secs(3600)));
        let err = mini_with(r#"max_age = "1h""#, r#"max_age = "soon""#).unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
    }

    #[test]
    fn refuses_invalid_declarations() {
        let cases = [
            (r#"name = "EVENTS""#, r#"name = "EV.ENTS""#, "invalid name"),
            (r#"name = "EVENTS""#, r#"name = "KV_x""#, "reserved prefix"),
            (
                r#"subjects = ["app.events.>"]"#,
                r#"subjects = ["app..x"]"#,
                "bad subject",
            ),
            (
                r#"subjects = ["app.events.>"]"#,
                r#"subjects = ["$KV.x.>"]"#,
                "system subject",
            ),
            (r#"history = 4"#, r#"history = 65"#, "history"),
            (
                r#"stream = "EVENTS""#,
                r#"stream = "NOPE""#,
                "unknown stream",
            ),
            (
                r#"filter_subjects = ["app.events.*.created"]"#,
                r#"filter_subjects = ["other.>"]"#,
                "filter outside stream",
            ),
            (r#"max_deliver = 5"#, r#"max_deliver = 0"#, "max_deliver"),
            (
                r#"max_age = "1h""#,
                r#"max_age = "1m""#,
                "window above max_age",
            ),
            (
                r#"bucket = "blobs""#,
                r#"bucket = "state""#,
                "ok: different kinds",
            ),
            (r#"max_bytes = "1MiB""#, r#"max_bytes = 0"#, "zero size"),
            (
                r#"name = "worker""#,
                r#"name = "worker"
bogus = true"#,
                "unknown field",
            ),
        ];
        for (find, replace, what) in cases {
            let result = mini_with(find, replace);
            if what.starts_with("ok") {
                assert!(result.is_ok(), "{what}: {result:?}");
            } else {
                assert!(result.is_err(), "{what} was accepted");
            }
        }
        let overlapping =
            format!("{MINI}\n[[streams]]\nname = \"MORE\"\nsubjects = [\"app.*.x\"]\n");
        assert!(matches!(
            Declaration::from_toml_str(&overlapping),
            Err(StreamsError::OverlappingStreams { .. })
        ));
        let twice = format!("{MINI}\n[[kv]]\nbucket = \"state\"\n");
        assert!(matches!(
            Declaration::from_toml_str(&twice),
            Err(StreamsError::Duplicate { .. })
        ));
    }

    #[test]
    fn prefix_goes_on_stream_and_filter_subjects() {
        let decl = Declaration::from_toml_str(MINI).unwrap();
        let config = stream_config(&decl.streams[0], &decl, "tenant-a");
        assert_eq!(config.subjects, vec!["tenant-a.app.events.>"]);
        let consumer = consumer_config(&decl.consumers[0], "tenant-a");
        assert_eq!(consumer.filter_subject, "tenant-a.app.events.*.created");
        assert_eq!(
            kv_stream_config(&decl.key_values[0]).subjects,
            vec!["$KV.state.>"]
        );
    }

    #[tokio::test]
    async fn bootstrap_creates_then_changes_nothing_on_a_second_run() {
        let server = TestNats::start_plain();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let decl = deploy_decl();

        let first = bootstrap(&js, &decl, "").await.unwrap();
        let assets = decl.streams.len()
            + decl.key_values.len()
            + decl.object_stores.len()
            + decl.consumers.len();
        assert_eq!(first.count(Outcome::Created), assets, "{first}");

        let second = bootstrap(&js, &decl, "").await.unwrap();
        assert!(!second.changed(), "second run changed something:\n{second}");
        assert_eq!(second.count(Outcome::Unchanged), assets);
        assert!(second.to_string().contains("no change"));

        // What bootstrap made is usable through the ordinary client APIs.
        let kv = js.get_key_value("patchbay-functions").await.unwrap();
        kv.put("hello", "v1".into()).await.unwrap();
        assert_eq!(kv.get("hello").await.unwrap().unwrap(), "v1");
        assert_eq!(kv.status().await.unwrap().history(), 16);
        let store = js.get_object_store("patchbay-artifacts").await.unwrap();
        store.put("blob", &mut &b"bytes"[..]).await.unwrap();
        let calls = js.get_stream("CC_CALLS").await.unwrap();
        assert_eq!(
            calls.cached_info().config.duplicate_window,
            Duration::from_secs(120)
        );
        let routing = calls.consumer_info("routing").await.unwrap();
        assert_eq!(routing.config.filter_subject, "cc.v1.calls.*.incoming");
    }

    #[tokio::test]
    async fn bootstrap_updates_what_drifted() {
        let server = TestNats::start_plain();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let decl = Declaration::from_toml_str(MINI).unwrap();
        bootstrap(&js, &decl, "").await.unwrap();

        let changed = Declaration::from_toml_str(
            &MINI
                .replace(r#"max_bytes = "1MiB""#, r#"max_bytes = "2MiB""#)
                .replace("history = 4", "history = 8")
                .replace("max_deliver = 5", "max_deliver = 7"),
        )
        .unwrap();
        let report = bootstrap(&js, &changed, "").await.unwrap();
        let outcome = |name: &str| {
            report
                .entries
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.outcome)
                .unwrap()
        };
        assert_eq!(outcome("EVENTS"), Outcome::Updated);
        assert_eq!(outcome("state"), Outcome::Updated);
        assert_eq!(outcome("EVENTS/worker"), Outcome::Updated);
        assert_eq!(outcome("blobs"), Outcome::Unchanged);
        let info = js.get_stream("EVENTS").await.unwrap();
        assert_eq!(info.cached_info().config.max_bytes, 2 << 20);
        assert!(!bootstrap(&js, &changed, "").await.unwrap().changed());
    }

    #[tokio::test]
    async fn bootstrap_applies_the_subject_prefix() {
        let server = TestNats::start_plain();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let decl = Declaration::from_toml_str(MINI).unwrap();
        bootstrap(&js, &decl, "tenant-a").await.unwrap();
        let stream = js.get_stream("EVENTS").await.unwrap();
        assert_eq!(
            stream.cached_info().config.subjects,
            vec!["tenant-a.app.events.>"]
        );
        assert!(matches!(
            bootstrap(&js, &decl, "a.*").await,
            Err(StreamsError::BadPrefix { .. })
        ));
    }
}
