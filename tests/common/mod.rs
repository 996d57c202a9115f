//! The integration-test harness: a real nats-server with real mutual TLS and JetStream
//! per test (free port, temporary state, certificates generated at run time), and the
//! real Patchbay binaries from the target directory (`make test` builds them first).
//!
//! Nothing here is mocked: the server is the one `scripts/install-nats.sh` installs, the
//! certificates come from `patchbay-cli`'s CA code, and components are the ones
//! `scripts/build-wasm.sh` builds into `build/components/`. A missing prerequisite fails
//! the test with the command that provides it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod gateway;
pub mod otlp;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use patchbay_bus::{Bus, BusConfig};
use patchbay_control::certs::Identity;
use patchbay_control::local::{self, NatsPlan, NatsProcess, PreparedNats, StateDir};

/// The repository root.
#[must_use]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The nats-server binary: `PATCHBAY_NATS_SERVER`, else the project's own install.
#[must_use]
pub fn nats_server() -> PathBuf {
    let path = std::env::var_os("PATCHBAY_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/venv/bin/nats-server"));
    assert!(
        path.is_file(),
        "nats-server not found at {}: run `make test` (or scripts/install-nats.sh)",
        path.display()
    );
    path
}

/// A Patchbay binary built in the same target directory as this test.
#[must_use]
pub fn binary(name: &str) -> PathBuf {
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `make test` (it builds the binaries first) or `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// A component built by `scripts/build-wasm.sh`.
#[must_use]
pub fn component(name: &str) -> PathBuf {
    let dir = std::env::var_os("PATCHBAY_COMPONENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build/components"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "component {} not found: run `make wasm`",
        path.display()
    );
    path
}

/// Parse `kind/name`.
#[must_use]
pub fn identity(text: &str) -> Identity {
    text.parse()
        .unwrap_or_else(|e| panic!("bad identity {text:?}: {e}"))
}

/// Poll `check` until it returns `Some`, at most `limit`; panics with `what` otherwise.
/// Readiness polling, not a timing assertion.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running nats-server with TLS, JetStream and the bootstrapped assets, in a temporary
/// state directory that also holds every identity's certificate.
pub struct Stack {
    pub nats: NatsProcess,
    pub prepared: PreparedNats,
    dir: tempfile::TempDir,
    http_port: Option<u16>,
}

impl Stack {
    /// Start with the policy's identities (cli/admin, service/routing, service/agents,
    /// runtime/node-1, runtime/node-2, gateway/gateway).
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Start with extra identities too (e.g. `runtime/node-3`).
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::start_planned(extra, None).await
    }

    /// Start with nats-server's monitoring endpoint on a free port (see
    /// [`Stack::monitoring`]), e.g. to read `/connz`.
    pub async fn start_monitored() -> Self {
        Self::start_planned(&[], Some(free_port())).await
    }

    /// `127.0.0.1:<port>` of the monitoring endpoint ([`Stack::start_monitored`]).
    #[must_use]
    pub fn monitoring(&self) -> String {
        let port = self.http_port.expect("started with Stack::start_monitored");
        format!("127.0.0.1:{port}")
    }

    async fn start_planned(extra: &[&str], http_port: Option<u16>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plan = NatsPlan {
            state: StateDir(dir.path().to_owned()),
            deploy_dir: repo_root().join("deploy"),
            port: 0,
            http_port,
            extra_identities: extra.iter().map(|i| identity(i)).collect(),
            subject_prefix: String::new(),
        };
        let prepared = local::prepare(&plan).unwrap();
        let nats = local::start_nats(&nats_server(), &prepared).await.unwrap();
        let stack = Self {
            nats,
            prepared,
            dir,
            http_port,
        };
        let admin = stack.admin().await;
        local::bootstrap(&admin, &stack.prepared.deploy_dir)
            .await
            .unwrap();
        stack
    }

    /// The state directory (certificates, config, logs).
    #[must_use]
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `tls://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.nats.url
    }

    /// Connection settings for `identity` (`kind/name`).
    #[must_use]
    pub fn bus_config(&self, identity_text: &str) -> BusConfig {
        self.prepared
            .bus_config(&self.nats.url, &identity(identity_text))
    }

    /// Connect as `identity`.
    pub async fn connect(&self, identity_text: &str) -> Bus {
        patchbay_bus::connect(&self.bus_config(identity_text))
            .await
            .unwrap_or_else(|e| panic!("{identity_text} cannot connect: {e}"))
    }

    /// Connect as `cli/admin`.
    pub async fn admin(&self) -> Bus {
        self.connect("cli/admin").await
    }

    /// The `PATCHBAY_NATS_*` variables for `identity`.
    #[must_use]
    pub fn env_for(&self, identity_text: &str) -> Vec<(String, String)> {
        let files = self.prepared.state.identity(&identity(identity_text));
        vec![
            ("PATCHBAY_NATS_URL".into(), self.nats.url.clone()),
            (
                "PATCHBAY_NATS_CA".into(),
                self.prepared.state.ca().display().to_string(),
            ),
            (
                "PATCHBAY_NATS_CERT".into(),
                files.cert.display().to_string(),
            ),
            ("PATCHBAY_NATS_KEY".into(), files.key.display().to_string()),
            (
                "PATCHBAY_STATE_DIR".into(),
                self.dir.path().display().to_string(),
            ),
        ]
    }

    /// Start `patchbay-runtime` as `runtime/<node>`.
    #[must_use]
    pub fn spawn_runtime(&self, node: &str) -> Process {
        self.spawn_runtime_with_env(node, &[])
    }

    /// Start `patchbay-runtime` as `runtime/<node>` with `extra_env` set last (so it
    /// overrides the defaults), e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[must_use]
    pub fn spawn_runtime_with_env(&self, node: &str, extra_env: &[(&str, &str)]) -> Process {
        let mut env = self.env_for(&format!("runtime/{node}"));
        env.push(("PATCHBAY_NODE".into(), node.into()));
        env.push(("PATCHBAY_DRAIN_TIMEOUT".into(), "5s".into()));
        env.push(("PATCHBAY_LOG".into(), "info,patchbay_host=debug".into()));
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Process::spawn(
            &format!("runtime-{node}"),
            &binary("patchbay-runtime"),
            &[],
            &env,
            &self.prepared.state.logs(),
        )
    }

    /// Start the binary `bin` (e.g. `patchbay-routing`) as `identity_text` (e.g.
    /// `service/routing`), with its standard environment plus `extra_env` (set last, so it
    /// overrides), logging under the stack's log directory as `log_name`.
    #[must_use]
    pub fn spawn_binary(
        &self,
        bin: &str,
        identity_text: &str,
        log_name: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Process {
        let mut env = self.env_for(identity_text);
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Process::spawn(
            log_name,
            &binary(bin),
            args,
            &env,
            &self.prepared.state.logs(),
        )
    }

    /// Run the `patchbay` CLI as `cli/admin` and wait for it.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(binary("patchbay"));
        cmd.args(args).stdin(Stdio::null());
        for (k, v) in self.env_for("cli/admin") {
            cmd.env(k, v);
        }
        let output = cmd.output().expect("run patchbay");
        CliOutput(output)
    }

    /// Deploy `component` as `name` with extra `patchbay fn deploy` flags, waiting until
    /// a runtime node serves it; panics with the CLI's output if it fails.
    #[must_use]
    pub fn deploy(&self, component_name: &str, name: &str, flags: &[&str]) -> serde_json::Value {
        let path = component(component_name);
        let path = path.to_str().unwrap();
        let mut args = vec!["fn", "deploy", path, "--name", name, "--json"];
        args.extend_from_slice(flags);
        let out = self.cli(&args).success();
        let json: serde_json::Value = serde_json::from_str(out.stdout().trim())
            .unwrap_or_else(|e| panic!("deploy printed no JSON ({e}): {out:?}"));
        assert!(
            json["nodes"].as_array().is_some_and(|n| !n.is_empty()),
            "no runtime node serves {name}: {json}"
        );
        json
    }

    /// Deploy the demo `customer-lookup` function as `make up` does: it answers
    /// `cc.v1.customers.lookup` from its KV bucket, `standard` tier for unknown callers.
    pub fn deploy_customer_lookup(&self) -> serde_json::Value {
        self.deploy(
            "customer-lookup",
            "customer-lookup",
            &[
                "--trigger",
                "subject:cc.v1.customers.lookup",
                "--publish",
                "cc.v1.customers.lookup.reply",
                "--config",
                "default_tier=standard",
            ],
        )
    }
}

/// The output of a CLI run.
pub struct CliOutput(pub Output);

impl std::fmt::Debug for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.0.status.code(),
            self.stdout(),
            self.stderr()
        )
    }
}

impl CliOutput {
    #[must_use]
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    #[must_use]
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    #[must_use]
    pub fn ok(&self) -> bool {
        self.0.status.success()
    }
    /// Panic with the whole output unless the command succeeded.
    #[must_use]
    pub fn success(self) -> Self {
        assert!(self.ok(), "patchbay failed: {self:?}");
        self
    }
    /// Panic with the whole output unless the command failed.
    #[must_use]
    pub fn failure(self) -> Self {
        assert!(!self.ok(), "patchbay unexpectedly succeeded: {self:?}");
        self
    }
    /// stdout parsed as JSON.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout().trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// A child process, killed on drop; its output goes to a log file that is printed when a
/// test panics.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Spawn `program` with `args` and `env`, logging to `<log_dir>/<name>.log`.
    #[must_use]
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Self {
        std::fs::create_dir_all(log_dir).unwrap();
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
        self.kill9();
    }
}

/// The next message on `sub`, waiting at most `limit`; panics naming `what` otherwise.
pub async fn next_message(
    sub: &mut async_nats::Subscriber,
    limit: Duration,
    what: &str,
) -> async_nats::Message {
    use futures::StreamExt as _;
    match tokio::time::timeout(limit, sub.next()).await {
        Ok(Some(msg)) => msg,
        Ok(None) => panic!("subscription closed while waiting for {what}"),
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Poll `patchbay.v1.runtime.status` until every node in `nodes` answers — and, when
/// `function` is `Some((name, version))`, serves that version — at most `limit`; panics
/// naming what was missing otherwise. Readiness polling, not a timing assertion.
pub async fn wait_until_serving(
    bus: &Bus,
    nodes: &[&str],
    function: Option<(&str, u32)>,
    limit: Duration,
) {
    let what = match function {
        Some((name, version)) => format!("{nodes:?} to serve {name} v{version}"),
        None => format!("{nodes:?} to answer status requests"),
    };
    eventually(limit, &what, || async {
        let statuses = patchbay_cli::function::node_statuses(bus, Duration::from_millis(300)).await;
        nodes
            .iter()
            .all(|node| {
                statuses.iter().any(|s| {
                    s.node == *node
                        && function.is_none_or(|(name, version)| {
                            s.functions
                                .iter()
                                .any(|f| f.name == name && f.version == version)
                        })
                })
            })
            .then_some(())
    })
    .await;
}

/// `fn deploy` flags for the `misbehave` fixture on subject `cc.v1.tests.in`, answering
/// `ok` events on `cc.v1.tests.out`.
pub const MISBEHAVE_ON_SUBJECT: &[&str] = &[
    "--trigger",
    "subject:cc.v1.tests.in",
    "--publish",
    "cc.v1.tests.>",
    "--config",
    "out=cc.v1.tests.out",
];

/// A TCP port on 127.0.0.1 that was free a moment ago (for a child's admin listener).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET http://<addr><path>` over plain HTTP/1.0; `(status, body)`, or `None` while
/// nothing listens at `addr` yet.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The value of the Prometheus sample `series` (name with its labels exactly as
/// exposed, e.g. `patchbay_x_total{outcome="ok"}`) in a /metrics body; 0 when absent.
#[must_use]
pub fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// `deploy/routing.toml` with every schedule open around the clock, every day, and no
/// holidays, written into `dir`: end-to-end tests that need calls routed (not given the
/// closed treatment) must not depend on the hour or the date they run at.
#[must_use]
pub fn always_open_rules(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("deploy/routing.toml")).unwrap();
    let mut rules: toml::Table = text.parse().unwrap();
    let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let mut always = toml::Table::new();
    always.insert(
        "days".into(),
        toml::Value::Array(days.iter().map(|d| toml::Value::from(*d)).collect()),
    );
    always.insert("open".into(), "00:00".into());
    always.insert("close".into(), "24:00".into());
    if let Some(toml::Value::Array(schedules)) = rules.get_mut("schedules") {
        for schedule in schedules.iter_mut().filter_map(toml::Value::as_table_mut) {
            schedule.insert(
                "hours".into(),
                vec![toml::Value::Table(always.clone())].into(),
            );
            schedule.insert("holidays".into(), toml::Value::Array(Vec::new()));
        }
    }
    let path = dir.join("routing-always-open.toml");
    std::fs::write(&path, toml::to_string(&rules).unwrap()).unwrap();
    path
}

/// The sum of every series of the metric `name` whose labels contain `containing` (e.g.
/// `mode="atomic"`; `""` for all of them) in a /metrics body.
#[must_use]
pub fn metric_sum(body: &str, name: &str, containing: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            (labels.is_empty() || labels.starts_with('{'))
                .then_some(())
                .filter(|()| labels.contains(containing))?;
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// Durable publishing and consumer state (first used by tests/agents.rs)

/// Store a CloudEvent of type `ty` with JSON `data` on `subject` as `bus`, the way a
/// gateway or telephony adapter would (durable, `ce-id` as `Nats-Msg-Id`, `traceparent`
/// when given); returns the event id.
pub async fn publish_json(
    bus: &Bus,
    subject: &str,
    ty: &str,
    data: &serde_json::Value,
    traceparent: Option<&str>,
) -> String {
    let event = patchbay_bus::CloudEvent::new("/test", ty)
        .json(data)
        .unwrap();
    publish_raw_event(
        bus,
        subject,
        event.to_headers(),
        event.data.clone(),
        traceparent,
    )
    .await;
    event.id
}

/// Store `payload` with `headers` on `subject` as `bus` (no checks: for malformed input).
pub async fn publish_raw_event(
    bus: &Bus,
    subject: &str,
    mut headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
    traceparent: Option<&str>,
) {
    if let Some(tp) = traceparent {
        headers.insert("traceparent", tp);
    }
    if headers.get(async_nats::header::NATS_MESSAGE_ID).is_none() {
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            uuid::Uuid::new_v4().to_string().as_str(),
        );
    }
    bus.jetstream()
        .publish_with_headers(subject.to_owned(), headers, payload)
        .await
        .unwrap()
        .await
        .unwrap_or_else(|e| panic!("no stream stored {subject}: {e}"));
}

/// `(ack pending, pending)` of the durable consumer `consumer` on `stream`.
pub async fn consumer_backlog(admin: &Bus, stream: &str, consumer: &str) -> (usize, u64) {
    let stream = admin.jetstream().get_stream(stream).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(consumer).await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending)
}

/// Wait until every `(stream, consumer)` has nothing pending and nothing unacknowledged.
pub async fn wait_consumers_settled(admin: &Bus, consumers: &[(&str, &str)], limit: Duration) {
    eventually(limit, &format!("{consumers:?} to settle"), || async {
        for (stream, consumer) in consumers {
            if consumer_backlog(admin, stream, consumer).await != (0, 0) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// How many messages `stream` stores on subjects matching `filter`.
pub async fn stored_count(admin: &Bus, stream: &str, filter: &str) -> usize {
    use futures::TryStreamExt as _;
    let stream = admin.jetstream().get_stream(stream).await.unwrap();
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    subjects.iter().map(|(_, n)| n).sum()
}

/// Every message `stream` stores under `subject`, in stream order (read with an ordered
/// consumer, each within 10 s).
pub async fn stored_messages(
    admin: &Bus,
    stream: &str,
    subject: &str,
) -> Vec<async_nats::jetstream::Message> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt as _;
    let consumer = admin
        .jetstream()
        .get_stream(stream)
        .await
        .unwrap()
        .create_consumer(OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    for _ in 0..total {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stored message within 10 s")
            .expect("stream of stored messages ended early")
            .unwrap();
        out.push(msg);
    }
    out
}

/// The value of header `name` (empty when absent).
#[must_use]
pub fn header_value(headers: Option<&async_nats::HeaderMap>, name: &str) -> String {
    headers
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// Assert that `patchbay fn dlq ls <owner>` lists `count` dead letters, each with its
/// reason.
pub fn assert_dead_letters_with_reasons(stack: &Stack, owner: &str, count: usize) {
    let listed = stack.cli(&["fn", "dlq", "ls", owner, "--json"]).success();
    let letters = listed.json();
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), count, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l["error"].as_str().is_some_and(|e| !e.is_empty()))
    );
}

/// How many dead letters PATCHBAY_DLQ holds.
pub async fn dead_letter_count(admin: &Bus) -> u64 {
    admin
        .jetstream()
        .get_stream("PATCHBAY_DLQ")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Wait until `GET /readyz` on the admin listener `addr` answers 200.
pub async fn wait_ready(addr: &str, limit: Duration) {
    eventually(limit, &format!("{addr}/readyz to answer 200"), || async {
        http_get(addr, "/readyz")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
}
