//! [`Metrics`]: the process's Prometheus registry, the metric naming rules, and the
//! `/metrics` encoders (classic text format 0.0.4 and OpenMetrics 1.0 text, the latter with
//! exemplars).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, PoisonError, RwLock};

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::exemplar::{Exemplar, ExemplarCounterVec, ExemplarHistogramVec, ExemplarTable};
use crate::{Result, TelemetryError};

/// Every Patchbay metric name starts with this. The prefix is part of each name (not added
/// by the registry), so the name in code, in docs/architecture.md and in Prometheus is the same string.
pub const METRIC_PREFIX: &str = "patchbay_";
/// Content type of the classic Prometheus text format (the default).
pub const CLASSIC_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics 1.0 text, served when the scraper's `Accept` prefers it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Histogram buckets for durations in seconds, from 0.5 ms (a warm wasm call) to 10 s.
pub const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A cheap clonable handle on the process's metric registry.
///
/// Naming rules, checked by the helpers ([`Metrics::counter_vec`], [`Metrics::gauge_vec`],
/// [`Metrics::histogram_vec`]): names start with [`METRIC_PREFIX`] (`patchbay_`), counters end
/// in `_total` and nothing else does (OpenMetrics derives the family name by removing
/// `_total`, so a counter named otherwise would change its series name between formats).
/// Metrics registered straight into [`Metrics::registry`] skip these checks.
///
/// Families made with [`Metrics::histogram_vec_with_exemplars`] or
/// [`Metrics::counter_vec_with_exemplars`] carry exemplars (`# {trace_id="…"} value
/// timestamp`) in OpenMetrics output; the classic text format has no exemplars.
///
/// A process that runs several services ([`Metrics::for_service`]) gives each its own
/// registry whose series all carry `service="<name>"`; `/metrics` serves them merged, one
/// family block per name, so the same families from two services stay one valid exposition.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    registry: Registry,
    /// Exemplar side tables by family name (`prometheus` 0.14 has no exemplar support).
    exemplars: Arc<RwLock<HashMap<String, Arc<ExemplarTable>>>>,
    /// Per-service registries made with [`Metrics::for_service`], served with this one.
    services: Arc<RwLock<Vec<(String, Metrics)>>>,
}

/// The label [`Metrics::for_service`] puts on every series of a service's registry.
pub const SERVICE_LABEL: &str = "service";

impl Metrics {
    /// An empty registry with no prefix and no constant labels (the scraper adds `instance`).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry for the service `service` inside this process: every series it holds
    /// carries `service="<service>"`, and this registry's `/metrics` serves it too. Two
    /// services may register the same family (the bus metrics, say) without clashing.
    /// Asking again for the same service replaces its registry (a restarted service
    /// registers its families afresh, and its counters restart from zero).
    pub fn for_service(&self, service: &str) -> Result<Self> {
        let labels = HashMap::from([(SERVICE_LABEL.to_owned(), service.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels))
            .map_err(|source| registration(SERVICE_LABEL, source))?;
        let child = Self {
            registry,
            ..Self::default()
        };
        let mut services = self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        services.retain(|(name, _)| name != service);
        services.push((service.to_owned(), child.clone()));
        Ok(child)
    }

    /// The underlying registry, to register collectors the helpers do not cover.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Creates and registers an integer counter family; the name must end in `_total`.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
        check_name(name, true)?;
        let metric = IntCounterVec::new(Opts::new(name, help), labels)
            .map_err(|source| registration(name, source))?;
        self.register(name, metric)
    }

    /// Creates and registers a gauge family.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec> {
        check_name(name, false)?;
        let metric = GaugeVec::new(Opts::new(name, help), labels)
            .map_err(|source| registration(name, source))?;
        self.register(name, metric)
    }

    /// Creates and registers a histogram family with the given upper bounds (e.g.
    /// [`DURATION_BUCKETS_SECONDS`]); name it with its unit, e.g. `_seconds`.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<HistogramVec> {
        check_name(name, false)?;
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let metric =
            HistogramVec::new(opts, labels).map_err(|source| registration(name, source))?;
        self.register(name, metric)
    }

    /// Like [`Metrics::histogram_vec`], keeping the trace id of a recent observation per
    /// bucket as an OpenMetrics exemplar (see [`ExemplarHistogramVec`]).
    pub fn histogram_vec_with_exemplars(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<ExemplarHistogramVec> {
        let inner = self.histogram_vec(name, help, labels, buckets)?;
        let table = self.exemplar_table(name, labels, buckets);
        Ok(ExemplarHistogramVec { inner, table })
    }

    /// Like [`Metrics::counter_vec`], keeping the trace id of a recent increment per series
    /// as an OpenMetrics exemplar (see [`ExemplarCounterVec`]).
    pub fn counter_vec_with_exemplars(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<ExemplarCounterVec> {
        let inner = self.counter_vec(name, help, labels)?;
        let table = self.exemplar_table(name, labels, &[]);
        Ok(ExemplarCounterVec { inner, table })
    }

    fn exemplar_table(&self, name: &str, labels: &[&str], bounds: &[f64]) -> Arc<ExemplarTable> {
        let table = Arc::new(ExemplarTable::new(labels, bounds));
        self.exemplars
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::clone(&table));
        table
    }

    /// Registers an already built metric under the naming rules (`counter`: whether it is
    /// a counter family, whose name must end in `_total`).
    pub(crate) fn register_checked<M>(&self, name: &str, counter: bool, metric: M) -> Result<M>
    where
        M: prometheus::core::Collector + Clone + 'static,
    {
        check_name(name, counter)?;
        self.register(name, metric)
    }

    fn register<M>(&self, name: &str, metric: M) -> Result<M>
    where
        M: prometheus::core::Collector + Clone + 'static,
    {
        self.registry
            .register(Box::new(metric.clone()))
            .map_err(|source| registration(name, source))?;
        Ok(metric)
    }

    /// Encodes every registered metric for a scraper that sent `accept` (the `Accept` header).
    /// Returns the content type and the body: OpenMetrics 1.0 text when the header prefers
    /// `application/openmetrics-text`, the classic text format otherwise (also without header).
    #[must_use]
    pub fn encode(&self, accept: Option<&str>) -> (&'static str, String) {
        let services = self
            .services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut families = self.registry.gather();
        for (_, child) in &services {
            families.extend(child.registry.gather());
        }
        let families = merge_families(families);
        if accept.is_some_and(prefers_openmetrics) {
            let own = self.exemplar_tables();
            let by_service: HashMap<String, HashMap<String, Arc<ExemplarTable>>> = services
                .iter()
                .map(|(name, child)| (name.clone(), child.exemplar_tables()))
                .collect();
            let tables = |family: &str, metric: &Metric| {
                let service = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == SERVICE_LABEL)
                    .and_then(|l| by_service.get(l.value()));
                service.unwrap_or(&own).get(family).cloned()
            };
            (
                OPENMETRICS_CONTENT_TYPE,
                encode_text(&families, Dialect::OpenMetrics, &tables),
            )
        } else {
            (
                CLASSIC_TEXT_CONTENT_TYPE,
                encode_text(&families, Dialect::Classic, &|_, _| None),
            )
        }
    }

    fn exemplar_tables(&self) -> HashMap<String, Arc<ExemplarTable>> {
        self.exemplars
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One family per name, sorted by name: the series of families gathered from several
/// registries under one name are concatenated (the first family's help and type win).
fn merge_families(families: Vec<MetricFamily>) -> Vec<MetricFamily> {
    let mut merged: std::collections::BTreeMap<String, MetricFamily> = Default::default();
    for family in families {
        match merged.entry(family.name().to_owned()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(family);
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let metrics = family.get_metric().to_vec();
                slot.get_mut().mut_metric().extend(metrics);
            }
        }
    }
    merged.into_values().collect()
}

fn registration(name: &str, source: prometheus::Error) -> TelemetryError {
    TelemetryError::MetricRegistration {
        name: name.to_owned(),
        source,
    }
}

fn check_name(name: &str, counter: bool) -> Result<()> {
    let reason = if !name.starts_with(METRIC_PREFIX) {
        Some("metric names start with `patchbay_`")
    } else if counter && !name.ends_with("_total") {
        Some("counter names end in `_total`")
    } else if !counter && name.ends_with("_total") {
        Some("only counters end in `_total`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TelemetryError::InvalidMetricName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Whether an `Accept` header ranks OpenMetrics text (version 1.0.0, 0.0.1 or unversioned)
/// at least as high as the classic format or a wildcard. Prometheus sends e.g.
/// `application/openmetrics-text;version=1.0.0;q=0.6,…,text/plain;version=0.0.4;q=0.3,*/*;q=0.2`.
fn prefers_openmetrics(accept: &str) -> bool {
    let mut openmetrics_q = 0.0_f64;
    let mut other_q = 0.0_f64;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let mut q = 1.0_f64;
        let mut version = None;
        for param in parts {
            if let Some((key, value)) = param.split_once('=') {
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    // An unparsable weight makes the range unusable rather than preferred.
                    "q" => q = value.parse::<f64>().unwrap_or(0.0).clamp(0.0, 1.0),
                    "version" => version = Some(value.to_owned()),
                    _ => {}
                }
            }
        }
        match media.as_str() {
            "application/openmetrics-text"
                if matches!(version.as_deref(), None | Some("1.0.0" | "0.0.1")) =>
            {
                openmetrics_q = openmetrics_q.max(q);
            }
            "text/plain" | "text/*" | "*/*" => other_q = other_q.max(q),
            _ => {}
        }
    }
    openmetrics_q > 0.0 && openmetrics_q >= other_q
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Classic,
    OpenMetrics,
}

/// One encoder for both formats, so label escaping and number formatting agree and series
/// keep the same identity whichever format the scraper picks. (`prometheus`'s own text
/// encoder also panics on untyped metrics; this one does not.)
///
/// `exemplars` (OpenMetrics only) holds the side tables of families that keep them; an
/// exemplar follows the counter sample or the bucket line it belongs to.
fn encode_text(
    families: &[MetricFamily],
    dialect: Dialect,
    exemplars: &dyn Fn(&str, &Metric) -> Option<Arc<ExemplarTable>>,
) -> String {
    let om = dialect == Dialect::OpenMetrics;
    let mut out = String::new();
    for mf in families {
        let name = mf.name();
        let kind = mf.get_field_type();
        // OpenMetrics names a counter family without `_total` and puts it on the sample.
        let (family, counter_sample) = match kind {
            MetricType::COUNTER if om => match name.strip_suffix("_total") {
                Some(stem) => (stem.to_owned(), name.to_owned()),
                None => (name.to_owned(), format!("{name}_total")),
            },
            _ => (name.to_owned(), name.to_owned()),
        };
        if !mf.help().is_empty() {
            let _ = writeln!(out, "# HELP {family} {}", escape(mf.help(), om));
        }
        let type_name = match kind {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            MetricType::SUMMARY => "summary",
            MetricType::UNTYPED if om => "unknown",
            MetricType::UNTYPED => "untyped",
        };
        let _ = writeln!(out, "# TYPE {family} {type_name}");
        for m in mf.get_metric() {
            let table = if om { exemplars(name, m) } else { None };
            let slots = table
                .and_then(|t| {
                    let labels: Vec<(&str, &str)> = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name(), l.value()))
                        .collect();
                    t.lookup(&labels)
                })
                .unwrap_or_default();
            let slot = |i: usize| slots.get(i).copied().flatten();
            let mut sample = |suffix: &str,
                              extra: Option<(&str, &str)>,
                              value: &str,
                              exemplar: Option<Exemplar>| {
                let base = if kind == MetricType::COUNTER {
                    counter_sample.as_str()
                } else {
                    name
                };
                write_sample(&mut out, base, suffix, m, extra, value, dialect);
                if let Some(e) = exemplar {
                    write_exemplar(&mut out, &e);
                }
                out.push('\n');
            };
            match kind {
                MetricType::COUNTER => {
                    sample("", None, &number(m.get_counter().get_value()), slot(0));
                }
                MetricType::GAUGE => sample("", None, &number(m.get_gauge().get_value()), None),
                // Deprecated because the plain model may drop untyped metrics one day; until
                // then a custom collector can still produce them.
                #[allow(deprecated)]
                MetricType::UNTYPED => {
                    sample("", None, &number(m.get_untyped().get_value()), None);
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let buckets = h.get_bucket();
                    let mut inf_seen = false;
                    for (i, b) in buckets.iter().enumerate() {
                        let bound = b.upper_bound();
                        inf_seen |= bound == f64::INFINITY;
                        let le = number(bound);
                        let count = b.cumulative_count().to_string();
                        sample("_bucket", Some(("le", &le)), &count, slot(i));
                    }
                    let count = h.get_sample_count().to_string();
                    if !inf_seen {
                        let inf = slot(buckets.len());
                        sample("_bucket", Some(("le", "+Inf")), &count, inf);
                    }
                    sample("_sum", None, &number(h.get_sample_sum()), None);
                    sample("_count", None, &count, None);
                }
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    for q in s.get_quantile() {
                        let quantile = number(q.quantile());
                        let value = number(q.value());
                        sample("", Some(("quantile", &quantile)), &value, None);
                    }
                    sample("_sum", None, &number(s.sample_sum()), None);
                    sample("_count", None, &s.sample_count().to_string(), None);
                }
            }
        }
    }
    if om {
        out.push_str("# EOF\n");
    }
    out
}

fn write_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    m: &Metric,
    extra: Option<(&str, &str)>,
    value: &str,
    dialect: Dialect,
) {
    out.push_str(name);
    out.push_str(suffix);
    let labels: Vec<(&str, &str)> = m
        .get_label()
        .iter()
        .map(|l: &LabelPair| (l.name(), l.value()))
        .chain(extra)
        .collect();
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v, true));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    let ts = m.timestamp_ms();
    if ts != 0 {
        // Classic timestamps are integer milliseconds, OpenMetrics ones are seconds.
        match dialect {
            Dialect::Classic => {
                let _ = write!(out, " {ts}");
            }
            Dialect::OpenMetrics => {
                let _ = write!(out, " {}", number(ts as f64 / 1000.0));
            }
        }
    }
}

/// ` # {trace_id="…"} value timestamp`, appended to an OpenMetrics sample line. The label
/// set (a 32-hex trace id) stays far below the 128-character limit of the specification.
fn write_exemplar(out: &mut String, e: &Exemplar) {
    let _ = write!(
        out,
        " # {{trace_id=\"{}\"}} {} {}",
        e.trace_id,
        number(e.value),
        number(e.timestamp)
    );
}

/// Label values (both formats) and OpenMetrics HELP escape `\`, newline and `"`; classic
/// HELP escapes only `\` and newline.
fn escape(s: &str, quote: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// Numbers as both parsers accept them; Rust would print `inf` and `NaN` otherwise.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn sample_metrics() -> Metrics {
        let metrics = Metrics::new();
        let invocations = metrics
            .counter_vec(
                "patchbay_fn_invocations_total",
                "Function invocations by outcome.",
                &["function", "version", "outcome"],
            )
            .unwrap();
        invocations
            .with_label_values(&["echo", "1", "ok"])
            .inc_by(3);
        let duration = metrics
            .histogram_vec(
                "patchbay_fn_duration_seconds",
                "Invocation \"wall\" time.",
                &["function"],
                &[0.1, 1.0],
            )
            .unwrap();
        duration.with_label_values(&["echo"]).observe(0.5);
        metrics
            .gauge_vec("patchbay_queue_depth", "Calls waiting.", &["queue"])
            .unwrap()
            .with_label_values(&["sales\n\"eu\""])
            .set(2.0);
        metrics
    }

    #[test]
    fn classic_format_is_the_default() {
        let (content_type, body) = sample_metrics().encode(None);
        assert_eq!(content_type, CLASSIC_TEXT_CONTENT_TYPE);
        let expected = "\
# HELP patchbay_fn_duration_seconds Invocation \"wall\" time.
# TYPE patchbay_fn_duration_seconds histogram
patchbay_fn_duration_seconds_bucket{function=\"echo\",le=\"0.1\"} 0
patchbay_fn_duration_seconds_bucket{function=\"echo\",le=\"1\"} 1
patchbay_fn_duration_seconds_bucket{function=\"echo\",le=\"+Inf\"} 1
patchbay_fn_duration_seconds_sum{function=\"echo\"} 0.5
patchbay_fn_duration_seconds_count{function=\"echo\"} 1
# HELP patchbay_fn_invocations_total Function invocations by outcome.
# TYPE patchbay_fn_invocations_total counter
patchbay_fn_invocations_total{function=\"echo\",outcome=\"ok\",version=\"1\"} 3
# HELP patchbay_queue_depth Calls waiting.
# TYPE patchbay_queue_depth gauge
patchbay_queue_depth{queue=\"sales\\n\\\"eu\\\"\"} 2
";
        assert_eq!(body, expected);
    }

    #[test]
    fn classic_output_matches_the_prometheus_text_encoder() {
        let metrics = sample_metrics();
        let reference = prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry().gather())
            .unwrap();
        assert_eq!(metrics.encode(Some("text/plain")).1, reference);
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let accept = "application/openmetrics-text;version=1.0.0";
        let (content_type, body) = sample_metrics().encode(Some(accept));
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.contains(
            "# TYPE patchbay_fn_invocations counter\n\
             patchbay_fn_invocations_total{function=\"echo\",outcome=\"ok\",version=\"1\"} 3\n"
        ));
        assert!(
            body.contains("# HELP patchbay_fn_duration_seconds Invocation \\\"wall\\\" time.\n")
        );
        assert!(body.ends_with("\n# EOF\n"), "{body}");
        assert_eq!(body.matches("# EOF").count(), 1);
    }

    #[test]
    fn openmetrics_carries_exemplars_and_classic_text_does_not() {
        let metrics = Metrics::new();
        let duration = metrics
            .histogram_vec_with_exemplars(
                "patchbay_fn_duration_seconds",
                "Invocation time.",
                &["function", "version"],
                &[0.1, 1.0],
            )
            .unwrap();
        let calls = metrics
            .counter_vec_with_exemplars("patchbay_calls_total", "Calls.", &["queue"])
            .unwrap();
        let trace_id =
            opentelemetry::trace::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let echo = duration.with_label_values(&["echo", "1"]);
        echo.observe_with_exemplar(0.5, Some(trace_id));
        echo.observe(0.05);
        duration
            .with_label_values(&["other", "1"])
            .observe_with_exemplar(5.0, None);
        calls
            .with_label_values(&["sales"])
            .inc_with_exemplar(Some(trace_id));

        let (_, body) = metrics.encode(Some("application/openmetrics-text"));
        let exemplar = "# {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"}";
        let line = |prefix: &str| {
            body.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no line {prefix} in {body}"))
                .to_owned()
        };
        // Only the bucket the value fell in carries it, with the observed value.
        assert!(
            line(
                "patchbay_fn_duration_seconds_bucket{function=\"echo\",version=\"1\",le=\"1\"} 2 "
            )
            .contains(&format!("{exemplar} 0.5 ")),
            "{body}"
        );
        assert!(
            !line("patchbay_fn_duration_seconds_bucket{function=\"echo\",version=\"1\",le=\"0.1\"")
                .contains('#')
        );
        assert!(
            !line(
                "patchbay_fn_duration_seconds_bucket{function=\"other\",version=\"1\",le=\"+Inf\""
            )
            .contains('#')
        );
        assert!(
            line("patchbay_calls_total{queue=\"sales\"} 1 ").contains(&format!("{exemplar} 1 "))
        );
        assert_eq!(body.matches("trace_id").count(), 2, "{body}");

        let (_, classic) = metrics.encode(None);
        assert!(!classic.contains("trace_id"), "{classic}");
    }

    #[test]
    fn services_in_one_process_share_family_names_and_are_told_apart_by_label() {
        let process = Metrics::new();
        let trace_id =
            opentelemetry::trace::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        for (service, n) in [("routing", 2), ("agents", 3)] {
            let metrics = process.for_service(service).unwrap();
            let published = metrics
                .counter_vec_with_exemplars("patchbay_bus_published_total", "Published.", &["kind"])
                .unwrap();
            for _ in 0..n {
                published.with_label_values(&["core"]).inc();
            }
            if service == "agents" {
                published
                    .with_label_values(&["core"])
                    .inc_with_exemplar(Some(trace_id));
            }
        }
        let (_, classic) = process.encode(None);
        assert_eq!(
            classic
                .matches("# TYPE patchbay_bus_published_total")
                .count(),
            1,
            "{classic}"
        );
        assert!(
            classic.contains("patchbay_bus_published_total{kind=\"core\",service=\"routing\"} 2\n")
        );
        assert!(
            classic.contains("patchbay_bus_published_total{kind=\"core\",service=\"agents\"} 4\n")
        );

        let (_, om) = process.encode(Some("application/openmetrics-text"));
        let line = |service: &str| {
            om.lines()
                .find(|l| l.contains(&format!("service=\"{service}\"")))
                .unwrap()
                .to_owned()
        };
        assert!(line("agents").contains("trace_id"), "{om}");
        assert!(
            !line("routing").contains("trace_id"),
            "the exemplar is the agents service's: {om}"
        );
    }

    #[test]
    fn accept_negotiation_follows_weights() {
        let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
            application/openmetrics-text;version=0.0.1;q=0.5,\
            text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
            text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert!(prefers_openmetrics(prometheus3));
        assert!(prefers_openmetrics("application/openmetrics-text"));
        assert!(!prefers_openmetrics("*/*"));
        assert!(!prefers_openmetrics("text/plain;version=0.0.4"));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;q=0.2,text/plain;q=0.9"
        ));
        assert!(!prefers_openmetrics("application/openmetrics-text;q=0"));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;version=2.0.0"
        ));
    }

    #[test]
    fn helpers_enforce_the_naming_rules() {
        let metrics = Metrics::new();
        let reason = |r: Result<()>| match r {
            Err(TelemetryError::InvalidMetricName { reason, .. }) => reason,
            other => panic!("expected a naming error, got {other:?}"),
        };
        let counter = |name| metrics.counter_vec(name, "h", &[]).map(drop);
        let gauge = |name| metrics.gauge_vec(name, "h", &[]).map(drop);
        assert!(reason(counter("fn_invocations_total")).contains("patchbay_"));
        assert!(reason(counter("patchbay_fn_invocations")).contains("_total"));
        assert!(reason(gauge("patchbay_depth_total")).contains("only counters"));
    }

    #[test]
    fn registering_the_same_name_twice_is_an_error() {
        let metrics = Metrics::new();
        metrics
            .counter_vec("patchbay_x_total", "h", &["a"])
            .unwrap();
        let err = metrics
            .counter_vec("patchbay_x_total", "h", &["a"])
            .unwrap_err();
        assert!(
            matches!(&err, TelemetryError::MetricRegistration { name, source: prometheus::Error::AlreadyReg } if name == "patchbay_x_total"),
            "{err:?}"
        );
    }

    #[test]
    fn numbers_use_prometheus_spellings_for_special_values() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(0.25), "0.25");
    }
}
