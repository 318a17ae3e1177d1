//! The overview: health, RED per service, breakers, dead letters, sagas and projection lag,
//! with a live part the script reloads every few seconds.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::auth::Admin;
use crate::html::{self, Section, esc};
use crate::metrics::{Figures, SCRAPE_INTERVAL_MIN};
use crate::{HEALTH_TIMEOUT, Shared, Target};

/// How often the page reloads its live part, milliseconds.
pub(crate) const POLL_INTERVAL_MS: u64 = 3_000;

/// `GET /admin`.
pub(crate) async fn page(State(console): State<Shared>, _admin: Admin) -> Response {
    let live = live_html(&console).await;
    let body = format!(
        "<p class=\"hint\" id=\"live-hint\">Updates every {} s while this tab is visible.</p>\n\
         <div id=\"live\" data-poll=\"/admin/overview/live\" data-interval=\"{POLL_INTERVAL_MS}\">\n{live}</div>\n",
        POLL_INTERVAL_MS / 1000
    );
    html::respond(StatusCode::OK, Section::Overview, "Overview", &body)
}

/// `GET /admin/overview/live`: the live part alone (a fragment, not a page).
pub(crate) async fn live(State(console): State<Shared>, _admin: Admin) -> Response {
    Html(live_html(&console).await).into_response()
}

/// One service's readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) name: String,
    /// `ready`, `not ready (503)` or `down`.
    pub(crate) state: String,
}

async fn health(client: &reqwest::Client, targets: &[Target]) -> Vec<Health> {
    let checks = targets.iter().map(|target| async move {
        let url = format!("{}/readyz", target.url.trim_end_matches('/'));
        let state = match client.get(&url).timeout(HEALTH_TIMEOUT).send().await {
            Ok(response) if response.status().is_success() => "ready".to_owned(),
            Ok(response) => format!("not ready ({})", response.status().as_u16()),
            Err(_) => "down".to_owned(),
        };
        Health {
            name: target.name.clone(),
            state,
        }
    });
    futures_util::future::join_all(checks).await
}

/// The health checks, run at most once per [`SCRAPE_INTERVAL_MIN`] however many operators
/// watch (concurrent viewers wait for one round of checks), like the scrape.
async fn cached_health(console: &Shared) -> Vec<Health> {
    let mut cached = console.health.lock().await;
    if let Some((at, health)) = cached.as_ref()
        && at.elapsed() < SCRAPE_INTERVAL_MIN
    {
        return health.clone();
    }
    let health = health(&console.client, &console.health_targets).await;
    *cached = Some((std::time::Instant::now(), health.clone()));
    health
}

async fn live_html(console: &Shared) -> String {
    let (health, figures) = tokio::join!(cached_health(console), console.scraper.figures());
    render_live(&health, &figures, chrono::Utc::now())
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "–".to_owned(), |r| format!("{:.1} %", r * 100.0))
}

fn millis(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "–".to_owned(), |s| format!("{:.1} ms", s * 1000.0))
}

fn state_badge(state: &str) -> String {
    let class = match state {
        "ready" | "closed" | "forced closed" => "good",
        "half-open" => "warn",
        _ => "bad",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(state))
}

/// The live part, from the health checks and the figures.
pub(crate) fn render_live(
    health: &[Health],
    figures: &Figures,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut out = String::new();
    if let Some(problem) = &figures.problem {
        out.push_str(&html::notice("error", &format!("No metrics: {problem}")));
    }
    let rates_known = figures.window_seconds > 0.0;
    // Services: every health target, and any service the metrics name that is not one.
    let mut names: Vec<String> = health.iter().map(|h| h.name.clone()).collect();
    for red in &figures.red {
        if !names.contains(&red.service) {
            names.push(red.service.clone());
        }
    }
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|name| {
            let state = health
                .iter()
                .find(|h| &h.name == name)
                .map_or_else(|| "–".to_owned(), |h| state_badge(&h.state));
            let red = figures.red.iter().find(|r| &r.service == name);
            let rate = match red {
                Some(red) if rates_known => format!("{:.1}", red.rate),
                _ => "–".to_owned(),
            };
            vec![
                format!("<span data-service=\"{}\">{}</span>", esc(name), esc(name)),
                state,
                rate,
                percent(red.and_then(|r| r.error_ratio)),
                millis(red.and_then(|r| r.p99_seconds)),
            ]
        })
        .collect();
    out.push_str(&html::table(
        "Services",
        &["Service", "Health", "Requests/s", "Server errors", "p99"],
        &rows,
    ));
    let rows: Vec<Vec<String>> = figures
        .breakers
        .iter()
        .map(|b| {
            vec![
                esc(&b.name),
                format!(
                    "<span data-breaker=\"{}\" data-state=\"{}\">{}</span>",
                    esc(&b.name),
                    esc(b.state),
                    state_badge(b.state)
                ),
            ]
        })
        .collect();
    out.push_str(&html::table(
        "Circuit breakers",
        &["Breaker", "State"],
        &rows,
    ));
    let rows: Vec<Vec<String>> = figures
        .dlq
        .iter()
        .map(|(group, waiting, oldest)| {
            vec![
                format!("<a href=\"/admin/dead-letters\">{}</a>", esc(group)),
                format!("{waiting:.0}"),
                if *waiting > 0.0 {
                    format!("{oldest:.0} s")
                } else {
                    "–".to_owned()
                },
            ]
        })
        .collect();
    out.push_str(&html::table(
        "Dead-letter queues",
        &["Consumer group", "Waiting", "Oldest"],
        &rows,
    ));
    let rows: Vec<Vec<String>> = figures
        .sagas
        .iter()
        .map(|(definition, compensating, stuck)| {
            vec![
                esc(definition),
                format!("{compensating:.0}"),
                format!("<a href=\"/admin/sagas?status=stuck\">{stuck:.0}</a>"),
            ]
        })
        .collect();
    out.push_str(&html::table(
        "Sagas needing attention",
        &["Definition", "Compensating", "Stuck"],
        &rows,
    ));
    let rows: Vec<Vec<String>> = figures
        .projection_lag
        .iter()
        .map(|(projection, lag)| vec![esc(projection), format!("{lag:.0}")])
        .collect();
    out.push_str(&html::table(
        "Projection lag",
        &["Projection", "Events behind"],
        &rows,
    ));
    out.push_str(&format!(
        "<p class=\"hint\">As of {}{}.</p>\n",
        html::time(&now),
        if rates_known {
            format!("; rates over the last {:.0} s", figures.window_seconds)
        } else {
            "; rates appear from the next update".to_owned()
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Breaker, Red};

    #[test]
    fn the_live_part_shows_every_figure_and_escapes_names() {
        let figures = Figures {
            window_seconds: 10.0,
            red: vec![Red {
                service: "orders".to_owned(),
                rate: 12.5,
                error_ratio: Some(0.02),
                p99_seconds: Some(0.25),
            }],
            breakers: vec![Breaker {
                name: "payment_provider".to_owned(),
                state: "open",
            }],
            dlq: vec![("<img src=x>".to_owned(), 3.0, 60.0)],
            projection_lag: vec![("order_view".to_owned(), 4.0)],
            sagas: vec![("order".to_owned(), 1.0, 2.0)],
            problem: None,
        };
        let health = vec![Health {
            name: "orders".to_owned(),
            state: "ready".to_owned(),
        }];
        let html = render_live(&health, &figures, chrono::Utc::now());
        assert!(html.contains("12.5") && html.contains("2.0 %") && html.contains("250.0 ms"));
        assert!(html.contains("data-breaker=\"payment_provider\" data-state=\"open\""));
        assert!(html.contains("&lt;img src=x&gt;") && !html.contains("<img"));
        assert!(html.contains("order_view"));
    }
}
