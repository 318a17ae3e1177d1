//! The simulator's own error answers: [`ProviderError`] and its wire body [`ErrorBody`], plus
//! [`ProviderJson`], a JSON extractor that answers bad bodies with them.
//!
//! The simulator stands for an outside vendor, so its wire types are its own: no shop crate
//! defines them, and a caller (the payments service) reads them with private types of its
//! own, as it would a foreign API's. The body is `{"error": {"code", "message"}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code (`card_declined`, `provider_outage`, …).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// An error answer: a status and an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProviderError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ProviderError {
    pub(crate) fn new(
        status: StatusCode,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// 400 with a code naming what is wrong with the input.
    pub(crate) fn bad_request(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `not_found`.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with a code.
    pub(crate) fn conflict(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422 with a code.
    pub(crate) fn unprocessable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 503 with a code: refused before anything was done.
    pub(crate) fn unavailable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
}

/// The admin routes sit behind the shop's operator authentication, whose refusals
/// (401/403) arrive as the service kit's error; they keep their status, code and message.
impl From<trellis_service::ApiError> for ProviderError {
    fn from(error: trellis_service::ApiError) -> Self {
        Self::new(error.status, error.code, error.message)
    }
}

/// A ledger that cannot be read or written: 500 `ledger_failed`, which the failure contract
/// reads as "outcome unknown" (the write may have reached the file before the error). The
/// cause is logged here, once; the body does not carry it.
impl From<crate::store::LedgerError> for ProviderError {
    fn from(error: crate::store::LedgerError) -> Self {
        tracing::error!(%error, "payment provider ledger failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ledger_failed",
            "the payment provider could not read or write its ledger; the outcome is unknown",
        )
    }
}

impl IntoResponse for ProviderError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// axum's `Json` extractor answering a bad body with a [`ProviderError`]: 400 `invalid_json`
/// (syntax or shape, the parser's message included), 415 `unsupported_media_type`, 413
/// `payload_too_large`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProviderJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ProviderJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ProviderError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ProviderError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ProviderError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a body with content-type application/json",
        ),
        JsonRejection::JsonDataError(e) => {
            ProviderError::bad_request("invalid_json", e.body_text())
        }
        JsonRejection::JsonSyntaxError(e) => {
            ProviderError::bad_request("invalid_json", e.body_text())
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ProviderError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            other.body_text(),
        ),
        other => ProviderError::bad_request("invalid_body", other.body_text()),
    }
}
