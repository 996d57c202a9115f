//! Configuration given at deploy time (`patchbay fn deploy --config k=v`), fixed per
//! function version.

use std::str::FromStr;

use crate::Failure;
use crate::bindings::patchbay::function::config as host;

/// The value of `key`, if set.
#[must_use]
pub fn get(key: &str) -> Option<String> {
    host::get(key)
}

/// Every key and value, sorted by key.
#[must_use]
pub fn get_all() -> Vec<(String, String)> {
    host::get_all()
}

/// The value of `key`, or `default` when unset.
#[must_use]
pub fn get_or(key: &str, default: &str) -> String {
    get(key).unwrap_or_else(|| default.to_string())
}

/// The value of `key` parsed as `T`, or `default` when unset. A value that does not parse
/// is a deployment mistake that every event would hit: a dead-letter failure naming it.
pub fn parse_or<T: FromStr>(key: &str, default: T) -> Result<T, Failure>
where
    T::Err: std::fmt::Display,
{
    parse_value(key, get(key).as_deref(), default)
}

/// [`parse_or`] on a given value (the part that does not need the host).
fn parse_value<T: FromStr>(key: &str, value: Option<&str>, default: T) -> Result<T, Failure>
where
    T::Err: std::fmt::Display,
{
    match value {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|err| Failure::dead_letter(format!("config {key}={raw:?} is invalid: {err}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unset_values_take_the_default_and_set_ones_parse() {
        assert_eq!(parse_value("n", None, 30u64).unwrap(), 30);
        assert_eq!(parse_value("n", Some(" 45 "), 30u64).unwrap(), 45);
    }

    #[test]
    fn unparsable_values_dead_letter_naming_the_key() {
        let failure = parse_value("delay_minutes", Some("soon"), 30u64).unwrap_err();
        assert!(matches!(failure, Failure::DeadLetter(_)));
        assert!(
            failure.reason().contains("delay_minutes"),
            "{}",
            failure.reason()
        );
    }
}
