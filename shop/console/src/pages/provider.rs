//! The payment-provider simulator's fault switches (outage, latency, failure rate), beside the
//! circuit breaker that guards the payments service's calls to it, so an operator can turn a
//! fault on and watch the breaker open, then close again once it is off.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use reqwest::Method;
use serde::Deserialize;

use super::{audited, done_notice, failure, form};
use crate::auth::Admin;
use crate::html::{self, Section, esc};
use crate::{Shared, redirect};

/// The simulator's largest latency, milliseconds (its own limit).
const LATENCY_MS_MAX: u64 = 60_000;

/// The settings this page shows and changes (the simulator has more; they are kept).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct ProviderSettings {
    pub(crate) outage: bool,
    pub(crate) latency_ms: u64,
    pub(crate) failure_rate: f64,
}

/// The page's body from the settings and the breaker states (name, state).
pub(crate) fn render(
    settings: &ProviderSettings,
    breakers: &[(String, &str)],
    done: Option<&str>,
) -> String {
    let mut body = done_notice(done);
    body.push_str(&format!(
        "<form method=\"post\" action=\"/admin/provider\" class=\"stack narrow\">\n\
         <fieldset><legend>Faults</legend>\n\
         <div class=\"check\"><input id=\"outage\" name=\"outage\" type=\"checkbox\" value=\"on\"{}>\
         <label for=\"outage\">Outage: every call answers 503</label></div>\n\
         <label for=\"latency_ms\">Added latency (ms, 0 to {LATENCY_MS_MAX})</label>\n\
         <input id=\"latency_ms\" name=\"latency_ms\" type=\"number\" min=\"0\" max=\"{LATENCY_MS_MAX}\" step=\"1\" value=\"{}\" required>\n\
         <label for=\"failure_rate\">Failure rate (0 to 1: the share of calls that answer 503)</label>\n\
         <input id=\"failure_rate\" name=\"failure_rate\" type=\"number\" min=\"0\" max=\"1\" step=\"0.01\" value=\"{}\" required>\n\
         </fieldset>\n<button type=\"submit\">Apply</button>\n</form>\n",
        if settings.outage { " checked" } else { "" },
        settings.latency_ms,
        settings.failure_rate,
    ));
    let rows: Vec<Vec<String>> = breakers
        .iter()
        .map(|(name, state)| {
            vec![
                esc(name),
                format!(
                    "<span data-breaker=\"{}\" data-state=\"{}\">{}</span>",
                    esc(name),
                    esc(state),
                    esc(state)
                ),
            ]
        })
        .collect();
    body.push_str(&html::table(
        "Circuit breakers now (the overview follows them live)",
        &["Breaker", "State"],
        &rows,
    ));
    body
}

/// `GET /admin/provider`.
pub(crate) async fn page(
    State(console): State<Shared>,
    admin: Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (settings, figures) = tokio::join!(
        console
            .api
            .get::<ProviderSettings>(&admin.token, "/api/admin/provider"),
        console.scraper.figures()
    );
    let settings = match settings {
        Ok(settings) => settings,
        Err(error) => return failure(Section::Provider, "Payment provider", &error),
    };
    let breakers: Vec<(String, &str)> = figures
        .breakers
        .iter()
        .map(|b| (b.name.clone(), b.state))
        .collect();
    html::respond(
        StatusCode::OK,
        Section::Provider,
        "Payment provider",
        &render(&settings, &breakers, query.get("done").map(String::as_str)),
    )
}

#[derive(Debug, Deserialize)]
struct SettingsForm {
    /// A checkbox: present (`on`) when ticked.
    outage: Option<String>,
    latency_ms: String,
    failure_rate: String,
}

fn invalid(message: &str) -> Response {
    html::respond(
        StatusCode::BAD_REQUEST,
        Section::Provider,
        "Payment provider",
        &html::notice("error", message),
    )
}

/// `POST /admin/provider`: sends the three settings (the simulator keeps the others), audited.
pub(crate) async fn update(State(console): State<Shared>, admin: Admin, body: Bytes) -> Response {
    let form: SettingsForm = match form(Section::Provider, &body) {
        Ok(form) => form,
        Err(page) => return page,
    };
    let Some(latency_ms) = form
        .latency_ms
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms <= LATENCY_MS_MAX)
    else {
        return invalid(&format!(
            "The latency must be a whole number of milliseconds from 0 to {LATENCY_MS_MAX}."
        ));
    };
    let Some(failure_rate) = form
        .failure_rate
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|rate| (0.0..=1.0).contains(rate))
    else {
        return invalid("The failure rate must be a number from 0 to 1.");
    };
    let update = serde_json::json!({
        "outage": form.outage.is_some(),
        "latency_ms": latency_ms,
        "failure_rate": failure_rate,
    });
    let detail = update.to_string();
    let result = audited(
        &console,
        &admin,
        Section::Provider,
        ("provider.update", "payment-provider", &detail),
        console.api.send(
            &admin.token,
            Method::PUT,
            "/api/admin/provider",
            Some(update),
        ),
    )
    .await;
    match result {
        Ok(_) => redirect("/admin/provider?done=provider"),
        Err(page) => page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_shows_the_settings_with_labels() {
        let settings = ProviderSettings {
            outage: true,
            latency_ms: 250,
            failure_rate: 0.1,
        };
        let html = render(&settings, &[("payment_provider".to_owned(), "open")], None);
        assert!(html.contains("type=\"checkbox\" value=\"on\" checked"));
        assert!(html.contains("value=\"250\"") && html.contains("value=\"0.1\""));
        for id in ["outage", "latency_ms", "failure_rate"] {
            assert!(
                html.contains(&format!("<label for=\"{id}\"")),
                "{id} has a label"
            );
        }
        assert!(html.contains("data-state=\"open\""));
    }
}
