//! Passwords and bearer tokens.
//!
//! Passwords are hashed by shop/users' own [`Hasher`] (Argon2id, the crate's default
//! parameters, on the blocking pool, at most
//! [`HASHES_IN_FLIGHT_MAX`](shop_users::password::HASHES_IN_FLIGHT_MAX) at a time), so
//! registering and logging in cost what they cost in the shop. A token is 32 random bytes, hex-encoded,
//! mapped in memory to its user for [`TOKEN_LIFETIME`]: the shop's signed JWTs and their
//! verification at the gateway are part of the distributed design's price, not of this
//! baseline.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;
use trellis_service::{ApiError, Caller};

pub(crate) use shop_users::password::Hasher;

/// How long a token is valid (shop/users' access token lifetime).
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// Most tokens kept; past it expired ones are dropped, and with none expired a login is
/// refused (503 `busy`).
const TOKENS_MAX: usize = 100_000;
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// `TOKEN_BYTES` random bytes from the OS, hex-encoded.
fn random_hex() -> Result<String, String> {
    let mut bytes = [0_u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Debug, Clone)]
struct Session {
    caller: Caller,
    expires_at: Instant,
}

/// The tokens issued, by token.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    tokens: RwLock<HashMap<String, Session>>,
}

impl Sessions {
    /// A new token for `user_id` with `role`, valid for [`TOKEN_LIFETIME`].
    pub(crate) fn issue(&self, user_id: &str, role: &str) -> Result<String, ApiError> {
        let token = random_hex().map_err(ApiError::internal)?;
        let now = Instant::now();
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= TOKENS_MAX {
            tokens.retain(|_, s| s.expires_at > now);
            if tokens.len() >= TOKENS_MAX {
                return Err(ApiError::unavailable(
                    "busy",
                    "too many sessions at once; retry later",
                ));
            }
        }
        tokens.insert(
            token.clone(),
            Session {
                caller: Caller {
                    user_id: user_id.to_owned(),
                    role: role.to_owned(),
                },
                expires_at: now + TOKEN_LIFETIME,
            },
        );
        Ok(token)
    }

    /// Who a live `token` belongs to.
    fn caller(&self, token: &str) -> Option<Caller> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(token)
            .filter(|s| s.expires_at > Instant::now())
            .map(|s| s.caller.clone())
    }
}

/// Middleware: a request with a live `Authorization: Bearer` token carries its [`Caller`]
/// (which handlers extract, answering 401 without one), as the shop's gateway passes a
/// verified caller on. Nothing else is trusted: a `Caller` already in the extensions is
/// removed first.
pub(crate) async fn identify(
    State(sessions): State<Arc<Sessions>>,
    mut request: Request,
    next: Next,
) -> Response {
    request.extensions_mut().remove::<Caller>();
    let caller = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .and_then(|token| sessions.caller(token.trim()));
    if let Some(caller) = caller {
        request.extensions_mut().insert(caller);
    }
    next.run(request).await
}
