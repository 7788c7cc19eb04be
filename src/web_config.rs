//! `--web.config.file`: TLS (with certificate reload and optional client-certificate
//! verification) and basic auth for the HTTP endpoints, in the Prometheus exporter-toolkit
//! format, so the file node_exporter takes works here too:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/qoder-exporter/tls.crt
//!   key_file: /etc/qoder-exporter/tls.key
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   client_ca_file: /etc/qoder-exporter/ca.crt
//!   min_version: TLS12                             # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...                         # bcrypt (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! The certificate and key are re-read when their files change (checked at most once a second,
//! on a handshake), so a renewed certificate needs no restart. `/healthz` stays open (a liveness
//! probe carries no data); every other path needs the credentials when users are configured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The file, as the exporter-toolkit defines it (the TLS tuning keys Go offers and rustls
/// decides for itself are accepted and ignored with a warning).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebConfigFile {
    #[serde(default)]
    pub tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    pub http_server_config: Option<HttpServerConfig>,
    #[serde(default)]
    pub basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsServerConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_auth_type: Option<String>,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub max_version: Option<String>,
    #[serde(default)]
    pub cipher_suites: Option<Vec<String>>,
    #[serde(default)]
    pub curve_preferences: Option<Vec<String>>,
    #[serde(default)]
    pub prefer_server_cipher_suites: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpServerConfig {
    /// Accepted so a node_exporter file reads unchanged; the web port speaks HTTP/1.1 only
    /// (a silent HTTP/2 connection could hold a connection slot forever), so it is not read.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted and ignored, see above")]
    pub http2: Option<bool>,
    #[serde(default)]
    pub headers: HashMap<String, String>,
}

/// What the server does with the file.
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<Arc<BasicAuth>>,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl WebConfig {
    pub fn load(path: &Path) -> anyhow::Result<WebConfig> {
        let ctx = || format!("--web.config.file {}", path.display());
        let text = std::fs::read_to_string(path).with_context(ctx)?;
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            serde_yaml_ng::from_str(&text).with_context(ctx)?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = match &file.tls_server_config {
            Some(t) => Some(Arc::new(tls_config(t, base).with_context(ctx)?)),
            None => None,
        };
        let mut users = HashMap::new();
        for (user, hash) in file.basic_auth_users {
            let parts =
                (hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
                    .then(|| hash.parse::<bcrypt::HashParts>().ok())
                    .flatten();
            let Some(parts) = parts else {
                bail!(
                    "{}: basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)",
                    ctx()
                );
            };
            if parts.get_cost() > MAX_BCRYPT_COST {
                bail!(
                    "{}: basic_auth_users.{user}: bcrypt cost {} is over {MAX_BCRYPT_COST}: each check would take seconds of CPU, and anyone could pin a core with wrong guesses",
                    ctx(),
                    parts.get_cost()
                );
            }
            users.insert(user, hash);
        }
        let auth = (!users.is_empty()).then(|| Arc::new(BasicAuth::new(users)));
        let mut headers = Vec::new();
        if let Some(h) = &file.http_server_config {
            for (k, v) in &h.headers {
                headers.push((
                    header::HeaderName::from_bytes(k.as_bytes())
                        .with_context(|| format!("{}: header {k:?}", ctx()))?,
                    HeaderValue::from_str(v).with_context(|| format!("{}: header {k:?}", ctx()))?,
                ));
            }
        }
        Ok(WebConfig { tls, auth, headers })
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn tls_config(t: &TlsServerConfig, base: &Path) -> anyhow::Result<rustls::ServerConfig> {
    if t.cipher_suites.is_some()
        || t.curve_preferences.is_some()
        || t.prefer_server_cipher_suites.is_some()
    {
        tracing::warn!(
            "web config: cipher_suites, curve_preferences and prefer_server_cipher_suites are ignored (rustls chooses safe ones)"
        );
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match (
        t.min_version.as_deref(),
        t.max_version.as_deref(),
    ) {
        (Some("TLS13"), _) => vec![&rustls::version::TLS13],
        (_, Some("TLS12")) => vec![&rustls::version::TLS12],
        (None | Some("TLS12"), None | Some("TLS13")) => {
            vec![&rustls::version::TLS13, &rustls::version::TLS12]
        }
        (min, max) => bail!(
            "tls_server_config: min_version {min:?} / max_version {max:?}: TLS12 and TLS13 are supported"
        ),
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .context("TLS versions")?;
    let client_auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match client_auth {
        "NoClientCert" => builder.with_no_client_auth(),
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let ca = t.client_ca_file.as_ref().with_context(|| {
                format!("tls_server_config: client_auth_type {client_auth} needs client_ca_file")
            })?;
            let ca = resolve(base, ca);
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(&ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("client_ca_file {}", ca.display()))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if client_auth == "VerifyClientCertIfGiven" {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(v.build().context("client certificate verifier")?)
        }
        other => bail!(
            "tls_server_config: client_auth_type {other:?}: supported are NoClientCert, VerifyClientCertIfGiven and RequireAndVerifyClientCert (certificates that are requested but not verified are not)"
        ),
    };
    let resolver = ReloadingCert::new(resolve(base, &t.cert_file), resolve(base, &t.key_file))?;
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

fn load_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    use rustls::pki_types::pem::PemObject;
    let certs = read_certs(cert)?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: no private key in it", key.display()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .context("unsupported private key")?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .context("the key does not belong to the certificate")?;
    Ok(ck)
}

/// The server certificate, re-read when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: RwLock<(Arc<CertifiedKey>, Option<SystemTime>, Option<SystemTime>)>,
    checked: Mutex<Instant>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    fn new(cert: PathBuf, key: PathBuf) -> anyhow::Result<ReloadingCert> {
        let ck = load_key(&cert, &key)?;
        let stamps = (mtime(&cert), mtime(&key));
        Ok(ReloadingCert {
            state: RwLock::new((Arc::new(ck), stamps.0, stamps.1)),
            cert,
            key,
            checked: Mutex::new(Instant::now()),
        })
    }

    fn maybe_reload(&self) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.elapsed() < Duration::from_secs(1) {
                return;
            }
            *checked = Instant::now();
        }
        let stamps = (mtime(&self.cert), mtime(&self.key));
        {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            if (s.1, s.2) == stamps {
                return;
            }
        }
        match load_key(&self.cert, &self.key) {
            Ok(ck) => {
                *self.state.write().unwrap_or_else(|e| e.into_inner()) =
                    (Arc::new(ck), stamps.0, stamps.1);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            // Half-written files during a renewal: keep serving the old pair, try again later.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "TLS certificate changed but does not load; keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(
            self.state
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .clone(),
        )
    }
}

/// Basic auth against bcrypt hashes. A successful check is remembered (by a SHA-256 of the
/// credentials), as exporter-toolkit does, so a scrape does not pay bcrypt's cost each time.
#[derive(Debug)]
pub struct BasicAuth {
    users: HashMap<String, String>,
    cache: Mutex<HashMap<[u8; 32], bool>>,
    /// A hash of a random password at the highest cost in use, checked for unknown users so
    /// their answer takes as long as a known user's (timing tells no user names).
    dummy: String,
    /// bcrypt checks running at once: wrong guesses queue here instead of taking every core;
    /// a scraper whose credentials were accepted before is answered from the cache.
    pub checks: tokio::sync::Semaphore,
}

/// Highest bcrypt cost accepted (about 1 s a check at 14; 31 would be days).
pub(crate) const MAX_BCRYPT_COST: u32 = 14;

impl BasicAuth {
    pub fn new(users: HashMap<String, String>) -> BasicAuth {
        let cost = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .max()
            .unwrap_or(10)
            .clamp(4, MAX_BCRYPT_COST);
        let dummy = bcrypt::hash(format!("{:x}", fastrand::u128(..)), cost).unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        BasicAuth {
            users,
            dummy,
            checks: tokio::sync::Semaphore::new(cores),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Checks an `Authorization` header value.
    /// `user:password` of a `Basic` authorization header.
    fn credentials(authorization: Option<&HeaderValue>) -> Option<(String, String)> {
        use base64::Engine;
        let creds = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok())?;
        let (user, pass) = creds.split_once(':')?;
        Some((user.to_owned(), pass.to_owned()))
    }

    /// The cache key of a user, a password and the user's hash (a changed hash misses).
    fn key(user: &str, pass: &str, hash: Option<&String>) -> [u8; 32] {
        Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(pass.as_bytes())
            .chain_update([0])
            .chain_update(hash.map_or("", String::as_str).as_bytes())
            .finalize()
            .into()
    }

    /// These credentials were accepted before: no bcrypt check needed.
    pub(crate) fn is_cached_success(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, pass)) = Self::credentials(authorization) else {
            return false;
        };
        let key = Self::key(&user, &pass, self.users.get(&user));
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|ok| *ok)
    }

    pub fn check(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, pass)) = Self::credentials(authorization) else {
            return false;
        };
        let (user, pass) = (user.as_str(), pass.as_str());
        let hash = self.users.get(user);
        let key = Self::key(user, pass, hash);
        if let Some(ok) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return *ok;
        }
        let ok = match hash {
            Some(h) => bcrypt::verify(pass, h).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(pass, &self.dummy);
                false
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 1024 {
            cache.clear();
        }
        // Only successes are remembered: a wrong guess always costs bcrypt's time.
        if ok {
            cache.insert(key, true);
        }
        ok
    }
}

/// Middleware: basic auth on everything but `/healthz`.
pub(crate) async fn require_auth(
    axum::extract::State(auth): axum::extract::State<Arc<BasicAuth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).cloned();
    let ok = if auth.is_cached_success(header.as_ref()) {
        true
    } else {
        // A bcrypt check takes a core for its while: at most one per core at once.
        let _permit = auth.checks.acquire().await;
        let a = auth.clone();
        tokio::task::spawn_blocking(move || a.check(header.as_ref()))
            .await
            .unwrap_or(false)
    };
    if ok {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"qoder-exporter\"")],
            "unauthorized\n",
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_checks_bcrypt_and_caches_successes() {
        use base64::Engine;
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let auth = BasicAuth::new(HashMap::from([("alice".to_owned(), hash)]));
        let h = |u: &str, p: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ))
            .expect("header")
        };
        assert!(auth.check(Some(&h("alice", "s3cret"))));
        assert!(auth.check(Some(&h("alice", "s3cret"))), "cached");
        assert!(!auth.check(Some(&h("alice", "wrong"))));
        assert!(!auth.check(Some(&h("bob", "s3cret"))));
        assert!(!auth.check(None));
        assert!(!auth.check(Some(&HeaderValue::from_static("Bearer x"))));
        assert!(
            bcrypt::verify("x", &auth.dummy).is_ok(),
            "the dummy hash is valid bcrypt"
        );
        assert!(auth.is_cached_success(Some(&h("alice", "s3cret"))));
        // Unknown users are checked at the known users' cost: timing tells no names.
        let cost = |h: &str| h.parse::<bcrypt::HashParts>().map(|p| p.get_cost()).ok();
        assert_eq!(cost(&auth.dummy), cost(&auth.users["alice"]));
        assert!(!auth.is_cached_success(Some(&h("alice", "wrong"))));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("web.yml");
        std::fs::write(&p, "basic_auth_users:\n  alice: plain\n").expect("write");
        let e = format!("{:#}", WebConfig::load(&p).expect_err("not bcrypt"));
        assert!(e.contains("not a bcrypt hash"), "{e}");
        // Looks like bcrypt, is not: refused at load, not at the first request.
        std::fs::write(&p, "basic_auth_users:\n  alice: $2y$10$short\n").expect("write");
        let e = format!("{:#}", WebConfig::load(&p).expect_err("malformed"));
        assert!(e.contains("not a bcrypt hash"), "{e}");
        // A cost that would let anyone pin a core.
        let costly = "$2y$31$abcdefghijklmnopqrstuu5ZHsQ8cYnTLNcABp0e7NZCkuhKGkDTm";
        std::fs::write(&p, format!("basic_auth_users:\n  alice: '{costly}'\n")).expect("write");
        let e = format!("{:#}", WebConfig::load(&p).expect_err("cost 31"));
        assert!(e.contains("bcrypt cost 31 is over 14"), "{e}");
        std::fs::write(
            &p,
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
        )
        .expect("write");
        let e = format!("{:#}", WebConfig::load(&p).expect_err("missing cert"));
        assert!(e.contains("nope.crt"), "{e}");
        std::fs::write(&p, "tls_server_confg: {}\n").expect("write");
        assert!(WebConfig::load(&p).is_err(), "typos are errors");
        std::fs::write(&p, "").expect("write");
        assert!(WebConfig::load(&p).expect("empty is fine").tls.is_none());
    }
}
