//! Shared fixtures: real upstream servers and a gateway on 127.0.0.1 port 0, and a client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_gateway::{Config, Gateway};

/// Upper bound on any single wait in the tests.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// A small upstream: answers with its name, the path it saw and the headers it got.
///
/// Paths: `/status/NNN` answers NNN; `/slow/MS` waits MS ms first; `/echo` streams the body
/// back; `/.well-known/jwks.json` serves `jwks`; anything else answers 200.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    pub(crate) hits: Arc<AtomicUsize>,
    jwks: Arc<Mutex<Option<String>>>,
    stop: watch::Sender<bool>,
}

impl Upstream {
    pub(crate) async fn start(name: &'static str) -> Self {
        Self::start_with(name, None, false, 0).await
    }

    pub(crate) async fn start_h2c(name: &'static str) -> Self {
        Self::start_with(name, None, true, 0).await
    }

    /// An upstream that waits `delay_ms` before every answer.
    pub(crate) async fn start_slow(name: &'static str, delay_ms: u64) -> Self {
        Self::start_with(name, None, false, delay_ms).await
    }

    pub(crate) async fn start_with(
        name: &'static str,
        jwks: Option<String>,
        h2c: bool,
        delay_ms: u64,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let counter = Arc::clone(&hits);
        let jwks = Arc::new(Mutex::new(jwks));
        let served_jwks = Arc::clone(&jwks);
        tokio::spawn(async move {
            let mut accept_stop = stop_rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = accept_stop.changed() => return,
                };
                let counter = Arc::clone(&counter);
                let jwks = Arc::clone(&served_jwks);
                let mut conn_stop = stop_rx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let jwks = Arc::clone(&jwks);
                        async move {
                            if delay_ms > 0 {
                                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            }
                            answer(name, req, jwks).await
                        }
                    });
                    let io = TokioIo::new(stream);
                    if h2c {
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service);
                        tokio::select! { _ = conn => {}, _ = conn_stop.changed() => {} }
                    } else {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service);
                        tokio::select! { _ = conn => {}, _ = conn_stop.changed() => {} }
                    }
                });
            }
        });
        Self {
            addr,
            hits,
            jwks,
            stop,
        }
    }

    /// Stops accepting and drops every open connection (a crash, as the gateway sees it).
    pub(crate) fn kill(&self) {
        let _ = self.stop.send(true);
    }

    /// Replaces the JWKS document served.
    pub(crate) fn set_jwks(&self, doc: &str) {
        *self.jwks.lock().expect("jwks lock") = Some(doc.to_owned());
    }

    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    name: &'static str,
    request: Request<Incoming>,
    jwks: Arc<Mutex<Option<String>>>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>, Infallible> {
    let path = request.uri().path().to_owned();
    let full = |status: StatusCode, text: String| {
        let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed());
        *r.status_mut() = status;
        r
    };
    if path == "/.well-known/jwks.json" {
        let doc = jwks.lock().expect("jwks lock").clone();
        if let Some(doc) = doc {
            return Ok(full(StatusCode::OK, doc));
        }
    }
    if path == "/echo" {
        let body = request.into_body().boxed();
        return Ok(Response::new(body));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
        return Ok(full(status, format!("{{\"upstream\":\"{name}\"}}")));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let mut headers = serde_json::Map::new();
    for (k, v) in request.headers() {
        headers.insert(
            k.to_string(),
            serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
        );
    }
    let body = serde_json::json!({
        "upstream": name,
        "path": request.uri().path_and_query().map(|p| p.to_string()),
        "version": format!("{:?}", request.version()),
        "headers": headers,
    });
    Ok(full(StatusCode::OK, body.to_string()))
}

/// A gateway serving on 127.0.0.1 port 0; stops when dropped.
#[derive(Debug)]
pub(crate) struct TestGateway {
    pub(crate) addr: SocketAddr,
    pub(crate) gateway: Gateway,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) served: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    pub(crate) async fn start(toml: &str) -> Self {
        let config = Config::from_toml(toml).expect("valid test config");
        let gateway = Gateway::from_config(config).await.expect("gateway builds");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = gateway.clone();
        let served = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Self {
            addr,
            gateway,
            stop: Some(stop),
            served,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Begins a graceful shutdown.
    pub(crate) fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An answer read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `error.code` of a gateway error body.
    pub(crate) fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

pub(crate) fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub(crate) async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Answer {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let response = tokio::time::timeout(WAIT, client().request(request))
        .await
        .expect("answer within the wait")
        .expect("request succeeds");
    let (parts, body) = response.into_parts();
    let bytes = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body within the wait")
        .expect("body")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub(crate) async fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    send(Method::GET, url, headers, "").await
}
