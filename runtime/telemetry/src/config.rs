//! The plain configuration structs handed to [`crate::init`], and the one translation from the
//! standard `OTEL_*` environment variables (through a lookup function, so this crate never
//! reads the environment itself). Parsing command-line flags is the binaries' job.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Result, TelemetryError};

/// How log lines are written (always to stderr, so a CLI's stdout stays clean for its output).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event, coloured when stderr is a terminal.
    #[default]
    Human,
    /// One JSON object per event with the current span, for log shippers.
    Json,
}

/// Everything [`crate::init`] needs; built by each binary from its flags.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// OpenTelemetry `service.name`, e.g. `patchbay-runtime`.
    pub service_name: String,
    /// OpenTelemetry `service.version`, usually the binary's `CARGO_PKG_VERSION`.
    pub service_version: String,
    /// OpenTelemetry `service.instance.id`, e.g. the node name; tells replicas apart.
    pub instance_id: String,
    /// Human-readable or JSON log lines.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,patchbay_bus=debug`; it also decides
    /// which spans exist at all, so it bounds what is traced.
    pub log_filter: String,
    /// Where to export spans; `None` keeps trace context (ids, propagation) but exports nothing.
    pub otlp: Option<OtlpConfig>,
}

impl TelemetryConfig {
    /// A configuration with human logs, filter `info` and no OTLP export.
    #[must_use]
    pub fn new(
        service_name: impl Into<String>,
        service_version: impl Into<String>,
        instance_id: impl Into<String>,
    ) -> Self {
        Self {
            service_name: service_name.into(),
            service_version: service_version.into(),
            instance_id: instance_id.into(),
            log_format: LogFormat::Human,
            log_filter: "info".to_owned(),
            otlp: None,
        }
    }

    /// Applies the standard variables: `OTEL_SERVICE_NAME` replaces `service_name` when set,
    /// and `otlp` becomes [`OtlpConfig::from_otel_env`]'s answer.
    ///
    /// Binaries call it as `cfg.with_otel_env(|k| std::env::var(k).ok())`.
    pub fn with_otel_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if let Some(name) = non_empty(&lookup, "OTEL_SERVICE_NAME") {
            self.service_name = name;
        }
        self.otlp = OtlpConfig::from_otel_env(&lookup)?;
        Ok(self)
    }
}

/// The OTLP wire protocol. Only HTTP with protobuf bodies is built in (no gRPC stack).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtlpProtocol {
    /// `http/protobuf`, the OpenTelemetry default.
    #[default]
    HttpProtobuf,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Full URL of the traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces` (used as is; the
    /// `/v1/traces` suffix is only added when derived from `OTEL_EXPORTER_OTLP_ENDPOINT`).
    /// Plain `http://` only: this build has no TLS client for the exporter.
    pub endpoint: String,
    /// Extra HTTP headers on every export request (e.g. an API key), values already decoded.
    pub headers: BTreeMap<String, String>,
    /// Wire protocol.
    pub protocol: OtlpProtocol,
    /// Time limit for one export request.
    pub timeout: Duration,
    /// Fraction of new traces to sample, `0.0..=1.0`; traces that arrive with a parent follow
    /// the parent's decision (sampler `parentbased_traceidratio`).
    pub sampling_ratio: f64,
}

/// The OpenTelemetry default export timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl OtlpConfig {
    /// Export to `endpoint` with no extra headers, http/protobuf, a 10 s timeout and every
    /// trace sampled.
    #[must_use]
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            headers: BTreeMap::new(),
            protocol: OtlpProtocol::HttpProtobuf,
            timeout: DEFAULT_TIMEOUT,
            sampling_ratio: 1.0,
        }
    }

    /// Reads the standard OpenTelemetry variables through `lookup` (binaries pass
    /// `|k| std::env::var(k).ok()`); empty values count as unset, as the specification says.
    ///
    /// * `OTEL_SDK_DISABLED=true` → `Ok(None)`.
    /// * Endpoint: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is, else
    ///   `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; neither set → `Ok(None)` (no export).
    /// * `OTEL_EXPORTER_OTLP_HEADERS` then `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (which wins per
    ///   key): `key=value` pairs separated by commas, values percent-decoded.
    /// * `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: only `http/protobuf`.
    /// * `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`: milliseconds.
    /// * `OTEL_TRACES_SAMPLER`: `parentbased_traceidratio` (the default here), `traceidratio`,
    ///   `[parentbased_]always_on` or `[parentbased_]always_off` — all applied parent-based, so
    ///   one hop never breaks a trace that an earlier hop sampled.
    /// * `OTEL_TRACES_SAMPLER_ARG`: the ratio for the ratio samplers (default 1.0).
    ///
    /// A value Patchbay cannot use is an error naming the variable, so a typo fails at startup
    /// instead of silently disabling tracing.
    pub fn from_otel_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if non_empty(&lookup, "OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let endpoint = if let Some(url) = non_empty(&lookup, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            url
        } else if let Some(base) = non_empty(&lookup, "OTEL_EXPORTER_OTLP_ENDPOINT") {
            format!("{}/v1/traces", base.trim_end_matches('/'))
        } else {
            return Ok(None);
        };
        let mut cfg = Self::new(endpoint);

        for variable in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(value) = non_empty(&lookup, variable) {
                cfg.headers.extend(parse_headers(variable, &value)?);
            }
        }
        if let Some((variable, value)) = signal_or_general(&lookup, "PROTOCOL")
            && value != "http/protobuf"
        {
            return Err(invalid(
                variable,
                value,
                "only http/protobuf is supported by this build",
            ));
        }
        if let Some((variable, value)) = signal_or_general(&lookup, "TIMEOUT") {
            let ms = value
                .trim()
                .parse::<u64>()
                .map_err(|_| invalid(variable, value.clone(), "expected milliseconds"))?;
            cfg.timeout = Duration::from_millis(ms);
        }
        cfg.sampling_ratio = sampling_ratio(&lookup)?;
        Ok(Some(cfg))
    }
}

/// The ratio implied by `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
fn sampling_ratio(lookup: &impl Fn(&str) -> Option<String>) -> Result<f64> {
    const SAMPLER: &str = "OTEL_TRACES_SAMPLER";
    const ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    let ratio_from_arg = || -> Result<f64> {
        let Some(arg) = non_empty(lookup, ARG) else {
            return Ok(1.0);
        };
        match arg.trim().parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
            _ => Err(invalid(ARG, arg, "expected a number between 0.0 and 1.0")),
        }
    };
    match non_empty(lookup, SAMPLER).as_deref() {
        None | Some("parentbased_traceidratio" | "traceidratio") => ratio_from_arg(),
        Some("always_on" | "parentbased_always_on") => Ok(1.0),
        Some("always_off" | "parentbased_always_off") => Ok(0.0),
        Some(other) => Err(invalid(
            SAMPLER,
            other.to_owned(),
            "supported: parentbased_traceidratio, traceidratio, [parentbased_]always_on, \
             [parentbased_]always_off",
        )),
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_<suffix>` if set, else `OTEL_EXPORTER_OTLP_<suffix>`, with the
/// name of the variable that supplied the value.
fn signal_or_general(
    lookup: &impl Fn(&str) -> Option<String>,
    suffix: &str,
) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"),
        format!("OTEL_EXPORTER_OTLP_{suffix}"),
    ]
    .into_iter()
    .find_map(|variable| non_empty(lookup, &variable).map(|value| (variable, value)))
}

fn non_empty(lookup: &impl Fn(&str) -> Option<String>, variable: &str) -> Option<String> {
    lookup(variable).filter(|v| !v.trim().is_empty())
}

fn invalid(variable: impl Into<String>, value: String, reason: &str) -> TelemetryError {
    TelemetryError::InvalidOtelEnv {
        variable: variable.into(),
        value,
        reason: reason.to_owned(),
    }
}

/// Parses the `OTEL_EXPORTER_OTLP_HEADERS` format: `k1=v1,k2=v2`, values percent-encoded.
fn parse_headers(variable: &str, value: &str) -> Result<Vec<(String, String)>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let bad = |reason| invalid(variable, value.to_owned(), reason);
            let (key, raw) = pair
                .split_once('=')
                .ok_or_else(|| bad("expected comma-separated key=value pairs"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(bad("a header name is empty"));
            }
            let decoded = percent_decode(raw.trim())
                .ok_or_else(|| bad("a header value has a bad percent-encoding"))?;
            Ok((key.to_owned(), decoded))
        })
        .collect()
}

/// Decodes `%XX` escapes; `None` for a truncated escape, bad hex or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_endpoint_means_no_export() {
        let cfg = OtlpConfig::from_otel_env(env(&[("OTEL_EXPORTER_OTLP_HEADERS", "a=b")]));
        assert_eq!(cfg.unwrap(), None);
    }

    #[test]
    fn general_endpoint_gets_the_traces_path_appended_once() {
        for base in ["http://collector:4318", "http://collector:4318/"] {
            let cfg = OtlpConfig::from_otel_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base)]))
                .unwrap()
                .unwrap();
            assert_eq!(cfg.endpoint, "http://collector:4318/v1/traces");
            assert_eq!(cfg.sampling_ratio, 1.0);
            assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        }
    }

    #[test]
    fn traces_endpoint_wins_and_is_used_verbatim() {
        let cfg = OtlpConfig::from_otel_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://wrong:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://right:4318/custom",
            ),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.endpoint, "http://right:4318/custom");
    }

    #[test]
    fn headers_are_split_trimmed_decoded_and_overridden_per_signal() {
        let cfg = OtlpConfig::from_otel_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                " api-key = secret%20value , tenant=a,",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "tenant=b"),
        ]))
        .unwrap()
        .unwrap();
        let expected: BTreeMap<String, String> = [
            ("api-key".to_owned(), "secret value".to_owned()),
            ("tenant".to_owned(), "b".to_owned()),
        ]
        .into();
        assert_eq!(cfg.headers, expected);
    }

    #[test]
    fn rejects_header_without_equals_sign_naming_the_variable() {
        let err = OtlpConfig::from_otel_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key"),
        ]))
        .unwrap_err();
        assert!(
            matches!(&err, TelemetryError::InvalidOtelEnv { variable, .. } if variable == "OTEL_EXPORTER_OTLP_HEADERS"),
            "{err:?}"
        );
    }

    #[test]
    fn sampler_arg_sets_the_ratio_and_bad_values_are_rejected() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let cfg = OtlpConfig::from_otel_env(env(&[base, ("OTEL_TRACES_SAMPLER_ARG", "0.25")]))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.sampling_ratio, 0.25);
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            let err = OtlpConfig::from_otel_env(env(&[base, ("OTEL_TRACES_SAMPLER_ARG", bad)]))
                .unwrap_err();
            assert!(
                matches!(&err, TelemetryError::InvalidOtelEnv { variable, .. } if variable == "OTEL_TRACES_SAMPLER_ARG"),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn sampler_names_map_to_ratios() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let ratio = |sampler| {
            OtlpConfig::from_otel_env(env(&[
                base,
                ("OTEL_TRACES_SAMPLER", sampler),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            ]))
            .map(|c| c.unwrap().sampling_ratio)
        };
        assert_eq!(ratio("parentbased_always_off").unwrap(), 0.0);
        assert_eq!(ratio("always_on").unwrap(), 1.0);
        assert_eq!(ratio("traceidratio").unwrap(), 0.5);
        assert!(ratio("jaeger_remote").is_err());
    }

    #[test]
    fn rejects_grpc_protocol_and_reads_timeout_in_milliseconds() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let err = OtlpConfig::from_otel_env(env(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]))
            .unwrap_err();
        assert!(matches!(err, TelemetryError::InvalidOtelEnv { .. }));
        let cfg = OtlpConfig::from_otel_env(env(&[
            base,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn sdk_disabled_turns_export_off() {
        let cfg = OtlpConfig::from_otel_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]))
        .unwrap();
        assert_eq!(cfg, None);
    }

    #[test]
    fn otel_service_name_overrides_the_binary_default() {
        let cfg = TelemetryConfig::new("patchbay-runtime", "0.1.0", "node-1")
            .with_otel_env(env(&[("OTEL_SERVICE_NAME", "edge-runtime")]))
            .unwrap();
        assert_eq!(cfg.service_name, "edge-runtime");
        assert_eq!(cfg.otlp, None);
        assert_eq!(cfg.log_filter, "info");
    }

    #[test]
    fn percent_decode_rejects_truncated_escapes() {
        assert_eq!(percent_decode("a%2Cb").as_deref(), Some("a,b"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("a%zz"), None);
    }
}
