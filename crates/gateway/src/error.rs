//! Errors: configuration errors at start-up, and per-request errors tagged with who caused
//! them (the client, an upstream, or the gateway itself) and mapped to HTTP answers.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{GatewayBody, full};

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The operating system's reason.
        message: String,
    },
    /// The file is not valid TOML for the schema (unknown key, wrong type...).
    #[error("config is not valid: {message}")]
    Parse {
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of range, malformed, or refers to something undefined.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the bad key, e.g. `routes[2].cluster`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A key file or key material could not be loaded.
    #[error("config key `{key}`: cannot load key: {message}")]
    Key {
        /// Dotted path of the key entry.
        key: String,
        /// Why.
        message: String,
    },
}

/// Who has to act on a request error (as Pingora tags its errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something the gateway refuses.
    Downstream,
    /// An upstream failed, timed out, or is unavailable.
    Upstream,
    /// The gateway itself.
    Internal,
}

impl ErrorSource {
    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
        }
    }
}

/// Why a request did not reach an upstream, or its answer did not come back.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matches.
    #[error("no route matches this request")]
    NoRoute,
    /// The request's target or headers cannot be forwarded.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request path is ambiguous (an encoded slash, an escaped dot segment, a backslash,
    /// a `..` above the root...) and cannot be normalised safely; see the crate docs.
    #[error("invalid path: {0}")]
    InvalidPath(&'static str),
    /// The body is larger than the route allows.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit, bytes.
        limit: u64,
    },
    /// No valid credentials.
    #[error("authentication failed: {reason}")]
    Unauthenticated {
        /// Why, safe to show the client.
        reason: String,
        /// The `WWW-Authenticate` challenge.
        challenge: String,
    },
    /// Authenticated, but a scope or role is missing.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Over the rate limit.
    #[error("rate limit exceeded; retry in {retry_after:?}")]
    RateLimited {
        /// Time until a request would be admitted.
        retry_after: Duration,
        /// The policy's burst (for `RateLimit-Limit`).
        limit: u32,
    },
    /// Could not connect to (or talk to) any endpoint.
    #[error("upstream `{cluster}` is unreachable: {message}")]
    UpstreamConnect {
        /// The cluster.
        cluster: String,
        /// The transport error.
        message: String,
    },
    /// The upstream broke the exchange after the request was sent.
    #[error("upstream `{cluster}` failed: {message}")]
    UpstreamBroken {
        /// The cluster.
        cluster: String,
        /// The transport error.
        message: String,
    },
    /// No answer within the route's timeout.
    #[error("upstream `{cluster}` did not answer within {timeout:?}")]
    UpstreamTimeout {
        /// The cluster.
        cluster: String,
        /// The route timeout.
        timeout: Duration,
    },
    /// Every endpoint is ejected, unhealthy or behind an open breaker.
    #[error("no healthy endpoint in upstream `{cluster}`")]
    NoHealthyUpstream {
        /// The cluster.
        cluster: String,
        /// When a breaker will admit a trial call, if that is what blocks.
        retry_after: Option<Duration>,
    },
    /// A bug or resource problem in the gateway.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// Who caused it.
    pub fn source_kind(&self) -> ErrorSource {
        match self {
            Self::NoRoute
            | Self::BadRequest(_)
            | Self::InvalidPath(_)
            | Self::BodyTooLarge { .. }
            | Self::Unauthenticated { .. }
            | Self::Forbidden(_)
            | Self::RateLimited { .. } => ErrorSource::Downstream,
            Self::UpstreamConnect { .. }
            | Self::UpstreamBroken { .. }
            | Self::UpstreamTimeout { .. }
            | Self::NoHealthyUpstream { .. } => ErrorSource::Upstream,
            Self::Internal(_) => ErrorSource::Internal,
        }
    }

    /// Whether the same request may succeed later (for the client; the gateway's own retries
    /// follow the route's policy).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::UpstreamConnect { .. }
                | Self::UpstreamTimeout { .. }
                | Self::NoHealthyUpstream { .. }
        )
    }

    /// The HTTP status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BadRequest(_) | Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamConnect { .. } | Self::UpstreamBroken { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::NoHealthyUpstream { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable snake_case code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::BadRequest(_) => "bad_request",
            Self::InvalidPath(_) => "invalid_path",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::UpstreamConnect { .. } => "upstream_unreachable",
            Self::UpstreamBroken { .. } => "upstream_failed",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::NoHealthyUpstream { .. } => "no_healthy_upstream",
            Self::Internal(_) => "internal",
        }
    }

    /// The answer sent to the client: the status, `{"error":{"code","message"}}`, and the
    /// headers the status calls for (`WWW-Authenticate`, `Retry-After`).
    pub fn to_response(&self) -> Response<GatewayBody> {
        let message = match self {
            // Opaque: the cause is logged, not shown.
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let mut response = json_error(self.status(), self.code(), &message);
        let headers = response.headers_mut();
        match self {
            Self::Unauthenticated { challenge, .. } => {
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::RateLimited { retry_after, limit } => {
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let seconds = seconds.max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                headers.insert("ratelimit-limit", HeaderValue::from(*limit));
                headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
                headers.insert("ratelimit-reset", HeaderValue::from(seconds));
            }
            Self::NoHealthyUpstream {
                retry_after: Some(after),
                ..
            } => {
                let seconds = (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        response
    }
}

/// The gateway's own error answer: DESIGN.md's JSON error body, with headers that keep a
/// browser from treating it as anything but data.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response<GatewayBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(full(Bytes::from(bytes)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // An error body is data, never a page: nothing may load from it or frame it, and no
    // cache keeps it (OWASP's REST security headers).
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(ERROR_CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The Content-Security-Policy of the gateway's own error answers.
pub(crate) const ERROR_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";
