//! CORS: preflights answered before routing, and `Access-Control-Allow-Origin` on answers to
//! allowed origins ([`CorsConfig`] says the rules).

use std::collections::HashSet;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::{GatewayBody, empty};
use crate::config::CorsConfig;
use crate::error::json_error;

/// Response headers a page may read cross-origin besides the safelisted ones.
const EXPOSED_HEADERS: &str =
    "x-request-id, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset";

/// The built `[cors]` section.
#[derive(Debug)]
pub(crate) struct Cors {
    origins: HashSet<String>,
    methods: HashSet<Method>,
    /// Lowercase.
    headers: HashSet<String>,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
    credentials: bool,
}

impl Cors {
    pub(crate) fn new(config: &CorsConfig) -> Self {
        let methods: HashSet<Method> = config
            .allowed_methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect();
        let headers: HashSet<String> = config
            .allowed_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let joined = |items: Vec<String>| {
            HeaderValue::from_str(&items.join(", ")).unwrap_or(HeaderValue::from_static(""))
        };
        let mut method_names: Vec<String> = methods.iter().map(ToString::to_string).collect();
        method_names.sort();
        let mut header_names: Vec<String> = headers.iter().cloned().collect();
        header_names.sort();
        Self {
            origins: config.allowed_origins.iter().cloned().collect(),
            methods,
            headers,
            allow_methods: joined(method_names),
            allow_headers: joined(header_names),
            max_age: HeaderValue::from(config.max_age_s),
            credentials: config.allow_credentials,
        }
    }

    /// `origin`, when it is allowed.
    fn allowed<'a>(&self, origin: Option<&'a HeaderValue>) -> Option<&'a HeaderValue> {
        let origin = origin?;
        self.origins
            .contains(origin.to_str().ok()?)
            .then_some(origin)
    }

    /// Whether the request is a CORS preflight.
    pub(crate) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The answer to a preflight: 204 with the allowances, or 403 naming what is refused.
    pub(crate) fn preflight(&self, headers: &HeaderMap) -> Response<GatewayBody> {
        let refuse = |message: String| {
            let mut response = json_error(StatusCode::FORBIDDEN, "cors_refused", &message);
            response
                .headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Origin"));
            response
        };
        let Some(origin) = self.allowed(headers.get(header::ORIGIN)) else {
            let shown = headers
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            return refuse(format!(
                "origin {shown} may not call this API from a browser"
            ));
        };
        let method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok());
        match method {
            Some(m) if self.methods.contains(&m) => {}
            _ => return refuse("this method is not allowed cross-origin".to_owned()),
        }
        let requested = headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty());
        for name in requested {
            if !self.headers.contains(&name) {
                return refuse(format!("header {name} is not allowed cross-origin"));
            }
        }
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let out = response.headers_mut();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        out.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        out.insert(header::VARY, HeaderValue::from_static("Origin"));
        response
    }

    /// Adds the CORS headers to an answer to a request that came with `origin`: the allowance
    /// for an allowed origin, and `Vary: Origin` to every answer (it depends on the origin).
    pub(crate) fn decorate(
        &self,
        origin: Option<&HeaderValue>,
        response: &mut Response<GatewayBody>,
    ) {
        let origin = self.allowed(origin).cloned();
        let out = response.headers_mut();
        out.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin else {
            return;
        };
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        out.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}
