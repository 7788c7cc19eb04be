//! `--web.config.file`: real TLS connections (server certificate, client certificates, a
//! certificate renewed on disk) and basic auth with bcrypt, against the running exporter.

use std::path::Path;
use std::time::Duration;

use qoder_exporter::app;
use qoder_exporter::sim::ScenarioConfig;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::pki_types::pem::PemObject;

use crate::common::*;

struct Pki {
    ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
        Pki {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    /// A certificate and key (PEM) for `name`, for a server or a client.
    fn leaf(&self, name: &str, server: bool) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec![name.to_owned()]).expect("params");
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf8").to_owned()
}

fn client(pki: &Pki, identity: Option<&(String, String)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("ca")])
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        b = b.identity(
            reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).expect("identity"),
        );
    }
    b.build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_basic_auth() {
    let sim = sim(ScenarioConfig {
        seed: 41,
        sessions: 3,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", true);
    let client_id = pki.leaf("prometheus", false);
    let stranger = Pki::new().leaf("mallory", false);
    write(dir.path(), "ca.crt", &pki.ca_pem);
    let cert_path = write(dir.path(), "tls.crt", &cert);
    write(dir.path(), "tls.key", &key);
    let hash = bcrypt::hash("s3cret", 4).expect("bcrypt");
    let web = write(
        dir.path(),
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    );
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.web_config_file = Some(web.into());
    let running = app::start(s).await.expect("starts");
    let port = running.addr.port();
    let url = |path: &str| format!("https://localhost:{port}{path}");

    // The right certificate and password: the metrics, counted exactly.
    let good = client(&pki, Some(&client_id));
    let ok = eventually(Duration::from_secs(30), async || {
        let Ok(r) = good
            .get(url("/metrics"))
            .basic_auth("prometheus", Some("s3cret"))
            .send()
            .await
        else {
            return false;
        };
        let text = r.text().await.unwrap_or_default();
        mismatches(&parse(&text), &sim.totals).is_empty()
    })
    .await;
    assert!(ok, "exact metrics over TLS with auth");
    // Wrong password, no password, unknown user: 401 with a challenge.
    for (user, pass) in [("prometheus", Some("wrong")), ("nobody", Some("s3cret"))] {
        let r = good
            .get(url("/metrics"))
            .basic_auth(user, pass)
            .send()
            .await
            .expect("reply");
        assert_eq!(r.status(), 401, "{user}");
        assert!(r.headers().contains_key("www-authenticate"));
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    assert_eq!(
        good.get(url("/")).send().await.expect("reply").status(),
        401
    );
    // The probes stay open (they carry no data, and Kubernetes' HTTP probes send no
    // password): the shipped manifests' liveness and readiness probes work with auth on.
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            good.get(url(probe)).send().await.expect("reply").status(),
            200,
            "{probe}"
        );
    }
    // No client certificate, or one from another CA: no TLS session at all.
    assert!(
        client(&pki, None)
            .get(url("/healthz"))
            .send()
            .await
            .is_err()
    );
    assert!(
        client(&pki, Some(&stranger))
            .get(url("/healthz"))
            .send()
            .await
            .is_err()
    );
    // Plain HTTP to the TLS port gets nothing useful.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));

    // The certificate is renewed on disk: new connections get the new one, no restart.
    let (cert2, key2) = pki.leaf("localhost", true);
    rewrite(&dir.path().join("tls.key"), &key2);
    rewrite(Path::new(&cert_path), &cert2);
    let served = async || {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes())
                    .expect("ca"),
            )
            .expect("root");
        let certs: Vec<_> =
            rustls::pki_types::CertificateDer::pem_slice_iter(client_id.0.as_bytes())
                .collect::<Result<_, _>>()
                .expect("certs");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(client_id.1.as_bytes()).expect("key");
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .expect("client auth");
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("tcp");
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                tcp,
            )
            .await
            .expect("handshake");
        tls.get_ref().1.peer_certificates().expect("peer")[0].to_vec()
    };
    let new_der = rustls::pki_types::CertificateDer::from_pem_slice(cert2.as_bytes())
        .map(|c| c.to_vec())
        .expect("der");
    let renewed = eventually(Duration::from_secs(10), async || {
        // The server looks at the files at most once a second: fewer handshakes meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;
        served().await == new_der
    })
    .await;
    assert!(renewed, "the renewed certificate is served");
    running.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_web_config_stops_the_start_with_a_reason() {
    let sim = sim(ScenarioConfig::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let web = write(
        dir.path(),
        "web.yml",
        "basic_auth_users:\n  prometheus: plaintext\n",
    );
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.web_config_file = Some(web.into());
    let e = format!("{:#}", app::start(s).await.expect_err("refused"));
    assert!(
        e.contains("not a bcrypt hash") && e.contains("web.yml"),
        "{e}"
    );
}
