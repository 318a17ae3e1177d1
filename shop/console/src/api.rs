//! The console's client of the shop's admin API, called through the gateway with the
//! signed-in administrator's own token, so the console can do nothing its user could not: the
//! gateway checks the admin role on every call again, and the services see that user.

use std::time::Duration;

use axum::http::StatusCode;
use reqwest::Method;
use serde::de::DeserializeOwned;

/// How long one call to the admin API may take.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest error message shown from an answer, in bytes.
const MESSAGE_BYTES_MAX: usize = 500;

/// A call that did not succeed: the status to answer the browser with and what to tell the
/// operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({status})")]
pub(crate) struct ApiFailure {
    /// The API's own 4xx, or 502 when the API failed or did not answer.
    pub(crate) status: StatusCode,
    /// The API's error message, or what went wrong on the way.
    pub(crate) message: String,
}

/// The admin API at the gateway.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    /// A client of the gateway at `base` (`http://127.0.0.1:8080`).
    pub(crate) fn new(client: reqwest::Client, base: &str) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// The gateway's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `GET path` as the holder of `token`, decoded.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        token: &str,
        path: &str,
    ) -> Result<T, ApiFailure> {
        let value = self.send(token, Method::GET, path, None).await?;
        serde_json::from_value(value).map_err(|error| ApiFailure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("GET {path}: an answer the console does not understand: {error}"),
        })
    }

    /// Any call as the holder of `token`, with an optional JSON body; the JSON answer (null
    /// when empty, as for a 204).
    pub(crate) async fn send(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ApiFailure> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token)
            .timeout(API_TIMEOUT);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|error| ApiFailure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("{method} {path}: the gateway did not answer: {error}"),
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|error| ApiFailure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("{method} {path}: the answer was cut off: {error}"),
        })?;
        let json: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        };
        if status.is_success() {
            return Ok(json);
        }
        let message = json["error"]["message"]
            .as_str()
            .map(|m| cut(m, MESSAGE_BYTES_MAX))
            .unwrap_or_else(|| format!("{method} {path} answered {status}"));
        let status = if status.is_client_error() {
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
        } else {
            StatusCode::BAD_GATEWAY
        };
        Err(ApiFailure { status, message })
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
