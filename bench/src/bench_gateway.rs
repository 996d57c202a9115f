//! `patchbay-bench --suite gateway`: `GET` on a trivial `wasi:http` component through the
//! gateway (token check, route lookup, metrics, trace span — everything a real request
//! gets) beside `wasmtime serve` on the same component file, with its default flags and
//! with the tuned pooling flags of PERFORMANCE.md, in the same run, loaded by `wrk` with
//! the same connections. Rounds alternate between the three; the median round is reported.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::suites::BenchArgs;
use patchbay_cli::function::{DeployArgs, FnCommand};
use patchbay_control::certs::Identity;

/// What every `wasmtime serve` run gets: the `wasi:cli` interfaces a Rust `wasm32-wasip2`
/// component imports through std (without them `wasmtime serve` refuses it).
const BASE_FLAGS: &[&str] = &["-Scli"];

/// The tuned pooling flags of PERFORMANCE.md, as `wasmtime serve` spells them.
const TUNED_FLAGS: &[&str] = &[
    "-Scli",
    "-O",
    "pooling-allocator=y",
    "-O",
    "pooling-memory-keep-resident=4194304",
    "-O",
    "pooling-table-keep-resident=1048576",
    "-O",
    "pooling-async-stack-keep-resident=1048576",
    "-O",
    "pooling-pagemap-scan=auto",
];

/// A child process killed (and reaped) when dropped.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One wrk round.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait until `GET url` (with `token`) answers 200.
async fn wait_for_200(url: &str, token: Option<&str>, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if http_get(url, token)
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("{url} did not answer 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET http://<host:port><path>` over plain HTTP/1.0 (with a bearer token when given):
/// status and body, or `None` while nothing answers.
pub(crate) async fn http_get(url: &str, token: Option<&str>) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Run wrk against `url` and read requests/s and the latency percentiles.
fn wrk(args: &BenchArgs, url: &str, token: Option<&str>) -> anyhow::Result<Round> {
    let mut command = Command::new(&args.wrk);
    command.args([
        "-t2",
        &format!("-c{}", args.concurrency),
        &format!("-d{}s", args.duration.as_secs().max(1)),
        "--latency",
    ]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = command
        .arg(url)
        .output()
        .with_context(|| format!("cannot run {} (apt-get install wrk)", args.wrk.display()))?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> anyhow::Result<Round> {
    let mut round = Round::default();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => round.rps = v.parse()?,
            (Some("50%"), Some(v)) => round.p50 = parse_latency(v)?,
            (Some("99%"), Some(v)) => round.p99 = parse_latency(v)?,
            (Some("Non-2xx"), _) => {
                round.errors += line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
            (Some("Socket"), Some("errors:")) => {
                round.errors += line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if round.rps == 0.0 {
        bail!("no Requests/sec in wrk's output:\n{text}");
    }
    Ok(round)
}

fn parse_latency(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("latency {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse()?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        other => bail!("unknown latency unit {other:?}"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn wasmtime_serve(
    wasmtime: &Path,
    component: &Path,
    port: u16,
    flags: &[&str],
) -> anyhow::Result<Killed> {
    let child = Command::new(wasmtime)
        .arg("serve")
        .args(flags)
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .arg(component)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (cargo install wasmtime-cli --version 48.0.8 --locked; `make bench` does it)",
                wasmtime.display()
            )
        })?;
    Ok(Killed(child))
}

/// A binary installed next to this `patchbay` (`make build-release` puts them there).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the patchbay binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{name} not found next to {}: `make build-release`",
            exe.display()
        );
    }
    Ok(path)
}

/// A duration in whole microseconds, for the benchmark tables.
pub(crate) fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Run the gateway benchmark.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let component = crate::suites::component(args, "http-echo")?;
    if !args.wasmtime.is_file() {
        bail!(
            "{} not found: `make bench` installs wasmtime-cli 48.0.8 there (or pass --wasmtime)",
            args.wasmtime.display()
        );
    }
    let bed = crate::suites::Testbed::start(args).await?;
    let (dir, state, nats, admin) = (&bed.dir, &bed.prepared.state, &bed.nats, &bed.admin);

    let gateway_port = free_port()?;
    let identity = Identity::new("gateway", "gateway")?;
    let files = state.identity(&identity);
    let log = dir.path().join("gateway.log");
    let gateway_process = Killed(
        Command::new(sibling("patchbay-gateway")?)
            .args(["--listen", &format!("127.0.0.1:{gateway_port}")])
            // The limiter still runs on every request; it just never refuses the load.
            .args(["--rate", "100000000", "--burst", "100000000"])
            .env(patchbay_cli::envfile::NATS_URL, &nats.url)
            .env(patchbay_cli::envfile::NATS_CA, state.ca())
            .env(patchbay_cli::envfile::NATS_CERT, &files.cert)
            .env(patchbay_cli::envfile::NATS_KEY, &files.key)
            .env("PATCHBAY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("gateway.err"))?)
            .spawn()
            .context("cannot start patchbay-gateway")?,
    );
    patchbay_cli::function::run(
        FnCommand::Deploy(DeployArgs {
            max_deliver: 1,
            timeout: Duration::from_secs(5),
            memory_mib: 16,
            concurrency: 1024,
            wait: Duration::ZERO,
            json: true,
            ..DeployArgs::new(component.clone(), "bench-http", "http:/bench/...")
        }),
        admin.clone(),
    )
    .await?;
    let token = patchbay_cli::token::create_token(
        admin,
        "bench",
        vec![patchbay_gateway::token::Scope::Admin],
        None,
    )
    .await?;
    let gateway_url = format!("http://127.0.0.1:{gateway_port}/bench/hello");
    if let Err(e) = wait_for_200(&gateway_url, Some(&token), Duration::from_secs(60)).await {
        let log = std::fs::read_to_string(dir.path().join("gateway.err")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        bail!(
            "{e}; gateway log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    let default_port = free_port()?;
    let tuned_port = free_port()?;
    let _default = wasmtime_serve(&args.wasmtime, &component, default_port, BASE_FLAGS)?;
    let _tuned = wasmtime_serve(&args.wasmtime, &component, tuned_port, TUNED_FLAGS)?;
    let default_url = format!("http://127.0.0.1:{default_port}/bench/hello");
    let tuned_url = format!("http://127.0.0.1:{tuned_port}/bench/hello");
    wait_for_200(&default_url, None, Duration::from_secs(60)).await?;
    wait_for_200(&tuned_url, None, Duration::from_secs(60)).await?;

    println!(
        "gateway bench: GET on http-echo ({} KiB component), wrk -t2 -c{} --latency, {} rounds × {:?}; \
         the gateway checks a bearer token, records metrics and a span per request",
        std::fs::metadata(&component)?.len() / 1024,
        args.concurrency,
        args.rounds,
        args.duration
    );
    let targets: [(&str, &str, Option<&str>); 3] = [
        ("wasmtime serve, tuned pooling", &tuned_url, None),
        ("wasmtime serve -Scli (defaults)", &default_url, None),
        ("patchbay gateway", &gateway_url, Some(&token)),
    ];
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds {
        for (i, (name, url, token)) in targets.iter().enumerate() {
            let result = wrk(args, url, *token)?;
            eprintln!(
                "  round {} {:<32} {:>9.0} req/s  p50 {:>8}  p99 {:>8}",
                round + 1,
                name,
                result.rps,
                micros(result.p50),
                micros(result.p99)
            );
            rounds[i].push(result);
        }
    }
    let medians: Vec<Round> = rounds
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            r[r.len() / 2]
        })
        .collect();
    println!();
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>7}",
        "", "req/s", "p50", "p99", "errors"
    );
    for ((name, _, _), r) in targets.iter().zip(&medians) {
        println!(
            "{:<32} {:>10.0} {:>10} {:>10} {:>7}",
            name,
            r.rps,
            micros(r.p50),
            micros(r.p99),
            r.errors
        );
    }
    let (tuned, gateway) = (medians[0], medians[2]);
    println!();
    println!(
        "gateway / tuned wasmtime serve: {:.2}× throughput (target ≥ 1.0×), p99 {} vs {} (target: no worse)",
        gateway.rps / tuned.rps,
        micros(gateway.p99),
        micros(tuned.p99)
    );
    drop(gateway_process);
    drop(bed);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_throughput_and_percentiles_from_wrk_output() {
        let out = "Running 4s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n  \
                   Latency Distribution\n     50%    2.51ms\n     75%    3.00ms\n     90%    4.10ms\n     \
                   99%  812.00us\n  80000 requests in 4.00s, 9.00MB read\n  \
                   Non-2xx or 3xx responses: 3\nRequests/sec:  20001.50\nTransfer/sec:      2.25MB\n";
        let round = parse_wrk(out).unwrap();
        assert_eq!(round.rps, 20001.5);
        assert_eq!(round.p50, Duration::from_micros(2510));
        assert_eq!(round.p99, Duration::from_micros(812));
        assert_eq!(round.errors, 3);
    }
}
