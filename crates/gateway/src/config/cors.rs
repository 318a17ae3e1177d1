//! `[cors]`: which browser origins may call the gateway cross-origin.

use serde::Deserialize;

use crate::error::ConfigError;

use super::{CORS_MAX_AGE_S_DEFAULT, invalid, range};

/// `[cors]`: cross-origin access for browsers. Without it (the default) the gateway adds no
/// `Access-Control-*` header, so a browser lets no other origin read an answer, and
/// preflights go through routing like any request.
///
/// With it, a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
/// answered by the gateway before routing and authentication (a browser sends no credential
/// on a preflight): 204 with the allowed methods and headers when the origin, the method
/// and every requested header are allowed, 403 `cors_refused` naming what is not otherwise.
/// Every other answer to an allowed origin carries `Access-Control-Allow-Origin` (errors
/// too, so a page can read why it was refused) and `Vary: Origin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed, exactly as browsers send them (`https://shop.example`,
    /// `http://localhost:5173`): scheme, host and port, no path. `*` is refused: the shop's
    /// API answers per caller.
    pub allowed_origins: Vec<String>,
    /// Methods a cross-origin request may use.
    #[serde(default = "default_methods")]
    pub allowed_methods: Vec<String>,
    /// Request headers a cross-origin request may send (case-insensitive).
    #[serde(default = "default_headers")]
    pub allowed_headers: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` (cookies and HTTP auth from the page).
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer, seconds.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .map(str::to_owned)
        .to_vec()
}

fn default_headers() -> Vec<String> {
    [
        "authorization",
        "content-type",
        "idempotency-key",
        "traceparent",
        "tracestate",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn default_max_age_s() -> u64 {
    CORS_MAX_AGE_S_DEFAULT
}

impl CorsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.allowed_origins.is_empty() {
            return Err(invalid(
                "cors.allowed_origins",
                "name at least one origin, or leave [cors] out to allow none",
            ));
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            let key = format!("cors.allowed_origins[{i}]");
            if origin == "*" {
                return Err(invalid(
                    &key,
                    "`*` is not accepted: name each origin that may call the API",
                ));
            }
            let uri = origin.parse::<http::Uri>().ok();
            let ok = uri.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && u.path_and_query().is_none_or(|p| p.as_str() == "/")
                    && !origin.ends_with('/')
            });
            if !ok {
                return Err(invalid(
                    &key,
                    "expected an origin like https://shop.example (scheme, host, port; no path)",
                ));
            }
        }
        for (i, method) in self.allowed_methods.iter().enumerate() {
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                return Err(invalid(
                    &format!("cors.allowed_methods[{i}]"),
                    "not an HTTP method",
                ));
            }
        }
        for (i, header) in self.allowed_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(invalid(
                    &format!("cors.allowed_headers[{i}]"),
                    "not a header name",
                ));
            }
        }
        range("cors.max_age_s", self.max_age_s, 0, 86_400)
    }
}
