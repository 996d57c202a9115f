//! `patchbay status`: every running component and every deployed function, from what the
//! bus says right now.
//!
//! Components are whoever answers `$SRV.INFO` (NATS micro discovery, see
//! `patchbay_bus::discovery`): core services, runtime nodes, gateways — and any other
//! micro service on the bus. `$SRV.STATS` is sampled twice, `--interval` apart, and the
//! difference of the counters gives the rates. Functions come from the registry (active
//! version, trigger) joined with the endpoints components report for them (metadata
//! `function`): who serves each one, and its invocations and errors summed over them.
//!
//! Health is what discovery can tell: `ok` when the component answered INFO and the last
//! STATS sample, `unresponsive` when it stopped answering in between, `degraded` when it
//! answers but reports an endpoint failed (metadata `failed`, `patchbay_bus::discovery::FAILED`
//! — a runtime node whose subscription to a function's trigger the server refused). Such a
//! function is loaded there but never fires: it is shown failed on that component, with
//! the reason, and counted in `failed_functions`. A function no component serves is shown
//! as served by nobody, which is worth a look.
//!
//! Not here: per-request detail (traces), history (Prometheus), or the workloads'
//! readiness probes (their admin listeners).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use patchbay_bus::Bus;
use patchbay_bus::discovery::{self, InfoResponse, StatsResponse, Verb};
use patchbay_registry::{FunctionSpec, Registry};
use serde::{Deserialize, Serialize};

/// `patchbay status` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON document `{ "components": [...], "functions": [...],
    /// "failed_functions": n }`.
    #[arg(long)]
    pub json: bool,
    /// Time between the two counter samples the rates come from (0s: no rates).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// How long to collect answers to each discovery request.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// What `patchbay status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Every component that answered, ordered by kind, identity and name.
    pub components: Vec<Component>,
    /// Every function in the registry (and any still served after removal), by name.
    pub functions: Vec<FunctionStatus>,
    /// How many of them failed on at least one component.
    #[serde(default)]
    pub failed_functions: usize,
}

/// Health as discovery sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Answered INFO and the last STATS sample.
    Ok,
    /// Answered INFO but not the last STATS sample.
    Unresponsive,
    /// Answers, but reports at least one endpoint failed.
    Degraded,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unresponsive => "unresponsive",
            Self::Degraded => "degraded",
        }
    }
}

/// One running component (one micro service instance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// `runtime`, `gateway`, `service` (the identity's kind), or `unknown`.
    pub kind: String,
    /// Micro service name (`patchbay-runtime`).
    pub name: String,
    /// Instance id.
    pub id: String,
    /// Bus identity `kind/name`, when the component reports it.
    pub identity: Option<String>,
    /// Version.
    pub version: String,
    /// Start time (RFC 3339), from STATS.
    pub started: Option<String>,
    /// Seconds since start.
    pub uptime_seconds: Option<u64>,
    /// Health.
    pub health: Health,
    /// Requests handled since start, over all endpoints.
    pub requests: u64,
    /// Of those, failed.
    pub errors: u64,
    /// Requests per second over the sampling interval.
    pub requests_per_second: Option<f64>,
    /// Errors per second over the sampling interval.
    pub errors_per_second: Option<f64>,
    /// The component's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint of a component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// Name.
    pub name: String,
    /// Subject (or HTTP route).
    pub subject: String,
    /// Metadata (function endpoints: `function`, `version`, `trigger`; `failed`).
    pub metadata: BTreeMap<String, String>,
    /// Why the endpoint does not work, none while it does.
    #[serde(default)]
    pub failed: Option<String>,
    /// Requests handled since start.
    pub requests: u64,
    /// Failed.
    pub errors: u64,
    /// Requests per second.
    pub requests_per_second: Option<f64>,
    /// Errors per second.
    pub errors_per_second: Option<f64>,
}

/// One function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionStatus {
    /// Name.
    pub name: String,
    /// Active version in the registry (`None`: removed, still served somewhere).
    pub active_version: Option<u32>,
    /// Trigger of the active version.
    pub trigger: String,
    /// Components serving it, with the version each serves.
    pub served_by: Vec<Serving>,
    /// Invocations since those components started.
    pub invocations: u64,
    /// Failed invocations.
    pub errors: u64,
    /// Invocations per second.
    pub invocations_per_second: Option<f64>,
    /// Errors per second.
    pub errors_per_second: Option<f64>,
    /// Whether it failed on at least one of the components serving it.
    #[serde(default)]
    pub failed: bool,
}

/// A component serving a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    /// The component's identity (`runtime/node-1`), or its service name.
    pub component: String,
    /// Its instance id.
    pub id: String,
    /// Version it serves.
    pub version: Option<u32>,
    /// Why the function does not work there (its trigger failed), none while it does.
    #[serde(default)]
    pub failed: Option<String>,
}

/// Run `patchbay status`.
pub async fn run(args: StatusArgs, bus: Bus) -> anyhow::Result<()> {
    let status = collect(&bus, args.interval, args.timeout).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Ask the bus and the registry; see the module documentation.
pub async fn collect(bus: &Bus, interval: Duration, timeout: Duration) -> anyhow::Result<Status> {
    let (info_subject, stats_subject) = (Verb::Info.subject(None), Verb::Stats.subject(None));
    let first_at = tokio::time::Instant::now();
    let (infos, first) = tokio::join!(
        discovery::gather::<InfoResponse>(bus, &info_subject, timeout),
        discovery::gather::<StatsResponse>(bus, &stats_subject, timeout),
    );
    let infos = infos.context("cannot ask for $SRV.INFO")?;
    let first = first.context("cannot ask for $SRV.STATS")?;
    let (second, elapsed) = if interval.is_zero() {
        (None, None)
    } else {
        tokio::time::sleep_until(first_at + interval).await;
        let second_at = tokio::time::Instant::now();
        let second = discovery::gather::<StatsResponse>(bus, &stats_subject, timeout)
            .await
            .context("cannot ask for $SRV.STATS")?;
        (Some(second), Some(second_at - first_at))
    };
    let specs = match Registry::open(&bus.jetstream()).await {
        Ok(registry) => registry.list().await.unwrap_or_else(|e| {
            eprintln!("warning: cannot list the function registry: {e}");
            Vec::new()
        }),
        Err(e) => {
            eprintln!("warning: cannot open the function registry: {e}");
            Vec::new()
        }
    };
    Ok(assemble(
        Samples {
            infos,
            first,
            second,
            elapsed,
        },
        &specs,
        time::OffsetDateTime::now_utc(),
    ))
}

/// What discovery answered.
struct Samples {
    infos: Vec<InfoResponse>,
    first: Vec<StatsResponse>,
    /// The later STATS sample (none when the interval is zero).
    second: Option<Vec<StatsResponse>>,
    /// Time between the two samples.
    elapsed: Option<Duration>,
}

/// Counters of one endpoint: (requests, errors).
type Counts = (u64, u64);

fn counts_by_endpoint(sample: &[StatsResponse]) -> HashMap<(&str, &str), Counts> {
    sample
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(move |e| {
                (
                    (s.id.as_str(), e.name.as_str()),
                    (e.num_requests, e.num_errors),
                )
            })
        })
        .collect()
}

fn per_second(later: u64, earlier: u64, elapsed: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let delta = later.saturating_sub(earlier) as f64;
    delta / elapsed.as_secs_f64().max(f64::EPSILON)
}

fn assemble(samples: Samples, specs: &[FunctionSpec], now: time::OffsetDateTime) -> Status {
    let first = counts_by_endpoint(&samples.first);
    let latest_sample = samples.second.as_deref().unwrap_or(&samples.first);
    let latest = counts_by_endpoint(latest_sample);
    let stats_of: HashMap<&str, &StatsResponse> =
        latest_sample.iter().map(|s| (s.id.as_str(), s)).collect();
    let rate = |id: &str, endpoint: &str| -> (Option<f64>, Option<f64>) {
        let (Some(elapsed), Some(before), Some(after)) = (
            samples.elapsed,
            first.get(&(id, endpoint)),
            latest.get(&(id, endpoint)),
        ) else {
            return (None, None);
        };
        (
            Some(per_second(after.0, before.0, elapsed)),
            Some(per_second(after.1, before.1, elapsed)),
        )
    };

    let mut components: Vec<Component> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for info in &samples.infos {
        if !seen.insert(info.id.as_str()) {
            continue;
        }
        let stats = stats_of.get(info.id.as_str());
        let endpoints: Vec<EndpointStatus> = info
            .endpoints
            .iter()
            .map(|e| {
                let (requests, errors) = latest
                    .get(&(info.id.as_str(), e.name.as_str()))
                    .copied()
                    .unwrap_or_default();
                let (requests_per_second, errors_per_second) = rate(&info.id, &e.name);
                EndpointStatus {
                    name: e.name.clone(),
                    subject: e.subject.clone(),
                    metadata: e.metadata.clone(),
                    failed: e.failed().map(str::to_owned),
                    requests,
                    errors,
                    requests_per_second,
                    errors_per_second,
                }
            })
            .collect();
        // Rates need both samples from this component; with no endpoint they are zero.
        let rated = stats.is_some() && samples.elapsed.is_some();
        let sum = |f: fn(&EndpointStatus) -> Option<f64>| -> Option<f64> {
            if rated {
                // `+ 0.0`: an empty f64 sum is -0.0, which would print as "-0.0".
                endpoints
                    .iter()
                    .map(f)
                    .sum::<Option<f64>>()
                    .map(|r| r + 0.0)
            } else {
                None
            }
        };
        let identity = info.metadata.get("identity").cloned();
        let started = stats.map(|s| s.started.clone());
        let uptime_seconds = started.as_deref().and_then(|s| uptime(s, now));
        components.push(Component {
            kind: identity
                .as_deref()
                .and_then(|i| i.split_once('/'))
                .map_or_else(|| "unknown".to_owned(), |(kind, _)| kind.to_owned()),
            name: info.name.clone(),
            id: info.id.clone(),
            identity,
            version: info.version.clone(),
            started,
            uptime_seconds,
            health: if stats.is_none() {
                Health::Unresponsive
            } else if endpoints.iter().any(|e| e.failed.is_some()) {
                Health::Degraded
            } else {
                Health::Ok
            },
            requests: endpoints.iter().map(|e| e.requests).sum(),
            errors: endpoints.iter().map(|e| e.errors).sum(),
            requests_per_second: sum(|e| e.requests_per_second),
            errors_per_second: sum(|e| e.errors_per_second),
            metadata: info.metadata.clone(),
            endpoints,
        });
    }
    components.sort_by(|a, b| {
        (&a.kind, &a.identity, &a.name, &a.id).cmp(&(&b.kind, &b.identity, &b.name, &b.id))
    });

    let mut functions: BTreeMap<String, FunctionStatus> = specs
        .iter()
        .map(|spec| {
            let active = spec.active_version().ok();
            let status = FunctionStatus {
                name: spec.name.clone(),
                active_version: Some(spec.active),
                trigger: active.map(|v| v.trigger.to_string()).unwrap_or_default(),
                served_by: Vec::new(),
                invocations: 0,
                errors: 0,
                invocations_per_second: None,
                errors_per_second: None,
                failed: false,
            };
            (spec.name.clone(), status)
        })
        .collect();
    for component in &components {
        for endpoint in &component.endpoints {
            let Some(name) = endpoint.metadata.get("function") else {
                continue;
            };
            let function = functions
                .entry(name.clone())
                .or_insert_with(|| FunctionStatus {
                    name: name.clone(),
                    active_version: None,
                    trigger: endpoint
                        .metadata
                        .get("trigger")
                        .cloned()
                        .unwrap_or_default(),
                    served_by: Vec::new(),
                    invocations: 0,
                    errors: 0,
                    invocations_per_second: None,
                    errors_per_second: None,
                    failed: false,
                });
            function.failed |= endpoint.failed.is_some();
            function.served_by.push(Serving {
                component: component
                    .identity
                    .clone()
                    .unwrap_or_else(|| component.name.clone()),
                id: component.id.clone(),
                version: endpoint
                    .metadata
                    .get("version")
                    .and_then(|v| v.parse().ok()),
                failed: endpoint.failed.clone(),
            });
            function.invocations += endpoint.requests;
            function.errors += endpoint.errors;
            if let Some(r) = endpoint.requests_per_second {
                *function.invocations_per_second.get_or_insert(0.0) += r;
            }
            if let Some(r) = endpoint.errors_per_second {
                *function.errors_per_second.get_or_insert(0.0) += r;
            }
        }
    }
    let functions: Vec<FunctionStatus> = functions.into_values().collect();
    Status {
        components,
        failed_functions: functions.iter().filter(|f| f.failed).count(),
        functions,
    }
}

fn uptime(started: &str, now: time::OffsetDateTime) -> Option<u64> {
    let started =
        time::OffsetDateTime::parse(started, &time::format_description::well_known::Rfc3339)
            .ok()?;
    u64::try_from((now - started).whole_seconds()).ok()
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn rate_text(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"))
}

/// The human-readable tables.
#[must_use]
pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<18} {:<8} {:<20} {:<8} {:>9} {:<12} {:>9} {:>7} {:>7} {:>7}",
        "KIND",
        "NAME",
        "ID",
        "IDENTITY",
        "VERSION",
        "UPTIME",
        "HEALTH",
        "REQUESTS",
        "ERRORS",
        "REQ/S",
        "ERR/S"
    );
    for c in &status.components {
        let _ = writeln!(
            out,
            "{:<8} {:<18} {:<8} {:<20} {:<8} {:>9} {:<12} {:>9} {:>7} {:>7} {:>7}",
            c.kind,
            c.name,
            short(&c.id),
            c.identity.as_deref().unwrap_or("-"),
            c.version,
            c.uptime_seconds.map_or_else(
                || "-".to_owned(),
                |s| humantime::format_duration(Duration::from_secs(s)).to_string()
            ),
            c.health.as_str(),
            c.requests,
            c.errors,
            rate_text(c.requests_per_second),
            rate_text(c.errors_per_second),
        );
    }
    if status.components.is_empty() {
        let _ = writeln!(out, "(no component answered $SRV.INFO)");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:<32} {:<28} {:>11} {:>7} {:>7} {:>7}",
        "FUNCTION", "VERSION", "TRIGGER", "SERVED BY", "INVOCATIONS", "ERRORS", "INV/S", "ERR/S"
    );
    for f in &status.functions {
        let served = if f.served_by.is_empty() {
            "nobody".to_owned()
        } else {
            f.served_by
                .iter()
                .map(|s| match s.failed {
                    Some(_) => format!("{} FAILED", s.component),
                    None => s.component.clone(),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:<32} {:<28} {:>11} {:>7} {:>7} {:>7}",
            f.name,
            f.active_version
                .map_or_else(|| "removed".to_owned(), |v| v.to_string()),
            f.trigger,
            served,
            f.invocations,
            f.errors,
            rate_text(f.invocations_per_second),
            rate_text(f.errors_per_second),
        );
    }
    if status.functions.is_empty() {
        let _ = writeln!(out, "(no function deployed)");
    }
    if status.failed_functions > 0 {
        let _ = writeln!(
            out,
            "\n{} failed (loaded, but the trigger does not work):",
            match status.failed_functions {
                1 => "1 function".to_owned(),
                n => format!("{n} functions"),
            }
        );
        for f in status.functions.iter().filter(|f| f.failed) {
            for (s, why) in f
                .served_by
                .iter()
                .filter_map(|s| s.failed.as_deref().map(|why| (s, why)))
            {
                let _ = writeln!(
                    out,
                    "  {} on {} (trigger {}): {why}",
                    f.name, s.component, f.trigger
                );
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use patchbay_bus::discovery::{EndpointInfo, EndpointStats, INFO_RESPONSE, STATS_RESPONSE};

    use super::*;

    fn info(name: &str, id: &str, identity: &str, functions: &[(&str, u32)]) -> InfoResponse {
        InfoResponse {
            kind: INFO_RESPONSE.into(),
            name: name.into(),
            id: id.into(),
            version: "0.1.0".into(),
            description: String::new(),
            metadata: BTreeMap::from([("identity".into(), identity.into())]),
            endpoints: functions
                .iter()
                .map(|(f, v)| EndpointInfo {
                    name: (*f).into(),
                    subject: format!("patchbay.v1.fn.{f}.invoke"),
                    queue_group: String::new(),
                    metadata: BTreeMap::from([
                        ("function".into(), (*f).into()),
                        ("version".into(), v.to_string()),
                        ("trigger".into(), "invoke".into()),
                    ]),
                })
                .collect(),
        }
    }

    fn stats(id: &str, counts: &[(&str, u64, u64)]) -> StatsResponse {
        StatsResponse {
            kind: STATS_RESPONSE.into(),
            name: String::new(),
            id: id.into(),
            version: "0.1.0".into(),
            metadata: BTreeMap::new(),
            started: "2026-01-01T00:00:00Z".into(),
            endpoints: counts
                .iter()
                .map(|(name, requests, errors)| EndpointStats {
                    name: (*name).into(),
                    subject: String::new(),
                    queue_group: String::new(),
                    num_requests: *requests,
                    num_errors: *errors,
                    processing_time: 0,
                    average_processing_time: 0,
                    last_error: String::new(),
                    data: None,
                })
                .collect(),
        }
    }

    fn now() -> time::OffsetDateTime {
        time::macros::datetime!(2026-01-01 00:01:00 UTC)
    }

    #[test]
    fn rates_are_counter_differences_over_the_interval_summed_per_function() {
        let status = assemble(
            Samples {
                infos: vec![
                    info("patchbay-runtime", "a", "runtime/node-1", &[("echo", 2)]),
                    info("patchbay-runtime", "b", "runtime/node-2", &[("echo", 2)]),
                ],
                first: vec![
                    stats("a", &[("echo", 10, 1)]),
                    stats("b", &[("echo", 0, 0)]),
                ],
                second: Some(vec![
                    stats("a", &[("echo", 30, 1)]),
                    stats("b", &[("echo", 10, 2)]),
                ]),
                elapsed: Some(Duration::from_secs(2)),
            },
            &[],
            now(),
        );
        assert_eq!(status.components.len(), 2);
        let a = &status.components[0];
        assert_eq!(a.identity.as_deref(), Some("runtime/node-1"));
        assert_eq!(a.kind, "runtime");
        assert_eq!((a.requests, a.errors), (30, 1));
        assert_eq!(a.requests_per_second, Some(10.0));
        assert_eq!(a.uptime_seconds, Some(60));
        let echo = &status.functions[0];
        assert_eq!(echo.name, "echo");
        assert_eq!(echo.active_version, None, "not in the registry");
        assert_eq!(echo.served_by.len(), 2);
        assert_eq!((echo.invocations, echo.errors), (40, 3));
        assert_eq!(echo.invocations_per_second, Some(15.0));
        assert_eq!(echo.errors_per_second, Some(1.0));
    }

    #[test]
    fn a_component_missing_from_the_last_stats_sample_is_unresponsive_without_rates() {
        let status = assemble(
            Samples {
                infos: vec![info("patchbay-gateway", "g", "gateway/gateway", &[])],
                first: vec![stats("g", &[])],
                second: Some(vec![]),
                elapsed: Some(Duration::from_secs(1)),
            },
            &[],
            now(),
        );
        assert_eq!(status.components[0].health, Health::Unresponsive);
        assert_eq!(status.components[0].requests_per_second, None);
        assert!(render(&status).contains("unresponsive"));
    }

    #[test]
    fn without_a_second_sample_counts_are_shown_and_rates_are_not() {
        let status = assemble(
            Samples {
                infos: vec![info(
                    "patchbay-runtime",
                    "a",
                    "runtime/node-1",
                    &[("echo", 1)],
                )],
                first: vec![stats("a", &[("echo", 5, 0)])],
                second: None,
                elapsed: None,
            },
            &[],
            now(),
        );
        let c = &status.components[0];
        assert_eq!(
            (c.health, c.requests, c.requests_per_second),
            (Health::Ok, 5, None)
        );
        assert_eq!(status.functions[0].invocations, 5);
    }

    #[test]
    fn a_function_failed_on_a_node_is_counted_flagged_with_its_reason_and_degrades_the_node() {
        let why = "server error: Permissions Violation for Subscription to \"crm.v1.in\"";
        let mut refusing = info(
            "patchbay-runtime",
            "a",
            "runtime/node-1",
            &[("echo", 1), ("crm", 1)],
        );
        refusing.endpoints[1]
            .metadata
            .insert(discovery::FAILED.into(), why.into());
        refusing.endpoints[1]
            .metadata
            .insert("trigger".into(), "subject:crm.v1.in".into());
        let status = assemble(
            Samples {
                infos: vec![
                    refusing,
                    info("patchbay-runtime", "b", "runtime/node-2", &[("crm", 1)]),
                ],
                first: vec![stats("a", &[]), stats("b", &[])],
                second: None,
                elapsed: None,
            },
            &[],
            now(),
        );
        assert_eq!(status.failed_functions, 1);
        let health: Vec<Health> = status.components.iter().map(|c| c.health).collect();
        assert_eq!(health, [Health::Degraded, Health::Ok]);
        let crm = status.functions.iter().find(|f| f.name == "crm").unwrap();
        assert!(crm.failed);
        let on: Vec<(&str, Option<&str>)> = crm
            .served_by
            .iter()
            .map(|s| (s.component.as_str(), s.failed.as_deref()))
            .collect();
        assert_eq!(
            on,
            [("runtime/node-1", Some(why)), ("runtime/node-2", None)]
        );
        assert!(
            !status
                .functions
                .iter()
                .find(|f| f.name == "echo")
                .unwrap()
                .failed
        );

        let table = render(&status);
        assert!(table.contains("degraded"), "{table}");
        assert!(
            table.contains("runtime/node-1 FAILED,runtime/node-2"),
            "{table}"
        );
        assert!(table.contains("1 function failed"), "{table}");
        assert!(
            table.contains(&format!(
                "crm on runtime/node-1 (trigger subject:crm.v1.in): {why}"
            )),
            "{table}"
        );
        // The JSON document says the same, and one without the new fields still reads.
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["failed_functions"], 1);
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("failed_functions");
        for f in old["functions"].as_array_mut().unwrap() {
            f.as_object_mut().unwrap().remove("failed");
        }
        let read: Status = serde_json::from_value(old).unwrap();
        assert_eq!(read.failed_functions, 0);
    }

    #[test]
    fn healthy_status_has_no_failed_section() {
        let status = assemble(
            Samples {
                infos: vec![info(
                    "patchbay-runtime",
                    "a",
                    "runtime/node-1",
                    &[("echo", 1)],
                )],
                first: vec![stats("a", &[])],
                second: None,
                elapsed: None,
            },
            &[],
            now(),
        );
        assert_eq!(status.failed_functions, 0);
        assert_eq!(status.components[0].health, Health::Ok);
        assert!(!render(&status).contains("failed"), "{}", render(&status));
    }
}
