//! `.patchbay/env`: `export NAME=value` lines that other tools can `source`.
//!
//! `patchbay up` writes it; every `patchbay` command reads it as the fallback for
//! settings not given by flag or environment variable, so after `make up` the CLI (and
//! any shell that sources the file) reaches the local stack with the admin identity.

use std::collections::BTreeMap;
use std::path::Path;

/// Names written to the env file, in the order they are written.
pub const NATS_URL: &str = "PATCHBAY_NATS_URL";
/// CA certificate that signed the NATS server certificate.
pub const NATS_CA: &str = "PATCHBAY_NATS_CA";
/// Admin client certificate.
pub const NATS_CERT: &str = "PATCHBAY_NATS_CERT";
/// Admin client key.
pub const NATS_KEY: &str = "PATCHBAY_NATS_KEY";
/// Base URL of the local gateway.
pub const GATEWAY_URL: &str = "PATCHBAY_GATEWAY_URL";
/// A dev API token (scope `admin`) for the local gateway.
pub const TOKEN: &str = "PATCHBAY_TOKEN";

/// The variables of an env file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvFile {
    vars: BTreeMap<String, String>,
}

impl EnvFile {
    /// Read `path`; a missing file is an empty set.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Parse `export NAME=value` (or `NAME=value`) lines; single or double quotes around
    /// the value are removed; comments and other lines are ignored.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let vars = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let l = l.strip_prefix("export ").unwrap_or(l);
                let (name, value) = l.split_once('=')?;
                let value = value.trim();
                let unquoted = value
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                    .unwrap_or(value);
                Some((name.trim().to_owned(), unquoted.replace("'\\''", "'")))
            })
            .collect();
        Self { vars }
    }

    /// The value of `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Set `name` to `value`.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(name.into(), value.into());
    }

    /// The file's text: one `export NAME='value'` line per variable.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out =
            String::from("# Written by `patchbay up`; `source` it to use the local stack.\n");
        for (name, value) in &self.vars {
            out.push_str(&format!(
                "export {name}='{}'\n",
                value.replace('\'', "'\\''")
            ));
        }
        out
    }

    /// Write the file atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_files_parse_back_to_the_same_values() {
        let mut env = EnvFile::default();
        env.set(NATS_URL, "tls://127.0.0.1:4222");
        env.set("PATCHBAY_ODD", "it's \"quoted\"");
        assert_eq!(EnvFile::parse(&env.render()), env);
    }

    #[test]
    fn plain_and_quoted_assignments_are_read_and_comments_ignored() {
        let env = EnvFile::parse("# c\nexport A=1\nB=\"two\"\n  export C='3'\nnot a line\n");
        assert_eq!(env.get("A"), Some("1"));
        assert_eq!(env.get("B"), Some("two"));
        assert_eq!(env.get("C"), Some("3"));
        assert_eq!(env.get("not a line"), None);
    }
}
