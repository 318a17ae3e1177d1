//! Passwords and bearer tokens.
//!
//! Passwords are hashed as shop/users hashes them (Argon2id, the crate's default parameters,
//! on the blocking pool, at most [`HASHES_IN_FLIGHT_MAX`] at a time), so registering and
//! logging in cost what they cost in the shop. A token is 32 random bytes, hex-encoded,
//! mapped in memory to its user for [`TOKEN_LIFETIME`]: the shop's signed JWTs and their
//! verification at the gateway are part of the distributed design's price, not of this
//! baseline.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use trellis_service::{ApiError, Caller};

/// Most hashes computed at once (shop/users' limit: each takes 19 MiB and a core).
pub(crate) const HASHES_IN_FLIGHT_MAX: usize = 8;
/// How long a request waits for a hashing slot before it is refused (503 `busy`).
const HASH_WAIT_MAX: Duration = Duration::from_secs(10);
/// How long a token is valid (shop/users' access token lifetime).
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// Most tokens kept; past it expired ones are dropped, and with none expired a login is
/// refused (503 `busy`).
const TOKENS_MAX: usize = 100_000;
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// Why a hash was not computed.
#[derive(Debug)]
pub(crate) enum HashError {
    /// Every slot stayed busy for [`HASH_WAIT_MAX`].
    Busy,
    /// The hash failed.
    Failed(String),
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy => f.write_str("every hashing slot is busy"),
            Self::Failed(why) => write!(f, "hashing failed: {why}"),
        }
    }
}

impl std::error::Error for HashError {}

impl From<HashError> for ApiError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => ApiError::unavailable(
                "busy",
                "too many logins and registrations at once; retry shortly",
            ),
            HashError::Failed(why) => ApiError::internal(why),
        }
    }
}

async fn hash_blocking(password: String) -> Result<String, HashError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| HashError::Failed(e.to_string()))
    })
    .await
    .map_err(|e| HashError::Failed(e.to_string()))?
}

/// Hashes and verifies passwords, at most [`HASHES_IN_FLIGHT_MAX`] at a time.
#[derive(Debug)]
pub(crate) struct Hasher {
    slots: Semaphore,
    /// A hash of a random password, verified against for an unknown email, so such a login
    /// costs what a wrong password costs (as in shop/users).
    decoy: String,
}

impl Hasher {
    pub(crate) async fn new() -> Result<Self, HashError> {
        let decoy = hash_blocking(random_hex().map_err(HashError::Failed)?).await?;
        Ok(Self {
            slots: Semaphore::new(HASHES_IN_FLIGHT_MAX),
            decoy,
        })
    }

    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, HashError> {
        match tokio::time::timeout(HASH_WAIT_MAX, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(HashError::Busy),
        }
    }

    /// Hashes a new password.
    pub(crate) async fn hash(&self, password: String) -> Result<String, HashError> {
        let _slot = self.slot().await?;
        hash_blocking(password).await
    }

    /// Whether `password` matches `hash`; with no hash (unknown account), spends the same
    /// time on the decoy and answers `false`.
    pub(crate) async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, HashError> {
        let _slot = self.slot().await?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy.clone());
        let matches = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
        .map_err(|e| HashError::Failed(e.to_string()))?;
        Ok(known && matches)
    }
}

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
