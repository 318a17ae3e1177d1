//! The inspector's JSON HTTP endpoints, as an axum [`Router`] to mount in a service.
//!
//! | method and path | does |
//! | --- | --- |
//! | `GET /sagas?status=stuck,failed&definition=NAME&older_than_secs=N&younger_than_secs=N&limit=N` | [`Inspector::list`] |
//! | `GET /sagas/{id}` | [`Inspector::show`] |
//! | `POST /sagas/{id}/cancel` with optional `{"reason": "..."}` | [`Inspector::cancel`] |
//! | `POST /sagas/{id}/retry` | [`Inspector::retry`] |
//! | `POST /sagas/{id}/skip` with `{"step": "..."}` | [`Inspector::skip`] |
//! | `POST /sagas/purge` with `{"older_than_days": N}` | [`Inspector::purge`] |
//!
//! [`choreography_router`] (feature `bus`) serves choreographed sagas from a
//! [`crate::choreography::ChoreographyLog`]; merge it with [`router`] to serve both:
//!
//! | method and path | does |
//! | --- | --- |
//! | `GET /choreographies/{correlation_id}` | [`crate::choreography::ChoreographyLog::timeline`] |
//!
//! The `x-actor` header names the operator the log records for cancel, retry and skip (as
//! `trellis saga --operator` does); without it the inspector's own operator name is used. Mount
//! the router behind the service's admin authentication, which should set that header from
//! the verified caller (trellis-service's `admin_only` does), never pass it on as sent.
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}`: 400 `bad_request`, 404
//! `saga_not_found`, 409 `saga_leased` / `action_rejected` / `conflict`; a store fault is a 503
//! `unavailable` or a 500 `internal` with an opaque message, logged once with its cause.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::SagaError;
use crate::inspector::Inspector;
use crate::store::{SagaFilter, SagaId, SagaStatus, SagaStore};

/// The longest age filter or purge cut-off the endpoints accept: 100 years.
const AGE_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// The header naming the operator of an action (see the module docs).
pub const ACTOR_HEADER: &str = "x-actor";
/// The longest operator name taken from [`ACTOR_HEADER`], in bytes; longer ones are cut.
const ACTOR_BYTES_MAX: usize = 200;

/// The inspector's routes (paths above), with `inspector` as their state.
pub fn router<S: SagaStore>(inspector: Inspector<S>) -> Router {
    Router::new()
        .route("/sagas", get(list::<S>))
        .route("/sagas/purge", post(purge::<S>))
        .route("/sagas/{id}", get(show::<S>))
        .route("/sagas/{id}/cancel", post(cancel::<S>))
        .route("/sagas/{id}/retry", post(retry::<S>))
        .route("/sagas/{id}/skip", post(skip::<S>))
        .with_state(Arc::new(inspector))
}

/// The choreography routes (paths above), with `log` as their state; 404
/// `choreography_not_found` when nothing was recorded for the correlation id.
#[cfg(feature = "bus")]
pub fn choreography_router<D: crate::choreography::ChoreographyDb>(
    log: crate::choreography::ChoreographyLog<D>,
) -> Router {
    Router::new()
        .route("/choreographies/{correlation_id}", get(choreography::<D>))
        .with_state(Arc::new(log))
}

#[cfg(feature = "bus")]
async fn choreography<D: crate::choreography::ChoreographyDb>(
    State(log): State<Arc<crate::choreography::ChoreographyLog<D>>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a correlation id (a UUID)")))?;
    match log.timeline(id).await {
        Ok(timeline) => Ok(Json(timeline).into_response()),
        Err(SagaError::NotFound(_)) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "choreography_not_found",
            message: format!("nothing recorded for correlation id {id}"),
        }),
        Err(error) => Err(error.into()),
    }
}

/// An error response: status, stable code and message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<SagaError> for ApiError {
    fn from(error: SagaError) -> Self {
        let (status, code) = match &error {
            SagaError::NotFound(_) => (StatusCode::NOT_FOUND, "saga_not_found"),
            SagaError::Leased { .. } => (StatusCode::CONFLICT, "saga_leased"),
            SagaError::Rejected { .. } => (StatusCode::CONFLICT, "action_rejected"),
            SagaError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            _ if error.is_retryable() => {
                tracing::warn!(%error, "saga inspector: store unavailable");
                return Self {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "unavailable",
                    message: "the saga store is unavailable; try again".to_owned(),
                };
            }
            _ => {
                tracing::error!(error = ?error, "saga inspector: internal error");
                return Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal",
                    message: "internal error".to_owned(),
                };
            }
        };
        Self {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        (self.status, Json(body)).into_response()
    }
}

type Shared<S> = State<Arc<Inspector<S>>>;

/// The inspector acting as the operator [`ACTOR_HEADER`] names, or as itself without one.
fn acting<S: SagaStore>(inspector: &Inspector<S>, headers: &HeaderMap) -> Inspector<S> {
    let actor = headers
        .get(ACTOR_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|actor| !actor.is_empty());
    match actor {
        None => inspector.clone(),
        Some(actor) => {
            let mut end = actor.len().min(ACTOR_BYTES_MAX);
            while !actor.is_char_boundary(end) {
                end -= 1;
            }
            inspector.clone().with_operator(&actor[..end])
        }
    }
}

fn parse_id(text: &str) -> Result<SagaId, ApiError> {
    uuid::Uuid::parse_str(text)
        .map(SagaId::from_uuid)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a saga id (a UUID)")))
}

/// Parses an optional JSON body, which must be an object; an empty body is `T::default()`.
/// (serde would also read a struct from an array of its fields, `[0]` for
/// `{"older_than_days": 0}`, which no client means.)
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let invalid =
        |error: serde_json::Error| ApiError::bad_request(format!("invalid JSON body: {error}"));
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(invalid)
}

fn seconds(query: &HashMap<String, String>, name: &str) -> Result<Option<Duration>, ApiError> {
    query
        .get(name)
        .map(|text| {
            text.parse::<u64>()
                .ok()
                .map(Duration::from_secs)
                .filter(|age| *age <= AGE_MAX)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{name} must be a number of seconds, got {text:?}"
                    ))
                })
        })
        .transpose()
}

fn ago(age: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX)
}

/// Turns the list query into a filter.
fn filter(query: &HashMap<String, String>) -> Result<SagaFilter, ApiError> {
    let known = [
        "status",
        "definition",
        "older_than_secs",
        "younger_than_secs",
        "limit",
    ];
    if let Some(unknown) = query.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter {unknown:?} (known: {})",
            known.join(", ")
        )));
    }
    let mut filter = SagaFilter::new();
    if let Some(statuses) = query.get("status") {
        for text in statuses.split(',').filter(|text| !text.is_empty()) {
            let status = SagaStatus::parse(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown status {text:?} (running, compensating, completed, failed, stuck)"
                ))
            })?;
            filter = filter.with_status(status);
        }
    }
    if let Some(definition) = query.get("definition") {
        filter = filter.with_definition(definition.clone());
    }
    if let Some(age) = seconds(query, "older_than_secs")? {
        filter = filter.with_created_before(ago(age));
    }
    if let Some(age) = seconds(query, "younger_than_secs")? {
        filter = filter.with_created_after(ago(age));
    }
    if let Some(limit) = query.get("limit") {
        let limit = limit
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit must be a number, got {limit:?}")))?;
        filter = filter.with_limit(limit);
    }
    Ok(filter)
}

async fn list<S: SagaStore>(
    State(inspector): Shared<S>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|error| ApiError::bad_request(error.body_text()))?;
    let sagas = inspector.list(&filter(&query)?).await?;
    Ok(Json(serde_json::json!({ "sagas": sagas })).into_response())
}

async fn show<S: SagaStore>(
    State(inspector): Shared<S>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let timeline = inspector.show(parse_id(&id)?).await?;
    Ok(Json(timeline).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel<S: SagaStore>(
    State(inspector): Shared<S>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let inspector = acting(&inspector, &headers);
    let id = parse_id(&id)?;
    let body: CancelBody = body(&bytes)?;
    let reason = body
        .reason
        .unwrap_or_else(|| "cancelled over HTTP".to_owned());
    let written = inspector.cancel(id, &reason).await?;
    Ok(Json(serde_json::json!({ "id": id, "written": written })).into_response())
}

async fn retry<S: SagaStore>(
    State(inspector): Shared<S>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let inspector = acting(&inspector, &headers);
    let id = parse_id(&id)?;
    let written = inspector.retry(id).await?;
    Ok(Json(serde_json::json!({ "id": id, "written": written })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipBody {
    step: Option<String>,
}

async fn skip<S: SagaStore>(
    State(inspector): Shared<S>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let inspector = acting(&inspector, &headers);
    let id = parse_id(&id)?;
    let body: SkipBody = body(&bytes)?;
    let step = body
        .step
        .ok_or_else(|| ApiError::bad_request("the body needs {\"step\": \"<name>\"}"))?;
    let written = inspector.skip(id, &step).await?;
    Ok(Json(serde_json::json!({ "id": id, "written": written })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    older_than_days: Option<u64>,
}

async fn purge<S: SagaStore>(
    State(inspector): Shared<S>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let body: PurgeBody = body(&bytes)?;
    let days = body
        .older_than_days
        .ok_or_else(|| ApiError::bad_request("the body needs {\"older_than_days\": N}"))?;
    let age = Duration::from_secs(days.saturating_mul(24 * 3600));
    if age > AGE_MAX {
        return Err(ApiError::bad_request("older_than_days is too large"));
    }
    let purged = inspector.purge(age).await?;
    Ok(Json(serde_json::json!({ "purged": purged })).into_response())
}
