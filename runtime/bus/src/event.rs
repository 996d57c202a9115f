//! CloudEvents 1.0 on NATS.
//!
//! Binary content mode, as in the CloudEvents NATS protocol binding: each attribute is a
//! `ce-` header (`ce-id`, `ce-source`, `ce-type`, `ce-specversion`, `ce-time`, …),
//! `Content-Type` carries `datacontenttype`, and the message body is the event data.
//! A message whose `Content-Type` is `application/cloudevents+json` is read as structured
//! mode (the whole event as JSON). Validation explains exactly what is wrong, so a
//! malformed message can be dead-lettered or answered with a reason.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value};
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The only CloudEvents version this crate speaks.
pub const SPEC_VERSION: &str = "1.0";
/// Media type that marks a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Header carrying `datacontenttype` in binary mode.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// The extension attribute carrying the interaction key (call id, agent id…).
pub const PARTITION_KEY: &str = "partitionkey";

const CE_PREFIX: &str = "ce-";
/// Longest attribute value accepted, in bytes. CloudEvents sets no limit, but every
/// attribute travels as a header (and ids end up in the stream's de-duplication window),
/// so an unbounded one is refused up front as a permanent, named error.
pub const MAX_ATTRIBUTE_LEN: usize = 4096;

/// Attributes with their own struct field; everything else `ce-*` is an extension.
const CORE_ATTRIBUTES: [&str; 8] = [
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "datacontenttype",
    "dataschema",
    "subject",
];

/// Why a message is not a valid CloudEvent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The message has no headers at all and is not structured mode.
    #[error("not a CloudEvent: no ce-* headers and no {STRUCTURED_CONTENT_TYPE} body")]
    NotACloudEvent,
    /// The message's header block could not be read in full (invalid UTF-8, a line
    /// without a colon…); the client kept the connection and marked the message.
    #[error("malformed NATS headers: {reason}")]
    MalformedHeaders {
        /// What the client's parser found wrong.
        reason: String,
    },
    /// A required attribute is absent or empty.
    #[error("missing required CloudEvents attribute {attribute:?}")]
    MissingAttribute {
        /// The attribute name (without `ce-`).
        attribute: &'static str,
    },
    /// An attribute is present but malformed.
    #[error("invalid CloudEvents attribute {attribute:?}: {reason}")]
    InvalidAttribute {
        /// The attribute name (without `ce-`).
        attribute: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `specversion` is not 1.0.
    #[error("unsupported CloudEvents specversion {found:?} (expected {SPEC_VERSION})")]
    UnsupportedSpecVersion {
        /// The version found.
        found: String,
    },
    /// A structured-mode body is not a CloudEvents JSON object.
    #[error("invalid structured CloudEvent: {reason}")]
    InvalidStructured {
        /// What is wrong with it.
        reason: String,
    },
}

/// Result alias for event decoding.
pub type Result<T, E = EventError> = std::result::Result<T, E>;

/// One CloudEvents 1.0 event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// `id`: unique within `source`; doubles as the JetStream `Nats-Msg-Id`.
    pub id: String,
    /// `source`: URI reference of the producer, e.g. `/patchbay/gateway`.
    pub source: String,
    /// `type`: reverse-DNS event type, e.g. `cc.call.incoming.v1`.
    pub ty: String,
    /// `time`: when the occurrence happened.
    pub time: Option<OffsetDateTime>,
    /// `datacontenttype`: media type of `data`.
    pub data_content_type: Option<String>,
    /// `dataschema`: URI of the schema `data` adheres to.
    pub data_schema: Option<String>,
    /// `subject`: the CloudEvents subject attribute (not the NATS subject).
    pub subject: Option<String>,
    /// Extension attributes by lower-case name, e.g. `partitionkey`.
    pub extensions: BTreeMap<String, String>,
    /// The event payload.
    pub data: Bytes,
}

impl CloudEvent {
    /// A new event from `source` of type `ty`, with a fresh time-ordered id and `time` now.
    #[must_use]
    pub fn new(source: impl Into<String>, ty: impl Into<String>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            source: source.into(),
            ty: ty.into(),
            time: Some(OffsetDateTime::now_utc()),
            data_content_type: None,
            data_schema: None,
            subject: None,
            extensions: BTreeMap::new(),
            data: Bytes::new(),
        }
    }

    /// Set the id.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Set raw data with its media type.
    #[must_use]
    pub fn data(mut self, content_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        self.data_content_type = Some(content_type.into());
        self.data = data.into();
        self
    }

    /// Set JSON data (`application/json`).
    pub fn json<T: serde::Serialize>(self, value: &T) -> serde_json::Result<Self> {
        Ok(self.data("application/json", serde_json::to_vec(value)?))
    }

    /// Set an extension attribute (names are lower-case letters and digits).
    #[must_use]
    pub fn extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// Set the interaction key (the `partitionkey` extension).
    #[must_use]
    pub fn partition_key(self, key: impl Into<String>) -> Self {
        self.extension(PARTITION_KEY, key)
    }

    /// The interaction key, if any.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.extensions.get(PARTITION_KEY).map(String::as_str)
    }

    /// Parse `data` as JSON.
    pub fn data_json<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.data)
    }

    /// Check every attribute against the CloudEvents rules and what a NATS header can
    /// carry, so that nothing built from a valid event can fail (or panic) later.
    ///
    /// This is the one gate: decoding (both modes), publishing, requesting and every
    /// producer of outputs (functions, services, the gateway) call it before a header is
    /// built. `id`, `source` and `type` must be non-empty; every value is at most
    /// [`MAX_ATTRIBUTE_LEN`] bytes and has no control characters (a CR or LF would end
    /// the header line; the CloudEvents type system has no use for the rest).
    pub fn validate(&self) -> Result<()> {
        let required = [
            ("id", self.id.as_str()),
            ("source", self.source.as_str()),
            ("type", self.ty.as_str()),
        ];
        for (attribute, value) in required {
            if value.is_empty() {
                return Err(EventError::MissingAttribute { attribute });
            }
            validate_value(attribute, value)?;
        }
        let optional = [
            ("datacontenttype", &self.data_content_type),
            ("dataschema", &self.data_schema),
            ("subject", &self.subject),
        ];
        for (attribute, value) in optional {
            if let Some(value) = value {
                // CloudEvents: present means a non-empty string (a media type, a URI).
                if value.is_empty() {
                    return Err(EventError::InvalidAttribute {
                        attribute: attribute.to_owned(),
                        reason: "must not be empty when present".into(),
                    });
                }
                validate_value(attribute, value)?;
            }
        }
        for (name, value) in &self.extensions {
            validate_extension_name(name)?;
            validate_value(name, value)?;
        }
        Ok(())
    }

    /// The JetStream `Nats-Msg-Id` under which this event is stored: unique by
    /// construction, because CloudEvents ids are unique only within their `source`.
    /// Two producers that happen to pick the same id never de-duplicate each other,
    /// while a retried publish of the same event (same source, same id) is stored once.
    #[must_use]
    pub fn dedup_id(&self) -> String {
        dedup_id("event", &[self.source.as_bytes(), self.id.as_bytes()])
    }

    /// The `Nats-Msg-Id` of the `index`th output that `producer` (a function name, a
    /// service) made from handling this event: unique per (producer, input, position), so
    /// two functions triggered by the same input never drop each other's outputs, while a
    /// redelivered input stores each of its outputs once. The producer is the stable
    /// identity (the function's name, not its version), so a redelivery that a canary
    /// split sends to another version is still recognised.
    #[must_use]
    pub fn output_dedup_id(&self, producer: &str, index: usize) -> String {
        let index = index.to_string();
        dedup_id(
            "output",
            &[
                producer.as_bytes(),
                self.source.as_bytes(),
                self.id.as_bytes(),
                index.as_bytes(),
            ],
        )
    }

    /// Write the event as binary-mode headers into `headers` (the body is [`Self::data`]).
    ///
    /// Meant for a [validated](Self::validate) event. It never panics on one that is not:
    /// a value the header encoding cannot carry has its line breaks replaced and an
    /// extension name that is not a header name is left out, so a bug upstream costs a
    /// mangled attribute, not the process.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        put(headers, "ce-specversion", SPEC_VERSION);
        put(headers, "ce-id", &self.id);
        put(headers, "ce-source", &self.source);
        put(headers, "ce-type", &self.ty);
        if let Some(time) = self.time.and_then(|t| t.format(&Rfc3339).ok()) {
            put(headers, "ce-time", &time);
        }
        if let Some(ct) = &self.data_content_type {
            put(headers, CONTENT_TYPE_HEADER, ct);
        }
        if let Some(schema) = &self.data_schema {
            put(headers, "ce-dataschema", schema);
        }
        if let Some(subject) = &self.subject {
            put(headers, "ce-subject", subject);
        }
        for (name, value) in &self.extensions {
            put(headers, &format!("{CE_PREFIX}{name}"), value);
        }
    }

    /// Binary-mode headers for this event.
    #[must_use]
    pub fn to_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.write_headers(&mut headers);
        headers
    }

    /// Read an event from a NATS message's headers and body, in either content mode.
    pub fn from_message(headers: Option<&HeaderMap>, payload: &Bytes) -> Result<Self> {
        if let Some(reason) = headers.and_then(|h| h.get(async_nats::connection::MALFORMED_HEADERS))
        {
            return Err(EventError::MalformedHeaders {
                reason: reason.as_str().to_owned(),
            });
        }
        let attrs = headers.map(lowercase_headers).unwrap_or_default();
        let content_type = attrs.get("content-type").map(String::as_str);
        if content_type.is_some_and(|ct| media_type(ct) == STRUCTURED_CONTENT_TYPE) {
            return Self::from_structured(payload);
        }
        if !attrs.keys().any(|k| k.starts_with(CE_PREFIX)) {
            return Err(EventError::NotACloudEvent);
        }
        let required = |attribute: &'static str| {
            attrs
                .get(&format!("{CE_PREFIX}{attribute}"))
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or(EventError::MissingAttribute { attribute })
        };
        let spec = required("specversion")?;
        if spec != SPEC_VERSION {
            return Err(EventError::UnsupportedSpecVersion { found: spec });
        }
        let optional = |attribute: &str| attrs.get(&format!("{CE_PREFIX}{attribute}")).cloned();
        let mut extensions = BTreeMap::new();
        for (name, value) in &attrs {
            if let Some(attr) = name.strip_prefix(CE_PREFIX)
                && !CORE_ATTRIBUTES.contains(&attr)
            {
                extensions.insert(attr.to_owned(), value.clone());
            }
        }
        let event = Self {
            id: required("id")?,
            source: required("source")?,
            ty: required("type")?,
            time: optional("time").map(|t| parse_time(&t)).transpose()?,
            // An empty header says nothing: no media type.
            data_content_type: content_type.filter(|ct| !ct.is_empty()).map(str::to_owned),
            data_schema: optional("dataschema"),
            subject: optional("subject"),
            extensions,
            data: payload.clone(),
        };
        event.validate()?;
        Ok(event)
    }

    /// Read a structured-mode event (the whole event as a JSON object).
    pub fn from_structured(body: &[u8]) -> Result<Self> {
        let invalid = |reason: String| EventError::InvalidStructured { reason };
        let value: Value =
            serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(invalid("not a JSON object".into()));
        };
        let mut take_string = |name: &str| -> Result<Option<String>> {
            match obj.remove(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(EventError::InvalidAttribute {
                    attribute: name.to_owned(),
                    reason: "must be a string".into(),
                }),
            }
        };
        let spec = take_string("specversion")?.ok_or(EventError::MissingAttribute {
            attribute: "specversion",
        })?;
        if spec != SPEC_VERSION {
            return Err(EventError::UnsupportedSpecVersion { found: spec });
        }
        let id = take_string("id")?.unwrap_or_default();
        let source = take_string("source")?.unwrap_or_default();
        let ty = take_string("type")?.unwrap_or_default();
        let time = take_string("time")?.map(|t| parse_time(&t)).transpose()?;
        let data_content_type = take_string("datacontenttype")?;
        let data_schema = take_string("dataschema")?;
        let subject = take_string("subject")?;
        let data = match (obj.remove("data"), obj.remove("data_base64")) {
            (Some(_), Some(_)) => {
                return Err(invalid("both data and data_base64 are present".into()));
            }
            (_, Some(Value::String(b64))) => Bytes::from(
                decode_base64(&b64)
                    .ok_or_else(|| invalid("data_base64 is not valid base64".into()))?,
            ),
            (_, Some(_)) => return Err(invalid("data_base64 must be a string".into())),
            (Some(Value::String(s)), None) if !is_json(data_content_type.as_deref()) => {
                Bytes::from(s)
            }
            (Some(v), None) => Bytes::from(v.to_string()),
            (None, None) => Bytes::new(),
        };
        let mut extensions = BTreeMap::new();
        for (name, value) in obj {
            let value = match value {
                Value::String(s) => s,
                Value::Bool(_) | Value::Number(_) => value.to_string(),
                _ => {
                    return Err(EventError::InvalidAttribute {
                        attribute: name,
                        reason: "extension values must be strings, numbers or booleans".into(),
                    });
                }
            };
            extensions.insert(name, value);
        }
        let event = Self {
            id,
            source,
            ty,
            time,
            data_content_type,
            data_schema,
            subject,
            extensions,
            data,
        };
        event.validate()?;
        Ok(event)
    }

    /// The event in structured mode (`application/cloudevents+json`).
    #[must_use]
    pub fn to_structured(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("specversion".into(), SPEC_VERSION.into());
        obj.insert("id".into(), self.id.clone().into());
        obj.insert("source".into(), self.source.clone().into());
        obj.insert("type".into(), self.ty.clone().into());
        if let Some(time) = self.time.and_then(|t| t.format(&Rfc3339).ok()) {
            obj.insert("time".into(), time.into());
        }
        let optional = [
            ("datacontenttype", &self.data_content_type),
            ("dataschema", &self.data_schema),
            ("subject", &self.subject),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                obj.insert(name.into(), v.clone().into());
            }
        }
        for (name, value) in &self.extensions {
            obj.insert(name.clone(), value.clone().into());
        }
        if !self.data.is_empty() {
            let json = is_json(self.data_content_type.as_deref())
                .then(|| serde_json::from_slice::<Value>(&self.data).ok())
                .flatten();
            match (json, std::str::from_utf8(&self.data)) {
                (Some(v), _) => obj.insert("data".into(), v),
                (None, Ok(text)) if !is_json(self.data_content_type.as_deref()) => {
                    obj.insert("data".into(), text.into())
                }
                _ => obj.insert("data_base64".into(), encode_base64(&self.data).into()),
            };
        }
        Value::Object(obj)
    }

    /// `time` in milliseconds since the Unix epoch.
    #[must_use]
    pub fn time_millis(&self) -> Option<u64> {
        self.time
            .and_then(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
    }

    /// Set `time` from milliseconds since the Unix epoch (ignored when out of range).
    #[must_use]
    pub fn with_time_millis(mut self, millis: Option<u64>) -> Self {
        self.time = millis.and_then(|ms| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        });
        self
    }
}

/// Insert one header without any of async-nats' panicking conversions.
fn put(headers: &mut HeaderMap, name: &str, value: &str) {
    use async_nats::header::{HeaderName, HeaderValue};
    use std::str::FromStr as _;
    let Ok(name) = HeaderName::from_str(name) else {
        return;
    };
    let value = HeaderValue::from_str(value)
        .unwrap_or_else(|_| HeaderValue::from(value.replace(['\r', '\n'], " ").as_str()));
    headers.insert(name, value);
}

/// A de-duplication id: a kind tag and a hash of length-prefixed parts (so no choice of
/// parts can collide with another by shifting a separator), short and header-safe
/// whatever the parts contain.
fn dedup_id(kind: &str, parts: &[&[u8]]) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    format!("{kind}-{}", hex::encode(&digest[..16]))
}

fn validate_value(attribute: &str, value: &str) -> Result<()> {
    let invalid = |reason: String| EventError::InvalidAttribute {
        attribute: attribute.to_owned(),
        reason,
    };
    if value.len() > MAX_ATTRIBUTE_LEN {
        return Err(invalid(format!(
            "{} bytes, more than the {MAX_ATTRIBUTE_LEN} allowed",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "contains the control character {:?}; attribute values travel as header lines",
            c
        )));
    }
    Ok(())
}

fn validate_extension_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(EventError::InvalidAttribute {
            attribute: name.to_owned(),
            reason: "extension names are 1-20 lower-case letters or digits".into(),
        })
    }
}

fn parse_time(value: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(value, &Rfc3339).map_err(|e| EventError::InvalidAttribute {
        attribute: "time".into(),
        reason: format!("not an RFC 3339 timestamp: {e}"),
    })
}

/// Header names folded to lower case; the last value of a repeated header wins.
fn lowercase_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter_map(|(name, values)| {
            let value = values.last()?;
            let name: &str = name.as_ref();
            Some((name.to_ascii_lowercase(), value.as_str().to_owned()))
        })
        .collect()
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|ct| {
        let mt = media_type(ct);
        mt == "application/json" || mt.ends_with("+json") || mt == "text/json"
    })
}

fn encode_base64(data: &[u8]) -> String {
    BASE64.encode(data)
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> CloudEvent {
        CloudEvent::new("/test", "cc.call.incoming.v1")
            .json(&serde_json::json!({"call": "c1"}))
            .unwrap()
            .partition_key("c1")
            .extension("tenant", "acme")
    }

    #[test]
    fn binary_mode_round_trips_every_attribute() {
        let mut event = sample();
        event.subject = Some("c1".into());
        event.data_schema = Some("https://schemas.example/call".into());
        let back = CloudEvent::from_message(Some(&event.to_headers()), &event.data).unwrap();
        // RFC 3339 keeps nanoseconds, so times survive exactly.
        assert_eq!(back, event);
    }

    #[test]
    fn structured_mode_round_trips_json_and_binary_data() {
        let json_event = sample();
        let binary = CloudEvent::new("/t", "x").data("application/octet-stream", vec![0u8, 255, 7]);
        for event in [json_event, binary] {
            let body = Bytes::from(event.to_structured().to_string());
            let mut headers = HeaderMap::new();
            headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
            let back = CloudEvent::from_message(Some(&headers), &body).unwrap();
            assert_eq!(back.id, event.id);
            assert_eq!(back.extensions, event.extensions);
            assert_eq!(back.data_content_type, event.data_content_type);
            if event.data_content_type.as_deref() == Some("application/json") {
                let a: Value = serde_json::from_slice(&back.data).unwrap();
                let b: Value = serde_json::from_slice(&event.data).unwrap();
                assert_eq!(a, b);
            } else {
                assert_eq!(back.data, event.data);
            }
        }
    }

    #[test]
    fn header_names_are_read_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert("Ce-Specversion", "1.0");
        headers.insert("CE-ID", "1");
        headers.insert("Ce-Source", "/s");
        headers.insert("ce-Type", "t");
        let e = CloudEvent::from_message(Some(&headers), &Bytes::new()).unwrap();
        assert_eq!(
            (e.id.as_str(), e.source.as_str(), e.ty.as_str()),
            ("1", "/s", "t")
        );
    }

    #[test]
    fn malformed_events_are_rejected_with_the_reason() {
        let good = sample().to_headers();
        let without = |name: &str| {
            let mut h = HeaderMap::new();
            for (k, vs) in good.iter() {
                if AsRef::<str>::as_ref(k) != name {
                    for v in vs {
                        h.append(k.clone(), v.clone());
                    }
                }
            }
            h
        };
        let err = |h: &HeaderMap| CloudEvent::from_message(Some(h), &Bytes::new()).unwrap_err();
        assert_eq!(
            err(&without("ce-id")),
            EventError::MissingAttribute { attribute: "id" }
        );
        assert_eq!(
            err(&without("ce-source")),
            EventError::MissingAttribute {
                attribute: "source"
            }
        );
        let mut bad_version = good.clone();
        bad_version.insert("ce-specversion", "0.3");
        assert!(matches!(
            err(&bad_version),
            EventError::UnsupportedSpecVersion { .. }
        ));
        let mut bad_time = good.clone();
        bad_time.insert("ce-time", "yesterday");
        assert!(
            matches!(err(&bad_time), EventError::InvalidAttribute { attribute, .. } if attribute == "time")
        );
        let mut bad_ext = good.clone();
        bad_ext.insert("ce-Not_Valid", "x");
        assert!(matches!(err(&bad_ext), EventError::InvalidAttribute { .. }));
        assert_eq!(
            CloudEvent::from_message(None, &Bytes::from_static(b"hi")).unwrap_err(),
            EventError::NotACloudEvent
        );
    }

    #[test]
    fn structured_mode_rejects_non_objects_and_bad_attributes() {
        let parse = |s: &str| CloudEvent::from_structured(s.as_bytes());
        assert!(matches!(
            parse("[1]"),
            Err(EventError::InvalidStructured { .. })
        ));
        assert!(matches!(
            parse("nope"),
            Err(EventError::InvalidStructured { .. })
        ));
        assert_eq!(
            parse(r#"{"specversion":"1.0","source":"/s","type":"t"}"#).unwrap_err(),
            EventError::MissingAttribute { attribute: "id" }
        );
        assert!(matches!(
            parse(r#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#),
            Err(EventError::InvalidAttribute { .. })
        ));
    }

    #[test]
    fn time_millis_round_trips() {
        let e = CloudEvent::new("/s", "t").with_time_millis(Some(1_700_000_000_123));
        assert_eq!(e.time_millis(), Some(1_700_000_000_123));
    }
}
