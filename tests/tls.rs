//! Mutual TLS: who can connect and what they are told when they cannot.
//!
//! Every test runs against a real nats-server started by the harness with the rendered
//! config (`verify_and_map`, one user per SPIFFE id). Refusals are checked twice where the
//! bus client checks something itself (expired certificates): once through
//! `patchbay_bus::connect`, for the message an operator reads, and once with a raw
//! async-nats client that skips the client-side check, to prove the server refuses too.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use patchbay_bus::{BusConfig, ConnectError, ConnectErrorKind};
use patchbay_control::certs::{CertAuthority, DEFAULT_TRUST_DOMAIN, Validity};
use patchbay_tests::{Process, Stack, identity, nats_server};
use time::OffsetDateTime;

/// Upper bound on any connect attempt here: refusals must come back, not hang.
const LIMIT: Duration = Duration::from_secs(15);

/// `patchbay_bus::connect`, bounded, expecting a failure.
async fn refused(config: &BusConfig) -> ConnectError {
    match tokio::time::timeout(LIMIT, patchbay_bus::connect(config)).await {
        Ok(Ok(bus)) => panic!(
            "connected although it should have been refused (identity {:?})",
            bus.identity()
        ),
        Ok(Err(e)) => e,
        Err(_) => panic!("connect neither succeeded nor failed within {LIMIT:?}"),
    }
}

/// A raw async-nats connection trusting `ca`, with `client` as its certificate and key (or
/// none), bypassing every check `patchbay_bus::connect` makes before the server sees it.
async fn raw_connect(
    url: &str,
    ca: &Path,
    client: Option<(PathBuf, PathBuf)>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.to_owned())
        .connection_timeout(Duration::from_secs(5));
    if let Some((cert, key)) = client {
        options = options.add_client_certificate(cert, key);
    }
    tokio::time::timeout(LIMIT, options.connect(url))
        .await
        .unwrap_or_else(|_| panic!("raw connect to {url} did not finish within {LIMIT:?}"))
}

/// The server refused during the TLS handshake (a fatal alert), not for another reason
/// such as a closed port.
fn assert_tls_alert(err: &async_nats::ConnectError) {
    assert!(
        err.to_string().contains("fatal alert"),
        "expected the server to end the handshake with a fatal alert: {err}"
    );
}

/// A certificate for `who` issued by the stack's own CA into `dir` (not the state
/// directory, so the stack's certificates stay untouched).
fn issue_from_stack_ca(stack: &Stack, who: &str, dir: &Path, validity: Validity) -> BusConfig {
    let ca = CertAuthority::load(&stack.prepared.state.certs()).unwrap();
    let issued = ca.issue(&identity(who), dir, validity).unwrap();
    BusConfig::new(
        stack.url(),
        stack.prepared.state.ca(),
        issued.cert,
        issued.key,
    )
    .connect_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_the_right_client_certificate() {
    let stack = Stack::start().await;
    let bus = stack.connect("service/routing").await;
    let id = bus.identity().expect("the certificate carries a SPIFFE id");
    assert_eq!(
        id.to_string(),
        identity("service/routing").spiffe_id(DEFAULT_TRUST_DOMAIN)
    );
    assert_eq!(id.inbox_prefix(), "_INBOX.service.routing");
    assert!(bus.client().server_info().tls_required);
    // The server really serves this identity: a request only it answers, allowed for
    // routing by the policy (`$JS.API.INFO`).
    let account = tokio::time::timeout(LIMIT, bus.jetstream().query_account())
        .await
        .expect("JetStream answers in time");
    assert!(account.is_ok(), "routing may ask $JS.API.INFO: {account:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_connection_without_client_certificate() {
    let stack = Stack::start().await;
    let err = raw_connect(stack.url(), &stack.prepared.state.ca(), None)
        .await
        .map(|_| ())
        .expect_err("a connection without a client certificate must be refused");
    eprintln!("without a client certificate: {err} ({:?})", err.kind());
    assert_tls_alert(&err);

    // The same client with a certificate gets in: the refusal was about the certificate.
    let files = stack.prepared.state.identity(&identity("service/routing"));
    raw_connect(
        stack.url(),
        &stack.prepared.state.ca(),
        Some((files.cert, files.key)),
    )
    .await
    .expect("the same raw client with the routing certificate connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_certificate_from_another_ca() {
    let stack = Stack::start().await;
    let other = tempfile::tempdir().unwrap();
    let rogue =
        CertAuthority::init(other.path(), DEFAULT_TRUST_DOMAIN, Validity::days(30)).unwrap();
    let issued = rogue
        .issue(
            &identity("service/routing"),
            other.path(),
            Validity::default(),
        )
        .unwrap();
    // Same SPIFFE id, same trust domain, right server CA: only the issuer differs.
    let config = BusConfig::new(
        stack.url(),
        stack.prepared.state.ca(),
        &issued.cert,
        &issued.key,
    )
    .connect_timeout(Duration::from_secs(5));
    let err = refused(&config).await;
    eprintln!("certificate from another CA: {err}");
    assert!(
        matches!(
            err.kind(),
            ConnectErrorKind::Handshake | ConnectErrorKind::Unauthorized
        ),
        "unexpected kind {:?}: {err}",
        err.kind()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_expired_certificate_with_a_clear_error() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let validity = Validity::between(
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    );
    let config = issue_from_stack_ca(&stack, "service/routing", dir.path(), validity);

    let err = refused(&config).await;
    eprintln!("expired certificate: {err}");
    assert_eq!(err.kind(), ConnectErrorKind::CertificateValidity, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&config.cert.display().to_string()),
        "the message names the certificate file: {text}"
    );
    let year = |t: OffsetDateTime| t.year().to_string();
    assert!(
        text.contains("valid from") && text.contains("until"),
        "the message gives the validity period: {text}"
    );
    assert!(
        text.contains(&year(validity.not_before)) && text.contains(&year(validity.not_after)),
        "the message gives the dates: {text}"
    );
    let ConnectError::CertificateValidity {
        not_before,
        not_after,
        ..
    } = &err
    else {
        panic!("not a CertificateValidity error: {err:?}")
    };
    assert_ne!(not_before, not_after);

    // Skip the client-side check: the server must refuse the certificate by itself.
    let server = raw_connect(
        stack.url(),
        &stack.prepared.state.ca(),
        Some((config.cert.clone(), config.key.clone())),
    )
    .await
    .map(|_| ())
    .expect_err("the server must refuse an expired client certificate");
    eprintln!(
        "expired certificate, raw client: {server} ({:?})",
        server.kind()
    );
    assert_tls_alert(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_identity_the_access_policy_does_not_know() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Signed by the right CA, valid now, but no user is named by its SPIFFE id.
    let config = issue_from_stack_ca(&stack, "service/unknown", dir.path(), Validity::default());
    let err = refused(&config).await;
    eprintln!("unknown identity: {err}");
    assert!(
        matches!(
            err.kind(),
            ConnectErrorKind::Unauthorized | ConnectErrorKind::Handshake
        ),
        "unexpected kind {:?}: {err}",
        err.kind()
    );
}

/// A nats-server without TLS, on a free port; returns the process (killed on drop) and
/// its port, read from the ports file as `patchbay_control::local` does.
async fn plain_nats_server(dir: &Path) -> (Process, u16) {
    let ports_dir = dir.join("run");
    std::fs::create_dir_all(&ports_dir).unwrap();
    let config = dir.join("plain.conf");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:-1\nports_file_dir: {:?}\n",
            ports_dir.display().to_string()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let mut process = Process::spawn(
        "plain-nats",
        &nats_server(),
        &["-c", &config_arg],
        &[],
        &dir.join("logs"),
    );
    let ports_file = ports_dir.join(format!("nats-server_{}.ports", process.pid()));
    let port = patchbay_tests::eventually(LIMIT, "the plain nats-server's port", || {
        let running = process.is_running();
        let ports_file = ports_file.clone();
        async move {
            assert!(running, "plain nats-server exited at start");
            let text = std::fs::read_to_string(&ports_file).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json["nats"][0]
                .as_str()?
                .rsplit(':')
                .next()?
                .parse::<u16>()
                .ok()
        }
    })
    .await;
    (process, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_a_server_without_tls_clearly() {
    // Real credentials, so the only thing wrong is the server.
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_plain, port) = plain_nats_server(dir.path()).await;
    let mut config = stack.bus_config("service/routing");
    config.servers = vec![format!("tls://127.0.0.1:{port}")];
    let err = refused(&config).await;
    eprintln!("server without TLS: {err}");
    assert_eq!(err.kind(), ConnectErrorKind::TlsNotOffered, "{err}");

    // `nats://` instead of `tls://` must not fall back to plain text either.
    config.servers = vec![format!("nats://127.0.0.1:{port}")];
    let err = refused(&config).await;
    eprintln!("server without TLS (nats:// URL): {err}");
    assert_eq!(err.kind(), ConnectErrorKind::TlsNotOffered, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_an_unreachable_server() {
    let stack = Stack::start().await;
    // Bind then release a port so that nothing listens on it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut config = stack.bus_config("service/routing");
    config.servers = vec![format!("tls://127.0.0.1:{port}")];
    let err = refused(&config).await;
    eprintln!("closed port: {err}");
    assert_eq!(err.kind(), ConnectErrorKind::Unreachable, "{err}");
    assert!(
        err.to_string().contains(&port.to_string()),
        "the message names the address: {err}"
    );
}

/// The next notice on `notices` that contains `text` (within [`LIMIT`]).
async fn notice_containing(
    notices: &mut tokio::sync::broadcast::Receiver<patchbay_bus::BusNotice>,
    text: &str,
) -> String {
    next_notice(notices, text, |notice| notice.contains(text)).await
}

async fn next_notice(
    notices: &mut tokio::sync::broadcast::Receiver<patchbay_bus::BusNotice>,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> String {
    tokio::time::timeout(LIMIT, async {
        loop {
            let notice = notices.recv().await.unwrap().to_string();
            if wanted(&notice) {
                return notice;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no notice {what:?} within {LIMIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_used_without_a_restart_and_an_expired_or_foreign_one_is_refused()
{
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let fresh = || {
        Validity::between(
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
    };
    let config = issue_from_stack_ca(&stack, "service/routing", dir.path(), fresh())
        .cert_reload(Some(Duration::from_millis(100)));
    let bus = patchbay_bus::connect(&config).await.unwrap();
    let mut notices = bus.notices();
    let works = || async {
        tokio::time::timeout(LIMIT, bus.jetstream().query_account())
            .await
            .expect("JetStream answers in time")
            .expect("routing may ask $JS.API.INFO");
    };

    // An expired renewal is refused: the current pair stays and the connection carries on.
    let expired = Validity::between(
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    );
    issue_from_stack_ca(&stack, "service/routing", dir.path(), expired);
    let refusal = notice_containing(&mut notices, "refused").await;
    assert!(refusal.contains("not valid now"), "{refusal}");
    assert_eq!(bus.certificate_renewals(), 0);
    works().await;

    // So is a certificate for another identity: rotation renews, it never changes who we are.
    let other = tempfile::tempdir().unwrap();
    let agents = issue_from_stack_ca(&stack, "service/agents", other.path(), fresh());
    std::fs::copy(&agents.cert, &config.cert).unwrap();
    std::fs::copy(&agents.key, &config.key).unwrap();
    let refusal = notice_containing(&mut notices, "refused").await;
    assert!(refusal.contains("service/agents"), "{refusal}");
    assert_eq!(bus.certificate_renewals(), 0);
    works().await;

    // A renewed pair for the same identity is swapped in and the client reconnects with it.
    issue_from_stack_ca(&stack, "service/routing", dir.path(), fresh());
    notice_containing(&mut notices, "renewed").await;
    next_notice(&mut notices, "connected", |n| n == "connected").await;
    assert_eq!(bus.certificate_renewals(), 1);
    works().await;
}
