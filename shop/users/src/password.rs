//! Argon2id password hashes, computed on the blocking pool with bounded concurrency.
//!
//! Public so that a comparison (bench/baseline) hashes exactly as the users service does.

use std::time::Duration;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use tokio::sync::Semaphore;
use trellis_service::ApiError;

use crate::Error;

/// Most hashes computed at once (each takes 19 MiB and a core for tens of milliseconds).
pub const HASHES_IN_FLIGHT_MAX: usize = 8;
/// How long a request waits for a hashing slot before it is refused.
pub const HASH_WAIT_MAX: Duration = Duration::from_secs(10);

/// Hashes a password with Argon2id's default parameters on the blocking pool.
///
/// # Errors
/// [`Error::Hash`].
pub async fn hash_blocking(password: String) -> Result<String, Error> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| Error::Hash(e.to_string()))
    })
    .await
    .map_err(|e| Error::Hash(e.to_string()))?
}

/// Why a hashing call did not run.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every slot stayed busy for [`HASH_WAIT_MAX`].
    #[error("every hashing slot is busy")]
    Busy,
    /// The hash failed.
    #[error(transparent)]
    Failed(Error),
}

impl From<HashError> for ApiError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => ApiError::unavailable(
                "busy",
                "too many logins and registrations at once; retry shortly",
            ),
            HashError::Failed(e) => ApiError::internal(e),
        }
    }
}

/// Hashes and verifies passwords, at most [`HASHES_IN_FLIGHT_MAX`] at a time.
#[derive(Debug)]
pub struct Hasher {
    slots: Semaphore,
    /// A hash of a random password, verified against when the email is unknown so such a
    /// login takes as long as a wrong password.
    decoy: String,
}

impl Hasher {
    /// A hasher with [`HASHES_IN_FLIGHT_MAX`] slots and a fresh decoy hash.
    ///
    /// # Errors
    /// [`Error::Hash`]: no randomness, or the decoy could not be hashed.
    pub async fn new() -> Result<Self, Error> {
        let mut random = [0_u8; 16];
        getrandom::fill(&mut random).map_err(|e| Error::Hash(e.to_string()))?;
        let decoy = hash_blocking(format!("{random:?}")).await?;
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
    ///
    /// # Errors
    /// [`HashError::Busy`] after [`HASH_WAIT_MAX`] without a slot; [`HashError::Failed`].
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let _slot = self.slot().await?;
        hash_blocking(password).await.map_err(HashError::Failed)
    }

    /// Whether `password` matches `hash`; with no hash (unknown account), spends the same
    /// time on the decoy and answers `false`.
    ///
    /// # Errors
    /// As [`hash`](Self::hash).
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, HashError> {
        let _slot = self.slot().await?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy.clone());
        let matches = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
        .map_err(|e| HashError::Failed(Error::Hash(e.to_string())))?;
        Ok(known && matches)
    }
}
