//! The one subject-pattern algebra against brute force, and the promise built on it: what
//! the deploy-time check admits, the run-time enforcement allows, and nothing more.
//!
//! Patterns and subjects are drawn from a small alphabet (`a`, `b`, `c`, plus `z` as the
//! token no pattern names), so enumerating every subject up to a length two tokens longer
//! than any pattern decides each question exactly: a counterexample, if one exists, is
//! among them.

#![allow(clippy::unwrap_used, missing_docs)]

use patchbay_bus::pattern::{self, Pattern};
use proptest::prelude::*;

const MAX_TOKENS: usize = 4;

fn pattern() -> impl Strategy<Value = Pattern> {
    (
        prop::collection::vec(
            prop_oneof!["a", "b", "c", Just("*".to_owned())],
            1..=MAX_TOKENS,
        ),
        any::<bool>(),
    )
        .prop_map(|(mut tokens, tail)| {
            if tail {
                *tokens.last_mut().unwrap() = ">".to_owned();
            }
            Pattern::new(tokens.join(".")).unwrap()
        })
}

/// Every subject over `a b c z` with 1 to `MAX_TOKENS + 2` tokens.
fn every_subject() -> Vec<String> {
    let mut all = Vec::new();
    let mut layer = vec![String::new()];
    for _ in 0..MAX_TOKENS + 2 {
        layer = layer
            .iter()
            .flat_map(|prefix| {
                ["a", "b", "c", "z"].map(|t| {
                    if prefix.is_empty() {
                        t.to_owned()
                    } else {
                        format!("{prefix}.{t}")
                    }
                })
            })
            .collect();
        all.extend(layer.iter().cloned());
    }
    all
}

/// A pattern no broader than `grant`: each wildcard kept or narrowed (`*` to a literal,
/// `>` to `*`, a literal or `x.>`), chosen by `choices`.
fn narrowed(grant: &Pattern, choices: &[u8]) -> Pattern {
    let mut choice = choices.iter().copied().cycle();
    let tokens: Vec<String> = grant
        .as_str()
        .split('.')
        .map(|t| match (t, choice.next().unwrap_or(0) % 4) {
            ("*", 1) => "b".to_owned(),
            (">", 1) => "*".to_owned(),
            (">", 2) => "c".to_owned(),
            (">", 3) => "a.>".to_owned(),
            (t, _) => t.to_owned(),
        })
        .collect();
    Pattern::new(tokens.join(".")).unwrap()
}

fn subjects() -> &'static [String] {
    static ALL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ALL.get_or_init(every_subject)
}

proptest! {
    #[test]
    fn covers_holds_exactly_when_no_subject_escapes(big in pattern(), small in pattern()) {
        let escapes = subjects().iter().any(|s| small.matches(s) && !big.matches(s));
        prop_assert_eq!(big.covers(&small), !escapes, "{} covers {}", big, small);
    }

    #[test]
    fn overlaps_holds_exactly_when_some_subject_matches_both(a in pattern(), b in pattern()) {
        let shared = subjects().iter().any(|s| a.matches(s) && b.matches(s));
        prop_assert_eq!(a.overlaps(&b), shared, "{} overlaps {}", a, b);
        prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
    }

    /// The deploy-time admission of a `--publish` list (every entry covered by a grant and
    /// overlapping no subject another service owns) and the run-time checks (the
    /// allow-list, then the server's grants and denies) agree: whatever the function's
    /// allow-list lets through at run time, the server lets through too: no admitted deploy
    /// meets a refusal it was not warned about. (Admission is conservative: an entry
    /// covered only by the union of several grants is refused.)
    #[test]
    fn an_admitted_allow_list_publishes_only_what_the_grants_allow(
        grants in prop::collection::vec(pattern(), 1..3),
        owned in prop::collection::vec(pattern(), 0..2),
        random in prop::collection::vec(pattern(), 0..2),
        choices in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        // Half narrowed from a grant (usually admitted), half arbitrary (usually not).
        let mut entries: Vec<Pattern> = grants.iter().map(|g| narrowed(g, &choices)).collect();
        entries.extend(random);
        let admitted = entries.iter().all(|e| {
            grants.iter().any(|g| g.covers(e)) && !owned.iter().any(|o| o.overlaps(e))
        });
        let server_allows =
            |s: &str| grants.iter().any(|g| g.matches(s)) && !owned.iter().any(|o| o.matches(s));
        let allow_list_allows = |s: &str| entries.iter().any(|e| e.matches(s));
        if !admitted {
            return Ok(());
        }
        for s in subjects() {
            prop_assert!(
                !allow_list_allows(s) || server_allows(s),
                "{s} passes the allow-list {entries:?} but the server refuses it",
            );
        }
    }

    #[test]
    fn the_string_forms_agree_with_the_validated_ones(a in pattern(), s in "[abz*>. ]{0,9}") {
        prop_assert_eq!(pattern::matches(a.as_str(), &s), a.matches(&s));
        if let Ok(b) = Pattern::new(s.clone()) {
            prop_assert_eq!(pattern::covers(a.as_str(), &s), a.covers(&b));
            prop_assert_eq!(pattern::overlaps(a.as_str(), &s), a.overlaps(&b));
        } else {
            prop_assert!(!pattern::covers(a.as_str(), &s) && !pattern::overlaps(a.as_str(), &s));
        }
    }
}
