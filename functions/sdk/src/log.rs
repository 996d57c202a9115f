//! Structured logging: each record becomes a span event of the invocation and a record on
//! `patchbay.v1.fn.<name>.logs` (`patchbay fn logs`). The macros take `format!` arguments:
//! `info!("indexed call {call}")`.

use crate::bindings::patchbay::function::log as host;

pub use host::Level;

/// Records `message` at `level`.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

/// Records `message` at trace level.
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Records `message` at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Records `message` at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Records `message` at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Records `message` at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}

/// Logs a `format!` message at trace level.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::trace(&::std::format!($($arg)+)) };
}

/// Logs a `format!` message at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::debug(&::std::format!($($arg)+)) };
}

/// Logs a `format!` message at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::info(&::std::format!($($arg)+)) };
}

/// Logs a `format!` message at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::warn(&::std::format!($($arg)+)) };
}

/// Logs a `format!` message at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::error(&::std::format!($($arg)+)) };
}
