//! Workload identities and the dev certificate authority that vouches for them.
//!
//! Every bus connection presents a client certificate whose only URI SAN is the workload's
//! SPIFFE id, `spiffe://<trust-domain>/<kind>/<name>`; nats-server maps that id to a user
//! (`verify_and_map`) whose permissions come from `deploy/access.toml` (see
//! [`crate::access`]). This module owns:
//!
//! * [`Identity`] — the `kind/name` pair, its SPIFFE id, its file stem and its private
//!   reply-inbox prefix;
//! * [`CertAuthority`] — a self-signed dev CA (`ca.crt`, `ca.key`) that issues client
//!   certificates (client-auth EKU) and the nats-server certificate (server-auth EKU);
//! * [`inspect`] — what a certificate file says, for tests and `patchbay certs` listings.
//!
//! It does not decide what an identity may do (that is [`crate::access`]) and it is not a
//! production PKI: keys are ECDSA P-256 generated in-process, written with mode 0600, and
//! never leave the certificate directory. Production deployments issue the same SANs with
//! their own CA (cert-manager, SPIRE) and only reuse [`Identity`].

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::{Duration, OffsetDateTime};

/// Trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "patchbay.local";
/// Lifetime of dev workload and server certificates, in days.
pub const DEFAULT_VALIDITY_DAYS: i64 = 30;
/// Lifetime of the dev CA, in days: longer than the leaves so that re-issuing leaves (which
/// `patchbay certs` may do at any time) does not require restarting everything on a new CA.
pub const DEFAULT_CA_VALIDITY_DAYS: i64 = 365;
/// Host names and addresses the local nats-server certificate is valid for by default.
pub const DEFAULT_SERVER_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];
/// File stem of the nats-server certificate and key in the certificate directory.
pub const SERVER_FILE_STEM: &str = "server-nats";
/// Prefix of every reply inbox; each identity gets `_INBOX.<kind>.<name>` under it.
pub const INBOX_ROOT: &str = "_INBOX";

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
/// Certificates are back-dated by this much so that a peer whose clock is slightly behind
/// does not reject a certificate issued a moment ago.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);
const MAX_TOKEN_LEN: usize = 63;

/// Errors about identity strings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The input is not `kind/name`.
    #[error("identity {input:?} is not of the form kind/name (for example runtime/node-1)")]
    Malformed {
        /// What was given.
        input: String,
    },
    /// One of the two parts has characters outside `[a-z0-9-]` or does not start with a
    /// letter or digit.
    #[error(
        "identity {input:?}: {part} {token:?} must match [a-z0-9][a-z0-9-]* and be at most 63 characters"
    )]
    BadToken {
        /// What was given.
        input: String,
        /// `kind` or `name`.
        part: &'static str,
        /// The offending part.
        token: String,
    },
}

/// Errors from the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A trust domain that cannot appear in a SPIFFE id.
    #[error(
        "trust domain {trust_domain:?} must be a lowercase DNS-like name ([a-z0-9.-], no scheme, no path)"
    )]
    InvalidTrustDomain {
        /// What was given.
        trust_domain: String,
    },
    /// Reading or writing a file failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done (`read`, `write`, `create directory`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused to build a key or certificate.
    #[error("failed to generate {what}")]
    Generate {
        /// What was being generated.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A file on disk is not the certificate or key it should be.
    #[error("{path} is not a usable certificate or key: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Only one of `ca.crt` / `ca.key` exists.
    #[error(
        "certificate directory {dir} has only one of ca.crt and ca.key; remove it or restore the other"
    )]
    IncompleteCa {
        /// The certificate directory.
        dir: PathBuf,
    },
    /// No CA in the directory.
    #[error("no certificate authority in {dir} (run `patchbay certs` first)")]
    MissingCa {
        /// The certificate directory.
        dir: PathBuf,
    },
    /// The existing CA was created for another trust domain.
    #[error(
        "the CA in {dir} is for trust domain {existing:?}, not {requested:?}; use another directory or remove it"
    )]
    TrustDomainMismatch {
        /// The certificate directory.
        dir: PathBuf,
        /// Trust domain of the CA on disk.
        existing: String,
        /// Trust domain asked for.
        requested: String,
    },
    /// `not_before` is not before `not_after`.
    #[error(
        "certificate validity is empty: not_before {not_before} is not before not_after {not_after}"
    )]
    EmptyValidity {
        /// Start of validity.
        not_before: OffsetDateTime,
        /// End of validity.
        not_after: OffsetDateTime,
    },
    /// A server host that is neither an IP address nor a DNS name.
    #[error("server host {host:?} is neither an IP address nor a DNS name")]
    InvalidHost {
        /// What was given.
        host: String,
    },
}

/// Result of certificate operations.
pub type Result<T, E = CertError> = std::result::Result<T, E>;

/// A workload identity, `kind/name` (for example `runtime/node-1`, `service/routing`).
///
/// Both parts match `[a-z0-9][a-z0-9-]*`, so the identity can be used unchanged as two
/// NATS subject tokens, a file name and a SPIFFE path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    kind: String,
    name: String,
}

impl Identity {
    /// Builds an identity from its two parts, validating both.
    pub fn new(kind: &str, name: &str) -> Result<Self, IdentityError> {
        let input = format!("{kind}/{name}");
        check_token(&input, "kind", kind)?;
        check_token(&input, "name", name)?;
        Ok(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The administrative identity, the only one granted every subject.
    #[must_use]
    pub fn admin() -> Self {
        Self {
            kind: "cli".to_owned(),
            name: "admin".to_owned(),
        }
    }

    /// The workload kind (`service`, `runtime`, `gateway`, `cli`, ...).
    #[must_use]
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The workload name within its kind.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `spiffe://<trust_domain>/<kind>/<name>`: the certificate's URI SAN and the
    /// nats-server user name.
    #[must_use]
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/{}/{}", self.kind, self.name)
    }

    /// `<kind>-<name>`: the stem of this identity's `.crt` / `.key` files.
    #[must_use]
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.kind, self.name)
    }

    /// `_INBOX.<kind>.<name>`: this identity's reply-inbox prefix. The bus client sets it as
    /// async-nats `custom_inbox_prefix`; the access policy lets each identity subscribe only
    /// below its own prefix, so no workload can read another's replies.
    #[must_use]
    pub fn inbox_prefix(&self) -> String {
        format!("{INBOX_ROOT}.{}.{}", self.kind, self.name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, IdentityError> {
        let Some((kind, name)) = input.split_once('/') else {
            return Err(IdentityError::Malformed {
                input: input.to_owned(),
            });
        };
        if name.contains('/') {
            return Err(IdentityError::Malformed {
                input: input.to_owned(),
            });
        }
        check_token(input, "kind", kind)?;
        check_token(input, "name", name)?;
        Ok(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// Whether `token` is a valid identity part (`[a-z0-9][a-z0-9-]*`, at most 63 characters).
pub(crate) fn is_identity_token(token: &str) -> bool {
    let mut chars = token.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && token.len() <= MAX_TOKEN_LEN
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn check_token(input: &str, part: &'static str, token: &str) -> Result<(), IdentityError> {
    if is_identity_token(token) {
        Ok(())
    } else {
        Err(IdentityError::BadToken {
            input: input.to_owned(),
            part,
            token: token.to_owned(),
        })
    }
}

/// Checks that a trust domain can be the authority part of a SPIFFE id.
pub fn validate_trust_domain(trust_domain: &str) -> Result<()> {
    let ok = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && !trust_domain.starts_with(['.', '-'])
        && !trust_domain.ends_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidTrustDomain {
            trust_domain: trust_domain.to_owned(),
        })
    }
}

/// The period a certificate is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: OffsetDateTime,
    /// Last instant the certificate is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a few minutes ago (clock-skew allowance) until `days` days from now.
    #[must_use]
    pub fn days(days: i64) -> Self {
        Self::from_now(Duration::days(days))
    }

    /// From a few minutes ago (clock-skew allowance) until `lifetime` from now.
    #[must_use]
    pub fn from_now(lifetime: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + lifetime,
        }
    }

    /// An explicit period (tests use one in the past to make an expired certificate).
    #[must_use]
    pub fn between(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        Self {
            not_before,
            not_after,
        }
    }

    /// X.509 times have whole-second precision; truncating up front makes what is
    /// written equal to what is read back.
    fn truncated(self) -> Self {
        let whole = |t: OffsetDateTime| t.replace_nanosecond(0).unwrap_or(t);
        Self {
            not_before: whole(self.not_before),
            not_after: whole(self.not_after),
        }
    }

    fn check(&self) -> Result<()> {
        if self.not_before < self.not_after {
            Ok(())
        } else {
            Err(CertError::EmptyValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            })
        }
    }
}

impl Default for Validity {
    /// [`DEFAULT_VALIDITY_DAYS`] from now.
    fn default() -> Self {
        Self::days(DEFAULT_VALIDITY_DAYS)
    }
}

/// Paths of an issued certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// PEM certificate (`<stem>.crt`).
    pub cert: PathBuf,
    /// PEM PKCS#8 private key (`<stem>.key`, mode 0600).
    pub key: PathBuf,
}

impl IssuedCert {
    /// Where the certificate and key of `identity` live in `dir` (whether or not they exist).
    #[must_use]
    pub fn paths(dir: &Path, identity: &Identity) -> Self {
        Self::for_stem(dir, &identity.file_stem())
    }

    /// Where the nats-server certificate and key live in `dir`.
    #[must_use]
    pub fn server_paths(dir: &Path) -> Self {
        Self::for_stem(dir, SERVER_FILE_STEM)
    }

    fn for_stem(dir: &Path, stem: &str) -> Self {
        Self {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    /// Whether both files exist.
    #[must_use]
    pub fn exists(&self) -> bool {
        self.cert.is_file() && self.key.is_file()
    }
}

/// A dev certificate authority stored as `ca.crt` / `ca.key` in a directory.
pub struct CertAuthority {
    dir: PathBuf,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Creates the CA in `dir` unless one is already there, in which case it is loaded
    /// (idempotent). Fails if the existing CA belongs to another trust domain.
    pub fn init(dir: &Path, trust_domain: &str, validity: Validity) -> Result<Self> {
        validate_trust_domain(trust_domain)?;
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let ca = Self::load(dir)?;
                if ca.trust_domain != trust_domain {
                    return Err(CertError::TrustDomainMismatch {
                        dir: dir.to_owned(),
                        existing: ca.trust_domain,
                        requested: trust_domain.to_owned(),
                    });
                }
                return Ok(ca);
            }
            (false, false) => {}
            _ => {
                return Err(CertError::IncompleteCa {
                    dir: dir.to_owned(),
                });
            }
        }
        let validity = validity.truncated();
        validity.check()?;

        let mut params = CertificateParams::default();
        params.distinguished_name = ca_name(trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = generate_key("CA key")?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: "CA certificate".to_owned(),
                source,
            })?;

        create_private_dir(dir)?;
        // Key first: a crash between the two writes leaves an IncompleteCa error rather than
        // a certificate whose key is lost.
        write_private(&key_path, &key.serialize_pem())?;
        write_public(&cert_path, &cert.pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            not_after: validity.not_after,
        })
    }

    /// Loads the CA stored in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {}
            (false, false) => {
                return Err(CertError::MissingCa {
                    dir: dir.to_owned(),
                });
            }
            _ => {
                return Err(CertError::IncompleteCa {
                    dir: dir.to_owned(),
                });
            }
        }
        let cert_pem = read_text(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Parse {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let info = inspect_pem(&cert_path, cert_pem.as_bytes())?;
        let trust_domain = info
            .organizational_unit
            .clone()
            .ok_or_else(|| CertError::Parse {
                path: cert_path.clone(),
                reason: "CA certificate names no trust domain (organizational unit)".to_owned(),
            })?;
        if info.public_key_der != key.subject_public_key_info() {
            return Err(CertError::Parse {
                path: key_path,
                reason: "key does not belong to ca.crt".to_owned(),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CertError::Parse {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            trust_domain,
            issuer,
            not_after: info.not_after,
        })
    }

    /// The directory holding `ca.crt` / `ca.key`.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate (what every client and the server trust).
    #[must_use]
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The trust domain of the SPIFFE ids this CA issues.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// When the CA certificate expires.
    #[must_use]
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues (or re-issues, replacing the files) a client certificate for `identity`
    /// into `<dir>/<kind>-<name>.{crt,key}`: URI SAN = the SPIFFE id and nothing else,
    /// client-auth EKU. The end of validity is capped at the CA's own expiry.
    pub fn issue(&self, identity: &Identity, dir: &Path, validity: Validity) -> Result<IssuedCert> {
        let spiffe_id = identity.spiffe_id(&self.trust_domain);
        let uri = spiffe_id
            .clone()
            .try_into()
            .map_err(|source| CertError::Generate {
                what: format!("URI SAN {spiffe_id}"),
                source,
            })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_name(&identity.to_string());
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.write_leaf(
            params,
            &IssuedCert::paths(dir, identity),
            validity,
            &spiffe_id,
        )
    }

    /// Issues (or re-issues) the nats-server certificate into
    /// `<dir>/server-nats.{crt,key}`: one DNS or IP SAN per host, server-auth EKU.
    pub fn issue_server(
        &self,
        dir: &Path,
        hosts: &[&str],
        validity: Validity,
    ) -> Result<IssuedCert> {
        let mut sans = Vec::with_capacity(hosts.len());
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    if !is_dns_name(host) {
                        return Err(CertError::InvalidHost {
                            host: (*host).to_owned(),
                        });
                    }
                    SanType::DnsName((*host).try_into().map_err(|_| CertError::InvalidHost {
                        host: (*host).to_owned(),
                    })?)
                }
            };
            sans.push(san);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_name("nats-server");
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.write_leaf(
            params,
            &IssuedCert::server_paths(dir),
            validity,
            "nats-server",
        )
    }

    fn write_leaf(
        &self,
        mut params: CertificateParams,
        paths: &IssuedCert,
        validity: Validity,
        what: &str,
    ) -> Result<IssuedCert> {
        let validity = validity.truncated();
        validity.check()?;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after.min(self.not_after);
        Validity::between(params.not_before, params.not_after).check()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = generate_key(what)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate {
                what: format!("certificate for {what}"),
                source,
            })?;
        if let Some(dir) = paths.cert.parent() {
            create_private_dir(dir)?;
        }
        write_private(&paths.key, &key.serialize_pem())?;
        write_public(&paths.cert, &cert.pem())?;
        Ok(paths.clone())
    }
}

/// What a PEM certificate file says (the parts Patchbay cares about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// URI SANs, in order (a workload certificate has exactly its SPIFFE id).
    pub uri_sans: Vec<String>,
    /// DNS SANs, in order.
    pub dns_sans: Vec<String>,
    /// IP SANs, in order.
    pub ip_sans: Vec<IpAddr>,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// Subject organizational unit (the trust domain, for Patchbay CAs), if any.
    pub organizational_unit: Option<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether the certificate is a CA.
    pub is_ca: bool,
    /// Whether the extended key usage allows TLS client authentication.
    pub client_auth: bool,
    /// Whether the extended key usage allows TLS server authentication.
    pub server_auth: bool,
    /// DER SubjectPublicKeyInfo, to match a key or verify a child.
    pub public_key_der: Vec<u8>,
}

/// Reads a PEM certificate file and reports what it says.
pub fn inspect(path: &Path) -> Result<CertInfo> {
    let pem = read_text(path)?;
    inspect_pem(path, pem.as_bytes())
}

/// Whether the certificate at `cert` carries a valid signature by the CA certificate at
/// `ca_cert` (signature only: validity dates and usages are not checked).
pub fn is_signed_by(cert: &Path, ca_cert: &Path) -> Result<bool> {
    let ca_pem = read_text(ca_cert)?;
    let cert_pem = read_text(cert)?;
    let (_, ca_block) =
        x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).map_err(|e| CertError::Parse {
            path: ca_cert.to_owned(),
            reason: e.to_string(),
        })?;
    let ca = ca_block.parse_x509().map_err(|e| CertError::Parse {
        path: ca_cert.to_owned(),
        reason: e.to_string(),
    })?;
    let (_, block) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| CertError::Parse {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    let leaf = block.parse_x509().map_err(|e| CertError::Parse {
        path: cert.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(leaf.verify_signature(Some(ca.public_key())).is_ok())
}

fn inspect_pem(path: &Path, pem: &[u8]) -> Result<CertInfo> {
    use x509_parser::extensions::GeneralName;

    let parse_err = |reason: String| CertError::Parse {
        path: path.to_owned(),
        reason,
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| parse_err(e.to_string()))?;
    let cert = block.parse_x509().map_err(|e| parse_err(e.to_string()))?;

    let (mut uri_sans, mut dns_sans, mut ip_sans) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| parse_err(e.to_string()))?
    {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => dns_sans.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                        ip_sans.push(IpAddr::from(octets));
                    } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                        ip_sans.push(IpAddr::from(octets));
                    }
                }
                _ => {}
            }
        }
    }
    let (client_auth, server_auth) = match cert
        .extended_key_usage()
        .map_err(|e| parse_err(e.to_string()))?
    {
        Some(eku) => (eku.value.client_auth, eku.value.server_auth),
        None => (false, false),
    };
    let subject = cert.subject();
    let common_name = first_text(subject.iter_common_name());
    let organizational_unit = first_text(subject.iter_organizational_unit());
    let to_time = |t: &x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| parse_err(e.to_string()))
    };
    Ok(CertInfo {
        uri_sans,
        dns_sans,
        ip_sans,
        common_name,
        organizational_unit,
        not_before: to_time(&cert.validity().not_before)?,
        not_after: to_time(&cert.validity().not_after)?,
        is_ca: cert.is_ca(),
        client_auth,
        server_auth,
        public_key_der: cert.public_key().raw.to_vec(),
    })
}

fn first_text<'a>(
    mut attrs: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
) -> Option<String> {
    attrs
        .next()
        .and_then(|attr| attr.as_str().ok())
        .map(str::to_owned)
}

fn ca_name(trust_domain: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Patchbay");
    // The trust domain is recorded in the CA itself so `load` needs no side file.
    dn.push(DnType::OrganizationalUnitName, trust_domain);
    dn.push(
        DnType::CommonName,
        format!("Patchbay dev CA ({trust_domain})"),
    );
    dn
}

fn leaf_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Patchbay");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn generate_key(what: &str) -> Result<KeyPair> {
    KeyPair::generate().map_err(|source| CertError::Generate {
        what: format!("key pair for {what}"),
        source,
    })
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })
}

/// Writes through a temporary file created with the final mode and renames it into place,
/// so the secret is never readable by others, not even for a moment, and a crash never
/// leaves a half-written key.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |action, p: &Path| {
        let p = p.to_owned();
        move |source| CertError::Io {
            action,
            path: p,
            source,
        }
    };
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    // A stale temporary file from a crash may have other permissions: start afresh.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &tmp)(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename into", path))
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    write_atomically(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    write_atomically(path, contents, 0o644)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ca(dir: &Path) -> CertAuthority {
        CertAuthority::init(
            dir,
            DEFAULT_TRUST_DOMAIN,
            Validity::days(DEFAULT_CA_VALIDITY_DAYS),
        )
        .unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn identity_parses_and_derives_names() {
        let id: Identity = "runtime/node-1".parse().unwrap();
        assert_eq!(id.kind(), "runtime");
        assert_eq!(id.name(), "node-1");
        assert_eq!(id.to_string(), "runtime/node-1");
        assert_eq!(
            id.spiffe_id("patchbay.local"),
            "spiffe://patchbay.local/runtime/node-1"
        );
        assert_eq!(id.file_stem(), "runtime-node-1");
        assert_eq!(id.inbox_prefix(), "_INBOX.runtime.node-1");
        assert_eq!(Identity::new("runtime", "node-1").unwrap(), id);
    }

    #[test]
    fn refuses_bad_identity_strings() {
        for bad in [
            "",
            "runtime",
            "runtime/",
            "/node-1",
            "runtime/node/1",
            "Runtime/node-1",
            "runtime/node_1",
            "runtime/node.1",
            "runtime/-node",
            "runtime/node 1",
            "runtime/*",
            "runtime/>",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad:?} was accepted");
        }
        let long = format!("runtime/{}", "a".repeat(64));
        assert!(long.parse::<Identity>().is_err());
        let err = "runtime/Node".parse::<Identity>().unwrap_err();
        assert!(err.to_string().contains("[a-z0-9][a-z0-9-]*"), "{err}");
    }

    #[test]
    fn refuses_bad_trust_domains() {
        for bad in ["", "Patchbay.local", "spiffe://x", "a/b", ".x", "x."] {
            assert!(validate_trust_domain(bad).is_err(), "{bad:?} was accepted");
        }
        validate_trust_domain("patchbay.local").unwrap();
    }

    #[test]
    fn issued_certificate_has_exactly_the_spiffe_id_as_san() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id: Identity = "service/routing".parse().unwrap();
        let issued = ca.issue(&id, dir.path(), Validity::default()).unwrap();

        assert_eq!(issued.cert, dir.path().join("service-routing.crt"));
        assert_eq!(issued.key, dir.path().join("service-routing.key"));
        assert!(issued.exists());
        let info = inspect(&issued.cert).unwrap();
        assert_eq!(
            info.uri_sans,
            vec!["spiffe://patchbay.local/service/routing"]
        );
        assert!(info.dns_sans.is_empty() && info.ip_sans.is_empty());
        assert!(info.client_auth && !info.server_auth && !info.is_ca);
        assert!(is_signed_by(&issued.cert, &ca.cert_path()).unwrap());
    }

    #[test]
    fn private_keys_are_readable_by_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id: Identity = "gateway/gateway".parse().unwrap();
        let issued = ca.issue(&id, dir.path(), Validity::default()).unwrap();
        let server = ca
            .issue_server(dir.path(), &DEFAULT_SERVER_HOSTS, Validity::default())
            .unwrap();
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        assert_eq!(mode(&issued.key), 0o600);
        assert_eq!(mode(&server.key), 0o600);
        assert_eq!(mode(&issued.cert), 0o644);
    }

    #[test]
    fn init_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let first = ca(dir.path());
        let cert_before = fs::read(first.cert_path()).unwrap();
        let key_before = fs::read(dir.path().join("ca.key")).unwrap();

        let second = ca(dir.path());
        assert_eq!(fs::read(second.cert_path()).unwrap(), cert_before);
        assert_eq!(fs::read(dir.path().join("ca.key")).unwrap(), key_before);
        assert_eq!(second.trust_domain(), DEFAULT_TRUST_DOMAIN);
        assert_eq!(second.not_after(), first.not_after());

        // The reloaded CA still signs certificates the original CA certificate verifies.
        let id: Identity = "service/agents".parse().unwrap();
        let issued = second.issue(&id, dir.path(), Validity::default()).unwrap();
        assert!(is_signed_by(&issued.cert, &first.cert_path()).unwrap());
    }

    #[test]
    fn init_refuses_an_existing_ca_of_another_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let err =
            CertAuthority::init(dir.path(), "other.example", Validity::default()).unwrap_err();
        assert!(
            matches!(err, CertError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn init_refuses_a_half_present_ca() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err =
            CertAuthority::init(dir.path(), DEFAULT_TRUST_DOMAIN, Validity::default()).unwrap_err();
        assert!(matches!(err, CertError::IncompleteCa { .. }), "{err}");
    }

    #[test]
    fn load_without_ca_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = CertAuthority::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("patchbay certs"), "{err}");
    }

    #[test]
    fn server_certificate_names_its_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let issued = ca
            .issue_server(dir.path(), &DEFAULT_SERVER_HOSTS, Validity::default())
            .unwrap();
        assert_eq!(issued.cert, dir.path().join("server-nats.crt"));
        let info = inspect(&issued.cert).unwrap();
        assert_eq!(info.dns_sans, vec!["localhost"]);
        assert_eq!(info.ip_sans, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(info.uri_sans.is_empty());
        assert!(info.server_auth && !info.client_auth);
        assert!(matches!(
            ca.issue_server(dir.path(), &["not a host"], Validity::default()),
            Err(CertError::InvalidHost { .. })
        ));
    }

    #[test]
    fn can_issue_an_expired_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id: Identity = "runtime/node-1".parse().unwrap();
        let now = OffsetDateTime::now_utc();
        let validity = Validity::between(now - Duration::days(10), now - Duration::days(1));
        let issued = ca.issue(&id, dir.path(), validity).unwrap();
        let info = inspect(&issued.cert).unwrap();
        assert!(info.not_after < now);
    }

    #[test]
    fn certificates_of_another_ca_do_not_verify() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        let our_ca = ca(ours.path());
        let their_ca = ca(theirs.path());
        let id: Identity = "runtime/node-1".parse().unwrap();
        let issued = their_ca
            .issue(&id, theirs.path(), Validity::default())
            .unwrap();
        assert!(!is_signed_by(&issued.cert, &our_ca.cert_path()).unwrap());
        assert!(is_signed_by(&issued.cert, &their_ca.cert_path()).unwrap());
    }

    #[test]
    fn leaf_validity_is_capped_at_the_ca_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::init(dir.path(), DEFAULT_TRUST_DOMAIN, Validity::days(2)).unwrap();
        let id: Identity = "runtime/node-1".parse().unwrap();
        let issued = ca.issue(&id, dir.path(), Validity::days(30)).unwrap();
        assert!(inspect(&issued.cert).unwrap().not_after <= ca.not_after());
    }

    #[test]
    fn refuses_an_empty_validity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id: Identity = "runtime/node-1".parse().unwrap();
        let now = OffsetDateTime::now_utc();
        let err = ca
            .issue(
                &id,
                dir.path(),
                Validity::between(now, now - Duration::hours(1)),
            )
            .unwrap_err();
        assert!(matches!(err, CertError::EmptyValidity { .. }), "{err}");
    }
}
