//! `recording-index`: indexes finished call recordings.
//!
//! Trigger: `cc.v1.recordings.<call>.completed` (stream CC_RECORDINGS), JSON data:
//!
//! ```json
//! { "call_id": "c-42", "url": "https://rec.example/c-42.ogg", "duration_ms": 183000,
//!   "agent": "a-7", "queue": "billing", "started_at_ms": 1767225600000,
//!   "media_type": "audio/ogg" }
//! ```
//!
//! (`agent`, `queue`, `started_at_ms`, `media_type` are optional.) It stores an index
//! entry under `call-<call id>` in its kv bucket and emits
//! `cc.v1.recordings.<call>.indexed` (type `cc.recording.indexed.v1`) with the entry and
//! its kv revision. Publish allow-list: `cc.v1.recordings.*.indexed`.
//!
//! Malformed JSON, or an empty `call_id`/`url`, goes to the dead-letter stream with the
//! reason. A redelivered event rewrites the same entry and emits an output with the same
//! id, so JetStream de-duplicates it.
//!
//! Payload types are local serde structs until `services/protocol` offers them.

use patchbay_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// `cc.v1.recordings.<call>.completed` data.
#[derive(Debug, Deserialize)]
struct RecordingCompleted {
    call_id: String,
    url: String,
    duration_ms: u64,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    started_at_ms: Option<u64>,
    #[serde(default)]
    media_type: Option<String>,
}

/// What the index keeps per call (the kv value).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct IndexEntry {
    call_id: String,
    url: String,
    duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    /// The event the entry came from, to trace an entry back to its source.
    source_event: String,
}

/// `cc.v1.recordings.<call>.indexed` data.
#[derive(Debug, Serialize)]
struct Indexed<'a> {
    #[serde(flatten)]
    entry: &'a IndexEntry,
    key: &'a str,
    revision: u64,
}

/// The kv key of a call's entry.
fn entry_key(call_id: &str) -> String {
    format!("call-{}", kv::key_token(call_id))
}

/// Validates the completed-recording data and turns it into an index entry.
fn entry_from(e: &Event) -> Result<IndexEntry, Failure> {
    let rec: RecordingCompleted = e.json()?;
    if rec.call_id.trim().is_empty() {
        return Err(Failure::dead_letter("recording without call_id"));
    }
    if rec.url.trim().is_empty() {
        return Err(Failure::dead_letter(format!(
            "recording of call {} without url",
            rec.call_id
        )));
    }
    Ok(IndexEntry {
        call_id: rec.call_id,
        url: rec.url,
        duration_ms: rec.duration_ms,
        agent: rec.agent,
        queue: rec.queue,
        started_at_ms: rec.started_at_ms,
        media_type: rec.media_type,
        source_event: e.id.clone(),
    })
}

struct RecordingIndex;

impl Handler for RecordingIndex {
    fn handle(e: Event) -> Result<Vec<Event>, Failure> {
        let entry = entry_from(&e)?;
        let key = entry_key(&entry.call_id);
        let revision = kv::set_json(&key, &entry)?;
        info!("indexed recording of call {} as {key}", entry.call_id);
        let out = Event::new(e.sibling_subject("indexed"), "cc.recording.indexed.v1")
            .follows(&e)
            .with_json(&Indexed {
                entry: &entry,
                key: &key,
                revision,
            })?;
        Ok(vec![out])
    }
}

patchbay_sdk::export!(RecordingIndex);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn completed(data: &str) -> Event {
        Event::new(
            "cc.v1.recordings.c-42.completed",
            "cc.recording.completed.v1",
        )
        .with_id("rec-1")
        .with_data(data.as_bytes().to_vec(), "application/json")
    }

    #[test]
    fn builds_an_entry_from_complete_data() {
        let e = completed(
            r#"{"call_id":"c-42","url":"https://r/c-42.ogg","duration_ms":1000,"agent":"a-7"}"#,
        );
        let entry = entry_from(&e).unwrap();
        assert_eq!(entry.call_id, "c-42");
        assert_eq!(entry.agent.as_deref(), Some("a-7"));
        assert_eq!(entry.source_event, "rec-1");
        assert_eq!(entry_key(&entry.call_id), "call-c-42");
    }

    #[test]
    fn malformed_json_is_dead_lettered_with_the_parse_error() {
        let failure = entry_from(&completed("{\"call_id\": 42")).unwrap_err();
        assert!(matches!(failure, Failure::DeadLetter(_)));
        assert!(
            failure.reason().contains("malformed JSON"),
            "{}",
            failure.reason()
        );
    }

    #[test]
    fn missing_url_is_dead_lettered() {
        let failure = entry_from(&completed(
            r#"{"call_id":"c-42","url":" ","duration_ms":1}"#,
        ))
        .unwrap_err();
        assert!(matches!(failure, Failure::DeadLetter(_)));
        assert!(failure.reason().contains("without url"));
    }

    #[test]
    fn keys_are_valid_tokens_even_for_odd_call_ids() {
        assert_eq!(entry_key("c.42/x"), "call-c_42_x");
    }
}
