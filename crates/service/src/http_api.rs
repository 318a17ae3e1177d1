//! JSON errors, a JSON extractor whose rejections are JSON errors, and the caller's identity.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// Header a gateway may put the verified user id (`sub` claim) in for upstreams that trust
/// it; services built on the kit never read it ([`auth::protect`](crate::auth::protect)
/// strips it and checks an identity token instead).
pub const USER_ID_HEADER: &str = "x-user-id";
/// Header a gateway may put the verified role claim in; never read by services built on the
/// kit.
pub const USER_ROLE_HEADER: &str = "x-user-role";
/// The kit's administrator role: the one role [`Caller::require_admin`] and
/// [`auth::admin_only`](crate::auth::admin_only) accept. Give it to whoever may operate the
/// system (dead letters, catalogue changes and the like); what else it allows is each
/// service's decision.
pub const ROLE_ADMIN: &str = "admin";
/// The kit's conventional role for an end user with no special rights. The kit itself checks
/// nothing against it: it is neither [`ROLE_ADMIN`] nor
/// [`ROLE_SERVICE`](crate::auth::ROLE_SERVICE), and services that distinguish end users by
/// role use it for the plain one.
pub const ROLE_CUSTOMER: &str = "customer";

/// An error answer: a status and `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code clients can match on.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// 400 with a code naming what is wrong with the input.
    pub fn bad_request(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with a code.
    pub fn conflict(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422 with a code.
    pub fn unprocessable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500 `internal`; the cause is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// 503 with a code, for a dependency that is down.
    pub fn unavailable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    /// The status and the JSON body; a 503 also says `Retry-After: 1`.
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if retry {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    /// A database that cannot be reached for a moment (a broken connection, no free
    /// connection in time, a server restarting: [`crate::is_transient`]) is 503
    /// `database_unavailable`, which a client may retry; anything else is a 500.
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_transient(&e) {
            tracing::warn!(error = %e, "database unavailable");
            Self::unavailable(
                "database_unavailable",
                "the database is not reachable for a moment; try again",
            )
        } else {
            Self::internal(e)
        }
    }
}

/// axum's `Json` extractor with JSON error answers: 400 `invalid_json` (syntax or shape, the
/// parser's message included), 415 `unsupported_media_type`, 413 `payload_too_large`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a body with content-type application/json",
        ),
        JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_json", e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("invalid_json", e.body_text()),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            other.body_text(),
        ),
        other => ApiError::bad_request("invalid_body", other.body_text()),
    }
}

/// The authenticated caller: who a verified identity token (see [`crate::auth`]) names.
/// Extracting it from a request that carried no valid token answers 401; identity headers
/// such as `x-user-id` are never read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user id (`sub`), or `service:NAME` for a service.
    pub user_id: String,
    /// The role as the token states it: by the kit's conventions [`ROLE_ADMIN`],
    /// [`ROLE_CUSTOMER`] or [`ROLE_SERVICE`](crate::auth::ROLE_SERVICE), but any string a
    /// signer chose.
    pub role: String,
}

impl Caller {
    /// Whether the caller has the [`ROLE_ADMIN`] role.
    pub fn is_admin(&self) -> bool {
        self.role == ROLE_ADMIN
    }

    /// `Ok` for a caller with the [`ROLE_ADMIN`] role, 403 `forbidden` otherwise.
    ///
    /// # Errors
    /// The 403 [`ApiError`] for any other role.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this call needs the admin role"))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or_else(|| ApiError::unauthenticated("this call needs a bearer token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_database_connection_is_a_503_not_a_500() {
        // What a chaos run saw: a PostgreSQL connection cut under a request answered 500, so
        // clients could not tell "try again" from "bug".
        let reset = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let error = ApiError::from(reset);
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.code, "database_unavailable");
        let response = error.into_response();
        assert_eq!(
            response.headers().get(axum::http::header::RETRY_AFTER),
            Some(&axum::http::HeaderValue::from_static("1"))
        );
        for transient in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            assert_eq!(
                ApiError::from(transient).status,
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        // A bug stays a 500.
        let bug = ApiError::from(sqlx::Error::ColumnNotFound("nope".into()));
        assert_eq!(bug.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(bug.into_response().headers().get("retry-after").is_none());
    }
}
