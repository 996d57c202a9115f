//! `patchbay resilience …`: apply `deploy/resilience.toml` to the `patchbay-resilience`
//! bucket and show what is stored there.
//!
//! `apply` validates the whole file first (nothing is written when any target is invalid),
//! then writes each target as one key with revision compare-and-set, deletes the keys of
//! targets no longer in the file, and prints what changed. Every process follows the
//! bucket through `patchbay_bus::resilience::ResilienceWatch`, so no restart is needed.
//! The policy format and its validation live in `patchbay_bus::resilience::policy`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::TryStreamExt as _;
use patchbay_bus::Bus;
use patchbay_bus::resilience::{
    PolicyOrigin, RESILIENCE_BUCKET, ResiliencePolicy, StoredTarget, Target, TargetPolicy,
};

/// `patchbay resilience` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ResilienceCommand {
    /// Validate a policy file and store it: one key per target, removed targets deleted.
    Apply {
        /// The policy file.
        #[arg(long, default_value = "deploy/resilience.toml")]
        file: PathBuf,
        /// Validate and print what would change, without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the stored policies.
    Show {
        /// Print JSON: `{"targets": {"<target>": <policy>, …}}`, the file's shape.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `patchbay resilience` command.
pub async fn run(command: ResilienceCommand, bus: Bus) -> anyhow::Result<()> {
    match command {
        ResilienceCommand::Apply { file, dry_run } => {
            let policy = validate_file(&file).context("policy refused; nothing was changed")?;
            let store = open(&bus).await?;
            let changes = apply(&store, &policy, dry_run).await?;
            for change in &changes {
                println!("{change}");
            }
            let changed = changes
                .iter()
                .filter(|c| c.kind != ChangeKind::Unchanged)
                .count();
            println!(
                "{} {changed} of {} target(s) in {RESILIENCE_BUCKET}{}",
                if dry_run { "would change" } else { "changed" },
                changes.len(),
                if dry_run { " (dry run)" } else { "" }
            );
            Ok(())
        }
        ResilienceCommand::Show { json } => {
            let store = open(&bus).await?;
            let stored = read_all(&store).await?;
            let policy = ResiliencePolicy {
                targets: stored
                    .into_values()
                    .map(|(s, _)| (s.target, s.policy))
                    .collect(),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                print_table(&policy);
            }
            Ok(())
        }
    }
}

/// The `patchbay-resilience` bucket (created by the bootstrap).
pub async fn open(bus: &Bus) -> anyhow::Result<kv::Store> {
    bus.jetstream()
        .get_key_value(RESILIENCE_BUCKET)
        .await
        .with_context(|| {
            format!("failed to open bucket {RESILIENCE_BUCKET} (did `patchbay up` bootstrap it?)")
        })
}

/// What `apply` did (or would do) to one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new target.
    Added,
    /// A target whose policy changed.
    Updated,
    /// A target no longer in the file.
    Removed,
    /// Stored as in the file.
    Unchanged,
}

/// One line of `apply`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// To which target (as written), or the key of an undecodable stored value.
    pub target: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = match self.kind {
            ChangeKind::Added => "+ added    ",
            ChangeKind::Updated => "~ updated  ",
            ChangeKind::Removed => "- removed  ",
            ChangeKind::Unchanged => "  unchanged",
        };
        write!(f, "{sign} {}", self.target)
    }
}

/// Every stored policy by key, with its revision; an undecodable value is reported by key
/// (and replaced or removed by `apply`).
async fn read_all(store: &kv::Store) -> anyhow::Result<BTreeMap<String, (StoredTarget, u64)>> {
    let (all, bad) = read_raw(store).await?;
    for key in bad {
        eprintln!("warning: key {key:?} of {RESILIENCE_BUCKET} does not hold a policy");
    }
    Ok(all)
}

type Raw = (BTreeMap<String, (StoredTarget, u64)>, BTreeMap<String, u64>);

async fn read_raw(store: &kv::Store) -> anyhow::Result<Raw> {
    let keys: Vec<String> = store
        .keys()
        .await
        .context("failed to list resilience policies")?
        .try_collect()
        .await
        .context("failed to list resilience policies")?;
    let mut good = BTreeMap::new();
    let mut bad = BTreeMap::new();
    for key in keys {
        let Some(entry) = store
            .entry(key.as_str())
            .await
            .with_context(|| format!("failed to read policy {key:?}"))?
        else {
            continue;
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        match serde_json::from_slice::<StoredTarget>(&entry.value) {
            Ok(stored) => {
                good.insert(key, (stored, entry.revision));
            }
            Err(_) => {
                bad.insert(key, entry.revision);
            }
        }
    }
    Ok((good, bad))
}

/// Store `policy` (already validated) in `store`: create, CAS-update or delete each key.
/// A concurrent writer makes the CAS fail and the command stop with an error, rather than
/// silently overwrite what someone else just applied.
pub async fn apply(
    store: &kv::Store,
    policy: &ResiliencePolicy,
    dry_run: bool,
) -> anyhow::Result<Vec<Change>> {
    let (current, undecodable) = read_raw(store).await?;
    let mut changes = Vec::new();
    for (target, target_policy) in &policy.targets {
        let key = target.key();
        let stored = StoredTarget {
            target: target.clone(),
            policy: target_policy.clone(),
            origin: PolicyOrigin::File,
        };
        let revision = match (current.get(&key), undecodable.get(&key)) {
            (Some((old, _)), _) if old == &stored => {
                changes.push(change(ChangeKind::Unchanged, target));
                continue;
            }
            (Some((_, r)), _) | (None, Some(r)) => Some(*r),
            (None, None) => None,
        };
        changes.push(change(
            if revision.is_some() {
                ChangeKind::Updated
            } else {
                ChangeKind::Added
            },
            target,
        ));
        if dry_run {
            continue;
        }
        let value = Bytes::from(serde_json::to_vec(&stored)?);
        match revision {
            Some(r) => store.update(key.as_str(), value, r).await.map(|_| ()).with_context(|| {
                format!("failed to update the policy of {target} (changed concurrently? run apply again)")
            })?,
            None => store.create(key.as_str(), value).await.map(|_| ()).with_context(|| {
                format!("failed to create the policy of {target} (created concurrently? run apply again)")
            })?,
        }
    }
    let wanted: Vec<String> = policy.targets.keys().map(Target::key).collect();
    // Policies a function's deploy flags wrote are not the file's to remove.
    let stale = current
        .iter()
        .filter(|(_, (s, _))| s.origin == PolicyOrigin::File)
        .map(|(k, (s, r))| (k, s.target.to_string(), *r))
        .chain(undecodable.iter().map(|(k, r)| (k, k.clone(), *r)))
        .filter(|(k, _, _)| !wanted.contains(k));
    for (key, target, revision) in stale {
        changes.push(Change {
            kind: ChangeKind::Removed,
            target: target.clone(),
        });
        if !dry_run {
            store
                .delete_expect_revision(key.as_str(), Some(revision))
                .await
                .with_context(|| format!("failed to remove the policy of {target}"))?;
        }
    }
    Ok(changes)
}

/// Store the policy `patchbay fn deploy --resilience` gives function `name` (or remove
/// it when `fields` is empty), replacing whatever policy that function had.
pub async fn put_deployed(bus: &Bus, name: &str, fields: &str) -> anyhow::Result<Change> {
    let target = Target::Function(name.to_owned());
    let store = open(bus).await?;
    let key = target.key();
    if fields.trim().is_empty() {
        store
            .delete(key.as_str())
            .await
            .with_context(|| format!("failed to remove the policy of {target}"))?;
        return Ok(change(ChangeKind::Removed, &target));
    }
    let policy = TargetPolicy::from_inline(&target, fields)
        .with_context(|| format!("--resilience for {target}"))?;
    let stored = StoredTarget {
        target: target.clone(),
        policy,
        origin: PolicyOrigin::Deploy,
    };
    store
        .put(key.as_str(), Bytes::from(serde_json::to_vec(&stored)?))
        .await
        .with_context(|| format!("failed to store the policy of {target}"))?;
    Ok(change(ChangeKind::Updated, &target))
}

fn change(kind: ChangeKind, target: &Target) -> Change {
    Change {
        kind,
        target: target.to_string(),
    }
}

fn print_table(policy: &ResiliencePolicy) {
    if policy.targets.is_empty() {
        println!("no resilience policies (apply one with `patchbay resilience apply`)");
        return;
    }
    println!(
        "{:<36} {:>8} {:>8} {:>12} {:<28} {:>11}",
        "TARGET", "TIMEOUT", "ATTEMPTS", "BUDGET", "BREAKER", "CONCURRENCY"
    );
    for (target, p) in &policy.targets {
        println!(
            "{:<36} {:>8} {:>8} {:>12} {:<28} {:>11}",
            target.to_string(),
            humantime::format_duration(p.timeout).to_string(),
            p.retry.max_attempts,
            format!("{:.0}%+{}/s", p.budget.ratio * 100.0, p.budget.min_per_sec),
            breaker_text(p),
            concurrency_text(p),
        );
    }
}

fn breaker_text(p: &TargetPolicy) -> String {
    let b = &p.breaker;
    format!(
        "{}x|{:.0}%/{} open {}",
        b.consecutive_failures,
        b.failure_rate * 100.0,
        humantime::format_duration(b.window),
        humantime::format_duration(b.cool_down)
    )
}

fn concurrency_text(p: &TargetPolicy) -> String {
    match (p.concurrency, p.shed_when_full) {
        (None, _) => "-".to_owned(),
        (Some(n), true) => format!("{n} (shed)"),
        (Some(n), false) => n.to_string(),
    }
}

/// Read and validate a policy file; the error names the file, the target and the field.
pub fn validate_file(path: &std::path::Path) -> anyhow::Result<ResiliencePolicy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    match ResiliencePolicy::from_toml(&text) {
        Ok(p) => Ok(p),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_validates_and_reads_in_a_table() {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/resilience.toml");
        let policy = validate_file(&root).unwrap();
        let lookup = &policy.targets[&"subject:cc.v1.customers.lookup".parse().unwrap()];
        assert_eq!(breaker_text(lookup), "5x|50%/10s open 5s");
        assert_eq!(concurrency_text(lookup), "64 (shed)");
    }

    #[test]
    fn changes_print_with_their_kind() {
        let c = change(ChangeKind::Added, &"function:x".parse().unwrap());
        assert_eq!(c.to_string(), "+ added     function:x");
    }
}
