//! The dead-letter queue's JSON HTTP endpoints, as an axum [`Router`] a service mounts
//! (for example under `/admin/dlq`).
//!
//! | call | answer |
//! | --- | --- |
//! | `GET /dead-letters?group=&topic=&type=&error_contains=&fingerprint=&reason=&older_than=&newer_than=&state=&limit=` | 200 `[DeadLetter]` (ages in seconds), the first page; header `x-next-cursor` when there are more |
//! | `GET /dead-letters?cursor=&…same filter…` | 200 `{"dead_letters":[DeadLetter],"next_cursor":string\|null}`: a page (`cursor` empty for the first; pass `next_cursor` back until it is null) |
//! | `GET /dead-letters/groups?…same filter…` | 200 `[FailureGroup]`, largest first |
//! | `GET /dead-letters/actions?limit=` | 200 `[DlqAction]`, newest first |
//! | `GET /dead-letters/{id}` | 200 `DeadLetter`; 404 |
//! | `POST /dead-letters/{id}/redrive` | 200 `{"redriven":[id]}`; 404 |
//! | `POST /dead-letters/{id}/archive` | 204; 404 |
//! | `DELETE /dead-letters/{id}` | 204 (discarded); 404 |
//! | `POST /dead-letters/redrive` body `DeadLetterFilter` (JSON) | 200 `{"redriven":[ids]}` |
//!
//! The `x-actor` header names who acted in the action log (default `http`). Errors are
//! `{"error":{"code","message"}}`: 400 for bad input, 404 for an unknown id, 503 for a
//! transient backend fault, 500 (opaque body, full error logged) otherwise. Mount it behind
//! the service's admin authentication: it changes what the system will process.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use crate::dlq::{ACTION_TEXT_BYTES_MAX, DeadLetterFilter, DeadLetters, truncate};
use crate::error::BusError;

/// Largest request body the endpoints accept, in bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// The header carrying the next page's cursor on an array answer of `GET /dead-letters`.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";
/// The header naming the actor for the action log.
pub const ACTOR_HEADER: &str = "x-actor";

/// The DLQ endpoints over `dlq`.
pub fn router<D>(dlq: D) -> Router
where
    D: DeadLetters + Clone + 'static,
{
    Router::new()
        .route("/dead-letters", get(list::<D>))
        .route("/dead-letters/groups", get(groups::<D>))
        .route("/dead-letters/actions", get(actions::<D>))
        .route("/dead-letters/redrive", post(redrive_matching::<D>))
        .route("/dead-letters/{id}", get(show::<D>).delete(discard::<D>))
        .route("/dead-letters/{id}/redrive", post(redrive::<D>))
        .route("/dead-letters/{id}/archive", post(archive::<D>))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(dlq)
}

/// An error answer.
#[derive(Debug)]
struct ApiError(BusError);

impl From<BusError> for ApiError {
    fn from(error: BusError) -> Self {
        Self(error)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self(BusError::InvalidConfig(format!(
            "query: {}",
            rejection.body_text()
        )))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self(BusError::InvalidConfig(format!(
            "body: {}",
            rejection.body_text()
        )))
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError(BusError::invalid("dead letter id", id, "is not a UUID")))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self.0 {
            BusError::NotFound { .. } => (
                StatusCode::NOT_FOUND,
                "dead_letter_not_found",
                self.0.to_string(),
            ),
            BusError::InvalidName { .. }
            | BusError::InvalidConfig(_)
            | BusError::InvalidEnvelope(_) => {
                (StatusCode::BAD_REQUEST, "invalid_input", self.0.to_string())
            }
            error if error.is_retryable() => {
                tracing::warn!(error = %error, "dlq endpoint: backend unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backend_unavailable",
                    "the bus backend is unavailable; try again".to_owned(),
                )
            }
            error => {
                tracing::error!(error = %error, "dlq endpoint failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".to_owned(),
                )
            }
        };
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        (status, Json(body)).into_response()
    }
}

fn actor(headers: &HeaderMap) -> String {
    headers
        .get(ACTOR_HEADER)
        .and_then(|value| value.to_str().ok())
        .map_or_else(
            || "http".to_owned(),
            |actor| truncate(actor, ACTION_TEXT_BYTES_MAX),
        )
}

async fn list<D: DeadLetters>(
    State(dlq): State<D>,
    filter: Result<Query<DeadLetterFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(filter) = filter?;
    let paged = filter.cursor.is_some();
    let page = dlq.list_page(&filter).await?;
    if paged {
        return Ok(Json(page).into_response());
    }
    // Without `cursor` the answer keeps its original shape (an array); the next page is
    // announced in a header.
    let mut response = Json(page.dead_letters).into_response();
    if let Some(next) = page.next_cursor
        && let Ok(value) = axum::http::HeaderValue::from_str(&next)
    {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, value);
    }
    Ok(response)
}

async fn groups<D: DeadLetters>(
    State(dlq): State<D>,
    filter: Result<Query<DeadLetterFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(filter) = filter?;
    Ok(Json(dlq.failure_groups(&filter).await?).into_response())
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn actions<D: DeadLetters>(
    State(dlq): State<D>,
    limit: Result<Query<Limit>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(limit) = limit?;
    let limit = limit.limit.unwrap_or(100);
    Ok(Json(dlq.actions(limit).await?).into_response())
}

async fn show<D: DeadLetters>(
    State(dlq): State<D>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(dlq.get(id).await?).into_response())
}

async fn redrive<D: DeadLetters>(
    State(dlq): State<D>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    dlq.redrive(id, &actor(&headers)).await?;
    Ok(Json(serde_json::json!({ "redriven": [id] })).into_response())
}

async fn redrive_matching<D: DeadLetters>(
    State(dlq): State<D>,
    headers: HeaderMap,
    filter: Result<Json<DeadLetterFilter>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(filter) = filter?;
    let redriven = dlq.redrive_matching(&filter, &actor(&headers)).await?;
    Ok(Json(serde_json::json!({ "redriven": redriven })).into_response())
}

async fn archive<D: DeadLetters>(
    State(dlq): State<D>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    dlq.archive(id, &actor(&headers)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn discard<D: DeadLetters>(
    State(dlq): State<D>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    dlq.discard(id, &actor(&headers)).await?;
    Ok(StatusCode::NO_CONTENT)
}
