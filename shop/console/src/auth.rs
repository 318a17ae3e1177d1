//! Signing in and out, and [`Admin`], the verified administrator a page acts for (the crate
//! docs explain the cookie and who checks what).

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use trellis_service::Caller;

use crate::html::{self, Section, esc};
use crate::{LOGIN_PATH, SESSION_COOKIE, Shared, redirect};

/// The longest session the cookie is kept for, seconds, whatever the token says.
const SESSION_SECONDS_MAX: u64 = 24 * 3600;

/// The verified administrator behind a request: the caller the gateway's identity token
/// names (checked by `protect` and `admin_only`), and the token the console calls the admin
/// API with on their behalf.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    /// Who.
    pub(crate) caller: Caller,
    /// Their bearer token.
    pub(crate) token: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(caller) = parts.extensions.get::<Caller>().cloned() else {
            return Err(redirect(LOGIN_PATH));
        };
        if !caller.is_admin() {
            return Err(html::respond(
                StatusCode::FORBIDDEN,
                Section::None,
                "Not an administrator",
                &html::notice("error", "This console is for administrators only."),
            ));
        }
        let token = bearer(&parts.headers).or_else(|| cookie(&parts.headers, SESSION_COOKIE));
        let Some(token) = token else {
            return Err(redirect(LOGIN_PATH));
        };
        Ok(Self { caller, token })
    }
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|token| !token.is_empty())
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

fn login_form(email: &str, problem: Option<&str>) -> String {
    let mut body = String::new();
    if let Some(problem) = problem {
        body.push_str(&html::notice("error", problem));
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"{LOGIN_PATH}\" class=\"stack narrow\">\n\
         <label for=\"email\">Email</label>\n\
         <input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" required value=\"{}\">\n\
         <label for=\"password\">Password</label>\n\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\n\
         <button type=\"submit\">Sign in</button>\n</form>\n\
         <p class=\"hint\">Administrators only. <code>trellis up</code> prints the admin account on its first start.</p>\n",
        esc(email)
    ));
    body
}

/// `GET /admin/login`.
pub(crate) async fn login_page() -> Response {
    html::respond(
        StatusCode::OK,
        Section::None,
        "Sign in",
        &login_form("", None),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

/// `POST /admin/login`: exchanges the form's email and password for a token at
/// `POST /api/auth/token`, and keeps the token in the session cookie when it is an
/// administrator's.
pub(crate) async fn login(State(console): State<Shared>, body: Bytes) -> Response {
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return html::respond(
            StatusCode::BAD_REQUEST,
            Section::None,
            "Sign in",
            &login_form("", Some("The form did not arrive whole; try again.")),
        );
    };
    let answer = console
        .client
        .post(format!("{}/api/auth/token", console.api.base()))
        .json(&serde_json::json!({ "email": form.email, "password": form.password }))
        .timeout(crate::api::API_TIMEOUT)
        .send()
        .await;
    let refuse = |status: StatusCode, problem: &str| {
        html::respond(
            status,
            Section::None,
            "Sign in",
            &login_form(&form.email, Some(problem)),
        )
    };
    let response = match answer {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, "console: the token endpoint did not answer");
            return refuse(
                StatusCode::BAD_GATEWAY,
                "The sign-in service does not answer; try again in a moment.",
            );
        }
    };
    match response.status().as_u16() {
        200 => {}
        401 | 400 | 422 => {
            return refuse(StatusCode::UNAUTHORIZED, "Wrong email or password.");
        }
        429 => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many sign-in attempts; wait a moment and try again.",
            );
        }
        other => {
            tracing::warn!(status = other, "console: the token endpoint failed");
            return refuse(
                StatusCode::BAD_GATEWAY,
                "The sign-in service failed; try again in a moment.",
            );
        }
    }
    let Ok(token) = response.json::<serde_json::Value>().await else {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "The sign-in service answered oddly.",
        );
    };
    let Some(access_token) = token["access_token"].as_str() else {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "The sign-in service answered oddly.",
        );
    };
    // Read, not verified: this only spares a customer a cookie the gateway would refuse
    // (with 403) on every page. The gateway verifies the token on each request.
    if unverified_role(access_token).as_deref() != Some(trellis_service::ROLE_ADMIN) {
        return refuse(
            StatusCode::FORBIDDEN,
            "This account is not an administrator; the console is for administrators only.",
        );
    }
    let max_age = token["expires_in"]
        .as_u64()
        .unwrap_or(SESSION_SECONDS_MAX)
        .min(SESSION_SECONDS_MAX);
    let secure = if console.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={access_token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    let mut response = redirect(crate::CONSOLE_PATH);
    match HeaderValue::from_str(&cookie) {
        Ok(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        Err(_) => refuse(
            StatusCode::BAD_GATEWAY,
            "The sign-in service answered oddly.",
        ),
    }
}

/// `POST /admin/logout`: ends the session at the users service (through the gateway, which
/// then refuses the token), and forgets the cookie. The cookie is forgotten even when the
/// logout call fails (logged): the token then lives out its 15 minutes.
pub(crate) async fn logout(State(console): State<Shared>, admin: Admin) -> Response {
    match console
        .api
        .send(&admin.token, Method::POST, "/api/auth/logout", None)
        .await
    {
        Ok(_) => {}
        Err(failure) => tracing::warn!(
            status = %failure.status, message = %failure.message,
            "console: the session could not be ended at the users service"
        ),
    }
    let mut response = redirect(LOGIN_PATH);
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "trellis_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

/// The `role` claim of a JWT, read without checking its signature.
fn unverified_role(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["role"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; trellis_admin=tok.en.x"),
        );
        assert_eq!(
            cookie(&headers, SESSION_COOKIE).as_deref(),
            Some("tok.en.x")
        );
        assert_eq!(cookie(&headers, "missing"), None);
        headers.insert(header::COOKIE, HeaderValue::from_static("trellis_admin="));
        assert_eq!(cookie(&headers, SESSION_COOKIE), None, "an emptied cookie");
    }

    #[test]
    fn the_role_claim_is_read_from_a_token() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"u","role":"admin"}"#);
        assert_eq!(
            unverified_role(&format!("h.{payload}.s")).as_deref(),
            Some("admin")
        );
        assert_eq!(unverified_role("garbage"), None);
    }
}
