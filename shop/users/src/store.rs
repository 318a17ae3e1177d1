//! The users table and the signing-key table.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Row;
use trellis_service::{Db, on_db};

/// Tables of the users service (DDL both engines accept).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY,
    seed TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
";

/// A stored user.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub(crate) id: String,
    pub(crate) email: String,
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) password_hash: String,
}

/// A user to insert.
#[derive(Debug)]
pub(crate) struct NewUser {
    pub(crate) email: String,
    pub(crate) name: String,
    pub(crate) role: &'static str,
    pub(crate) password_hash: String,
}

/// Why an insert failed.
#[derive(Debug)]
pub(crate) enum InsertError {
    EmailTaken,
    Db(sqlx::Error),
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const USER_COLUMNS: &str = "id, email, name, role, password_hash";

macro_rules! user_from_row {
    ($row:expr) => {
        User {
            id: $row.get("id"),
            email: $row.get("email"),
            name: $row.get("name"),
            role: $row.get("role"),
            password_hash: $row.get("password_hash"),
        }
    };
}

/// Inserts a user with a fresh UUIDv7 id; a taken (lowercased) email is `EmailTaken`.
pub(crate) async fn insert(db: &Db, user: &NewUser) -> Result<User, InsertError> {
    let id = uuid::Uuid::now_v7().to_string();
    let result = on_db!(db, |pool| sqlx::query(
        "INSERT INTO users (id, email, name, role, password_hash, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)"
    )
    .bind(&id)
    .bind(&user.email)
    .bind(&user.name)
    .bind(user.role)
    .bind(&user.password_hash)
    .bind(now_ms())
    .execute(pool)
    .await
    .map(|r| r.rows_affected()));
    match result {
        Ok(_) => Ok(User {
            id,
            email: user.email.clone(),
            name: user.name.clone(),
            role: user.role.to_owned(),
            password_hash: user.password_hash.clone(),
        }),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(InsertError::EmailTaken),
        Err(e) => Err(InsertError::Db(e)),
    }
}

/// The user with this (already lowercased) email.
pub(crate) async fn find_by_email(db: &Db, email: &str) -> Result<Option<User>, sqlx::Error> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE email = $1");
    on_db!(db, |pool| sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(email)
        .fetch_optional(pool)
        .await
        .map(|row| row.map(|row| user_from_row!(row))))
}

/// Gives the account with this (already lowercased) email `role`; the rows changed (0 when
/// there is no such account or it has the role already).
pub(crate) async fn set_role(db: &Db, email: &str, role: &str) -> Result<u64, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "UPDATE users SET role = $1 WHERE email = $2 AND role <> $1"
    )
    .bind(role)
    .bind(email)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))
}

/// The user with this id.
pub(crate) async fn find_by_id(db: &Db, id: &str) -> Result<Option<User>, sqlx::Error> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
    on_db!(db, |pool| sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map(|row| row.map(|row| user_from_row!(row))))
}

/// Every stored signing key as `(kid, seed)`, oldest first (the first one signs).
pub(crate) async fn signing_keys(db: &Db) -> Result<Vec<(String, String)>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT kid, seed FROM signing_keys ORDER BY created_at, kid"
    )
    .fetch_all(pool)
    .await
    .map(|rows| rows
        .iter()
        .map(|r| (r.get("kid"), r.get("seed")))
        .collect()))
}

/// Stores a signing key unless one with its kid exists.
pub(crate) async fn insert_signing_key(db: &Db, kid: &str, seed: &str) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "INSERT INTO signing_keys (kid, seed, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (kid) DO NOTHING"
    )
    .bind(kid)
    .bind(seed)
    .bind(now_ms())
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}
