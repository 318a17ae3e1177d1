//! The audit log page: who did what, when, and how it ended, newest first.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use crate::Shared;
use crate::audit::{AUDIT_PAGE_MAX, AuditEntry};
use crate::auth::Admin;
use crate::html::{self, Section, esc};

/// Entries shown without `?limit=`.
const LIMIT_DEFAULT: i64 = 200;

/// The table of `entries`.
pub(crate) fn render(entries: &[AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| {
            let who = match &entry.actor.email {
                Some(email) => format!(
                    "{} <span class=\"hint\">({})</span>",
                    esc(email),
                    esc(&entry.actor.id)
                ),
                None => esc(&entry.actor.id),
            };
            let outcome_class = if entry.outcome == "ok" {
                "good"
            } else if entry.outcome == "requested" {
                "warn"
            } else {
                "bad"
            };
            vec![
                html::time(&entry.at),
                who,
                format!("<code>{}</code>", esc(&entry.action)),
                esc(&entry.target),
                esc(&entry.detail),
                format!(
                    "<span class=\"badge {outcome_class}\">{}</span>",
                    esc(&entry.outcome)
                ),
            ]
        })
        .collect();
    html::table(
        "Actions taken in this console, newest first",
        &["When", "Who", "What", "On", "Details", "Outcome"],
        &rows,
    )
}

/// `GET /admin/audit?limit=N`.
pub(crate) async fn page(
    State(console): State<Shared>,
    _admin: Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<i64>().ok())
        .unwrap_or(LIMIT_DEFAULT)
        .clamp(1, AUDIT_PAGE_MAX);
    match console.audit.recent(limit).await {
        Ok(entries) => html::respond(
            StatusCode::OK,
            Section::Audit,
            "Audit log",
            &format!(
                "<p class=\"hint\">Kept in the console's own database; an entry is written before its action is sent, so <em>requested</em> means the outcome was never recorded.</p>\n{}",
                render(&entries)
            ),
        ),
        Err(error) => {
            tracing::error!(%error, "console: cannot read the audit log");
            html::respond(
                StatusCode::SERVICE_UNAVAILABLE,
                Section::Audit,
                "Audit log",
                &html::notice(
                    "error",
                    "The audit log cannot be read just now; try again in a moment.",
                ),
            )
        }
    }
}
