//! `deploy/access.toml`: who may publish and subscribe what on the bus, deny by default.
//!
//! The policy grants by **group**; a group's `members` are identity patterns (`runtime/*`,
//! `service/routing`). Each group lists
//!
//! * `publish` / `subscribe` — application subjects (NATS wildcards allowed, never a leading
//!   wildcard except for `cli/admin`), plus `$SRV.>` for the micro protocol and the read-only
//!   literals `$JS.API.INFO` and `$JS.API.STREAM.NAMES`;
//! * `owns` — publish patterns that only this group may publish: every other group whose
//!   broader allow (`cc.v1.>`) overlaps one gets an explicit `deny` for it, so a runtime node
//!   that may emit function outputs on `cc.v1.>` still cannot forge `routed` events or agent
//!   commands;
//! * `allow_responses` — may answer requests it received (reply inboxes of others);
//! * typed JetStream grants — `consume = ["STREAM/consumer"]`, `kv_read`, `kv_write`,
//!   `object_read` — which render to exactly the `$JS.API…`, `$JS.ACK…`, `$JS.FC…`, `$KV…`
//!   subjects async-nats uses for those operations. Raw `$JS`/`$KV`/`$O` subjects are refused
//!   in `publish`, so nobody is granted stream, bucket or consumer creation/deletion by
//!   accident (those belong to the admin bootstrap, [`crate::streams`]).
//!
//! Every identity additionally subscribes to its own reply inbox `_INBOX.<kind>.<name>.>`
//! (see [`Identity::inbox_prefix`]) and to nothing else below `_INBOX`.
//!
//! **Globs.** NATS subjects have no partial-token wildcards, so a grant on consumers created
//! at run time (`consume = ["CC_CALLS/fn-*"]` for the ones `patchbay fn deploy` creates)
//! renders the consumer token as `*` and adds a `deny` for every *declared* consumer of that
//! stream (from `deploy/streams.toml`) that the group is not granted by name. Such a glob
//! never covers a declared consumer, nor any other stream; it does cover a consumer of that
//! one declared stream that somebody created later without declaring it. KV buckets and
//! object stores are granted by name only: their grants name the stream in a `$JS.API…`
//! token, where a glob would have to be `*` and so reach every stream nobody declared
//! (stream info, an unnamed consumer reading a whole stream). Function state is therefore
//! one declared bucket, not a bucket per function.
//!
//! **Prefix.** [`AccessPolicy::with_subject_prefix`] prepends a prefix (default none) to
//! application subjects; `$…` and `_INBOX…` subjects are left alone. It isolates subjects,
//! not JetStream asset names: two Patchbay instances with different prefixes still need
//! separate NATS accounts.
//!
//! **Deny matrix.** [`AccessPolicy::identities`] lists concrete example identities (one or
//! more per group) and [`AccessPolicy::expectations`] tells, for each, subjects the server
//! must accept and subjects it must refuse: the group's declared examples, one example per
//! JetStream grant, the `[never]` subjects (stream/bucket/consumer administration) for every
//! non-admin, and every other identity's allowed examples that this identity's permissions do
//! not cover (other inboxes, other consumers, owned subjects). [`AccessPolicy::load`] already
//! refuses a policy that contradicts its own examples; the integration test checks that a live
//! nats-server agrees.
//!
//! This module does not render nats-server syntax (that is [`crate::natsconf`]) and does not
//! create the assets (that is [`crate::streams`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use patchbay_bus::pattern;
use serde::{Deserialize, Serialize};

use crate::certs::{Identity, IdentityError, is_identity_token};
use crate::streams::{Declaration, StreamsError};

/// Token appended to example subjects and used as example asset names in the deny matrix.
pub const EXAMPLE_TOKEN: &str = "deny-matrix";
const JS_API: &str = "$JS.API";
/// Read-only JetStream API calls a group may list in `publish`: account info, and stream
/// names (which stream, if any, stores a subject — how the gateway tells durable subjects
/// from core ones).
const JS_READ_ONLY: [&str; 2] = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"];

/// Errors loading or validating an access policy.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The policy file cannot be read.
    #[error("failed to read access policy {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The policy is not valid TOML of the expected shape.
    #[error("access policy {origin} is not valid: {source}")]
    Toml {
        /// File name or `<string>`.
        origin: String,
        /// The parser's message (line and column included).
        #[source]
        source: toml::de::Error,
    },
    /// The streams declaration the policy refers to failed to load.
    #[error("access policy {path} refers to an invalid streams declaration")]
    Assets {
        /// The policy file.
        path: PathBuf,
        /// The streams error.
        #[source]
        source: Box<StreamsError>,
    },
    /// An identity or member pattern is malformed.
    #[error("group {group:?}: bad identity")]
    Identity {
        /// The group (or `identities` for the top-level list).
        group: String,
        /// What is wrong.
        #[source]
        source: IdentityError,
    },
    /// A member pattern that is neither `kind/name` nor `kind/*`.
    #[error("group {group:?}: member {member:?} must be kind/name or kind/*")]
    BadMember {
        /// The group.
        group: String,
        /// The pattern.
        member: String,
    },
    /// Two member patterns (in one group or two) cover the same identity.
    #[error(
        "member {member:?} of group {group:?} overlaps {other_member:?} of group {other_group:?}"
    )]
    DuplicateMember {
        /// One group.
        group: String,
        /// Its pattern.
        member: String,
        /// The other group (may be the same).
        other_group: String,
        /// Its pattern.
        other_member: String,
    },
    /// A group without members.
    #[error("group {group:?} has no members")]
    NoMembers {
        /// The group.
        group: String,
    },
    /// An example identity that no group covers.
    #[error("identity {identity} (in `identities`) belongs to no group")]
    UnknownIdentity {
        /// The identity.
        identity: String,
    },
    /// The same example identity listed twice.
    #[error("identity {identity} is listed twice in `identities`")]
    DuplicateIdentity {
        /// The identity.
        identity: String,
    },
    /// A group none of whose members appears in `identities` (the deny matrix would not
    /// cover it).
    #[error("group {group:?} has no example identity in `identities`")]
    GroupWithoutIdentity {
        /// The group.
        group: String,
    },
    /// Not a NATS subject (or pattern).
    #[error("group {group:?}: {field} entry {subject:?} is not a valid subject: {reason}")]
    InvalidSubject {
        /// The group (or `never`).
        group: String,
        /// The field (`publish`, `subscribe`, `owns`, ...).
        field: &'static str,
        /// The entry.
        subject: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A full or leading wildcard given to someone other than `cli/admin`.
    #[error(
        "group {group:?}: {field} entry {subject:?} starts with a wildcard; only a group whose only member is cli/admin may have that"
    )]
    WildcardNotAdmin {
        /// The group.
        group: String,
        /// The field.
        field: &'static str,
        /// The entry.
        subject: String,
    },
    /// A raw system subject where a typed grant is required.
    #[error(
        "group {group:?}: {field} entry {subject:?} is reserved; grant JetStream access with consume/kv_read/kv_write/object_read (inboxes are granted automatically)"
    )]
    ReservedSubject {
        /// The group.
        group: String,
        /// The field.
        field: &'static str,
        /// The entry.
        subject: String,
    },
    /// An `owns` entry that is not one of the group's own `publish` entries.
    #[error("group {group:?}: owns {subject:?} but does not list it in publish")]
    OwnsWithoutPublish {
        /// The group.
        group: String,
        /// The pattern.
        subject: String,
    },
    /// A subject owned by two groups, or published explicitly by a group that does not own it.
    #[error("group {group:?}: {subject:?} is owned by group {owner:?}")]
    OwnedByOther {
        /// The offending group.
        group: String,
        /// The pattern.
        subject: String,
        /// The owning group.
        owner: String,
    },
    /// A grant names an asset `deploy/streams.toml` does not declare.
    #[error(
        "group {group:?}: {field} names {name:?}, which the streams declaration does not declare"
    )]
    UnknownAsset {
        /// The group.
        group: String,
        /// The field.
        field: &'static str,
        /// The asset.
        name: String,
    },
    /// An asset name or glob that is malformed.
    #[error("group {group:?}: {field} entry {name:?} is not a valid name or glob ({expected})")]
    BadAssetName {
        /// The group.
        group: String,
        /// The field.
        field: &'static str,
        /// The entry.
        name: String,
        /// What is expected.
        expected: &'static str,
    },
    /// A `[never]` subject that some non-admin identity is granted.
    #[error("identity {identity} (group {group:?}) is granted {subject:?}, which [never] forbids")]
    NeverGranted {
        /// The identity.
        identity: String,
        /// Its group.
        group: String,
        /// The subject.
        subject: String,
    },
    /// A group's example contradicts its permissions.
    #[error(
        "group {group:?}: example {subject:?} should be {expected} for {operation} but the policy says otherwise"
    )]
    ExampleContradicted {
        /// The group.
        group: String,
        /// `publish` or `subscribe`.
        operation: &'static str,
        /// The example subject.
        subject: String,
        /// `allowed` or `refused`.
        expected: &'static str,
    },
    /// An `[undeclared]` probe asset that the streams declaration does declare.
    #[error("[undeclared] names {name:?}, which the streams declaration declares")]
    ProbeDeclared {
        /// The asset.
        name: String,
    },
    /// A KV or object store grant with a glob: it would reach streams nobody declared.
    #[error(
        "group {group:?}: {field} entry {name:?} is a glob; buckets and object stores are granted by name only (a glob over stream names reaches every stream nobody declared)"
    )]
    StoreGlob {
        /// The group.
        group: String,
        /// The field.
        field: &'static str,
        /// The entry.
        name: String,
    },
    /// A non-admin reaches an undeclared asset.
    #[error(
        "identity {identity} (group {group:?}) may publish {subject:?} on an asset nobody declared"
    )]
    UndeclaredReachable {
        /// The identity.
        identity: String,
        /// Its group.
        group: String,
        /// The probe subject.
        subject: String,
    },
    /// The subject prefix is not a literal subject.
    #[error("subject prefix {prefix:?} must be empty or a literal subject without wildcards")]
    BadPrefix {
        /// What was given.
        prefix: String,
    },
}

/// Result of access-policy operations.
pub type Result<T, E = AccessError> = std::result::Result<T, E>;

/// The rendered permissions of one identity, in nats-server terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// Subjects this identity may publish to (may contain wildcards).
    pub publish_allow: Vec<String>,
    /// Exceptions to `publish_allow` (nats-server applies deny before allow).
    pub publish_deny: Vec<String>,
    /// Subjects this identity may subscribe to.
    pub subscribe_allow: Vec<String>,
    /// Whether it may publish one reply to the reply subject of each message it received.
    pub allow_responses: bool,
}

impl Permissions {
    /// Whether a publish to the literal `subject` passes (reply permissions from
    /// `allow_responses` aside), by the same rule nats-server applies.
    #[must_use]
    pub fn allows_publish(&self, subject: &str) -> bool {
        self.publish_allow.iter().any(|p| matches(p, subject))
            && !self.publish_deny.iter().any(|p| matches(p, subject))
    }

    /// Whether a subscription to `subject` (which may contain wildcards, matched as literal
    /// tokens like nats-server does) passes.
    #[must_use]
    pub fn allows_subscribe(&self, subject: &str) -> bool {
        self.subscribe_allow.iter().any(|p| matches(p, subject))
    }
}

/// What the deny matrix expects of one identity against a live server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectations {
    /// The identity.
    pub identity: Identity,
    /// Literal subjects a publish to which must succeed.
    pub publish_allowed: Vec<String>,
    /// Literal subjects a publish to which must be refused (`permissions violation`).
    pub publish_refused: Vec<String>,
    /// Subjects (possibly wildcards) a subscription to which must succeed.
    pub subscribe_allowed: Vec<String>,
    /// Subjects (possibly wildcards) a subscription to which must be refused. For a
    /// non-admin, `publish_refused` holds every probe of assets nobody declared
    /// (`[undeclared]`, see [`Undeclared::probes`]): no grant reaches one.
    pub subscribe_refused: Vec<String>,
}

/// Assets no streams declaration declares, which the deny matrix creates as the admin and
/// every other identity must be refused, every probe of them (`[undeclared]` in
/// access.toml; [`AccessPolicy::load`] refuses a policy that grants one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Undeclared {
    /// Plain streams; the test gives each the subjects [`Undeclared::stream_subjects`].
    pub streams: Vec<String>,
    /// KV buckets.
    pub key_values: Vec<String>,
}

impl Undeclared {
    /// The subjects of probe stream `stream`, e.g. `undeclared.UNDECLARED.>`.
    #[must_use]
    pub fn stream_subjects(stream: &str) -> String {
        format!("undeclared.{stream}.>")
    }

    /// The literal subject a probe message of stream `stream` is stored on.
    #[must_use]
    pub fn stream_message_subject(stream: &str) -> String {
        format!("undeclared.{stream}.{EXAMPLE_TOKEN}")
    }

    /// Every probe: a literal subject per JetStream read, consume or write of each asset.
    #[must_use]
    pub fn probes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let stores = self
            .streams
            .iter()
            .map(|s| (s.clone(), Self::stream_message_subject(s)))
            .chain(
                self.key_values
                    .iter()
                    .map(|b| (format!("KV_{b}"), format!("$KV.{b}.{EXAMPLE_TOKEN}"))),
            );
        for (stream, stored) in stores {
            let c = EXAMPLE_TOKEN;
            out.extend([
                format!("{JS_API}.STREAM.INFO.{stream}"),
                format!("{JS_API}.STREAM.MSG.GET.{stream}"),
                format!("{JS_API}.DIRECT.GET.{stream}"),
                format!("{JS_API}.DIRECT.GET.{stream}.{stored}"),
                format!("{JS_API}.CONSUMER.CREATE.{stream}"),
                format!("{JS_API}.CONSUMER.CREATE.{stream}.{c}"),
                format!("{JS_API}.CONSUMER.CREATE.{stream}.{c}.{stored}"),
                format!("{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{c}"),
                format!("{JS_API}.CONSUMER.INFO.{stream}.{c}"),
                format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.{c}"),
                format!("$JS.ACK.{stream}.{c}.1.1.1.1.0"),
            ]);
        }
        for bucket in &self.key_values {
            out.push(format!("$KV.{bucket}.{EXAMPLE_TOKEN}"));
        }
        out
    }
}

/// What a group that hosts functions (runtime nodes, gateways) may do with application
/// subjects and consumers, as `patchbay fn deploy` checks triggers and allow-lists against
/// it. Subjects are without the subject prefix; `$…` entries (discovery, `$JS.API.INFO`) are
/// left out, since they are never a function's trigger or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRules {
    /// The group.
    pub group: String,
    /// Application subjects (patterns) the group may subscribe to.
    pub subscribe: Vec<String>,
    /// Application subjects (patterns) the group may publish.
    pub publish: Vec<String>,
    /// Subjects other groups own, which this group may never publish.
    pub owned: Vec<OwnedSubject>,
    /// Durable consumers the group may pull from, `STREAM/consumer` (`*` ends a glob).
    pub consume: Vec<String>,
}

/// A subject pattern some group owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedSubject {
    /// The owning group.
    pub group: String,
    /// The pattern.
    pub subject: String,
}

/// A validated access policy.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    identities: Vec<Identity>,
    groups: Vec<Group>,
    never_publish: Vec<String>,
    never_subscribe: Vec<String>,
    undeclared: Undeclared,
    catalog: Catalog,
    prefix: String,
}

#[derive(Debug, Clone)]
struct Group {
    name: String,
    members: Vec<Member>,
    allow_responses: bool,
    publish: Vec<String>,
    subscribe: Vec<String>,
    owns: Vec<String>,
    grants: Vec<Grant>,
    examples: RawExamples,
}

impl Group {
    fn is_admin(&self) -> bool {
        self.members == [Member::Exact(Identity::admin())]
    }

    fn covers(&self, identity: &Identity) -> bool {
        self.members.iter().any(|m| m.covers(identity))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Member {
    Exact(Identity),
    AnyOfKind(String),
}

impl Member {
    fn covers(&self, identity: &Identity) -> bool {
        match self {
            Self::Exact(id) => id == identity,
            Self::AnyOfKind(kind) => identity.kind() == kind,
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Exact(a), Self::AnyOfKind(k)) | (Self::AnyOfKind(k), Self::Exact(a)) => {
                a.kind() == k
            }
            (Self::AnyOfKind(a), Self::AnyOfKind(b)) => a == b,
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::AnyOfKind(kind) => write!(f, "{kind}/*"),
        }
    }
}

/// A consumer name in a `consume` grant (and, parsed the same way, a store name, which
/// must be a literal): a declared name or a glob over names created at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Literal(String),
    /// `prefix*` (`*` alone has an empty prefix).
    Glob(String),
}

impl Name {
    fn parse(group: &str, field: &'static str, raw: &str) -> Result<Self> {
        let bad = || AccessError::BadAssetName {
            group: group.to_owned(),
            field,
            name: raw.to_owned(),
            expected: "[A-Za-z0-9_-]+, optionally ending in *",
        };
        let (body, glob) = match raw.strip_suffix('*') {
            Some(body) => (body, true),
            None => (raw, false),
        };
        if (!glob && body.is_empty()) || !body.chars().all(is_asset_char) {
            return Err(bad());
        }
        Ok(if glob {
            Self::Glob(body.to_owned())
        } else {
            Self::Literal(body.to_owned())
        })
    }

    /// The subject token: the name itself, or `*` for a glob.
    fn token(&self) -> String {
        match self {
            Self::Literal(name) => name.clone(),
            Self::Glob(_) => "*".to_owned(),
        }
    }

    /// A concrete name for deny-matrix examples.
    fn example(&self) -> String {
        match self {
            Self::Literal(name) => name.clone(),
            Self::Glob(prefix) => format!("{prefix}{EXAMPLE_TOKEN}"),
        }
    }

    fn is_glob(&self) -> bool {
        matches!(self, Self::Glob(_))
    }
}

fn is_asset_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A typed JetStream grant.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    /// Pull from (and ack on) a durable consumer of a declared stream.
    Consume { stream: String, consumer: Name },
    /// Read (get, watch, list keys) a declared KV bucket.
    KvRead(String),
    /// Read and write (put, update with CAS, delete, purge) a declared KV bucket.
    KvWrite(String),
    /// Read (get, list, watch) a declared object store.
    ObjectRead(String),
}

/// One allowed subject and, for glob grants, the subjects of declared assets it must not
/// reach.
struct Rule {
    allow: String,
    deny_candidates: Vec<String>,
    /// Whether the allow comes from a glob (reaches consumers nobody declared).
    glob: bool,
}

/// Names declared in `deploy/streams.toml`.
#[derive(Debug, Clone, Default)]
struct Catalog {
    /// Every stream, including `KV_<bucket>` and `OBJ_<store>`.
    streams: BTreeSet<String>,
    /// Plain streams (not backing a KV bucket or object store).
    plain_streams: BTreeSet<String>,
    buckets: BTreeSet<String>,
    object_stores: BTreeSet<String>,
    consumers: BTreeMap<String, BTreeSet<String>>,
}

impl Catalog {
    fn from_declaration(decl: &Declaration) -> Self {
        let mut catalog = Self::default();
        for stream in &decl.streams {
            catalog.streams.insert(stream.name.clone());
            catalog.plain_streams.insert(stream.name.clone());
        }
        for kv in &decl.key_values {
            catalog.streams.insert(kv.stream_name());
            catalog.buckets.insert(kv.bucket.clone());
        }
        for store in &decl.object_stores {
            catalog.streams.insert(store.stream_name());
            catalog.object_stores.insert(store.bucket.clone());
        }
        for consumer in &decl.consumers {
            catalog
                .consumers
                .entry(consumer.stream.clone())
                .or_default()
                .insert(consumer.name.clone());
        }
        catalog
    }
}

impl Grant {
    /// The subjects this grant allows, and what globs must not reach.
    fn rules(&self, catalog: &Catalog) -> Vec<Rule> {
        let mut rules = Vec::new();
        match self {
            Self::Consume { stream, consumer } => {
                let known: Vec<&String> = catalog
                    .consumers
                    .get(stream)
                    .map(|set| set.iter().collect())
                    .unwrap_or_default();
                rules.push(literal(format!("{JS_API}.STREAM.INFO.{stream}")));
                for template in [
                    format!("{JS_API}.CONSUMER.INFO.{stream}.{{}}"),
                    format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.{{}}"),
                    format!("$JS.ACK.{stream}.{{}}.>"),
                ] {
                    rules.push(templated(
                        &template,
                        &consumer.token(),
                        consumer.is_glob(),
                        &known,
                    ));
                }
            }
            Self::KvRead(bucket) => rules.extend(stream_read_rules(bucket, "KV_")),
            Self::KvWrite(bucket) => {
                rules.extend(stream_read_rules(bucket, "KV_"));
                rules.push(literal(format!("$KV.{bucket}.>")));
            }
            Self::ObjectRead(store) => rules.extend(stream_read_rules(store, "OBJ_")),
        }
        rules
    }

    /// Example literal subjects this grant must allow (what the deny matrix publishes).
    fn examples(&self) -> Vec<String> {
        match self {
            Self::Consume { stream, consumer } => {
                let c = consumer.example();
                vec![
                    format!("{JS_API}.CONSUMER.INFO.{stream}.{c}"),
                    format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.{c}"),
                    format!("$JS.ACK.{stream}.{c}.1.1.1.1.0"),
                ]
            }
            Self::KvRead(bucket) => stream_read_examples(bucket, "KV_"),
            Self::KvWrite(bucket) => {
                let mut examples = stream_read_examples(bucket, "KV_");
                examples.push(format!("$KV.{bucket}.{EXAMPLE_TOKEN}"));
                examples
            }
            Self::ObjectRead(store) => stream_read_examples(store, "OBJ_"),
        }
    }
}

fn literal(allow: String) -> Rule {
    Rule {
        allow,
        deny_candidates: Vec::new(),
        glob: false,
    }
}

/// `template` has one `{}` where the asset token goes.
fn templated(template: &str, token: &str, glob: bool, known: &[&String]) -> Rule {
    Rule {
        allow: template.replacen("{}", token, 1),
        deny_candidates: if glob {
            known
                .iter()
                .map(|k| template.replacen("{}", k, 1))
                .collect()
        } else {
            Vec::new()
        },
        glob,
    }
}

/// What reading a KV bucket or object store through async-nats publishes: stream info
/// (`get_key_value` / `get_object_store`), direct and classic message gets (`get`, `entry`,
/// object metadata), ordered push consumers for watch/keys/history/object chunks (create,
/// info, flow-control replies). Consumer *deletion* is deliberately absent: async-nats tries
/// it best-effort when an ordered consumer is recreated, ignores the refusal, and the server
/// reaps the abandoned ephemeral consumer after its inactivity threshold.
///
/// The store is named (never a glob: see [`AccessError::StoreGlob`]), so every subject
/// names its stream `<stream_prefix><name>` and nothing reaches another stream.
fn stream_read_rules(name: &str, stream_prefix: &str) -> Vec<Rule> {
    let stream = format!("{stream_prefix}{name}");
    [
        format!("{JS_API}.STREAM.INFO.{stream}"),
        format!("{JS_API}.STREAM.MSG.GET.{stream}"),
        format!("{JS_API}.DIRECT.GET.{stream}"),
        format!("{JS_API}.DIRECT.GET.{stream}.>"),
        format!("{JS_API}.CONSUMER.CREATE.{stream}"),
        format!("{JS_API}.CONSUMER.CREATE.{stream}.>"),
        format!("{JS_API}.CONSUMER.INFO.{stream}.*"),
        format!("$JS.FC.{stream}.>"),
    ]
    .into_iter()
    .map(literal)
    .collect()
}

/// Example subjects of reading the store `name` (stream `<stream_prefix><name>`).
fn stream_read_examples(name: &str, stream_prefix: &str) -> Vec<String> {
    let stream = format!("{stream_prefix}{name}");
    vec![
        format!("{JS_API}.STREAM.INFO.{stream}"),
        format!("{JS_API}.DIRECT.GET.{stream}"),
        format!("{JS_API}.CONSUMER.INFO.{stream}.{EXAMPLE_TOKEN}"),
    ]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    /// The streams declaration, relative to the policy file.
    assets: String,
    identities: Vec<String>,
    #[serde(default)]
    never: RawNever,
    #[serde(default)]
    undeclared: RawUndeclared,
    groups: BTreeMap<String, RawGroup>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUndeclared {
    #[serde(default)]
    streams: Vec<String>,
    #[serde(default)]
    key_values: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNever {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    members: Vec<String>,
    #[serde(default)]
    allow_responses: bool,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    owns: Vec<String>,
    #[serde(default)]
    consume: Vec<String>,
    #[serde(default)]
    kv_read: Vec<String>,
    #[serde(default)]
    kv_write: Vec<String>,
    #[serde(default)]
    object_read: Vec<String>,
    #[serde(default)]
    examples: RawExamples,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExamples {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    refused_publish: Vec<String>,
    #[serde(default)]
    refused_subscribe: Vec<String>,
}

impl AccessPolicy {
    /// Loads `access.toml` and the streams declaration it names in `assets` (relative to the
    /// policy file), then validates both together.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: RawPolicy = toml::from_str(&text).map_err(|source| AccessError::Toml {
            origin: path.display().to_string(),
            source,
        })?;
        let assets_path = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&raw.assets);
        let decl = Declaration::load(&assets_path).map_err(|source| AccessError::Assets {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        Self::from_raw(raw, &decl)
    }

    /// Parses and validates a policy from TOML text against an already loaded streams
    /// declaration (the text's `assets` key is not followed).
    pub fn from_toml_str(text: &str, assets: &Declaration) -> Result<Self> {
        let raw: RawPolicy = toml::from_str(text).map_err(|source| AccessError::Toml {
            origin: "<string>".to_owned(),
            source,
        })?;
        Self::from_raw(raw, assets)
    }

    /// The same policy with `prefix` prepended to every application subject (not to `$…` or
    /// `_INBOX…` subjects). An empty prefix means none.
    pub fn with_subject_prefix(mut self, prefix: &str) -> Result<Self> {
        self.prefix = normalize_prefix(prefix).ok_or_else(|| AccessError::BadPrefix {
            prefix: prefix.to_owned(),
        })?;
        Ok(self)
    }

    /// The subject prefix in force (empty for none).
    #[must_use]
    pub fn subject_prefix(&self) -> &str {
        &self.prefix
    }

    /// The concrete example identities of the policy (at least one per group), in file order.
    #[must_use]
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// The name of the group `identity` belongs to, if any.
    #[must_use]
    pub fn group_of(&self, identity: &Identity) -> Option<&str> {
        self.group(identity).map(|g| g.name.as_str())
    }

    /// The permissions of `identity`, or `None` if no group covers it (such an identity gets
    /// no nats-server user, so its connections are refused).
    #[must_use]
    pub fn permissions_for(&self, identity: &Identity) -> Option<Permissions> {
        self.group(identity).map(|g| self.permissions(g, identity))
    }

    /// What the deny matrix expects of `identity`, or `None` if no group covers it.
    #[must_use]
    pub fn expectations(&self, identity: &Identity) -> Option<Expectations> {
        let group = self.group(identity)?;
        let perms = self.permissions(group, identity);
        let mut publish_allowed = self.allowed_publish_examples(group);
        let mut subscribe_allowed = self.allowed_subscribe_examples(group, identity);
        let mut publish_refused = self.prefixed(&group.examples.refused_publish);
        let mut subscribe_refused = self.prefixed(&group.examples.refused_subscribe);
        if !group.is_admin() {
            publish_refused.extend(self.prefixed(&self.never_publish));
            subscribe_refused.extend(self.prefixed(&self.never_subscribe));
            // Loading refused any policy under which one of these is reachable.
            publish_refused.extend(self.undeclared.probes());
        }
        for other in &self.identities {
            if other == identity {
                continue;
            }
            let Some(other_group) = self.group(other) else {
                continue;
            };
            for subject in self.allowed_publish_examples(other_group) {
                if perms.allows_publish(&subject) {
                    if group.is_admin() {
                        publish_allowed.push(subject);
                    }
                } else {
                    publish_refused.push(subject);
                }
            }
            for subject in self.allowed_subscribe_examples(other_group, other) {
                if perms.allows_subscribe(&subject) {
                    if group.is_admin() {
                        subscribe_allowed.push(subject);
                    }
                } else {
                    subscribe_refused.push(subject);
                }
            }
        }
        Some(Expectations {
            identity: identity.clone(),
            publish_allowed: dedup(publish_allowed),
            publish_refused: dedup(publish_refused),
            subscribe_allowed: dedup(subscribe_allowed),
            subscribe_refused: dedup(subscribe_refused),
        })
    }

    /// What the group of identities of `kind` (`runtime`, `gateway`) may do with application
    /// subjects and consumers, or `None` if no group covers that kind.
    #[must_use]
    pub fn host_rules(&self, kind: &str) -> Option<HostRules> {
        let group = self
            .groups
            .iter()
            .find(|g| {
                g.members
                    .iter()
                    .any(|m| matches!(m, Member::AnyOfKind(k) if k == kind))
            })
            .or_else(|| {
                self.groups.iter().find(|g| {
                    g.members
                        .iter()
                        .any(|m| matches!(m, Member::Exact(id) if id.kind() == kind))
                })
            })?;
        let application = |list: &[String]| -> Vec<String> {
            list.iter()
                .filter(|s| !s.starts_with('$'))
                .cloned()
                .collect()
        };
        let owned = self
            .groups
            .iter()
            .filter(|other| other.name != group.name)
            .flat_map(|other| {
                other.owns.iter().map(|subject| OwnedSubject {
                    group: other.name.clone(),
                    subject: subject.clone(),
                })
            })
            .collect();
        let consume = group
            .grants
            .iter()
            .filter_map(|grant| match grant {
                Grant::Consume { stream, consumer } => Some(match consumer {
                    Name::Literal(c) => format!("{stream}/{c}"),
                    Name::Glob(prefix) => format!("{stream}/{prefix}*"),
                }),
                _ => None,
            })
            .collect();
        Some(HostRules {
            group: group.name.clone(),
            subscribe: application(&group.subscribe),
            publish: application(&group.publish),
            owned,
            consume,
        })
    }

    /// The assets of `[undeclared]`, which the deny matrix creates as the admin.
    #[must_use]
    pub fn undeclared(&self) -> &Undeclared {
        &self.undeclared
    }

    fn group(&self, identity: &Identity) -> Option<&Group> {
        self.groups.iter().find(|g| g.covers(identity))
    }

    fn prefixed(&self, subjects: &[String]) -> Vec<String> {
        subjects
            .iter()
            .map(|s| apply_prefix(&self.prefix, s))
            .collect()
    }

    fn allowed_publish_examples(&self, group: &Group) -> Vec<String> {
        let mut out = self.prefixed(&group.examples.publish);
        out.extend(group.grants.iter().flat_map(Grant::examples));
        out
    }

    fn allowed_subscribe_examples(&self, group: &Group, identity: &Identity) -> Vec<String> {
        let mut out = self.prefixed(&group.examples.subscribe);
        out.push(format!("{}.{EXAMPLE_TOKEN}.*", identity.inbox_prefix()));
        out
    }

    fn permissions(&self, group: &Group, identity: &Identity) -> Permissions {
        let mut publish_allow = self.prefixed(&group.publish);
        let mut by_name = Vec::new();
        let mut candidates = Vec::new();
        for grant in &group.grants {
            for rule in grant.rules(&self.catalog) {
                if !rule.glob {
                    by_name.push(rule.allow.clone());
                }
                publish_allow.push(rule.allow);
                candidates.extend(rule.deny_candidates);
            }
        }
        let publish_allow = dedup(publish_allow);
        // A glob's deny of a declared asset gives way to what the group holds by name, and
        // to an identical allow of another grant (`CC_CALLS/fn-*` names the stream CC_CALLS).
        let mut publish_deny: Vec<String> = candidates
            .into_iter()
            .filter(|c| !by_name.iter().any(|allow| covers(allow, c)) && !publish_allow.contains(c))
            .collect();
        if !group.is_admin() {
            for other in self.groups.iter().filter(|o| o.name != group.name) {
                for owned in self.prefixed(&other.owns) {
                    let mine = self.prefixed(&group.owns).contains(&owned);
                    if !mine && publish_allow.iter().any(|p| overlaps(p, &owned)) {
                        publish_deny.push(owned);
                    }
                }
            }
        }
        let mut subscribe_allow = self.prefixed(&group.subscribe);
        subscribe_allow.push(format!("{}.>", identity.inbox_prefix()));
        Permissions {
            publish_allow,
            publish_deny: dedup(publish_deny),
            subscribe_allow: dedup(subscribe_allow),
            allow_responses: group.allow_responses,
        }
    }

    fn from_raw(raw: RawPolicy, decl: &Declaration) -> Result<Self> {
        let catalog = Catalog::from_declaration(decl);
        let mut groups = Vec::with_capacity(raw.groups.len());
        for (name, group) in raw.groups {
            groups.push(build_group(name, group, &catalog)?);
        }
        check_members(&groups)?;
        check_ownership(&groups)?;

        let mut identities = Vec::with_capacity(raw.identities.len());
        for raw_id in &raw.identities {
            let id: Identity = raw_id.parse().map_err(|source| AccessError::Identity {
                group: "identities".to_owned(),
                source,
            })?;
            if identities.contains(&id) {
                return Err(AccessError::DuplicateIdentity {
                    identity: id.to_string(),
                });
            }
            if !groups.iter().any(|g| g.covers(&id)) {
                return Err(AccessError::UnknownIdentity {
                    identity: id.to_string(),
                });
            }
            identities.push(id);
        }
        if let Some(group) = groups
            .iter()
            .find(|g| !identities.iter().any(|id| g.covers(id)))
        {
            return Err(AccessError::GroupWithoutIdentity {
                group: group.name.clone(),
            });
        }
        for subject in &raw.never.publish {
            check_pattern("never", "publish", subject)?;
            if has_wildcard(subject) {
                return Err(AccessError::InvalidSubject {
                    group: "never".to_owned(),
                    field: "publish",
                    subject: subject.clone(),
                    reason: "publish examples must be literal subjects",
                });
            }
        }
        for subject in &raw.never.subscribe {
            check_pattern("never", "subscribe", subject)?;
        }

        for (list, stream_prefix) in [
            (&raw.undeclared.streams, ""),
            (&raw.undeclared.key_values, "KV_"),
        ] {
            for name in list {
                if !matches!(
                    Name::parse("undeclared", "undeclared", name)?,
                    Name::Literal(_)
                ) {
                    return Err(AccessError::BadAssetName {
                        group: "undeclared".to_owned(),
                        field: "undeclared",
                        name: name.clone(),
                        expected: "a literal name [A-Za-z0-9_-]+",
                    });
                }
                if catalog.streams.contains(&format!("{stream_prefix}{name}"))
                    || (stream_prefix == "KV_" && catalog.buckets.contains(name))
                {
                    return Err(AccessError::ProbeDeclared { name: name.clone() });
                }
            }
        }

        let policy = Self {
            identities,
            groups,
            never_publish: raw.never.publish,
            never_subscribe: raw.never.subscribe,
            undeclared: Undeclared {
                streams: raw.undeclared.streams,
                key_values: raw.undeclared.key_values,
            },
            catalog,
            prefix: String::new(),
        };
        policy.check_intent()?;
        Ok(policy)
    }

    /// Refuses a policy that grants a `[never]` subject to a non-admin or contradicts the
    /// examples it declares.
    fn check_intent(&self) -> Result<()> {
        for group in &self.groups {
            let Some(identity) = self.identities.iter().find(|id| group.covers(id)) else {
                continue;
            };
            let perms = self.permissions(group, identity);
            if !group.is_admin() {
                for subject in self.undeclared.probes() {
                    if perms.allows_publish(&subject) {
                        return Err(AccessError::UndeclaredReachable {
                            identity: identity.to_string(),
                            group: group.name.clone(),
                            subject,
                        });
                    }
                }
                for subject in &self.never_publish {
                    if perms.allows_publish(subject) {
                        return Err(never_granted(identity, group, subject));
                    }
                }
                for subject in &self.never_subscribe {
                    if perms.allows_subscribe(subject) {
                        return Err(never_granted(identity, group, subject));
                    }
                }
            }
            let contradiction =
                |operation, subject: &String, expected| AccessError::ExampleContradicted {
                    group: group.name.clone(),
                    operation,
                    subject: subject.clone(),
                    expected,
                };
            for subject in self.allowed_publish_examples(group) {
                if !perms.allows_publish(&subject) {
                    return Err(contradiction("publish", &subject, "allowed"));
                }
            }
            for subject in self.allowed_subscribe_examples(group, identity) {
                if !perms.allows_subscribe(&subject) {
                    return Err(contradiction("subscribe", &subject, "allowed"));
                }
            }
            for subject in self.prefixed(&group.examples.refused_publish) {
                if perms.allows_publish(&subject) {
                    return Err(contradiction("publish", &subject, "refused"));
                }
            }
            for subject in self.prefixed(&group.examples.refused_subscribe) {
                if perms.allows_subscribe(&subject) {
                    return Err(contradiction("subscribe", &subject, "refused"));
                }
            }
        }
        Ok(())
    }
}

fn never_granted(identity: &Identity, group: &Group, subject: &str) -> AccessError {
    AccessError::NeverGranted {
        identity: identity.to_string(),
        group: group.name.clone(),
        subject: subject.to_owned(),
    }
}

fn build_group(name: String, raw: RawGroup, catalog: &Catalog) -> Result<Group> {
    if raw.members.is_empty() {
        return Err(AccessError::NoMembers { group: name });
    }
    let mut members = Vec::with_capacity(raw.members.len());
    for member in &raw.members {
        members.push(parse_member(&name, member)?);
    }
    let is_admin = members == [Member::Exact(Identity::admin())];

    for (field, list) in [
        ("publish", &raw.publish),
        ("subscribe", &raw.subscribe),
        ("owns", &raw.owns),
    ] {
        for subject in list {
            check_pattern(&name, field, subject)?;
            if is_admin {
                continue;
            }
            if starts_with_wildcard(subject) {
                return Err(AccessError::WildcardNotAdmin {
                    group: name,
                    field,
                    subject: subject.clone(),
                });
            }
            if is_reserved(field, subject) {
                return Err(AccessError::ReservedSubject {
                    group: name,
                    field,
                    subject: subject.clone(),
                });
            }
        }
    }
    for owned in &raw.owns {
        if !raw.publish.contains(owned) {
            return Err(AccessError::OwnsWithoutPublish {
                group: name,
                subject: owned.clone(),
            });
        }
    }

    let mut grants = Vec::new();
    for entry in &raw.consume {
        let unknown = || AccessError::UnknownAsset {
            group: name.clone(),
            field: "consume",
            name: entry.clone(),
        };
        let Some((stream, consumer)) = entry.split_once('/') else {
            return Err(AccessError::BadAssetName {
                group: name,
                field: "consume",
                name: entry.clone(),
                expected: "STREAM/consumer",
            });
        };
        if !catalog.plain_streams.contains(stream) {
            return Err(unknown());
        }
        let consumer = Name::parse(&name, "consume", consumer)?;
        if let Name::Literal(c) = &consumer
            && !catalog
                .consumers
                .get(stream)
                .is_some_and(|set| set.contains(c))
        {
            return Err(unknown());
        }
        grants.push(Grant::Consume {
            stream: stream.to_owned(),
            consumer,
        });
    }
    for (field, list, known) in [
        ("kv_read", &raw.kv_read, &catalog.buckets),
        ("kv_write", &raw.kv_write, &catalog.buckets),
        ("object_read", &raw.object_read, &catalog.object_stores),
    ] {
        for entry in list {
            let Name::Literal(store) = Name::parse(&name, field, entry)? else {
                return Err(AccessError::StoreGlob {
                    group: name,
                    field,
                    name: entry.clone(),
                });
            };
            if !known.contains(&store) {
                return Err(AccessError::UnknownAsset {
                    group: name,
                    field,
                    name: entry.clone(),
                });
            }
            grants.push(match field {
                "kv_read" => Grant::KvRead(store),
                "kv_write" => Grant::KvWrite(store),
                _ => Grant::ObjectRead(store),
            });
        }
    }

    let examples = raw.examples;
    for (field, list) in [
        ("examples.publish", &examples.publish),
        ("examples.refused_publish", &examples.refused_publish),
    ] {
        for subject in list {
            check_pattern(&name, field, subject)?;
            if has_wildcard(subject) {
                return Err(AccessError::InvalidSubject {
                    group: name,
                    field,
                    subject: subject.clone(),
                    reason: "publish examples must be literal subjects",
                });
            }
        }
    }
    for (field, list) in [
        ("examples.subscribe", &examples.subscribe),
        ("examples.refused_subscribe", &examples.refused_subscribe),
    ] {
        for subject in list {
            check_pattern(&name, field, subject)?;
        }
    }

    Ok(Group {
        name,
        members,
        allow_responses: raw.allow_responses,
        publish: raw.publish,
        subscribe: raw.subscribe,
        owns: raw.owns,
        grants,
        examples,
    })
}

fn parse_member(group: &str, raw: &str) -> Result<Member> {
    match raw.split_once('/') {
        Some((kind, "*")) => {
            if is_identity_token(kind) {
                Ok(Member::AnyOfKind(kind.to_owned()))
            } else {
                Err(AccessError::BadMember {
                    group: group.to_owned(),
                    member: raw.to_owned(),
                })
            }
        }
        Some(_) => raw
            .parse()
            .map(Member::Exact)
            .map_err(|source| AccessError::Identity {
                group: group.to_owned(),
                source,
            }),
        None => Err(AccessError::BadMember {
            group: group.to_owned(),
            member: raw.to_owned(),
        }),
    }
}

fn check_members(groups: &[Group]) -> Result<()> {
    let all: Vec<(&Group, &Member)> = groups
        .iter()
        .flat_map(|g| g.members.iter().map(move |m| (g, m)))
        .collect();
    for (i, (group, member)) in all.iter().enumerate() {
        for (other_group, other_member) in &all[i + 1..] {
            if member.overlaps(other_member) {
                return Err(AccessError::DuplicateMember {
                    group: group.name.clone(),
                    member: member.to_string(),
                    other_group: other_group.name.clone(),
                    other_member: other_member.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn check_ownership(groups: &[Group]) -> Result<()> {
    for group in groups {
        for owned in &group.owns {
            for other in groups.iter().filter(|o| o.name != group.name) {
                if other.owns.contains(owned) {
                    return Err(AccessError::OwnedByOther {
                        group: other.name.clone(),
                        subject: owned.clone(),
                        owner: group.name.clone(),
                    });
                }
                if other.is_admin() {
                    continue;
                }
                // An explicit publish entry inside someone else's owned pattern is a
                // contradiction; a broader one (cc.v1.>) only gets a deny when rendered.
                if let Some(p) = other.publish.iter().find(|p| covers(owned, p)) {
                    return Err(AccessError::OwnedByOther {
                        group: other.name.clone(),
                        subject: p.clone(),
                        owner: group.name.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn is_reserved(field: &str, subject: &str) -> bool {
    if subject.starts_with("$SRV.") || (field == "publish" && JS_READ_ONLY.contains(&subject)) {
        return false;
    }
    subject.starts_with('$') || subject == "_INBOX" || subject.starts_with("_INBOX.")
}

fn check_pattern(group: &str, field: &'static str, subject: &str) -> Result<()> {
    check_subject(subject).map_err(|reason| AccessError::InvalidSubject {
        group: group.to_owned(),
        field,
        subject: subject.to_owned(),
        reason,
    })
}

fn dedup(items: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    items
        .into_iter()
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

/// The subject prefix without a trailing dot (empty for none), or `None` if it is not a
/// literal subject usable as a prefix (wildcards, `$…`, `_INBOX…`).
pub(crate) fn normalize_prefix(prefix: &str) -> Option<String> {
    let prefix = prefix.trim_end_matches('.');
    if prefix.is_empty() {
        return Some(String::new());
    }
    let usable = check_subject(prefix).is_ok()
        && !has_wildcard(prefix)
        && !prefix.starts_with('$')
        && prefix != "_INBOX"
        && !prefix.starts_with("_INBOX.");
    usable.then(|| prefix.to_owned())
}

/// Prepends `prefix` to an application subject; `$…`, `_INBOX…` and subjects that start
/// with a wildcard (the admin's `>`) are left alone.
#[must_use]
pub fn apply_prefix(prefix: &str, subject: &str) -> String {
    if prefix.is_empty()
        || subject.starts_with('$')
        || subject == "_INBOX"
        || subject.starts_with("_INBOX.")
        || starts_with_wildcard(subject)
    {
        subject.to_owned()
    } else {
        format!("{prefix}.{subject}")
    }
}

/// Checks that `subject` is a NATS subject or pattern (the one syntax of
/// [`patchbay_bus::pattern`]). Returns the reason when it is not.
pub(crate) fn check_subject(subject: &str) -> std::result::Result<(), &'static str> {
    pattern::check(subject).map_err(|e| e.reason())
}

fn has_wildcard(subject: &str) -> bool {
    subject.split('.').any(|t| t == "*" || t == ">")
}

fn starts_with_wildcard(subject: &str) -> bool {
    matches!(subject.split('.').next(), Some("*" | ">"))
}

/// Whether `subject` (its tokens taken literally, as nats-server's permission check does)
/// matches `pattern`.
pub(crate) fn matches(pattern: &str, subject: &str) -> bool {
    pattern::matches_literally(pattern, subject)
}

pub(crate) use pattern::{covers, overlaps};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn deploy_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
    }

    fn policy() -> AccessPolicy {
        AccessPolicy::load(&deploy_dir().join("access.toml")).unwrap()
    }

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn decl() -> Declaration {
        Declaration::load(&deploy_dir().join("streams.toml")).unwrap()
    }

    const MINI: &str = r#"
assets = "streams.toml"
identities = ["cli/admin", "service/routing", "runtime/node-1"]

[never]
publish = ["$JS.API.STREAM.DELETE.CC_CALLS"]
subscribe = ["_INBOX.>"]

[groups.admin]
members = ["cli/admin"]
publish = [">"]
subscribe = [">"]

[groups.routing]
members = ["service/routing"]
allow_responses = true
publish = ["cc.v1.calls.*.routed"]
owns = ["cc.v1.calls.*.routed"]
consume = ["CC_CALLS/routing"]

[groups.runtime]
members = ["runtime/*"]
publish = ["cc.v1.>"]
consume = ["CC_CALLS/*"]
kv_write = ["patchbay-fn-state"]
"#;

    fn mini() -> AccessPolicy {
        AccessPolicy::from_toml_str(MINI, &decl()).unwrap()
    }

    fn mini_with(find: &str, replace: &str) -> Result<AccessPolicy> {
        assert!(MINI.contains(find), "{find:?} not in MINI");
        AccessPolicy::from_toml_str(&MINI.replacen(find, replace, 1), &decl())
    }

    #[test]
    fn subjects_are_checked_and_matched_by_the_bus_pattern_algebra() {
        // The algebra itself is tested in patchbay-bus; here: the policy uses it.
        assert!(
            matches("a.*", "a.>"),
            "the server's literal matching for examples"
        );
        assert!(!covers("a.*", "a.>") && overlaps("a.*", "a.>"));
        assert_eq!(check_subject("a..b"), Err("has an empty token"));
        assert_eq!(
            check_subject("a.>.b"),
            Err("`>` may only be the last token")
        );
        assert_eq!(check_subject("a.b*"), Err("wildcards must be whole tokens"));
        assert!(
            check_subject("a\u{0}b").is_err(),
            "control characters are refused"
        );
    }

    #[test]
    fn deploy_policy_loads_and_covers_every_required_identity() {
        let policy = policy();
        for required in [
            "cli/admin",
            "service/routing",
            "service/agents",
            "runtime/node-1",
            "gateway/gateway",
        ] {
            let identity = id(required);
            assert!(policy.identities().contains(&identity), "{required}");
            assert!(policy.permissions_for(&identity).is_some(), "{required}");
        }
        // Any runtime node is covered by the runtime group, not only the listed example.
        assert_eq!(policy.group_of(&id("runtime/node-7")), Some("runtime"));
        assert!(policy.permissions_for(&id("runtime2/x")).is_none());
    }

    #[test]
    fn only_admin_gets_the_full_wildcard() {
        let policy = policy();
        for identity in policy.identities() {
            let perms = policy.permissions_for(identity).unwrap();
            let has_all = perms.publish_allow.iter().any(|p| p == ">");
            assert_eq!(has_all, *identity == Identity::admin(), "{identity}");
        }
        let err = mini_with(r#"publish = ["cc.v1.>"]"#, r#"publish = [">"]"#).unwrap_err();
        assert!(matches!(err, AccessError::WildcardNotAdmin { .. }), "{err}");
        let err = mini_with(r#"publish = ["cc.v1.>"]"#, r#"publish = ["*.v1.>"]"#).unwrap_err();
        assert!(matches!(err, AccessError::WildcardNotAdmin { .. }), "{err}");
    }

    #[test]
    fn each_identity_subscribes_only_its_own_inbox() {
        let policy = policy();
        let node = id("runtime/node-1");
        let perms = policy.permissions_for(&node).unwrap();
        assert!(perms.allows_subscribe("_INBOX.runtime.node-1.abc.*"));
        assert!(!perms.allows_subscribe("_INBOX.gateway.gateway.abc.*"));
        assert!(!perms.allows_subscribe("_INBOX.runtime.node-2.abc.*"));
        assert!(!perms.allows_subscribe("_INBOX.>"));
        let other = policy.permissions_for(&id("runtime/node-2")).unwrap();
        assert!(other.allows_subscribe("_INBOX.runtime.node-2.abc.*"));
    }

    #[test]
    fn no_workload_may_administer_jetstream() {
        let policy = policy();
        for identity in policy.identities() {
            if *identity == Identity::admin() {
                continue;
            }
            let perms = policy.permissions_for(identity).unwrap();
            for subject in [
                "$JS.API.STREAM.CREATE.CC_CALLS",
                "$JS.API.STREAM.UPDATE.CC_CALLS",
                "$JS.API.STREAM.DELETE.CC_CALLS",
                "$JS.API.STREAM.PURGE.CC_CALLS",
                "$JS.API.STREAM.CREATE.KV_patchbay-fn-new",
                "$JS.API.STREAM.DELETE.KV_patchbay-functions",
                "$JS.API.STREAM.DELETE.OBJ_patchbay-artifacts",
                "$JS.API.CONSUMER.DELETE.CC_CALLS.routing",
                "$JS.API.CONSUMER.CREATE.CC_CALLS.rogue",
                "$JS.API.CONSUMER.CREATE.CC_CALLS.rogue.cc.v1.calls.>",
                "$JS.API.CONSUMER.DURABLE.CREATE.CC_CALLS.rogue",
                "$KV.patchbay-functions.rogue",
                "$KV.patchbay-tokens.rogue",
                "$O.patchbay-artifacts.C.rogue",
            ] {
                assert!(
                    !perms.allows_publish(subject),
                    "{identity} may publish {subject}"
                );
            }
        }
    }

    #[test]
    fn runtime_publishes_function_outputs_but_not_owned_subjects() {
        let policy = policy();
        let perms = policy.permissions_for(&id("runtime/node-1")).unwrap();
        assert!(perms.allows_publish("cc.v1.calls.c1.analyzed"));
        assert!(perms.allows_publish("patchbay.v1.fn.hello.logs"));
        assert!(perms.allows_publish("patchbay.v1.dlq.hello"));
        for forged in [
            "cc.v1.calls.c1.routed",
            "cc.v1.calls.c1.assigned",
            "cc.v1.calls.c1.incoming",
            "cc.v1.agents.a1.cmd.accept",
            "cc.v1.agents.a1.evt.state-changed",
        ] {
            assert!(!perms.allows_publish(forged), "runtime may forge {forged}");
        }
        assert!(perms.allows_subscribe("patchbay.v1.fn.*.invoke"));
        assert!(perms.allows_subscribe("cc.v1.>"));
    }

    #[test]
    fn glob_grants_exclude_declared_assets_of_others() {
        let policy = policy();
        let perms = policy.permissions_for(&id("runtime/node-1")).unwrap();
        // Function trigger consumers, created at run time on declared streams.
        assert!(perms.allows_publish("$JS.API.CONSUMER.MSG.NEXT.CC_CALLS.fn-hello"));
        assert!(perms.allows_publish("$JS.ACK.CC_CALLS.fn-hello.1.5.5.1.0"));
        // Declared assets that belong to others.
        assert!(!perms.allows_publish("$JS.API.CONSUMER.MSG.NEXT.CC_CALLS.routing"));
        assert!(!perms.allows_publish("$JS.ACK.CC_CALLS.routing.1.5.5.1.0"));
        assert!(!perms.allows_publish("$KV.cc-agents.a1"));
        assert!(!perms.allows_publish("$JS.API.DIRECT.GET.KV_patchbay-tokens"));
        assert!(!perms.allows_publish("$JS.API.STREAM.INFO.KV_patchbay-tokens"));
        // Declared assets granted by name.
        assert!(perms.allows_publish(
            "$JS.API.DIRECT.GET.KV_patchbay-functions.$KV.patchbay-functions.hello"
        ));
        assert!(perms.allows_publish("$JS.API.CONSUMER.CREATE.OBJ_patchbay-artifacts"));
        assert!(!perms.allows_publish("$KV.patchbay-functions.hello"));
    }

    #[test]
    fn function_state_is_one_declared_bucket_granted_by_name_to_runtime_nodes_only() {
        let policy = policy();
        let node = policy.permissions_for(&id("runtime/node-1")).unwrap();
        let bucket = patchbay_registry::FUNCTION_STATE_BUCKET;
        // What the host does with it through async-nats: open, get, put, delete, list keys.
        for allowed in [
            format!("$JS.API.STREAM.INFO.KV_{bucket}"),
            format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.hello.k"),
            format!("$JS.API.CONSUMER.CREATE.KV_{bucket}"),
            format!("$JS.API.CONSUMER.CREATE.KV_{bucket}.c_1.$KV.{bucket}.hello.>"),
            format!("$JS.API.CONSUMER.INFO.KV_{bucket}.c"),
            format!("$KV.{bucket}.hello.k"),
        ] {
            assert!(node.allows_publish(&allowed), "{allowed}");
        }
        // Nothing of the old per-function buckets, nor purging everyone's state.
        for refused in [
            "$KV.patchbay-fn-hello.k".to_owned(),
            "$JS.API.STREAM.INFO.KV_patchbay-fn-hello".to_owned(),
            format!("$JS.API.STREAM.PURGE.KV_{bucket}"),
        ] {
            assert!(!node.allows_publish(&refused), "{refused}");
        }
        // HTTP functions have no kv import: the gateway holds no function state.
        let gateway = policy.permissions_for(&id("gateway/gateway")).unwrap();
        assert!(!gateway.allows_publish(&format!("$KV.{bucket}.hello.k")));
        assert!(!gateway.allows_publish(&format!("$JS.API.STREAM.INFO.KV_{bucket}")));
    }

    #[test]
    fn undeclared_assets_are_refused_to_every_workload_whatever_the_probe() {
        let policy = policy();
        let probes = policy.undeclared().probes();
        // The probes cover what a glob over stream names used to reach: stream info, an
        // unnamed (ephemeral) consumer, by-subject direct gets and KV writes.
        for probe in [
            "$JS.API.STREAM.INFO.UNDECLARED",
            "$JS.API.CONSUMER.CREATE.UNDECLARED",
            "$JS.API.CONSUMER.INFO.UNDECLARED.deny-matrix",
            "$JS.API.STREAM.MSG.GET.UNDECLARED",
            "$JS.API.STREAM.INFO.KV_undeclared",
            "$JS.API.CONSUMER.CREATE.KV_undeclared",
            "$JS.API.CONSUMER.CREATE.KV_undeclared.deny-matrix.$KV.undeclared.deny-matrix",
            "$JS.API.DIRECT.GET.KV_undeclared.$KV.undeclared.deny-matrix",
            "$KV.undeclared.deny-matrix",
        ] {
            assert!(probes.contains(&probe.to_owned()), "{probe} is not probed");
        }
        for who in policy
            .identities()
            .iter()
            .filter(|i| **i != Identity::admin())
        {
            let perms = policy.permissions_for(who).unwrap();
            let e = policy.expectations(who).unwrap();
            for probe in &probes {
                assert!(!perms.allows_publish(probe), "{who} reaches {probe}");
                assert!(e.publish_refused.contains(probe), "{who}: {probe}");
            }
        }
    }

    #[test]
    fn refuses_a_glob_over_buckets_or_object_stores() {
        for (find, replace) in [
            (
                r#"kv_write = ["patchbay-fn-state"]"#,
                r#"kv_write = ["patchbay-fn-*"]"#,
            ),
            (r#"kv_write = ["patchbay-fn-state"]"#, r#"kv_read = ["*"]"#),
            (
                r#"kv_write = ["patchbay-fn-state"]"#,
                r#"object_read = ["patchbay-*"]"#,
            ),
        ] {
            let err = mini_with(find, replace).unwrap_err();
            assert!(
                matches!(err, AccessError::StoreGlob { .. }),
                "{replace}: {err}"
            );
            assert!(err.to_string().contains("by name only"), "{err}");
        }
        // Consumer globs stay: they name their (declared) stream.
        assert!(mini().host_rules("runtime").is_some());
    }

    #[test]
    fn the_gateways_reading_of_the_stored_rules_refuses_exactly_what_its_nats_permissions_refuse() {
        use patchbay_gateway::bus_routes::{ACCESS_BUCKET, BusGrants, RULES_KEY};
        assert_eq!(ACCESS_BUCKET, crate::admission::ACCESS_BUCKET);
        assert_eq!(RULES_KEY, crate::admission::RULES_KEY);
        let policy = policy();
        let stored = crate::admission::StoredRules::from_policy(&policy);
        let document = serde_json::to_vec(&stored).unwrap();
        let grants = BusGrants::from_document(&document).unwrap().unwrap();
        let perms = policy.permissions_for(&id("gateway/gateway")).unwrap();
        // Every application subject the deny matrix publishes, for any identity, plus a few
        // outside every grant.
        let mut subjects: BTreeSet<String> = [
            "elsewhere.v1.x",
            "patchbay.v1.runtime.status",
            "patchbay.v1.fn.x.tick",
            "cc.v1.tests.anything",
            "cc.v1.calls.c1.routed",
            "cc.v1.calls.c1.incoming",
        ]
        .map(str::to_owned)
        .into();
        for identity in policy.identities() {
            let e = policy.expectations(identity).unwrap();
            subjects.extend(e.publish_allowed.into_iter().chain(e.publish_refused));
        }
        let application = subjects
            .iter()
            .filter(|s| !s.starts_with('$') && !s.starts_with("_INBOX"));
        let mut checked = 0;
        for subject in application {
            assert_eq!(
                grants.check(subject).is_ok(),
                perms.allows_publish(subject),
                "{subject}: {:?}",
                grants.check(subject)
            );
            checked += 1;
        }
        assert!(checked > 20, "only {checked} subjects compared");
        // A document without gateway rules gives none.
        let runtime_only = serde_json::json!({ "hosts": { "runtime": stored.hosts["runtime"] } });
        let none = BusGrants::from_document(&serde_json::to_vec(&runtime_only).unwrap()).unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn refuses_an_undeclared_probe_that_is_declared() {
        let with = |section: &str| {
            AccessPolicy::from_toml_str(
                &MINI.replacen("[never]", &format!("{section}\n[never]"), 1),
                &decl(),
            )
        };
        let err = with("[undeclared]\nstreams = [\"CC_CALLS\"]").unwrap_err();
        assert!(matches!(err, AccessError::ProbeDeclared { .. }), "{err}");
        let err = with("[undeclared]\nkey_values = [\"patchbay-tokens\"]").unwrap_err();
        assert!(matches!(err, AccessError::ProbeDeclared { .. }), "{err}");
        let err = with("[undeclared]\nstreams = [\"X*\"]").unwrap_err();
        assert!(matches!(err, AccessError::BadAssetName { .. }), "{err}");
        assert!(with("[undeclared]\nstreams = [\"ELSEWHERE\"]").is_ok());
    }

    #[test]
    fn host_rules_hold_application_subjects_and_other_groups_owned_ones() {
        let policy = policy();
        let runtime = policy.host_rules("runtime").unwrap();
        assert_eq!(runtime.group, "runtime");
        assert!(runtime.subscribe.contains(&"cc.v1.>".to_owned()));
        assert!(runtime.subscribe.iter().all(|s| !s.starts_with('$')));
        assert!(runtime.publish.iter().all(|s| !s.starts_with('$')));
        assert!(runtime.consume.contains(&"CC_CALLS/fn-*".to_owned()));
        assert!(
            runtime
                .owned
                .iter()
                .any(|o| o.group == "routing" && o.subject == "cc.v1.calls.*.routed")
        );
        let gateway = policy.host_rules("gateway").unwrap();
        assert!(gateway.owned.iter().all(|o| o.group != "gateway"));
        assert!(policy.host_rules("nobody").is_none());
    }

    #[test]
    fn expectations_refuse_other_identities_subjects() {
        let policy = policy();
        let node = policy.expectations(&id("runtime/node-1")).unwrap();
        assert!(
            node.subscribe_refused
                .contains(&"_INBOX.gateway.gateway.deny-matrix.*".to_owned())
        );
        assert!(
            node.subscribe_allowed
                .contains(&"_INBOX.runtime.node-1.deny-matrix.*".to_owned())
        );
        assert!(
            node.publish_refused
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.CC_CALLS.routing".to_owned())
        );
        assert!(
            node.publish_refused
                .contains(&"$JS.API.STREAM.DELETE.CC_CALLS".to_owned())
        );
        assert!(
            node.publish_allowed
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.CC_CALLS.fn-deny-matrix".to_owned())
        );
        let perms = policy.permissions_for(&id("runtime/node-1")).unwrap();
        for subject in &node.publish_allowed {
            assert!(perms.allows_publish(subject), "{subject}");
        }
        for subject in &node.publish_refused {
            assert!(!perms.allows_publish(subject), "{subject}");
        }

        let admin = policy.expectations(&Identity::admin()).unwrap();
        assert!(admin.publish_refused.is_empty() && admin.subscribe_refused.is_empty());
        assert!(
            admin
                .publish_allowed
                .contains(&"cc.v1.calls.deny-matrix.routed".to_owned())
        );
        // Destructive administration subjects are not published by the matrix, even as admin.
        assert!(!admin.publish_allowed.iter().any(|s| s.contains(".DELETE.")));
    }

    #[test]
    fn every_identity_has_allowed_and_refused_expectations() {
        let policy = policy();
        for identity in policy.identities() {
            let e = policy.expectations(identity).unwrap();
            assert!(!e.publish_allowed.is_empty(), "{identity}");
            assert!(!e.subscribe_allowed.is_empty(), "{identity}");
            if *identity != Identity::admin() {
                assert!(!e.publish_refused.is_empty(), "{identity}");
                assert!(!e.subscribe_refused.is_empty(), "{identity}");
            }
        }
    }

    #[test]
    fn prefix_applies_to_application_subjects_only() {
        let policy = mini().with_subject_prefix("tenant-a").unwrap();
        let perms = policy.permissions_for(&id("runtime/node-1")).unwrap();
        assert!(perms.publish_allow.contains(&"tenant-a.cc.v1.>".to_owned()));
        assert!(
            perms
                .publish_deny
                .contains(&"tenant-a.cc.v1.calls.*.routed".to_owned())
        );
        assert!(
            perms
                .subscribe_allow
                .contains(&"_INBOX.runtime.node-1.>".to_owned())
        );
        assert!(perms.publish_allow.iter().any(|p| p.starts_with("$KV.")));
        let admin = policy.permissions_for(&Identity::admin()).unwrap();
        assert_eq!(admin.publish_allow, vec![">"]);
        let routing = policy.expectations(&id("service/routing")).unwrap();
        assert!(
            routing
                .publish_allowed
                .iter()
                .all(|s| !s.starts_with("cc."))
        );
        assert!(matches!(
            mini().with_subject_prefix("a.*"),
            Err(AccessError::BadPrefix { .. })
        ));
        assert!(matches!(
            mini().with_subject_prefix("$JS"),
            Err(AccessError::BadPrefix { .. })
        ));
    }

    #[test]
    fn refuses_unknown_group_members_and_assets() {
        let err =
            mini_with(r#""runtime/node-1"]"#, r#""runtime/node-1", "ghost/one"]"#).unwrap_err();
        assert!(matches!(err, AccessError::UnknownIdentity { .. }), "{err}");
        let err = mini_with(
            r#"consume = ["CC_CALLS/routing"]"#,
            r#"consume = ["CC_CALLS/nobody"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::UnknownAsset { .. }), "{err}");
        let err = mini_with(
            r#"consume = ["CC_CALLS/routing"]"#,
            r#"consume = ["NOPE/routing"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::UnknownAsset { .. }), "{err}");
        let err = mini_with(
            r#"kv_write = ["patchbay-fn-state"]"#,
            r#"kv_write = ["no-such-bucket"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::UnknownAsset { .. }), "{err}");
        let err = mini_with(
            r#"kv_write = ["patchbay-fn-state"]"#,
            r#"kv_write = ["a.b"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::BadAssetName { .. }), "{err}");
        let err = mini_with("[groups.runtime]", "[groups.runtime]\nbogus = 1").unwrap_err();
        assert!(matches!(err, AccessError::Toml { .. }), "{err}");
    }

    #[test]
    fn refuses_invalid_subjects_and_reserved_ones() {
        let err = mini_with(r#"publish = ["cc.v1.>"]"#, r#"publish = ["cc..v1"]"#).unwrap_err();
        assert!(matches!(err, AccessError::InvalidSubject { .. }), "{err}");
        let err = mini_with(
            r#"publish = ["cc.v1.>"]"#,
            r#"publish = ["cc.v1.>", "$JS.API.>"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::ReservedSubject { .. }), "{err}");
        let err = mini_with(
            r#"publish = ["cc.v1.>"]"#,
            r#"publish = ["cc.v1.>", "$KV.x.>"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::ReservedSubject { .. }), "{err}");
        let err = mini_with(
            r#"publish = ["cc.v1.>"]"#,
            r#"publish = ["cc.v1.>"]
subscribe = ["_INBOX.>"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::ReservedSubject { .. }), "{err}");
    }

    #[test]
    fn refuses_duplicated_and_overlapping_members() {
        let err = mini_with(
            r#"members = ["service/routing"]"#,
            r#"members = ["runtime/node-9"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::DuplicateMember { .. }), "{err}");
        let err = mini_with(
            r#"members = ["service/routing"]"#,
            r#"members = ["service/routing", "service/routing"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::DuplicateMember { .. }), "{err}");
        let err = mini_with(
            r#"members = ["service/routing"]"#,
            r#"members = ["service/*x"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::Identity { .. }), "{err}");
        let err = mini_with(
            r#"members = ["service/routing"]"#,
            r#"members = ["routing"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::BadMember { .. }), "{err}");
    }

    #[test]
    fn refuses_publishing_someone_elses_owned_subject_explicitly() {
        let err = mini_with(
            r#"publish = ["cc.v1.>"]"#,
            r#"publish = ["cc.v1.calls.*.routed"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::OwnedByOther { .. }), "{err}");
        let err = mini_with(
            r#"owns = ["cc.v1.calls.*.routed"]"#,
            r#"owns = ["cc.v1.calls.*.closed"]"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, AccessError::OwnsWithoutPublish { .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_policy_that_grants_a_never_subject() {
        let err = mini_with(
            r#"publish = ["$JS.API.STREAM.DELETE.CC_CALLS"]"#,
            r#"publish = ["$JS.API.STREAM.DELETE.CC_CALLS", "$JS.API.CONSUMER.INFO.CC_CALLS.routing"]"#,
        )
        .unwrap_err();
        assert!(matches!(err, AccessError::NeverGranted { .. }), "{err}");
    }

    #[test]
    fn refuses_examples_the_policy_contradicts() {
        let err = mini_with(
            r#"kv_write = ["patchbay-fn-state"]"#,
            r#"kv_write = ["patchbay-fn-state"]
examples.publish = ["cc.v1.calls.x.routed"]"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, AccessError::ExampleContradicted { .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_group_without_example_identity() {
        let err = mini_with(r#", "runtime/node-1"]"#, "]").unwrap_err();
        assert!(
            matches!(err, AccessError::GroupWithoutIdentity { .. }),
            "{err}"
        );
    }
}
