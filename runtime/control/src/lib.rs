//! What an operator's tooling calls to set up and guard a Patchbay installation: the
//! pieces `patchbay` (the CLI), `patchbay up`, the test bed and a Kubernetes job share.
//!
//! * [`access`]: the access policy (`deploy/access.toml`): groups of identities, their
//!   grants, owned subjects and the `[never]`/`[undeclared]` probes, checked on load;
//!   rendered into nats-server permissions and the host rules deploys are checked against;
//! * [`natsconf`]: the nats-server configuration (TLS, `verify_and_map`, JetStream,
//!   accounts and users) from the policy;
//! * [`streams`]: the JetStream declaration (`deploy/streams.toml`: streams, consumers,
//!   buckets, object stores) and the idempotent bootstrap that creates or updates them;
//! * [`certs`]: the dev CA and per-workload certificates (SPIFFE URI SANs), issue and
//!   renewal;
//! * [`admission`]: a deploy's triggers and allow-list checked against the stored policy
//!   before anything is stored;
//! * [`local`]: a state directory on this machine — certificates, rendered config, a
//!   nats-server child process — and the bootstrap, for `patchbay up` and tests.
//!
//! Not here: command-line parsing and rendering (`patchbay-cli`), the subject-pattern
//! algebra (`patchbay-bus`), function specs (`patchbay-host`'s registry), anything that
//! runs at request time.

pub mod access;
pub mod admission;
pub mod certs;
pub mod local;
pub mod natsconf;
pub mod streams;

#[cfg(test)]
mod test_nats;
