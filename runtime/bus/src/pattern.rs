//! Subject patterns: the one algebra every part of Patchbay uses to decide whether a
//! subject is reachable.
//!
//! The access policy (`patchbay-control`: grants, owned subjects, stream subjects), the
//! deploy-time admission of a function's triggers and `--publish` list, the run-time
//! allow-list a function's publishes are checked against, subject triggers and resilience
//! targets all ask one of three questions, answered here and nowhere else:
//!
//! * [`Pattern::matches`] — does a concrete subject match?
//! * [`Pattern::covers`] — is every subject one pattern matches matched by another? (A
//!   deploy is admitted when its allow-list is covered by what the node may publish.)
//! * [`Pattern::overlaps`] — is some subject matched by both? (An owned subject another
//!   group's grant overlaps gets an explicit deny.)
//!
//! The syntax is NATS's, made strict where NATS is lenient so that a pattern means one
//! thing to every reader: tokens are non-empty and separated by `.`; no white space and
//! no control characters (NUL included) anywhere; `*` (one token) and `>` (one or more
//! trailing tokens) only as whole tokens, `>` only last. A *subject* is a pattern with no
//! wildcard: a string that is not one (an empty token, a control character, a `*` of its
//! own) matches nothing, so it can never slip through an allow-list.
//!
//! The three operations agree by construction — `matches` is `covers` of a literal — and
//! `tests/properties.rs` checks `covers` and `overlaps` against brute force over every
//! subject of a small alphabet.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Why a string is not a subject pattern.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// The empty string.
    #[error("empty")]
    Empty,
    /// Two dots in a row, or a leading or trailing dot.
    #[error("token {token} is empty (leading, trailing or doubled dot)")]
    EmptyToken {
        /// 1-based position of the token.
        token: usize,
    },
    /// White space or a control character.
    #[error("token {token} contains white space or a control character")]
    Whitespace {
        /// 1-based position of the token.
        token: usize,
    },
    /// `*` or `>` inside a longer token (`a*`, `>b`).
    #[error("token {token} has a wildcard that is not the whole token")]
    PartialWildcard {
        /// 1-based position of the token.
        token: usize,
    },
    /// `>` before the last token.
    #[error("`>` is only allowed as the last token (it is token {token})")]
    TailNotLast {
        /// 1-based position of the token.
        token: usize,
    },
}

impl PatternError {
    /// What is wrong, without the position: for messages that name the pattern already.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::EmptyToken { .. } => "has an empty token",
            Self::Whitespace { .. } => "contains white space or a control character",
            Self::PartialWildcard { .. } => "wildcards must be whole tokens",
            Self::TailNotLast { .. } => "`>` may only be the last token",
        }
    }
}

/// A validated NATS subject pattern (or, without wildcards, a subject).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern(String);

impl Pattern {
    /// Validate `pattern` (see the [module docs](self) for the syntax).
    pub fn new(pattern: impl Into<String>) -> Result<Self, PatternError> {
        let pattern = pattern.into();
        check(&pattern)?;
        Ok(Self(pattern))
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern has no wildcard, i.e. is a single subject.
    #[must_use]
    pub fn is_literal(&self) -> bool {
        self.0.split('.').all(|t| t != "*" && t != ">")
    }

    /// Whether the first token is a wildcard (`>`, `*.…`): a pattern reaching every
    /// namespace, `$JS…` and `_INBOX…` included.
    #[must_use]
    pub fn starts_with_wildcard(&self) -> bool {
        matches!(self.0.split('.').next(), Some("*" | ">"))
    }

    /// Whether the concrete `subject` matches. A string that is not a literal subject
    /// matches nothing.
    #[must_use]
    pub fn matches(&self, subject: &str) -> bool {
        is_subject(subject) && covers_str(&self.0, subject)
    }

    /// Whether every subject `other` matches is matched by `self`.
    #[must_use]
    pub fn covers(&self, other: &Self) -> bool {
        covers_str(&self.0, &other.0)
    }

    /// Whether some subject is matched by both patterns.
    #[must_use]
    pub fn overlaps(&self, other: &Self) -> bool {
        overlaps_str(&self.0, &other.0)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for Pattern {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Check `pattern` against the syntax without keeping it.
pub fn check(pattern: &str) -> Result<(), PatternError> {
    if pattern.is_empty() {
        return Err(PatternError::Empty);
    }
    let count = pattern.split('.').count();
    for (i, token) in pattern.split('.').enumerate() {
        let n = i + 1;
        if token.is_empty() {
            return Err(PatternError::EmptyToken { token: n });
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::Whitespace { token: n });
        }
        if token.len() > 1 && token.contains(['*', '>']) {
            return Err(PatternError::PartialWildcard { token: n });
        }
        if token == ">" && n != count {
            return Err(PatternError::TailNotLast { token: n });
        }
    }
    Ok(())
}

/// Whether `subject` is a literal subject: a valid pattern without wildcards.
#[must_use]
pub fn is_subject(subject: &str) -> bool {
    check(subject).is_ok() && subject.split('.').all(|t| t != "*" && t != ">")
}

/// Whether the concrete `subject` matches `pattern`; an invalid pattern matches nothing.
/// For matching many subjects against one pattern, validate it once with [`Pattern`].
#[must_use]
pub fn matches(pattern: &str, subject: &str) -> bool {
    check(pattern).is_ok() && is_subject(subject) && covers_str(pattern, subject)
}

/// How nats-server's permission check matches a subscription's subject against a grant:
/// the subject's tokens are taken literally, so a grant's `*` matches a `*` or `>` token
/// of the subject as it matches any other, and a grant's `>` matches one or more tokens.
/// (A subscription to `a.>` therefore passes a grant of `a.*`, which [`covers`] denies.)
/// What the access policy's deny-matrix emulation uses to predict the live server; the
/// platform's own checks use [`covers`] and [`matches`].
#[must_use]
pub fn matches_literally(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for p in pattern.split('.') {
        match p {
            ">" => return subject_tokens.next().is_some(),
            "*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            literal => {
                if subject_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}

/// [`Pattern::covers`] on strings (an invalid one covers nothing).
#[must_use]
pub fn covers(big: &str, small: &str) -> bool {
    check(big).is_ok() && check(small).is_ok() && covers_str(big, small)
}

/// [`Pattern::overlaps`] on strings (an invalid one overlaps nothing).
#[must_use]
pub fn overlaps(a: &str, b: &str) -> bool {
    check(a).is_ok() && check(b).is_ok() && overlaps_str(a, b)
}

fn covers_str(big: &str, small: &str) -> bool {
    let mut small_tokens = small.split('.');
    for b in big.split('.') {
        match (b, small_tokens.next()) {
            (_, None) => return false,
            (">", Some(_)) => return true,
            ("*", Some(s)) => {
                if s == ">" {
                    return false;
                }
            }
            (literal, Some(s)) => {
                if s != literal {
                    return false;
                }
            }
        }
    }
    small_tokens.next().is_none()
}

fn overlaps_str(a: &str, b: &str) -> bool {
    let (mut a_tokens, mut b_tokens) = (a.split('.'), b.split('.'));
    loop {
        match (a_tokens.next(), b_tokens.next()) {
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(x), Some(y)) => {
                if x != y {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn a_star_matches_exactly_one_token() {
        assert!(p("cc.*.ended").matches("cc.42.ended"));
        assert!(!p("cc.*.ended").matches("cc.ended"));
        assert!(!p("cc.*.ended").matches("cc.4.2.ended"));
        assert!(p("*").matches("anything"));
        assert!(!p("*").matches("two.tokens"));
    }

    #[test]
    fn a_tail_matches_one_or_more_tokens() {
        assert!(p("cc.>").matches("cc.a"));
        assert!(p("cc.>").matches("cc.a.b.c"));
        assert!(!p("cc.>").matches("cc"));
    }

    #[test]
    fn literals_match_only_themselves() {
        assert!(p("cc.v1.calls").matches("cc.v1.calls"));
        assert!(!p("cc.v1.calls").matches("cc.v1.call"));
        assert!(!p("cc.v1.calls").matches("cc.v1.calls.x"));
        assert!(!p("cc.v1.calls.x").matches("cc.v1.calls"));
    }

    #[test]
    fn what_is_not_a_subject_matches_nothing() {
        for subject in [
            "", "cc..x", "cc.*", "cc.>", "cc.a b", "cc.a\0", "cc.\r\n", "cc.",
        ] {
            assert!(!p(">").matches(subject), "{subject:?}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_token() {
        assert_eq!(Pattern::new(""), Err(PatternError::Empty));
        assert_eq!(
            Pattern::new("a..b"),
            Err(PatternError::EmptyToken { token: 2 })
        );
        assert_eq!(
            Pattern::new("a.b c"),
            Err(PatternError::Whitespace { token: 2 })
        );
        assert_eq!(
            Pattern::new("a.\0"),
            Err(PatternError::Whitespace { token: 2 })
        );
        assert_eq!(
            Pattern::new("a*.b"),
            Err(PatternError::PartialWildcard { token: 1 })
        );
        assert_eq!(
            Pattern::new("a.>.b"),
            Err(PatternError::TailNotLast { token: 2 })
        );
        assert!(
            !matches("a.>.b", "a.x.b"),
            "an invalid pattern matches nothing"
        );
    }

    #[test]
    fn covers_and_overlaps_follow_the_wildcards() {
        assert!(covers("cc.v1.>", "cc.v1.calls.*.routed"));
        assert!(!covers("cc.v1.calls.*.routed", "cc.v1.>"));
        assert!(!covers("a.*", "a.>"));
        assert!(covers("a.*", "a.*"));
        assert!(overlaps("cc.v1.>", "cc.v1.calls.*.routed"));
        assert!(overlaps("a.*.c", "a.b.*"));
        assert!(!overlaps("a.b", "a.c"));
        assert!(!overlaps("a.*", "a.b.c"));
    }

    #[test]
    fn the_servers_literal_matching_takes_subject_wildcards_as_tokens() {
        assert!(matches_literally("a.*", "a.>"));
        assert!(!covers("a.*", "a.>"));
        assert!(matches_literally("_INBOX.x.>", "_INBOX.x.>"));
        assert!(!matches_literally("_INBOX.x.>", "_INBOX.>"));
        assert!(!matches_literally("a.>", "a"));
        assert!(matches_literally("a.*.c", "a.b.c") && !matches_literally("a.b", "a.b.c"));
    }
}
