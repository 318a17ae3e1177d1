//! The operator's HTTP surface for agent runs: list, show, approve, deny, cancel.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | `/runs?status=&limit=` | | the runs, oldest first |
//! | GET | `/runs/{id}` | | status, state (transcript, calls) and step timings |
//! | POST | `/runs/{id}/approve` | `{"operator", "call"?}` | the calls decided |
//! | POST | `/runs/{id}/deny` | `{"operator", "reason", "call"?}` | the calls decided |
//! | POST | `/runs/{id}/cancel` | `{"operator", "reason"}` | 204 |
//!
//! A decision is written to the run's log; the process driving the run (waiting for it) or
//! the next `resume` carries the run on. Errors are JSON `{"error", "message"}`: 400 for a bad
//! id or body, 404 for no such run, 409 when the run is not waiting (or another process holds
//! it). It has no authentication of its own: serve it on an operator's address (loopback),
//! like the shop's other operator endpoints, or behind the gateway's admin role.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use trellis_saga::{SagaError, SagaId, SagaStatus, SagaStore};
use uuid::Uuid;

use crate::run::{self, AgentError};

/// The largest page `GET /runs` returns.
pub const LIST_LIMIT_MAX: usize = 500;

/// The router, over the run log `store`.
pub fn router<S: SagaStore>(store: Arc<S>) -> axum::Router {
    axum::Router::new()
        .route("/runs", get(list::<S>))
        .route("/runs/{id}", get(show::<S>))
        .route("/runs/{id}/approve", post(approve::<S>))
        .route("/runs/{id}/deny", post(deny::<S>))
        .route("/runs/{id}/cancel", post(cancel::<S>))
        .with_state(store)
}

/// An error answer: a status and a JSON body naming the problem.
#[derive(Debug)]
struct Problem(StatusCode, &'static str, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let Self(status, error, message) = self;
        (status, Json(json!({ "error": error, "message": message }))).into_response()
    }
}

fn problem(status: StatusCode, error: &'static str, message: impl Into<String>) -> Response {
    Problem(status, error, message.into()).into_response()
}

fn agent_error(error: AgentError) -> Response {
    match error {
        AgentError::NotFound(id) | AgentError::Log(SagaError::NotFound(id)) => problem(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no agent run {id}"),
        ),
        AgentError::Invalid(message) => problem(StatusCode::CONFLICT, "conflict", message),
        AgentError::Log(error @ (SagaError::Leased { .. } | SagaError::Conflict { .. })) => {
            problem(StatusCode::CONFLICT, "busy", error.to_string())
        }
        AgentError::WrongCaller(id) => problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("run {id} acts for another user"),
        ),
        AgentError::Log(other) => {
            tracing::error!(error = %other, "agent run log");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the run log failed",
            )
        }
    }
}

fn parse_id(id: &str) -> Result<SagaId, Problem> {
    Uuid::parse_str(id).map(SagaId::from_uuid).map_err(|_| {
        Problem(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("`{id}` is not a run id (a UUID)"),
        )
    })
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn list<S: SagaStore>(State(store): State<Arc<S>>, Query(q): Query<ListQuery>) -> Response {
    let status = match q.status.as_deref().map(|s| (s, SagaStatus::parse(s))) {
        None => None,
        Some((_, Some(status))) => Some(status),
        Some((s, None)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_status",
                format!("unknown status `{s}`"),
            );
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, LIST_LIMIT_MAX);
    match run::list(&*store, status, limit).await {
        Ok(runs) => {
            let runs: Vec<_> = runs
                .iter()
                .map(|r| {
                    json!({ "id": r.id.to_string(), "status": r.status.as_str(),
                            "created_at": r.created_at, "updated_at": r.updated_at })
                })
                .collect();
            Json(json!({ "runs": runs })).into_response()
        }
        Err(error) => agent_error(error),
    }
}

async fn show<S: SagaStore>(State(store): State<Arc<S>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(problem) => return problem.into_response(),
    };
    let loaded = async {
        let instance = store.load(id).await?.ok_or(AgentError::NotFound(id))?;
        if instance.definition != run::DEFINITION {
            return Err(AgentError::NotFound(id));
        }
        let state: run::RunState = instance.context()?;
        Ok::<_, AgentError>((instance, state))
    }
    .await;
    match loaded {
        Ok((instance, state)) => Json(json!({
            "id": id.to_string(),
            "status": instance.status.as_str(),
            "state": state,
            "steps": run::timings(&instance),
        }))
        .into_response(),
        Err(error) => agent_error(error),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    operator: String,
    #[serde(default)]
    call: Option<String>,
    #[serde(default)]
    reason: String,
}

fn check_operator(body: &DecisionBody) -> Result<(), Problem> {
    if body.operator.trim().is_empty() || body.operator.len() > 200 || body.reason.len() > 2000 {
        return Err(Problem(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`operator` is 1 to 200 characters and `reason` at most 2000".into(),
        ));
    }
    Ok(())
}

async fn decide<S: SagaStore>(
    store: &S,
    id: &str,
    body: Result<Json<DecisionBody>, axum::extract::rejection::JsonRejection>,
    approved: bool,
) -> Response {
    let id = match parse_id(id) {
        Ok(id) => id,
        Err(problem) => return problem.into_response(),
    };
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                rejection.body_text(),
            );
        }
    };
    if let Err(problem) = check_operator(&body) {
        return problem.into_response();
    }
    match run::decide(
        store,
        id,
        body.call.as_deref(),
        approved,
        &body.operator,
        &body.reason,
    )
    .await
    {
        Ok(calls) => {
            let decided: Vec<String> = calls.iter().map(run::CallRecord::label).collect();
            Json(json!({ "decided": decided, "approved": approved })).into_response()
        }
        Err(error) => agent_error(error),
    }
}

async fn approve<S: SagaStore>(
    State(store): State<Arc<S>>,
    Path(id): Path<String>,
    body: Result<Json<DecisionBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    decide(&*store, &id, body, true).await
}

async fn deny<S: SagaStore>(
    State(store): State<Arc<S>>,
    Path(id): Path<String>,
    body: Result<Json<DecisionBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    decide(&*store, &id, body, false).await
}

async fn cancel<S: SagaStore>(
    State(store): State<Arc<S>>,
    Path(id): Path<String>,
    body: Result<Json<DecisionBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(problem) => return problem.into_response(),
    };
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                rejection.body_text(),
            );
        }
    };
    if let Err(problem) = check_operator(&body) {
        return problem.into_response();
    }
    match run::cancel(&*store, id, &body.operator, &body.reason).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => agent_error(error),
    }
}
