//! The reference shop's admin console: what an operator looks at and acts through, served by
//! the gateway at `/admin`.
//!
//! # Pages
//! - **Overview** (`/admin`): each service's health (its `/readyz`), requests per second,
//!   server-error ratio and p99 latency, circuit breakers, dead-letter queue depth, projection
//!   lag and sagas compensating or stuck. The figures come from the services' `/metrics`
//!   (docs/metrics.md); the page reloads its live part every 3 s (polling a fragment, see
//!   [`metrics`] for what that costs) and stops while its tab is hidden.
//! - **Sagas** (`/admin/sagas`): sagas by status, search by order id, one saga's step
//!   timeline (attempts, errors, compensation, the context and the log), and retry, cancel or
//!   skip the current step.
//! - **Dead letters** (`/admin/dead-letters`): failure groups by handler (the consumer group)
//!   and error type, a message's envelope, headers and failure history, replay or discard one
//!   message or a whole group.
//! - **Payment provider** (`/admin/provider`): the simulator's outage, latency and failure
//!   rate, beside the breaker that guards calls to it.
//! - **Audit log** (`/admin/audit`): every action above, who asked, when, and how it ended
//!   ([`audit`] says where it is kept and why).
//!
//! Every action asks for confirmation on a page of its own (a plain form, so it works without
//! JavaScript and with a keyboard and screen reader) and is written to the audit log before it
//! is sent. The console calls the shop's admin API through the gateway with the signed-in
//! administrator's token (module `api`), so it can do nothing its user could not.
//!
//! # Signing in, and why a cookie
//! The login form posts to `/admin/login`; the console exchanges the email and password for a
//! token at `POST /api/auth/token` (the same JWT login as every client, rate limited per
//! address at the gateway) and keeps the token in a cookie, [`SESSION_COOKIE`]: `HttpOnly`
//! (no script can read it, so an injected script could not steal it), `SameSite=Strict` (no
//! other site can make the browser send it, which with the `Sec-Fetch-Site` check on every
//! `POST` stops cross-site request forgery), `Path=/admin` (it goes nowhere else), and as
//! long-lived as the token. `sessionStorage` was the alternative: it would need script on
//! every page to attach the token to each request, and any script that ran there could read
//! it. The shop's gateway hooks turn the cookie into the `Authorization` header on the
//! `/admin` route, so the gateway verifies the token and the admin role as for any API call:
//! no credential is answered with a redirect to the login page, a bad or expired token with
//! 401, a customer's token with 403. This crate then believes only the identity token the
//! gateway signs ([`trellis_service::auth::protect`], then `admin_only`): a request that
//! reaches the console's port directly gets 401.
//!
//! # Security headers
//! Every answer carries [`CONTENT_SECURITY_POLICY`] (scripts and styles only from the
//! console's own embedded files, no inline script or style, no framing, forms posting only to
//! the console), `X-Content-Type-Options: nosniff` and `Referrer-Policy: same-origin`; pages
//! are `Cache-Control: no-store`. The stylesheet and script are compiled into the binary
//! (`include_str!`); nothing is fetched from elsewhere at run time.
//!
//! # How it fits
//! `shop-app` starts it in `trellis up` on a loopback port of its own and the gateway routes
//! `/admin` to it. It reads the orders service's saga and dead-letter endpoints and the payment
//! provider's settings through the gateway (`/api/admin/sagas`, `/api/admin/orders/{id}/saga`,
//! `/api/admin/dlq`, `/api/admin/provider`), each service's `/readyz`, and `/metrics`.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod api;
pub mod audit;
mod auth;
mod html;
pub mod metrics;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use trellis_service::Db;
use trellis_service::auth::ServiceKey;

use crate::api::Api;
use crate::audit::AuditLog;
use crate::metrics::Scraper;

pub use crate::audit::{Actor, AuditEntry};

/// The cookie holding the administrator's token (see the module docs).
pub const SESSION_COOKIE: &str = "trellis_admin";
/// Where the console is served.
pub const CONSOLE_PATH: &str = "/admin";
/// The login page, served without a credential.
pub const LOGIN_PATH: &str = "/admin/login";
/// The embedded stylesheet and script, served without a credential.
pub const ASSETS_PATH: &str = "/admin/assets";
/// The Content-Security-Policy of every answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";
/// How long a health check (`/readyz`) may take.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// The most emails remembered for the audit log's "who" (one per administrator).
const EMAILS_KEPT_MAX: usize = 1_000;

/// A service the overview checks: its name and base URL (`http://127.0.0.1:8104`), whose
/// `/readyz` says whether it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service's name, as its metrics' `service` label says it.
    pub name: String,
    /// Its base URL.
    pub url: String,
}

/// What the console needs to run.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// The gateway the console calls the admin API through (`http://127.0.0.1:8080`).
    pub gateway_url: String,
    /// The audit log's database: `sqlite://DATA_DIR/console.db` or `postgres://…`.
    pub database_url: String,
    /// The shop's key: the console believes only identities the gateway signed with it.
    pub service_key: ServiceKey,
    /// The services whose health the overview shows.
    pub health_targets: Vec<Target>,
    /// The `/metrics` URLs the overview reads (with `trellis up`, the gateway's operator
    /// listener alone: every service shares its recorder).
    pub metrics_urls: Vec<String>,
    /// Mark the session cookie `Secure` (set it when the gateway is reached over HTTPS, e.g.
    /// behind a TLS-terminating proxy; `trellis up` serves plain HTTP on loopback).
    pub secure_cookie: bool,
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The audit log's database could not be opened.
    #[error(transparent)]
    Open(#[from] trellis_service::OpenError),
    /// The HTTP client could not be built.
    #[error("cannot build the console's HTTP client: {0}")]
    Client(String),
}

impl ConsoleError {
    /// Whether trying again may help (a database that is down for a moment).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Open(error) => error.is_retryable(),
            Self::Client(_) => false,
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Console {
    pub(crate) api: Api,
    pub(crate) audit: AuditLog,
    pub(crate) scraper: Scraper,
    pub(crate) health_targets: Vec<Target>,
    pub(crate) client: reqwest::Client,
    pub(crate) secure_cookie: bool,
    /// The last round of health checks and when it ran (see `pages::overview`).
    pub(crate) health:
        tokio::sync::Mutex<Option<(std::time::Instant, Vec<pages::overview::Health>)>>,
    /// User id → email, for the audit log.
    emails: Mutex<HashMap<String, String>>,
}

pub(crate) type Shared = Arc<Console>;

impl Console {
    /// Who `admin` is, for the audit log: the verified id, and the email the users service
    /// gives for it (looked up once per administrator, best effort).
    pub(crate) async fn actor(&self, admin: &auth::Admin) -> Actor {
        let id = admin.caller.user_id.clone();
        let known = self
            .emails
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(email) = known {
            return Actor {
                id,
                email: Some(email),
            };
        }
        let email = self
            .api
            .send(&admin.token, Method::GET, "/api/users/me", None)
            .await
            .ok()
            .and_then(|me| me["email"].as_str().map(str::to_owned));
        if let Some(email) = &email {
            let mut emails = self
                .emails
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if emails.len() >= EMAILS_KEPT_MAX {
                emails.clear();
            }
            emails.insert(id.clone(), email.clone());
        }
        Actor { id, email }
    }
}

/// The console's router (every path under [`CONSOLE_PATH`]) and the audit log's database
/// (for `/readyz`).
///
/// # Errors
/// [`ConsoleError`] when the audit log cannot be opened.
pub async fn app(config: ConsoleConfig) -> Result<(Router, Db), ConsoleError> {
    let audit = AuditLog::open(&config.database_url).await?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| ConsoleError::Client(e.to_string()))?;
    let db = audit.db().clone();
    let console = Arc::new(Console {
        api: Api::new(client.clone(), &config.gateway_url),
        audit,
        scraper: Scraper::new(client.clone(), config.metrics_urls.clone()),
        health_targets: config.health_targets.clone(),
        client,
        secure_cookie: config.secure_cookie,
        health: tokio::sync::Mutex::new(None),
        emails: Mutex::new(HashMap::new()),
    });
    Ok((router(console, &config.service_key), db))
}

fn router(console: Shared, key: &ServiceKey) -> Router {
    let public = Router::new()
        .route(LOGIN_PATH, get(auth::login_page).post(auth::login))
        .route("/admin/assets/console.css", get(stylesheet))
        .route("/admin/assets/console.js", get(script));
    let admin = Router::new()
        .route("/admin/logout", post(auth::logout))
        .route(CONSOLE_PATH, get(pages::overview::page))
        .route("/admin/", get(|| async { redirect(CONSOLE_PATH) }))
        .route("/admin/overview/live", get(pages::overview::live))
        .route("/admin/sagas", get(pages::sagas::list))
        .route("/admin/sagas/{id}", get(pages::sagas::show))
        .route("/admin/sagas/{id}/confirm", get(pages::sagas::confirm))
        .route("/admin/sagas/{id}/{action}", post(pages::sagas::act))
        .route("/admin/dead-letters", get(pages::dead_letters::groups))
        .route("/admin/dead-letters/group", get(pages::dead_letters::group))
        .route(
            "/admin/dead-letters/group/confirm",
            get(pages::dead_letters::confirm_group),
        )
        .route(
            "/admin/dead-letters/group/{action}",
            post(pages::dead_letters::act_on_group),
        )
        .route("/admin/dead-letters/{id}", get(pages::dead_letters::show))
        .route(
            "/admin/dead-letters/{id}/confirm",
            get(pages::dead_letters::confirm),
        )
        .route(
            "/admin/dead-letters/{id}/{action}",
            post(pages::dead_letters::act),
        )
        .route(
            "/admin/provider",
            get(pages::provider::page).post(pages::provider::update),
        )
        .route("/admin/audit", get(pages::audit::page));
    let routes = public
        .with_state(console.clone())
        .merge(trellis_service::auth::admin_only(admin.with_state(console)))
        .layer(axum::middleware::from_fn(same_origin_posts))
        .layer(axum::middleware::from_fn(security_headers));
    trellis_service::auth::protect(routes, key)
}

/// The session token a request carries in [`SESSION_COOKIE`], if any (what the shop's
/// gateway hooks move into the `Authorization` header on the `/admin` route).
pub fn session_token(headers: &axum::http::HeaderMap) -> Option<String> {
    auth::cookie(headers, SESSION_COOKIE)
}

/// A `303 See Other` to `location`.
pub(crate) fn redirect(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Refuses a `POST` a browser says came from another site (`Sec-Fetch-Site` other than
/// `same-origin`, or `none` for one the user typed); the `SameSite=Strict` cookie already
/// keeps such requests unauthenticated, this also covers the login form.
async fn same_origin_posts(request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        let site = request
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok());
        if let Some(site) = site
            && site != "same-origin"
            && site != "none"
        {
            return html::respond(
                StatusCode::FORBIDDEN,
                html::Section::None,
                "Refused",
                &html::notice(
                    "error",
                    "This form was sent from another site; the console takes forms only from its own pages.",
                ),
            );
        }
    }
    next.run(request).await
}

async fn security_headers(request: Request, next: Next) -> Response {
    let asset = request.uri().path().starts_with(ASSETS_PATH);
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !asset {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The stylesheet, compiled in.
const STYLESHEET: &str = include_str!("../assets/console.css");
/// The script, compiled in.
const SCRIPT: &str = include_str!("../assets/console.js");

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    use trellis_service::auth::IDENTITY_HEADER;

    use super::*;

    async fn console(dir: &tempfile::TempDir, key: &ServiceKey) -> Router {
        let config = ConsoleConfig {
            // Nothing listens there: pages that call the API explain the failure.
            gateway_url: "http://127.0.0.1:9".to_owned(),
            database_url: format!("sqlite://{}/console.db", dir.path().display()),
            service_key: key.clone(),
            health_targets: Vec::new(),
            metrics_urls: Vec::new(),
            secure_cookie: false,
        };
        app(config).await.expect("the console starts").0
    }

    async fn call(router: &Router, path: &str, identity: Option<(&ServiceKey, &str)>) -> Response {
        let mut request = Request::builder().uri(path);
        if let Some((key, role)) = identity {
            let token = key.signer("gateway").token("u-1", role).expect("token");
            request = request
                .header(IDENTITY_HEADER, token)
                .header(header::AUTHORIZATION, "Bearer user-token");
        }
        router
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn the_console_believes_only_the_gateways_identity_and_only_for_admins() {
        // Goal: the trust boundary of the console's own port: without the identity token the
        // gateway signs a page is 401, a customer's is 403, an admin's renders; the login page
        // and assets need nothing, and every answer carries the security headers.
        let dir = tempfile::tempdir().expect("temp dir");
        let key = ServiceKey::generate().expect("key");
        let router = console(&dir, &key).await;

        let response = call(&router, "/admin", None).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let other_key = ServiceKey::generate().expect("key");
        let response = call(&router, "/admin", Some((&other_key, "admin"))).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "signed by another key"
        );
        let response = call(&router, "/admin/audit", Some((&key, "customer"))).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);

        let response = call(&router, "/admin", Some((&key, "admin"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        let response = call(&router, "/admin/audit", Some((&key, "admin"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        let response = call(&router, "/admin/sagas", Some((&key, "admin"))).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "the admin API does not answer, and the page says so"
        );

        let response = call(&router, LOGIN_PATH, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let response = call(&router, "/admin/assets/console.js", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .expect("ASCII")
                .starts_with("text/javascript")
        );
        assert!(
            response
                .headers()
                .contains_key(header::CONTENT_SECURITY_POLICY)
        );
    }
}
