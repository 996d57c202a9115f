//! The resilience policy: what `deploy/resilience.toml` declares per target, how it is
//! validated, and how each target is stored as one key of the `patchbay-resilience` KV
//! bucket.
//!
//! A file looks like this (every field of a target is optional; missing ones take the
//! defaults of [`TargetPolicy::default`]):
//!
//! ```toml
//! [targets."subject:cc.v1.customers.lookup"]
//! timeout = "250ms"
//! retry = { max_attempts = 2, backoff_base = "20ms", retry_on = ["timeout", "no-responders"] }
//! budget = { ratio = 0.2, min_per_sec = 5.0 }
//! breaker = { consecutive_failures = 5, failure_rate = 0.5, window = "10s", cool_down = "5s" }
//! ```
//!
//! Durations are humantime strings (`250ms`, `5s`, `1m`). `timeout` bounds one attempt;
//! the whole call is bounded by the caller's deadline (`patchbay-deadline`), which no
//! retry ever outlives.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// The KV bucket holding one key per target (created by the admin bootstrap).
pub const RESILIENCE_BUCKET: &str = "patchbay-resilience";

/// Why a policy was refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PolicyError {
    /// The text is not valid TOML or has the wrong shape (the message names the field and
    /// line).
    #[error("invalid resilience policy: {reason}")]
    Parse {
        /// The parser's message.
        reason: String,
    },
    /// A target name is not `subject:<subject>`, `function:<name>` or `route:<path>`.
    #[error("invalid target {target:?}: {reason}")]
    Target {
        /// The target as written.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A field of a target has a value outside its range.
    #[error("target {target:?}: {field} {reason}")]
    Invalid {
        /// The target as written.
        target: String,
        /// The field, as written in the file (`breaker.failure_rate`).
        field: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

/// What a policy applies to: requests to a subject, invocations of a function, or a
/// gateway route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Requests on a subject; `*` and `>` wildcards match like NATS subjects.
    Subject(String),
    /// Invocations of a function (by name).
    Function(String),
    /// A gateway route (path).
    Route(String),
}

impl Target {
    /// The KV key of this target: `<kind>.<escaped value>`. KV keys allow only
    /// `[-/_=.A-Za-z0-9]`, so every other byte (and `.` outside subjects) is written as
    /// `=XX` (hex), which keeps ordinary names readable in `nats kv ls`.
    #[must_use]
    pub fn key(&self) -> String {
        let (kind, value, keep_dots) = match self {
            Self::Subject(s) => ("subject", s, true),
            Self::Function(f) => ("function", f, false),
            Self::Route(r) => ("route", r, false),
        };
        let mut key = format!("{kind}.");
        for b in value.bytes() {
            if b.is_ascii_alphanumeric()
                || b == b'-'
                || b == b'_'
                || b == b'/'
                || (keep_dots && b == b'.')
            {
                key.push(char::from(b));
            } else {
                key.push_str(&format!("={b:02X}"));
            }
        }
        key
    }

    /// Whether this target covers `other`: equal, or a subject pattern matching a subject.
    #[must_use]
    pub fn matches(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Subject(pattern), Self::Subject(subject)) => {
                crate::subject::matches(pattern, subject)
            }
            _ => self == other,
        }
    }

    /// Whether the target names a subject pattern with wildcards.
    #[must_use]
    pub fn is_pattern(&self) -> bool {
        matches!(self, Self::Subject(s) if s.split('.').any(|t| t == "*" || t == ">"))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Subject(s) => write!(f, "subject:{s}"),
            Self::Function(n) => write!(f, "function:{n}"),
            Self::Route(r) => write!(f, "route:{r}"),
        }
    }
}

impl FromStr for Target {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason| PolicyError::Target {
            target: text.to_owned(),
            reason,
        };
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| bad("expected subject:<subject>, function:<name> or route:<path>"))?;
        match kind {
            "subject" => {
                let tokens: Vec<&str> = value.split('.').collect();
                let token_ok = |t: &&str| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
                };
                for (i, t) in tokens.iter().enumerate() {
                    let wildcard = *t == "*" || (*t == ">" && i + 1 == tokens.len());
                    if !wildcard && !token_ok(t) {
                        return Err(bad(
                            "a subject needs non-empty tokens without spaces; `*` and a final `>` are the only wildcards",
                        ));
                    }
                }
                Ok(Self::Subject(value.to_owned()))
            }
            "function" => {
                if value.is_empty()
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(bad("a function name is lowercase letters, digits and `-`"));
                }
                Ok(Self::Function(value.to_owned()))
            }
            "route" => {
                if !value.starts_with('/') || value.bytes().any(|b| b.is_ascii_whitespace()) {
                    return Err(bad("a route is a path starting with `/`, without spaces"));
                }
                Ok(Self::Route(value.to_owned()))
            }
            _ => Err(bad("the kind must be subject, function or route")),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which failures of an attempt may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// No reply within the attempt's timeout.
    Timeout,
    /// Nobody listens on the subject (NATS 503).
    NoResponders,
    /// The target answered with an error (a failure reply, a 5xx).
    Error,
}

/// Retries of one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retries).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles per retry.
    #[serde(with = "duration")]
    pub backoff_base: Duration,
    /// Ceiling of the backoff.
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    /// Share of the backoff that is random, 0.0–1.0 (1.0 = "full jitter").
    pub jitter: f64,
    /// Failures worth another attempt.
    pub retry_on: Vec<FailureKind>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            jitter: 1.0,
            retry_on: vec![FailureKind::Timeout, FailureKind::NoResponders],
        }
    }
}

/// How much extra load retries may add (Finagle/Linkerd retry budget).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per request, e.g. 0.2 = at most 20 % extra load.
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic, so a quiet target can still retry.
    pub min_per_sec: f64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_sec: 10.0,
        }
    }
}

/// When calls stop going to a failing target, and how it is probed back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Open after this many failures in a row (0 = this trigger is off).
    pub consecutive_failures: u32,
    /// Open when this share of calls over `window` failed (0.0 = this trigger is off).
    pub failure_rate: f64,
    /// The sliding window of the failure rate.
    #[serde(with = "duration")]
    pub window: Duration,
    /// Calls in the window before the failure rate counts.
    pub min_requests: u32,
    /// How long the breaker stays open before probing.
    #[serde(with = "duration")]
    pub cool_down: Duration,
    /// Probes let through when half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
            cool_down: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// Everything that applies to calls to one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetPolicy {
    /// Timeout of one attempt (cut to the caller's deadline).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// Retry budget.
    pub budget: RetryBudget,
    /// Circuit breaker.
    pub breaker: BreakerPolicy,
    /// Calls in flight at once from one process (none = unlimited).
    pub concurrency: Option<u32>,
    /// When `concurrency` is reached: refuse at once (true) or wait for a slot (false).
    pub shed_when_full: bool,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            budget: RetryBudget::default(),
            breaker: BreakerPolicy::default(),
            concurrency: None,
            shed_when_full: false,
        }
    }
}

impl TargetPolicy {
    /// Check every field's range; the error names `target` and the field.
    pub fn validate(&self, target: &Target) -> Result<(), PolicyError> {
        let fail = |field, reason: &str| {
            Err(PolicyError::Invalid {
                target: target.to_string(),
                field,
                reason: reason.to_owned(),
            })
        };
        let fraction = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if self.timeout.is_zero() {
            return fail("timeout", "must be more than 0");
        }
        let r = &self.retry;
        if !(1..=10).contains(&r.max_attempts) {
            return fail("retry.max_attempts", "must be between 1 and 10");
        }
        if r.max_attempts > 1 && r.backoff_base.is_zero() {
            return fail("retry.backoff_base", "must be more than 0 when retrying");
        }
        if r.backoff_max < r.backoff_base {
            return fail("retry.backoff_max", "must be at least retry.backoff_base");
        }
        if !fraction(r.jitter) {
            return fail("retry.jitter", "must be between 0.0 and 1.0");
        }
        if r.max_attempts > 1 && r.retry_on.is_empty() {
            return fail(
                "retry.retry_on",
                "must name at least one of timeout, no-responders, error when max_attempts > 1",
            );
        }
        if !fraction(self.budget.ratio) {
            return fail("budget.ratio", "must be between 0.0 and 1.0");
        }
        if !(self.budget.min_per_sec.is_finite() && self.budget.min_per_sec >= 0.0) {
            return fail("budget.min_per_sec", "must be 0 or more");
        }
        let b = &self.breaker;
        if !fraction(b.failure_rate) {
            return fail("breaker.failure_rate", "must be between 0.0 and 1.0");
        }
        if b.failure_rate > 0.0 && b.window.is_zero() {
            return fail(
                "breaker.window",
                "must be more than 0 when failure_rate is set",
            );
        }
        if b.failure_rate > 0.0 && b.min_requests == 0 {
            return fail(
                "breaker.min_requests",
                "must be at least 1 when failure_rate is set",
            );
        }
        if b.cool_down.is_zero() {
            return fail("breaker.cool_down", "must be more than 0");
        }
        if b.half_open_probes == 0 {
            return fail("breaker.half_open_probes", "must be at least 1");
        }
        if self.concurrency == Some(0) {
            return fail(
                "concurrency",
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if self.shed_when_full && self.concurrency.is_none() {
            return fail("shed_when_full", "needs a concurrency limit");
        }
        Ok(())
    }
}

/// `deploy/resilience.toml`: a policy per target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResiliencePolicy {
    /// Policies by target (`subject:…`, `function:…`, `route:…`).
    #[serde(default)]
    pub targets: BTreeMap<Target, TargetPolicy>,
}

impl ResiliencePolicy {
    /// Parse and validate a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let policy: Self = toml::from_str(text).map_err(|e| PolicyError::Parse {
            reason: e.to_string(),
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Validate every target.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.targets
            .iter()
            .try_for_each(|(target, policy)| policy.validate(target))
    }
}

/// One target as stored in the KV bucket (JSON): the value names its target so readers
/// need not decode the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTarget {
    /// The target.
    pub target: Target,
    /// Its policy.
    pub policy: TargetPolicy,
    /// Who wrote it: the policy file (`patchbay resilience apply`, which also removes file
    /// targets the file no longer names) or `patchbay fn deploy --resilience` (kept by
    /// `apply` unless the file names the same target, which then takes it over).
    #[serde(default, skip_serializing_if = "PolicyOrigin::is_file")]
    pub origin: PolicyOrigin,
}

/// Who owns a stored policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyOrigin {
    /// `deploy/resilience.toml` through `patchbay resilience apply`.
    #[default]
    File,
    /// A function's deploy flags (`patchbay fn deploy --resilience …`).
    Deploy,
}

impl PolicyOrigin {
    fn is_file(&self) -> bool {
        *self == Self::File
    }
}

impl TargetPolicy {
    /// A policy written inline, as `patchbay fn deploy --resilience` takes it: the fields
    /// of one `[targets."…"]` table on one line, e.g.
    /// `timeout = "2s", retry = { max_attempts = 3 }, concurrency = 16`.
    pub fn from_inline(target: &Target, fields: &str) -> Result<Self, PolicyError> {
        let policy: ResiliencePolicy = ResiliencePolicy::from_toml(&format!(
            "[targets]\n{:?} = {{ {fields} }}\n",
            target.to_string()
        ))?;
        policy
            .targets
            .into_values()
            .next()
            .ok_or_else(|| PolicyError::Parse {
                reason: "no policy given".into(),
            })
    }
}

/// Humantime strings for durations ("250ms"), in TOML and in the stored JSON.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}), e.g. 250ms or 5s"
            ))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn target(text: &str) -> Target {
        text.parse().unwrap()
    }

    #[test]
    fn targets_parse_print_and_become_valid_kv_keys() {
        for (text, key) in [
            (
                "subject:cc.v1.customers.lookup",
                "subject.cc.v1.customers.lookup",
            ),
            (
                "subject:cc.v1.agents.*.cmd.>",
                "subject.cc.v1.agents.=2A.cmd.=3E",
            ),
            ("function:customer-lookup", "function.customer-lookup"),
            ("route:/crm/customers/{id}", "route./crm/customers/=7Bid=7D"),
            ("route:/v1.2/x", "route./v1=2E2/x"),
        ] {
            let t = target(text);
            assert_eq!(t.to_string(), text);
            assert_eq!(t.key(), key);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
                "{key}"
            );
        }
        for bad in [
            "customer-lookup",
            "queue:x",
            "subject:a..b",
            "subject:a.>.b",
            "subject:a b",
            "function:Upper",
            "route:crm",
        ] {
            assert!(
                matches!(bad.parse::<Target>(), Err(PolicyError::Target { target, .. }) if target == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn subject_patterns_match_like_nats() {
        let p = target("subject:cc.v1.agents.*.cmd.>");
        assert!(p.is_pattern());
        assert!(p.matches(&target("subject:cc.v1.agents.a1.cmd.state")));
        assert!(!p.matches(&target("subject:cc.v1.agents.a1.evt.missed")));
        assert!(!p.matches(&target("subject:cc.v1.agents.a1.cmd")));
        assert!(!target("subject:a.b").matches(&target("subject:a.b.c")));
        assert!(!target("function:a").matches(&target("subject:a")));
    }

    #[test]
    fn missing_fields_take_defaults_and_durations_read_as_humantime() {
        let policy = ResiliencePolicy::from_toml(
            r#"
            [targets."subject:cc.v1.customers.lookup"]
            timeout = "250ms"
            retry = { max_attempts = 2 }
            breaker = { cool_down = "5s" }
            "#,
        )
        .unwrap();
        let p = &policy.targets[&target("subject:cc.v1.customers.lookup")];
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(p.retry.max_attempts, 2);
        assert_eq!(p.retry.backoff_base, RetryPolicy::default().backoff_base);
        assert_eq!(p.breaker.window, Duration::from_secs(10));
        // Stored JSON round-trips.
        let stored = StoredTarget {
            target: target("subject:cc.v1.customers.lookup"),
            policy: p.clone(),
            origin: PolicyOrigin::File,
        };
        let json = serde_json::to_string(&stored).unwrap();
        assert!(json.contains("\"timeout\":\"250ms\""), "{json}");
        assert_eq!(serde_json::from_str::<StoredTarget>(&json).unwrap(), stored);
    }

    #[test]
    fn validation_errors_name_the_target_and_the_field() {
        let cases = [
            ("timeout = \"0s\"", "timeout"),
            ("retry = { max_attempts = 0 }", "retry.max_attempts"),
            (
                "retry = { max_attempts = 3, backoff_base = \"1s\", backoff_max = \"10ms\" }",
                "retry.backoff_max",
            ),
            ("retry = { jitter = 1.5 }", "retry.jitter"),
            (
                "retry = { max_attempts = 2, retry_on = [] }",
                "retry.retry_on",
            ),
            ("budget = { ratio = -0.1 }", "budget.ratio"),
            ("budget = { min_per_sec = -1.0 }", "budget.min_per_sec"),
            ("breaker = { failure_rate = 2.0 }", "breaker.failure_rate"),
            ("breaker = { cool_down = \"0s\" }", "breaker.cool_down"),
            (
                "breaker = { half_open_probes = 0 }",
                "breaker.half_open_probes",
            ),
            ("concurrency = 0", "concurrency"),
            ("shed_when_full = true", "shed_when_full"),
        ];
        for (body, field) in cases {
            let text = format!("[targets.\"function:customer-lookup\"]\n{body}\n");
            let err = ResiliencePolicy::from_toml(&text).unwrap_err();
            assert!(
                matches!(&err, PolicyError::Invalid { target, field: f, .. }
                    if target == "function:customer-lookup" && *f == field),
                "{body}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains("function:customer-lookup") && message.contains(field),
                "{message}"
            );
        }
    }

    #[test]
    fn unknown_fields_bad_durations_and_bad_targets_are_parse_errors_naming_them() {
        let err =
            ResiliencePolicy::from_toml("[targets.\"function:x\"]\nretries = 3\n").unwrap_err();
        assert!(err.to_string().contains("retries"), "{err}");
        let err = ResiliencePolicy::from_toml("[targets.\"function:x\"]\ntimeout = \"soon\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
        let err =
            ResiliencePolicy::from_toml("[targets.\"lookup\"]\ntimeout = \"1s\"\n").unwrap_err();
        assert!(err.to_string().contains("lookup"), "{err}");
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../../../../deploy/resilience.toml");
        let policy = ResiliencePolicy::from_toml(text).unwrap();
        let lookup = &policy.targets[&target("subject:cc.v1.customers.lookup")];
        assert_eq!(lookup.timeout, Duration::from_millis(250));
        assert_eq!(lookup.retry.max_attempts, 2);
        assert_eq!(lookup.breaker.consecutive_failures, 5);
        assert_eq!(lookup.breaker.half_open_probes, 1);
    }
}
