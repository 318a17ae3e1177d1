//! The pages, one module per section, and what their actions share: parsing a form, the
//! confirmation step, and running an action under an audit entry.
//!
//! Helpers answer `Result<_, Response>`: the error is the page to show, built once per
//! request, so its size does not matter.
#![allow(clippy::result_large_err)]

pub(crate) mod audit;
pub(crate) mod dead_letters;
pub(crate) mod overview;
pub(crate) mod provider;
pub(crate) mod sagas;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use serde::de::DeserializeOwned;

use crate::Console;
use crate::api::ApiFailure;
use crate::auth::Admin;
use crate::html::{self, Section, esc};

/// A page explaining why a call to the admin API failed, with the API's status.
pub(crate) fn failure(section: Section, title: &str, failure: &ApiFailure) -> Response {
    html::respond(
        failure.status,
        section,
        title,
        &html::notice("error", &failure.message),
    )
}

/// A form body, or a 400 page.
pub(crate) fn form<T: DeserializeOwned>(section: Section, body: &Bytes) -> Result<T, Response> {
    serde_urlencoded::from_bytes(body).map_err(|error| {
        html::respond(
            StatusCode::BAD_REQUEST,
            section,
            "Bad form",
            &html::notice("error", &format!("The form did not parse: {error}")),
        )
    })
}

/// The confirmation step of an action: what will happen, a form posting to `action_url`
/// with `fields` (name, value) hidden and `confirm=yes`, and a way back. `extra` is more
/// markup inside the form (a reason field).
pub(crate) struct Confirmation<'a> {
    pub(crate) section: Section,
    pub(crate) title: &'a str,
    /// What the action does, as text.
    pub(crate) explanation: &'a str,
    pub(crate) action_url: &'a str,
    pub(crate) fields: &'a [(&'a str, &'a str)],
    pub(crate) extra: &'a str,
    /// The submit button's label.
    pub(crate) button: &'a str,
    pub(crate) back_url: &'a str,
}

impl Confirmation<'_> {
    pub(crate) fn render(&self) -> Response {
        let mut body = format!(
            "<p class=\"explain\">{}</p>\n<form method=\"post\" action=\"{}\" class=\"stack confirm\">\n",
            esc(self.explanation),
            esc(self.action_url)
        );
        for (name, value) in self.fields {
            body.push_str(&format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">\n",
                esc(name),
                esc(value)
            ));
        }
        body.push_str("<input type=\"hidden\" name=\"confirm\" value=\"yes\">\n");
        body.push_str(self.extra);
        body.push_str(&format!(
            "<div class=\"buttons\"><button type=\"submit\" class=\"danger\">{}</button> \
             <a href=\"{}\" class=\"button-link\">Cancel, go back</a></div>\n</form>\n",
            esc(self.button),
            esc(self.back_url)
        ));
        html::respond(StatusCode::OK, self.section, self.title, &body)
    }
}

/// What an action's form must carry: the confirmation.
pub(crate) fn confirmed(section: Section, confirm: Option<&str>) -> Result<(), Response> {
    if confirm == Some("yes") {
        return Ok(());
    }
    Err(html::respond(
        StatusCode::BAD_REQUEST,
        section,
        "Not confirmed",
        &html::notice(
            "error",
            "Actions need confirming: use the action's button on its confirmation page.",
        ),
    ))
}

/// Runs `act` as `admin` under an audit entry (`action` on `target`, with `detail`): the entry
/// is written first, and when that fails nothing is attempted (503 page); then the outcome is
/// recorded. Answers `act`'s result, or the page to show.
pub(crate) async fn audited<T, F>(
    console: &Console,
    admin: &Admin,
    section: Section,
    (action, target, detail): (&str, &str, &str),
    act: F,
) -> Result<T, Response>
where
    F: std::future::Future<Output = Result<T, ApiFailure>>,
{
    let actor = console.actor(admin).await;
    let entry = match console.audit.begin(&actor, action, target, detail).await {
        Ok(entry) => entry,
        Err(error) => {
            tracing::error!(%error, action, target, "console: cannot write the audit log; action not attempted");
            return Err(html::respond(
                StatusCode::SERVICE_UNAVAILABLE,
                section,
                "Not done",
                &html::notice(
                    "error",
                    "The audit log cannot be written, so the action was not attempted. Try again in a moment.",
                ),
            ));
        }
    };
    let result = act.await;
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(failure) => format!("failed: {}", failure.message),
    };
    if let Err(error) = console.audit.finish(&entry, &outcome).await {
        tracing::error!(%error, entry, %outcome, "console: cannot record an action's outcome");
    }
    result.map_err(|failure| self::failure(section, "Not done", &failure))
}

/// A notice for a `done=` query value the action handlers redirect with.
pub(crate) fn done_notice(done: Option<&str>) -> String {
    let text = match done {
        Some("retry") => "Retry recorded: the saga's engine picks it up on its next recovery pass.",
        Some("cancel") => "Cancel recorded: the saga compensates on its engine's next pass.",
        Some("skip") => "Skip recorded: the saga goes on past the step on its engine's next pass.",
        Some("replay") => "Replayed: the message is back on its topic for its consumer group.",
        Some("discard") => "Discarded.",
        Some("provider") => "The payment provider's settings are changed.",
        _ => return String::new(),
    };
    html::notice("ok", text)
}
