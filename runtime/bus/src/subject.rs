//! Subjects: the one place where NATS subjects are built *and* parsed.
//!
//! Every subject the platform uses has a builder and a parser side by side, with a
//! round-trip test. A deployment may set a prefix (for example `acme.`) that is prepended
//! to every application subject, so several Patchbay installations can share one NATS
//! cluster; `$`-subjects (JetStream API, micro protocol) and inboxes are never prefixed.
//! Contact-centre subjects live in `patchbay-protocol` and use [`Token`] and [`Subjects`]
//! from here.

use std::fmt;

use thiserror::Error;

/// Why a subject or subject token was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SubjectError {
    /// A token (one dot-separated part) is empty, too long or has a forbidden character.
    #[error("invalid subject token {token:?}: {reason}")]
    InvalidToken {
        /// The offending token.
        token: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A prefix must be empty or dot-terminated tokens, like `acme.`.
    #[error("invalid subject prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The offending prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The subject does not have the shape of any subject this parser knows.
    #[error("subject {subject:?} is not a {expected} subject")]
    Unrecognised {
        /// The subject that failed to parse.
        subject: String,
        /// What kind of subject the caller expected.
        expected: &'static str,
    },
    /// Not a literal subject one can publish to (see [`validate_publish_subject`]).
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The offending subject.
        subject: String,
        /// What is wrong with it, naming the token where there is one.
        reason: String,
    },
    /// A well-formed subject in a namespace that belongs to the NATS server and clients
    /// (see [`RESERVED_NAMESPACES`]), not to application events.
    #[error("subject {subject:?} is in the reserved namespace {namespace:?}")]
    Reserved {
        /// The offending subject.
        subject: String,
        /// The namespace it is in (`$` or `_INBOX`).
        namespace: &'static str,
    },
}

/// Result alias for subject operations.
pub type Result<T, E = SubjectError> = std::result::Result<T, E>;

/// Longest token accepted (function names, call ids, agent ids).
pub const MAX_TOKEN_LEN: usize = 128;

/// One validated subject token: an identifier such as a function name, a call id or an
/// agent id. Letters, digits, `-` and `_` only — no dots, wildcards or white space — so
/// an identifier can never change the shape of the subject it is placed in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    /// Validate `value` as a subject token.
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("empty")
        } else if value.len() > MAX_TOKEN_LEN {
            Some("longer than 128 bytes")
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Some("only ASCII letters, digits, '-' and '_' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(SubjectError::InvalidToken {
                token: value,
                reason,
            }),
            None => Ok(Self(value)),
        }
    }

    /// The token as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Token {
    type Err = SubjectError;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// The subject space of one Patchbay installation: the prefix plus the platform subjects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects with `prefix` prepended to every application subject. The prefix is empty
    /// or one or more tokens each followed by a dot (`acme.`, `eu.acme.`).
    pub fn new(prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        if !prefix.is_empty() {
            let Some(body) = prefix.strip_suffix('.') else {
                return Err(SubjectError::InvalidPrefix {
                    prefix,
                    reason: "must end with '.'",
                });
            };
            if let Some(bad) = body.split('.').find(|t| Token::new(*t).is_err()) {
                let reason = if bad.is_empty() {
                    "has an empty token"
                } else {
                    "tokens may hold only letters, digits, '-' and '_'"
                };
                return Err(SubjectError::InvalidPrefix { prefix, reason });
            }
        }
        Ok(Self { prefix })
    }

    /// The prefix (possibly empty).
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `tail` with the prefix prepended.
    #[must_use]
    pub fn full(&self, tail: &str) -> String {
        format!("{}{tail}", self.prefix)
    }

    /// `subject` without the prefix, or an error if it lacks it.
    pub fn strip<'a>(&self, subject: &'a str) -> Result<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())
            .ok_or_else(|| SubjectError::Unrecognised {
                subject: subject.to_owned(),
                expected: "prefixed",
            })
    }

    /// `patchbay.v1.fn.<name>.invoke` — request-reply. Published by the gateway and the
    /// CLI, answered by one runtime node (queue group); the reply carries the function's
    /// outputs or its failure.
    #[must_use]
    pub fn fn_invoke(&self, function: &Token) -> String {
        self.full(&format!("patchbay.v1.fn.{function}.invoke"))
    }

    /// `patchbay.v1.fn.<name>.logs` — event. Published by runtime nodes, one record per
    /// `log` call of the function; kept in the bounded PATCHBAY_LOGS stream for `fn logs`.
    #[must_use]
    pub fn fn_logs(&self, function: &Token) -> String {
        self.full(&format!("patchbay.v1.fn.{function}.logs"))
    }

    /// `patchbay.v1.dlq.<name>` — event. Published by runtime nodes when an event is
    /// dead-lettered: the original message plus context headers; stream PATCHBAY_DLQ.
    #[must_use]
    pub fn dlq(&self, function: &Token) -> String {
        self.full(&format!("patchbay.v1.dlq.{function}"))
    }

    /// `patchbay.v1.runtime.status` — scatter-gather request. Every runtime node answers
    /// (no queue group) with the functions and versions it serves; the CLI waits on it
    /// after a deploy.
    #[must_use]
    pub fn runtime_status(&self) -> String {
        self.full("patchbay.v1.runtime.status")
    }

    /// The subscription pattern matching [`Subjects::fn_invoke`] for every function.
    #[must_use]
    pub fn fn_invoke_all(&self) -> String {
        self.full("patchbay.v1.fn.*.invoke")
    }

    /// The subscription pattern matching [`Subjects::fn_logs`] for every function.
    #[must_use]
    pub fn fn_logs_all(&self) -> String {
        self.full("patchbay.v1.fn.*.logs")
    }

    /// The subscription pattern matching every [`Subjects::dlq`] subject.
    #[must_use]
    pub fn dlq_all(&self) -> String {
        self.full("patchbay.v1.dlq.*")
    }

    /// Parse any platform subject built by this type.
    pub fn parse(&self, subject: &str) -> Result<PlatformSubject> {
        let unrecognised = || SubjectError::Unrecognised {
            subject: subject.to_owned(),
            expected: "platform",
        };
        let tail = self.strip(subject).map_err(|_| unrecognised())?;
        let parts: Vec<&str> = tail.split('.').collect();
        let token = |t: &str| Token::new(t).map_err(|_| unrecognised());
        match parts.as_slice() {
            ["patchbay", "v1", "fn", name, "invoke"] => Ok(PlatformSubject::FnInvoke {
                function: token(name)?,
            }),
            ["patchbay", "v1", "fn", name, "logs"] => Ok(PlatformSubject::FnLogs {
                function: token(name)?,
            }),
            ["patchbay", "v1", "dlq", name] => Ok(PlatformSubject::Dlq {
                function: token(name)?,
            }),
            ["patchbay", "v1", "runtime", "status"] => Ok(PlatformSubject::RuntimeStatus),
            _ => Err(unrecognised()),
        }
    }
}

/// A parsed platform subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformSubject {
    /// `patchbay.v1.fn.<name>.invoke`
    FnInvoke {
        /// The function invoked.
        function: Token,
    },
    /// `patchbay.v1.fn.<name>.logs`
    FnLogs {
        /// The function that logged.
        function: Token,
    },
    /// `patchbay.v1.dlq.<name>`
    Dlq {
        /// The function whose event was dead-lettered.
        function: Token,
    },
    /// `patchbay.v1.runtime.status`
    RuntimeStatus,
}

/// Whether a concrete `subject` matches a NATS subscription `pattern` (`*` matches one
/// token, a trailing `>` one or more). The one algebra is [`crate::pattern`]; this is its
/// string form.
#[must_use]
pub fn matches(pattern: &str, subject: &str) -> bool {
    crate::pattern::matches(pattern, subject)
}

/// Whether `pattern` is a well-formed subject or subscription pattern (see
/// [`crate::pattern`]): non-empty tokens without white space or control characters, `*`
/// only as a whole token, `>` only as the last token.
#[must_use]
pub fn is_valid_pattern(pattern: &str) -> bool {
    crate::pattern::check(pattern).is_ok()
}

/// Longest subject [`validate_publish_subject`] accepts, in bytes. The server refuses a
/// protocol line longer than its `max_control_line` (4 KiB by default) by closing the
/// *whole connection*, so one caller's long subject must never reach it.
pub const MAX_PUBLISH_SUBJECT_LEN: usize = 512;

/// First tokens that belong to NATS itself rather than to applications: `$` subjects (the
/// JetStream, KV and object-store APIs, `$SYS`, the `$SRV` micro protocol) and `_INBOX`
/// (request-reply inboxes, where a forged message would pose as someone's reply).
pub const RESERVED_NAMESPACES: [&str; 2] = ["$", "_INBOX"];

/// Check that `subject` is a literal subject an external caller may publish (or send a
/// request) to: 1 to [`MAX_PUBLISH_SUBJECT_LEN`] bytes of non-empty dot-separated tokens
/// with no white space, control characters (NUL included) or wildcard characters (`*`,
/// `>`), outside the [`RESERVED_NAMESPACES`], and made of ASCII letters, digits, `-` and
/// `_` (the [`Token`] alphabet). The reserved check comes before the alphabet, so a
/// `$JS.API…` subject is [`SubjectError::Reserved`]; every other refusal is
/// [`SubjectError::InvalidSubject`] with the reason.
///
/// Used by the gateway before it publishes on a caller's behalf: NATS would otherwise
/// drop a malformed or forbidden publish without telling the publisher.
pub fn validate_publish_subject(subject: &str) -> Result<()> {
    let invalid = |reason: String| SubjectError::InvalidSubject {
        subject: subject.to_owned(),
        reason,
    };
    if subject.is_empty() {
        return Err(invalid("empty".into()));
    }
    if subject.len() > MAX_PUBLISH_SUBJECT_LEN {
        return Err(invalid(format!(
            "longer than {MAX_PUBLISH_SUBJECT_LEN} bytes"
        )));
    }
    for (i, token) in subject.split('.').enumerate() {
        let n = i + 1;
        let reason = if token.is_empty() {
            Some(format!("token {n} is empty"))
        } else if let Some(c) = token.chars().find(|c| c.is_control()) {
            Some(format!(
                "token {n} contains the control character U+{:04X}",
                u32::from(c)
            ))
        } else if token.chars().any(char::is_whitespace) {
            Some(format!("token {n} contains white space"))
        } else if token.contains(['*', '>']) {
            Some(format!(
                "token {n} ({token:?}) has a wildcard ('*' or '>'): publish to a literal subject"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(invalid(reason));
        }
    }
    let first = subject.split('.').next().unwrap_or_default();
    let reserved = if first.starts_with('$') {
        Some(RESERVED_NAMESPACES[0])
    } else if first == RESERVED_NAMESPACES[1] {
        Some(RESERVED_NAMESPACES[1])
    } else {
        None
    };
    if let Some(namespace) = reserved {
        return Err(SubjectError::Reserved {
            subject: subject.to_owned(),
            namespace,
        });
    }
    // Outside the reserved namespaces, every token uses the platform's identifier
    // alphabet (that of [`Token`]): the gateway's OpenAPI document promises exactly that,
    // and no Patchbay subject needs more.
    for (i, token) in subject.split('.').enumerate() {
        if let Some(c) = token
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(invalid(format!(
                "token {} ({token:?}) has {c:?}: tokens are ASCII letters, digits, '-' and '_'",
                i + 1
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str) -> Token {
        Token::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn platform_subjects_round_trip_with_and_without_prefix() {
        for prefix in ["", "acme.", "eu.acme."] {
            let s = Subjects::new(prefix).unwrap_or_else(|e| panic!("{e}"));
            let f = tok("recording-index");
            let cases = [
                (
                    s.fn_invoke(&f),
                    PlatformSubject::FnInvoke {
                        function: f.clone(),
                    },
                ),
                (
                    s.fn_logs(&f),
                    PlatformSubject::FnLogs {
                        function: f.clone(),
                    },
                ),
                (
                    s.dlq(&f),
                    PlatformSubject::Dlq {
                        function: f.clone(),
                    },
                ),
            ];
            for (subject, parsed) in cases {
                assert!(subject.starts_with(prefix));
                assert_eq!(s.parse(&subject), Ok(parsed));
            }
        }
    }

    #[test]
    fn wildcard_patterns_match_the_subjects_they_stand_for() {
        let s = Subjects::new("acme.").unwrap_or_else(|e| panic!("{e}"));
        let f = tok("lookup");
        assert!(matches(&s.fn_invoke_all(), &s.fn_invoke(&f)));
        assert!(matches(&s.fn_logs_all(), &s.fn_logs(&f)));
        assert!(matches(&s.dlq_all(), &s.dlq(&f)));
        assert!(!matches(&s.fn_invoke_all(), &s.fn_logs(&f)));
    }

    #[test]
    fn tokens_refuse_dots_wildcards_and_white_space() {
        for bad in ["", "a.b", "*", ">", "a b", "caf\u{e9}", &"x".repeat(129)] {
            assert!(Token::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(tok("call_42-a").as_str(), "call_42-a");
    }

    #[test]
    fn prefixes_must_be_dot_terminated_tokens() {
        assert!(Subjects::new("acme").is_err());
        assert!(Subjects::new(".").is_err());
        assert!(Subjects::new("a..").is_err());
        assert!(Subjects::new("a*.").is_err());
        assert_eq!(
            Subjects::new("a.b.").map(|s| s.full("x")),
            Ok("a.b.x".into())
        );
    }

    #[test]
    fn parse_rejects_foreign_subjects() {
        let s = Subjects::new("acme.").unwrap_or_else(|e| panic!("{e}"));
        for bad in [
            "patchbay.v1.fn.x.invoke",
            "acme.patchbay.v1.fn.x.y.invoke",
            "acme.patchbay.v2.fn.x.invoke",
            "acme.patchbay.v1.dlq",
        ] {
            assert!(s.parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn matching_follows_nats_wildcard_rules() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.b.c.d"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "a"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
    }

    #[test]
    fn pattern_validation_places_wildcards_correctly() {
        for good in ["a", "a.*.c", "a.>", ">", "$JS.API.>", "_INBOX.x.>"] {
            assert!(is_valid_pattern(good), "{good}");
        }
        for bad in ["", "a..b", "a.>.c", "a*", "a b", ".a", "a."] {
            assert!(!is_valid_pattern(bad), "{bad}");
        }
    }
    #[test]
    fn publish_subjects_must_be_literal_well_formed_and_short() {
        for good in [
            "cc.v1.calls.c-1.incoming",
            "a",
            "INBOX.x",
            "x._INBOX",
            &"x".repeat(MAX_PUBLISH_SUBJECT_LEN),
        ] {
            assert_eq!(validate_publish_subject(good), Ok(()), "{good:?}");
        }
        for outside_the_alphabet in ["cc.v1.calls.caf\u{e9}.x", "a$.b", "null,null", "a.b:c"] {
            assert!(
                matches!(
                    validate_publish_subject(outside_the_alphabet),
                    Err(SubjectError::InvalidSubject { .. })
                ),
                "{outside_the_alphabet:?}"
            );
        }
        for (bad, reason) in [
            ("", "empty"),
            ("a..b", "token 2 is empty"),
            (".a", "token 1 is empty"),
            ("a.", "token 2 is empty"),
            ("a.b\0c", "token 2 contains the control character U+0000"),
            ("a.\u{7f}", "token 2 contains the control character U+007F"),
            (
                "a.b\r\nPUB x 1",
                "token 2 contains the control character U+000D",
            ),
            ("a b", "token 1 contains white space"),
            ("a.\u{a0}", "token 2 contains white space"),
            ("a.*.c", "token 2 (\"*\") has a wildcard"),
            ("a.>", "token 2 (\">\") has a wildcard"),
            ("a.b*", "token 2 (\"b*\") has a wildcard"),
            ("$JS.API.>", "token 3 (\">\") has a wildcard"),
        ] {
            match validate_publish_subject(bad) {
                Err(SubjectError::InvalidSubject { subject, reason: r }) => {
                    assert_eq!(subject, bad);
                    assert!(r.starts_with(reason), "{bad:?}: {r:?}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let long = "x".repeat(MAX_PUBLISH_SUBJECT_LEN + 1);
        assert!(matches!(
            validate_publish_subject(&long),
            Err(SubjectError::InvalidSubject { reason, .. }) if reason == "longer than 512 bytes"
        ));
    }

    #[test]
    fn publish_subjects_in_reserved_namespaces_are_refused_as_reserved() {
        for (subject, namespace) in [
            ("$JS.API.STREAM.DELETE.CC_CALLS", "$"),
            ("$KV.patchbay-tokens.x", "$"),
            ("$SYS.REQ.SERVER.PING", "$"),
            ("$SRV.PING", "$"),
            ("$", "$"),
            ("_INBOX.x", "_INBOX"),
            ("_INBOX.gateway.gateway.abc", "_INBOX"),
            ("_INBOX", "_INBOX"),
        ] {
            assert_eq!(
                validate_publish_subject(subject),
                Err(SubjectError::Reserved {
                    subject: subject.to_owned(),
                    namespace,
                }),
            );
        }
        assert_eq!(
            validate_publish_subject("$JS.API.STREAM.DELETE.CC_CALLS").map_err(|e| e.to_string()),
            Err(
                "subject \"$JS.API.STREAM.DELETE.CC_CALLS\" is in the reserved namespace \"$\""
                    .into()
            )
        );
    }
}
