//! Sagas: the list by status, search by order id, one saga's step timeline, and the actions
//! (retry, cancel, skip the current step), each confirmed and audited.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use reqwest::Method;
use serde::Deserialize;
use trellis_saga::{SagaStatus, SagaSummary, SagaTimeline, StepState, StepTimeline};

use super::{Confirmation, audited, confirmed, done_notice, failure, form};
use crate::auth::Admin;
use crate::html::{self, Section, esc, query_value};
use crate::{Shared, redirect};

/// The most sagas one list shows.
const LIST_LIMIT: usize = 200;
/// The statuses the list offers, in order.
const STATUSES: [&str; 5] = ["stuck", "compensating", "running", "failed", "completed"];

fn saga_id(raw: &str) -> Result<uuid::Uuid, Response> {
    uuid::Uuid::parse_str(raw).map_err(|_| {
        html::respond(
            StatusCode::NOT_FOUND,
            Section::Sagas,
            "No such saga",
            &html::notice("error", "That is not a saga id."),
        )
    })
}

/// `GET /admin/sagas?status=stuck&order=ID`.
pub(crate) async fn list(
    State(console): State<Shared>,
    admin: Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let order = query.get("order").map(|o| o.trim()).unwrap_or_default();
    let status = query
        .get("status")
        .map(String::as_str)
        .filter(|s| *s == "all" || STATUSES.contains(s))
        .unwrap_or("stuck");
    let mut body = String::new();
    if !order.is_empty() {
        let Ok(order_id) = uuid::Uuid::parse_str(order) else {
            body.push_str(&html::notice(
                "error",
                &format!("{order:?} is not an order id (a UUID)."),
            ));
            return html::respond(
                StatusCode::BAD_REQUEST,
                Section::Sagas,
                "Sagas",
                &(search_form(status, order) + &body),
            );
        };
        let found = console
            .api
            .send(
                &admin.token,
                Method::GET,
                &format!("/api/admin/orders/{order_id}/saga"),
                None,
            )
            .await;
        match found {
            Ok(answer) => {
                if let Some(saga) = answer["saga_id"].as_str() {
                    return redirect(&format!("/admin/sagas/{}", query_value(saga)));
                }
            }
            Err(failure) if failure.status == StatusCode::NOT_FOUND => {
                return html::respond(
                    StatusCode::NOT_FOUND,
                    Section::Sagas,
                    "Sagas",
                    &(search_form(status, order)
                        + &html::notice(
                            "error",
                            &format!("No saga for order {order_id}: {}", failure.message),
                        )),
                );
            }
            Err(error) => return failure(Section::Sagas, "Sagas", &error),
        }
    }
    let filter = if status == "all" {
        String::new()
    } else {
        format!("status={status}&")
    };
    let answer: Result<SagaList, _> = console
        .api
        .get(
            &admin.token,
            &format!("/api/admin/sagas?{filter}limit={LIST_LIMIT}"),
        )
        .await;
    let sagas = match answer {
        Ok(list) => list.sagas,
        Err(error) => return failure(Section::Sagas, "Sagas", &error),
    };
    body.push_str(&search_form(status, ""));
    let rows: Vec<Vec<String>> = sagas.iter().map(summary_row).collect();
    let caption = format!(
        "Sagas {} ({}{}, oldest first)",
        if status == "all" {
            "of every status".to_owned()
        } else {
            format!("with status {status}")
        },
        sagas.len(),
        if sagas.len() >= LIST_LIMIT {
            format!(", the first {LIST_LIMIT}")
        } else {
            String::new()
        }
    );
    body.push_str(&html::table(
        &caption,
        &[
            "Saga",
            "Definition",
            "Status",
            "Started",
            "Last change",
            "Lease",
        ],
        &rows,
    ));
    html::respond(StatusCode::OK, Section::Sagas, "Sagas", &body)
}

#[derive(Debug, Deserialize)]
struct SagaList {
    sagas: Vec<SagaSummary>,
}

fn summary_row(saga: &SagaSummary) -> Vec<String> {
    let id = saga.id.to_string();
    vec![
        format!(
            "<a href=\"/admin/sagas/{}\"><code>{}</code></a>",
            query_value(&id),
            esc(&id)
        ),
        format!("{} v{}", esc(&saga.definition), saga.version),
        status_badge(saga.status),
        html::time(&saga.created_at),
        html::time(&saga.updated_at),
        saga.lease_owner.as_deref().map(esc).unwrap_or_default(),
    ]
}

fn status_badge(status: SagaStatus) -> String {
    let class = match status {
        SagaStatus::Completed => "good",
        SagaStatus::Running => "info",
        SagaStatus::Compensating => "warn",
        SagaStatus::Failed | SagaStatus::Stuck => "bad",
    };
    format!(
        "<span class=\"badge {class}\" data-status=\"{0}\">{0}</span>",
        status.as_str()
    )
}

fn search_form(status: &str, order: &str) -> String {
    let mut options = String::new();
    for value in STATUSES.iter().copied().chain(["all"]) {
        let selected = if value == status { " selected" } else { "" };
        options.push_str(&format!(
            "<option value=\"{value}\"{selected}>{value}</option>"
        ));
    }
    format!(
        "<form method=\"get\" action=\"/admin/sagas\" class=\"filters\" role=\"search\">\n\
         <div><label for=\"status\">Status</label>\n<select id=\"status\" name=\"status\">{options}</select></div>\n\
         <div><label for=\"order\">Order id</label>\n<input id=\"order\" name=\"order\" type=\"search\" \
         inputmode=\"text\" autocomplete=\"off\" value=\"{}\" placeholder=\"0190…\"></div>\n\
         <button type=\"submit\">Show</button>\n</form>\n",
        esc(order)
    )
}

/// The step an operator can act on: the first one not settled.
fn current_step(timeline: &SagaTimeline) -> Option<&StepTimeline> {
    timeline.steps.iter().find(|step| {
        matches!(
            step.state,
            StepState::Stuck
                | StepState::Failed
                | StepState::Running
                | StepState::Compensating
                | StepState::CompensationFailed
        )
    })
}

fn step_state(state: StepState) -> &'static str {
    match state {
        StepState::Pending => "pending",
        StepState::Running => "running",
        StepState::Succeeded => "succeeded",
        StepState::Failed => "failed",
        StepState::Skipped => "skipped",
        StepState::Compensating => "compensating",
        StepState::Compensated => "compensated",
        StepState::CompensationFailed => "compensation failed",
        StepState::Stuck => "stuck",
    }
}

fn attempts_list(kind: &str, attempts: &[trellis_saga::Attempt]) -> String {
    if attempts.is_empty() {
        return String::new();
    }
    let mut out = format!("<p class=\"attempts-title\">{kind}</p><ol class=\"attempts\">");
    for attempt in attempts {
        let outcome = match attempt.outcome {
            trellis_saga::AttemptOutcome::Running => "running",
            trellis_saga::AttemptOutcome::Succeeded => "succeeded",
            trellis_saga::AttemptOutcome::Failed => "failed",
            trellis_saga::AttemptOutcome::Interrupted => "interrupted",
        };
        out.push_str(&format!(
            "<li>attempt {} at {}: {}{}{}</li>",
            attempt.attempt,
            html::time(&attempt.started_at),
            outcome,
            attempt
                .duration_ms
                .map(|ms| format!(" in {ms} ms"))
                .unwrap_or_default(),
            attempt
                .error
                .as_deref()
                .map(|e| format!(" — <span class=\"error-text\">{}</span>", esc(e)))
                .unwrap_or_default()
        ));
    }
    out.push_str("</ol>");
    out
}

/// The saga page's body (a function of the timeline alone, for the tests).
pub(crate) fn render_timeline(timeline: &SagaTimeline, done: Option<&str>) -> String {
    let id = timeline.id.to_string();
    let mut body = done_notice(done);
    body.push_str("<dl class=\"facts\">");
    let mut fact = |term: &str, value: String| {
        body.push_str(&format!("<dt>{}</dt><dd>{value}</dd>", esc(term)));
    };
    fact("Status", status_badge(timeline.status));
    fact(
        "Definition",
        format!("{} v{}", esc(&timeline.definition), timeline.version),
    );
    if let Some(order) = timeline.context["order_id"].as_str() {
        fact("Order", format!("<code>{}</code>", esc(order)));
    }
    fact("Started", html::time(&timeline.started_at));
    fact("Last change", html::time(&timeline.updated_at));
    if let Some(pivot) = &timeline.pivot {
        fact("Pivot step", esc(pivot));
    }
    if let Some(outcome) = &timeline.outcome {
        fact(
            "Outcome",
            format!("<span class=\"error-text\">{}</span>", esc(outcome)),
        );
    }
    body.push_str("</dl>\n");

    // Actions.
    let actionable = !matches!(timeline.status, SagaStatus::Completed | SagaStatus::Failed);
    if actionable {
        let path = format!("/admin/sagas/{}/confirm", query_value(&id));
        body.push_str("<nav class=\"actions\" aria-label=\"Actions on this saga\"><ul>");
        body.push_str(&format!(
            "<li><a class=\"button-link\" href=\"{path}?action=retry\">Retry…</a></li>"
        ));
        if timeline.status == SagaStatus::Running {
            body.push_str(&format!(
                "<li><a class=\"button-link\" href=\"{path}?action=cancel\">Cancel…</a></li>"
            ));
        }
        if let Some(step) = current_step(timeline) {
            body.push_str(&format!(
                "<li><a class=\"button-link\" href=\"{path}?action=skip&amp;step={}\">Skip step {}…</a></li>",
                query_value(&step.step),
                esc(&step.step)
            ));
        }
        body.push_str("</ul></nav>\n");
    }

    // Steps.
    body.push_str("<h2>Steps</h2>\n<ol class=\"timeline\">\n");
    for step in &timeline.steps {
        let state = step_state(step.state);
        let class = match step.state {
            StepState::Succeeded | StepState::Compensated => "good",
            StepState::Failed | StepState::Stuck | StepState::CompensationFailed => "bad",
            StepState::Running | StepState::Compensating => "warn",
            StepState::Pending | StepState::Skipped => "info",
        };
        body.push_str(&format!(
            "<li class=\"step\" data-step=\"{}\"><h3>{}{} <span class=\"badge {class}\">{state}</span></h3>{}{}{}</li>\n",
            esc(&step.step),
            esc(&step.step),
            if timeline.pivot.as_deref() == Some(step.step.as_str()) {
                " <span class=\"tag\">pivot</span>"
            } else {
                ""
            },
            if step.skipped || step.compensation_skipped {
                "<p class=\"hint\">An operator skipped it.</p>"
            } else {
                ""
            },
            attempts_list("Attempts", &step.attempts),
            attempts_list("Compensation", &step.compensation),
        ));
    }
    body.push_str("</ol>\n<h2>Context (inputs and outputs so far)</h2>\n");
    body.push_str(&html::json_block("The saga's context", &timeline.context));
    let rows: Vec<Vec<String>> = timeline
        .log
        .iter()
        .map(|entry| {
            vec![
                entry.seq.to_string(),
                html::time(&entry.at),
                format!(
                    "<code>{}</code>",
                    esc(&serde_json::to_string(&entry.transition).unwrap_or_default())
                ),
            ]
        })
        .collect();
    body.push_str("<h2>Log</h2>\n");
    body.push_str(&html::table(
        "Every record of the saga's log",
        &["#", "When", "Transition"],
        &rows,
    ));
    body
}

/// `GET /admin/sagas/{id}`.
pub(crate) async fn show(
    State(console): State<Shared>,
    admin: Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let id = match saga_id(&id) {
        Ok(id) => id,
        Err(page) => return page,
    };
    let timeline: SagaTimeline = match console
        .api
        .get(&admin.token, &format!("/api/admin/sagas/{id}"))
        .await
    {
        Ok(timeline) => timeline,
        Err(error) => return failure(Section::Sagas, "Saga", &error),
    };
    let body = render_timeline(&timeline, query.get("done").map(String::as_str));
    html::respond(StatusCode::OK, Section::Sagas, &format!("Saga {id}"), &body)
}

/// `GET /admin/sagas/{id}/confirm?action=retry|cancel|skip&step=NAME`.
pub(crate) async fn confirm(
    _admin: Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let id = match saga_id(&id) {
        Ok(id) => id,
        Err(page) => return page,
    };
    let step = query.get("step").map(String::as_str).unwrap_or_default();
    let back = format!("/admin/sagas/{id}");
    let (title, explanation, button) = match query.get("action").map(String::as_str) {
        Some("retry") => (
            "Retry this saga?",
            "Gives the saga's stuck or failing step (or compensation) a fresh retry budget; its engine runs it again on its next recovery pass.".to_owned(),
            "Retry saga",
        ),
        Some("cancel") => (
            "Cancel this saga?",
            "Compensates every completed step now, in reverse order (refunds, releases), then fails the saga. It cannot be undone.".to_owned(),
            "Cancel saga",
        ),
        Some("skip") if !step.is_empty() => (
            "Skip this step?",
            format!("Marks step {step:?} done without running it (or its compensation); the saga goes on as if it succeeded. Do this only after settling the step by hand."),
            "Skip step",
        ),
        _ => {
            return html::respond(
                StatusCode::BAD_REQUEST,
                Section::Sagas,
                "Unknown action",
                &html::notice("error", "Choose retry, cancel, or skip with a step."),
            );
        }
    };
    let action = query.get("action").map(String::as_str).unwrap_or_default();
    let action_url = format!("/admin/sagas/{id}/{action}");
    let extra = if action == "cancel" {
        "<label for=\"reason\">Reason (for the saga's log)</label>\n\
         <input id=\"reason\" name=\"reason\" type=\"text\" maxlength=\"200\" value=\"cancelled from the console\">\n"
    } else {
        ""
    };
    Confirmation {
        section: Section::Sagas,
        title,
        explanation: &explanation,
        action_url: &action_url,
        fields: &[("step", step)],
        extra,
        button,
        back_url: &back,
    }
    .render()
}

#[derive(Debug, Deserialize)]
struct ActionForm {
    confirm: Option<String>,
    step: Option<String>,
    reason: Option<String>,
}

/// `POST /admin/sagas/{id}/{action}`: the action, audited, then back to the saga.
pub(crate) async fn act(
    State(console): State<Shared>,
    admin: Admin,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let id = match saga_id(&id) {
        Ok(id) => id,
        Err(page) => return page,
    };
    let form: ActionForm = match form(Section::Sagas, &body) {
        Ok(form) => form,
        Err(page) => return page,
    };
    if let Err(page) = confirmed(Section::Sagas, form.confirm.as_deref()) {
        return page;
    }
    let step = form.step.unwrap_or_default();
    let (payload, detail) = match action.as_str() {
        "retry" => (None, String::new()),
        "cancel" => {
            let reason = form
                .reason
                .filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| "cancelled from the console".to_owned());
            let reason = crate::api::cut(&reason, 200);
            (
                Some(serde_json::json!({ "reason": reason })),
                format!("reason: {reason}"),
            )
        }
        "skip" if !step.is_empty() => (
            Some(serde_json::json!({ "step": step })),
            format!("step: {step}"),
        ),
        _ => {
            return html::respond(
                StatusCode::NOT_FOUND,
                Section::Sagas,
                "Unknown action",
                &html::notice("error", "Choose retry, cancel, or skip with a step."),
            );
        }
    };
    let target = id.to_string();
    let audit_action = format!("saga.{action}");
    let path = format!("/api/admin/sagas/{id}/{action}");
    let result = audited(
        &console,
        &admin,
        Section::Sagas,
        (&audit_action, &target, &detail),
        console.api.send(&admin.token, Method::POST, &path, payload),
    )
    .await;
    match result {
        Ok(_) => redirect(&format!("/admin/sagas/{id}?done={action}")),
        Err(page) => page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_saga_offers_retry_and_skip_and_shows_errors_inert() {
        let timeline: SagaTimeline = serde_json::from_value(serde_json::json!({
            "id": "0190b4a8-0000-7000-8000-000000000001",
            "definition": "order",
            "version": 1,
            "status": "stuck",
            "started_at": "2026-12-06T10:00:00Z",
            "updated_at": "2026-12-06T10:01:00Z",
            "pivot": "ship",
            "steps": [
                {"step": "reserve", "state": "succeeded", "attempts": [
                    {"attempt": 1, "started_at": "2026-12-06T10:00:00Z", "ended_at": "2026-12-06T10:00:01Z",
                     "duration_ms": 5, "outcome": "succeeded", "error": null}],
                 "compensation": [], "skipped": false, "compensation_skipped": false},
                {"step": "confirm", "state": "stuck", "attempts": [
                    {"attempt": 1, "started_at": "2026-12-06T10:00:02Z", "ended_at": "2026-12-06T10:00:03Z",
                     "duration_ms": 7, "outcome": "failed", "error": "<script>alert(1)</script>"}],
                 "compensation": [], "skipped": false, "compensation_skipped": false}
            ],
            "outcome": "stuck on confirm: <b>down</b>",
            "context": {"order_id": "o-\"1\""},
            "log": []
        }))
        .expect("a timeline");
        let html = render_timeline(&timeline, Some("retry"));
        assert!(html.contains("?action=retry"));
        assert!(html.contains("?action=skip&amp;step=confirm"));
        assert!(
            !html.contains("?action=cancel"),
            "a stuck saga is not running"
        );
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
        assert!(!html.contains("<b>down"));
        assert!(html.contains("Retry recorded"));
        assert!(html.contains("data-step=\"confirm\""));
    }
}
