//! The users, signing keys, sessions (refresh tokens) and revoked access tokens.

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
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    user_id TEXT NOT NULL,
    access_jti TEXT NOT NULL,
    access_exp BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX IF NOT EXISTS refresh_tokens_by_family ON refresh_tokens (family);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY,
    exp BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_tokens_by_time ON revoked_tokens (revoked_at);
CREATE TABLE IF NOT EXISTS login_failures (
    user_id TEXT PRIMARY KEY,
    failures BIGINT NOT NULL,
    locked_until BIGINT NOT NULL
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

/// A stored signing key. `created_at_ms` is when it starts signing (a rotated key is stored
/// ahead of that time and published from the moment it is stored).
#[derive(Debug, Clone)]
pub(crate) struct StoredKey {
    pub(crate) kid: String,
    /// The Ed25519 seed, base64url.
    pub(crate) seed: String,
    pub(crate) created_at_ms: i64,
}

/// Every stored signing key, oldest first.
pub(crate) async fn signing_keys(db: &Db) -> Result<Vec<StoredKey>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT kid, seed, created_at FROM signing_keys ORDER BY created_at, kid"
    )
    .fetch_all(pool)
    .await
    .map(|rows| rows
        .iter()
        .map(|r| StoredKey {
            kid: r.get("kid"),
            seed: r.get("seed"),
            created_at_ms: r.get("created_at"),
        })
        .collect()))
}

/// Stores a signing key that starts signing at `active_from_ms`, unless one with its kid
/// exists.
pub(crate) async fn insert_signing_key(
    db: &Db,
    kid: &str,
    seed: &str,
    active_from_ms: i64,
) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "INSERT INTO signing_keys (kid, seed, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (kid) DO NOTHING"
    )
    .bind(kid)
    .bind(seed)
    .bind(active_from_ms)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Deletes one signing key.
pub(crate) async fn delete_signing_key(db: &Db, kid: &str) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "DELETE FROM signing_keys WHERE kid = $1"
    )
    .bind(kid)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Deletes every signing key but `kid`; the number deleted.
pub(crate) async fn delete_signing_keys_except(db: &Db, kid: &str) -> Result<u64, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "DELETE FROM signing_keys WHERE kid <> $1"
    )
    .bind(kid)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))
}

/// A refresh token as stored: only its hash, the session (family) it belongs to and the
/// access token it was issued with.
#[derive(Debug, Clone)]
pub(crate) struct RefreshToken {
    pub(crate) token_hash: String,
    pub(crate) family: String,
    pub(crate) user_id: String,
    pub(crate) access_jti: String,
    /// The access token's `exp`, Unix seconds.
    pub(crate) access_exp: i64,
    /// Unix ms.
    pub(crate) expires_at_ms: i64,
    pub(crate) used: bool,
    pub(crate) revoked: bool,
}

/// Stores a new refresh token.
pub(crate) async fn insert_refresh_token(db: &Db, token: &RefreshToken) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "INSERT INTO refresh_tokens \
         (token_hash, family, user_id, access_jti, access_exp, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)"
    )
    .bind(&token.token_hash)
    .bind(&token.family)
    .bind(&token.user_id)
    .bind(&token.access_jti)
    .bind(token.access_exp)
    .bind(token.expires_at_ms)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// The refresh token with this hash.
pub(crate) async fn find_refresh_token(
    db: &Db,
    token_hash: &str,
) -> Result<Option<RefreshToken>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT token_hash, family, user_id, access_jti, access_exp, expires_at, \
         used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1"
    )
    .bind(token_hash)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(|r| RefreshToken {
        token_hash: r.get("token_hash"),
        family: r.get("family"),
        user_id: r.get("user_id"),
        access_jti: r.get("access_jti"),
        access_exp: r.get("access_exp"),
        expires_at_ms: r.get("expires_at"),
        used: r.get::<Option<i64>, _>("used_at").is_some(),
        revoked: r.get::<Option<i64>, _>("revoked_at").is_some(),
    })))
}

/// Marks an unused, unrevoked refresh token used; `false` when another request used it first.
pub(crate) async fn use_refresh_token(
    db: &Db,
    token_hash: &str,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let changed = on_db!(db, |pool| sqlx::query(
        "UPDATE refresh_tokens SET used_at = $1 \
         WHERE token_hash = $2 AND used_at IS NULL AND revoked_at IS NULL"
    )
    .bind(now_ms)
    .bind(token_hash)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(changed == 1)
}

/// Ends a session: every refresh token of `family` is revoked and every access token issued
/// with one of them that has not expired is revoked too, in one transaction. The number of
/// access tokens revoked.
pub(crate) async fn revoke_family(db: &Db, family: &str, now_ms: i64) -> Result<u64, sqlx::Error> {
    let now_s = now_ms / 1000;
    on_db!(db, |pool, begin| {
        let mut tx = pool.begin_with(begin).await?;
        let revoked = sqlx::query(
            "INSERT INTO revoked_tokens (jti, exp, revoked_at) \
             SELECT access_jti, access_exp, $1 FROM refresh_tokens \
             WHERE family = $2 AND access_exp >= $3 \
             ON CONFLICT (jti) DO NOTHING",
        )
        .bind(now_ms)
        .bind(family)
        .bind(now_s)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = $1 WHERE family = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms)
        .bind(family)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(revoked)
    })
}

/// Revokes one access token until its `exp` (Unix seconds).
pub(crate) async fn revoke_access_token(
    db: &Db,
    jti: &str,
    exp: i64,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "INSERT INTO revoked_tokens (jti, exp, revoked_at) VALUES ($1, $2, $3) \
         ON CONFLICT (jti) DO NOTHING"
    )
    .bind(jti)
    .bind(exp)
    .bind(now_ms)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// A revoked access token that has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revoked {
    pub(crate) jti: String,
    /// Unix seconds.
    pub(crate) exp: i64,
    /// Unix ms.
    pub(crate) revoked_at_ms: i64,
}

/// Revocations made at or after `from_ms` whose tokens have not expired at `now_s`, oldest
/// first, at most `limit`.
pub(crate) async fn revocations_since(
    db: &Db,
    from_ms: i64,
    now_s: i64,
    limit: i64,
) -> Result<Vec<Revoked>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT jti, exp, revoked_at FROM revoked_tokens \
         WHERE revoked_at >= $1 AND exp >= $2 ORDER BY revoked_at, jti LIMIT $3"
    )
    .bind(from_ms)
    .bind(now_s)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map(|rows| rows
        .iter()
        .map(|r| Revoked {
            jti: r.get("jti"),
            exp: r.get("exp"),
            revoked_at_ms: r.get("revoked_at"),
        })
        .collect()))
}

/// Drops revocations of tokens expired a leeway ago and sessions past their expiry.
pub(crate) async fn prune_sessions(db: &Db, now_ms: i64) -> Result<(), sqlx::Error> {
    let leeway_s = i64::try_from(crate::keys::TOKEN_LEEWAY_S).unwrap_or(i64::MAX);
    let expired_s = now_ms / 1000 - leeway_s;
    on_db!(db, |pool| {
        sqlx::query("DELETE FROM revoked_tokens WHERE exp < $1")
            .bind(expired_s)
            .execute(pool)
            .await?;
        sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < $1")
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// An account's consecutive failed logins and the time (Unix ms) it is locked until.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failures {
    pub(crate) failures: i64,
    pub(crate) locked_until_ms: i64,
}

/// The account's failed logins since its last success; `None` when there are none.
pub(crate) async fn login_failures(
    db: &Db,
    user_id: &str,
) -> Result<Option<Failures>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT failures, locked_until FROM login_failures WHERE user_id = $1"
    )
    .bind(user_id)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(|r| Failures {
        failures: r.get("failures"),
        locked_until_ms: r.get("locked_until"),
    })))
}

/// Counts one more failed login and locks the account until `lock(failures)` (Unix ms; 0
/// for none), in one transaction, so replicas counting at once lose no failure.
pub(crate) async fn record_login_failure(
    db: &Db,
    user_id: &str,
    lock: impl Fn(i64) -> i64,
) -> Result<Failures, sqlx::Error> {
    on_db!(db, |pool, begin| {
        let mut tx = pool.begin_with(begin).await?;
        let failures: i64 = sqlx::query(
            "INSERT INTO login_failures (user_id, failures, locked_until) VALUES ($1, 1, 0) \
             ON CONFLICT (user_id) DO UPDATE SET failures = login_failures.failures + 1 \
             RETURNING failures",
        )
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?
        .get("failures");
        let locked_until_ms = lock(failures);
        sqlx::query("UPDATE login_failures SET locked_until = $1 WHERE user_id = $2")
            .bind(locked_until_ms)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Failures {
            failures,
            locked_until_ms,
        })
    })
}

/// Forgets the account's failed logins (a successful login).
pub(crate) async fn clear_login_failures(db: &Db, user_id: &str) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "DELETE FROM login_failures WHERE user_id = $1"
    )
    .bind(user_id)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}
