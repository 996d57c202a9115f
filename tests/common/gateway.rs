//! A running `patchbay-gateway` for tests, and the HTTP client that talks to it.

use std::path::PathBuf;
use std::time::Duration;

use super::{Process, Stack, eventually, free_port};

/// A gateway process and how to reach it.
pub struct Gateway {
    /// The process (killed on drop).
    pub process: Process,
    /// `http://127.0.0.1:<port>` (or `https://…` with TLS).
    pub url: String,
    /// `127.0.0.1:<port>` of its admin listener.
    pub admin: String,
}

impl Stack {
    /// Start `patchbay-gateway` as `gateway/gateway` on a free port with `args` added, and
    /// wait until it listens and has read the registry.
    pub async fn spawn_gateway(&self, args: &[&str]) -> Gateway {
        self.spawn_gateway_with(args, "http").await
    }

    /// Like [`Stack::spawn_gateway`], with the URL scheme given (`https` when `args`
    /// turn TLS on).
    pub async fn spawn_gateway_with(&self, args: &[&str], scheme: &str) -> Gateway {
        self.spawn_gateway_with_env(args, scheme, &[]).await
    }

    /// Like [`Stack::spawn_gateway_with`], with `extra_env` set last (so it overrides the
    /// defaults), e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub async fn spawn_gateway_with_env(
        &self,
        args: &[&str],
        scheme: &str,
        extra_env: &[(&str, &str)],
    ) -> Gateway {
        let address_file: PathBuf = self
            .state_dir()
            .join(format!("gateway-{}.addr", free_port()));
        let admin = format!("127.0.0.1:{}", free_port());
        let address_arg = address_file.to_str().unwrap().to_owned();
        let mut all = vec![
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            address_arg.as_str(),
            "--admin-listen",
            admin.as_str(),
        ];
        all.extend_from_slice(args);
        let mut env = vec![("PATCHBAY_LOG", "info,patchbay_gateway=debug")];
        env.extend_from_slice(extra_env);
        let process =
            self.spawn_binary("patchbay-gateway", "gateway/gateway", "gateway", &all, &env);
        let address = eventually(Duration::from_secs(20), "gateway address file", || {
            let file = address_file.clone();
            async move { std::fs::read_to_string(file).ok().filter(|a| !a.is_empty()) }
        })
        .await;
        eventually(Duration::from_secs(20), "gateway ready", || {
            let admin = admin.clone();
            async move {
                super::http_get(&admin, "/readyz")
                    .await
                    .filter(|(status, _)| *status == 200)
            }
        })
        .await;
        Gateway {
            process,
            url: format!("{scheme}://{address}"),
            admin,
        }
    }

    /// Create an API token with `scopes` (and extra flags such as `--rate 1`) through the
    /// CLI; returns the token string.
    #[must_use]
    pub fn token(&self, name: &str, scopes: &[&str], extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--name", name, "--json"];
        for scope in scopes {
            args.extend_from_slice(&["--scope", scope]);
        }
        args.extend_from_slice(extra);
        let out = self.cli(&args).success();
        out.json()["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .to_owned()
    }
}

/// An HTTP client for tests (HTTP/1.1 and h2; trusts `extra_root` when given).
#[must_use]
pub fn http_client(extra_root: Option<&[u8]>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = extra_root {
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}
