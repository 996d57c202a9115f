//! The function's own key-value state (its keys in the platform's `patchbay-fn-state`
//! bucket, which no other function can reach), shared by all its versions and runtime
//! nodes. Keys are NATS subject tokens: letters, digits and `-_=.`,
//! no leading or trailing dot — see [`key_token`] to make one from arbitrary text.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Failure;
use crate::bindings::patchbay::function::kv as host;

pub use host::KvError;

/// The current value of `key`, if any.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    host::get(key)
}

/// Stores `value` under `key`; returns the new revision.
pub fn set(key: &str, value: &[u8]) -> Result<u64, KvError> {
    host::set(key, value)
}

/// Removes `key` (a no-op when it is absent).
pub fn delete(key: &str) -> Result<(), KvError> {
    host::delete(key)
}

/// Keys currently in the bucket, in no particular order.
pub fn keys() -> Result<Vec<String>, KvError> {
    host::keys()
}

/// The value of `key` parsed as JSON. A stored value that does not parse is a
/// dead-letter failure naming the key; bucket errors map as in `From<KvError>`.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Failure> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|err| {
            Failure::dead_letter(format!("kv value {key:?} is not valid JSON: {err}"))
        }),
    }
}

/// Stores `value` as JSON under `key`; returns the new revision.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<u64, Failure> {
    let bytes = serde_json::to_vec(value)
        .map_err(|err| Failure::dead_letter(format!("cannot encode kv value {key:?}: {err}")))?;
    Ok(set(key, &bytes)?)
}

/// `text` made into a valid key token: every character outside `A-Za-z0-9-_=` becomes
/// `_` (dots too, so the result is one token). Empty input gives `_`.
#[must_use]
pub fn key_token(text: &str) -> String {
    if text.is_empty() {
        return "_".into();
    }
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A one-line description of `err`, for reasons and logs.
#[must_use]
pub fn describe(err: &KvError) -> String {
    match err {
        KvError::InvalidKey(key) => format!("invalid key {key:?}"),
        KvError::TooLarge(limit) => format!("value larger than the bucket allows ({limit} bytes)"),
        KvError::Other(msg) => msg.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_token_replaces_characters_nats_keys_reject() {
        assert_eq!(key_token("call 42/a.b"), "call_42_a_b");
        assert_eq!(key_token("ok-key_1=x"), "ok-key_1=x");
        assert_eq!(key_token(""), "_");
    }
}
