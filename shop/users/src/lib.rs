//! The reference shop's users service: accounts, logins and the keys that sign the shop's
//! tokens.
//!
//! - `POST /api/users` registers a customer (emails compared case-insensitively, passwords
//!   hashed with Argon2id on the blocking pool); `POST /api/auth/token` trades an email and
//!   password for a 15-minute EdDSA JWT and a refresh token; `POST /api/auth/refresh` rotates
//!   the refresh token (a reused one ends the session); `POST /api/auth/logout` ends the
//!   session; `GET /api/users/me` shows the caller's profile (module `sessions`).
//! - `GET /.well-known/jwks.json` publishes the Ed25519 public keys the gateway verifies
//!   tokens with. The signing key is generated on first start and kept in the service's
//!   database, so a restart keeps issued tokens valid; it is rotated every 30 days or by an
//!   administrator (`POST /api/auth/keys/rotate`), with an overlap (module `keys`).
//! - `GET /api/auth/revocations` lists revoked access tokens for the gateway to refuse.
//! - gRPC `Users.GetUser` lets other services look a user up.
//! - [`ensure_admin`] creates the administrator account `trellis up` starts with.
//!
//! The service follows the shape every shop service has (see `shop/README.md`): [`app`]
//! returns the router (REST, gRPC and `/openapi.json`) and the database for `/readyz`;
//! [`openapi`] is its part of the public API document.
//!
//! # Example
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The key the gateway and the other services of this shop share.
//! let service_key = trellis_service::auth::ServiceKey::from_env_or_file("trellis-data".as_ref())?;
//! let config = shop_users::Config {
//!     database_url: "sqlite://trellis-data/users.db".into(),
//!     service_key,
//! };
//! let (router, db) = shop_users::app(config).await?;
//! shop_users::ensure_admin(&db, "admin@example.com", "a long password", "Admin").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8101").await?;
//! trellis_service::serve(listener, router, Some(db), None, std::future::pending()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub use attempts::{
    LOGIN_ATTEMPT_INTERVAL, LOGIN_ATTEMPTS_BURST, LOGIN_FAILURES_FREE, LOGIN_LOCKOUT_MAX,
    LOGIN_RATE_PER_ADDRESS,
};

mod attempts;
mod grpc;
mod keys;
pub mod password;
mod rest;
mod sessions;
mod store;

use std::sync::Arc;

use axum::Router;
use trellis_service::{Db, OpenError};

pub use keys::{
    AUDIENCE, ISSUER, KEY_ACTIVATION_DELAY_S, KEY_OVERLAP_S, KEY_ROTATE_AFTER_S,
    KEYS_RELOAD_INTERVAL, TOKEN_LEEWAY_S, TOKEN_LIFETIME_S,
};
pub use sessions::REFRESH_LIFETIME_S;

/// Shortest password accepted, in characters.
pub const PASSWORD_CHARS_MIN: usize = 8;
/// Longest password accepted, in characters.
pub const PASSWORD_CHARS_MAX: usize = 128;
/// Longest display name, in characters.
pub const NAME_CHARS_MAX: usize = 100;
/// Longest email address, in bytes (RFC 5321's path limit).
pub const EMAIL_BYTES_MAX: usize = 254;
/// Largest request body, bytes.
pub const BODY_BYTES_MAX: usize = 16 * 1024;

/// What the service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// The shop's key: the service believes only callers whose identity token it signed.
    pub service_key: trellis_service::auth::ServiceKey,
}

/// Why the service could not start, or an account could not be ensured.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened or its schema applied; the message names the URL
    /// without its password.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A query failed.
    #[error("{what}: {source}")]
    Database {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: sqlx::Error,
    },
    /// The signing key could not be generated, stored or loaded.
    #[error("signing key: {0}")]
    SigningKey(String),
    /// A password could not be hashed.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// Input refused by validation (for example the admin account's email).
    #[error("{code}: {message}")]
    Invalid {
        /// The validation code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) db: Db,
    pub(crate) keys: Arc<keys::KeyRing>,
    pub(crate) hasher: Arc<password::Hasher>,
    pub(crate) attempts: Arc<attempts::LoginAttempts>,
}

/// Opens the database, runs the schema, loads (or on first start generates) the signing key,
/// and returns the router to serve plus the database (for `/readyz`).
///
/// # Errors
/// [`Error::Open`] naming the URL when the database cannot be opened or its schema applied,
/// [`Error::SigningKey`], or [`Error::Database`].
pub async fn app(config: Config) -> Result<(Router, Db), Error> {
    metrics::describe_counter!("shop_users_registrations_total", "Accounts registered");
    metrics::describe_counter!(
        "shop_users_logins_total",
        "Token requests, by outcome (ok, refused, limited)"
    );
    metrics::describe_counter!(
        "shop_users_refreshes_total",
        "Refresh-token exchanges, by outcome (ok, refused, reused: the session was ended)"
    );
    metrics::describe_counter!("shop_users_logouts_total", "Sessions ended by a logout");
    let db = open(&config.database_url).await?;
    let keys = Arc::new(keys::KeyRing::load_or_create(&db).await?);
    keys::spawn_upkeep(&keys);
    let hasher = password::Hasher::new().await?;
    let state = State {
        db: db.clone(),
        keys,
        hasher: Arc::new(hasher),
        attempts: Arc::new(attempts::LoginAttempts::new()),
    };
    let router = rest::router(state.clone()).merge(grpc::router(state));
    let router = trellis_service::auth::protect(router, &config.service_key);
    Ok((router, db))
}

/// The service's part of the public OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    rest::openapi()
}

/// Creates the administrator account (role `admin`) when no account has `email` (answers
/// `true`), and leaves an existing account alone (answers `false`). `trellis up` calls it on
/// first start.
///
/// # Errors
/// [`Error::Invalid`] when the email, password or name would be refused at registration;
/// [`Error::Hash`] or [`Error::Database`] when storing fails.
pub async fn ensure_admin(db: &Db, email: &str, password: &str, name: &str) -> Result<bool, Error> {
    let input = rest::validate_registration(email, password, name).map_err(|e| Error::Invalid {
        code: e.0,
        message: e.1,
    })?;
    if store::find_by_email(db, &input.email)
        .await
        .map_err(|source| Error::Database {
            what: "looking up the admin account",
            source,
        })?
        .is_some()
    {
        return Ok(false);
    }
    let hash = password::hash_blocking(password.to_owned()).await?;
    let user = store::NewUser {
        email: input.email,
        name: input.name,
        role: trellis_service::ROLE_ADMIN,
        password_hash: hash,
    };
    match store::insert(db, &user).await {
        Ok(_) => Ok(true),
        Err(store::InsertError::EmailTaken) => Ok(false),
        Err(store::InsertError::Db(source)) => Err(Error::Database {
            what: "creating the admin account",
            source,
        }),
    }
}

/// Opens the users database at `database_url` and applies the schema (for tools that work on
/// it without serving, such as `trellis users create-admin`).
///
/// # Errors
/// [`Error::Open`] naming the URL.
pub async fn open(database_url: &str) -> Result<Db, Error> {
    Ok(Db::open_with_schema(database_url, store::SCHEMA).await?)
}

/// What [`promote_admin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// The account had another role and is an administrator now.
    Promoted,
    /// The account was an administrator already.
    AlreadyAdmin,
    /// No account has this email.
    NoAccount,
}

/// Makes the account with `email` an administrator, leaving its password alone.
///
/// # Errors
/// [`Error::Database`] when the lookup or the update fails.
pub async fn promote_admin(db: &Db, email: &str) -> Result<Promotion, Error> {
    let email = email.trim().to_lowercase();
    let database = |what| move |source| Error::Database { what, source };
    let changed = store::set_role(db, &email, trellis_service::ROLE_ADMIN)
        .await
        .map_err(database("promoting the account"))?;
    if changed > 0 {
        return Ok(Promotion::Promoted);
    }
    let found = store::find_by_email(db, &email)
        .await
        .map_err(database("looking up the account"))?;
    Ok(if found.is_some() {
        Promotion::AlreadyAdmin
    } else {
        Promotion::NoAccount
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn database_passwords_are_not_shown_in_errors() {
        // Goal: a startup error can be printed as it is; method: a URL with a password that
        // cannot be opened (the kit's `redact_url` has the cases).
        let text = open("mysql://u:secret@h/db").await.unwrap_err().to_string();
        assert!(text.contains("mysql://u:***@h/db"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
