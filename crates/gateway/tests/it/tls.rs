//! HTTPS on the public listener: ALPN picks HTTP/2 or HTTP/1.1, every answer carries HSTS,
//! upstreams are told `x-forwarded-proto: https`, a plain-HTTP client gets nothing and
//! breaks nothing, and a reload serves a renewed certificate to new connections (a broken
//! one is refused and the running certificate stays).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_gateway::Config;

use crate::helpers::{TestGateway, Upstream, WAIT};

fn fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/keys/tls")
        .join(file)
}

/// The gateway's configuration with TLS from `cert` and `key`, routing `/api` to `app`.
fn config(app: &Upstream, cert: &Path, key: &Path) -> String {
    format!(
        r#"
        [server]
        listen = "127.0.0.1:0"

        [server.tls]
        cert_file = "{cert}"
        key_file = "{key}"

        [clusters.app]
        endpoints = ["{app}"]

        [[routes]]
        name = "api"
        path_prefix = "/api"
        cluster = "app"
        "#,
        cert = cert.display(),
        key = key.display(),
        app = app.addr,
    )
}

/// A TLS connection to the gateway trusting the test CA, offering `alpn`.
async fn connect(gateway: &TestGateway, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(fixture("ca.pem")).expect("the test CA");
    roots.add(ca).expect("a CA certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(gateway.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("a name");
    tokio::time::timeout(
        WAIT,
        TlsConnector::from(Arc::new(client)).connect(name, tcp),
    )
    .await
    .expect("the handshake ends in time")
    .expect("the handshake succeeds")
}

/// The leaf certificate the gateway presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .to_vec()
}

fn leaf(file: &str) -> Vec<u8> {
    CertificateDer::pem_file_iter(fixture(file))
        .expect("readable")
        .next()
        .expect("a certificate")
        .expect("valid PEM")
        .to_vec()
}

/// Sends `GET path` over `stream` with HTTP/2 or HTTP/1.1; answers the status, HSTS header
/// and body.
async fn get(
    stream: TlsStream<TcpStream>,
    http2: bool,
    path: &str,
) -> (StatusCode, Option<String>, String) {
    let request = Request::get(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("a request");
    let response = if http2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("an HTTP/2 connection");
        tokio::spawn(conn);
        sender.send_request(request).await.expect("an answer")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
        tokio::spawn(conn);
        sender.send_request(request).await.expect("an answer")
    };
    let status = response.status();
    let hsts = response
        .headers()
        .get("strict-transport-security")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, hsts, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn https_speaks_http2_or_http1_by_alpn_and_every_answer_carries_hsts() {
    // Goal: a browser (h2) and an HTTP/1.1-only client both get answers over TLS, with HSTS,
    // from an upstream told the client used https; an answer of the gateway's own (no route)
    // carries HSTS too.
    let app = Upstream::start("app").await;
    let gateway = TestGateway::start(&config(
        &app,
        &fixture("first_cert.pem"),
        &fixture("first_key.pem"),
    ))
    .await;
    let h2 = connect(&gateway, &[b"h2", b"http/1.1"]).await;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, hsts, body) = get(h2, true, "/api/orders").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(hsts.as_deref(), Some("max-age=31536000"));
    let seen: serde_json::Value = serde_json::from_str(&body).expect("the upstream's echo");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");

    let h1 = connect(&gateway, &[b"http/1.1"]).await;
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, hsts, _) = get(h1, false, "/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(hsts.as_deref(), Some("max-age=31536000"));
}

#[tokio::test]
async fn a_plain_http_client_gets_no_answer_and_breaks_nothing() {
    // Goal: plain HTTP on the TLS port is a failed handshake: the connection closes without
    // an HTTP answer, and TLS clients are served as before.
    let app = Upstream::start("app").await;
    let gateway = TestGateway::start(&config(
        &app,
        &fixture("first_cert.pem"),
        &fixture("first_key.pem"),
    ))
    .await;
    let mut plain = TcpStream::connect(gateway.addr).await.expect("connect");
    plain
        .write_all(b"GET /api/x HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a plain answer: {}",
        String::from_utf8_lossy(&answer)
    );
    let (status, _, _) = get(connect(&gateway, &[b"h2"]).await, true, "/api/x").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_reload_serves_a_renewed_certificate_and_refuses_a_broken_one() {
    // Goal: certificate renewal without a restart: after the files are replaced and the
    // configuration reloaded (what SIGHUP does), new connections get the new certificate;
    // a reload with a key that does not match is refused and the running certificate stays.
    let dir = tempfile::tempdir().expect("a temp dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(fixture("first_cert.pem"), &cert).expect("copy");
    std::fs::copy(fixture("first_key.pem"), &key).expect("copy");
    let app = Upstream::start("app").await;
    let toml = config(&app, &cert, &key);
    let gateway = TestGateway::start(&toml).await;
    assert_eq!(
        presented(&connect(&gateway, &[b"h2"]).await),
        leaf("first_cert.pem")
    );

    std::fs::copy(fixture("second_cert.pem"), &cert).expect("copy");
    std::fs::copy(fixture("second_key.pem"), &key).expect("copy");
    gateway
        .gateway
        .reload(Config::from_toml(&toml).expect("valid"))
        .await
        .expect("the renewed certificate loads");
    assert_eq!(
        presented(&connect(&gateway, &[b"h2"]).await),
        leaf("second_cert.pem")
    );

    std::fs::copy(fixture("first_key.pem"), &key).expect("copy");
    let refused = gateway
        .gateway
        .reload(Config::from_toml(&toml).expect("valid"))
        .await
        .expect_err("a key that does not match its certificate");
    assert!(refused.to_string().contains("server.tls"), "{refused}");
    let still = connect(&gateway, &[b"h2"]).await;
    assert_eq!(presented(&still), leaf("second_cert.pem"));
    let (status, _, _) = get(still, true, "/api/x").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unusable_certificate_files_are_refused_at_start_naming_server_tls() {
    let app = Upstream::start("app").await;
    for (cert, key) in [
        (fixture("missing.pem"), fixture("first_key.pem")),
        (fixture("first_cert.pem"), fixture("second_key.pem")),
        (fixture("first_key.pem"), fixture("first_key.pem")),
    ] {
        let parsed = Config::from_toml(&config(&app, &cert, &key)).expect("valid TOML");
        let error = trellis_gateway::Gateway::from_config(parsed)
            .await
            .expect_err("unusable files");
        assert!(error.to_string().contains("server.tls"), "{error}");
    }
}
