//! Test helper: a real nats-server on a random 127.0.0.1 port with a temporary JetStream
//! directory, killed on drop. Tests of this crate only; the TLS harness for the whole system
//! lives under `tests/common`.
//!
//! The binary comes from `PATCHBAY_NATS_SERVER`, else `$PATCHBAY_TOOLS/venv/bin/nats-server`,
//! else `<repo>/.tools/venv/bin/nats-server` (what `scripts/install-nats.sh` installs). A
//! missing binary fails the test with that instruction rather than skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to write its ports file before the test gives up.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// Path of the nats-server binary to test with.
pub fn nats_server_binary() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates: Vec<PathBuf> = [
        std::env::var_os("PATCHBAY_NATS_SERVER").map(PathBuf::from),
        std::env::var_os("PATCHBAY_TOOLS").map(|t| PathBuf::from(t).join("venv/bin/nats-server")),
        Some(repo.join(".tools/venv/bin/nats-server")),
    ]
    .into_iter()
    .flatten()
    .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found (looked at {candidates:?}); run scripts/install-nats.sh or set PATCHBAY_NATS_SERVER"
            )
        })
}

/// A running nats-server.
pub struct TestNats {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl TestNats {
    /// Plain (no TLS, no auth) server with JetStream.
    pub fn start_plain() -> Self {
        Self::start(|dir| {
            format!(
                "listen: \"127.0.0.1:-1\"\njetstream {{ store_dir: {:?} }}\n",
                dir.join("js").display().to_string()
            )
        })
    }

    /// Server with the config `render` returns; it receives the temporary directory (for
    /// store dirs and certificates). The config must listen on port `-1` (random); this
    /// helper adds `ports_file_dir` to learn the port.
    pub fn start(render: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "{}\nports_file_dir: {:?}\n",
            render(dir.path()),
            dir.path().display().to_string()
        );
        let config_path = dir.path().join("nats.conf");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            dir,
            port: 0,
        };
        server.port = server.wait_for_port();
        server
    }

    fn wait_for_port(&mut self) -> u16 {
        let started = Instant::now();
        let ports_file = self
            .dir
            .path()
            .join(format!("nats-server_{}.ports", self.child.id()));
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = json["nats"][0].as_str()
            {
                let port = url.rsplit(':').next().unwrap().parse().unwrap();
                return port;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nats-server exited with {status}:\n{}", self.log());
            }
            assert!(
                started.elapsed() < STARTUP_DEADLINE,
                "nats-server did not start:\n{}",
                self.log()
            );
            // Readiness polling, not a timing assumption.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `tls://127.0.0.1:<port>`.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
