//! REST handlers: registration, sessions (token, refresh, logout), the caller's profile, the
//! signing keys (JWKS, rotation), the revocation feed, `/openapi.json`.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use shop_contracts::api::{
    ErrorBody, RefreshRequest, RegisterUser, RotateKeyRequest, RotatedKey, TokenRequest,
    TokenResponse, UserView,
};
use trellis_service::{ApiError, ApiJson, Caller, ROLE_CUSTOMER};
use utoipa::OpenApi;

use crate::keys::KEY_ACTIVATION_DELAY_S;
use crate::sessions;
use crate::store::{self, InsertError, NewUser, User};
use crate::{
    BODY_BYTES_MAX, EMAIL_BYTES_MAX, NAME_CHARS_MAX, PASSWORD_CHARS_MAX, PASSWORD_CHARS_MIN, State,
};

/// Longest activation delay a rotation accepts, seconds (a day).
const KEY_ACTIVATION_DELAY_S_MAX: u64 = 24 * 3600;

#[derive(OpenApi)]
#[openapi(
    paths(register, token, refresh, logout, me, jwks, rotate_key),
    components(schemas(
        RegisterUser,
        UserView,
        TokenRequest,
        TokenResponse,
        RefreshRequest,
        RotateKeyRequest,
        RotatedKey,
        ErrorBody
    ))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(crate) fn router(state: State) -> Router {
    Router::new()
        .route("/api/users", post(register))
        .route("/api/auth/token", post(token))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/auth/logout", post(logout))
        .route("/api/auth/keys/rotate", post(rotate_key))
        .route("/api/auth/revocations", get(revocations))
        .route("/api/users/me", get(me))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

/// Registration input once validated: email trimmed and lowercased, name trimmed.
#[derive(Debug)]
pub(crate) struct ValidRegistration {
    pub(crate) email: String,
    pub(crate) name: String,
}

/// Checks a registration; `Err((code, message))` names the first problem.
pub(crate) fn validate_registration(
    email: &str,
    password: &str,
    name: &str,
) -> Result<ValidRegistration, (&'static str, String)> {
    let email = email.trim().to_lowercase();
    let valid_email = email.len() <= EMAIL_BYTES_MAX
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if !valid_email {
        return Err((
            "invalid_email",
            format!(
                "email must be an address like name@example.com, at most {EMAIL_BYTES_MAX} bytes"
            ),
        ));
    }
    let password_chars = password.chars().count();
    if password_chars < PASSWORD_CHARS_MIN {
        return Err((
            "password_too_short",
            format!("password must have at least {PASSWORD_CHARS_MIN} characters"),
        ));
    }
    if password_chars > PASSWORD_CHARS_MAX {
        return Err((
            "password_too_long",
            format!("password must have at most {PASSWORD_CHARS_MAX} characters"),
        ));
    }
    if is_common_password(password) || password.trim().to_lowercase() == email {
        return Err((
            "password_too_common",
            "password is one of the most common passwords (or the email): choose another"
                .to_owned(),
        ));
    }
    let name = name.trim();
    if name.is_empty() || name.chars().count() > NAME_CHARS_MAX {
        return Err((
            "invalid_name",
            format!("name must have 1 to {NAME_CHARS_MAX} characters"),
        ));
    }
    Ok(ValidRegistration {
        email,
        name: name.to_owned(),
    })
}

/// The 10,000 most common passwords long enough to pass the length check, lowercased (the
/// file says where they come from).
static COMMON_PASSWORDS: std::sync::LazyLock<std::collections::HashSet<String>> =
    std::sync::LazyLock::new(|| {
        include_str!("common_passwords.txt")
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(str::to_lowercase)
            .collect()
    });

/// Whether `password`, ignoring case, is on the common-password list (NIST SP 800-63B's
/// "passwords obtained from previous breach corpuses" and "commonly-used" check; we add no
/// composition rules, which that guidance advises against).
pub(crate) fn is_common_password(password: &str) -> bool {
    COMMON_PASSWORDS.contains(&password.to_lowercase())
}

fn view(user: &User) -> UserView {
    UserView {
        id: user.id.clone(),
        email: user.email.clone(),
        name: user.name.clone(),
        role: user.role.clone(),
    }
}

/// Registers a customer.
#[utoipa::path(
    post, path = "/api/users", tag = "users",
    request_body = RegisterUser,
    responses(
        (status = 201, description = "Registered", body = UserView),
        (status = 400, description = "Bad email (`invalid_email`), password (`password_too_short`, `password_too_long`, `password_too_common`: one of the 10,000 most common passwords, or the email) or name (`invalid_name`); a body that is not JSON of this shape (`invalid_json`)", body = ErrorBody),
        (status = 409, description = "The email is taken (`email_taken`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
        (status = 503, description = "Too many logins and registrations at once (`busy`); retry shortly", body = ErrorBody),
    )
)]
async fn register(
    AxumState(state): AxumState<State>,
    ApiJson(body): ApiJson<RegisterUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let valid = validate_registration(&body.email, &body.password, &body.name)
        .map_err(|(code, message)| ApiError::bad_request(code, message))?;
    if store::find_by_email(&state.db, &valid.email)
        .await?
        .is_some()
    {
        return Err(email_taken());
    }
    let hash = state
        .hasher
        .hash(body.password)
        .await
        .map_err(ApiError::from)?;
    let user = NewUser {
        email: valid.email,
        name: valid.name,
        role: ROLE_CUSTOMER,
        password_hash: hash,
    };
    match store::insert(&state.db, &user).await {
        Ok(user) => {
            tracing::info!(user_id = %user.id, "user registered");
            metrics::counter!("shop_users_registrations_total").increment(1);
            Ok((StatusCode::CREATED, Json(view(&user))))
        }
        Err(InsertError::EmailTaken) => Err(email_taken()),
        Err(InsertError::Db(e)) => Err(e.into()),
    }
}

fn email_taken() -> ApiError {
    ApiError::conflict("email_taken", "an account with this email exists")
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "wrong email or password",
    )
}

/// Trades an email and password for a token.
#[utoipa::path(
    post, path = "/api/auth/token", tag = "users",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "A 15-minute EdDSA JWT and a refresh token that gets the next one", body = TokenResponse),
        (status = 400, description = "The body is not JSON of this shape (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Wrong email or password (`invalid_credentials`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 429, description = "Too many attempts on this account (`too_many_attempts`); `Retry-After` says when to try again", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
        (status = 503, description = "Too many logins and registrations at once (`busy`); retry shortly", body = ErrorBody),
    )
)]
async fn token(
    AxumState(state): AxumState<State>,
    ApiJson(body): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, Response> {
    token_inner(&state, body)
        .await
        .map_err(|refusal| match refusal {
            Refusal::Api(e) => e.into_response(),
            Refusal::TooManyAttempts(wait) => too_many_attempts(wait),
        })
}

/// Why a token request was refused.
enum Refusal {
    Api(ApiError),
    /// The account's attempts are spent for this long.
    TooManyAttempts(std::time::Duration),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

fn too_many_attempts(wait: std::time::Duration) -> Response {
    // Whole seconds, rounded up: a client that waits exactly this long is let in.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    metrics::counter!("shop_users_logins_total", "outcome" => "limited").increment(1);
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many login attempts on this account; retry in {seconds} s"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

async fn token_inner(state: &State, body: TokenRequest) -> Result<Json<TokenResponse>, Refusal> {
    // Longer than any accepted password: refuse without hashing an attacker-sized input.
    if body.password.chars().count() > PASSWORD_CHARS_MAX || body.email.len() > EMAIL_BYTES_MAX {
        return Err(invalid_credentials().into());
    }
    let email = body.email.trim().to_lowercase();
    let user = store::find_by_email(&state.db, &email)
        .await
        .map_err(ApiError::from)?;
    if let Some(user) = &user {
        state
            .attempts
            .check(&user.id)
            .map_err(Refusal::TooManyAttempts)?;
    }
    // The same lookup for an unknown email (which finds nothing), so an answer's timing does
    // not tell whether the account exists.
    let account_key = user.as_ref().map_or(email.as_str(), |u| u.id.as_str());
    let failures = store::login_failures(&state.db, account_key)
        .await
        .map_err(ApiError::from)?;
    let now_ms = store::now_ms();
    if let Some(locked) = failures.filter(|f| f.locked_until_ms > now_ms) {
        let wait_ms = u64::try_from(locked.locked_until_ms - now_ms).unwrap_or(0);
        return Err(Refusal::TooManyAttempts(std::time::Duration::from_millis(
            wait_ms,
        )));
    }
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let matches = state
        .hasher
        .verify(body.password, hash)
        .await
        .map_err(ApiError::from)?;
    let Some(user) = user else {
        metrics::counter!("shop_users_logins_total", "outcome" => "refused").increment(1);
        return Err(invalid_credentials().into());
    };
    if !matches {
        metrics::counter!("shop_users_logins_total", "outcome" => "refused").increment(1);
        // Counted after the answer is sent: a write only known accounts make must not show
        // in the answer's timing.
        let db = state.db.clone();
        tokio::spawn(async move {
            let now_ms = store::now_ms();
            match store::record_login_failure(&db, &user.id, |failures| {
                crate::attempts::locked_until_ms(failures, now_ms)
            })
            .await
            {
                Ok(counted) if counted.locked_until_ms > 0 => {
                    tracing::warn!(user_id = %user.id, failures = counted.failures, "account locked after failed logins");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not count a failed login"),
            }
        });
        return Err(invalid_credentials().into());
    }
    if failures.is_some() {
        store::clear_login_failures(&state.db, &user.id)
            .await
            .map_err(ApiError::from)?;
    }
    metrics::counter!("shop_users_logins_total", "outcome" => "ok").increment(1);
    Ok(Json(sessions::start(state, &user).await?))
}

/// Trades a refresh token for a new access token and a new refresh token.
#[utoipa::path(
    post, path = "/api/auth/refresh", tag = "users",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "The next access token and refresh token of the session; the one sent is spent", body = TokenResponse),
        (status = 400, description = "The body is not JSON of this shape (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Unknown or expired (`invalid_refresh_token`), its session ended (`session_revoked`), or used before (`refresh_token_reused`: the session is now ended)", body = ErrorBody),
        (status = 413, description = "The body is larger than 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn refresh(
    AxumState(state): AxumState<State>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    Ok(Json(sessions::refresh(&state, &body.refresh_token).await?))
}

/// Ends the caller's session: the access token sent and every token of its session are
/// refused from now on.
#[utoipa::path(
    post, path = "/api/auth/logout", tag = "users",
    responses(
        (status = 204, description = "The session is ended"),
        (status = 401, description = "No verified caller, or no access token of this service (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "The access token is not the caller's (`forbidden`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn logout(
    AxumState(state): AxumState<State>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| ApiError::unauthenticated("logout needs the session's access token"))?;
    sessions::logout(&state, &caller, bearer).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stores a new signing key (admin).
#[utoipa::path(
    post, path = "/api/auth/keys/rotate", tag = "users",
    request_body = RotateKeyRequest,
    responses(
        (status = 200, description = "The new key, published now, signing from `active_from`", body = RotatedKey),
        (status = 400, description = "`activate_in_s` above a day (`invalid_delay`), or the body is not JSON of this shape (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "The caller is not an administrator (`forbidden`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn rotate_key(
    AxumState(state): AxumState<State>,
    caller: Caller,
    ApiJson(body): ApiJson<RotateKeyRequest>,
) -> Result<Json<RotatedKey>, ApiError> {
    caller.require_admin()?;
    let delay_s = body.activate_in_s.unwrap_or(KEY_ACTIVATION_DELAY_S);
    if delay_s > KEY_ACTIVATION_DELAY_S_MAX {
        return Err(ApiError::bad_request(
            "invalid_delay",
            format!("activate_in_s must be at most {KEY_ACTIVATION_DELAY_S_MAX}"),
        ));
    }
    let rotation = state
        .keys
        .rotate(Duration::from_secs(delay_s), body.retire_previous)
        .await
        .map_err(ApiError::internal)?;
    tracing::warn!(actor = %caller.user_id, kid = %rotation.kid, "signing key rotated by an administrator");
    Ok(Json(RotatedKey {
        kid: rotation.kid,
        active_from: u64::try_from(rotation.active_from_ms / 1000).unwrap_or(0),
        retired: rotation.retired,
    }))
}

/// `?after=` of the revocation feed.
#[derive(Debug, serde::Deserialize)]
struct FeedQuery {
    after: Option<String>,
}

/// The revoked access tokens that have not expired (not routed by the gateway: the gateway
/// polls it directly; see [`sessions`]).
async fn revocations(
    AxumState(state): AxumState<State>,
    Query(query): Query<FeedQuery>,
) -> Result<Json<sessions::Revocations>, ApiError> {
    Ok(Json(
        sessions::revocations(&state, query.after.as_deref()).await?,
    ))
}

/// The caller's profile.
#[utoipa::path(
    get, path = "/api/users/me", tag = "users",
    responses(
        (status = 200, description = "The caller", body = UserView),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 404, description = "The account no longer exists (`not_found`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn me(
    AxumState(state): AxumState<State>,
    caller: Caller,
) -> Result<Json<UserView>, ApiError> {
    let user = store::find_by_id(&state.db, &caller.user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("this account no longer exists"))?;
    Ok(Json(view(&user)))
}

/// The public keys tokens are signed with.
#[utoipa::path(
    get, path = "/.well-known/jwks.json", tag = "users",
    responses(
        (status = 200, description = "A JWK set of Ed25519 keys: the signing key, a rotated key before it signs, and a replaced key until the tokens it signed expire", body = Object),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn jwks(AxumState(state): AxumState<State>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(state.keys.jwks().await.map_err(ApiError::internal)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lowercased() {
        let v = validate_registration("  Ann@Example.COM ", "ample-sofa-1", " Ann ").unwrap();
        assert_eq!(v.email, "ann@example.com");
        assert_eq!(v.name, "Ann");
    }

    #[test]
    fn common_passwords_are_refused_whatever_their_case() {
        for password in [
            "password",
            "Password1",
            "QWERTYUIOP",
            "iloveyou",
            "trustno1",
        ] {
            let refused = validate_registration("ann@example.com", password, "Ann");
            assert_eq!(refused.unwrap_err().0, "password_too_common", "{password}");
        }
        let refused = validate_registration("ann@example.com", "ANN@example.com", "Ann");
        assert_eq!(refused.unwrap_err().0, "password_too_common");
        validate_registration("ann@example.com", "ample-sofa-1", "Ann")
            .expect("an uncommon password passes");
    }

    #[test]
    fn malformed_emails_are_refused() {
        for email in [
            "",
            "ann",
            "@example.com",
            "ann@",
            "ann@example",
            "a b@example.com",
            "a@b@c.com",
            "ann@.com",
        ] {
            let err = validate_registration(email, "ample-sofa-1", "Ann").unwrap_err();
            assert_eq!(err.0, "invalid_email", "{email}");
        }
    }
}
