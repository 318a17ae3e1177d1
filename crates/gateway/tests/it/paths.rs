//! Path normalisation: route matching cannot be bypassed with dot segments, escapes,
//! backslashes or path parameters, and what is forwarded is exactly what was matched.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{TestGateway, WAIT};

const OPS_KEY: &str = "ops-key-0123456789abcdef";

/// What the lenient upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    /// The request target as received.
    received: String,
    /// The path as a lenient server reads it (see [`lenient_path`]).
    served_as: String,
    /// The identity the gateway vouched for, if any.
    identity: Option<String>,
}

/// An upstream that reads paths the way permissive servers do (decodes every escape, takes
/// `\` for `/`, drops `;params`, merges `//`, resolves dot segments, ignores case) and
/// records every request.
struct LenientUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl LenientUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let received = request
                            .uri()
                            .path_and_query()
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        let seen = Seen {
                            served_as: lenient_path(request.uri().path()),
                            received: received.clone(),
                            identity: request
                                .headers()
                                .get("x-api-key-id")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned),
                        };
                        record.lock().expect("record").push(seen);
                        async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(received))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("record").clone()
    }
}

/// How a permissive server reads a path.
fn lenient_path(path: &str) -> String {
    let mut decoded = Vec::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Decodes repeatedly so double encodings collapse too.
        if bytes[i] == b'%'
            && let Some(value) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            decoded.push(value);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let mut text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    if text.contains('%') && text != path {
        text = lenient_path(&text);
    }
    let mut out: Vec<String> = Vec::new();
    for segment in text.split('/') {
        let name = segment.split(';').next().unwrap_or_default();
        match name {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other.to_ascii_lowercase()),
        }
    }
    format!("/{}", out.join("/"))
}

/// Sends one raw HTTP/1.1 request (so nothing normalises the target on the way) and returns
/// the status and body.
async fn raw_get(gateway: SocketAddr, target: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(gateway).await.expect("connect");
    let request =
        format!("GET {target} HTTP/1.1\r\nhost: gw.test\r\n{headers}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("answer within the wait")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn config(upstream: &LenientUpstream) -> String {
    format!(
        r#"
        [clusters.app]
        endpoints = ["{}"]

        [auth.ops]
        type = "api_key"
        keys = {{ ops = "{OPS_KEY}" }}

        [[routes]]
        name = "public"
        path_prefix = "/public"
        cluster = "app"

        [[routes]]
        name = "admin"
        path_prefix = "/admin"
        cluster = "app"
        auth = ["ops"]
        "#,
        upstream.addr
    )
}

#[tokio::test]
async fn path_traversal_cannot_reach_a_protected_prefix() {
    // Goal: every classic spelling of "/admin" behind "/public" is refused (400) or routed
    // to the protected route (401 without a key); a lenient upstream never serves an admin
    // path to a request the gateway did not authenticate. Checked with raw requests against
    // an upstream that records how a permissive server reads each path.
    let upstream = LenientUpstream::start().await;
    let gw = TestGateway::start(&config(&upstream)).await;
    let attacks = [
        "/public/../admin",
        "/public/../admin/users",
        "/public/%2e%2e/admin",
        "/public/%2E%2e/admin",
        "/public/.%2e/admin",
        "/public/%2e%2e%2fadmin",
        "/public/..%2fadmin",
        "/public/..%2Fadmin",
        "/public%2f..%2fadmin",
        "/public/..%5cadmin",
        "/public/..\\admin",
        "/public\\..\\admin",
        "/public/..;/admin",
        "/public;x/../admin",
        "/public/%252e%252e/admin",
        "/public/%252e%252e%252fadmin",
        "/public/./../admin",
        "/public/x/../../admin",
        "/public/../../admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/%2e/admin",
        "/public/%00/../admin",
        "/ADMIN",
        "/Admin/x",
        "/admin;jsessionid=1",
        "/admin",
        "/admin/",
        "http://gw.test/public/../admin",
    ];
    let mut answers = Vec::new();
    for target in attacks {
        answers.push((target, raw_get(gw.addr, target, "").await));
    }
    let leaked: Vec<Seen> = upstream
        .seen()
        .into_iter()
        .filter(|s| s.served_as.starts_with("/admin") && s.identity.is_none())
        .collect();
    assert!(
        leaked.is_empty(),
        "admin paths served without a credential: {leaked:#?}"
    );
    for (target, (status, body)) in answers {
        assert!(
            [400, 401, 404].contains(&status),
            "`{target}` answered {status}: {body}"
        );
        if status == 400 && !body.is_empty() {
            assert!(body.contains("invalid_path"), "`{target}`: {body}");
        }
    }

    // With the key, the same traversal is authenticated as the admin route and forwarded in
    // its normalised form.
    let key = format!("x-api-key: {OPS_KEY}\r\n");
    let (status, body) = raw_get(gw.addr, "/public/../admin/users?q=%2e%2e", &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body, "/admin/users?q=%2e%2e",
        "the query is forwarded unchanged"
    );
    let (status, body) = raw_get(gw.addr, "//public/./x", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "/public/x");
}

#[tokio::test]
async fn a_normal_path_with_an_encoded_space_or_unicode_is_forwarded_as_matched() {
    // Goal: ordinary escapes and non-ASCII characters still route, and the upstream gets the
    // canonical spelling the route matched (escapes in upper case, unreserved ones decoded).
    let upstream = LenientUpstream::start().await;
    let gw = TestGateway::start(&config(&upstream)).await;
    for (sent, forwarded) in [
        ("/public/hello%20world", "/public/hello%20world"),
        ("/public/caf%c3%a9", "/public/caf%C3%A9"),
        ("/public/caf\u{e9}", "/public/caf%C3%A9"),
        ("/public/%7Euser/file%2Ejson", "/public/~user/file.json"),
        ("/public/a%3Bb?x=1", "/public/a%3Bb?x=1"),
        ("/public/", "/public/"),
    ] {
        let (status, body) = raw_get(gw.addr, sent, "").await;
        assert_eq!(status, 200, "`{sent}`: {body}");
        assert_eq!(body, forwarded, "`{sent}`");
    }
    let received: Vec<String> = upstream.seen().into_iter().map(|s| s.received).collect();
    assert_eq!(received.len(), 6, "{received:?}");
}
