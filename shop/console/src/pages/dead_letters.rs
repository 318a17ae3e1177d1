//! Dead letters: failure groups by handler (the consumer group) and error type, as ServicePulse
//! groups them; a group's messages; one message's envelope, headers and failure history; and
//! replay (redrive) or discard of one message or a whole group, each confirmed and audited.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use reqwest::Method;
use serde::Deserialize;
use trellis_bus::{DeadLetter, DlqAction};

use super::{Confirmation, audited, confirmed, done_notice, failure, form};
use crate::api::ApiFailure;
use crate::auth::Admin;
use crate::html::{self, Section, esc, query_value};
use crate::{Shared, redirect};

/// The most dead letters one listing reads (the bus's page limit); groups are made from them.
const SCAN_MAX: usize = 1_000;
/// The most actions read for one message's history.
const ACTIONS_READ_MAX: usize = 1_000;

/// One failure group: the messages one handler gave up on with one kind of error.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Group {
    /// The consumer group (the handler).
    pub(crate) group: String,
    /// The error kind.
    pub(crate) error_kind: String,
    /// The failure fingerprint (kind + normalised message).
    pub(crate) fingerprint: String,
    /// One example message.
    pub(crate) sample_error: String,
    /// How many.
    pub(crate) count: usize,
    /// Topics, with counts.
    pub(crate) topics: BTreeMap<String, usize>,
    /// The newest last failure.
    pub(crate) last_at: chrono::DateTime<chrono::Utc>,
}

/// Groups `letters` by (consumer group, fingerprint), largest group first.
pub(crate) fn group_letters(letters: &[DeadLetter]) -> Vec<Group> {
    let mut groups: BTreeMap<(&str, &str), Group> = BTreeMap::new();
    for letter in letters {
        let entry = groups
            .entry((letter.group.as_str(), letter.fingerprint.as_str()))
            .or_insert_with(|| Group {
                group: letter.group.clone(),
                error_kind: letter.error_kind.clone(),
                fingerprint: letter.fingerprint.clone(),
                sample_error: letter.error.clone(),
                count: 0,
                topics: BTreeMap::new(),
                last_at: letter.last_failure_at,
            });
        entry.count += 1;
        *entry.topics.entry(letter.topic.clone()).or_default() += 1;
        entry.last_at = entry.last_at.max(letter.last_failure_at);
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.group.cmp(&b.group)));
    groups
}

fn group_query(group: &str, fingerprint: &str) -> String {
    format!(
        "group={}&fingerprint={}",
        query_value(group),
        query_value(fingerprint)
    )
}

async fn letters(
    console: &Shared,
    admin: &Admin,
    group: Option<(&str, &str)>,
) -> Result<Vec<DeadLetter>, ApiFailure> {
    let filter = group
        .map(|(group, fingerprint)| format!("{}&", group_query(group, fingerprint)))
        .unwrap_or_default();
    console
        .api
        .get(
            &admin.token,
            &format!("/api/admin/dlq/dead-letters?{filter}limit={SCAN_MAX}"),
        )
        .await
}

/// `GET /admin/dead-letters`: the failure groups.
pub(crate) async fn groups(
    State(console): State<Shared>,
    admin: Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let letters = match letters(&console, &admin, None).await {
        Ok(letters) => letters,
        Err(error) => return failure(Section::DeadLetters, "Dead letters", &error),
    };
    let mut body = done_notice(query.get("done").map(String::as_str));
    body.push_str(&render_groups(
        &group_letters(&letters),
        letters.len() >= SCAN_MAX,
    ));
    html::respond(StatusCode::OK, Section::DeadLetters, "Dead letters", &body)
}

/// The groups table.
pub(crate) fn render_groups(groups: &[Group], truncated: bool) -> String {
    let mut body = String::new();
    if truncated {
        body.push_str(&html::notice(
            "ok",
            &format!(
                "Grouped from the oldest {SCAN_MAX} dead letters; act on a group to see the rest."
            ),
        ));
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            let query = group_query(&g.group, &g.fingerprint);
            vec![
                format!(
                    "<a href=\"/admin/dead-letters/group?{query}\">{}</a>",
                    esc(&g.group)
                ),
                format!("<code>{}</code>", esc(&g.error_kind)),
                format!("<span class=\"error-text\">{}</span>", esc(&g.sample_error)),
                g.count.to_string(),
                esc(&g
                    .topics
                    .iter()
                    .map(|(topic, n)| format!("{topic} ({n})"))
                    .collect::<Vec<_>>()
                    .join(", ")),
                html::time(&g.last_at),
                format!(
                    "<a href=\"/admin/dead-letters/group/confirm?{query}&amp;action=replay\">Replay all…</a> \
                     <a href=\"/admin/dead-letters/group/confirm?{query}&amp;action=discard\">Discard all…</a>"
                ),
            ]
        })
        .collect();
    body.push_str(&html::table(
        "Failure groups, largest first",
        &[
            "Handler (consumer group)",
            "Error type",
            "Example error",
            "Messages",
            "Topics",
            "Last failure",
            "Actions",
        ],
        &rows,
    ));
    body
}

/// The query naming a failure group (and, on its confirmation page, the action).
#[derive(Debug, Deserialize)]
pub(crate) struct GroupQuery {
    #[serde(default)]
    group: String,
    #[serde(default)]
    fingerprint: String,
    action: Option<String>,
}

/// `GET /admin/dead-letters/group?group=&fingerprint=`: the group's messages.
async fn group_page(console: &Shared, admin: &Admin, query: &GroupQuery) -> Response {
    let letters = match letters(console, admin, Some((&query.group, &query.fingerprint))).await {
        Ok(letters) => letters,
        Err(error) => return failure(Section::DeadLetters, "Failure group", &error),
    };
    let group_query = group_query(&query.group, &query.fingerprint);
    let mut body = format!(
        "<dl class=\"facts\"><dt>Handler</dt><dd>{}</dd><dt>Fingerprint</dt><dd><code>{}</code></dd></dl>\n\
         <nav class=\"actions\" aria-label=\"Actions on this group\"><ul>\
         <li><a class=\"button-link\" href=\"/admin/dead-letters/group/confirm?{group_query}&amp;action=replay\">Replay all…</a></li>\
         <li><a class=\"button-link\" href=\"/admin/dead-letters/group/confirm?{group_query}&amp;action=discard\">Discard all…</a></li>\
         </ul></nav>\n",
        esc(&query.group),
        esc(&query.fingerprint)
    );
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|letter| {
            let id = letter.id.to_string();
            vec![
                format!(
                    "<a href=\"/admin/dead-letters/{}\"><code>{}</code></a>",
                    query_value(&id),
                    esc(&id)
                ),
                esc(&letter.envelope.kind),
                esc(&letter.envelope.subject),
                letter.attempts.to_string(),
                html::time(&letter.last_failure_at),
                format!("<span class=\"error-text\">{}</span>", esc(&letter.error)),
            ]
        })
        .collect();
    body.push_str(&html::table(
        "Messages in this group, oldest first",
        &[
            "Dead letter",
            "Type",
            "Subject",
            "Deliveries",
            "Last failure",
            "Error",
        ],
        &rows,
    ));
    html::respond(StatusCode::OK, Section::DeadLetters, "Failure group", &body)
}

/// `GET /admin/dead-letters/group`.
pub(crate) async fn group(
    State(console): State<Shared>,
    admin: Admin,
    Query(query): Query<GroupQuery>,
) -> Response {
    group_page(&console, &admin, &query).await
}

fn letter_id(raw: &str) -> Result<uuid::Uuid, Response> {
    uuid::Uuid::parse_str(raw).map_err(|_| {
        html::respond(
            StatusCode::NOT_FOUND,
            Section::DeadLetters,
            "No such dead letter",
            &html::notice("error", "That is not a dead letter id."),
        )
    })
}

/// The page of one dead letter, from the letter and the actions taken on it.
pub(crate) fn render_letter(letter: &DeadLetter, actions: &[DlqAction]) -> String {
    let id = letter.id.to_string();
    let envelope = &letter.envelope;
    let mut body = String::new();
    body.push_str(&format!(
        "<nav class=\"actions\" aria-label=\"Actions on this message\"><ul>\
         <li><a class=\"button-link\" href=\"/admin/dead-letters/{0}/confirm?action=replay\">Replay…</a></li>\
         <li><a class=\"button-link\" href=\"/admin/dead-letters/{0}/confirm?action=discard\">Discard…</a></li>\
         </ul></nav>\n",
        query_value(&id)
    ));
    body.push_str("<h2>Envelope</h2>\n<dl class=\"facts\">");
    let optional = |value: Option<String>| value.map(|v| esc(&v)).unwrap_or_else(|| "–".to_owned());
    for (term, value) in [
        ("Message id", esc(&envelope.id.to_string())),
        ("Type", esc(&envelope.kind)),
        ("Source", esc(&envelope.source)),
        ("Subject", esc(&envelope.subject)),
        ("Time", html::time(&envelope.time)),
        (
            "Sequence",
            optional(envelope.sequence.map(|s| s.to_string())),
        ),
        (
            "Correlation id",
            optional(envelope.correlation_id.map(|c| c.to_string())),
        ),
        (
            "Causation id",
            optional(envelope.causation_id.map(|c| c.to_string())),
        ),
        ("Traceparent", optional(envelope.traceparent.clone())),
        ("Topic", esc(&letter.topic)),
        ("Handler (consumer group)", esc(&letter.group)),
    ] {
        body.push_str(&format!("<dt>{term}</dt><dd>{value}</dd>"));
    }
    body.push_str("</dl>\n");
    let rows: Vec<Vec<String>> = envelope
        .headers
        .iter()
        .map(|(name, value)| vec![format!("<code>{}</code>", esc(name)), esc(value)])
        .collect();
    body.push_str(&html::table("Headers", &["Header", "Value"], &rows));
    body.push_str("<h2>Data</h2>\n");
    body.push_str(&html::json_block("The message's data", &envelope.data));
    body.push_str("<h2>Failure history</h2>\n<dl class=\"facts\">");
    for (term, value) in [
        ("First failure", html::time(&letter.first_failure_at)),
        ("Last failure", html::time(&letter.last_failure_at)),
        ("Deliveries", letter.attempts.to_string()),
        ("Why dead-lettered", esc(letter.reason.as_str())),
        (
            "Error type",
            format!("<code>{}</code>", esc(&letter.error_kind)),
        ),
        (
            "Last error",
            format!("<span class=\"error-text\">{}</span>", esc(&letter.error)),
        ),
        ("Replayed before", letter.redrive_count.to_string()),
    ] {
        body.push_str(&format!("<dt>{term}</dt><dd>{value}</dd>"));
    }
    body.push_str("</dl>\n");
    let rows: Vec<Vec<String>> = actions
        .iter()
        .filter(|action| action.dead_letter_id == letter.id || action.message_id == envelope.id)
        .map(|action| {
            vec![
                html::time(&action.at),
                esc(action.action.as_str()),
                esc(&action.actor),
            ]
        })
        .collect();
    body.push_str(&html::table(
        "Operator actions on this message, newest first",
        &["When", "Action", "By"],
        &rows,
    ));
    body
}

/// `GET /admin/dead-letters/{id}`.
pub(crate) async fn show(
    State(console): State<Shared>,
    admin: Admin,
    Path(id): Path<String>,
) -> Response {
    let id = match letter_id(&id) {
        Ok(id) => id,
        Err(page) => return page,
    };
    let letter_path = format!("/api/admin/dlq/dead-letters/{id}");
    let actions_path = format!("/api/admin/dlq/dead-letters/actions?limit={ACTIONS_READ_MAX}");
    let (letter, actions) = tokio::join!(
        console.api.get::<DeadLetter>(&admin.token, &letter_path),
        console
            .api
            .get::<Vec<DlqAction>>(&admin.token, &actions_path)
    );
    let letter = match letter {
        Ok(letter) => letter,
        Err(error) => return failure(Section::DeadLetters, "Dead letter", &error),
    };
    // The action history is extra: a failure to read it leaves the page without it.
    let actions = actions.unwrap_or_default();
    html::respond(
        StatusCode::OK,
        Section::DeadLetters,
        &format!("Dead letter {id}"),
        &render_letter(&letter, &actions),
    )
}

fn explain(action: &str, what: &str) -> Option<(String, &'static str)> {
    match action {
        "replay" => Some((
            format!(
                "Sends {what} back to its topic for its consumer group, which handles it again. Make sure the cause is fixed, or it comes back here."
            ),
            "Replay",
        )),
        "discard" => Some((
            format!(
                "Deletes {what} for good: it will never be handled. The bus's action log keeps a record."
            ),
            "Discard",
        )),
        _ => None,
    }
}

fn unknown_action() -> Response {
    html::respond(
        StatusCode::NOT_FOUND,
        Section::DeadLetters,
        "Unknown action",
        &html::notice("error", "Choose replay or discard."),
    )
}

/// `GET /admin/dead-letters/{id}/confirm?action=replay|discard`.
pub(crate) async fn confirm(
    _admin: Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let id = match letter_id(&id) {
        Ok(id) => id,
        Err(page) => return page,
    };
    let action = query.get("action").map(String::as_str).unwrap_or_default();
    let Some((explanation, button)) = explain(action, "this message") else {
        return unknown_action();
    };
    Confirmation {
        section: Section::DeadLetters,
        title: &format!("{button} dead letter {id}?"),
        explanation: &explanation,
        action_url: &format!("/admin/dead-letters/{id}/{action}"),
        fields: &[],
        extra: "",
        button,
        back_url: &format!("/admin/dead-letters/{id}"),
    }
    .render()
}

#[derive(Debug, Deserialize)]
struct ConfirmForm {
    confirm: Option<String>,
    #[serde(default)]
    group: String,
    #[serde(default)]
    fingerprint: String,
}

/// `POST /admin/dead-letters/{id}/replay|discard`.
pub(crate) async fn act(
    State(console): State<Shared>,
    admin: Admin,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let id = match letter_id(&id) {
        Ok(id) => id,
        Err(page) => return page,
    };
    let form: ConfirmForm = match form(Section::DeadLetters, &body) {
        Ok(form) => form,
        Err(page) => return page,
    };
    if let Err(page) = confirmed(Section::DeadLetters, form.confirm.as_deref()) {
        return page;
    }
    let (method, path) = match action.as_str() {
        "replay" => (
            Method::POST,
            format!("/api/admin/dlq/dead-letters/{id}/redrive"),
        ),
        "discard" => (Method::DELETE, format!("/api/admin/dlq/dead-letters/{id}")),
        _ => return unknown_action(),
    };
    let target = id.to_string();
    let audit_action = format!("dead_letter.{action}");
    let result = audited(
        &console,
        &admin,
        Section::DeadLetters,
        (&audit_action, &target, ""),
        console.api.send(&admin.token, method, &path, None),
    )
    .await;
    match result {
        Ok(_) => redirect(&format!("/admin/dead-letters?done={action}")),
        Err(page) => page,
    }
}

/// `GET /admin/dead-letters/group/confirm?group=&fingerprint=&action=replay|discard`.
pub(crate) async fn confirm_group(_admin: Admin, Query(query): Query<GroupQuery>) -> Response {
    let action = query.action.as_deref().unwrap_or_default();
    let what = format!(
        "every message of handler {:?} that failed this way",
        query.group
    );
    let Some((explanation, button)) = explain(action, &what) else {
        return unknown_action();
    };
    Confirmation {
        section: Section::DeadLetters,
        title: &format!("{button} the whole group?"),
        explanation: &explanation,
        action_url: &format!("/admin/dead-letters/group/{action}"),
        fields: &[
            ("group", query.group.as_str()),
            ("fingerprint", query.fingerprint.as_str()),
        ],
        extra: "",
        button: &format!("{button} all"),
        back_url: &format!(
            "/admin/dead-letters/group?{}",
            group_query(&query.group, &query.fingerprint)
        ),
    }
    .render()
}

/// `POST /admin/dead-letters/group/replay|discard`: a whole failure group. Replay is one call
/// (the bus redrives what the filter matches); discard deletes the group's messages one by
/// one, at most [`SCAN_MAX`] per confirmation.
pub(crate) async fn act_on_group(
    State(console): State<Shared>,
    admin: Admin,
    Path(action): Path<String>,
    body: Bytes,
) -> Response {
    let form: ConfirmForm = match form(Section::DeadLetters, &body) {
        Ok(form) => form,
        Err(page) => return page,
    };
    if let Err(page) = confirmed(Section::DeadLetters, form.confirm.as_deref()) {
        return page;
    }
    if form.group.is_empty() || form.fingerprint.is_empty() {
        return html::respond(
            StatusCode::BAD_REQUEST,
            Section::DeadLetters,
            "Which group?",
            &html::notice("error", "A group needs its handler and fingerprint."),
        );
    }
    let target = format!("{} / {}", form.group, form.fingerprint);
    let audit_action = format!("dead_letter_group.{action}");
    let work = async {
        match action.as_str() {
            "replay" => {
                let answer = console
                    .api
                    .send(
                        &admin.token,
                        Method::POST,
                        "/api/admin/dlq/dead-letters/redrive",
                        Some(serde_json::json!({
                            "group": form.group,
                            "fingerprint": form.fingerprint,
                        })),
                    )
                    .await?;
                Ok::<usize, ApiFailure>(answer["redriven"].as_array().map_or(0, Vec::len))
            }
            _ => {
                let letters =
                    letters(&console, &admin, Some((&form.group, &form.fingerprint))).await?;
                for letter in &letters {
                    console
                        .api
                        .send(
                            &admin.token,
                            Method::DELETE,
                            &format!("/api/admin/dlq/dead-letters/{}", letter.id),
                            None,
                        )
                        .await?;
                }
                Ok::<usize, ApiFailure>(letters.len())
            }
        }
    };
    if action != "replay" && action != "discard" {
        return unknown_action();
    }
    let result = audited(
        &console,
        &admin,
        Section::DeadLetters,
        (&audit_action, &target, ""),
        work,
    )
    .await;
    match result {
        Ok(_) => redirect(&format!("/admin/dead-letters?done={action}")),
        Err(page) => page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(group: &str, error: &str, fingerprint: &str) -> DeadLetter {
        serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::now_v7(),
            "group": group,
            "topic": "orders.created",
            "envelope": {
                "id": uuid::Uuid::now_v7(),
                "type": "order.created",
                "source": "orders",
                "subject": "o-1",
                "time": "2026-12-06T10:00:00Z",
                "headers": {"x-note": "<i>hi</i>"},
                "data": {"note": "</pre><script>x()</script>"}
            },
            "reason": "max_deliveries",
            "attempts": 5,
            "first_failure_at": "2026-12-06T10:00:00Z",
            "last_failure_at": "2026-12-06T10:05:00Z",
            "error_kind": "handler",
            "error": error,
            "fingerprint": fingerprint,
            "state": "dead",
            "redrive_count": 0
        }))
        .expect("a dead letter")
    }

    #[test]
    fn letters_group_by_handler_and_fingerprint_largest_first() {
        let letters = vec![
            letter("inventory", "no stock for 1", "handler:no stock for N"),
            letter("inventory", "no stock for 2", "handler:no stock for N"),
            letter("payments", "no stock for 3", "handler:no stock for N"),
        ];
        let groups = group_letters(&letters);
        assert_eq!(groups.len(), 2, "one per handler");
        assert_eq!(groups[0].group, "inventory");
        assert_eq!(groups[0].count, 2);
        let html = render_groups(&groups, false);
        assert!(html.contains("group=inventory&fingerprint=handler%3Ano%20stock%20for%20N"));
    }

    #[test]
    fn a_letter_shows_envelope_headers_and_history_inert() {
        let letter = letter("inventory", "<b>boom</b>", "f");
        let html = render_letter(&letter, &[]);
        assert!(html.contains("order.created") && html.contains("max_deliveries"));
        assert!(html.contains("x-note") && html.contains("&lt;i&gt;hi&lt;/i&gt;"));
        assert!(!html.contains("<script>") && !html.contains("<b>boom"));
        assert!(html.contains("/confirm?action=replay"));
    }
}
