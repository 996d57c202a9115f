//! Property test of the access policy compiler: an operator's hand-edited `access.toml`
//! either loads — and then every identity's permissions and deny-matrix expectations
//! render — or is refused with a named reason. Never a panic, whatever the edit.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::LazyLock;

use patchbay_control::access::AccessPolicy;
use patchbay_control::natsconf::render_permissions;
use patchbay_control::streams::Declaration;
use proptest::prelude::*;

const SHIPPED: &str = include_str!("../../../deploy/access.toml");

static ASSETS: LazyLock<Declaration> = LazyLock::new(|| {
    Declaration::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/streams.toml"))
        .unwrap()
});

/// Subjects and patterns as an operator might mistype them.
fn subjectish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z*>$._-]{0,24}",
        Just(">".to_owned()),
        Just("$JS.API.>".to_owned()),
        Just("_INBOX.>".to_owned()),
        Just("cc.v1.*.x>".to_owned()),
        "[ -~]{0,16}",
    ]
}

/// The shipped policy with a few lines dropped, duplicated or given another value.
fn mutated_policy() -> impl Strategy<Value = String> {
    let lines: Vec<String> = SHIPPED.lines().map(str::to_owned).collect();
    let n = lines.len();
    (
        prop::collection::vec((0..n, 0u8..4, subjectish()), 0..4),
        Just(lines),
    )
        .prop_map(|(edits, mut lines)| {
            for (at, how, text) in edits {
                let at = at.min(lines.len().saturating_sub(1));
                match how {
                    0 => {
                        if !lines.is_empty() {
                            lines.remove(at);
                        }
                    }
                    1 => lines.insert(at, lines.get(at).cloned().unwrap_or_default()),
                    2 => {
                        if let Some(line) = lines.get_mut(at)
                            && let Some((key, _)) = line.split_once('=')
                        {
                            *line = format!("{key}= [{text:?}]");
                        }
                    }
                    _ => {
                        // A new entry in a list (the line after an opening bracket).
                        if let Some(line) = lines.get(at)
                            && line.trim_end().ends_with('[')
                        {
                            lines.insert(at + 1, format!("  {text:?},"));
                        }
                    }
                }
            }
            lines.join("\n")
        })
}

proptest! {
    #[test]
    fn any_edit_of_the_policy_loads_and_renders_or_names_its_problem(text in mutated_policy()) {
        match AccessPolicy::from_toml_str(&text, &ASSETS) {
            Ok(policy) => {
                for identity in policy.identities() {
                    if let Some(perms) = policy.permissions_for(identity) {
                        let _ = render_permissions(&perms, "  ");
                    }
                    let _ = policy.expectations(identity);
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn the_shipped_policy_loads() {
    let policy = AccessPolicy::from_toml_str(SHIPPED, &ASSETS).unwrap();
    assert!(!policy.identities().is_empty());
}
