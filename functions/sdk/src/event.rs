//! Builders and readers on [`Event`], the CloudEvents-shaped record of the WIT.
//!
//! Reading a payload fails with a [`Failure::DeadLetter`] that says what was wrong, so a
//! handler can write `let order: Order = e.json()?;` and malformed input is parked with a
//! reason instead of retried forever.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Event, Failure};

/// CloudEvents extension that carries the interaction key (e.g. the call id).
pub const PARTITION_KEY: &str = "partitionkey";

const JSON: &str = "application/json";

impl Event {
    /// A new event for `subject` of CloudEvents type `ty`, with no data.
    ///
    /// `id` and `source` start empty: the runtime fills in what an output leaves empty
    /// (see `DESIGN.md`, Functions). Use [`Event::follows`] to derive a deterministic id
    /// from the input, so a retried input yields the same output ids (JetStream
    /// de-duplicates on them).
    #[must_use]
    pub fn new(subject: impl Into<String>, ty: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            source: String::new(),
            type_: ty.into(),
            subject: subject.into(),
            time: None,
            content_type: None,
            data: Vec::new(),
            extensions: Vec::new(),
        }
    }

    /// Marks this event as caused by `input`: copies the input's `partitionkey` (so the
    /// interaction stays on one key) and, if no id is set yet, sets the id to
    /// `<input id>.<this event's type>` — deterministic, so a redelivered input produces
    /// the same output id. Set distinct ids yourself when one input yields several
    /// outputs of the same type.
    #[must_use]
    pub fn follows(mut self, input: &Event) -> Self {
        if let Some(key) = input.partition_key()
            && self.partition_key().is_none()
        {
            self.extensions.push((PARTITION_KEY.into(), key.into()));
        }
        if self.id.is_empty() {
            self.id = format!("{}.{}", input.id, self.type_);
        }
        self
    }

    /// Sets the id (`ce-id`).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the source (`ce-source`).
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the event time (`ce-time`) in milliseconds since the Unix epoch.
    #[must_use]
    pub fn with_time(mut self, unix_ms: u64) -> Self {
        self.time = Some(unix_ms);
        self
    }

    /// Sets the extension `name` (lower case, per CloudEvents) to `value`, replacing an
    /// earlier value.
    #[must_use]
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        let value = value.into();
        match self.extensions.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.extensions.push((name, value)),
        }
        self
    }

    /// Sets the `partitionkey` extension (the interaction key, e.g. a call id).
    #[must_use]
    pub fn with_partition_key(self, key: impl Into<String>) -> Self {
        self.with_extension(PARTITION_KEY, key)
    }

    /// Sets raw data and its content type.
    #[must_use]
    pub fn with_data(mut self, data: impl Into<Vec<u8>>, content_type: impl Into<String>) -> Self {
        self.data = data.into();
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets UTF-8 text data (`text/plain; charset=utf-8`).
    #[must_use]
    pub fn with_text(self, text: impl Into<String>) -> Self {
        self.with_data(text.into().into_bytes(), "text/plain; charset=utf-8")
    }

    /// Sets `value` serialised as JSON (`application/json`).
    ///
    /// Fails (as dead-letter: a bug, not a transient condition) only when `value` cannot
    /// be represented in JSON, e.g. a map with non-string keys.
    pub fn with_json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, Failure> {
        self.data = serde_json::to_vec(value).map_err(|err| {
            Failure::dead_letter(format!("cannot encode {} event as JSON: {err}", self.type_))
        })?;
        self.content_type = Some(JSON.into());
        Ok(self)
    }

    /// The data parsed as JSON into `T`; malformed data is a dead-letter failure naming
    /// the event and the parse error.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_slice(&self.data).map_err(|err| {
            Failure::dead_letter(format!(
                "malformed JSON in {} event {:?}: {err}",
                self.type_, self.id
            ))
        })
    }

    /// The data as UTF-8 text; invalid UTF-8 is a dead-letter failure.
    pub fn text(&self) -> Result<&str, Failure> {
        std::str::from_utf8(&self.data).map_err(|err| {
            Failure::dead_letter(format!(
                "data of {} event {:?} is not UTF-8: {err}",
                self.type_, self.id
            ))
        })
    }

    /// The value of extension `name`, if present.
    #[must_use]
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `partitionkey` extension (the interaction key), if present.
    #[must_use]
    pub fn partition_key(&self) -> Option<&str> {
        self.extension(PARTITION_KEY)
    }

    /// Token `index` of the subject counted from the end (0 = last), e.g. for
    /// `cc.v1.calls.c-42.ended`, `subject_token_from_end(1)` is `Some("c-42")`. Counting
    /// from the end ignores any installation prefix in front of the subject.
    #[must_use]
    pub fn subject_token_from_end(&self, index: usize) -> Option<&str> {
        self.subject.rsplit('.').nth(index)
    }

    /// The subject without its last `n` tokens, e.g. `subject_head(3)` of
    /// `acme.cc.v1.calls.c-42.ended` is `acme.cc.v1`; empty when there are not more than
    /// `n` tokens. Lets an output subject keep the installation prefix.
    #[must_use]
    pub fn subject_head(&self, n: usize) -> &str {
        let mut head = self.subject.as_str();
        for _ in 0..n {
            match head.rsplit_once('.') {
                Some((rest, _)) => head = rest,
                None => return "",
            }
        }
        head
    }

    /// The subject with its last token replaced by `last`, e.g. `cc.v1.calls.c-42.ended`
    /// → `cc.v1.calls.c-42.<last>` — derives an output subject that keeps any prefix.
    #[must_use]
    pub fn sibling_subject(&self, last: &str) -> String {
        match self.subject.rsplit_once('.') {
            Some((head, _)) => format!("{head}.{last}"),
            None => last.to_string(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn input() -> Event {
        Event::new("cc.v1.calls.c-42.ended", "cc.call.ended.v1")
            .with_id("evt-1")
            .with_partition_key("c-42")
    }

    #[test]
    fn follows_copies_partition_key_and_derives_a_deterministic_id() {
        let out = Event::new("out", "cc.survey.scheduled.v1").follows(&input());
        assert_eq!(out.partition_key(), Some("c-42"));
        assert_eq!(out.id, "evt-1.cc.survey.scheduled.v1");
    }

    #[test]
    fn follows_keeps_an_explicit_id() {
        let out = Event::new("out", "t").with_id("mine").follows(&input());
        assert_eq!(out.id, "mine");
    }

    #[test]
    fn with_extension_replaces_an_existing_value() {
        let e = input().with_partition_key("c-43");
        assert_eq!(e.partition_key(), Some("c-43"));
        assert_eq!(e.extensions.len(), 1);
    }

    #[test]
    fn json_round_trips_and_sets_content_type() {
        let e = Event::new("s", "t").with_json(&vec![1, 2, 3]).unwrap();
        assert_eq!(e.content_type.as_deref(), Some("application/json"));
        assert_eq!(e.json::<Vec<u32>>().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn malformed_json_is_a_dead_letter_naming_the_event() {
        let e = input().with_text("{not json");
        match e.json::<serde_json::Value>() {
            Err(Failure::DeadLetter(reason)) => {
                assert!(reason.contains("malformed JSON"), "{reason}");
                assert!(reason.contains("evt-1"), "{reason}");
            }
            other => panic!("expected dead-letter, got {other:?}"),
        }
    }

    #[test]
    fn invalid_utf8_text_is_a_dead_letter() {
        let e = Event::new("s", "t").with_data(vec![0xff, 0xfe], "text/plain");
        assert!(matches!(e.text(), Err(Failure::DeadLetter(_))));
    }

    #[test]
    fn subject_tokens_count_from_the_end() {
        let e = Event::new("prefix.cc.v1.calls.c-42.ended", "t");
        assert_eq!(e.subject_token_from_end(0), Some("ended"));
        assert_eq!(e.subject_token_from_end(1), Some("c-42"));
        assert_eq!(e.subject_token_from_end(9), None);
    }

    #[test]
    fn subject_head_drops_tokens_from_the_end() {
        let e = Event::new("acme.cc.v1.calls.c-42.ended", "t");
        assert_eq!(e.subject_head(3), "acme.cc.v1");
        assert_eq!(e.subject_head(0), "acme.cc.v1.calls.c-42.ended");
        assert_eq!(e.subject_head(6), "");
    }

    #[test]
    fn sibling_subject_replaces_only_the_last_token() {
        let e = Event::new("prefix.cc.v1.recordings.c-42.completed", "t");
        assert_eq!(
            e.sibling_subject("indexed"),
            "prefix.cc.v1.recordings.c-42.indexed"
        );
        assert_eq!(Event::new("single", "t").sibling_subject("x"), "x");
    }
}
