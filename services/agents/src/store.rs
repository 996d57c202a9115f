//! Persistence of the engine: one compressed snapshot in the `cc-agents` KV bucket, written
//! with revision compare-and-set.
//!
//! Owns the stored format ([`Stored`]: the engine [`Snapshot`] plus, per consumer, which
//! stream sequences are already reflected in it — [`AppliedSeqs`] — and the outbox, the
//! outputs that state decided and that may not be in their streams yet), its encoding (JSON,
//! zlib-compressed with the pure-Rust `miniz_oxide`, because 5,000 agents make ~2.4 MiB of
//! JSON and a NATS message is 1 MiB by default) and the KV key with its fencing
//! ([`SnapshotStore`]). It does not decide *when* to save — the adapter saves after
//! applying every batch, before publishing its outputs or acking it (see
//! [`crate::adapter`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::engine::{Output, Snapshot};

/// The KV key holding the snapshot.
pub const SNAPSHOT_KEY: &str = "engine";

/// Decompressed snapshots larger than this are refused (a corrupt or hostile value must not
/// exhaust memory); 50× the biggest expected snapshot.
const MAX_DECOMPRESSED: usize = 128 * 1024 * 1024;

/// zlib level: 1 is ~10× on this JSON at a fraction of the time of the default level, and
/// the snapshot is written after every batch.
const COMPRESSION_LEVEL: u8 = 1;

/// Room left for the KV headers (`Nats-Expected-Last-Subject-Sequence`, the subject) when
/// comparing a value with the server's max payload.
const HEADER_ALLOWANCE: usize = 512;

/// Result alias of this module.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a snapshot could not be encoded, decoded, loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The snapshot could not be serialised (never expected with these types).
    #[error("cannot serialise the engine snapshot: {0}")]
    Encode(#[source] serde_json::Error),
    /// The stored value is not zlib data.
    #[error("stored snapshot {key:?} is not zlib-compressed data: {reason}")]
    Decompress {
        /// The KV key.
        key: String,
        /// The decoder's reason.
        reason: String,
    },
    /// The stored value is not a snapshot this build can read.
    #[error("stored snapshot {key:?} is not a readable snapshot: {source}")]
    Decode {
        /// The KV key.
        key: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored value was written by an incompatible build.
    #[error(
        "stored snapshot {key:?} has format {found} (engine {engine_found}); this build reads formats {oldest} to {expected} (engine {engine_expected})"
    )]
    Format {
        /// The KV key.
        key: String,
        /// The stored wrapper format.
        found: u32,
        /// The stored engine format.
        engine_found: u32,
        /// The oldest wrapper format this build reads.
        oldest: u32,
        /// The wrapper format this build writes (and the newest it reads).
        expected: u32,
        /// The engine format this build reads.
        engine_expected: u32,
    },
    /// The compressed snapshot does not fit in one NATS message.
    #[error(
        "the engine snapshot is {compressed} bytes compressed ({uncompressed} bytes of JSON), over the server's max_payload of {max_payload} bytes: raise max_payload in the nats-server config (and the cc-agents bucket's max_value_size, if set) or reduce finished_call_retention_ms"
    )]
    TooLarge {
        /// Compressed size.
        compressed: usize,
        /// JSON size.
        uncompressed: usize,
        /// The server's limit.
        max_payload: usize,
    },
    /// Another writer changed the snapshot since this instance last read or wrote it: two
    /// instances are running. This one must stop.
    #[error(
        "snapshot {key:?} in bucket {bucket:?} was written by another instance (expected revision {expected}, found {found:?}): stopping so that only one engine decides"
    )]
    Fenced {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The revision this instance last wrote or read.
        expected: u64,
        /// The revision found, when it could be read.
        found: Option<u64>,
    },
    /// The bucket or key could not be reached.
    #[error("cannot {op} snapshot {key:?} in bucket {bucket:?}: {reason}")]
    Kv {
        /// What was attempted (`open`, `read`, `write`).
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The underlying error.
        reason: String,
    },
}

/// Which stream sequences of one consumer are already reflected in a snapshot.
///
/// A redelivered input whose sequence is here is acked without being applied. Not a single
/// high-water mark: after a crash, inputs that were delivered to the dead instance but never
/// applied come back only after the consumer's `ack_wait`, *after* newer ones — a
/// high-water mark would then skip (lose) them. So: every sequence up to the consumer's
/// ack floor (acked, hence never delivered again) plus the sequences applied above it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSeqs {
    /// Every sequence up to here is applied or was acked (never redelivered).
    pub floor: u64,
    /// Applied sequences above `floor`.
    pub above: BTreeSet<u64>,
}

impl AppliedSeqs {
    /// Whether `seq` is already reflected in the state.
    #[must_use]
    pub fn contains(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    /// Record that `seq` was applied.
    pub fn insert(&mut self, seq: u64) {
        if seq > self.floor {
            self.above.insert(seq);
        }
    }

    /// The consumer's ack floor is `ack_floor`: nothing at or below it is delivered again,
    /// so the sequences below it need not be remembered one by one.
    pub fn advance_floor(&mut self, ack_floor: u64) {
        if ack_floor > self.floor {
            self.floor = ack_floor;
            self.above = self.above.split_off(&(ack_floor + 1));
        }
    }
}

/// What is stored under [`SNAPSHOT_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Wrapper format ([`Stored::FORMAT`]).
    pub format: u32,
    /// When it was written (the engine clock), for operators.
    pub saved_at_ms: u64,
    /// Per consumer (`STREAM/consumer`), the inputs already applied.
    pub applied: BTreeMap<String, AppliedSeqs>,
    /// The outputs decided by the last batch (or tick) reflected in `engine`, in order. They
    /// are written here *before* being published, so some may not be in their streams: a
    /// restored engine publishes them again (de-duplicated by id) before anything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Output>,
    /// The hop chain (`patchbay-hops` value, see [`patchbay_bus::hops`]) each outbox output
    /// is published with, in the outbox's order, so a re-publish after a restart does not
    /// start a loop's chain afresh. Missing entries (a snapshot written before chains were
    /// kept) publish with this service as the whole chain. Builds that do not know the
    /// field ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox_hops: Vec<String>,
    /// The engine state.
    pub engine: Snapshot,
}

impl Stored {
    /// The wrapper format this build writes. 2 added the outbox; a format-1 snapshot (no
    /// outbox: its build published before snapshotting) still reads, with an empty one.
    /// Builds that read only format 1 refuse format 2 rather than drop its outbox.
    pub const FORMAT: u32 = 2;
    /// The oldest wrapper format this build reads.
    pub const OLDEST_READABLE: u32 = 1;

    /// The JSON of this snapshot, zlib-compressed; `(compressed, json length)`.
    pub fn encode(&self) -> Result<(Vec<u8>, usize)> {
        let json = serde_json::to_vec(self).map_err(StoreError::Encode)?;
        let compressed = miniz_oxide::deflate::compress_to_vec_zlib(&json, COMPRESSION_LEVEL);
        Ok((compressed, json.len()))
    }

    /// Read a value written by [`Stored::encode`] (`key` names it in errors).
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let json = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(bytes, MAX_DECOMPRESSED)
            .map_err(|e| StoreError::Decompress {
                key: key.to_owned(),
                reason: e.to_string(),
            })?;
        #[derive(Deserialize)]
        struct Formats {
            format: u32,
            engine: EngineFormat,
        }
        #[derive(Deserialize)]
        struct EngineFormat {
            format: u32,
        }
        // Check the formats first, so an old or newer snapshot is reported as such rather
        // than as whichever field happens not to parse.
        let formats: Formats =
            serde_json::from_slice(&json).map_err(|source| StoreError::Decode {
                key: key.to_owned(),
                source,
            })?;
        if !(Self::OLDEST_READABLE..=Self::FORMAT).contains(&formats.format)
            || formats.engine.format != Snapshot::FORMAT
        {
            return Err(StoreError::Format {
                key: key.to_owned(),
                found: formats.format,
                engine_found: formats.engine.format,
                oldest: Self::OLDEST_READABLE,
                expected: Self::FORMAT,
                engine_expected: Snapshot::FORMAT,
            });
        }
        serde_json::from_slice(&json).map_err(|source| StoreError::Decode {
            key: key.to_owned(),
            source,
        })
    }
}

/// What one save wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// The new revision.
    pub revision: u64,
    /// Compressed bytes written.
    pub compressed: usize,
    /// JSON bytes before compression.
    pub uncompressed: usize,
}

/// The snapshot key of one bucket, with the revision this instance last read or wrote.
///
/// Every write is an update *at that revision*: if anything else wrote in between, the
/// write fails with [`StoreError::Fenced`] and nothing is overwritten.
pub struct SnapshotStore {
    kv: kv::Store,
    bucket: String,
    key: String,
    /// 0: the key did not exist when read (the first write creates it).
    revision: u64,
    max_payload: usize,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl SnapshotStore {
    /// Bind to `bucket` (it must exist: the admin bootstrap creates it).
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        key: &str,
        max_payload: usize,
    ) -> Result<Self> {
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(|e| StoreError::Kv {
                op: "open",
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                reason: format!(
                    "{e} (the bucket is created by the admin bootstrap, `patchbay up` / `patchbay bootstrap`)"
                ),
            })?;
        Ok(Self {
            kv,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            revision: 0,
            max_payload,
        })
    }

    /// The revision last read or written (0: none yet).
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn kv_error(&self, op: &'static str, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Kv {
            op,
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            reason: reason.to_string(),
        }
    }

    /// The stored entry (value and revision), deleted entries read as absent.
    async fn read(&self) -> Result<Option<(u64, Option<Bytes>)>> {
        let entry = self
            .kv
            .entry(self.key.as_str())
            .await
            .map_err(|e| self.kv_error("read", e))?;
        Ok(entry.map(|e| {
            let value = matches!(e.operation, Operation::Put).then_some(e.value);
            (e.revision, value)
        }))
    }

    /// Read the snapshot, remembering its revision for the next [`SnapshotStore::save`].
    pub async fn load(&mut self) -> Result<Option<Stored>> {
        let Some((revision, value)) = self.read().await? else {
            self.revision = 0;
            return Ok(None);
        };
        // A deleted key keeps a revision (its delete marker): the next write goes there.
        self.revision = revision;
        value
            .map(|bytes| Stored::decode(&self.key, &bytes))
            .transpose()
    }

    /// Write `stored` at the remembered revision.
    ///
    /// A write whose outcome is unknown (timeout, lost ack) is checked by reading the key
    /// back: our own bytes there mean it landed; the old revision means it did not (and it
    /// is retried, up to `attempts`); anything else means another writer.
    pub async fn save(&mut self, stored: &Stored, attempts: u32) -> Result<Saved> {
        let (compressed, uncompressed) = stored.encode()?;
        if self.max_payload > 0 && compressed.len() + HEADER_ALLOWANCE > self.max_payload {
            return Err(StoreError::TooLarge {
                compressed: compressed.len(),
                uncompressed,
                max_payload: self.max_payload,
            });
        }
        let value = Bytes::from(compressed);
        let mut last_error = String::new();
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
            }
            match self
                .kv
                .update(self.key.as_str(), value.clone(), self.revision)
                .await
            {
                Ok(revision) => {
                    self.revision = revision;
                    return Ok(Saved {
                        revision,
                        compressed: value.len(),
                        uncompressed,
                    });
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    // Maybe our own earlier attempt landed and only its ack was lost.
                    return match self.read().await? {
                        Some((revision, Some(found))) if found == value => {
                            self.revision = revision;
                            Ok(Saved {
                                revision,
                                compressed: value.len(),
                                uncompressed,
                            })
                        }
                        other => Err(StoreError::Fenced {
                            bucket: self.bucket.clone(),
                            key: self.key.clone(),
                            expected: self.revision,
                            found: other.map(|(r, _)| r),
                        }),
                    };
                }
                Err(e) => {
                    last_error = e.to_string();
                    tracing::warn!(error = %e, attempt, "snapshot write failed; checking what landed");
                    match self.read().await {
                        Ok(Some((revision, Some(found)))) if found == value => {
                            self.revision = revision;
                            return Ok(Saved {
                                revision,
                                compressed: value.len(),
                                uncompressed,
                            });
                        }
                        Ok(Some((revision, _))) if revision != self.revision => {
                            return Err(StoreError::Fenced {
                                bucket: self.bucket.clone(),
                                key: self.key.clone(),
                                expected: self.revision,
                                found: Some(revision),
                            });
                        }
                        // Unchanged (or unreadable right now): try again.
                        _ => {}
                    }
                }
            }
        }
        Err(self.kv_error("write", last_error))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A plain routed call: first in its sequence, no requirements, default rule.
    fn routed(call: &str, queue: &str, at_ms: u64) -> Input {
        Input::Routed(CallRouted {
            call_id: call.into(),
            seq: 1,
            queue: queue.into(),
            priority: 0,
            requirements: Vec::new(),
            relaxation: Vec::new(),
            overflow: Vec::new(),
            channel: Channel::Voice,
            customer_tier: "standard".into(),
            customer_id: None,
            rule: "default".into(),
            lookup_ok: true,
            routed_at_ms: at_ms,
        })
    }
    use crate::engine::{Engine, EngineConfig, Input};
    use patchbay_protocol::payload::{
        AgentProfile, AgentSkill, AgentState, CallRouted, Channel, QueueMembership, SetAgentState,
    };

    fn busy_engine(agents: usize, calls: usize) -> Engine {
        let mut engine = Engine::new(EngineConfig::default());
        let mut now = 1_000;
        for a in 0..agents {
            now += 1;
            let profile = AgentProfile {
                skills: vec![AgentSkill {
                    skill: format!("skill-{}", a % 40),
                    level: 5,
                }],
                queues: (0..4)
                    .map(|q| QueueMembership {
                        queue: format!("queue-{}", (a + q * 7) % 200),
                        priority: 1 + u32::try_from(q % 2).unwrap(),
                        delay_secs: 0,
                    })
                    .collect(),
                capacity: BTreeMap::new(),
            };
            engine
                .apply(
                    now,
                    Input::SetState(SetAgentState {
                        agent_id: format!("agent-{a}"),
                        state: AgentState::Available,
                        profile: Some(profile),
                    }),
                )
                .unwrap();
        }
        for c in 0..calls {
            now += 1;
            engine
                .apply(
                    now,
                    routed(&format!("call-{c}"), &format!("queue-{}", c % 200), now),
                )
                .unwrap();
        }
        engine
    }

    fn stored(engine: &Engine) -> Stored {
        let mut applied = BTreeMap::new();
        let mut seqs = AppliedSeqs::default();
        seqs.insert(7);
        seqs.insert(9);
        applied.insert("CC_CALLS/agents".to_owned(), seqs);
        Stored {
            format: Stored::FORMAT,
            saved_at_ms: 42,
            applied,
            outbox: Vec::new(),
            outbox_hops: Vec::new(),
            engine: engine.snapshot(),
        }
    }

    #[test]
    fn a_snapshot_survives_encoding_and_decoding() {
        let engine = busy_engine(50, 80);
        let original = stored(&engine);
        let (bytes, json_len) = original.encode().unwrap();
        assert!(bytes.len() < json_len, "compression made it bigger");
        assert_eq!(Stored::decode("engine", &bytes).unwrap(), original);
    }

    #[test]
    fn the_outbox_survives_encoding_in_order() {
        let mut engine = busy_engine(0, 0);
        let profile = AgentProfile {
            skills: Vec::new(),
            queues: Vec::new(),
            capacity: BTreeMap::new(),
        };
        let mut outbox = engine
            .apply(
                5_000,
                Input::SetState(SetAgentState {
                    agent_id: "a-1".into(),
                    state: AgentState::Available,
                    profile: Some(profile),
                }),
            )
            .unwrap()
            .outputs;
        outbox.extend(
            engine
                .apply(5_001, routed("c-1", "sales", 5_001))
                .unwrap()
                .outputs,
        );
        // state-changed, queued, offered, state-changed (reserved).
        assert_eq!(outbox.len(), 4, "{outbox:?}");
        let mut original = stored(&engine);
        original.outbox = outbox;
        original.outbox_hops = ["fn/a,service/agents", "service/agents"]
            .iter()
            .cycle()
            .take(4)
            .map(|s| (*s).to_owned())
            .collect();
        let (bytes, _) = original.encode().unwrap();
        let decoded = Stored::decode("engine", &bytes).unwrap();
        assert_eq!(decoded.outbox, original.outbox);
        assert_eq!(decoded.outbox_hops, original.outbox_hops);
        assert_eq!(
            decoded.outbox.iter().map(Output::id).collect::<Vec<_>>(),
            ["agent-a-1-1", "call-c-1-2", "call-c-1-3", "agent-a-1-2"]
        );
    }

    #[test]
    fn a_format_1_snapshot_still_reads_with_an_empty_outbox() {
        let mut old = serde_json::to_value(stored(&busy_engine(3, 2))).unwrap();
        old["format"] = serde_json::json!(1);
        assert!(
            old.get("outbox").is_none(),
            "an empty outbox is not written"
        );
        let bytes = miniz_oxide::deflate::compress_to_vec_zlib(old.to_string().as_bytes(), 1);
        let decoded = Stored::decode("engine", &bytes).unwrap();
        assert_eq!((decoded.format, decoded.outbox.len()), (1, 0));
        assert!(decoded.outbox_hops.is_empty());
    }

    #[test]
    fn five_thousand_agents_fit_in_one_nats_message_once_compressed() {
        let engine = busy_engine(5_000, 6_000);
        let (bytes, json_len) = stored(&engine).encode().unwrap();
        assert!(
            json_len > 1024 * 1024,
            "the JSON alone ({json_len}) would fit"
        );
        assert!(
            bytes.len() + HEADER_ALLOWANCE < 1024 * 1024,
            "{} compressed bytes do not fit in 1 MiB",
            bytes.len()
        );
    }

    #[test]
    fn garbage_and_other_formats_are_refused_with_a_reason() {
        assert!(matches!(
            Stored::decode("engine", b"not zlib"),
            Err(StoreError::Decompress { .. })
        ));
        let json = miniz_oxide::deflate::compress_to_vec_zlib(b"{\"x\":1}", 1);
        assert!(matches!(
            Stored::decode("engine", &json),
            Err(StoreError::Decode { .. })
        ));
        let mut newer = serde_json::to_value(stored(&busy_engine(1, 1))).unwrap();
        newer["format"] = serde_json::json!(99);
        let bytes = miniz_oxide::deflate::compress_to_vec_zlib(newer.to_string().as_bytes(), 1);
        assert!(matches!(
            Stored::decode("engine", &bytes),
            Err(StoreError::Format { found: 99, .. })
        ));
    }

    #[test]
    fn applied_sequences_are_remembered_above_the_ack_floor_only() {
        let mut seqs = AppliedSeqs::default();
        for s in [3, 5, 6, 10] {
            seqs.insert(s);
        }
        assert!(seqs.contains(5));
        // 4 was delivered to a crashed instance and never applied: it must come through.
        assert!(!seqs.contains(4));
        seqs.advance_floor(6);
        assert_eq!(seqs.above, BTreeSet::from([10]));
        assert!(seqs.contains(4) && seqs.contains(6) && seqs.contains(10));
        assert!(!seqs.contains(7));
        seqs.advance_floor(2);
        assert_eq!(seqs.floor, 6, "the floor never moves back");
        seqs.insert(1);
        assert_eq!(seqs.above, BTreeSet::from([10]));
    }
}
