//! The one way the tools reach the shop: HTTP to the gateway's public API, as the caller.
//!
//! Every request carries the caller's own bearer token ([`Caller::bearer`]), so the gateway
//! authenticates the user and the services decide what that user may see and do; a tool adds
//! no authority of its own. Every request has a timeout (the shorter of
//! [`REQUEST_TIMEOUT`] and the time the call has left) and every answer a size bound
//! ([`RESPONSE_BYTES_MAX`]).

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use trellis_agent::{Caller, ToolContext, ToolError};

/// The longest one HTTP request to the gateway may take (a call's own deadline may cut it
/// shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest connecting to the gateway may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer read from the gateway, in bytes (a page of 100 orders of 50 lines each
/// with their timelines stays well below it).
pub const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// The longest error message from the shop passed on to the model, in characters.
const MESSAGE_CHARS_MAX: usize = 500;

/// Why the tools could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The gateway URL does not parse or is not `http(s)://host[:port][/prefix]`.
    #[error("bad gateway URL `{url}`: {problem}")]
    GatewayUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The HTTP client could not be built (the system's TLS or resolver configuration).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The registry refused a tool (a bug in this crate).
    #[error(transparent)]
    Registry(#[from] trellis_agent::tool::RegistryError),
}

impl SetupError {
    /// Whether trying again may help: never, each cause is a configuration or a bug.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// An HTTP client of the shop's gateway. Cheap to clone (shared connection pool).
#[derive(Debug, Clone)]
pub struct ShopClient {
    base: Url,
    http: reqwest::Client,
}

/// Whether a call needs the caller to be logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Login {
    /// Without a token the call is refused before any request ("not logged in").
    Required,
    /// Sent with the caller's token when there is one, anonymously otherwise (the public
    /// catalogue, which the shop serves to anyone).
    Optional,
}

impl ShopClient {
    /// A client of the gateway at `gateway` (`http://127.0.0.1:8080`, or with a path prefix the
    /// shop is served under).
    ///
    /// # Errors
    /// [`SetupError::GatewayUrl`] for a URL that does not parse, is not http or https, or
    /// carries a query, a fragment or credentials; [`SetupError::Client`] when the HTTP client
    /// cannot be built.
    pub fn new(gateway: &str) -> Result<Self, SetupError> {
        let bad = |problem: &str| SetupError::GatewayUrl {
            url: gateway.to_owned(),
            problem: problem.to_owned(),
        };
        let mut base = Url::parse(gateway.trim()).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(bad("expected http://HOST[:PORT] or https://HOST[:PORT]"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("a gateway URL has no query or fragment"));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(bad(
                "a gateway URL carries no credentials (the caller's token is sent instead)",
            ));
        }
        // Paths are joined below the base's path.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Answers are read whole and bounded; a redirect is not part of the API.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(Self { base, http })
    }

    /// The gateway's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The URL of `segments` below the base (each segment percent-encoded, so an id can never
    /// leave its path segment), with `query` pairs (`None` values left out).
    pub(crate) fn url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .expect("the base was checked to be an http(s) URL, which has a path");
            path.pop_if_empty();
            path.extend(segments);
        }
        let pairs: Vec<(&str, &str)> = query
            .iter()
            .filter_map(|(name, value)| value.as_deref().map(|v| (*name, v)))
            .collect();
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        url
    }

    /// Sends one request as the context's caller and reads the answer as `T`.
    ///
    /// # Errors
    /// `refused` without a token where [`Login::Required`], for a 4xx (the shop's message)
    /// and for an answer over [`RESPONSE_BYTES_MAX`]; `unavailable` for a 5xx, a connection
    /// failure, a timeout or an answer that is not the JSON expected.
    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        ctx: &ToolContext,
        login: Login,
        request: Request<'_>,
    ) -> Result<T, ToolError> {
        let bearer = bearer(ctx.caller(), login)?;
        let timeout = REQUEST_TIMEOUT.min(ctx.remaining());
        if timeout.is_zero() {
            return Err(ToolError::unavailable("no time left for the call"));
        }
        let mut builder = self
            .http
            .request(request.method, request.url)
            .timeout(timeout);
        if let Some(bearer) = bearer {
            builder = builder.header(AUTHORIZATION, bearer);
        }
        if let Some(key) = request.idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        if let Some(body) = request.body {
            builder = builder.json(&body);
        }
        let mut response = builder.send().await.map_err(transport_error)?;
        let status = response.status();
        let body = read_bounded(&mut response).await?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ToolError::unavailable(format!(
                "the shop answered {status} with a body this tool cannot read: {e}"
            ))
        })
    }
}

/// One request to the gateway.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    method: Method,
    url: Url,
    body: Option<Value>,
    idempotency_key: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// `GET url`.
    pub(crate) fn get(url: Url) -> Self {
        Self {
            method: Method::GET,
            url,
            body: None,
            idempotency_key: None,
        }
    }

    /// `POST url` with a JSON body.
    ///
    /// # Errors
    /// `unavailable` when the body cannot be written as JSON (a bug).
    pub(crate) fn post(url: Url, body: &impl Serialize) -> Result<Self, ToolError> {
        let body = serde_json::to_value(body)
            .map_err(|e| ToolError::unavailable(format!("the request cannot be written: {e}")))?;
        Ok(Self {
            method: Method::POST,
            url,
            body: Some(body),
            idempotency_key: None,
        })
    }

    /// `POST url` without a body (an action on the resource the URL names).
    pub(crate) fn post_empty(url: Url) -> Self {
        Self {
            method: Method::POST,
            url,
            body: None,
            idempotency_key: None,
        }
    }

    /// The same request with an `Idempotency-Key` header.
    #[must_use]
    pub(crate) fn idempotency_key(mut self, key: &'a str) -> Self {
        self.idempotency_key = Some(key);
        self
    }
}

/// The `Authorization` value for the caller, or why there is none.
fn bearer(caller: &Caller, login: Login) -> Result<Option<HeaderValue>, ToolError> {
    let token = caller
        .bearer
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return match login {
            Login::Required => Err(ToolError::refused("not logged in")),
            Login::Optional => Ok(None),
        };
    };
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ToolError::refused("the login token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// Reads the body, refusing one over [`RESPONSE_BYTES_MAX`].
async fn read_bounded(response: &mut reqwest::Response) -> Result<Vec<u8>, ToolError> {
    let too_large = || {
        ToolError::refused(format!(
            "the shop's answer is larger than {RESPONSE_BYTES_MAX} bytes; ask for less \
             (a smaller limit or narrower filters)"
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n > RESPONSE_BYTES_MAX as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A request that got no complete answer: the shop (or the way to it) is failing.
fn transport_error(error: reqwest::Error) -> ToolError {
    let what = if error.is_timeout() {
        "the shop did not answer in time"
    } else if error.is_connect() {
        "the shop cannot be reached"
    } else {
        "the request to the shop failed"
    };
    // The cause without the URL: it may name a host the model need not know.
    ToolError::unavailable(format!("{what}: {}", error.without_url()))
}

/// The error an unsuccessful answer means: 4xx refused with the shop's own message (the
/// model can act on "no such order"), anything else unavailable.
pub(crate) fn status_error(status: StatusCode, body: &[u8]) -> ToolError {
    let message = shop_message(body);
    if status.is_client_error() {
        let message = match (status, message) {
            (StatusCode::UNAUTHORIZED, Some(m)) => format!("not logged in ({m})"),
            (StatusCode::UNAUTHORIZED, None) => "not logged in".to_owned(),
            (_, Some(m)) => m,
            (_, None) => format!("the shop refused the request ({status})"),
        };
        ToolError::refused(message)
    } else {
        let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
        ToolError::unavailable(format!("the shop is failing ({status}){detail}"))
    }
}

/// The message of the shop's error body `{"error": {"code", "message"}}`, shortened.
fn shop_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let message = value.get("error")?.get("message")?.as_str()?.trim();
    if message.is_empty() {
        return None;
    }
    let mut short: String = message.chars().take(MESSAGE_CHARS_MAX).collect();
    if short.len() < message.len() {
        short.push('…');
    }
    Some(short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_error_is_refused_with_the_shops_own_message() {
        // A 404 from the orders service reads as its message, which the model can act on.
        let body = br#"{"error":{"code":"not_found","message":"no such order"}}"#;
        let error = status_error(StatusCode::NOT_FOUND, body);
        assert!(!error.is_fault());
        assert_eq!(error.message(), "no such order");
    }

    #[test]
    fn a_server_error_or_an_unreadable_body_makes_the_tool_unavailable() {
        // 5xx counts against the tool's breaker; a body without a message still reads well.
        let error = status_error(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert!(error.is_fault());
        assert!(error.message().contains("502"), "{}", error.message());
        let error = status_error(StatusCode::IM_A_TEAPOT, b"");
        assert!(!error.is_fault());
        assert!(error.message().contains("418"), "{}", error.message());
    }

    #[test]
    fn an_expired_token_reads_as_not_logged_in() {
        // The gateway's 401 says why; the model is told the user must log in.
        let body = br#"{"error":{"code":"unauthenticated","message":"token expired"}}"#;
        let error = status_error(StatusCode::UNAUTHORIZED, body);
        assert_eq!(error.message(), "not logged in (token expired)");
    }

    #[test]
    fn a_call_without_a_token_is_refused_only_where_login_is_required() {
        // No request is made for a caller that has no token and needs one.
        let anonymous = Caller::new("someone", "customer");
        let error = bearer(&anonymous, Login::Required).expect_err("needs a token");
        assert_eq!(error.message(), "not logged in");
        assert!(
            bearer(&anonymous, Login::Optional)
                .expect("anonymous")
                .is_none()
        );
        let blank = Caller::new("someone", "customer").with_bearer("  ");
        assert!(bearer(&blank, Login::Required).is_err());
    }

    #[test]
    fn ids_cannot_leave_their_path_segment() {
        // A hostile id is percent-encoded into one segment, never a path of its own.
        let client = ShopClient::new("http://127.0.0.1:8080/shop").expect("a good URL");
        let url = client.url(&["api", "orders", "../users/me?x=1", "cancel"], &[]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/shop/api/orders/..%2Fusers%2Fme%3Fx=1/cancel"
        );
        let url = client.url(
            &["api", "orders"],
            &[("status", Some("PENDING".into())), ("cursor", None)],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/shop/api/orders?status=PENDING"
        );
    }

    #[test]
    fn a_gateway_url_must_be_plain_http() {
        // Each malformed URL is named in the error; none panics.
        for url in [
            "",
            "not a url",
            "ftp://host",
            "http://u:p@host",
            "http://host/?a=b",
            "unix:/x",
        ] {
            let error = ShopClient::new(url).expect_err(url);
            assert!(error.to_string().contains("bad gateway URL"), "{error}");
        }
        assert!(ShopClient::new("http://127.0.0.1:8080").is_ok());
    }

    #[tokio::test]
    async fn a_shop_that_cannot_be_reached_makes_the_tool_unavailable() {
        // A socket bound and never listened on refuses connections: a fault, for the breaker.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let client = ShopClient::new(&format!("http://{addr}")).expect("a good URL");
        let caller = Caller::new("user-1", "customer").with_bearer("token");
        let ctx = ToolContext::new(caller, Duration::from_secs(5), "key");
        let url = client.url(&["api", "orders"], &[]);
        let error = client
            .send::<Value>(&ctx, Login::Required, Request::get(url))
            .await
            .expect_err("nobody listens");
        assert!(error.is_fault(), "{error}");
        assert!(error.message().contains("cannot be reached"), "{error}");
        drop(socket);
    }
}
