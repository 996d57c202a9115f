//! How a gateway answers NATS micro discovery (`$SRV.PING|INFO|STATS`): as
//! `patchbay-gateway`, metadata `listen` (the bound public address) and `identity`.
//!
//! Endpoints, with counters since the process started, read from the gateway's metrics
//! when asked:
//!
//! * one per HTTP function mounted here, named after the function, `subject` = its route,
//!   metadata `function`, `version`, `trigger` (`http:<route>`) and `digest` — the same
//!   shape runtime nodes give their functions, so `patchbay status` sums them alike;
//! * `http`: every other route (events, request-reply, invoke, OpenAPI), `data` broken
//!   down by route template.
//!
//! A request counts as an error when its status is 5xx: 4xx answers are the caller's
//! mistake and the gateway did its job.
//!
//! Not here: the protocol (`patchbay_bus::discovery`), the metrics (`observe`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use patchbay_bus::discovery::{self, Discovery, EndpointReport, Registration};
use patchbay_bus::discovery::{Labels, counter_children, has, histogram_sums, seconds};

use crate::server::{AppState, Shared};

/// The micro service name of gateways.
pub const SERVICE_NAME: &str = "patchbay-gateway";

/// The endpoint holding every route that is not an HTTP function.
pub const HTTP_ENDPOINT: &str = "http";

/// Start answering discovery for the gateway listening on `listen` (a warning, not a
/// failure, when that is refused).
pub async fn register(state: &Shared, listen: SocketAddr) -> Option<Discovery> {
    let registration = Registration::new(
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "Patchbay HTTP gateway: events, request-reply, invoke and HTTP functions",
    )
    .meta("listen", listen.to_string());
    let reported = Arc::clone(state);
    discovery::register(&state.bus, registration, move || endpoints(&reported)).await
}

#[derive(Default)]
struct Tally {
    requests: u64,
    errors: u64,
}

impl Tally {
    fn add(&mut self, labels: &Labels, value: u64) {
        self.requests += value;
        if labels.get("status").is_some_and(|s| s.starts_with('5')) {
            self.errors += value;
        }
    }
}

fn endpoints(state: &AppState) -> Vec<EndpointReport> {
    let requests = counter_children(&state.metrics.requests);
    let durations = histogram_sums(&state.metrics.duration);
    let time_of = |route: &str| {
        seconds(
            durations
                .iter()
                .filter(|(labels, _)| has(labels, "route", route))
                .map(|(_, sum)| sum)
                .sum(),
        )
    };

    let mut functions = state.functions.all();
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    let mut reports: Vec<EndpointReport> = functions
        .iter()
        .map(|f| {
            let route = format!("fn:{}", f.name);
            let mut tally = Tally::default();
            for (labels, value) in &requests {
                if has(labels, "route", &route) {
                    tally.add(labels, *value);
                }
            }
            EndpointReport {
                name: f.name.clone(),
                subject: f.route.clone(),
                queue_group: String::new(),
                metadata: BTreeMap::from([
                    ("function".to_owned(), f.name.clone()),
                    ("version".to_owned(), f.version.to_string()),
                    ("trigger".to_owned(), format!("http:{}", f.route)),
                    ("digest".to_owned(), f.digest.clone()),
                ]),
                requests: tally.requests,
                errors: tally.errors,
                processing_time: time_of(&route),
                data: Some(serde_json::json!({ "version": f.version })),
            }
        })
        .collect();

    // Everything else, by route template; functions that were unmounted since stay out.
    let mut routes: BTreeMap<&str, Tally> = BTreeMap::new();
    for (labels, value) in &requests {
        let route = labels.get("route").map_or("", String::as_str);
        if !route.starts_with("fn:") {
            routes.entry(route).or_default().add(labels, *value);
        }
    }
    let time = durations
        .iter()
        .filter(|(labels, _)| labels.get("route").is_some_and(|r| !r.starts_with("fn:")))
        .map(|(_, sum)| sum)
        .sum();
    reports.push(EndpointReport {
        name: HTTP_ENDPOINT.to_owned(),
        subject: "/v1/...".to_owned(),
        queue_group: String::new(),
        metadata: BTreeMap::new(),
        requests: routes.values().map(|t| t.requests).sum(),
        errors: routes.values().map(|t| t.errors).sum(),
        processing_time: seconds(time),
        data: Some(serde_json::json!({
            "routes": routes
                .iter()
                .map(|(route, t)| (*route, serde_json::json!({ "requests": t.requests, "errors": t.errors })))
                .collect::<BTreeMap<_, _>>(),
        })),
    });
    reports
}
