//! Admission of a function deploy against the access policy: would the workloads that host
//! it be *allowed* to do what the deploy asks?
//!
//! A trigger subject must be covered by what the hosting group (runtime nodes; gateways for
//! HTTP functions) may subscribe to, each `--publish` entry by what it may publish and not by
//! a subject another group owns, and a stream or schedule trigger's consumer by one of its
//! `consume` grants. Otherwise the server would refuse the node at run time — a refusal that
//! only shows in the node's log, while the deploy reported success.
//!
//! The rules come from the policy stored by the admin bootstrap (`patchbay up` /
//! `patchbay bootstrap`) in the `patchbay-access` KV bucket: the policy the bus was set up
//! with, whichever directory `fn deploy` runs from. Bootstrap again after changing
//! deploy/access.toml (and re-rendering the server config).
//!
//! This module does not render or load the policy ([`crate::access`]) and stores nothing but
//! the rules document.

use std::collections::BTreeMap;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use patchbay_bus::Token;
use patchbay_registry::ordering::{ORDERED_STREAM, partition_consumer};
use patchbay_registry::{self as registry, TICKS_STREAM, Trigger};
use serde::{Deserialize, Serialize};

use crate::access::{AccessPolicy, HostRules, covers, overlaps};

/// KV bucket (declared in deploy/streams.toml, admin only) holding the rules document.
pub const ACCESS_BUCKET: &str = "patchbay-access";
/// Key of the rules document in [`ACCESS_BUCKET`].
pub const RULES_KEY: &str = "host-rules";
/// Identity kind of runtime nodes.
pub const RUNTIME: &str = "runtime";
/// Identity kind of gateways (they run HTTP functions in-process).
pub const GATEWAY: &str = "gateway";

/// Why a deploy cannot work under the access policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A trigger subject the hosts may not subscribe to.
    #[error(
        "trigger subject {subject:?} cannot work: {hosts} may subscribe to {allowed}; `{subject}` is not covered"
    )]
    TriggerNotCovered {
        /// Who would subscribe (`runtime nodes`).
        hosts: String,
        /// The trigger subject.
        subject: String,
        /// What they may subscribe to, comma-separated.
        allowed: String,
    },
    /// An allow-list entry the hosts may not publish.
    #[error(
        "--publish {entry:?} cannot work: {hosts} may publish {allowed}; `{entry}` is not covered"
    )]
    PublishNotCovered {
        /// Who would publish.
        hosts: String,
        /// The entry.
        entry: String,
        /// What they may publish, comma-separated.
        allowed: String,
    },
    /// An allow-list entry inside a subject another group owns.
    #[error(
        "--publish {entry:?} cannot work: {owned:?} is owned by {owner} and only {owner} may publish it"
    )]
    PublishOwned {
        /// The entry.
        entry: String,
        /// The owned pattern that covers it.
        owned: String,
        /// The owning group.
        owner: String,
    },
    /// A stream or schedule trigger whose consumer the hosts may not pull from.
    #[error(
        "trigger on stream {stream} cannot work: {hosts} may pull from {allowed}; consumer {stream}/{consumer} is not covered"
    )]
    StreamNotConsumable {
        /// Who would pull.
        hosts: String,
        /// The stream.
        stream: String,
        /// The consumer `fn deploy` would create.
        consumer: String,
        /// What they may pull from, comma-separated.
        allowed: String,
    },
    /// The stored document has no rules for the hosts.
    #[error("the stored access policy has no group for {kind} identities")]
    NoHostGroup {
        /// The identity kind.
        kind: String,
    },
}

/// The rules document: [`HostRules`] per identity kind that hosts functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRules {
    /// `runtime` and `gateway` (when the policy has those groups).
    pub hosts: BTreeMap<String, HostRules>,
}

impl StoredRules {
    /// The rules of `policy` for the kinds that host functions.
    #[must_use]
    pub fn from_policy(policy: &AccessPolicy) -> Self {
        let hosts = [RUNTIME, GATEWAY]
            .into_iter()
            .filter_map(|kind| policy.host_rules(kind).map(|r| (kind.to_owned(), r)))
            .collect();
        Self { hosts }
    }

    /// Check a deploy of function `name`: its trigger and its `--publish` allow-list
    /// (subjects without the subject prefix). Returns notes worth printing (allow-list
    /// entries part of which is owned by others) or the first reason it cannot work.
    pub fn check(
        &self,
        name: &Token,
        trigger: &Trigger,
        publish: &[String],
    ) -> Result<Vec<String>, Refused> {
        let kind = if trigger.is_http() { GATEWAY } else { RUNTIME };
        let rules = self.hosts.get(kind).ok_or_else(|| Refused::NoHostGroup {
            kind: kind.to_owned(),
        })?;
        let hosts = hosts_label(kind);
        match trigger {
            Trigger::Subject { subject } => check_subscribe(rules, &hosts, subject)?,
            Trigger::Stream {
                stream, ordered, ..
            } => match ordered {
                // Nodes pull the partitioned copy, not the input stream.
                Some(_) => {
                    check_consume(rules, &hosts, ORDERED_STREAM, &partition_consumer(name, 0))?;
                }
                None => check_consume(rules, &hosts, stream, &registry::consumer_name(name))?,
            },
            Trigger::Schedule { .. } => {
                check_consume(rules, &hosts, TICKS_STREAM, &registry::consumer_name(name))?;
            }
            Trigger::Invoke | Trigger::Http { .. } => {}
        }
        if kind == RUNTIME {
            // Every function answers direct invocation.
            check_subscribe(rules, &hosts, &format!("patchbay.v1.fn.{name}.invoke"))?;
        }
        let mut notes = Vec::new();
        for entry in publish {
            notes.extend(check_publish(rules, &hosts, entry)?);
        }
        Ok(notes)
    }
}

fn hosts_label(kind: &str) -> String {
    match kind {
        RUNTIME => "runtime nodes".to_owned(),
        GATEWAY => "gateways (which run HTTP functions)".to_owned(),
        other => format!("{other} identities"),
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_owned()
    } else {
        items.join(", ")
    }
}

fn check_subscribe(rules: &HostRules, hosts: &str, subject: &str) -> Result<(), Refused> {
    if rules.subscribe.iter().any(|p| covers(p, subject)) {
        return Ok(());
    }
    Err(Refused::TriggerNotCovered {
        hosts: hosts.to_owned(),
        subject: subject.to_owned(),
        allowed: list(&rules.subscribe),
    })
}

/// `Ok` with a note when part (not all) of `entry` is owned by another group.
fn check_publish(rules: &HostRules, hosts: &str, entry: &str) -> Result<Vec<String>, Refused> {
    if let Some(owned) = rules.owned.iter().find(|o| covers(&o.subject, entry)) {
        return Err(Refused::PublishOwned {
            entry: entry.to_owned(),
            owned: owned.subject.clone(),
            owner: owned.group.clone(),
        });
    }
    if !rules.publish.iter().any(|p| covers(p, entry)) {
        return Err(Refused::PublishNotCovered {
            hosts: hosts.to_owned(),
            entry: entry.to_owned(),
            allowed: list(&rules.publish),
        });
    }
    let overlapping: Vec<String> = rules
        .owned
        .iter()
        .filter(|o| overlaps(&o.subject, entry))
        .map(|o| format!("{} ({})", o.subject, o.group))
        .collect();
    Ok(if overlapping.is_empty() {
        vec![]
    } else {
        vec![format!(
            "--publish {entry:?} includes subjects owned by other groups, which {hosts} are refused: {}",
            overlapping.join(", ")
        )]
    })
}

fn check_consume(
    rules: &HostRules,
    hosts: &str,
    stream: &str,
    consumer: &str,
) -> Result<(), Refused> {
    let granted = rules.consume.iter().any(|grant| {
        grant.split_once('/').is_some_and(|(s, c)| {
            s == stream
                && match c.strip_suffix('*') {
                    Some(prefix) => consumer.starts_with(prefix),
                    None => c == consumer,
                }
        })
    });
    if granted {
        return Ok(());
    }
    Err(Refused::StreamNotConsumable {
        hosts: hosts.to_owned(),
        stream: stream.to_owned(),
        consumer: consumer.to_owned(),
        allowed: list(&rules.consume),
    })
}

/// Store the rules of `policy` (admin; the bucket exists after the streams bootstrap).
pub async fn store(js: &jetstream::Context, policy: &AccessPolicy) -> anyhow::Result<()> {
    let rules = StoredRules::from_policy(policy);
    let body = serde_json::to_vec(&rules).context("failed to encode the host rules")?;
    let bucket = js
        .get_key_value(ACCESS_BUCKET)
        .await
        .with_context(|| format!("failed to open bucket {ACCESS_BUCKET}"))?;
    bucket
        .put(RULES_KEY, body.into())
        .await
        .with_context(|| format!("failed to store {RULES_KEY} in {ACCESS_BUCKET}"))?;
    Ok(())
}

/// The rules the bootstrap stored; an error (saying how to fix it) when there are none.
pub async fn load(js: &jetstream::Context) -> anyhow::Result<StoredRules> {
    let missing = || {
        format!(
            "no access policy stored in {ACCESS_BUCKET}: run `patchbay bootstrap` (or \
             `patchbay up`) with the deploy/access.toml the server runs"
        )
    };
    let bucket: kv::Store = js
        .get_key_value(ACCESS_BUCKET)
        .await
        .with_context(missing)?;
    let body = bucket
        .get(RULES_KEY)
        .await
        .with_context(|| format!("failed to read {RULES_KEY} from {ACCESS_BUCKET}"))?
        .with_context(missing)?;
    serde_json::from_slice(&body)
        .with_context(|| format!("{ACCESS_BUCKET}/{RULES_KEY} is not a host-rules document"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn rules() -> StoredRules {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/access.toml");
        StoredRules::from_policy(&AccessPolicy::load(&path).unwrap())
    }

    fn name() -> Token {
        Token::new("probe").unwrap()
    }

    fn check(trigger: &str, publish: &[&str]) -> Result<Vec<String>, Refused> {
        let publish: Vec<String> = publish.iter().map(|s| (*s).to_owned()).collect();
        rules().check(&name(), &Trigger::parse(trigger).unwrap(), &publish)
    }

    #[test]
    fn accepts_the_triggers_and_outputs_the_examples_use() {
        for (trigger, publish) in [
            (
                "subject:cc.v1.customers.lookup",
                "cc.v1.customers.lookup.reply",
            ),
            ("subject:cc.v1.tests.in", "cc.v1.tests.>"),
            (
                "stream:CC_CALLS:cc.v1.calls.*.routed",
                "cc.v1.calls.*.analyzed",
            ),
            (
                "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
                "cc.v1.recordings.*.indexed",
            ),
            ("schedule:*/5 * * * * *", "cc.v1.tests.tick"),
            ("invoke", "patchbay.v1.dlq.probe"),
        ] {
            assert_eq!(
                check(trigger, &[publish]),
                Ok(vec![]),
                "{trigger} {publish}"
            );
        }
    }

    #[test]
    fn refuses_trigger_subjects_runtime_nodes_may_not_subscribe_to() {
        for subject in [
            ">",
            "$SYS.>",
            "$JS.API.>",
            "_INBOX.>",
            "other.v1.calls",
            "cc.>",
        ] {
            let err = check(&format!("subject:{subject}"), &[]).unwrap_err();
            assert!(
                matches!(err, Refused::TriggerNotCovered { .. }),
                "{subject}: {err}"
            );
            let text = err.to_string();
            assert!(text.contains("runtime nodes may subscribe to "), "{text}");
            assert!(text.contains("cc.v1.>"), "{text}");
            assert!(text.contains("patchbay.v1.fn.*.invoke"), "{text}");
            assert!(
                text.contains(&format!("`{subject}` is not covered")),
                "{text}"
            );
            // System subjects are never offered as a trigger, even the ones nodes hold.
            assert!(!text.contains("$SRV"), "{text}");
        }
    }

    #[test]
    fn refuses_publish_entries_outside_the_runtime_grants_or_owned_by_others() {
        for entry in [
            "$JS.API.>",
            "_INBOX.>",
            ">",
            "$KV.patchbay-fn-probe.x",
            "other.v1.x",
        ] {
            let err = check("invoke", &[entry]).unwrap_err();
            assert!(
                matches!(err, Refused::PublishNotCovered { .. }),
                "{entry}: {err}"
            );
            assert!(
                err.to_string()
                    .contains("runtime nodes may publish cc.v1.>"),
                "{err}"
            );
        }
        for (entry, owner) in [
            ("cc.v1.calls.*.routed", "routing"),
            ("cc.v1.calls.c1.closed", "routing"),
            ("cc.v1.calls.*.assigned", "agents"),
            ("cc.v1.agents.a1.evt.state-changed", "agents"),
            ("cc.v1.calls.*.incoming", "gateway"),
            ("cc.v1.agents.*.cmd.accept", "gateway"),
        ] {
            let err = check("invoke", &[entry]).unwrap_err();
            match &err {
                Refused::PublishOwned { owner: o, .. } => assert_eq!(o, owner, "{entry}"),
                other => panic!("{entry}: {other}"),
            }
            assert!(err.to_string().contains("owned by"), "{err}");
        }
    }

    #[test]
    fn a_broad_entry_that_overlaps_owned_subjects_is_accepted_with_a_note() {
        let notes = check("invoke", &["cc.v1.calls.>"]).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("cc.v1.calls.*.routed (routing)"),
            "{notes:?}"
        );
    }

    #[test]
    fn refuses_stream_triggers_on_streams_runtime_nodes_may_not_pull_from() {
        let err = check("stream:CC_AGENT_CMDS:cc.v1.agents.*.cmd.>", &[]).unwrap_err();
        assert!(matches!(err, Refused::StreamNotConsumable { .. }), "{err}");
        assert!(err.to_string().contains("CC_CALLS/fn-*"), "{err}");
        let err = check("stream:UNDECLARED:undeclared.>", &[]).unwrap_err();
        assert!(matches!(err, Refused::StreamNotConsumable { .. }), "{err}");
    }

    #[test]
    fn http_functions_are_checked_against_the_gateway_group() {
        // The gateway may publish agent commands (it owns them); runtime nodes may not.
        assert_eq!(
            check("http:/probe", &["cc.v1.agents.a1.cmd.accept"]),
            Ok(vec![])
        );
        assert!(check("invoke", &["cc.v1.agents.a1.cmd.accept"]).is_err());
        let err = check("http:/probe", &["cc.v1.calls.c1.routed"]).unwrap_err();
        assert!(matches!(err, Refused::PublishOwned { .. }), "{err}");
    }

    #[test]
    fn the_rules_document_round_trips_as_json() {
        let rules = rules();
        let text = serde_json::to_string(&rules).unwrap();
        let back: StoredRules = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rules);
        assert_eq!(rules.hosts[RUNTIME].group, "runtime");
        assert_eq!(rules.hosts[GATEWAY].group, "gateway");
    }
}
