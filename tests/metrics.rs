//! Metrics checked with Prometheus' own tools: every binary's classic `/metrics` passes
//! `promtool check metrics`, OpenMetrics carries trace-id exemplars on the function duration
//! histogram, edge metrics show who sent to whom, and a real Prometheus server (the Debian
//! `prometheus` package, installed by `scripts/install-test-tools.sh`) scrapes all binaries
//! — negotiating OpenMetrics, so its parser checks that format too — and stores exemplars.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use patchbay_tests::gateway::http_client;
use patchbay_tests::{Process, Stack, eventually, free_port, metric_value, repo_root};
use reqwest::StatusCode;
use serde_json::Value;

const READY: Duration = Duration::from_secs(60);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

/// `name` from `PATCHBAY_<NAME>` or the PATH; panics saying how to install it otherwise.
fn tool(name: &str) -> PathBuf {
    let variable = format!("PATCHBAY_{}", name.to_ascii_uppercase());
    if let Some(path) = std::env::var_os(&variable) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH (or {variable}): run scripts/install-test-tools.sh")
        })
}

/// `GET /metrics` on an admin listener with `accept` (or none): `(content type, body)`.
async fn scrape(client: &reqwest::Client, admin: &str, accept: Option<&str>) -> (String, String) {
    let mut request = client.get(format!("http://{admin}/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "/metrics of {admin}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

/// `promtool check metrics` with `body` on stdin: `(passed, what it said)`.
fn promtool_check(body: &str) -> (bool, String) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

/// The 32-hex trace id of the first exemplar on a sample line of `family` in an
/// OpenMetrics body.
fn first_exemplar(body: &str, family: &str) -> Option<String> {
    body.lines()
        .filter(|l| l.starts_with(family))
        .find_map(|l| l.split_once(" # {trace_id=\"").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_once('"'))
        .map(|(id, _)| id.to_owned())
}

/// A Prometheus server scraping `targets` every second, with exemplar storage on.
struct Prometheus {
    _process: Process,
    _dir: tempfile::TempDir,
    url: String,
}

impl Prometheus {
    fn start(stack: &Stack, targets: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: patchbay\n    static_configs:\n      \
                 - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={listen}"),
            "--enable-feature=exemplar-storage".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::spawn(
            "prometheus",
            &tool("prometheus"),
            &args,
            &[],
            &stack.prepared.state.logs(),
        );
        Self {
            _process: process,
            _dir: dir,
            url: format!("http://{listen}"),
        }
    }

    /// `GET <api path>`'s `data`, or `None` while the server is not answering yet.
    async fn api(&self, client: &reqwest::Client, path_and_query: &str) -> Option<Value> {
        let response = client
            .get(format!("{}{path_and_query}", self.url))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_binary_serves_metrics_that_promtool_and_a_prometheus_server_accept() {
    let stack = Stack::start().await;
    let client = http_client(None);

    let runtime_admin = format!("127.0.0.1:{}", free_port());
    let _runtime = stack.spawn_runtime_with_env(
        "node-1",
        &[("PATCHBAY_ADMIN_LISTEN", runtime_admin.as_str())],
    );
    let gateway = stack.spawn_gateway(&[]).await;
    let routing_admin = format!("127.0.0.1:{}", free_port());
    let rules = repo_root().join("deploy/routing.toml");
    let _routing = stack.spawn_binary(
        "patchbay-routing",
        "service/routing",
        "routing",
        &[
            "--rules",
            rules.to_str().unwrap(),
            "--admin-listen",
            &routing_admin,
        ],
        &[],
    );
    let agents_admin = format!("127.0.0.1:{}", free_port());
    let agents_config = repo_root().join("deploy/agents.toml");
    let _agents = stack.spawn_binary(
        "patchbay-agents",
        "service/agents",
        "agents",
        &[
            "run",
            "--config",
            agents_config.to_str().unwrap(),
            "--admin-listen",
            &agents_admin,
        ],
        &[],
    );
    for admin in [&runtime_admin, &routing_admin, &agents_admin] {
        patchbay_tests::wait_ready(admin, READY).await;
    }

    // Traffic: the gateway invokes a function on the runtime node, and stores an incoming
    // call that the routing service consumes.
    let _ = stack.deploy(
        "echo",
        "echo",
        &[
            "--config",
            "out=cc.v1.tests.echoed",
            "--publish",
            "cc.v1.tests.echoed",
        ],
    );
    let token = stack.token("metrics", &["admin"], &[]);
    for _ in 0..3 {
        let response = client
            .post(format!("{}/v1/functions/echo/invoke", gateway.url))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(r#"{"hello":"metrics"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let response = client
        .post(format!(
            "{}/v1/events/cc.v1.calls.m-1.incoming",
            gateway.url
        ))
        .bearer_auth(&token)
        .header("ce-specversion", "1.0")
        .header("ce-id", "metrics-call-1")
        .header("ce-source", "/tests/telephony")
        .header("ce-type", patchbay_protocol::payload::CallIncoming::TYPE)
        .header("content-type", "application/json")
        .body(r#"{"call_id":"m-1","caller":"+15550100"}"#)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    // Edge metrics: each receiver names its sender, ids collapsed out of the subject.
    let received = |from: &str, to: &str, class: &str| {
        format!(
            "patchbay_bus_messages_received_total{{from=\"{from}\",subject_class=\"{class}\",to=\"{to}\"}}"
        )
    };
    let invoke_edge = received(
        "gateway/gateway",
        "runtime/node-1",
        "patchbay.v1.fn.echo.invoke",
    );
    let call_edge = received(
        "gateway/gateway",
        "service/routing",
        "cc.v1.calls.*.incoming",
    );
    for (admin, series) in [(&runtime_admin, &invoke_edge), (&routing_admin, &call_edge)] {
        eventually(READY, series, || async {
            let (_, body) = scrape(&client, admin, None).await;
            (metric_value(&body, series) >= 1.0).then_some(())
        })
        .await;
    }
    let (_, gateway_body) = scrape(&client, &gateway.admin, None).await;
    assert_eq!(
        metric_value(
            &gateway_body,
            "patchbay_bus_messages_published_total{from=\"gateway/gateway\",subject_class=\"patchbay.v1.fn.echo.invoke\"}"
        ),
        3.0,
        "{gateway_body}"
    );
    assert!(
        !gateway_body.contains("m-1"),
        "a call id leaked into a label"
    );

    // Classic text by default, and promtool finds nothing wrong with any binary's.
    let admins = [
        ("runtime", runtime_admin.as_str()),
        ("gateway", gateway.admin.as_str()),
        ("routing", routing_admin.as_str()),
        ("agents", agents_admin.as_str()),
    ];
    for (name, admin) in admins {
        let (content_type, body) = scrape(&client, admin, None).await;
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{name}: {content_type}"
        );
        assert!(
            !body.contains("trace_id"),
            "{name}: classic text carries no exemplars"
        );
        assert!(
            body.contains("patchbay_telemetry_spans_dropped_total{reason=\"queue_full\"} 0"),
            "{name} has no dropped-spans counter:\n{body}"
        );
        let (passed, said) = promtool_check(&body);
        assert!(
            passed,
            "promtool check metrics rejects {name}'s /metrics:\n{said}\n{body}"
        );
    }

    // OpenMetrics on request, with the invocation's trace id on the duration histogram.
    let (content_type, body) = scrape(&client, &runtime_admin, Some(OPENMETRICS)).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let exemplar = first_exemplar(&body, "patchbay_fn_duration_seconds_bucket")
        .unwrap_or_else(|| panic!("no exemplar on patchbay_fn_duration_seconds:\n{body}"));
    assert!(
        exemplar.len() == 32 && exemplar.bytes().all(|b| b.is_ascii_hexdigit()),
        "{exemplar}"
    );
    let (_, body) = scrape(&client, &gateway.admin, Some(OPENMETRICS)).await;
    assert!(
        first_exemplar(&body, "patchbay_gateway_request_duration_seconds_bucket").is_some(),
        "no exemplar on the gateway's request histogram:\n{body}"
    );

    // A real Prometheus scrapes every binary and can answer queries about them.
    let prometheus = Prometheus::start(
        &stack,
        &[
            &runtime_admin,
            &gateway.admin,
            &routing_admin,
            &agents_admin,
        ],
    );
    let targets = eventually(READY, "every Prometheus target to be up", || async {
        let data = prometheus.api(&client, "/api/v1/targets").await?;
        let targets = data["activeTargets"].as_array()?.clone();
        (targets.len() == 4 && targets.iter().all(|t| t["health"] == "up")).then_some(targets)
    })
    .await;
    for target in &targets {
        assert_eq!(target["lastError"], "", "{target}");
    }
    let series = eventually(
        READY,
        "patchbay_fn_invocations_total in Prometheus",
        || async {
            let data = prometheus
                .api(&client, "/api/v1/query?query=patchbay_fn_invocations_total")
                .await?;
            let result = data["result"].as_array()?.clone();
            (!result.is_empty()).then_some(result)
        },
    )
    .await;
    assert_eq!(series[0]["metric"]["function"], "echo", "{series:?}");
    // Exemplars survive Prometheus' OpenMetrics parser into its exemplar storage.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let query = format!(
        "/api/v1/query_exemplars?query=patchbay_fn_duration_seconds_bucket&start={}&end={}",
        now - 3600,
        now + 3600
    );
    eventually(READY, "an exemplar stored by Prometheus", || async {
        let data = prometheus.api(&client, &query).await?;
        data.as_array()?
            .iter()
            .flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default())
            .any(|e| {
                e["labels"]["trace_id"]
                    .as_str()
                    .is_some_and(|t| t.len() == 32)
            })
            .then_some(())
    })
    .await;
}
