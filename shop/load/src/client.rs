//! The HTTP side: one pooled reqwest client, bounded body reads, and the mapping of every
//! failure to an error kind (`429`, `timeout`, `connect`, `bad_response`, …).

use std::time::Duration;

use reqwest::{Method, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest response body read, in bytes; a bigger one is a `bad_response`.
pub(crate) const RESPONSE_BODY_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Longest wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections are closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle connections kept per host.
const POOL_IDLE_MAX: usize = 1024;

/// Why a call did not produce the answer expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The server answered with this unexpected status.
    Status(u16),
    /// The request took longer than the per-request timeout.
    Timeout,
    /// No connection could be made.
    Connect,
    /// The connection broke after it was made (reset, closed mid-body).
    Transport,
    /// The answer did not have the expected shape.
    BadResponse(String),
}

impl Failure {
    /// The error kind the report counts this under.
    pub(crate) fn kind(&self) -> String {
        match self {
            Failure::Status(code) => code.to_string(),
            Failure::Timeout => "timeout".into(),
            Failure::Connect => "connect".into(),
            Failure::Transport => "transport".into(),
            Failure::BadResponse(_) => "bad_response".into(),
        }
    }

    /// Whether the server may have acted on the request anyway: the answer was lost
    /// (timeout, broken connection), a proxy gave up waiting (502, 504), or a success came
    /// back unreadable.
    pub(crate) fn may_have_happened(&self) -> bool {
        matches!(
            self,
            Failure::Timeout
                | Failure::Transport
                | Failure::Status(502 | 504)
                | Failure::BadResponse(_)
        )
    }

    fn from_reqwest(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            Failure::Timeout
        } else if e.is_connect() {
            Failure::Connect
        } else if e.is_builder() {
            Failure::BadResponse(format!("request could not be built: {e}"))
        } else {
            Failure::Transport
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "HTTP {code}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Connect => f.write_str("could not connect"),
            Failure::Transport => f.write_str("connection broke"),
            Failure::BadResponse(why) => write!(f, "bad response: {why}"),
        }
    }
}

/// A raw answer: status and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    /// The body as `T` when the status is one of `expected`; otherwise the failure.
    pub(crate) fn json<T: DeserializeOwned>(&self, expected: &[u16]) -> Result<T, Failure> {
        if !expected.contains(&self.status) {
            return Err(Failure::Status(self.status));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            Failure::BadResponse(format!(
                "status {} with an unexpected body: {e}",
                self.status
            ))
        })
    }
}

/// The shop's public API at one base URL.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub(crate) fn new(base: String, request_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(request_timeout))
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_MAX)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        Ok(Self { http, base })
    }

    /// `base + path`, with `query` pairs percent-encoded.
    pub(crate) fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, Failure> {
        let mut url = Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| Failure::BadResponse(format!("bad URL for {path}: {e}")))?;
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// Sends one request and reads the answer's body (at most [`RESPONSE_BODY_MAX_BYTES`]).
    pub(crate) async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: Url,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<&B>,
    ) -> Result<Answer, Failure> {
        let mut request = self.http.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| Failure::from_reqwest(&e))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Failure::from_reqwest(&e))?
        {
            if body.len() + chunk.len() > RESPONSE_BODY_MAX_BYTES {
                return Err(Failure::BadResponse(format!(
                    "body over {RESPONSE_BODY_MAX_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body })
    }

    /// `GET path` with an optional bearer token.
    pub(crate) async fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
        token: Option<&str>,
    ) -> Result<Answer, Failure> {
        let url = self.url(path, query)?;
        self.call::<()>(Method::GET, url, token, None, None).await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post<B: Serialize + ?Sized>(
        &self,
        path: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: &B,
    ) -> Result<Answer, Failure> {
        let url = self.url(path, &[])?;
        self.call(Method::POST, url, token, idempotency_key, Some(body))
            .await
    }
}

/// Percent-encodes one path segment (ids come from the server and could hold anything).
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(segment("0193-ab_C.~"), "0193-ab_C.~");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn failures_map_to_their_kinds() {
        assert_eq!(Failure::Status(503).kind(), "503");
        assert_eq!(Failure::Timeout.kind(), "timeout");
        assert_eq!(Failure::BadResponse("x".into()).kind(), "bad_response");
    }

    #[test]
    fn an_unexpected_status_is_a_status_failure_and_a_bad_body_a_bad_response() {
        let answer = Answer {
            status: 200,
            body: b"{}".to_vec(),
        };
        assert_eq!(
            answer.json::<serde_json::Value>(&[201]).unwrap_err(),
            Failure::Status(200)
        );
        assert!(matches!(
            answer.json::<Vec<u8>>(&[200]).unwrap_err(),
            Failure::BadResponse(_)
        ));
    }
}
