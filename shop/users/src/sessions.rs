//! Sessions: the access and refresh tokens a login answers, refresh-token rotation with reuse
//! detection, logout, and the feed of revoked access tokens the gateway polls.
//!
//! A login starts a session (a refresh-token *family*, the `sid` claim of its access tokens).
//! Each refresh token is stored only as its SHA-256 hash and works once: `POST
//! /api/auth/refresh` marks it used and answers a new access token and a new refresh token of
//! the same session, which ends [`REFRESH_LIFETIME_S`] after the login however often it is
//! refreshed. A refresh token presented a second time means two parties hold it (a thief or
//! the owner, whichever comes second): the whole session is revoked, its refresh tokens and
//! every access token it issued that has not expired. Two refreshes with one token racing
//! each other count as a reuse too; a client must not retry a refresh whose answer it lost
//! (it logs in again).
//!
//! A logout revokes the access token it was sent with and its session. Revoked access tokens
//! are listed by `GET /api/auth/revocations` until they expire; the gateway polls it and
//! refuses them (crates/gateway, `revocations_url`). Access tokens are short
//! ([`TOKEN_LIFETIME_S`](crate::TOKEN_LIFETIME_S)), so the list stays short.

use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shop_contracts::api::TokenResponse;
use trellis_service::{ApiError, Caller};

use crate::store::{self, RefreshToken, User};
use crate::{State, TOKEN_LIFETIME_S};

/// How long a session (and so every refresh token in it) lasts after the login, seconds.
pub const REFRESH_LIFETIME_S: u64 = 30 * 24 * 3600;
/// Random bytes in a refresh token.
const REFRESH_TOKEN_BYTES: usize = 32;
/// Longest refresh token considered, bytes (ours are 43).
pub(crate) const REFRESH_TOKEN_CHARS_MAX: usize = 128;
/// Revocations the feed answers at most per call.
const REVOCATIONS_PAGE_MAX: i64 = 10_000;
/// The feed answers revocations from this long before the caller's cursor again: a
/// revocation's time is taken before its transaction commits (and replicas' clocks differ by
/// a little), so one committed late is still seen. The gateway ignores repeats.
const REVOCATIONS_OVERLAP_MS: i64 = 5_000;

fn unauthorized(code: &'static str, message: &'static str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

fn hash(refresh_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(refresh_token.as_bytes()))
}

fn new_refresh_token() -> Result<String, ApiError> {
    let mut bytes = [0_u8; REFRESH_TOKEN_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::internal(format!("no OS randomness: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn secs(ms: i64) -> u64 {
    u64::try_from(ms / 1000).unwrap_or(0)
}

/// Starts a session for `user`: a new family, an access token and its refresh token.
pub(crate) async fn start(state: &State, user: &User) -> Result<TokenResponse, ApiError> {
    let now_ms = store::now_ms();
    let family = uuid::Uuid::now_v7().to_string();
    let lifetime_ms = i64::try_from(REFRESH_LIFETIME_S * 1000).unwrap_or(i64::MAX);
    issue(
        state,
        user,
        &family,
        now_ms.saturating_add(lifetime_ms),
        now_ms,
    )
    .await
}

/// An access token and a refresh token in session `family`, which ends at `ends_at_ms`.
async fn issue(
    state: &State,
    user: &User,
    family: &str,
    ends_at_ms: i64,
    now_ms: i64,
) -> Result<TokenResponse, ApiError> {
    let (access_token, claims) = state
        .keys
        .issue(user, family, secs(now_ms))
        .map_err(ApiError::internal)?;
    let refresh_token = new_refresh_token()?;
    store::insert_refresh_token(
        &state.db,
        &RefreshToken {
            token_hash: hash(&refresh_token),
            family: family.to_owned(),
            user_id: user.id.clone(),
            access_jti: claims.jti,
            access_exp: i64::try_from(claims.exp).unwrap_or(i64::MAX),
            expires_at_ms: ends_at_ms,
            used: false,
            revoked: false,
        },
    )
    .await?;
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in: TOKEN_LIFETIME_S,
        refresh_token,
        refresh_expires_in: secs(ends_at_ms.saturating_sub(now_ms)),
    })
}

/// Exchanges a refresh token for the next pair; see the module docs for reuse.
pub(crate) async fn refresh(state: &State, refresh_token: &str) -> Result<TokenResponse, ApiError> {
    let invalid = || unauthorized("invalid_refresh_token", "unknown or expired refresh token");
    if refresh_token.len() > REFRESH_TOKEN_CHARS_MAX {
        return Err(invalid());
    }
    let now_ms = store::now_ms();
    let Some(stored) = store::find_refresh_token(&state.db, &hash(refresh_token)).await? else {
        metrics::counter!("shop_users_refreshes_total", "outcome" => "refused").increment(1);
        return Err(invalid());
    };
    if stored.revoked {
        metrics::counter!("shop_users_refreshes_total", "outcome" => "refused").increment(1);
        return Err(unauthorized(
            "session_revoked",
            "this session was ended; log in again",
        ));
    }
    if stored.expires_at_ms <= now_ms {
        metrics::counter!("shop_users_refreshes_total", "outcome" => "refused").increment(1);
        return Err(invalid());
    }
    if stored.used || !store::use_refresh_token(&state.db, &stored.token_hash, now_ms).await? {
        let revoked = store::revoke_family(&state.db, &stored.family, now_ms).await?;
        metrics::counter!("shop_users_refreshes_total", "outcome" => "reused").increment(1);
        tracing::warn!(
            user_id = %stored.user_id, session = %stored.family, access_tokens_revoked = revoked,
            "a refresh token was used twice; its session is revoked"
        );
        return Err(unauthorized(
            "refresh_token_reused",
            "this refresh token was used before; the session is ended, log in again",
        ));
    }
    let Some(user) = store::find_by_id(&state.db, &stored.user_id).await? else {
        return Err(invalid());
    };
    metrics::counter!("shop_users_refreshes_total", "outcome" => "ok").increment(1);
    issue(state, &user, &stored.family, stored.expires_at_ms, now_ms).await
}

/// Ends the caller's session: the access token `bearer` (which must be the caller's, signed
/// by this service) and every token of its session.
pub(crate) async fn logout(state: &State, caller: &Caller, bearer: &str) -> Result<(), ApiError> {
    let claims =
        state.keys.verify(bearer).await.map_err(|_| {
            unauthorized("unauthenticated", "logout needs the session's access token")
        })?;
    if claims.sub != caller.user_id {
        return Err(ApiError::forbidden("this token is not the caller's"));
    }
    let now_ms = store::now_ms();
    let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
    store::revoke_access_token(&state.db, &claims.jti, exp, now_ms).await?;
    store::revoke_family(&state.db, &claims.sid, now_ms).await?;
    metrics::counter!("shop_users_logouts_total").increment(1);
    Ok(())
}

/// One revoked access token in the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RevokedToken {
    /// The token's `jti`.
    pub(crate) jti: String,
    /// The token's `exp`, Unix seconds: it may be forgotten after that.
    pub(crate) exp: i64,
}

/// A page of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Revocations {
    pub(crate) revoked: Vec<RevokedToken>,
    /// The cursor to ask with next (`?after=`).
    pub(crate) next: String,
    /// Whether the page was full: ask again at once.
    pub(crate) more: bool,
}

/// Revocations from a little before `after` (a cursor from an earlier page; everything not
/// expired without one).
pub(crate) async fn revocations(
    state: &State,
    after: Option<&str>,
) -> Result<Revocations, ApiError> {
    let after_ms = match after {
        None | Some("") => 0,
        Some(text) => text.parse::<i64>().map_err(|_| {
            ApiError::bad_request("invalid_cursor", "`after` must be a cursor from `next`")
        })?,
    };
    let now_ms = store::now_ms();
    let from_ms = if after_ms == 0 {
        0
    } else {
        after_ms.saturating_sub(REVOCATIONS_OVERLAP_MS)
    };
    let rows =
        store::revocations_since(&state.db, from_ms, now_ms / 1000, REVOCATIONS_PAGE_MAX).await?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= REVOCATIONS_PAGE_MAX;
    let next = rows
        .iter()
        .map(|r| r.revoked_at_ms)
        .max()
        .map_or(after_ms, |last| last.max(after_ms));
    Ok(Revocations {
        revoked: rows
            .into_iter()
            .map(|r| RevokedToken {
                jti: r.jti,
                exp: r.exp,
            })
            .collect(),
        next: next.to_string(),
        more,
    })
}
